//! The `fhirgate` command line. Every subcommand takes `--config FILE` and honours `FHIRGATE_*`
//! variables. Commands meant for scripts print one JSON object a line on stdout; diagnostics go to
//! stderr and never contain PHI.

mod claims;
mod connections;
mod healthcheck;
mod outbox;
mod sandbox;
mod sync;
mod webhooks;

pub use claims::ClaimsCommand;
pub use connections::ConnectionsCommand;
pub use outbox::OutboxCommand;
pub use sandbox::{sandbox_spec, SandboxArgs};
pub use sync::SyncCommand;
pub use webhooks::WebhooksCommand;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::Settings;
use crate::domain::{NewPractice, Npi, PracticeName, ResourceId, TaxId, TimeZoneName};
use crate::gate::{ClientKeys, ClientStatus, NewApiClient, Role, ScopeSet};
use crate::startup::{pool_options, Application};
use crate::store;
use crate::telemetry::{get_subscriber, init_subscriber};

#[derive(Debug, Parser)]
#[command(
    name = "fhirgate",
    version,
    about = "HIPAA-audited FHIR R4 integration gateway"
)]
pub struct Cli {
    /// Configuration file (TOML) layered over config/default.toml.
    #[arg(long, global = true, env = "FHIRGATE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (migrates the database first unless migrate_on_start = false).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Manage practices (tenants).
    #[command(subcommand)]
    Practices(PracticesCommand),
    /// Manage API clients (SMART backend-services clients of the FHIR API).
    #[command(subcommand)]
    Clients(ClientsCommand),
    /// Manage EHR connections (outbound: where pulls and claim-status pushes go).
    #[command(subcommand)]
    Connections(ConnectionsCommand),
    /// Nightly pulls: run one now, show schedules, watermarks and runs.
    #[command(subcommand)]
    Sync(SyncCommand),
    /// Claim-status pushes: list the updates that could not be delivered, replay one.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// The webhook inbox: list events (dead ones included) and retry dead ones.
    #[command(subcommand)]
    Webhooks(WebhooksCommand),
    /// Claim preparation: check the code tables and payer rules.
    #[command(subcommand)]
    Claims(ClaimsCommand),
    /// Try a full pull locally: EHR simulators with synthetic patients, a connection to each,
    /// one pull through the real adapters into the configured database.
    Sandbox(SandboxArgs),
    /// Verify and export the audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Master keys: re-encrypt stored PHI under the active key.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Exit 0 when the gateway at --url answers /healthz (for container health checks).
    Healthcheck {
        #[arg(long, default_value = "http://127.0.0.1:8080/healthz")]
        url: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PracticesCommand {
    /// Create a practice; prints it as one JSON line.
    Add(AddPractice),
    /// List practices, one JSON line each.
    List,
}

#[derive(Debug, Args)]
pub struct AddPractice {
    #[arg(long)]
    pub name: String,
    /// IANA time zone of the practice (nightly jobs run in it).
    #[arg(long, default_value = "UTC")]
    pub timezone: String,
    #[arg(long)]
    pub npi: Option<String>,
    /// Employer identification number (NN-NNNNNNN).
    #[arg(long)]
    pub tax_id: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ClientsCommand {
    /// Register a client of one practice; prints it (with its `client_id`) as one JSON line.
    Add(AddClient),
    /// List clients, one JSON line each.
    List {
        #[arg(long)]
        practice: Option<String>,
    },
    /// Disable a client: its assertions are refused from now on.
    Disable {
        #[arg(long)]
        client_id: String,
    },
    /// Replace a client's public keys (JWKS file or URL).
    RotateKey {
        #[arg(long)]
        client_id: String,
        #[command(flatten)]
        keys: KeySource,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Walk every hash chain; print one JSON line per chain; exit 1 naming the first broken link.
    Verify,
    /// Write a practice's audit events as NDJSON (hashes included, for independent verification).
    /// Delete events older than the retention period (at least six years), leaving checkpoints
    /// from which `verify` continues each chain.
    Purge {
        /// Purge events recorded before this time (RFC 3339 or YYYY-MM-DD); default: now minus
        /// `audit_retention_days`. Anything less than six years ago is refused.
        #[arg(long)]
        before: Option<String>,
    },
    Export {
        #[arg(long)]
        practice: String,
        /// RFC 3339 time or YYYY-MM-DD (UTC); default: everything.
        #[arg(long)]
        since: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Re-encrypt every stored resource version not yet under the active key (the first key of
    /// the master key spec), in batches, while the gateway serves; resumable. Prints the key
    /// counts afterwards as one JSON line.
    Rotate {
        /// Rows per transaction.
        #[arg(long, default_value_t = 500)]
        batch_size: i64,
    },
    /// Print how many stored versions each key id seals, and the active key, as one JSON line.
    Status,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct KeySource {
    /// A file holding the client's public JSON Web Key Set.
    #[arg(long, value_name = "FILE")]
    pub jwks: Option<PathBuf>,
    /// An https URL serving the client's JWKS (fetched and cached; re-fetched on an unknown kid).
    #[arg(long, value_name = "URL")]
    pub jwks_url: Option<String>,
}

#[derive(Debug, Args)]
pub struct AddClient {
    #[arg(long)]
    pub practice: String,
    #[arg(long)]
    pub name: String,
    #[command(flatten)]
    pub keys: KeySource,
    /// Allowed scopes, space separated (SMART v1 or v2 `system/` scopes). Default: the role's.
    #[arg(long)]
    pub scope: Option<String>,
    /// practice_admin | clinician | billing | front_desk | external_system
    #[arg(long, default_value = "external_system")]
    pub role: String,
}

impl KeySource {
    fn parse(&self) -> Result<ClientKeys, CliError> {
        match (&self.jwks, &self.jwks_url) {
            (Some(file), _) => {
                let text = std::fs::read_to_string(file).map_err(|e| {
                    CliError::Usage(format!("cannot read {}: {}", file.display(), e.kind()))
                })?;
                ClientKeys::inline(&text).map_err(|e| CliError::Usage(e.to_string()))
            }
            (None, Some(url)) => ClientKeys::url(url).map_err(|e| CliError::Usage(e.to_string())),
            (None, None) => Err(CliError::Usage("give --jwks FILE or --jwks-url URL".into())),
        }
    }
}

/// What went wrong, and the exit code it earns: 2 for bad configuration or arguments, 1 otherwise.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Usage(_) => ExitCode::from(2),
            CliError::Failed(_) => ExitCode::from(1),
        }
    }
}

pub fn run(cli: Cli) -> ExitCode {
    match run_inner(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("fhirgate: {err}");
            err.exit_code()
        }
    }
}

fn run_inner(cli: Cli) -> Result<(), CliError> {
    if let Command::Healthcheck { url } = &cli.command {
        return healthcheck::check(url).map_err(CliError::Failed);
    }
    let settings =
        Settings::load(cli.config.as_deref()).map_err(|e| CliError::Usage(e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Failed(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(dispatch(cli.command, settings))
}

async fn dispatch(command: Command, settings: Settings) -> Result<(), CliError> {
    let failed = |e: &dyn std::fmt::Display| CliError::Failed(e.to_string());
    match command {
        Command::Serve => {
            init_subscriber(get_subscriber(
                &settings.log_level,
                settings.log_format,
                std::io::stdout,
            ));
            let env = settings.env;
            let db = settings.database_url.clone();
            let app = Application::build(settings).await.map_err(|e| failed(&e))?;
            tracing::info!(
                addr = %app.local_addr(),
                database = %db,
                env = ?env,
                "fhirgate listening"
            );
            app.run_until_stopped().await.map_err(|e| failed(&e))
        }
        Command::Migrate => {
            let store = store::connect(&settings.database_url, &pool_options(&settings))
                .await
                .map_err(|e| failed(&e))?;
            store.migrate().await.map_err(|e| failed(&e))?;
            let status = store.migration_status().await.map_err(|e| failed(&e))?;
            store.close().await;
            println!(
                "{}",
                serde_json::json!({ "migrated": true, "applied": status.applied })
            );
            Ok(())
        }
        Command::Practices(cmd) => practices(cmd, settings).await,
        Command::Clients(cmd) => clients(cmd, settings).await,
        Command::Connections(cmd) => connections::run(cmd, settings).await,
        Command::Outbox(cmd) => outbox::run(cmd, settings).await,
        Command::Webhooks(cmd) => webhooks::run(cmd, settings).await,
        Command::Claims(cmd) => claims::run(cmd, settings),
        Command::Sandbox(args) => sandbox::run(args, settings).await,
        Command::Sync(cmd) => sync::run(cmd, settings).await,
        Command::Audit(cmd) => audit(cmd, settings).await,
        Command::Keys(cmd) => keys(cmd, settings).await,
        Command::Healthcheck { .. } => unreachable!("handled before loading settings"),
    }
}

async fn practices(cmd: PracticesCommand, settings: Settings) -> Result<(), CliError> {
    let usage = |e: crate::domain::InvalidValue| CliError::Usage(e.to_string());
    let new = match &cmd {
        PracticesCommand::Add(add) => Some(NewPractice {
            name: PracticeName::parse(add.name.as_str()).map_err(usage)?,
            timezone: TimeZoneName::parse(add.timezone.as_str()).map_err(usage)?,
            npi: add
                .npi
                .as_deref()
                .map(Npi::parse)
                .transpose()
                .map_err(usage)?,
            tax_id: add
                .tax_id
                .as_deref()
                .map(TaxId::parse)
                .transpose()
                .map_err(usage)?,
        }),
        PracticesCommand::List => None,
    };
    let store = store::connect(&settings.database_url, &pool_options(&settings))
        .await
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let result = async {
        store.migrate().await?;
        match new {
            Some(new) => {
                let practice = store.create_practice(&new).await?;
                println!("{}", serde_json::to_string(&practice).unwrap_or_default());
            }
            None => {
                for practice in store.list_practices().await? {
                    println!("{}", serde_json::to_string(&practice).unwrap_or_default());
                }
            }
        }
        Ok::<_, store::StoreError>(())
    }
    .await;
    store.close().await;
    result.map_err(|e| CliError::Failed(e.to_string()))
}

fn print_json<T: serde::Serialize>(value: &T) {
    println!("{}", serde_json::to_string(value).unwrap_or_default());
}

async fn clients(cmd: ClientsCommand, settings: Settings) -> Result<(), CliError> {
    let usage = |e: crate::domain::InvalidValue| CliError::Usage(e.to_string());
    // Parse every argument before touching the database.
    enum Plan {
        Add(NewApiClient),
        List(Option<ResourceId>),
        Disable(String),
        Rotate(String, ClientKeys),
    }
    let plan = match cmd {
        ClientsCommand::Add(add) => {
            let role = Role::parse(&add.role).map_err(usage)?;
            let scope_text = add.scope.as_deref().unwrap_or(role.default_scopes());
            let scopes = ScopeSet::parse(scope_text)
                .map_err(|e| CliError::Usage(format!("--scope: {e}")))?;
            if scopes.is_empty() {
                return Err(CliError::Usage(
                    "--scope: give at least one system/ scope".into(),
                ));
            }
            let name = add.name.trim().to_owned();
            if name.is_empty() || name.len() > 200 {
                return Err(CliError::Usage("--name: must be 1-200 characters".into()));
            }
            Plan::Add(NewApiClient {
                practice_id: ResourceId::parse("practice", add.practice).map_err(usage)?,
                name,
                role,
                scopes,
                keys: add.keys.parse()?,
            })
        }
        ClientsCommand::List { practice } => Plan::List(
            practice
                .map(|p| ResourceId::parse("practice", p))
                .transpose()
                .map_err(usage)?,
        ),
        ClientsCommand::Disable { client_id } => Plan::Disable(client_id),
        ClientsCommand::RotateKey { client_id, keys } => Plan::Rotate(client_id, keys.parse()?),
    };
    let store = store::connect(&settings.database_url, &pool_options(&settings))
        .await
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let result = async {
        store.migrate().await?;
        match plan {
            Plan::Add(new) => {
                // A clear message for the common mistake, rather than a foreign-key error.
                if let Err(store::StoreError::NotFound) = store.get_practice(&new.practice_id).await
                {
                    return Err(CliError::Usage("--practice: no such practice".into()));
                }
                print_json(&store.create_client(&new).await?);
            }
            Plan::List(practice) => {
                for client in store.list_clients(practice.as_ref()).await? {
                    print_json(&client);
                }
            }
            Plan::Disable(id) => {
                print_json(&store.set_client_status(&id, ClientStatus::Disabled).await?)
            }
            Plan::Rotate(id, keys) => print_json(&store.set_client_keys(&id, &keys).await?),
        }
        Ok(())
    }
    .await;
    store.close().await;
    result
}

impl From<store::StoreError> for CliError {
    fn from(err: store::StoreError) -> Self {
        match err {
            store::StoreError::NotFound => CliError::Usage("no such client".into()),
            other => CliError::Failed(other.to_string()),
        }
    }
}

fn parse_since(value: &str) -> Result<time::OffsetDateTime, CliError> {
    use time::format_description::well_known::Rfc3339;
    if let Ok(t) = time::OffsetDateTime::parse(value, &Rfc3339) {
        return Ok(t);
    }
    let format = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(value, &format)
        .map(|d| d.midnight().assume_utc())
        .map_err(|_| CliError::Usage("--since: expected RFC 3339 time or YYYY-MM-DD".into()))
}

async fn keys(cmd: KeysCommand, settings: Settings) -> Result<(), CliError> {
    let failed = |e: &dyn std::fmt::Display| CliError::Failed(e.to_string());
    let master = crate::keys::MasterSecret::from_settings(&settings)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let store = store::connect(&settings.database_url, &pool_options(&settings))
        .await
        .map_err(|e| failed(&e))?;
    let result = async {
        let keys = crate::crypto::PhiKeys::new(master.keyring());
        let vault = crate::startup::open_vault(&*store, &keys)
            .await
            .map_err(|e| failed(&e))?;
        let resealed = match cmd {
            KeysCommand::Rotate { batch_size } => {
                let n = crate::keys::rotate_sealed(&*store, &vault, batch_size, |done| {
                    eprintln!("fhirgate: re-encrypted {done} resource versions");
                })
                .await
                .map_err(|e| failed(&e))?;
                Some(n)
            }
            KeysCommand::Status => None,
        };
        let counts = store.sealed_key_counts().await.map_err(|e| failed(&e))?;
        let by_key: serde_json::Map<String, serde_json::Value> =
            counts.into_iter().map(|(key, n)| (key, n.into())).collect();
        let mut line = serde_json::json!({
            "active_key": vault.active_key_id().as_str(),
            "versions_by_key": by_key,
        });
        if let Some(n) = resealed {
            line["reencrypted"] = n.into();
        }
        print_json(&line);
        Ok(())
    }
    .await;
    store.close().await;
    result
}

async fn audit(cmd: AuditCommand, settings: Settings) -> Result<(), CliError> {
    const PAGE: i64 = 1000;
    let export = match &cmd {
        AuditCommand::Export { practice, since } => Some((
            ResourceId::parse("practice", practice.as_str())
                .map_err(|e| CliError::Usage(e.to_string()))?,
            since
                .as_deref()
                .map(parse_since)
                .transpose()?
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
        )),
        AuditCommand::Verify | AuditCommand::Purge { .. } => None,
    };
    let purge_before = match &cmd {
        AuditCommand::Purge { before } => {
            let before = match before {
                Some(b) => parse_since(b)?,
                None => {
                    time::OffsetDateTime::now_utc()
                        - time::Duration::days(i64::from(settings.audit_retention_days))
                }
            };
            if before > store::retention_floor(time::OffsetDateTime::now_utc()) {
                return Err(CliError::Usage(
                    "--before: audit events must be kept six years (45 CFR 164.316(b)(2)); \
                     choose a time at least six years ago"
                        .into(),
                ));
            }
            Some(before)
        }
        _ => None,
    };
    let store = store::connect(&settings.database_url, &pool_options(&settings))
        .await
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let result = async {
        if let Some(before) = purge_before {
            for (chain, through) in store.purge_audit(before).await? {
                print_json(&serde_json::json!({ "chain": chain, "purged_through_seq": through }));
            }
            return Ok(());
        }
        match export {
            Some((practice, since)) => {
                use std::io::Write;
                let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                let mut after = 0;
                loop {
                    let page = store
                        .audit_export_page(&practice, since, after, PAGE)
                        .await?;
                    for record in &page {
                        let line = serde_json::to_string(record).unwrap_or_default();
                        writeln!(out, "{line}").map_err(|e| CliError::Failed(e.to_string()))?;
                    }
                    match page.last() {
                        Some(last) if page.len() as i64 == PAGE => after = last.chain_seq,
                        _ => break,
                    }
                }
                out.flush().map_err(|e| CliError::Failed(e.to_string()))?;
                Ok(())
            }
            None => {
                let mut broken = Vec::new();
                for chain in store.audit_chains().await? {
                    let (mut verifier, mut after) = match store.audit_checkpoint(&chain).await? {
                        Some((seq, hash)) => (
                            crate::audit::chain::ChainVerifier::resume(&chain, seq, hash),
                            seq,
                        ),
                        None => (crate::audit::chain::ChainVerifier::new(&chain), 0),
                    };
                    'pages: loop {
                        let page = store.audit_chain_page(&chain, after, PAGE).await?;
                        for record in &page {
                            if !verifier.feed(record) {
                                break 'pages;
                            }
                        }
                        match page.last() {
                            Some(last) if page.len() as i64 == PAGE => after = last.chain_seq,
                            _ => break,
                        }
                    }
                    let report = verifier.finish();
                    print_json(&report);
                    if let Some(link) = &report.first_broken {
                        broken.push(format!(
                            "chain {} broken at event {} (seq {}): {}",
                            report.chain, link.id, link.chain_seq, link.reason
                        ));
                    }
                }
                if broken.is_empty() {
                    Ok(())
                } else {
                    Err(CliError::Failed(broken.join("; ")))
                }
            }
        }
    }
    .await;
    store.close().await;
    result
}
