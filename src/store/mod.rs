//! Storage behind one narrow trait, with one sqlx implementation per backend (SQLite for the
//! embedded default, PostgreSQL for production), chosen from the database URL's scheme.
//! Errors never carry row values (they may be PHI): only what kind of failure happened.

pub(crate) mod connections;
pub(crate) mod export;
pub(crate) mod inbox;
pub(crate) mod jobs;
mod migrations;
pub(crate) mod outbox;
mod postgres;
mod resources;
mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::audit::{AuditRecord, NewAuditEvent};
use crate::config::DatabaseUrl;
use crate::domain::{NewPractice, Practice, ResourceId};
use crate::gate::{ApiClient, ClientKeys, ClientStatus, NewApiClient};

pub(crate) use connections::CONNECTION_COLUMNS;
pub use connections::{ConnectionStore, NewConnection, StoredConnection};
pub use export::{
    ExportCursor, ExportEnd, ExportFile, ExportJob, ExportLevel, ExportQuery, ExportScope,
    ExportStatus, ExportStep, ExportStore, NewExportJob, SealedChunk,
};
pub use inbox::{
    Accepted, ClaimedEvent, InboxAccept, InboxEntry, InboxKind, InboxStore, NewInboxEvent,
    SequenceMark,
};
pub(crate) use jobs::JOB_COLUMNS;
pub use jobs::{
    JobRun, JobStore, NewJobRun, QuarantineRow, QuarantinedRecord, RunCounts, SyncDigests,
};
pub use migrations::MigrationStatus;
pub use outbox::{
    ClaimEffects, ClaimState, ClaimStatusChange, ClaimTransition, DeadLetter, NewOutboxRow,
    OutboxRow, OutboxStore, PushSource, Transitioned,
};
pub use postgres::PgStore;
pub use resources::{
    Bound, CmpOp, Cond, Expect, IndexMatch, IndexRow, ResourceQuery, ResourceWrite, SealedVersion,
    SortKey, StoredVersion,
};
pub(crate) use resources::{INDEX_INSERT_CHUNK, ROW_INSERT_CHUNK, VERSION_COLUMNS};
pub use sqlite::SqliteStore;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// How a durable queue stands for one EHR connection (the claim-status outbox, the webhook
/// inbox, the quarantine): what `/metrics` exports and `/readyz` checks for a stuck queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueStat {
    pub connection_id: String,
    /// Rows waiting (pending or being retried; not dead, not done).
    pub depth: i64,
    /// When the oldest waiting row was written (`None` when `depth` is 0).
    pub oldest_pending_at: Option<time::OffsetDateTime>,
}

/// Connection pool figures for `/metrics`.
#[derive(Debug, Clone, Copy)]
pub struct PoolStats {
    pub size: u32,
    pub idle: u32,
    pub max: u32,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("conflict: {0}")]
    Conflict(&'static str),
    /// A resource write found another version than it expected (write `index` of the batch):
    /// someone else wrote first, or the resource exists / does not exist.
    #[error("version conflict in write {index}")]
    VersionConflict { index: usize },
    /// The database cannot be reached or no connection was free in time: callers answer 503.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("migration failed: {0}")]
    Migration(String),
    #[error("database error: {0}")]
    Database(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        match err {
            sqlx::Error::RowNotFound => StoreError::NotFound,
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
                StoreError::Unavailable("no database connection available in time".into())
            }
            sqlx::Error::Io(e) => StoreError::Unavailable(format!("i/o: {}", e.kind())),
            sqlx::Error::Tls(_) => StoreError::Unavailable("tls handshake failed".into()),
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                StoreError::Conflict("a row with the same key exists")
            }
            sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
                StoreError::Conflict("a referenced row does not exist")
            }
            // PostgreSQL deadlock_detected and serialization_failure: the transaction was rolled
            // back and may be retried.
            sqlx::Error::Database(db)
                if matches!(db.code().as_deref(), Some("40P01" | "40001")) =>
            {
                StoreError::Unavailable("a concurrent transaction conflicted; retry".into())
            }
            // The server going away or not taking connections (class 08 connection_exception,
            // 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now, 53300
            // too_many_connections): what a PostgreSQL restart says to the connections it
            // ends. These were 500s ("database error") while the same outage seen as a reset
            // socket was a 503.
            sqlx::Error::Database(db)
                if db
                    .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                    .is_some()
                    && db.code().is_some_and(|c| {
                        c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03" | "53300")
                    }) =>
            {
                StoreError::Unavailable("the database server is unavailable".into())
            }
            // SQLITE_BUSY / SQLITE_LOCKED (and their extended codes, BUSY_SNAPSHOT included):
            // another connection or process held the lock past the busy timeout. The database
            // is there but busy: retry later (503), not a fault of ours (500).
            sqlx::Error::Database(db)
                if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some()
                    && db
                        .code()
                        .and_then(|c| c.parse::<i32>().ok())
                        .is_some_and(|c| matches!(c & 0xff, 5 | 6)) =>
            {
                StoreError::Unavailable("the database is locked; retry".into())
            }
            // Only the database's message and code: PostgreSQL puts row values in `detail`,
            // which is deliberately left out.
            sqlx::Error::Database(db) => StoreError::Database(format!(
                "{} ({})",
                db.message(),
                db.code().unwrap_or_default()
            )),
            other => StoreError::Database(other.to_string()),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(err: sqlx::migrate::MigrateError) -> Self {
        match err {
            sqlx::migrate::MigrateError::Execute(e) => match StoreError::from(e) {
                StoreError::Unavailable(m) => StoreError::Unavailable(m),
                other => StoreError::Migration(other.to_string()),
            },
            other => StoreError::Migration(other.to_string()),
        }
    }
}

/// Pool options shared by both backends.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
}

/// Everything the gateway asks of its database. Each method is one unit of work (one
/// transaction where it writes).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    fn backend(&self) -> Backend;
    fn pool_stats(&self) -> PoolStats;

    /// Round trip to the database.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Server settings that will hurt the gateway, each as a fixed sentence for the operator's
    /// log (checked once at start-up). Empty when all is well or the backend has none to check.
    async fn server_warnings(&self) -> Vec<&'static str> {
        Vec::new()
    }
    /// Applies pending migrations; safe to call from several instances at once.
    async fn migrate(&self) -> Result<(), StoreError>;
    /// Which embedded migrations are applied.
    async fn migration_status(&self) -> Result<MigrationStatus, StoreError>;

    async fn create_practice(&self, new: &NewPractice) -> Result<Practice, StoreError>;
    async fn get_practice(&self, id: &ResourceId) -> Result<Practice, StoreError>;
    async fn list_practices(&self) -> Result<Vec<Practice>, StoreError>;

    async fn create_client(&self, new: &NewApiClient) -> Result<ApiClient, StoreError>;
    async fn get_client(&self, client_id: &str) -> Result<ApiClient, StoreError>;
    /// Clients of one practice, or of all practices.
    async fn list_clients(
        &self,
        practice: Option<&ResourceId>,
    ) -> Result<Vec<ApiClient>, StoreError>;
    async fn set_client_status(
        &self,
        client_id: &str,
        status: ClientStatus,
    ) -> Result<ApiClient, StoreError>;
    /// Replaces a client's key set (key rotation).
    async fn set_client_keys(
        &self,
        client_id: &str,
        keys: &ClientKeys,
    ) -> Result<ApiClient, StoreError>;
    /// Records a client assertion's `jti` until `expires_at` (unix seconds); `false` when it was
    /// seen before (a replay). Expired entries are purged on the way.
    async fn remember_assertion(
        &self,
        practice: &ResourceId,
        client_id: &str,
        jti: &str,
        expires_at: u64,
    ) -> Result<bool, StoreError>;

    /// Appends events to their practices' hash chains in one transaction (heads locked in a
    /// fixed order, so concurrent writers cannot deadlock or fork a chain).
    async fn append_audit(&self, events: &[NewAuditEvent]) -> Result<usize, StoreError> {
        self.append_audit_at(events, now()).await
    }
    /// [`Store::append_audit`] with an explicit time (imports, and tests of retention).
    async fn append_audit_at(
        &self,
        events: &[NewAuditEvent],
        at: time::OffsetDateTime,
    ) -> Result<usize, StoreError>;
    /// Where verification of `chain` starts: the last purged event's (sequence, hash), if any.
    async fn audit_checkpoint(&self, chain: &str) -> Result<Option<(i64, Vec<u8>)>, StoreError>;
    /// Deletes, from the start of every chain, the events recorded before `before`, leaving a
    /// checkpoint; refuses a `before` less than six years ago. Returns (chain, purged through seq).
    async fn purge_audit(
        &self,
        before: time::OffsetDateTime,
    ) -> Result<Vec<(String, i64)>, StoreError>;
    /// Every chain that has events.
    async fn audit_chains(&self) -> Result<Vec<String>, StoreError>;
    /// Up to `limit` events of `chain` after `after_seq`, in chain order.
    async fn audit_chain_page(
        &self,
        chain: &str,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>, StoreError>;
    /// Up to `limit` events of a practice recorded at or after `since`, in chain order after
    /// `after_seq` (for paging an export).
    async fn audit_export_page(
        &self,
        practice: &ResourceId,
        since: time::OffsetDateTime,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>, StoreError>;

    /// One audit event of a practice (another practice's event is `NotFound`).
    async fn get_audit_event(
        &self,
        practice: &ResourceId,
        id: &str,
    ) -> Result<AuditRecord, StoreError>;
    /// Audit events of one practice matching `query`, in chain order, with the total count.
    async fn search_audit(&self, query: &AuditQuery)
        -> Result<(Vec<AuditRecord>, i64), StoreError>;

    /// Writes new versions of resources of one practice and their audit events in one
    /// transaction: all or nothing. A write whose [`Expect`] does not hold fails the whole batch
    /// with [`StoreError::VersionConflict`].
    async fn write_resources(
        &self,
        practice: &ResourceId,
        writes: &[ResourceWrite],
        audit: &[NewAuditEvent],
    ) -> Result<(), StoreError> {
        self.write_resources_with_claims(practice, writes, audit, ClaimEffects::default())
            .await
    }
    /// [`Store::write_resources`], with what the writes change of claims committed in the same
    /// transaction: lifecycle statuses (a prepared claim, a ClaimResponse's answer) and
    /// claim-status outbox rows (a ClaimResponse written through the FHIR API reports a
    /// claim's new status). A lifecycle change that no longer holds fails the whole write with
    /// [`StoreError::Conflict`].
    ///
    /// Why lists carried with the write rather than a transaction handle: the resource write
    /// is one method of one backend's SQL, taking its own transaction, and every other caller
    /// (pulls, bulk writes) has nothing to add. The effects ride along as plain data, the
    /// method applies them after the versions and before the audit events, and
    /// `write_resources` is this method with none, so no other caller changes.
    async fn write_resources_with_claims(
        &self,
        practice: &ResourceId,
        writes: &[ResourceWrite],
        audit: &[NewAuditEvent],
        claims: ClaimEffects<'_>,
    ) -> Result<(), StoreError>;
    /// [`Store::write_resources`] for a pull: the digests of what it wrote (`sync_digests`, by
    /// which the next pull knows a resource unchanged) commit in the same transaction. Apart, a
    /// process killed between the two commits left a resource without its digest, and the next
    /// pull (or webhook event) of it wrote it again, unchanged, as a new version.
    async fn write_pulled_resources(
        &self,
        practice: &ResourceId,
        writes: &[ResourceWrite],
        audit: &[NewAuditEvent],
        digests: SyncDigests<'_>,
    ) -> Result<(), StoreError>;
    /// The head version of each of `ids` that exists in the practice (deleted or not): what an
    /// update of many resources at once expects.
    async fn head_versions(
        &self,
        practice: &ResourceId,
        resource_type: &str,
        ids: &[String],
    ) -> Result<std::collections::HashMap<String, i64>, StoreError>;
    /// The current version (`version` = None) or one version of a resource of the practice.
    async fn read_resource(
        &self,
        practice: &ResourceId,
        resource_type: &str,
        id: &str,
        version: Option<i64>,
    ) -> Result<Option<StoredVersion>, StoreError>;
    /// Versions of one resource, newest first, below `before_version`; and how many exist.
    async fn resource_history(
        &self,
        practice: &ResourceId,
        resource_type: &str,
        id: &str,
        before_version: Option<i64>,
        limit: i64,
    ) -> Result<(Vec<StoredVersion>, i64), StoreError>;
    /// One page of current, non-deleted resources matching `query`.
    async fn search_resources(
        &self,
        query: &ResourceQuery,
    ) -> Result<Vec<StoredVersion>, StoreError>;
    /// How many resources match `query` (paging ignored).
    async fn count_resources(&self, query: &ResourceQuery) -> Result<i64, StoreError>;
    /// A setting the stored data depends on, recording `default` if none is stored yet.
    async fn crypto_setting(&self, name: &str, default: &str) -> Result<String, StoreError>;
    /// Up to `limit` stored versions sealed under another key than `active_key` (all practices).
    async fn sealed_not_under(
        &self,
        active_key: &str,
        limit: i64,
    ) -> Result<Vec<SealedVersion>, StoreError>;
    /// How many stored versions are sealed under each key id (all practices).
    async fn sealed_key_counts(&self) -> Result<Vec<(String, i64)>, StoreError>;
    /// Replaces sealed contents (each only if still under the key it was read with), in one
    /// transaction; returns how many were replaced.
    async fn reseal(
        &self,
        resealed: &[(SealedVersion, String, Vec<u8>)],
    ) -> Result<u64, StoreError>;

    /// Bulk export jobs and their sealed output.
    fn exports(&self) -> &dyn ExportStore;

    /// EHR connections (outbound).
    fn connections(&self) -> &dyn ConnectionStore;

    /// Job runs (pulls), the quarantine and pull digests.
    fn jobs(&self) -> &dyn JobStore;

    /// Claim statuses and the claim-status outbox with its dead letters.
    fn outbox(&self) -> &dyn OutboxStore;
    /// The webhook inbox (patient-change events waiting for the worker).
    fn inbox(&self) -> &dyn InboxStore;

    /// Closes the pool, waiting for connections in use to be returned.
    async fn close(&self);
}

/// Opens the store the URL names (`sqlite://...` or `postgres://...`).
pub async fn connect(
    url: &DatabaseUrl,
    options: &PoolOptions,
) -> Result<Arc<dyn Store>, StoreError> {
    if url.is_postgres() {
        Ok(Arc::new(PgStore::connect(url.expose(), options).await?))
    } else if url.is_sqlite() {
        Ok(Arc::new(SqliteStore::connect(url.expose(), options).await?))
    } else {
        Err(StoreError::Unavailable(format!(
            "unsupported database URL scheme in {url}"
        )))
    }
}

/// A search of one practice's audit events. `actions` is a comma-separated list (empty: all).
#[derive(Debug, Clone)]
pub struct AuditQuery {
    pub practice: ResourceId,
    /// Inclusive lower bound of `recorded_at`.
    pub since: Option<time::OffsetDateTime>,
    /// Exclusive upper bound of `recorded_at`.
    pub until: Option<time::OffsetDateTime>,
    pub patient: Option<String>,
    pub agent: Option<String>,
    pub actions: Option<String>,
    pub after_seq: i64,
    pub limit: i64,
}

/// The WHERE clause of an audit search, with `?N` placeholders in bind order: practice, since,
/// until, patient, agent, actions.
pub(crate) const AUDIT_FILTER: &str = "chain = ?1
    AND (?2 IS NULL OR recorded_at >= ?2) AND (?3 IS NULL OR recorded_at < ?3)
    AND (?4 IS NULL OR patient_id = ?4) AND (?5 IS NULL OR actor_client_id = ?5)
    AND (?6 IS NULL OR instr(',' || ?6 || ',', ',' || action || ',') > 0)";

/// Splits client keys into the (jwks, jwks_url) columns.
pub(crate) fn key_columns(keys: &ClientKeys) -> (Option<&str>, Option<&str>) {
    match keys {
        ClientKeys::Inline(jwks) => (Some(jwks.as_str()), None),
        ClientKeys::Url(url) => (None, Some(url.as_str())),
    }
}

pub(crate) const CLIENT_COLUMNS: &str =
    "client_id, practice_id, name, role, scopes, jwks, jwks_url, status, created_at";

pub(crate) const AUDIT_COLUMNS: &str = "id, chain, chain_seq, recorded_at, practice_id, action, \
    outcome, status_code, actor_client_id, actor_role, resource_type, resource_id, patient_id, \
    source_ip, user_agent, request_id, purpose_of_use, connection_id, duration_ms, prev_hash, hash";

/// The latest time a purge may reach: six calendar years ago (45 CFR 164.316(b)(2)).
pub fn retention_floor(now: time::OffsetDateTime) -> time::OffsetDateTime {
    let year = now.year() - 6;
    now.replace_year(year)
        .or_else(|_| (now - time::Duration::days(1)).replace_year(year)) // 29 February
        .unwrap_or(now - time::Duration::days(6 * 366))
}

/// Events per multi-row INSERT: 19 parameters each stays under SQLite's 32,766 and
/// PostgreSQL's 65,535 bind parameters.
pub(crate) const AUDIT_INSERT_CHUNK: usize = 500;

/// The chains of a batch, sorted: heads are locked in this order by every writer.
pub(crate) fn chains_of(events: &[NewAuditEvent]) -> Vec<String> {
    let mut chains: Vec<String> = events.iter().map(NewAuditEvent::chain).collect();
    chains.sort_unstable();
    chains.dedup();
    chains
}

/// Chains `events` onto `heads` (chain -> last sequence number and hash), in order, moving each
/// head past its events; every event's chain must have a head.
pub(crate) fn chain_records(
    events: &[NewAuditEvent],
    heads: &mut std::collections::HashMap<String, (i64, Vec<u8>)>,
    at: time::OffsetDateTime,
) -> Result<Vec<AuditRecord>, StoreError> {
    let mut records = Vec::with_capacity(events.len());
    for event in events {
        let head = heads
            .get_mut(&event.chain())
            .ok_or(StoreError::Conflict("audit chain head"))?;
        let r = AuditRecord::next(event, head.0, &head.1, at);
        *head = (r.chain_seq, r.hash.clone());
        records.push(r);
    }
    Ok(records)
}

/// The current time as stored: UTC with microsecond precision (what PostgreSQL keeps), so both
/// backends return the same value for the same write.
pub(crate) fn now() -> time::OffsetDateTime {
    let now = time::OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000 * 1_000)
        .unwrap_or(now)
}

/// Runs `$sql` (`SELECT connection_id, COUNT(*) AS depth, MIN(<time>_us) AS oldest ... GROUP BY
/// connection_id`) on `$pool` and reads its rows as [`QueueStat`]s: one shape for the outbox,
/// the webhook inbox and the quarantine, inside the shared SQL macros of either backend.
macro_rules! fetch_queue_stats {
    ($pool:expr, $sql:expr) => {{
        use sqlx::Row;
        let rows = sqlx::query($sql).fetch_all($pool).await?;
        rows.iter()
            .map(|row| -> Result<$crate::store::QueueStat, sqlx::Error> {
                let oldest: Option<i64> = row.try_get("oldest")?;
                Ok($crate::store::QueueStat {
                    connection_id: row.try_get("connection_id")?,
                    depth: row.try_get("depth")?,
                    oldest_pending_at: oldest.map($crate::store::outbox::from_micros),
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err($crate::store::StoreError::from)
    }};
}
pub(crate) use fetch_queue_stats;
