//! An EHR simulator for fhirgate's adapter tests and `fhirgate sandbox`: one actix-web server
//! with four personalities (Epic, Cerner, generic SMART R4, athenahealth) speaking the contract in
//! `adapters/sim/SPEC.md`, seeded with synthetic patients ([`synthetic`]), with fault knobs and
//! counters ([`Controls`]). It binds 127.0.0.1 only and runs on the caller's tokio runtime. It
//! holds no real PHI and logs nothing.

mod bulk;
mod error;
mod fhir;
pub mod keys;
pub mod personality;
mod state;
pub mod synthetic;
mod token;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, HttpServer};
use serde_json::Value;

pub use keys::{KeyPair, SigningAlg};
use state::{lock, now_ms, read, write, Settings, Shared};
pub use state::{ClaimUpdate, Counters, Malformed};

/// Which vendor the simulator behaves like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Personality {
    Epic,
    Cerner,
    Generic,
    /// athenahealth's FHIR R4 API (see [`personality`] for what differs).
    Athena,
}

/// How the client authenticates at the token endpoint.
#[derive(Clone)]
pub enum SimCredential {
    /// `private_key_jwt`: the client's public key (SPKI PEM, RSA for RS384 or P-384 for ES384).
    PublicKeyPem(String),
    /// HTTP Basic `client_id:secret`.
    ClientSecret(String),
}

impl std::fmt::Debug for SimCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SimCredential::PublicKeyPem(_) => f.write_str("PublicKeyPem(..)"),
            SimCredential::ClientSecret(_) => f.write_str("ClientSecret([redacted])"),
        }
    }
}

/// What a simulator starts with; [`SimConfig::new`] gives the defaults of SPEC.md.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub personality: Personality,
    pub patients: usize,
    pub seed: u64,
    pub client_id: String,
    pub credential: SimCredential,
    /// The key pair [`SimConfig::new`] generated for a `PublicKeyPem` credential, so the caller
    /// can sign assertions (`None` when the caller supplies its own key or a secret).
    pub client_key: Option<KeyPair>,
    pub token_ttl: Duration,
    /// Search page size when the client gives no `_count`.
    pub page_size: usize,
    /// Status polls answered 202 before the manifest.
    pub export_polls: u32,
    /// Resources per NDJSON file at most.
    pub file_lines: usize,
    pub port: Option<u16>,
}

impl SimConfig {
    /// Defaults: 100 patients, seed 42, page size 50, one 202 poll, 1000 lines a file; token
    /// lifetime 3600 s (Epic), 570 s (Cerner), 300 s (generic); Cerner gets a client secret,
    /// Epic and generic a fresh ES384 key pair (in `client_key`).
    pub fn new(personality: Personality) -> Self {
        let traits = personality.traits();
        let (client_id, ttl) = (traits.client_id, traits.token_ttl_s);
        let (credential, client_key) = match traits.client_secret {
            true => (
                SimCredential::ClientSecret(format!(
                    "sim-secret-{}",
                    uuid::Uuid::new_v4().simple()
                )),
                None,
            ),
            false => match keys::generate(SigningAlg::ES384) {
                Ok(k) => (SimCredential::PublicKeyPem(k.public_pem.clone()), Some(k)),
                // Key generation failing leaves a credential no assertion can match.
                Err(_) => (SimCredential::PublicKeyPem(String::new()), None),
            },
        };
        Self {
            personality,
            patients: 100,
            seed: 42,
            client_id: client_id.into(),
            credential,
            client_key,
            token_ttl: Duration::from_secs(ttl),
            page_size: 50,
            export_polls: 1,
            file_lines: 1000,
            port: None,
        }
    }

    /// Uses `key` (its public half) as the client's credential.
    pub fn with_key(mut self, key: KeyPair) -> Self {
        self.credential = SimCredential::PublicKeyPem(key.public_pem.clone());
        self.client_key = Some(key);
        self
    }
}

/// A running simulator. Dropping it stops the server.
pub struct Simulator {
    shared: Arc<Shared>,
    handle: ServerHandle,
    client_key: Option<KeyPair>,
}

impl Simulator {
    /// Generates the patients, binds 127.0.0.1 (`port` or a free one) and serves on the current
    /// tokio runtime (an error when there is none).
    pub fn start(config: SimConfig) -> std::io::Result<Simulator> {
        let rt = tokio::runtime::Handle::try_current().map_err(std::io::Error::other)?;
        let listener = TcpListener::bind(("127.0.0.1", config.port.unwrap_or(0)))?;
        let origin = format!("http://127.0.0.1:{}", listener.local_addr()?.port());
        let mut seeded = fastrand::Rng::with_seed(config.seed);
        let traits = config.personality.traits();
        let drawn = uuid::Builder::from_random_bytes(seeded.u128(..).to_le_bytes())
            .into_uuid()
            .to_string();
        let tenant = traits.tenant.map(str::to_owned).unwrap_or(drawn);
        let base_path = traits.base_path.replace("{tenant}", &tenant);
        let token_path = traits.token_path.replace("{tenant}", &tenant);
        let settings = Settings {
            personality: config.personality,
            client_id: config.client_id,
            credential: config.credential,
            token_ttl: config.token_ttl,
            page_size: config.page_size.max(1),
            export_polls: config.export_polls,
            file_lines: config.file_lines.max(1),
            group_id: format!("sim-group-{}", seeded.u32(..)),
            tenant,
            origin,
            base_path,
            token_path,
        };
        let shared =
            Shared::new(settings, config.patients, config.seed).map_err(std::io::Error::other)?;
        let data = web::Data::from(Arc::clone(&shared));
        let server = HttpServer::new(move || {
            let base = data.settings.base_path.clone();
            let token_path = data.settings.token_path.clone();
            App::new()
                .app_data(data.clone())
                .app_data(web::FormConfig::default().error_handler(|_, _| {
                    error::OAuthError::new("invalid_request", "the body must be form-encoded")
                        .into()
                }))
                .app_data(web::QueryConfig::default().error_handler(|_, _| {
                    error::SimError::bad("invalid", "the query string cannot be parsed").into()
                }))
                .wrap(from_fn(add_latency))
                .route(&token_path, web::post().to(token::token))
                .route("/bulkstatus/{job}", web::get().to(bulk::status))
                .route("/bulkstatus/{job}", web::delete().to(bulk::cancel))
                .route("/bulkfiles/{job}/{file}", web::get().to(bulk::file))
                .service(
                    web::scope(&base)
                        .route("", web::get().to(fhir::get_pages))
                        .route("/metadata", web::get().to(fhir::metadata))
                        .route(
                            "/.well-known/smart-configuration",
                            web::get().to(fhir::smart_configuration),
                        )
                        .route("/Patient", web::get().to(fhir::search_patients))
                        .route("/Patient/{id}", web::get().to(fhir::read_patient))
                        .route("/Coverage", web::get().to(fhir::search_coverage))
                        .route(
                            "/ClaimResponse",
                            web::post().to(fhir::create_claim_response),
                        )
                        .route(
                            "/ClaimResponse/{id}",
                            web::get().to(fhir::read_claim_response),
                        )
                        .route("/Group/{id}/$export", web::get().to(bulk::group_export))
                        .route("/$export", web::get().to(bulk::system_export)),
                )
                .default_service(web::to(fhir::not_found))
        })
        .workers(2)
        .disable_signals()
        .shutdown_timeout(1)
        .listen(listener)?
        .run();
        let handle = server.handle();
        rt.spawn(server);
        Ok(Simulator {
            shared,
            handle,
            client_key: config.client_key,
        })
    }

    pub fn personality(&self) -> Personality {
        self.shared.settings.personality
    }
    /// `http://127.0.0.1:{port}`.
    pub fn origin(&self) -> &str {
        &self.shared.settings.origin
    }
    pub fn fhir_base_url(&self) -> String {
        self.shared.settings.base_url()
    }
    pub fn token_url(&self) -> String {
        self.shared.settings.token_url()
    }
    pub fn group_id(&self) -> &str {
        &self.shared.settings.group_id
    }
    /// The tenant id in Cerner's URLs (also picked, unused, for the others).
    pub fn tenant(&self) -> &str {
        &self.shared.settings.tenant
    }

    /// The vendor settings a connection to this simulator carries: `group_id` (the Group its
    /// Bulk export pulls), and `tenant` where the personality's URLs or searches name one
    /// (Cerner's base URL segment, athenahealth's practice id).
    pub fn vendor_settings(&self) -> serde_json::Map<String, Value> {
        let mut settings = serde_json::Map::new();
        settings.insert("group_id".into(), Value::from(self.group_id()));
        let traits = self.personality().traits();
        if traits.base_path.contains("{tenant}") || traits.required_param.is_some() {
            settings.insert("tenant".into(), Value::from(self.tenant()));
        }
        settings
    }
    pub fn client_id(&self) -> &str {
        &self.shared.settings.client_id
    }
    /// The key pair generated by [`SimConfig::new`] (or given with [`SimConfig::with_key`]).
    pub fn client_key(&self) -> Option<&KeyPair> {
        self.client_key.as_ref()
    }
    /// The client secret, for a `ClientSecret` credential.
    pub fn client_secret(&self) -> Option<&str> {
        match &self.shared.settings.credential {
            SimCredential::ClientSecret(s) => Some(s),
            SimCredential::PublicKeyPem(_) => None,
        }
    }
    pub fn controls(&self) -> Controls {
        Controls(Arc::clone(&self.shared))
    }

    /// Patient ids in `meta.lastUpdated` order (then id).
    pub fn patient_ids(&self) -> Vec<String> {
        read(&self.shared.patients)
            .sorted
            .iter()
            .map(|r| r.id.clone())
            .collect()
    }
    pub fn patient(&self, id: &str) -> Option<Value> {
        read(&self.shared.patients)
            .get(id)
            .map(|r| r.resource.clone())
    }
    pub fn coverages(&self, patient_id: &str) -> Vec<Value> {
        read(&self.shared.patients)
            .get(patient_id)
            .map(|r| r.coverages.clone())
            .unwrap_or_default()
    }
    /// Patients whose `meta.lastUpdated` is strictly after `instant`, in lastUpdated order.
    pub fn patients_changed_after(&self, instant: time::OffsetDateTime) -> Vec<Value> {
        let ms = (instant.unix_timestamp_nanos() / 1_000_000) as i64;
        let store = read(&self.shared.patients);
        let start = store.start_at_instant(ms, false);
        store.sorted[start..]
            .iter()
            .map(|r| r.resource.clone())
            .collect()
    }
    /// The updates applied to `claim_id`, in the order they were applied.
    pub fn claim_updates(&self, claim_id: &str) -> Vec<ClaimUpdate> {
        lock(&self.shared.claims)
            .by_claim
            .get(claim_id)
            .cloned()
            .unwrap_or_default()
    }

    /// Stops the server, letting in-flight requests finish (at most a second).
    pub async fn stop(self) {
        self.handle.stop(true).await;
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let handle = self.handle.clone();
            rt.spawn(async move { handle.stop(false).await });
        }
    }
}

async fn add_latency(
    req: actix_web::dev::ServiceRequest,
    next: Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>, actix_web::Error> {
    let latency = req
        .app_data::<web::Data<Shared>>()
        .map(|sh| lock(&sh.faults).latency)
        .unwrap_or_default();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    next.call(req).await
}

/// The fault knobs and counters of a running simulator (SPEC.md "Fault knobs"). Knobs apply to
/// FHIR calls (base, bulk status and files), not to the token endpoint, except latency.
#[derive(Clone)]
pub struct Controls(Arc<Shared>);

impl Controls {
    /// Fails the next `n` FHIR calls with `status`, with `Retry-After: s` when given.
    pub fn fail_next(&self, n: u32, status: u16, retry_after: Option<u64>) {
        let mut f = lock(&self.0.faults);
        f.fail_next = n;
        f.fail_status = status;
        f.fail_retry_after = retry_after;
    }
    /// Each FHIR call fails with 500 with this probability (seeded, so runs repeat).
    pub fn set_failure_rate(&self, rate: f64) {
        lock(&self.0.faults).failure_rate = rate.clamp(0.0, 1.0);
    }
    /// The next `n` FHIR calls answer 429 with `Retry-After: retry_after_secs`.
    pub fn throttle_next(&self, n: u32, retry_after_secs: u64) {
        let mut f = lock(&self.0.faults);
        f.throttle_next = n;
        f.throttle_retry_after = retry_after_secs;
    }
    /// Every token issued so far stops working now.
    pub fn expire_tokens(&self) {
        lock(&self.0.tokens).clear();
    }
    /// Added before every response (token endpoint included).
    pub fn set_latency(&self, latency: Duration) {
        lock(&self.0.faults).latency = latency;
    }
    /// The next `n` search responses and Patient reads are malformed in the given way.
    pub fn malformed_next(&self, n: u32, kind: Malformed) {
        let mut f = lock(&self.0.faults);
        f.malformed_next = n;
        f.malformed_kind = kind;
    }
    /// Gives `k` patients a new `meta.lastUpdated` (now, strictly after every other) and a new
    /// phone number, as an EHR edit would; returns their ids.
    pub fn touch(&self, k: usize) -> Vec<String> {
        let mut rng = lock(&self.0.touch_rng);
        write(&self.0.patients).touch(k, &mut rng)
    }
    /// Edits one patient as an EHR user would (the edit gets a new version and
    /// `meta.lastUpdated`, after every other); `false` when there is no such patient.
    pub fn edit_patient(&self, id: &str, edit: impl FnOnce(&mut Value)) -> bool {
        write(&self.0.patients).edit(id, edit)
    }
    pub fn counters(&self) -> Counters {
        self.0.counters.snapshot()
    }
    /// The simulator's clock now, as ms since the epoch (for `_since` arithmetic in tests).
    pub fn now_ms(&self) -> i64 {
        now_ms()
    }
}
