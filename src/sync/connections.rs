//! EHR connections: added by the operator (`fhirgate connections add`), stored with their
//! credential and webhook secret sealed under the master key, and opened into the
//! [`fhirgate_adapters::Connection`] the adapter registry builds an adapter from.
//!
//! Which vendors exist is the registry's business (`adapters/src/registry.rs`), not this
//! module's nor the database's: a connection's vendor is checked against the registry, and its
//! settings by building its adapter once before it is stored, so a connection that is accepted
//! can be pulled from. Secrets never leave here in clear except into the adapter, and no error
//! or listing shows one.

use std::sync::Arc;

use fhirgate_adapters::{
    AdapterContext, Connection, Credential, EhrAdapter, Registry, RegistryError,
};
use fhirgate_mappings::Profiles;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use zeroize::Zeroizing;

use crate::crypto::{field_aad, FieldCipher, Keyring};
use crate::domain::ResourceId;
use crate::store::{NewConnection, Store, StoreError, StoredConnection};

/// The default pull schedule (seconds minutes hours day-of-month month day-of-week): 02:00 in
/// the practice's time zone.
pub const DEFAULT_SCHEDULE: &str = "0 0 2 * * *";

const CREDENTIAL_COLUMN: &str = "ehr_connections.credential";
const WEBHOOK_COLUMN: &str = "ehr_connections.webhook_secret";

/// What an operator gives to add a connection.
#[derive(Clone)]
pub struct ConnectionSpec {
    pub practice_id: ResourceId,
    pub vendor: String,
    pub base_url: String,
    pub client_id: String,
    pub token_url: Option<String>,
    pub credential: Credential,
    pub scopes: Option<String>,
    pub settings: Map<String, Value>,
    pub schedule: Option<String>,
    pub webhook_secret: Option<String>,
}

/// A connection as shown to operators: everything but its secrets.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionInfo {
    pub id: String,
    pub practice_id: String,
    pub vendor: String,
    pub base_url: String,
    pub client_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_url: Option<String>,
    /// `private_key_jwt` or `client_secret`.
    pub auth: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scopes: Option<String>,
    pub settings: Map<String, Value>,
    pub schedule: String,
    /// Whether webhooks from this EHR can be authenticated (a secret is set).
    pub webhook: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watermark: Option<String>,
    pub status: &'static str,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: time::OffsetDateTime,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// A setting the operator gave is wrong: the key and why (never a secret's value).
    #[error("{key}: {problem}")]
    Invalid { key: String, problem: String },
    #[error("no such practice")]
    UnknownPractice,
    #[error("no such connection")]
    NotFound,
    #[error("connection {0}: its credential cannot be opened with the configured master keys")]
    Sealed(String),
    #[error("storage: {0}")]
    Store(StoreError),
}

impl From<StoreError> for ConnectionError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound => ConnectionError::NotFound,
            other => ConnectionError::Store(other),
        }
    }
}

impl From<RegistryError> for ConnectionError {
    fn from(err: RegistryError) -> Self {
        match err {
            RegistryError::Setting { key, problem, .. } => ConnectionError::Invalid {
                key: format!("setting {key}"),
                problem,
            },
            RegistryError::UnknownVendor { vendor, known, .. } => ConnectionError::Invalid {
                key: "vendor".into(),
                problem: format!("no adapter for `{vendor}` (known: {known})"),
            },
            RegistryError::NoProfile { vendor, .. } => ConnectionError::Invalid {
                key: "vendor".into(),
                problem: format!("no mapping profile for `{vendor}`"),
            },
        }
    }
}

/// The sealed form of a credential (JSON inside an AES-256-GCM envelope).
#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum SealedCredential {
    PrivateKeyJwt { pem: String, kid: Option<String> },
    ClientSecret { secret: String },
}

/// The gateway's EHR connections.
#[derive(Clone)]
pub struct Connections {
    store: Arc<dyn Store>,
    cipher: FieldCipher,
    registry: Registry,
    profiles: Arc<Profiles>,
    /// Adapters built so far, by connection id: an adapter keeps its tokens, rate limiter and
    /// circuit breaker, so every worker of this instance shares one per connection.
    adapters: Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<dyn EhrAdapter>>>>,
    /// Stored connections read for [`Self::stored`], each kept for [`ROW_TTL`].
    rows: moka::future::Cache<String, StoredConnection>,
}

/// How long [`Connections::stored`] answers from memory: every push, webhook batch and claim
/// status change needs its connection's row, which changes only by an operator's hand (the
/// watermark aside, which the nightly pull reads afresh), so a change is seen within this.
pub const ROW_TTL: std::time::Duration = std::time::Duration::from_secs(10);

/// A connection ready to be called: its stored row, its adapter (audited into the connection's
/// practice's chain) and its vendor's mapping profile.
#[derive(Clone)]
pub struct OpenedConnection {
    pub stored: StoredConnection,
    pub adapter: Arc<dyn EhrAdapter>,
    profiles: Arc<Profiles>,
}

impl OpenedConnection {
    /// The vendor's mapping profile (present: [`Connections::adapter`] checked it).
    pub fn profile(&self) -> &fhirgate_mappings::Profile {
        self.profiles
            .get(&self.stored.vendor)
            .expect("checked when the connection was opened")
    }
}

impl Connections {
    /// With the registry of built-in vendors.
    pub fn new(store: Arc<dyn Store>, keyring: &Keyring, profiles: Arc<Profiles>) -> Self {
        Self {
            store,
            cipher: FieldCipher::new(keyring),
            registry: Registry::built_in(),
            profiles,
            adapters: Arc::default(),
            rows: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(ROW_TTL)
                .build(),
        }
    }

    /// The stored connection `id`, read from the store at most once per [`ROW_TTL`] (an unknown
    /// one is not remembered, so it is found as soon as it is added).
    pub async fn stored(&self, id: &str) -> Result<StoredConnection, StoreError> {
        if let Some(row) = self.rows.get(id).await {
            return Ok(row);
        }
        let row = self.store.connections().get_connection(id).await?;
        self.rows.insert(id.to_owned(), row.clone()).await;
        Ok(row)
    }

    /// The connection `id` with its adapter, built on first use and shared afterwards. Outbound
    /// calls are audited through `log` into the connection's practice's chain.
    pub async fn adapter(
        &self,
        id: &str,
        log: &crate::audit::AuditLog,
    ) -> Result<OpenedConnection, ConnectionError> {
        let stored = self.stored(id).await?;
        if self.profiles.get(&stored.vendor).is_none() {
            return Err(ConnectionError::Invalid {
                key: "vendor".into(),
                problem: format!("no mapping profile for `{}`", stored.vendor),
            });
        }
        let cached = self
            .adapters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id)
            .cloned();
        let adapter = match cached {
            Some(adapter) => adapter,
            None => {
                let (_, connection) = self.open(id).await?;
                let context = AdapterContext {
                    audit: Arc::new(super::AuditedCalls::new(
                        log.clone(),
                        stored.practice_id.clone(),
                    )),
                };
                let adapter = self.build(&connection, &context)?;
                self.adapters
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .entry(id.to_owned())
                    .or_insert(adapter)
                    .clone()
            }
        };
        Ok(OpenedConnection {
            stored,
            adapter,
            profiles: Arc::clone(&self.profiles),
        })
    }

    /// Replaces the vendor registry (tests, or a build with extra vendors).
    pub fn with_registry(mut self, registry: Registry) -> Self {
        self.registry = registry;
        self
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The mapping profile of a vendor.
    pub fn profile(&self, vendor: &str) -> Option<&fhirgate_mappings::Profile> {
        self.profiles.get(vendor)
    }

    /// Checks and stores a new connection.
    pub async fn add(&self, spec: ConnectionSpec) -> Result<ConnectionInfo, ConnectionError> {
        match self.store.get_practice(&spec.practice_id).await {
            Err(StoreError::NotFound) => return Err(ConnectionError::UnknownPractice),
            other => {
                other?;
            }
        }
        let base_url = endpoint("base-url", &spec.base_url)?;
        let token_url = spec
            .token_url
            .as_deref()
            .map(|u| endpoint("token-url", u))
            .transpose()?;
        let client_id = spec.client_id.trim();
        if client_id.is_empty() || client_id.len() > 255 {
            return Err(invalid("client-id", "expected 1 to 255 characters"));
        }
        check_credential(&spec.credential)?;
        let schedule = match spec.schedule.as_deref() {
            Some(s) => check_schedule(s)?,
            None => DEFAULT_SCHEDULE.to_owned(),
        };
        if let Some(secret) = &spec.webhook_secret {
            if secret.len() < 16 {
                return Err(invalid("webhook-secret", "expected at least 16 characters"));
            }
        }
        let id = uuid::Uuid::new_v4().to_string();
        let connection = Connection {
            id: id.clone(),
            vendor: spec.vendor.clone(),
            fhir_base_url: base_url.clone(),
            client_id: client_id.to_owned(),
            token_url: token_url.clone(),
            credential: spec.credential.clone(),
            scopes: spec.scopes.clone(),
            settings: spec.settings.clone(),
        };
        // The adapter's own checks of its settings, before anything is stored.
        self.build(&connection, &AdapterContext::default())?;
        let sealed = match &spec.credential {
            Credential::PrivateKey { pem, kid } => SealedCredential::PrivateKeyJwt {
                pem: pem.clone(),
                kid: kid.clone(),
            },
            Credential::ClientSecret(secret) => SealedCredential::ClientSecret {
                secret: secret.clone(),
            },
        };
        let plain = Zeroizing::new(serde_json::to_vec(&sealed).unwrap_or_default());
        let new = NewConnection {
            credential: self
                .cipher
                .encrypt(&plain, field_aad(CREDENTIAL_COLUMN, &id).as_bytes()),
            webhook_secret: spec
                .webhook_secret
                .as_deref()
                .map(|s| self.cipher.encrypt_str(s, &field_aad(WEBHOOK_COLUMN, &id))),
            id,
            practice_id: spec.practice_id,
            vendor: spec.vendor,
            base_url,
            client_id: client_id.to_owned(),
            token_url,
            scopes: spec.scopes,
            settings: Value::Object(spec.settings).to_string(),
            schedule,
        };
        let stored = self.store.connections().create_connection(&new).await?;
        self.info(&stored)
    }

    pub async fn get(&self, id: &str) -> Result<ConnectionInfo, ConnectionError> {
        let stored = self.store.connections().get_connection(id).await?;
        self.info(&stored)
    }

    pub async fn list(
        &self,
        practice: Option<&ResourceId>,
    ) -> Result<Vec<ConnectionInfo>, ConnectionError> {
        self.store
            .connections()
            .list_connections(practice)
            .await?
            .iter()
            .map(|c| self.info(c))
            .collect()
    }

    /// The stored connection and its settings with the credential in clear, for its adapter.
    pub async fn open(&self, id: &str) -> Result<(StoredConnection, Connection), ConnectionError> {
        let stored = self.store.connections().get_connection(id).await?;
        let credential = match self.unseal(&stored)? {
            SealedCredential::PrivateKeyJwt { pem, kid } => Credential::PrivateKey { pem, kid },
            SealedCredential::ClientSecret { secret } => Credential::ClientSecret(secret),
        };
        let settings = settings_of(&stored);
        let connection = Connection {
            id: stored.id.clone(),
            vendor: stored.vendor.clone(),
            fhir_base_url: stored.base_url.clone(),
            client_id: stored.client_id.clone(),
            token_url: stored.token_url.clone(),
            credential,
            scopes: stored.scopes.clone(),
            settings,
        };
        Ok((stored, connection))
    }

    /// The webhook secret of a connection, when it has one.
    pub fn webhook_secret(
        &self,
        stored: &StoredConnection,
    ) -> Result<Option<Zeroizing<String>>, ConnectionError> {
        let Some(envelope) = &stored.webhook_secret else {
            return Ok(None);
        };
        self.cipher
            .decrypt_str(envelope, &field_aad(WEBHOOK_COLUMN, &stored.id))
            .map(Some)
            .map_err(|_| ConnectionError::Sealed(stored.id.clone()))
    }

    /// The adapter of an opened connection, with its vendor's mapping profile.
    pub fn build(
        &self,
        connection: &Connection,
        context: &AdapterContext,
    ) -> Result<Arc<dyn EhrAdapter>, ConnectionError> {
        Ok(self.registry.build(connection, &self.profiles, context)?)
    }

    fn unseal(&self, stored: &StoredConnection) -> Result<SealedCredential, ConnectionError> {
        let sealed = || ConnectionError::Sealed(stored.id.clone());
        let envelope = stored.credential.as_deref().ok_or_else(sealed)?;
        let plain = self
            .cipher
            .decrypt(
                envelope,
                field_aad(CREDENTIAL_COLUMN, &stored.id).as_bytes(),
            )
            .map_err(|_| sealed())?;
        serde_json::from_slice(&plain).map_err(|_| sealed())
    }

    fn info(&self, stored: &StoredConnection) -> Result<ConnectionInfo, ConnectionError> {
        let (auth, key_id) = match self.unseal(stored)? {
            SealedCredential::PrivateKeyJwt { kid, .. } => ("private_key_jwt", kid),
            SealedCredential::ClientSecret { .. } => ("client_secret", None),
        };
        Ok(ConnectionInfo {
            id: stored.id.clone(),
            practice_id: stored.practice_id.to_string(),
            vendor: stored.vendor.clone(),
            base_url: stored.base_url.clone(),
            client_id: stored.client_id.clone(),
            token_url: stored.token_url.clone(),
            auth,
            key_id,
            scopes: stored.scopes.clone(),
            settings: settings_of(stored),
            schedule: stored.schedule.clone(),
            webhook: stored.webhook_secret.is_some(),
            watermark: stored.watermark.clone(),
            status: if stored.active { "active" } else { "disabled" },
            created_at: stored.created_at,
        })
    }
}

fn settings_of(stored: &StoredConnection) -> Map<String, Value> {
    match serde_json::from_str(&stored.settings) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    }
}

fn invalid(key: &str, problem: &str) -> ConnectionError {
    ConnectionError::Invalid {
        key: key.to_owned(),
        problem: problem.to_owned(),
    }
}

/// An EHR endpoint: `https`, or `http` to this machine only (a local simulator), with no query,
/// fragment or credentials; returned without a trailing slash.
fn endpoint(key: &str, value: &str) -> Result<String, ConnectionError> {
    let url = reqwest::Url::parse(value.trim())
        .map_err(|_| invalid(key, "expected an absolute http(s) URL"))?;
    let loopback = matches!(url.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        "http" => return Err(invalid(key, "expected https (http only to localhost)")),
        _ => return Err(invalid(key, "expected an absolute http(s) URL")),
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(key, "must not carry a query or a fragment"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(key, "must not carry credentials"));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

fn check_credential(credential: &Credential) -> Result<(), ConnectionError> {
    match credential {
        Credential::PrivateKey { pem, .. } => {
            let rsa = jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()).is_ok();
            let ec = jsonwebtoken::EncodingKey::from_ec_pem(pem.as_bytes()).is_ok();
            if !(rsa || ec) {
                return Err(invalid(
                    "private-key",
                    "expected a PEM RSA (RS384) or P-384 EC (ES384) private key",
                ));
            }
        }
        Credential::ClientSecret(secret) => {
            if secret.is_empty() {
                return Err(invalid("client-secret", "must not be empty"));
            }
        }
    }
    Ok(())
}

/// A cron expression of 6 fields (seconds first, as tokio-cron-scheduler reads it) or 5 (then
/// seconds are 0), checked as the scheduler reads it.
fn check_schedule(value: &str) -> Result<String, ConnectionError> {
    let fields: Vec<&str> = value.split_whitespace().collect();
    let allowed = |f: &str| {
        f.chars()
            .all(|c| c.is_ascii_alphanumeric() || "*/,-?#".contains(c))
    };
    let schedule = match fields.len() {
        5 if fields.iter().all(|f| allowed(f)) => format!("0 {}", fields.join(" ")),
        6 if fields.iter().all(|f| allowed(f)) => fields.join(" "),
        _ => return Err(invalid(
            "schedule",
            "expected a cron expression: [seconds] minutes hours day-of-month month day-of-week",
        )),
    };
    // What the scheduler will read: a field out of range is refused now, not at 02:00.
    super::scheduler::parse_schedule(&schedule)
        .map_err(|_| invalid("schedule", "a field is out of range or not understood"))?;
    Ok(schedule)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_must_be_https_or_local() {
        assert_eq!(
            endpoint("base-url", "https://ehr.example/fhir/r4/").unwrap(),
            "https://ehr.example/fhir/r4"
        );
        assert!(endpoint("base-url", "http://127.0.0.1:9000/fhir").is_ok());
        for bad in [
            "http://ehr.example/fhir",
            "ftp://ehr.example",
            "https://ehr.example/fhir?x=1",
            "https://user:pw@ehr.example/fhir",
            "ehr.example/fhir",
        ] {
            let err = endpoint("base-url", bad).unwrap_err().to_string();
            assert!(err.starts_with("base-url: "), "{bad}: {err}");
        }
    }

    #[test]
    fn schedules_take_five_or_six_cron_fields() {
        assert_eq!(check_schedule("0 2 * * *").unwrap(), "0 0 2 * * *");
        assert_eq!(
            check_schedule("0 30 1 * * Mon-Fri").unwrap(),
            "0 30 1 * * Mon-Fri"
        );
        assert!(check_schedule("every night").is_err());
        assert!(check_schedule("0 0 2 * * * ; rm").is_err());
    }
}
