//! Access tokens issued by `/auth/token`: JWTs signed HS256 with a key derived from the gateway's
//! master key (only the gateway itself verifies them, so a shared secret among its instances is
//! enough and nothing needs publishing). Tokens carry the client, its practice, role and scopes.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::clients::Role;
use super::scopes::ScopeSet;
use super::{Caller, GateError};
use crate::domain::ResourceId;

#[derive(Debug, Serialize, Deserialize)]
struct AccessClaims {
    iss: String,
    sub: String,
    aud: String,
    exp: u64,
    iat: u64,
    jti: String,
    scope: String,
    practice: String,
    role: String,
}

pub struct AccessTokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: String,
    audience: String,
    lifetime: Duration,
}

/// An issued token and how long it lives.
pub struct Issued {
    pub token: String,
    pub expires_in: u64,
}

impl AccessTokens {
    /// `secret` is the HMAC key (32 bytes derived from the master key); `base_url` names the
    /// issuer, and the FHIR base is the audience.
    pub fn new(secret: &[u8], base_url: &str, lifetime: Duration) -> Self {
        let issuer = base_url.to_owned();
        let audience = format!("{base_url}{}", crate::fhir::FHIR_BASE);
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[&issuer]);
        validation.set_audience(&[&audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 5;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            issuer,
            audience,
            lifetime,
        }
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    pub fn issue(
        &self,
        client_id: &str,
        practice: &ResourceId,
        role: Role,
        scopes: &ScopeSet,
    ) -> Result<Issued, jsonwebtoken::errors::Error> {
        let now = unix_now();
        let claims = AccessClaims {
            iss: self.issuer.clone(),
            sub: client_id.to_owned(),
            aud: self.audience.clone(),
            iat: now,
            exp: now + self.lifetime.as_secs(),
            jti: uuid::Uuid::new_v4().to_string(),
            scope: scopes.to_string(),
            practice: practice.to_string(),
            role: role.as_str().to_owned(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)?;
        Ok(Issued {
            token,
            expires_in: self.lifetime.as_secs(),
        })
    }

    /// Verifies signature, issuer, audience and expiry, and rebuilds the caller.
    pub fn verify(&self, token: &str) -> Result<Caller, GateError> {
        let data = jsonwebtoken::decode::<AccessClaims>(token, &self.decoding, &self.validation)
            .map_err(|_| GateError::InvalidToken)?;
        let c = data.claims;
        Ok(Caller {
            practice_id: ResourceId::parse("practice", c.practice)
                .map_err(|_| GateError::InvalidToken)?,
            role: Role::parse(&c.role).map_err(|_| GateError::InvalidToken)?,
            scopes: ScopeSet::parse(&c.scope).map_err(|_| GateError::InvalidToken)?,
            client_id: c.sub,
        })
    }
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(secret: &[u8]) -> AccessTokens {
        AccessTokens::new(secret, "http://gw", Duration::from_secs(300))
    }

    #[test]
    fn an_issued_token_verifies_to_its_client_practice_and_scopes() {
        let t = tokens(&[7; 32]);
        let practice = ResourceId::parse("p", "practice-1").unwrap();
        let scopes = ScopeSet::parse("system/Patient.rs").unwrap();
        let issued = t
            .issue("client-1", &practice, Role::Clinician, &scopes)
            .unwrap();
        assert_eq!(issued.expires_in, 300);
        let caller = t.verify(&issued.token).unwrap();
        assert_eq!(caller.client_id, "client-1");
        assert_eq!(caller.practice_id, practice);
        assert_eq!(caller.role, Role::Clinician);
        assert_eq!(caller.scopes, scopes);
    }

    #[test]
    fn a_token_signed_with_another_key_is_refused() {
        let practice = ResourceId::parse("p", "practice-1").unwrap();
        let issued = tokens(&[1; 32])
            .issue("c", &practice, Role::Billing, &ScopeSet::default())
            .unwrap();
        assert!(tokens(&[2; 32]).verify(&issued.token).is_err());
    }

    #[test]
    fn a_token_for_another_gateway_is_refused() {
        let practice = ResourceId::parse("p", "practice-1").unwrap();
        let other = AccessTokens::new(&[1; 32], "http://other", Duration::from_secs(300));
        let issued = other
            .issue("c", &practice, Role::Billing, &ScopeSet::default())
            .unwrap();
        assert!(tokens(&[1; 32]).verify(&issued.token).is_err());
    }

    #[test]
    fn an_expired_token_is_refused() {
        let practice = ResourceId::parse("p", "practice-1").unwrap();
        let t = AccessTokens::new(&[1; 32], "http://gw", Duration::from_secs(0));
        let mut issued = t
            .issue("c", &practice, Role::Billing, &ScopeSet::default())
            .unwrap();
        // Re-issue with exp in the past, beyond the leeway.
        let claims = AccessClaims {
            iss: "http://gw".into(),
            sub: "c".into(),
            aud: "http://gw/fhir/r4".into(),
            exp: unix_now() - 60,
            iat: unix_now() - 360,
            jti: "j".into(),
            scope: String::new(),
            practice: "practice-1".into(),
            role: "billing".into(),
        };
        issued.token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&[1; 32]),
        )
        .unwrap();
        assert!(t.verify(&issued.token).is_err());
    }
}
