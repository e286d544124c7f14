//! PostgreSQL backend: production and multi-instance. Every tenant table has row-level security
//! (migrations/postgres); tenant-scoped transactions begin with [`PgStore::begin_tenant`], which
//! switches to the `fhirgate_tenant` role and sets `fhirgate.practice_id` for that transaction
//! only, so a query that forgets its practice filter still sees nothing of another practice.

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgPool, Postgres, Row, Transaction};

use super::migrations::{MigrationStatus, POSTGRES};
use super::{now, Backend, PoolOptions, PoolStats, Store, StoreError};
use crate::domain::{new_resource_id, NewPractice, Practice, ResourceId};

pub struct PgStore {
    pool: PgPool,
    max: u32,
}

impl PgStore {
    pub async fn connect(url: &str, options: &PoolOptions) -> Result<Self, StoreError> {
        let connect: PgConnectOptions = url
            .parse()
            .map_err(|e| StoreError::Unavailable(format!("invalid postgres URL: {e}")))?;
        let connect = connect.application_name("fhirgate");
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await?;
        Ok(Self {
            pool,
            max: options.max_connections,
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Begins a transaction confined to one practice by row-level security: one round trip sets
    /// the role and the practice id, both reverting at commit or rollback.
    pub async fn begin_tenant(
        &self,
        practice: &ResourceId,
    ) -> Result<Transaction<'static, Postgres>, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "SELECT set_config('role', 'fhirgate_tenant', true),
                    set_config('fhirgate.practice_id', $1, true)",
        )
        .bind(practice.as_str())
        .execute(&mut *tx)
        .await?;
        Ok(tx)
    }
}

fn practice_from(row: &PgRow) -> Result<Practice, sqlx::Error> {
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
impl Store for PgStore {
    fn backend(&self) -> Backend {
        Backend::Postgres
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
        // sqlx takes a PostgreSQL advisory lock, so concurrent instances migrate once.
        POSTGRES.migrator().await?.run(&self.pool).await?;
        Ok(())
    }

    async fn migration_status(&self) -> Result<MigrationStatus, StoreError> {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(&self.pool)
            .await?;
        let applied = if exists {
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&self.pool)
                .await?
        } else {
            Vec::new()
        };
        Ok(MigrationStatus::new(&POSTGRES, applied))
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
             VALUES ($1, $2, $3, $4, $5, $6, $6)",
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
            "SELECT {PRACTICE_COLUMNS} FROM practices WHERE id = $1"
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
