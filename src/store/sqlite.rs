//! SQLite backend: the embedded default. One file, WAL journal, foreign keys on. There is no
//! row-level security here; tenancy is enforced by the queries themselves (every tenant query
//! filters on practice_id).

use std::str::FromStr;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, SqlitePool};

use super::connections::shared_connection_sql;
use super::export::shared_export_sql;
use super::inbox::shared_inbox_sql;
use super::jobs::shared_job_sql;
use super::migrations::{MigrationStatus, SQLITE};
use super::outbox::shared_outbox_sql;
use super::resources::shared_resource_sql;
use super::{
    key_columns, now, retention_floor, AuditQuery, Backend, PoolOptions, PoolStats, ResourceQuery,
    ResourceWrite, SealedVersion, Store, StoreError, StoredVersion, AUDIT_COLUMNS, AUDIT_FILTER,
    CLIENT_COLUMNS,
};
use crate::audit::{AuditRecord, NewAuditEvent, SYSTEM_CHAIN};
use crate::domain::{new_resource_id, NewPractice, Practice, ResourceId};
use crate::gate::{ApiClient, ClientKeys, ClientStatus, NewApiClient};

pub struct SqliteStore {
    pool: SqlitePool,
    max: u32,
    /// SQLite has one writer at a time. Writers queue here, in order, instead of contending
    /// for the database lock through the busy handler's sleep-and-retry (which costs tail
    /// latency under concurrent writes).
    writer: tokio::sync::Mutex<()>,
    /// How long a writer waits for its turn (the pool's acquire timeout).
    turn_timeout: std::time::Duration,
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
            writer: tokio::sync::Mutex::new(()),
            turn_timeout: options.acquire_timeout,
        })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// A transaction for one practice's work. SQLite has no row-level security: every query
    /// filters on the practice itself.
    async fn begin_for(
        &self,
        _practice: &ResourceId,
    ) -> Result<sqlx::Transaction<'static, Sqlite>, StoreError> {
        Ok(self.pool.begin().await?)
    }

    /// Nothing to remember: SQLite appends under its single writer's turn, with no head lock to
    /// avoid (PostgreSQL's store keeps them for its unlocked appends).
    fn heads_moved(&self, _heads: std::collections::HashMap<String, (i64, Vec<u8>)>) {}

    /// SQLite has no notifications between processes: dispatchers poll.
    async fn outbox_wakeups(&self) -> Result<Option<tokio::sync::mpsc::Receiver<()>>, StoreError> {
        Ok(None)
    }

    /// Waits for this process's turn to write (see `writer`), at most the acquire timeout:
    /// then the database is busy (503), as when no pooled connection comes free in time.
    /// Unbounded, a lock held by another process made each queued writer wait out the busy
    /// timeout of every writer ahead of it (seconds times the queue's length).
    async fn write_turn(&self) -> Result<Option<tokio::sync::MutexGuard<'_, ()>>, StoreError> {
        tokio::time::timeout(self.turn_timeout, self.writer.lock())
            .await
            .map(Some)
            .map_err(|_| StoreError::Unavailable("no turn to write in time".into()))
    }
}

shared_resource_sql!(SqliteStore, Sqlite, sqlx::sqlite::SqliteRow, "");
shared_export_sql!(SqliteStore, Sqlite, sqlx::sqlite::SqliteRow);
shared_connection_sql!(SqliteStore, Sqlite, sqlx::sqlite::SqliteRow);
shared_job_sql!(SqliteStore, Sqlite, sqlx::sqlite::SqliteRow);
shared_outbox_sql!(SqliteStore, Sqlite, sqlx::sqlite::SqliteRow, "", "", "");
shared_inbox_sql!(SqliteStore, Sqlite, sqlx::sqlite::SqliteRow, "", "");

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

fn client_from(row: &SqliteRow) -> Result<ApiClient, sqlx::Error> {
    let role: String = row.try_get("role")?;
    let status: String = row.try_get("status")?;
    Ok(ApiClient {
        client_id: row.try_get("client_id")?,
        practice_id: ResourceId::from_trusted(row.try_get("practice_id")?),
        name: row.try_get("name")?,
        role: ApiClient::role_from_db(&role),
        scope: row.try_get("scopes")?,
        jwks: row.try_get("jwks")?,
        jwks_url: row.try_get("jwks_url")?,
        status: if status == "active" {
            ClientStatus::Active
        } else {
            ClientStatus::Disabled
        },
        created_at: row.try_get("created_at")?,
    })
}

fn audit_from(row: &SqliteRow) -> Result<AuditRecord, sqlx::Error> {
    Ok(AuditRecord {
        id: row.try_get("id")?,
        chain: row.try_get("chain")?,
        chain_seq: row.try_get("chain_seq")?,
        recorded_at: row.try_get("recorded_at")?,
        practice_id: row.try_get("practice_id")?,
        action: row.try_get("action")?,
        outcome: row.try_get("outcome")?,
        status_code: row.try_get("status_code")?,
        actor_client_id: row.try_get("actor_client_id")?,
        actor_role: row.try_get("actor_role")?,
        resource_type: row.try_get("resource_type")?,
        resource_id: row.try_get("resource_id")?,
        patient_id: row.try_get("patient_id")?,
        source_ip: row.try_get("source_ip")?,
        user_agent: row.try_get("user_agent")?,
        request_id: row.try_get("request_id")?,
        purpose_of_use: row.try_get("purpose_of_use")?,
        connection_id: row.try_get("connection_id")?,
        duration_ms: row.try_get("duration_ms")?,
        prev_hash: row.try_get("prev_hash")?,
        hash: row.try_get("hash")?,
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

    async fn create_client(&self, new: &NewApiClient) -> Result<ApiClient, StoreError> {
        let client_id = uuid::Uuid::new_v4().to_string();
        let (jwks, jwks_url) = key_columns(&new.keys);
        let now = now();
        sqlx::query(
            "INSERT INTO api_clients (client_id, practice_id, name, role, scopes, jwks, jwks_url,
                                      status, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'active', ?8, ?8)",
        )
        .bind(&client_id)
        .bind(new.practice_id.as_str())
        .bind(&new.name)
        .bind(new.role.as_str())
        .bind(new.scopes.to_string())
        .bind(jwks)
        .bind(jwks_url)
        .bind(now)
        .execute(&self.pool)
        .await?;
        self.get_client(&client_id).await
    }

    async fn get_client(&self, client_id: &str) -> Result<ApiClient, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {CLIENT_COLUMNS} FROM api_clients WHERE client_id = ?1"
        ))
        .bind(client_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(client_from(&row)?)
    }

    async fn list_clients(
        &self,
        practice: Option<&ResourceId>,
    ) -> Result<Vec<ApiClient>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {CLIENT_COLUMNS} FROM api_clients
             WHERE ?1 IS NULL OR practice_id = ?1 ORDER BY created_at, client_id"
        ))
        .bind(practice.map(ResourceId::as_str))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(client_from).collect::<Result<_, _>>()?)
    }

    async fn set_client_status(
        &self,
        client_id: &str,
        status: ClientStatus,
    ) -> Result<ApiClient, StoreError> {
        let done =
            sqlx::query("UPDATE api_clients SET status = ?1, updated_at = ?2 WHERE client_id = ?3")
                .bind(status.as_str())
                .bind(now())
                .bind(client_id)
                .execute(&self.pool)
                .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        self.get_client(client_id).await
    }

    async fn set_client_keys(
        &self,
        client_id: &str,
        keys: &ClientKeys,
    ) -> Result<ApiClient, StoreError> {
        let (jwks, jwks_url) = key_columns(keys);
        let done = sqlx::query(
            "UPDATE api_clients SET jwks = ?1, jwks_url = ?2, updated_at = ?3 WHERE client_id = ?4",
        )
        .bind(jwks)
        .bind(jwks_url)
        .bind(now())
        .bind(client_id)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        self.get_client(client_id).await
    }

    async fn remember_assertion(
        &self,
        practice: &ResourceId,
        client_id: &str,
        jti: &str,
        expires_at: u64,
    ) -> Result<bool, StoreError> {
        let now = crate::gate::access_token::unix_now() as i64;
        let _turn = self.write_turn().await?;
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM client_assertions WHERE expires_at < ?1")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let inserted = sqlx::query(
            "INSERT INTO client_assertions (practice_id, client_id, jti, expires_at)
             VALUES (?1, ?2, ?3, ?4) ON CONFLICT (client_id, jti) DO NOTHING",
        )
        .bind(practice.as_str())
        .bind(client_id)
        .bind(jti)
        .bind(i64::try_from(expires_at).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(inserted == 1)
    }

    async fn append_audit_at(
        &self,
        events: &[NewAuditEvent],
        at: time::OffsetDateTime,
    ) -> Result<usize, StoreError> {
        if events.is_empty() {
            return Ok(0);
        }
        let _turn = self.write_turn().await?;
        let mut tx = self.pool.begin().await?;
        self.append_audit_in(&mut tx, events, at).await?;
        tx.commit().await?;
        Ok(events.len())
    }

    async fn audit_chains(&self) -> Result<Vec<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT DISTINCT chain FROM audit_events ORDER BY chain")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    async fn audit_chain_page(
        &self,
        chain: &str,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_events WHERE chain = ?1 AND chain_seq > ?2
             ORDER BY chain_seq LIMIT ?3"
        ))
        .bind(chain)
        .bind(after_seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(audit_from).collect::<Result<_, _>>()?)
    }

    async fn audit_export_page(
        &self,
        practice: &ResourceId,
        since: time::OffsetDateTime,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_events
             WHERE chain = ?1 AND chain_seq > ?2 AND recorded_at >= ?3
             ORDER BY chain_seq LIMIT ?4"
        ))
        .bind(practice.as_str())
        .bind(after_seq)
        .bind(since)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(audit_from).collect::<Result<_, _>>()?)
    }

    async fn get_audit_event(
        &self,
        practice: &ResourceId,
        id: &str,
    ) -> Result<AuditRecord, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_events WHERE chain = ?1 AND id = ?2"
        ))
        .bind(practice.as_str())
        .bind(id)
        .fetch_one(&self.pool)
        .await?;
        Ok(audit_from(&row)?)
    }

    async fn search_audit(&self, q: &AuditQuery) -> Result<(Vec<AuditRecord>, i64), StoreError> {
        let filter = AUDIT_FILTER;
        let total: i64 =
            sqlx::query_scalar(&format!("SELECT count(*) FROM audit_events WHERE {filter}"))
                .bind(q.practice.as_str())
                .bind(q.since)
                .bind(q.until)
                .bind(&q.patient)
                .bind(&q.agent)
                .bind(&q.actions)
                .fetch_one(&self.pool)
                .await?;
        let rows = sqlx::query(&format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_events WHERE {filter} AND chain_seq > ?7
             ORDER BY chain_seq LIMIT ?8"
        ))
        .bind(q.practice.as_str())
        .bind(q.since)
        .bind(q.until)
        .bind(&q.patient)
        .bind(&q.agent)
        .bind(&q.actions)
        .bind(q.after_seq)
        .bind(q.limit)
        .fetch_all(&self.pool)
        .await?;
        Ok((
            rows.iter().map(audit_from).collect::<Result<_, _>>()?,
            total,
        ))
    }

    async fn audit_checkpoint(&self, chain: &str) -> Result<Option<(i64, Vec<u8>)>, StoreError> {
        let row =
            sqlx::query("SELECT through_seq, through_hash FROM audit_purges WHERE chain = ?1")
                .bind(chain)
                .fetch_optional(&self.pool)
                .await?;
        Ok(match row {
            Some(row) => Some((row.try_get("through_seq")?, row.try_get("through_hash")?)),
            None => None,
        })
    }

    async fn purge_audit(
        &self,
        before: time::OffsetDateTime,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        if before > retention_floor(now()) {
            return Err(StoreError::Conflict(
                "audit events younger than six years cannot be purged",
            ));
        }
        let mut purged = Vec::new();
        for chain in self.audit_chains().await? {
            let mut tx = self.pool.begin().await?;
            // The purgeable prefix ends just before the chain's first event at or after `before`.
            let first_young: Option<i64> = sqlx::query_scalar(
                "SELECT min(chain_seq) FROM audit_events WHERE chain = ?1 AND recorded_at >= ?2",
            )
            .bind(&chain)
            .bind(before)
            .fetch_one(&mut *tx)
            .await?;
            let last_old: Option<i64> = sqlx::query_scalar(
                "SELECT max(chain_seq) FROM audit_events WHERE chain = ?1 AND chain_seq < ?2",
            )
            .bind(&chain)
            .bind(first_young.unwrap_or(i64::MAX))
            .fetch_one(&mut *tx)
            .await?;
            let Some(through) = last_old else {
                continue;
            };
            let hash: Vec<u8> = sqlx::query_scalar(
                "SELECT hash FROM audit_events WHERE chain = ?1 AND chain_seq = ?2",
            )
            .bind(&chain)
            .bind(through)
            .fetch_one(&mut *tx)
            .await?;
            let practice = (chain != SYSTEM_CHAIN).then_some(chain.as_str());
            sqlx::query(
                "INSERT INTO audit_purges (chain, practice_id, through_seq, through_hash, purged_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (chain) DO UPDATE SET through_seq = excluded.through_seq,
                     through_hash = excluded.through_hash, purged_at = excluded.purged_at",
            )
            .bind(&chain)
            .bind(practice)
            .bind(through)
            .bind(&hash)
            .bind(now())
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM audit_events WHERE chain = ?1 AND chain_seq <= ?2")
                .bind(&chain)
                .bind(through)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            purged.push((chain, through));
        }
        Ok(purged)
    }

    async fn write_resources_with_claims(
        &self,
        practice: &ResourceId,
        writes: &[ResourceWrite],
        audit: &[NewAuditEvent],
        claims: super::ClaimEffects<'_>,
    ) -> Result<(), StoreError> {
        self.shared_write_resources(practice, writes, audit, claims, None)
            .await
    }

    async fn write_pulled_resources(
        &self,
        practice: &ResourceId,
        writes: &[ResourceWrite],
        audit: &[NewAuditEvent],
        digests: super::SyncDigests<'_>,
    ) -> Result<(), StoreError> {
        let claims = super::ClaimEffects::default();
        self.shared_write_resources(practice, writes, audit, claims, Some(&digests))
            .await
    }

    async fn head_versions(
        &self,
        practice: &ResourceId,
        resource_type: &str,
        ids: &[String],
    ) -> Result<std::collections::HashMap<String, i64>, StoreError> {
        self.shared_head_versions(practice, resource_type, ids)
            .await
    }

    async fn read_resource(
        &self,
        practice: &ResourceId,
        resource_type: &str,
        id: &str,
        version: Option<i64>,
    ) -> Result<Option<StoredVersion>, StoreError> {
        self.shared_read_resource(practice, resource_type, id, version)
            .await
    }

    async fn resource_history(
        &self,
        practice: &ResourceId,
        resource_type: &str,
        id: &str,
        before_version: Option<i64>,
        limit: i64,
    ) -> Result<(Vec<StoredVersion>, i64), StoreError> {
        self.shared_resource_history(practice, resource_type, id, before_version, limit)
            .await
    }

    async fn search_resources(
        &self,
        query: &ResourceQuery,
    ) -> Result<Vec<StoredVersion>, StoreError> {
        self.shared_search_resources(query).await
    }

    async fn count_resources(&self, query: &ResourceQuery) -> Result<i64, StoreError> {
        self.shared_count_resources(query).await
    }

    async fn crypto_setting(&self, name: &str, default: &str) -> Result<String, StoreError> {
        self.shared_crypto_setting(name, default).await
    }

    async fn sealed_not_under(
        &self,
        active_key: &str,
        limit: i64,
    ) -> Result<Vec<SealedVersion>, StoreError> {
        self.shared_sealed_not_under(active_key, limit).await
    }

    async fn sealed_key_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.shared_sealed_key_counts().await
    }

    async fn reseal(
        &self,
        resealed: &[(SealedVersion, String, Vec<u8>)],
    ) -> Result<u64, StoreError> {
        self.shared_reseal(resealed).await
    }

    fn exports(&self) -> &dyn super::ExportStore {
        self
    }

    fn connections(&self) -> &dyn super::ConnectionStore {
        self
    }

    fn jobs(&self) -> &dyn super::JobStore {
        self
    }

    fn outbox(&self) -> &dyn super::OutboxStore {
        self
    }

    fn inbox(&self) -> &dyn super::InboxStore {
        self
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}
