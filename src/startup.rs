//! Assembles the application in one place: store, migrations, metrics, routes, middleware and
//! the listener. `main` and the tests both call [`Application::build`], so what is tested is
//! what runs.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::{Server, ServerHandle};
use actix_web::middleware::from_fn;
use actix_web::{web, App, HttpServer};

use crate::audit::middleware::audit_request;
use crate::audit::AuditLog;
use crate::config::Settings;
use crate::crypto::{
    CryptoError, KeyId, PhiKeys, PhiVault, BLIND_INDEX_CHECK_SETTING, BLIND_INDEX_KEY_SETTING,
};
use crate::fhir::capability::{Capability, CapabilityError};
use crate::fhir::resources::search::SavedSearches;
use crate::fhir::{self, FhirApi};
use crate::gate::clients::JwksFetcher;
use crate::gate::rate_limit::{limit_token, RateLimits};
use crate::gate::{smart, token_endpoint, AccessTokens};
use crate::http::observe::observe;
use crate::http::ApiError;
use crate::keys::{MasterKeyError, MasterSecret};
use crate::ops::{self, Metrics};
use crate::store::{self, PoolOptions, Store, StoreError};

/// Shared state every handler can reach through `web::Data<AppState>`.
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub metrics: Metrics,
    pub base_url: String,
    pub gate: GateState,
    pub audit: AuditLog,
    pub rate_limits: Arc<RateLimits>,
    /// What the PHI vault is made of; the vault itself opens once the store says which key its
    /// blind indexes use (at start-up, or on first use when migrations were pending).
    pub phi_keys: PhiKeys,
    vault: tokio::sync::OnceCell<PhiVault>,
    /// Parameters of `POST _search` requests, for their paging links.
    pub saved_searches: SavedSearches,
    /// Bulk export (`$export`): settings, exported types, this instance's runners.
    pub exports: fhir::export::Exports,
    /// Benchmarks only (see [`BuildOptions`]).
    pub skip_audit: bool,
    /// EHR connections and the adapter registry.
    pub connections: crate::sync::Connections,
    /// When `/readyz` calls a queue stuck (`sync.stuck_after_secs`).
    pub stuck_after: Duration,
    /// The claim-status outbox: sealing its rows, waking and stopping its dispatcher.
    pub outbox: crate::sync::ClaimOutbox,
    /// Commits claim-status changes in groups (`sync::outbox::changes`).
    pub claim_changes: crate::sync::outbox::changes::ChangeWriter,
    /// Patient-change webhooks: settings, payload cipher, this instance's inbox worker.
    pub webhooks: crate::sync::webhooks::Webhooks,
    /// Claim preparation's code tables, payer rules and validator chain.
    pub claim_rules: Arc<crate::claims::ClaimRules>,
    /// Whose `X-Forwarded-For` names the client (audit `source_ip`, token rate limit).
    pub trusted_proxies: crate::http::client_ip::TrustedProxies,
}

/// Options that are not configuration. Nothing in the CLI or the config files can set them.
#[derive(Debug, Clone, Copy, Default)]
pub struct BuildOptions {
    /// Skip recording audit events, so the benchmark can report what auditing costs. A gateway
    /// built this way is not HIPAA compliant; only `benches/gateway.rs` sets it.
    pub skip_audit: bool,
}

/// What the gate needs: the token issuer/verifier, the JWKS fetcher and the token URL that
/// client assertions must name as their audience.
pub struct GateState {
    pub tokens: AccessTokens,
    pub jwks: JwksFetcher,
    pub token_url: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Capability(#[from] CapabilityError),
    #[error("master key: {0}")]
    MasterKey(#[from] MasterKeyError),
    #[error("PHI keys: {0}")]
    Crypto(#[from] CryptoError),
    #[error(transparent)]
    Profiles(#[from] fhirgate_mappings::ProfileError),
    #[error("claim rules (claims.rules_dir): {0}")]
    ClaimRules(#[from] crate::claims::LoadError),
}

pub struct Application {
    addr: SocketAddr,
    base_url: String,
    server: Server,
    store: Arc<dyn Store>,
    audit_writer: tokio::task::JoinHandle<()>,
    exports: fhir::export::Exports,
    /// The nightly pulls' scheduler and its jobs (when `sync.scheduler` is on).
    scheduler: Option<(
        crate::sync::scheduler::SchedulerHandle,
        crate::sync::PullJobs,
    )>,
    outbox: crate::sync::ClaimOutbox,
    webhooks: crate::sync::webhooks::Webhooks,
}

/// The mapping profiles: built-in, with the configured folder's over them.
pub fn load_profiles(
    settings: &Settings,
) -> Result<fhirgate_mappings::Profiles, fhirgate_mappings::ProfileError> {
    if settings.mapping_profiles_dir.is_empty() {
        fhirgate_mappings::Profiles::built_in()
    } else {
        fhirgate_mappings::Profiles::load(std::path::Path::new(&settings.mapping_profiles_dir))
    }
}

/// The FHIR API as registered today. Later resources are added here, before the operations
/// (bulk export exports every stored type registered before it).
pub fn fhir_api() -> FhirApi {
    let mut api = FhirApi::new();
    for kind in fhir::resources::KINDS {
        api = api.resource(fhir::resources::resource_def(kind));
    }
    let api = api.resource(fhir::audit_event::resource()).system(
        &["transaction", "batch"],
        fhir::bundle::MAX_BUNDLE_BYTES,
        fhir::bundle::process,
    );
    fhir::export::register(api)
}

pub fn pool_options(settings: &Settings) -> PoolOptions {
    PoolOptions {
        max_connections: settings.database_max_connections,
        acquire_timeout: Duration::from_secs(settings.database_acquire_timeout_secs),
    }
}

impl Application {
    /// Connects to the configured database, migrates it (unless `migrate_on_start = false`)
    /// and binds the listener.
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        Self::build_with_options(settings, BuildOptions::default()).await
    }

    pub async fn build_with_options(
        settings: Settings,
        options: BuildOptions,
    ) -> Result<Self, StartupError> {
        let store = store::connect(&settings.database_url, &pool_options(&settings)).await?;
        if settings.migrate_on_start {
            store.migrate().await?;
        }
        for warning in store.server_warnings().await {
            tracing::warn!("{warning}");
        }
        let master = MasterSecret::from_settings(&settings)?;
        Self::build_with_store(settings, store, &master, options).await
    }

    pub async fn build_with_store(
        settings: Settings,
        store: Arc<dyn Store>,
        master: &MasterSecret,
        options: BuildOptions,
    ) -> Result<Self, StartupError> {
        let listener = TcpListener::bind(settings.listen).map_err(|source| StartupError::Bind {
            addr: settings.listen,
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| StartupError::Bind {
            addr: settings.listen,
            source,
        })?;
        let phi_keys = PhiKeys::new(master.keyring());
        let vault = tokio::sync::OnceCell::new();
        match open_vault(&*store, &phi_keys).await {
            Ok(v) => {
                let _ = vault.set(v);
            }
            // A keyring without the blind index key would search wrongly: refuse to start.
            Err(StartupError::Crypto(e)) => return Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, "PHI vault not opened yet (migrations pending?); will retry on first use")
            }
        }
        let profiles = Arc::new(load_profiles(&settings)?);
        let claim_rules = Arc::new(crate::claims::ClaimRules::from_settings(&settings.claims)?);
        let connections =
            crate::sync::Connections::new(Arc::clone(&store), master.keyring(), profiles);
        let base_url = settings.base_url(addr);
        let api = fhir_api();
        let capability = web::Data::new(Capability::build(&api, &base_url)?);
        let token_secret = master.derive_token_secret();
        let (audit, audit_writer) = AuditLog::start(Arc::clone(&store));
        let rate_limits = Arc::new(RateLimits::new(&settings.rate_limit));
        spawn_eviction(
            Arc::downgrade(&rate_limits),
            settings.rate_limit.window_secs,
        );
        let state = web::Data::new(AppState {
            store: Arc::clone(&store),
            metrics: Metrics::new(),
            gate: GateState {
                tokens: AccessTokens::new(
                    &*token_secret,
                    &base_url,
                    Duration::from_secs(settings.access_token_lifetime_secs),
                ),
                jwks: JwksFetcher::new(),
                token_url: format!("{base_url}/auth/token"),
            },
            base_url: base_url.clone(),
            audit,
            rate_limits: Arc::clone(&rate_limits),
            phi_keys,
            vault,
            saved_searches: SavedSearches::default(),
            exports: fhir::export::Exports::new(&settings.export, &api),
            skip_audit: options.skip_audit,
            connections,
            stuck_after: Duration::from_secs(settings.sync.stuck_after_secs),
            outbox: crate::sync::ClaimOutbox::new(&settings.outbox, master.keyring()),
            claim_changes: crate::sync::outbox::changes::ChangeWriter::start(Arc::clone(&store)),
            webhooks: crate::sync::webhooks::Webhooks::new(
                &settings.webhooks,
                master.keyring(),
                Arc::clone(&store),
            ),
            claim_rules,
            // Checked when the settings were loaded.
            trusted_proxies: crate::http::client_ip::TrustedProxies::parse(
                &settings.trusted_proxies,
            )
            .unwrap_or_default(),
        });
        let exports = state.exports.clone();
        fhir::export::start(state.clone());
        let outbox = state.outbox.clone();
        crate::sync::outbox::dispatcher::start(state.clone());
        let webhooks = state.webhooks.clone();
        crate::sync::webhooks::Webhooks::start(state.clone());
        let scheduler = start_scheduler(&settings, &state);

        let mut server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .app_data(capability.clone())
                .wrap(from_fn(observe))
                .configure(ops::configure)
                .service(
                    web::resource("/auth/token")
                        .wrap(from_fn(limit_token))
                        .wrap(from_fn(audit_request))
                        .route(web::post().to(token_endpoint::token)),
                )
                .route(
                    "/.well-known/smart-configuration",
                    web::get().to(smart::smart_configuration),
                )
                .configure(|cfg| fhir::configure(&api, cfg))
                .configure(crate::api::configure)
                .configure(crate::sync::webhooks::configure)
                .default_service(web::to(not_found))
        })
        .shutdown_timeout(settings.shutdown_timeout_secs);
        if settings.workers > 0 {
            server = server.workers(settings.workers);
        }
        let server = server
            .listen(listener)
            .map_err(|source| StartupError::Bind {
                addr: settings.listen,
                source,
            })?
            .run();
        Ok(Self {
            addr,
            base_url,
            server,
            store,
            audit_writer,
            exports,
            scheduler,
            outbox,
            webhooks,
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// A handle to stop the server gracefully (as SIGTERM does).
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    pub fn store(&self) -> Arc<dyn Store> {
        Arc::clone(&self.store)
    }

    /// Serves until SIGINT/SIGTERM (or [`ServerHandle::stop`]), lets in-flight requests finish
    /// within `shutdown_timeout_secs`, then closes the database pool.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let result = self.server.await;
        // Exports, pulls, the claim-status dispatcher and the webhook worker finish what they
        // hold (or give it back for the next instance) together.
        let pulls = async {
            if let Some((scheduler, jobs)) = self.scheduler {
                scheduler.stop(&jobs, Duration::from_secs(10)).await;
            }
        };
        tokio::join!(
            self.exports.shutdown(Duration::from_secs(5)),
            self.outbox.shutdown(),
            self.webhooks.shutdown(Duration::from_secs(5)),
            pulls,
        );
        // The server's handles to the audit writer are gone with it: let it drain, then close.
        if tokio::time::timeout(Duration::from_secs(10), self.audit_writer)
            .await
            .is_err()
        {
            tracing::error!("audit writer did not drain within 10 s");
        }
        self.store.close().await;
        tracing::info!("shutdown complete");
        result
    }
}

/// The PHI vault: encryption under the active master key, blind indexes under the key the
/// database recorded when it first indexed (recorded now if this database is new).
pub async fn open_vault(store: &dyn Store, keys: &PhiKeys) -> Result<PhiVault, StartupError> {
    let recorded = store
        .crypto_setting(BLIND_INDEX_KEY_SETTING, keys.active_key_id().as_str())
        .await?;
    let key_id = KeyId::parse(&recorded)?;
    let vault = keys.vault(&key_id)?;
    let check = vault.key_check();
    let recorded_check = store
        .crypto_setting(BLIND_INDEX_CHECK_SETTING, &check)
        .await?;
    if !crate::crypto::constant_time_eq(recorded_check.as_bytes(), check.as_bytes()) {
        return Err(CryptoError::BlindIndexKeyMismatch(key_id).into());
    }
    Ok(vault)
}

impl AppState {
    /// The PHI vault, opened on first use if start-up could not open it.
    pub async fn vault(&self) -> Result<&PhiVault, ApiError> {
        self.vault
            .get_or_try_init(|| open_vault(&*self.store, &self.phi_keys))
            .await
            .map_err(|e| match e {
                StartupError::Store(e) => ApiError::from(e),
                other => {
                    tracing::error!(error = %other, "PHI vault cannot open");
                    ApiError::Internal
                }
            })
    }
}

/// Starts the nightly pulls' scheduler, unless configured off or the PHI vault is not open yet
/// (migrations pending: the operator migrates and restarts).
fn start_scheduler(
    settings: &Settings,
    state: &web::Data<AppState>,
) -> Option<(
    crate::sync::scheduler::SchedulerHandle,
    crate::sync::PullJobs,
)> {
    if !settings.sync.scheduler {
        return None;
    }
    let Some(vault) = state.vault.get() else {
        tracing::warn!(
            "nightly pulls not scheduled: the database is not migrated yet; migrate and restart"
        );
        return None;
    };
    let jobs = crate::sync::PullJobs::new(
        Arc::clone(&state.store),
        state.connections.clone(),
        state.audit.clone(),
        vault.clone(),
        &settings.sync,
    );
    let handle = crate::sync::scheduler::start(jobs.clone(), &settings.sync);
    Some((handle, jobs))
}

/// Evicts stale rate-limit keys once a window, for as long as the limits are alive.
fn spawn_eviction(limits: std::sync::Weak<RateLimits>, window_secs: u64) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(window_secs.max(1)));
        tick.tick().await;
        loop {
            tick.tick().await;
            match limits.upgrade() {
                Some(limits) => limits.evict_stale(),
                None => break,
            }
        }
    });
}

async fn not_found() -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::NotFound("no route at this path".into()))
}
