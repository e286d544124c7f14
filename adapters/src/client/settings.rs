//! The shared client's tunables, read from a connection's `settings` with defaults. A bad value
//! is a [`RegistryError::Setting`] naming the key (the value is not echoed: it may be anything).
//!
//! | key | default | meaning |
//! | --- | --- | --- |
//! | `connect_timeout_ms` | 5000 | TCP + TLS connect |
//! | `request_timeout_ms` | 30000 | one HTTP exchange, headers and body |
//! | `max_attempts` | 4 | tries of one call (first one included) on 5xx, timeouts, connection errors |
//! | `retry_base_ms` | 250 | first backoff step, doubled per attempt, jittered |
//! | `retry_max_delay_ms` | 8000 | cap of one backoff step |
//! | `retry_budget_ms` | 30000 | total time one call may spend waiting to retry |
//! | `retry_after_cap_s` | 120 | longest `Retry-After` waited for in-call; longer is returned as `RateLimited` |
//! | `rate_limit_per_second` | 10 | outbound requests per second for the connection |
//! | `breaker_failures` | 5 | consecutive failures that open the circuit |
//! | `breaker_cooldown_ms` | 30000 | how long it stays open before one probe |
//! | `alg` | from the key | `RS384` or `ES384` for private_key_jwt |

use std::num::NonZeroU32;
use std::time::Duration;

use crate::{Connection, RegistryError};

use super::retry::RetryPolicy;

#[derive(Debug, Clone, PartialEq)]
pub struct ClientSettings {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub retry: RetryPolicy,
    pub rate_per_second: NonZeroU32,
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_millis(5_000),
            request_timeout: Duration::from_millis(30_000),
            retry: RetryPolicy {
                max_attempts: 4,
                base_delay: Duration::from_millis(250),
                max_delay: Duration::from_millis(8_000),
                budget: Duration::from_millis(30_000),
                retry_after_cap: Duration::from_secs(120),
            },
            rate_per_second: NonZeroU32::new(10).unwrap_or(NonZeroU32::MIN),
            breaker_failures: 5,
            breaker_cooldown: Duration::from_millis(30_000),
        }
    }
}

impl ClientSettings {
    pub fn from_connection(connection: &Connection) -> Result<Self, RegistryError> {
        let def = Self::default();
        let ms = |key: &str, default: Duration| -> Result<Duration, RegistryError> {
            Ok(Duration::from_millis(
                u64_setting(connection, key)?.unwrap_or(default.as_millis() as u64),
            ))
        };
        let positive = |key: &str, default: u32| -> Result<u32, RegistryError> {
            match u64_setting(connection, key)? {
                None => Ok(default),
                Some(0) => Err(setting_error(connection, key, "must be at least 1")),
                Some(v) => {
                    u32::try_from(v).map_err(|_| setting_error(connection, key, "is too large"))
                }
            }
        };
        let rate = positive("rate_limit_per_second", def.rate_per_second.get())?;
        Ok(Self {
            connect_timeout: ms("connect_timeout_ms", def.connect_timeout)?,
            request_timeout: ms("request_timeout_ms", def.request_timeout)?,
            retry: RetryPolicy {
                max_attempts: positive("max_attempts", def.retry.max_attempts)?,
                base_delay: ms("retry_base_ms", def.retry.base_delay)?,
                max_delay: ms("retry_max_delay_ms", def.retry.max_delay)?,
                budget: ms("retry_budget_ms", def.retry.budget)?,
                retry_after_cap: Duration::from_secs(
                    u64_setting(connection, "retry_after_cap_s")?
                        .unwrap_or(def.retry.retry_after_cap.as_secs()),
                ),
            },
            rate_per_second: NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN),
            breaker_failures: positive("breaker_failures", def.breaker_failures)?,
            breaker_cooldown: ms("breaker_cooldown_ms", def.breaker_cooldown)?,
        })
    }
}

pub(crate) fn setting_error(connection: &Connection, key: &str, problem: &str) -> RegistryError {
    RegistryError::Setting {
        connection: connection.id.clone(),
        key: key.to_owned(),
        problem: problem.to_owned(),
    }
}

/// A non-negative integer setting, as a JSON number or a string of digits.
pub(crate) fn u64_setting(
    connection: &Connection,
    key: &str,
) -> Result<Option<u64>, RegistryError> {
    match connection.settings.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| setting_error(connection, key, "must be a non-negative integer")),
        Some(serde_json::Value::String(s)) => s
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| setting_error(connection, key, "must be a non-negative integer")),
        Some(_) => Err(setting_error(
            connection,
            key,
            "must be a non-negative integer",
        )),
    }
}

/// A string setting (trimmed, non-empty when present).
pub(crate) fn str_setting<'c>(
    connection: &'c Connection,
    key: &str,
) -> Result<Option<&'c str>, RegistryError> {
    match connection.settings.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.trim())),
        Some(_) => Err(setting_error(connection, key, "must be a non-empty string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Credential;

    fn connection(settings: serde_json::Value) -> Connection {
        Connection {
            id: "c1".into(),
            vendor: "generic".into(),
            fhir_base_url: "https://ehr.example/fhir".into(),
            client_id: "gw".into(),
            token_url: None,
            credential: Credential::ClientSecret("s".into()),
            scopes: None,
            settings: settings.as_object().cloned().unwrap_or_default(),
        }
    }

    #[test]
    fn settings_default_and_override_and_a_bad_one_names_its_key() {
        let s = ClientSettings::from_connection(&connection(serde_json::json!({}))).unwrap();
        assert_eq!(s, ClientSettings::default());
        let s = ClientSettings::from_connection(&connection(
            serde_json::json!({"max_attempts": 2, "retry_base_ms": "10"}),
        ))
        .unwrap();
        assert_eq!(s.retry.max_attempts, 2);
        assert_eq!(s.retry.base_delay, Duration::from_millis(10));
        let err = ClientSettings::from_connection(&connection(
            serde_json::json!({"rate_limit_per_second": "fast"}),
        ))
        .unwrap_err();
        assert!(
            matches!(err, RegistryError::Setting { ref key, .. } if key == "rate_limit_per_second")
        );
        let err =
            ClientSettings::from_connection(&connection(serde_json::json!({"max_attempts": 0})))
                .unwrap_err();
        assert!(matches!(err, RegistryError::Setting { ref key, .. } if key == "max_attempts"));
    }
}
