//! SQLite backend: the embedded default. One file, WAL journal, foreign keys on. There is no
//! row-level security here; tenancy is enforced by the queries themselves (every tenant query
//! filters on practice_id).

use std::str::FromStr;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};

use super::migrations::{MigrationStatus, SQLITE};
use super::{now, Backend, PoolOptions, PoolStats, Store, StoreError};
use crate::domain::{new_resource_id, NewPractice, Practice, ResourceId};

pub struct SqliteStore {
    pool: SqlitePool,
    max: u32,
}

impl SqliteStore {
    pub async fn connect(url: &str, options: &PoolOptions) -> Result<Self, StoreError> {
        let connect = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Unavailable(format!("invalid sqlite URL: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(options.acquire_timeout);
        let file = connect.get_filename();
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {}", dir.display(), e.kind()))
            })?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await?;
        Ok(Self {
            pool,
            max: options.max_connections,
        })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

fn practice_from(row: &SqliteRow) -> Result<Practice, sqlx::Error> {
    Ok(Practice {
        id: ResourceId::from_trusted(row.try_get("id")?),
        name: row.try_get("name")?,
        timezone: row.try_get("timezone")?,
        npi: row.try_get("npi")?,
        tax_id: row.try_get("tax_id")?,
        created_at: row.try_get("created_at")?,
    })
}

const PRACTICE_COLUMNS: &str = "id, name, timezone, npi, tax_id, created_at";

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    fn pool_stats(&self) -> PoolStats {
        PoolStats {
            size: self.pool.size(),
            idle: self.pool.num_idle() as u32,
            max: self.max,
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        SQLITE.migrator().await?.run(&self.pool).await?;
        Ok(())
    }

    async fn migration_status(&self) -> Result<MigrationStatus, StoreError> {
        let applied: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success = 1")
                .fetch_all(&self.pool)
                .await
                .or_else(|e| match e {
                    // No migration table yet: nothing applied.
                    sqlx::Error::Database(ref db) if db.message().contains("no such table") => {
                        Ok(Vec::new())
                    }
                    other => Err(other),
                })?;
        Ok(MigrationStatus::new(&SQLITE, applied))
    }

    async fn create_practice(&self, new: &NewPractice) -> Result<Practice, StoreError> {
        let practice = Practice {
            id: new_resource_id(),
            name: new.name.as_str().to_owned(),
            timezone: new.timezone.as_str().to_owned(),
            npi: new.npi.as_ref().map(|n| n.as_str().to_owned()),
            tax_id: new.tax_id.as_ref().map(|t| t.as_str().to_owned()),
            created_at: now(),
        };
        sqlx::query(
            "INSERT INTO practices (id, name, timezone, npi, tax_id, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
        )
        .bind(practice.id.as_str())
        .bind(&practice.name)
        .bind(&practice.timezone)
        .bind(&practice.npi)
        .bind(&practice.tax_id)
        .bind(practice.created_at)
        .execute(&self.pool)
        .await?;
        Ok(practice)
    }

    async fn get_practice(&self, id: &ResourceId) -> Result<Practice, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {PRACTICE_COLUMNS} FROM practices WHERE id = ?1"
        ))
        .bind(id.as_str())
        .fetch_one(&self.pool)
        .await?;
        Ok(practice_from(&row)?)
    }

    async fn list_practices(&self) -> Result<Vec<Practice>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {PRACTICE_COLUMNS} FROM practices ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(practice_from).collect::<Result<_, _>>()?)
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}
