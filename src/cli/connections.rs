//! `fhirgate connections`: add and list EHR connections. Secrets are read from files or the
//! arguments, sealed before they are stored, and never printed.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use fhirgate_adapters::Credential;
use serde_json::{Map, Value};

use super::{print_json, CliError};
use crate::config::Settings;
use crate::domain::ResourceId;
use crate::startup::{load_profiles, pool_options};
use crate::store;
use crate::sync::{ConnectionError, ConnectionSpec, Connections};

#[derive(Debug, Subcommand)]
pub enum ConnectionsCommand {
    /// Add a connection to an EHR; prints it (with its `id`, without secrets) as one JSON line.
    Add(Box<AddConnection>),
    /// List connections, one JSON line each.
    List {
        #[arg(long)]
        practice: Option<String>,
    },
}

#[derive(Debug, Args)]
#[group(id = "credential", required = true, multiple = false)]
pub struct CredentialSource {
    /// PEM private key (RSA for RS384, P-384 EC for ES384) for SMART backend services.
    #[arg(long, value_name = "PEM_FILE")]
    pub private_key: Option<PathBuf>,
    /// Client secret (client_credentials with HTTP Basic, as Cerner system accounts).
    #[arg(long, value_name = "SECRET", env = "FHIRGATE_CONNECTION_CLIENT_SECRET")]
    pub client_secret: Option<String>,
}

#[derive(Debug, Args)]
pub struct AddConnection {
    #[arg(long)]
    pub practice: String,
    /// The adapter: epic, cerner, generic (or any vendor the adapter registry knows).
    #[arg(long)]
    pub vendor: String,
    /// The EHR's FHIR R4 base URL (https; http only to localhost).
    #[arg(long)]
    pub base_url: String,
    #[arg(long)]
    pub client_id: String,
    #[command(flatten)]
    pub credential: CredentialSource,
    /// The `kid` of the private key's public half in the JWKS registered at the EHR.
    #[arg(long)]
    pub key_id: Option<String>,
    /// Token endpoint; discovered from the base URL's .well-known/smart-configuration if absent.
    #[arg(long)]
    pub token_url: Option<String>,
    /// Scopes to request (space separated); the vendor's default if absent.
    #[arg(long)]
    pub scope: Option<String>,
    /// Vendor setting KEY=VALUE (e.g. group_id=... for Epic, tenant=... for Cerner); repeat.
    /// A VALUE that parses as JSON is taken as JSON.
    #[arg(long = "setting", value_name = "KEY=VALUE")]
    pub settings: Vec<String>,
    /// Pull schedule, cron with seconds: default "0 0 2 * * *" (02:00 in the practice's zone).
    #[arg(long)]
    pub schedule: Option<String>,
    /// Secret that signs this EHR's webhooks (at least 16 characters).
    #[arg(long, env = "FHIRGATE_CONNECTION_WEBHOOK_SECRET")]
    pub webhook_secret: Option<String>,
}

fn usage(err: impl std::fmt::Display) -> CliError {
    CliError::Usage(err.to_string())
}

fn settings_of(pairs: &[String]) -> Result<Map<String, Value>, CliError> {
    let mut map = Map::new();
    for pair in pairs {
        let (key, value) = pair
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty())
            .ok_or_else(|| usage("--setting: expected KEY=VALUE"))?;
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::from(value));
        map.insert(key.trim().to_owned(), value);
    }
    Ok(map)
}

pub async fn run(cmd: ConnectionsCommand, settings: Settings) -> Result<(), CliError> {
    // Parse every argument and read every file before touching the database.
    let spec = match &cmd {
        ConnectionsCommand::Add(add) => {
            let credential = match (&add.credential.private_key, &add.credential.client_secret) {
                (Some(file), _) => Credential::PrivateKey {
                    pem: std::fs::read_to_string(file).map_err(|e| {
                        usage(format!(
                            "--private-key: cannot read {}: {}",
                            file.display(),
                            e.kind()
                        ))
                    })?,
                    kid: add.key_id.clone(),
                },
                (None, Some(secret)) => Credential::ClientSecret(secret.clone()),
                (None, None) => {
                    return Err(usage("give --private-key PEM_FILE or --client-secret"))
                }
            };
            Some(ConnectionSpec {
                practice_id: ResourceId::parse("practice", add.practice.as_str()).map_err(usage)?,
                vendor: add.vendor.trim().to_owned(),
                base_url: add.base_url.clone(),
                client_id: add.client_id.clone(),
                token_url: add.token_url.clone(),
                credential,
                scopes: add.scope.clone(),
                settings: settings_of(&add.settings)?,
                schedule: add.schedule.clone(),
                webhook_secret: add.webhook_secret.clone(),
            })
        }
        ConnectionsCommand::List { .. } => None,
    };
    let practice = match &cmd {
        ConnectionsCommand::List {
            practice: Some(p), ..
        } => Some(ResourceId::parse("practice", p.as_str()).map_err(usage)?),
        _ => None,
    };
    let master = crate::keys::MasterSecret::from_settings(&settings).map_err(usage)?;
    let profiles = std::sync::Arc::new(load_profiles(&settings).map_err(usage)?);
    let store = store::connect(&settings.database_url, &pool_options(&settings))
        .await
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let result = async {
        store
            .migrate()
            .await
            .map_err(|e| CliError::Failed(e.to_string()))?;
        let connections = Connections::new(store.clone(), master.keyring(), profiles);
        let cli_error = |e: ConnectionError| match e {
            ConnectionError::Invalid { key, problem } => usage(format!("--{key}: {problem}")),
            ConnectionError::UnknownPractice => usage("--practice: no such practice"),
            other => CliError::Failed(other.to_string()),
        };
        match spec {
            Some(spec) => print_json(&connections.add(spec).await.map_err(cli_error)?),
            None => {
                for c in connections
                    .list(practice.as_ref())
                    .await
                    .map_err(cli_error)?
                {
                    print_json(&c);
                }
            }
        }
        Ok(())
    }
    .await;
    store.close().await;
    result
}
