//! `spawn_app()`: the real application on a random port with a fresh database of its own: a
//! temp SQLite file, or a new PostgreSQL database when `FHIRGATE_TEST_POSTGRES_URL` is set
//! (created per test, dropped after). Logs are printed only with `FHIRGATE_TEST_LOG=1`.

use std::io::Write;

use base64::Engine;
use std::process::{Command, Stdio};
use std::sync::{Arc, LazyLock};

use fhirgate::config::{DatabaseUrl, Settings};
use fhirgate::startup::Application;
use fhirgate::store::{Backend, Store};
use fhirgate::telemetry::{get_subscriber, init_subscriber};

static TRACING: LazyLock<()> = LazyLock::new(|| {
    if std::env::var_os("FHIRGATE_TEST_LOG").is_some() {
        init_subscriber(get_subscriber(
            "info",
            fhirgate::config::LogFormat::Json,
            std::io::stdout,
        ));
    } else {
        init_subscriber(get_subscriber(
            "info",
            fhirgate::config::LogFormat::Json,
            std::io::sink,
        ));
    }
});

/// The backend this test run uses.
pub fn backend() -> Backend {
    if postgres_admin_url().is_some() {
        Backend::Postgres
    } else {
        Backend::Sqlite
    }
}

pub fn postgres_admin_url() -> Option<String> {
    std::env::var("FHIRGATE_TEST_POSTGRES_URL")
        .ok()
        .filter(|s| !s.is_empty())
}

/// A database that exists for one test.
pub enum TestDb {
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
    Postgres { admin_url: String, name: String },
}

impl TestDb {
    pub async fn create() -> (Self, DatabaseUrl) {
        match postgres_admin_url() {
            Some(admin_url) => {
                let name = format!("fhirgate_test_{}", uuid::Uuid::new_v4().simple());
                let admin = sqlx::PgPool::connect(&admin_url)
                    .await
                    .expect("FHIRGATE_TEST_POSTGRES_URL must reach a PostgreSQL server");
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&admin)
                    .await
                    .expect("create test database");
                admin.close().await;
                let mut url = reqwest::Url::parse(&admin_url).expect("valid postgres URL");
                url.set_path(&format!("/{name}"));
                (
                    TestDb::Postgres { admin_url, name },
                    DatabaseUrl::new(url.to_string()),
                )
            }
            None => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}/fhirgate.db", dir.path().display());
                (TestDb::Sqlite(dir), DatabaseUrl::new(url))
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let TestDb::Postgres { admin_url, name } = self {
            let (admin_url, name) = (admin_url.clone(), name.clone());
            // Drop runs inside the test's runtime: use a thread with a runtime of its own.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    if let Ok(admin) = sqlx::PgPool::connect(&admin_url).await {
                        let _ =
                            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                                .execute(&admin)
                                .await;
                        admin.close().await;
                    }
                });
            })
            .join();
        }
    }
}

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub store: Arc<dyn Store>,
    pub database_url: DatabaseUrl,
    handle: actix_web::dev::ServerHandle,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    // Dropped last: the database outlives the server (None: another TestApp owns it).
    _db: Option<TestDb>,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    /// Stops the gateway as SIGTERM does and waits until it has shut down (background work
    /// included). Returns its database, which lives as long as the caller keeps it.
    pub async fn stop(mut self) -> Option<TestDb> {
        self.handle.stop(true).await;
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
        self._db.take()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request reaches the gateway")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // Stop the server; the future completes in the background.
        drop(self.handle.stop(false));
    }
}

/// A fresh master key spec, `test1:BASE64`.
pub fn test_master_key() -> String {
    format!(
        "test1:{}",
        base64::engine::general_purpose::STANDARD.encode(uuid::Uuid::new_v4().as_bytes().repeat(2))
    )
}

/// Settings for a test: random port, the given database, quiet logs, a fresh master key unless
/// `extra` sets one. `extra` is TOML layered on.
pub fn test_settings(database_url: &DatabaseUrl, extra: &str) -> Settings {
    let key = if extra.contains("master_key") {
        String::new()
    } else {
        format!("master_key = '{}'\n", test_master_key())
    };
    Settings::from_toml(&format!(
        "listen = '127.0.0.1:0'\nworkers = 2\ndatabase_url = '{}'\ndatabase_max_connections = 5\n\
         {key}{extra}",
        database_url.expose(),
    ))
    .expect("test settings are valid")
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with("").await
}

pub async fn spawn_app_with(extra: &str) -> TestApp {
    let (db, database_url) = TestDb::create().await;
    let mut app = spawn_app_on(&database_url, extra)
        .await
        .expect("application builds");
    app._db = Some(db);
    app
}

/// Another gateway on an existing test database (owned by another [`TestApp`]).
pub async fn spawn_app_on(
    database_url: &DatabaseUrl,
    extra: &str,
) -> Result<TestApp, fhirgate::startup::StartupError> {
    LazyLock::force(&TRACING);
    let settings = test_settings(database_url, extra);
    let app = Application::build(settings).await?;
    let address = format!("http://127.0.0.1:{}", app.port());
    let store = app.store();
    let handle = app.handle();
    let server = tokio::spawn(app.run_until_stopped());
    Ok(TestApp {
        address,
        client: reqwest::Client::new(),
        store,
        database_url: database_url.clone(),
        handle,
        server: Some(server),
        _db: None,
    })
}

/// Validates FHIR JSON (one resource a line) with `../shared/tools/validate-fhir`, the official R4
/// JSON schema, and panics with the tool's report when anything is invalid.
pub fn assert_valid_fhir(resources: &[serde_json::Value]) {
    let tool = std::env::var("FHIRGATE_VALIDATE_FHIR").unwrap_or_else(|_| {
        format!(
            "{}/../shared/tools/validate-fhir",
            env!("CARGO_MANIFEST_DIR")
        )
    });
    assert!(
        std::path::Path::new(&tool).exists(),
        "validate-fhir not found at {tool}; set FHIRGATE_VALIDATE_FHIR"
    );
    // The tool installs its Python environment on first use; tests call it concurrently, so the
    // first call runs alone.
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let out = Command::new(&tool)
            .arg("-")
            .stdin(Stdio::null())
            .output()
            .expect("validate-fhir starts");
        assert!(
            out.status.code() != Some(2),
            "validate-fhir could not install itself: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    let mut child = Command::new(&tool)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("validate-fhir starts");
    {
        let stdin = child.stdin.as_mut().expect("stdin");
        for r in resources {
            writeln!(stdin, "{r}").expect("write resource");
        }
    }
    let out = child.wait_with_output().expect("validate-fhir runs");
    assert!(
        out.status.success(),
        "emitted FHIR is invalid:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The JSON body of a FHIR response, after checking its content type.
pub async fn fhir_body(res: reqwest::Response) -> serde_json::Value {
    let ct = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(ct, "application/fhir+json; charset=utf-8");
    res.json().await.expect("JSON body")
}

/// Everything SQLite wrote for a test app: the database file and its write-ahead log.
pub fn sqlite_bytes(app: &TestApp) -> Vec<u8> {
    let path = app
        .database_url
        .expose()
        .trim_start_matches("sqlite://")
        .to_owned();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend(std::fs::read(format!("{path}-wal")).unwrap_or_default());
    bytes
}

/// Whether `needle` occurs in `bytes`.
pub fn contains(bytes: &[u8], needle: &str) -> bool {
    bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
}
