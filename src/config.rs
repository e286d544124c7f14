//! Settings: `config/default.toml` (compiled in), then the `--config` file, then `FHIRGATE_*`
//! environment variables. Every problem is reported as the key that is wrong and why; secrets
//! (passwords in the database URL) never appear in `Debug` output or errors.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;

/// The defaults shipped in the binary, so `fhirgate serve` works from any directory.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Environment variables with the `FHIRGATE_` prefix that are not settings keys.
const NON_SETTINGS_ENV: &[&str] = &[
    "config",
    "test_postgres_url",
    "test_log",
    "test_kill_seed",
    "validate_fhir",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Development,
    Production,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub env: Environment,
    pub listen: SocketAddr,
    pub public_url: String,
    pub database_url: DatabaseUrl,
    pub database_max_connections: u32,
    pub database_acquire_timeout_secs: u64,
    pub migrate_on_start: bool,
    pub workers: usize,
    pub shutdown_timeout_secs: u64,
    pub log_format: LogFormat,
    pub log_level: String,
    /// Master key spec (`FHIRGATE_MASTER_KEY`); never shown in `Debug`.
    pub master_key: Secret,
    /// File holding the master key spec, used when `master_key` is empty.
    pub master_key_file: String,
    pub access_token_lifetime_secs: u64,
    pub rate_limit: crate::gate::rate_limit::RateLimitSettings,
    /// How long audit events are kept before `audit purge` may delete them (>= 2192 days).
    pub audit_retention_days: u32,
    pub export: crate::fhir::export::ExportSettings,
    /// Nightly pulls: the scheduler, job leases, and when a queue counts as stuck.
    pub sync: crate::sync::SyncSettings,
    /// A folder of mapping profiles (`*.toml`) layered over the built-in ones; empty for the
    /// built-in profiles only.
    pub mapping_profiles_dir: String,
    /// The claim-status outbox dispatcher.
    pub outbox: crate::sync::outbox::OutboxSettings,
    /// Patient-change webhooks and their inbox worker.
    pub webhooks: crate::sync::webhooks::WebhookSettings,
    /// Claim preparation: where the code tables and payer rules are read from at start.
    pub claims: crate::claims::ClaimsSettings,
    /// Proxies (IP addresses or CIDR ranges, comma-separated) whose `X-Forwarded-For` names the
    /// client; empty: the header is ignored (`http::client_ip`).
    pub trusted_proxies: String,
}

/// A secret setting: redacted whenever displayed.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "***" })
    }
}

/// A database URL whose password is redacted whenever it is displayed.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_postgres(&self) -> bool {
        self.0.starts_with("postgres://") || self.0.starts_with("postgresql://")
    }
    pub fn is_sqlite(&self) -> bool {
        self.0.starts_with("sqlite:")
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for DatabaseUrl {
    /// `postgres://user:secret@host/db` is shown as `postgres://user:***@host/db`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = &self.0;
        if let (Some(scheme_end), Some(at)) = (url.find("://"), url.rfind('@')) {
            let userinfo = &url[scheme_end + 3..at];
            if at > scheme_end {
                if let Some(colon) = userinfo.find(':') {
                    return write!(
                        f,
                        "{}{}:***{}",
                        &url[..scheme_end + 3],
                        &userinfo[..colon],
                        &url[at..]
                    );
                }
            }
        }
        f.write_str(url)
    }
}

/// A configuration problem, always naming the key (or file) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration key `{key}`{source_hint}: {reason}")]
    Key {
        key: String,
        source_hint: String,
        reason: String,
    },
    #[error("configuration file `{path}`: {reason}")]
    File { path: String, reason: String },
}

impl Settings {
    /// Loads defaults, then `config_file` (if any), then `FHIRGATE_*` variables, and validates.
    pub fn load(config_file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(config_file, Env::prefixed("FHIRGATE_"))
    }

    fn load_with_env(config_file: Option<&Path>, env: Env) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = config_file {
            if !path.is_file() {
                return Err(ConfigError::File {
                    path: path.display().to_string(),
                    reason: "no such file".into(),
                });
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        let env = env.ignore(NON_SETTINGS_ENV).split("__");
        let settings: Settings = figment.merge(env).extract().map_err(from_figment)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Loads from the defaults plus TOML text only; for tests and tools.
    pub fn from_toml(overrides: &str) -> Result<Self, ConfigError> {
        let settings: Settings = Figment::from(Toml::string(DEFAULT_TOML))
            .merge(Toml::string(overrides))
            .extract()
            .map_err(from_figment)?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: &str| ConfigError::Key {
            key: key.into(),
            source_hint: String::new(),
            reason: reason.into(),
        };
        if !(self.database_url.is_postgres() || self.database_url.is_sqlite()) {
            return Err(bad(
                "database_url",
                "must start with sqlite:// or postgres:// (or postgresql://)",
            ));
        }
        if self.database_max_connections == 0 {
            return Err(bad("database_max_connections", "must be at least 1"));
        }
        if self.database_acquire_timeout_secs == 0 {
            return Err(bad("database_acquire_timeout_secs", "must be at least 1"));
        }
        let url = &self.public_url;
        if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
            return Err(bad(
                "public_url",
                "must be empty or start with http:// or https://",
            ));
        }
        if !(1..=3600).contains(&self.access_token_lifetime_secs) {
            return Err(bad(
                "access_token_lifetime_secs",
                "must be between 1 and 3600",
            ));
        }
        // Six years, counting the leap days six years can hold (45 CFR 164.316(b)(2)).
        if self.audit_retention_days < 2192 {
            return Err(bad(
                "audit_retention_days",
                "must be at least 2192 (six years, HIPAA 45 CFR 164.316(b)(2))",
            ));
        }
        if let Err((key, reason)) = self.rate_limit.validate() {
            return Err(bad(key, reason));
        }
        if let Err((key, reason)) = self.sync.validate() {
            return Err(bad(key, reason));
        }
        if let Err((key, reason)) = self.export.validate() {
            return Err(bad(key, reason));
        }
        if let Err((key, reason)) = self.outbox.validate() {
            return Err(bad(key, reason));
        }
        if let Err((key, reason)) = self.webhooks.validate() {
            return Err(bad(key, reason));
        }
        if let Err(reason) = crate::http::client_ip::TrustedProxies::parse(&self.trusted_proxies) {
            return Err(bad("trusted_proxies", reason));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() {
            return Err(bad("log_level", "is not a valid tracing filter directive"));
        }
        Ok(())
    }

    /// The public base URL without a trailing slash: `public_url`, or `http://{listen}`.
    pub fn base_url(&self, bound: SocketAddr) -> String {
        if self.public_url.is_empty() {
            format!("http://{bound}")
        } else {
            self.public_url.trim_end_matches('/').to_owned()
        }
    }
}

fn from_figment(err: figment::Error) -> ConfigError {
    // figment may chain several errors; the first is enough to act on.
    let err = err
        .into_iter()
        .next()
        .expect("figment errors are non-empty");
    let source_hint = err
        .metadata
        .as_ref()
        .map(|m| format!(" (from {})", m.name))
        .unwrap_or_default();
    let key = if err.path.is_empty() {
        match &err.kind {
            figment::error::Kind::UnknownField(name, _) => name.clone(),
            figment::error::Kind::MissingField(name) => name.to_string(),
            _ => "<root>".into(),
        }
    } else {
        err.path.join(".")
    };
    ConfigError::Key {
        key,
        source_hint,
        reason: err.kind.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load_and_use_embedded_sqlite() {
        let s = Settings::from_toml("").unwrap();
        assert!(s.database_url.is_sqlite());
        assert_eq!(s.env, Environment::Development);
    }

    #[test]
    fn a_malformed_listen_address_names_the_key() {
        let err = Settings::from_toml("listen = 'not-an-address'")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`listen`"), "{err}");
    }

    #[test]
    fn an_unknown_key_is_refused_with_its_name() {
        let err = Settings::from_toml("databse_url = 'x'")
            .unwrap_err()
            .to_string();
        assert!(err.contains("databse_url"), "{err}");
    }

    #[test]
    fn an_audit_retention_under_six_years_is_refused() {
        let err = Settings::from_toml("audit_retention_days = 365")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`audit_retention_days`"), "{err}");
    }

    #[test]
    fn outbox_settings_out_of_range_name_their_key() {
        let s = Settings::from_toml("").unwrap();
        assert_eq!(s.outbox.max_attempts, 8);
        assert_eq!(s.outbox.poll_interval_ms, 250);
        for (toml, key) in [
            ("[outbox]\nmax_attempts = 0", "outbox.max_attempts"),
            ("[outbox]\npoll_interval_ms = 0", "outbox.poll_interval_ms"),
            (
                "[outbox]\nretry_base_ms = 10\nretry_max_ms = 5",
                "outbox.retry_max_ms",
            ),
            ("[outbox]\nbatch = 0", "outbox.batch"),
            ("[outbox]\nlease_ms = 10", "outbox.lease_ms"),
        ] {
            let err = Settings::from_toml(toml).unwrap_err().to_string();
            assert!(err.contains(&format!("`{key}`")), "{toml}: {err}");
        }
    }

    #[test]
    fn webhook_settings_default_to_a_mebibyte_and_five_minutes_and_are_checked() {
        let s = Settings::from_toml("").unwrap();
        assert_eq!(s.webhooks.max_body_bytes, 1024 * 1024);
        assert_eq!(s.webhooks.tolerance_secs, 300);
        let err = Settings::from_toml("[webhooks]\nmax_attempts = 0")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`webhooks.max_attempts`"), "{err}");
    }

    #[test]
    fn an_unsupported_database_scheme_is_refused() {
        let err = Settings::from_toml("database_url = 'mysql://x'")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`database_url`"), "{err}");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's signature
    fn environment_variables_override_the_file_and_name_the_key_when_wrong() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("FHIRGATE_DATABASE_MAX_CONNECTIONS", "many");
            jail.set_env("FHIRGATE_TEST_POSTGRES_URL", "postgres://ignored");
            let err = Settings::load(None).unwrap_err().to_string();
            assert!(err.contains("`database_max_connections`"), "{err}");
            assert!(err.contains("FHIRGATE_"), "{err}");
            jail.set_env("FHIRGATE_DATABASE_MAX_CONNECTIONS", "3");
            jail.set_env("FHIRGATE_LISTEN", "127.0.0.1:9999");
            let s = Settings::load(None).unwrap();
            assert_eq!(s.database_max_connections, 3);
            assert_eq!(s.listen.port(), 9999);
            Ok(())
        });
    }

    #[test]
    fn the_database_password_is_redacted_in_debug_output() {
        let url = DatabaseUrl::new("postgres://app:hunter2@db:5432/fhirgate");
        let shown = format!("{url:?}");
        assert_eq!(shown, "postgres://app:***@db:5432/fhirgate");
        let settings = Settings::from_toml("database_url = 'postgres://app:hunter2@db/x'").unwrap();
        assert!(!format!("{settings:?}").contains("hunter2"));
    }
}
