//! Builds adapters from a connection's `vendor`. Each vendor module registers one factory in
//! [`Registry::built_in`]; the core only ever asks the registry, so adding a vendor is one
//! module and one line here, with no match statement elsewhere to edit.

use std::collections::BTreeMap;
use std::sync::Arc;

use fhirgate_mappings::Profiles;

use crate::audit::{NoAudit, OutboundAudit};
use crate::EhrAdapter;

/// What an adapter is built from: the connection as stored (or configured), with its
/// credential in clear (the gateway decrypts it just before building), and vendor-specific
/// settings (an Epic `group_id`, a Cerner `tenant`...) each vendor module documents.
#[derive(Clone)]
pub struct Connection {
    pub id: String,
    pub vendor: String,
    /// The EHR's FHIR R4 base URL (no trailing slash).
    pub fhir_base_url: String,
    pub client_id: String,
    /// The token endpoint; discovered from `{base}/.well-known/smart-configuration` when `None`.
    pub token_url: Option<String>,
    pub credential: Credential,
    /// Scopes to ask for; the vendor's default when `None`.
    pub scopes: Option<String>,
    pub settings: serde_json::Map<String, serde_json::Value>,
}

/// How the connection proves who it is at the token endpoint.
#[derive(Clone)]
pub enum Credential {
    /// SMART backend services: a JWT client assertion signed with this private key (PEM,
    /// RSA for RS384 or P-384 EC for ES384), `kid` naming its public key in the client's JWKS.
    PrivateKey { pem: String, kid: Option<String> },
    /// OAuth client_credentials with a client secret (HTTP Basic), as Cerner system accounts.
    ClientSecret(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::PrivateKey { kid, .. } => f
                .debug_struct("PrivateKey")
                .field("kid", kid)
                .field("pem", &"[redacted]")
                .finish(),
            Credential::ClientSecret(_) => f.write_str("ClientSecret([redacted])"),
        }
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.id)
            .field("vendor", &self.vendor)
            .field("fhir_base_url", &self.fhir_base_url)
            .field("client_id", &self.client_id)
            .field("token_url", &self.token_url)
            .field("credential", &self.credential)
            .field("scopes", &self.scopes)
            .field("settings", &self.settings)
            .finish()
    }
}

/// What the gateway lends every adapter it builds: where outbound calls are audited (more
/// shared parts, such as one HTTP connection pool, join it as they are needed).
#[derive(Clone)]
pub struct AdapterContext {
    pub audit: Arc<dyn OutboundAudit>,
}

impl Default for AdapterContext {
    fn default() -> Self {
        Self {
            audit: Arc::new(NoAudit),
        }
    }
}

/// Builds one vendor's adapter for a connection.
pub type AdapterFactory = fn(
    &Connection,
    &fhirgate_mappings::Profile,
    &AdapterContext,
) -> Result<Arc<dyn EhrAdapter>, RegistryError>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("connection {connection}: no adapter for vendor `{vendor}` (known: {known})")]
    UnknownVendor {
        connection: String,
        vendor: String,
        known: String,
    },
    #[error("connection {connection}: no mapping profile for vendor `{vendor}`")]
    NoProfile { connection: String, vendor: String },
    #[error("connection {connection}: {key}: {problem}")]
    Setting {
        connection: String,
        key: String,
        problem: String,
    },
}

/// Vendor name -> factory.
#[derive(Clone, Default)]
pub struct Registry {
    factories: BTreeMap<String, AdapterFactory>,
}

impl Registry {
    /// The vendors this crate ships.
    pub fn built_in() -> Self {
        Self::default()
            .register("epic", crate::vendors::epic::factory)
            .register("cerner", crate::vendors::cerner::factory)
            .register("generic", crate::vendors::generic::factory)
            .register("athena", crate::vendors::athena::factory)
    }

    /// Adds (or replaces) a vendor's factory.
    pub fn register(mut self, vendor: &str, factory: AdapterFactory) -> Self {
        self.factories.insert(vendor.to_owned(), factory);
        self
    }

    pub fn vendors(&self) -> impl Iterator<Item = &str> {
        self.factories.keys().map(String::as_str)
    }

    /// The adapter of a connection, with its vendor's mapping profile.
    pub fn build(
        &self,
        connection: &Connection,
        profiles: &Profiles,
        context: &AdapterContext,
    ) -> Result<Arc<dyn EhrAdapter>, RegistryError> {
        let factory =
            self.factories
                .get(&connection.vendor)
                .ok_or_else(|| RegistryError::UnknownVendor {
                    connection: connection.id.clone(),
                    vendor: connection.vendor.clone(),
                    known: self.vendors().collect::<Vec<_>>().join(", "),
                })?;
        let profile = profiles
            .get(&connection.vendor)
            .ok_or_else(|| RegistryError::NoProfile {
                connection: connection.id.clone(),
                vendor: connection.vendor.clone(),
            })?;
        factory(connection, profile, context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::*;
    use crate::AdapterError;
    use serde_json::Value;

    /// An adapter that answers every call with a fixed error, to exercise the registry.
    struct Offline(String);

    #[async_trait::async_trait]
    impl EhrAdapter for Offline {
        fn vendor(&self) -> &str {
            &self.0
        }
        async fn patient(&self, _: &str) -> Result<Value, AdapterError> {
            Err(AdapterError::Transient("offline".into()))
        }
        fn patients_changed_since<'a>(&'a self, _: Option<&'a str>) -> PageStream<'a> {
            Box::pin(futures_util::stream::empty())
        }
        async fn coverage_for(&self, _: &str) -> Result<Vec<Value>, AdapterError> {
            Ok(vec![])
        }
        async fn start_export(
            &self,
            _: &ExportRequest,
        ) -> Result<Option<BulkExport>, AdapterError> {
            Ok(None)
        }
        async fn poll_export(&self, _: &BulkExport) -> Result<ExportStatus, AdapterError> {
            Err(AdapterError::Permanent("no export".into()))
        }
        fn download<'a>(&'a self, _: &'a ExportFile) -> PageStream<'a> {
            Box::pin(futures_util::stream::empty())
        }
        async fn push_claim_status(
            &self,
            _: &ClaimStatusUpdate,
        ) -> Result<PushReceipt, AdapterError> {
            Err(AdapterError::Permanent("read-only".into()))
        }
    }

    fn offline(
        c: &Connection,
        _: &fhirgate_mappings::Profile,
        _: &AdapterContext,
    ) -> Result<Arc<dyn EhrAdapter>, RegistryError> {
        Ok(Arc::new(Offline(c.vendor.clone())))
    }

    fn connection(vendor: &str) -> Connection {
        Connection {
            id: "conn-1".into(),
            vendor: vendor.into(),
            fhir_base_url: "https://ehr.example/fhir/r4".into(),
            client_id: "fhirgate".into(),
            token_url: None,
            credential: Credential::ClientSecret("s3cret".into()),
            scopes: None,
            settings: Default::default(),
        }
    }

    #[test]
    fn the_built_in_registry_knows_the_shipped_vendors() {
        let registry = Registry::built_in();
        assert_eq!(
            registry.vendors().collect::<Vec<_>>(),
            ["athena", "cerner", "epic", "generic"]
        );
    }

    #[tokio::test]
    async fn a_registered_vendor_builds_with_its_profile_and_others_are_named_errors() {
        let profiles = Profiles::built_in().unwrap();
        let ctx = AdapterContext::default();
        let registry = Registry::default()
            .register("epic", offline)
            .register("acme", offline);
        let adapter = registry
            .build(&connection("epic"), &profiles, &ctx)
            .unwrap();
        assert_eq!(adapter.vendor(), "epic");
        assert!(adapter.patient("p1").await.unwrap_err().is_retryable());
        assert!(!format!("{:?}", connection("epic")).contains("s3cret"));
        assert_eq!(
            registry
                .build(&connection("meditech"), &profiles, &ctx)
                .err(),
            Some(RegistryError::UnknownVendor {
                connection: "conn-1".into(),
                vendor: "meditech".into(),
                known: "acme, epic".into()
            })
        );
        assert!(matches!(
            registry.build(&connection("acme"), &profiles, &ctx).err(),
            Some(RegistryError::NoProfile { .. })
        ));
    }
}
