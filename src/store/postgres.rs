//! PostgreSQL backend: production and multi-instance. Every tenant table has row-level security
//! (migrations/postgres); tenant-scoped transactions begin with [`PgStore::begin_tenant`], which
//! switches to the `fhirgate_tenant` role and sets `fhirgate.practice_id` for that transaction
//! only, so a query that forgets its practice filter still sees nothing of another practice.

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgPool, Postgres, Row, Transaction};

use super::connections::shared_connection_sql;
use super::export::shared_export_sql;
use super::inbox::shared_inbox_sql;
use super::jobs::shared_job_sql;
use super::migrations::{MigrationStatus, POSTGRES};
use super::outbox::shared_outbox_sql;
use super::resources::shared_resource_sql;
use super::{
    chain_records, key_columns, now, retention_floor, AuditQuery, Backend, PoolOptions, PoolStats,
    ResourceQuery, ResourceWrite, SealedVersion, Store, StoreError, StoredVersion, AUDIT_COLUMNS,
    AUDIT_FILTER, AUDIT_INSERT_CHUNK, CLIENT_COLUMNS,
};
use crate::audit::{AuditRecord, NewAuditEvent, SYSTEM_CHAIN};
use crate::domain::{new_resource_id, NewPractice, Practice, ResourceId};
use crate::gate::{ApiClient, ClientKeys, ClientStatus, NewApiClient};

/// How long a pooled connection may sit idle and still be handed out without a ping.
const TRUSTED_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

pub struct PgStore {
    pool: PgPool,
    max: u32,
    /// The audit chain heads as this process last moved them (see `append_audit_unlocked`).
    heads: std::sync::Mutex<std::collections::HashMap<String, (i64, Vec<u8>)>>,
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
            // sqlx pings every connection it hands out, a round trip before each transaction;
            // one idle for less than `TRUSTED_IDLE` was working a moment ago and is handed out
            // as is. A connection that fails anyway (the server went away just now) fails its
            // request with 503 and is closed when given back: sqlx pings on release, always.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= TRUSTED_IDLE {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(connect)
            .await?;
        Ok(Self {
            pool,
            max: options.max_connections,
            heads: Default::default(),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Begins a transaction confined to one practice by row-level security: the role and the
    /// practice id, both reverting at commit or rollback, are set in the round trip that begins
    /// it (one simple query: a FHIR id is letters, digits, `-` and `.`, so it is written into the
    /// statement; an id of any other shape takes a bound parameter in a round trip of its own).
    pub async fn begin_tenant(
        &self,
        practice: &ResourceId,
    ) -> Result<Transaction<'static, Postgres>, StoreError> {
        let id = practice.as_str();
        if inlinable(id) {
            return Ok(self
                .pool
                .begin_with(format!(
                    "BEGIN; SELECT set_config('role', 'fhirgate_tenant', true), \
                     set_config('fhirgate.practice_id', '{id}', true)"
                ))
                .await?);
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "SELECT set_config('role', 'fhirgate_tenant', true),
                    set_config('fhirgate.practice_id', $1, true)",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        Ok(tx)
    }

    async fn begin_for(
        &self,
        practice: &ResourceId,
    ) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.begin_tenant(practice).await
    }

    /// `LISTEN`s for outbox writes on a connection of its own, for as long as the receiver
    /// lives. Each notification, and each reconnection (notifications sent meanwhile are lost),
    /// is one wake-up; the dispatcher's poll covers what a lost connection missed.
    async fn outbox_wakeups(&self) -> Result<Option<tokio::sync::mpsc::Receiver<()>>, StoreError> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener.listen(super::outbox::OUTBOX_CHANNEL).await?;
        let (wake, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = wake.closed() => break,
                    received = listener.recv() => {
                        if received.is_err() {
                            // Reconnecting failed: try again shortly.
                            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        }
                        let _ = wake.try_send(());
                    }
                }
            }
        });
        Ok(Some(rx))
    }

    /// Remembers chain heads just moved under their locks: the truth once the transaction
    /// commits, and what an unlocked append expects next.
    fn heads_moved(&self, heads: std::collections::HashMap<String, (i64, Vec<u8>)>) {
        let mut known = self.heads.lock().unwrap_or_else(|p| p.into_inner());
        known.extend(heads);
    }

    /// Appends one chain's events in one statement, outside any transaction and without locking
    /// the head first: the head moves only if it is still the one this process last saw, and
    /// the events are inserted only if it moved (a data-modifying WITH, atomic as any single
    /// statement). False, with nothing written, when the head is unknown here or has moved
    /// since (another instance, or a transaction of this one still open or rolled back): the
    /// caller then appends under the lock, which also learns the head afresh.
    ///
    /// The locked append is four round trips (BEGIN, lock and read the head, insert and move
    /// it, COMMIT) and holds the head from the second to the fourth; this is one, and holds it
    /// only while its statement commits. The audit writer's appends (reads, outbound EHR calls)
    /// take this path; a request's own transaction keeps the lock, as its writes must commit
    /// with their events.
    async fn append_audit_unlocked(
        &self,
        events: &[NewAuditEvent],
        at: time::OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let Some(first) = events.first() else {
            return Ok(false);
        };
        if events.len() > AUDIT_INSERT_CHUNK
            || events.iter().any(|e| e.practice_id != first.practice_id)
        {
            return Ok(false);
        }
        let chain = first.chain();
        let Some((seq, hash)) = self
            .heads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&chain)
            .cloned()
        else {
            return Ok(false);
        };
        let mut moved = std::collections::HashMap::from([(chain.clone(), (seq, hash.clone()))]);
        let records = chain_records(events, &mut moved, at)?;
        let Some((last_seq, last_hash)) = moved.remove(&chain) else {
            return Ok(false);
        };
        let mut q = sqlx::QueryBuilder::<Postgres>::new(
            "WITH moved AS (UPDATE audit_chain_heads SET last_seq = ",
        );
        q.push_bind(last_seq)
            .push(", last_hash = ")
            .push_bind(&last_hash)
            .push(" WHERE chain = ")
            .push_bind(&chain)
            .push(" AND last_seq = ")
            .push_bind(seq)
            .push(" AND last_hash = ")
            .push_bind(&hash)
            .push(" RETURNING 1) INSERT INTO audit_events (")
            .push(AUDIT_COLUMNS)
            .push(") SELECT * FROM (");
        q.push_values(records.iter(), push_audit_record);
        q.push(") AS appended WHERE EXISTS (SELECT 1 FROM moved)");
        let inserted = q.build().execute(&self.pool).await?.rows_affected();
        if inserted != records.len() as u64 {
            return Ok(false);
        }
        let mut known = self.heads.lock().unwrap_or_else(|p| p.into_inner());
        match known.get_mut(&chain) {
            // A locked append may have moved it further meanwhile.
            Some(head) if head.0 >= last_seq => {}
            Some(head) => *head = (last_seq, last_hash),
            None => {
                known.insert(chain, (last_seq, last_hash));
            }
        }
        Ok(true)
    }

    /// PostgreSQL writes concurrently: no queue.
    async fn write_turn(&self) -> Result<Option<()>, StoreError> {
        Ok(None)
    }
}

/// Whether a practice id may be written into a statement as a literal: a FHIR id's shape
/// (letters, digits, `-`, `.`; 1 to 64), nothing that could end the quotes.
fn inlinable(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

shared_resource_sql!(PgStore, Postgres, sqlx::postgres::PgRow, " FOR UPDATE");
shared_export_sql!(PgStore, Postgres, sqlx::postgres::PgRow);
shared_connection_sql!(PgStore, Postgres, sqlx::postgres::PgRow);
shared_job_sql!(PgStore, Postgres, sqlx::postgres::PgRow);
shared_outbox_sql!(
    PgStore,
    Postgres,
    sqlx::postgres::PgRow,
    " FOR UPDATE",
    " FOR UPDATE SKIP LOCKED",
    "SELECT pg_notify('fhirgate_claim_outbox', '')"
);
shared_inbox_sql!(
    PgStore,
    Postgres,
    sqlx::postgres::PgRow,
    " FOR UPDATE SKIP LOCKED",
    " FOR UPDATE"
);

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

fn client_from(row: &PgRow) -> Result<ApiClient, sqlx::Error> {
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

fn audit_from(row: &PgRow) -> Result<AuditRecord, sqlx::Error> {
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

/// [`AUDIT_FILTER`] for PostgreSQL: numbered `$N` parameters, typed where PostgreSQL cannot
/// infer a type from `$N IS NULL`, and `strpos` for SQLite's `instr`.
fn pg_audit_filter() -> String {
    AUDIT_FILTER
        .replace("?2 IS NULL", "$2::timestamptz IS NULL")
        .replace("?3 IS NULL", "$3::timestamptz IS NULL")
        .replace("?4 IS NULL", "$4::text IS NULL")
        .replace("?5 IS NULL", "$5::text IS NULL")
        .replace("?6 IS NULL", "$6::text IS NULL")
        .replace(
            "instr(',' || ?6 || ',', ',' || action || ',')",
            "strpos(',' || $6 || ',', ',' || action || ',')",
        )
        .replace('?', "$")
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

    async fn server_warnings(&self) -> Vec<&'static str> {
        // Without autovacuum nothing keeps the planner's statistics: tables that grew from empty
        // are planned as empty, and a search that takes a millisecond took 35 s in the soak bench.
        let autovacuum: Result<String, _> = sqlx::query_scalar("SHOW autovacuum")
            .fetch_one(&self.pool)
            .await;
        match autovacuum.as_deref() {
            Ok("off") => vec![
                "PostgreSQL autovacuum is off: table statistics go stale and queries slow down as \
                 tables grow; turn it on, or run ANALYZE on a schedule",
            ],
            _ => Vec::new(),
        }
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

    async fn create_client(&self, new: &NewApiClient) -> Result<ApiClient, StoreError> {
        let client_id = uuid::Uuid::new_v4().to_string();
        let (jwks, jwks_url) = key_columns(&new.keys);
        let now = now();
        sqlx::query(
            "INSERT INTO api_clients (client_id, practice_id, name, role, scopes, jwks, jwks_url,
                                      status, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'active', $8, $8)",
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
            "SELECT {CLIENT_COLUMNS} FROM api_clients WHERE client_id = $1"
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
             WHERE $1::text IS NULL OR practice_id = $1 ORDER BY created_at, client_id"
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
            sqlx::query("UPDATE api_clients SET status = $1, updated_at = $2 WHERE client_id = $3")
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
            "UPDATE api_clients SET jwks = $1, jwks_url = $2, updated_at = $3 WHERE client_id = $4",
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
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM client_assertions WHERE expires_at < $1")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let inserted = sqlx::query(
            "INSERT INTO client_assertions (practice_id, client_id, jti, expires_at)
             VALUES ($1, $2, $3, $4) ON CONFLICT (client_id, jti) DO NOTHING",
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
        if self.append_audit_unlocked(events, at).await? {
            return Ok(events.len());
        }
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
            "SELECT {AUDIT_COLUMNS} FROM audit_events WHERE chain = $1 AND chain_seq > $2
             ORDER BY chain_seq LIMIT $3"
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
             WHERE chain = $1 AND chain_seq > $2 AND recorded_at >= $3
             ORDER BY chain_seq LIMIT $4"
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
        let mut tx = self.begin_tenant(practice).await?;
        let row = sqlx::query(&format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_events WHERE chain = $1 AND id = $2"
        ))
        .bind(practice.as_str())
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(audit_from(&row)?)
    }

    async fn search_audit(&self, q: &AuditQuery) -> Result<(Vec<AuditRecord>, i64), StoreError> {
        let filter = pg_audit_filter();
        let mut tx = self.begin_tenant(&q.practice).await?;
        let total: i64 =
            sqlx::query_scalar(&format!("SELECT count(*) FROM audit_events WHERE {filter}"))
                .bind(q.practice.as_str())
                .bind(q.since)
                .bind(q.until)
                .bind(&q.patient)
                .bind(&q.agent)
                .bind(&q.actions)
                .fetch_one(&mut *tx)
                .await?;
        let rows = sqlx::query(&format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_events WHERE {filter} AND chain_seq > $7
             ORDER BY chain_seq LIMIT $8"
        ))
        .bind(q.practice.as_str())
        .bind(q.since)
        .bind(q.until)
        .bind(&q.patient)
        .bind(&q.agent)
        .bind(&q.actions)
        .bind(q.after_seq)
        .bind(q.limit)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((
            rows.iter().map(audit_from).collect::<Result<_, _>>()?,
            total,
        ))
    }

    async fn audit_checkpoint(&self, chain: &str) -> Result<Option<(i64, Vec<u8>)>, StoreError> {
        let row =
            sqlx::query("SELECT through_seq, through_hash FROM audit_purges WHERE chain = $1")
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
            // The append-only trigger lets a purge delete events older than six years only.
            sqlx::query("SELECT set_config('fhirgate.audit_purge', 'on', true)")
                .execute(&mut *tx)
                .await?;
            // The purgeable prefix ends just before the chain's first event at or after `before`.
            let first_young: Option<i64> = sqlx::query_scalar(
                "SELECT min(chain_seq) FROM audit_events WHERE chain = $1 AND recorded_at >= $2",
            )
            .bind(&chain)
            .bind(before)
            .fetch_one(&mut *tx)
            .await?;
            let last_old: Option<i64> = sqlx::query_scalar(
                "SELECT max(chain_seq) FROM audit_events WHERE chain = $1 AND chain_seq < $2",
            )
            .bind(&chain)
            .bind(first_young.unwrap_or(i64::MAX))
            .fetch_one(&mut *tx)
            .await?;
            let Some(through) = last_old else {
                continue;
            };
            let hash: Vec<u8> = sqlx::query_scalar(
                "SELECT hash FROM audit_events WHERE chain = $1 AND chain_seq = $2",
            )
            .bind(&chain)
            .bind(through)
            .fetch_one(&mut *tx)
            .await?;
            let practice = (chain != SYSTEM_CHAIN).then_some(chain.as_str());
            sqlx::query(
                "INSERT INTO audit_purges (chain, practice_id, through_seq, through_hash, purged_at)
                 VALUES ($1, $2, $3, $4, $5)
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
            sqlx::query("DELETE FROM audit_events WHERE chain = $1 AND chain_seq <= $2")
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

#[cfg(test)]
mod tests {
    use super::inlinable;

    #[test]
    fn only_fhir_shaped_practice_ids_are_written_into_a_statement() {
        assert!(inlinable("p-1.a"));
        assert!(inlinable(&"a".repeat(64)));
        for odd in [
            "",
            "x'); DROP TABLE patients; --",
            "a'b",
            "a\\b",
            "a b",
            "é",
            &"a".repeat(65),
        ] {
            assert!(!inlinable(odd), "{odd:?}");
        }
    }
}
