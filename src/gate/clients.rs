//! The client registry: API clients of the gateway's FHIR API, each of exactly one practice, with
//! a public key set (inline JWKS, or a JWKS URL fetched and cached), allowed scopes and a role.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use moka::future::Cache;
use serde::Serialize;

use super::scopes::ScopeSet;
use crate::domain::{InvalidValue, ResourceId};

/// Roles of the practice's RBAC, each with a default scope set used when a client is created
/// without explicit scopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    PracticeAdmin,
    Clinician,
    Billing,
    FrontDesk,
    ExternalSystem,
}

impl Role {
    pub fn parse(value: &str) -> Result<Role, InvalidValue> {
        Ok(match value {
            "practice_admin" => Role::PracticeAdmin,
            "clinician" => Role::Clinician,
            "billing" => Role::Billing,
            "front_desk" => Role::FrontDesk,
            "external_system" => Role::ExternalSystem,
            _ => {
                return Err(InvalidValue::new(
                    "role",
                    "must be practice_admin, clinician, billing, front_desk or external_system",
                ))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::PracticeAdmin => "practice_admin",
            Role::Clinician => "clinician",
            Role::Billing => "billing",
            Role::FrontDesk => "front_desk",
            Role::ExternalSystem => "external_system",
        }
    }

    /// The scopes a client of this role gets when none are given.
    pub fn default_scopes(self) -> &'static str {
        match self {
            Role::PracticeAdmin => "system/*.cruds",
            Role::Clinician => {
                "system/Patient.cruds system/Encounter.cruds system/Coverage.rs \
                 system/Practitioner.rs system/Organization.rs"
            }
            Role::Billing => {
                "system/Claim.cruds system/ClaimResponse.cruds system/Coverage.cruds \
                 system/Patient.rs system/Encounter.rs system/Practitioner.rs system/Organization.rs"
            }
            Role::FrontDesk => {
                "system/Patient.cruds system/Coverage.cruds system/Encounter.rs \
                 system/Practitioner.rs system/Organization.rs"
            }
            Role::ExternalSystem => {
                "system/Patient.rs system/Coverage.rs system/Encounter.rs \
                 system/Practitioner.rs system/Organization.rs"
            }
        }
    }
}

/// Where a client's public keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientKeys {
    /// A JWKS document, validated on the way in.
    Inline(String),
    /// An `https://` (or, to localhost only, `http://`) URL serving the client's JWKS.
    Url(String),
}

impl ClientKeys {
    /// Checks that an inline JWKS parses and holds at least one RS384/ES384-capable key with a `kid`.
    pub fn inline(jwks: &str) -> Result<ClientKeys, InvalidValue> {
        let set: JwkSet = serde_json::from_str(jwks).map_err(|_| {
            InvalidValue::new("jwks", "must be a JSON Web Key Set ({\"keys\": [...]})")
        })?;
        if set.keys.is_empty() || set.keys.iter().any(|k| k.common.key_id.is_none()) {
            return Err(InvalidValue::new(
                "jwks",
                "must hold at least one key, each with a kid",
            ));
        }
        if set
            .keys
            .iter()
            .any(|k| jsonwebtoken::DecodingKey::from_jwk(k).is_err())
        {
            return Err(InvalidValue::new(
                "jwks",
                "holds a key that cannot verify signatures",
            ));
        }
        Ok(ClientKeys::Inline(jwks.to_owned()))
    }

    /// A JWKS URL: `https`, or `http` to this machine only (a local test server). Keys fetched
    /// over plain HTTP from another host could be swapped on the way, and whoever swaps them can
    /// sign the client's assertions; credentials in the URL are refused too.
    pub fn url(url: &str) -> Result<ClientKeys, InvalidValue> {
        let refused = InvalidValue::new(
            "jwks_url",
            "must be an https:// URL without credentials (http:// only to localhost)",
        );
        let parsed = reqwest::Url::parse(url).map_err(|_| refused.clone())?;
        let loopback = matches!(parsed.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
        let secure = match parsed.scheme() {
            "https" => parsed.host_str().is_some_and(|h| !h.is_empty()),
            "http" => loopback,
            _ => false,
        };
        if !secure || !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(refused);
        }
        Ok(ClientKeys::Url(url.to_owned()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientStatus {
    Active,
    Disabled,
}

impl ClientStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientStatus::Active => "active",
            ClientStatus::Disabled => "disabled",
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewApiClient {
    pub practice_id: ResourceId,
    pub name: String,
    pub role: Role,
    pub scopes: ScopeSet,
    pub keys: ClientKeys,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApiClient {
    pub client_id: String,
    pub practice_id: ResourceId,
    pub name: String,
    pub role: Role,
    /// Allowed scopes, space separated.
    pub scope: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    #[serde(skip)]
    pub jwks: Option<String>,
    pub status: ClientStatus,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: time::OffsetDateTime,
}

impl ApiClient {
    pub fn keys(&self) -> Option<ClientKeys> {
        match (&self.jwks, &self.jwks_url) {
            (Some(jwks), _) => Some(ClientKeys::Inline(jwks.clone())),
            (None, Some(url)) => Some(ClientKeys::Url(url.clone())),
            (None, None) => None,
        }
    }

    /// For rows read back from our own database.
    pub(crate) fn role_from_db(value: &str) -> Role {
        Role::parse(value).unwrap_or(Role::ExternalSystem)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("the client's key set could not be fetched")]
    Fetch,
    #[error("the client's key set is not a valid JWKS")]
    Invalid,
}

/// Fetches and caches JWKS documents served at clients' `jwks_url`s (SMART: "the authorization
/// server SHALL ... retrieve the client's JWK Set", refreshed when an unknown `kid` appears).
#[derive(Clone)]
pub struct JwksFetcher {
    http: reqwest::Client,
    cache: Cache<String, Arc<JwkSet>>,
}

impl JwksFetcher {
    pub fn new() -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
            .unwrap_or_default();
        Self {
            http,
            cache: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(3600))
                .build(),
        }
    }

    /// The key set at `url`, from the cache unless `refresh` (an unknown kid was seen).
    pub async fn get(&self, url: &str, refresh: bool) -> Result<Arc<JwkSet>, JwksError> {
        if !refresh {
            if let Some(set) = self.cache.get(url).await {
                return Ok(set);
            }
        }
        let res = self
            .http
            .get(url)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|_| JwksError::Fetch)?;
        if !res.status().is_success() {
            return Err(JwksError::Fetch);
        }
        // A key set is small; refuse anything large.
        let bytes = res.bytes().await.map_err(|_| JwksError::Fetch)?;
        if bytes.len() > 256 * 1024 {
            return Err(JwksError::Invalid);
        }
        let set: JwkSet = serde_json::from_slice(&bytes).map_err(|_| JwksError::Invalid)?;
        let set = Arc::new(set);
        self.cache.insert(url.to_owned(), Arc::clone(&set)).await;
        Ok(set)
    }
}

impl Default for JwksFetcher {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::ClientKeys;

    #[test]
    fn a_jwks_url_is_https_or_plain_http_to_this_machine_only() {
        for ok in [
            "https://partner.example/.well-known/jwks.json",
            "http://127.0.0.1:8181/jwks.json",
            "http://localhost/jwks.json",
        ] {
            assert!(ClientKeys::url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://partner.example/jwks.json",
            "https://user:secret@partner.example/jwks.json",
            "ftp://partner.example/jwks.json",
            "partner.example/jwks.json",
            "https://",
        ] {
            let err = ClientKeys::url(bad).unwrap_err();
            assert_eq!(err.field, "jwks_url", "{bad}");
        }
    }
}
