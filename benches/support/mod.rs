//! What the benches share: the database they run on (SQLite in a temp folder, or a fresh
//! PostgreSQL database) and the process's peak RSS.
#![allow(dead_code)]

use std::path::Path;

pub mod client;

/// The database the gateway runs on for this bench: a SQLite file in the temp working
/// directory, or a fresh PostgreSQL database on the server `FHIRGATE_BENCH_DATABASE_URL` names.
pub struct BenchDatabase {
    pub url: String,
    /// For PostgreSQL: the server's URL and the database to drop at the end.
    pub postgres: Option<(String, String)>,
}

impl BenchDatabase {
    pub async fn create(workdir: &Path) -> Self {
        match std::env::var("FHIRGATE_BENCH_DATABASE_URL")
            .ok()
            .filter(|u| !u.is_empty())
        {
            Some(admin_url) => {
                let name = format!("fhirgate_bench_{}", uuid::Uuid::new_v4().simple());
                let admin = sqlx::PgPool::connect(&admin_url)
                    .await
                    .expect("FHIRGATE_BENCH_DATABASE_URL reaches a PostgreSQL server");
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&admin)
                    .await
                    .expect("create the bench database");
                admin.close().await;
                let mut url = reqwest::Url::parse(&admin_url)
                    .expect("FHIRGATE_BENCH_DATABASE_URL is a valid URL");
                url.set_path(&format!("/{name}"));
                Self {
                    url: url.to_string(),
                    postgres: Some((admin_url, name)),
                }
            }
            None => Self {
                url: format!("sqlite://{}/bench.db", workdir.display()),
                postgres: None,
            },
        }
    }

    pub fn backend(&self) -> &'static str {
        match self.postgres {
            Some(_) => "postgres",
            None => "sqlite",
        }
    }

    /// On a PostgreSQL server whose autovacuum is off (this machine's is), the bench plays its
    /// part: `ANALYZE` now and every `every` until the returned task is aborted. Without statistics
    /// the planner takes the fresh tables for empty and picks plans that crawl once they fill
    /// (an identifier search took 35 s at 5,000 patients); a server with autovacuum on, the
    /// default, analyzes them by itself. None on SQLite or with autovacuum on.
    #[allow(dead_code)] // Not every bench runs long enough to need it.
    pub async fn stand_in_for_autovacuum(
        &self,
        every: std::time::Duration,
    ) -> Option<tokio::task::JoinHandle<()>> {
        self.postgres.as_ref()?;
        let pool = sqlx::PgPool::connect(&self.url).await.ok()?;
        let on: String = sqlx::query_scalar("SHOW autovacuum")
            .fetch_one(&pool)
            .await
            .ok()?;
        if on == "on" {
            pool.close().await;
            return None;
        }
        eprintln!(
            "bench: this PostgreSQL has autovacuum off; the bench runs ANALYZE every {every:?}"
        );
        Some(tokio::spawn(async move {
            loop {
                if let Err(err) = sqlx::query("ANALYZE").execute(&pool).await {
                    eprintln!("bench: ANALYZE failed: {err}");
                }
                tokio::time::sleep(every).await;
            }
        }))
    }

    /// Drops the PostgreSQL database (the server has closed its pool by now); a SQLite file
    /// goes with the temp working directory.
    pub async fn drop_database(self) {
        if let Some((admin_url, name)) = &self.postgres {
            match sqlx::PgPool::connect(admin_url).await {
                Ok(admin) => {
                    let dropped =
                        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                            .execute(&admin)
                            .await;
                    if let Err(err) = dropped {
                        eprintln!("gateway bench: cannot drop database {name}: {err}");
                    }
                    admin.close().await;
                }
                Err(err) => eprintln!("gateway bench: cannot drop database {name}: {err}"),
            }
        }
    }
}

/// Resets the kernel's peak-RSS counter (VmHWM) to the current RSS; false when not allowed.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// VmHWM from /proc/self/status, in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// The `[claims]` settings of a bench gateway: the shipped rules, wherever the bench runs from
/// (the benches work in a temp directory, where the default relative `config` is not).
#[allow(dead_code)] // Not every bench builds a gateway.
pub fn claims_settings() -> String {
    format!(
        "[claims]\nrules_dir = '{}/config'\n",
        env!("CARGO_MANIFEST_DIR")
    )
}
