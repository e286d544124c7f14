//! Key pairs for SMART backend-services clients (`private_key_jwt`): RS384 (RSA 2048) and ES384
//! (P-384), generated with aws-lc-rs and handed out as PEM, so tests and `fhirgate sandbox` can
//! sign client assertions the simulator verifies. Never logs or prints a private key.

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize};
use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P384_SHA384_FIXED_SIGNING};
use base64::Engine as _;

/// The assertion algorithms SMART backend services (and Epic) accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigningAlg {
    RS384,
    ES384,
}

impl SigningAlg {
    pub fn as_str(self) -> &'static str {
        match self {
            SigningAlg::RS384 => "RS384",
            SigningAlg::ES384 => "ES384",
        }
    }
}

/// A generated key pair: PKCS#8 private key and SubjectPublicKeyInfo public key, both PEM.
#[derive(Clone)]
pub struct KeyPair {
    pub alg: SigningAlg,
    pub private_pem: String,
    pub public_pem: String,
    /// A key id derived from the public key (SHA-256 of its DER, base64url, 16 characters).
    pub kid: String,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .field("private_pem", &"[redacted]")
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot generate a {alg} key pair")]
pub struct KeyError {
    alg: &'static str,
}

/// Generates a fresh key pair for `alg` (RSA 2048 for RS384, P-384 for ES384).
pub fn generate(alg: SigningAlg) -> Result<KeyPair, KeyError> {
    let err = || KeyError { alg: alg.as_str() };
    let (private_der, public_der) = match alg {
        SigningAlg::RS384 => {
            let pair = RsaKeyPair::generate(KeySize::Rsa2048).map_err(|_| err())?;
            let private = AsDer::<Pkcs8V1Der>::as_der(&pair).map_err(|_| err())?;
            let public = AsDer::<PublicKeyX509Der>::as_der(pair.public_key()).map_err(|_| err())?;
            (private.as_ref().to_vec(), public.as_ref().to_vec())
        }
        SigningAlg::ES384 => {
            let pair =
                EcdsaKeyPair::generate(&ECDSA_P384_SHA384_FIXED_SIGNING).map_err(|_| err())?;
            let private = pair.to_pkcs8v1().map_err(|_| err())?;
            let public = AsDer::<PublicKeyX509Der>::as_der(pair.public_key()).map_err(|_| err())?;
            (private.as_ref().to_vec(), public.as_ref().to_vec())
        }
    };
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &public_der);
    let kid =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())[..16].to_string();
    Ok(KeyPair {
        alg,
        private_pem: pem("PRIVATE KEY", &private_der),
        public_pem: pem("PUBLIC KEY", &public_der),
        kid,
    })
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};

    fn round_trip(alg: SigningAlg, jwt_alg: Algorithm) {
        let pair = generate(alg).expect("key generates");
        let (enc, dec) = match alg {
            SigningAlg::RS384 => (
                EncodingKey::from_rsa_pem(pair.private_pem.as_bytes()).expect("private pem"),
                DecodingKey::from_rsa_pem(pair.public_pem.as_bytes()).expect("public pem"),
            ),
            SigningAlg::ES384 => (
                EncodingKey::from_ec_pem(pair.private_pem.as_bytes()).expect("private pem"),
                DecodingKey::from_ec_pem(pair.public_pem.as_bytes()).expect("public pem"),
            ),
        };
        let claims = serde_json::json!({"sub": "x", "exp": 4_000_000_000u64});
        let jwt = jsonwebtoken::encode(&Header::new(jwt_alg), &claims, &enc).expect("signs");
        let mut v = Validation::new(jwt_alg);
        v.required_spec_claims.clear();
        jsonwebtoken::decode::<serde_json::Value>(&jwt, &dec, &v).expect("verifies");
        assert_eq!(pair.kid.len(), 16);
    }

    #[test]
    fn an_rs384_pair_signs_and_verifies_through_its_pems() {
        round_trip(SigningAlg::RS384, Algorithm::RS384);
    }

    #[test]
    fn an_es384_pair_signs_and_verifies_through_its_pems() {
        round_trip(SigningAlg::ES384, Algorithm::ES384);
    }
}
