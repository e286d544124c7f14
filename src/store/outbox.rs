//! The claim-status outbox as the store keeps it: claim lifecycle statuses (`claim_states`),
//! the updates waiting for their EHR (`claim_outbox`), the per-claim sequence that orders them
//! (`claim_push_heads`) and the updates that could not be delivered (`claim_dead_letters`).
//! The SQL is written once, in [`shared_outbox_sql!`], and expanded in each backend's module.
//!
//! An outbox row is only ever written inside the transaction of the change it reports (a status
//! change here, a FHIR ClaimResponse write through `Store::write_resources_with_outbox`), so a
//! change is never committed without its row, nor a row without its change. Dispatchers claim
//! due rows with a lease (`FOR UPDATE SKIP LOCKED` on PostgreSQL; on SQLite the claiming UPDATE
//! is one write under the database's single writer lock), a claim's row only when no earlier row
//! of the same claim is still in the outbox (in order per claim). Every later step of a runner
//! is conditional on it still holding the row. Payloads arrive sealed and leave sealed; nothing
//! here is PHI in clear (ids, counts, times, fixed phrases).

use async_trait::async_trait;
use serde::Serialize;

use super::{QueueStat, StoreError};
use crate::audit::NewAuditEvent;
use crate::domain::{ClaimStatus, ResourceId};

/// What wrote an outbox row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PushSource {
    /// `POST /api/v1/claims/{id}/status`.
    #[serde(rename = "status")]
    Status,
    /// A FHIR ClaimResponse written to the gateway.
    #[serde(rename = "claim-response")]
    ClaimResponse,
}

impl PushSource {
    pub fn as_str(self) -> &'static str {
        match self {
            PushSource::Status => "status",
            PushSource::ClaimResponse => "claim-response",
        }
    }
}

/// An update to write to the outbox, inside the transaction of its change.
#[derive(Debug, Clone)]
pub struct NewOutboxRow {
    /// The row's id, which is also the update's idempotency key (`update_id`).
    pub id: String,
    pub practice_id: ResourceId,
    pub connection_id: String,
    /// The gateway's Claim id: a claim's rows are delivered in the order they were written.
    pub claim_id: String,
    /// The gateway's patient id (for the audit trail).
    pub patient_id: Option<String>,
    pub source: PushSource,
    /// The `ClaimStatusUpdate` JSON, sealed with AAD `claim_outbox.payload:{id}`.
    pub payload: Vec<u8>,
}

/// A row a dispatcher holds (its lease is running).
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: String,
    pub practice_id: ResourceId,
    pub connection_id: String,
    pub claim_id: String,
    pub claim_seq: i64,
    pub patient_id: Option<String>,
    pub source: String,
    pub payload: Vec<u8>,
    /// Attempts started, this one included.
    pub attempts: i64,
    pub created_us: i64,
}

/// An update that could not be delivered, as listed (its sealed payload stays in the database).
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// The update's id and idempotency key, kept by a replay.
    pub id: String,
    pub practice_id: String,
    pub connection_id: String,
    pub claim_id: String,
    pub source: String,
    pub attempts: i64,
    /// A fixed phrase naming the kind of the last failure.
    pub last_error: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: time::OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_attempt_at: Option<time::OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub dead_at: time::OffsetDateTime,
    /// The paging key (`dead_us`).
    #[serde(skip)]
    pub dead_us: i64,
}

/// A claim's lifecycle status as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimState {
    pub claim_id: String,
    pub status: ClaimStatus,
    /// 1 for the first change, +1 per change (0: never changed, the claim is a draft).
    pub version: i64,
    pub updated_at: Option<time::OffsetDateTime>,
}

/// A status change to commit if the claim is still at `expected_version` (0: no status yet).
#[derive(Debug, Clone)]
pub struct ClaimStatusChange {
    pub practice_id: ResourceId,
    pub claim_id: String,
    pub status: ClaimStatus,
    pub expected_version: i64,
}

/// A status change asked for: `status`, if the claim's current status may become it and,
/// with `if_match`, the claim is still at that version; with the outbox rows and audit events
/// that commit with it.
#[derive(Debug, Clone)]
pub struct ClaimTransition {
    pub claim_id: String,
    pub status: ClaimStatus,
    pub if_match: Option<i64>,
    pub outbox: Vec<NewOutboxRow>,
    pub audit: Vec<NewAuditEvent>,
}

/// How a [`ClaimTransition`] ended.
#[derive(Debug, Clone)]
pub enum Transitioned {
    /// Committed: the claim's new state.
    Changed(ClaimState),
    /// Not applied, nothing written: the claim's current state, which either is not at the
    /// `if_match` version or may not become the status asked for.
    Refused(ClaimState),
    /// Not applied, nothing written: other transactions kept changing the claim between this
    /// one's read and write.
    Busy,
}

/// Times a change reads its claim's state again after another transaction changed it between
/// the read and the write.
pub(crate) const TRANSITION_READS: usize = 3;

/// What a resource write changes of claims, committed in the write's transaction: the
/// lifecycle statuses it moves (a prepared claim, a ClaimResponse's answer) and the
/// claim-status updates it queues for the EHR.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClaimEffects<'a> {
    /// Applied in order; a change whose `expected_version` no longer holds fails the whole
    /// write with [`StoreError::Conflict`](crate::store::StoreError::Conflict).
    pub lifecycle: &'a [ClaimStatusChange],
    pub outbox: &'a [NewOutboxRow],
}

impl ClaimEffects<'_> {
    pub fn is_empty(&self) -> bool {
        self.lifecycle.is_empty() && self.outbox.is_empty()
    }
}

/// Why a lifecycle change inside a resource write did not apply.
pub(crate) const LIFECYCLE_CONFLICT: &str =
    "the claim's lifecycle status was changed by another request; retry";

#[async_trait]
pub trait OutboxStore: Send + Sync {
    /// A claim's stored status (`None`: never changed, a draft).
    async fn claim_state(
        &self,
        practice: &ResourceId,
        claim_id: &str,
    ) -> Result<Option<ClaimState>, StoreError>;
    /// Status changes of claims of one practice, in one transaction: each reads its claim's
    /// state (seeing the earlier ones') and, when that allows it, writes the change, its outbox
    /// rows and its audit events; one answer per change, in order. A failure writes nothing.
    async fn transition_claims(
        &self,
        practice: &ResourceId,
        changes: &[ClaimTransition],
    ) -> Result<Vec<Transitioned>, StoreError>;

    /// Leases up to `limit` due rows to `runner` until `lease_until_us`: rows whose retry time
    /// has come, that nobody holds (or whose holder's lease ran out), and that are the earliest
    /// row of their claim still in the outbox. Counts the attempt.
    async fn claim_due(
        &self,
        runner: &str,
        now_us: i64,
        lease_until_us: i64,
        limit: i64,
    ) -> Result<Vec<OutboxRow>, StoreError>;
    /// Removes delivered rows `runner` still holds and records the pushes' audit events, in
    /// one transaction; how many rows it removed (a row another runner took over meanwhile stays
    /// for that runner, whose push the EHR deduplicates).
    async fn delivered(
        &self,
        runner: &str,
        ids: &[String],
        audit: &[NewAuditEvent],
    ) -> Result<u64, StoreError>;
    /// Gives a row back for another attempt at `available_us`, noting why this one failed.
    async fn retry_later(
        &self,
        id: &str,
        runner: &str,
        available_us: i64,
        error: &str,
    ) -> Result<bool, StoreError>;
    /// Moves a row to the dead letters (with its audit events) in one transaction.
    async fn dead_letter(
        &self,
        id: &str,
        runner: &str,
        error: &str,
        audit: &[NewAuditEvent],
    ) -> Result<bool, StoreError>;
    /// Gives back every row `runner` holds (graceful shutdown); how many.
    async fn release(&self, runner: &str) -> Result<u64, StoreError>;

    /// Dead letters, oldest death first, after the keyset cursor `(dead_us, id)`.
    async fn list_dead_letters(
        &self,
        practice: Option<&ResourceId>,
        after: Option<(i64, String)>,
        limit: i64,
    ) -> Result<Vec<DeadLetter>, StoreError>;
    /// One dead letter (of `practice` when given: another practice's is `NotFound`).
    async fn get_dead_letter(
        &self,
        practice: Option<&ResourceId>,
        id: &str,
    ) -> Result<DeadLetter, StoreError>;
    /// Moves a dead letter of `practice` back to the outbox as a pending row with the same id
    /// (a new attempt count, the next place in its claim's order), with its audit events, in
    /// one transaction. `NotFound` when there is no such dead letter (any more).
    async fn replay_dead_letter(
        &self,
        practice: &ResourceId,
        id: &str,
        audit: &[NewAuditEvent],
    ) -> Result<DeadLetter, StoreError>;

    /// Rows waiting per connection (pending, retrying or in flight) and the oldest's creation.
    async fn queue_stats(&self) -> Result<Vec<QueueStat>, StoreError>;
    /// Dead letters per connection.
    async fn dead_letter_counts(&self) -> Result<Vec<(String, i64)>, StoreError>;

    /// Wake-ups when any instance commits outbox rows (PostgreSQL `LISTEN`); `None` when the
    /// backend has none and dispatchers poll (SQLite).
    async fn wakeups(&self) -> Result<Option<tokio::sync::mpsc::Receiver<()>>, StoreError>;
}

/// The channel outbox writers `NOTIFY` on PostgreSQL.
pub(crate) const OUTBOX_CHANNEL: &str = "fhirgate_claim_outbox";

pub(crate) const OUTBOX_COLUMNS: &str = "id, practice_id, connection_id, claim_id, claim_seq, \
    patient_id, source, payload, attempts, created_us";

pub(crate) const DEAD_LETTER_COLUMNS: &str = "id, practice_id, connection_id, claim_id, \
    claim_seq, patient_id, source, payload, attempts, last_error, created_us, last_attempt_us, \
    dead_us";

pub(crate) fn from_micros(us: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// `$store`, `$db`, `$row` as the other shared SQL macros; `$for_update` is the row-lock suffix
/// (`" FOR UPDATE"` on PostgreSQL), `$skip_locked` the claiming lock (`" FOR UPDATE SKIP
/// LOCKED"`), `$notify` the statement that wakes other instances' dispatchers (empty: none).
macro_rules! shared_outbox_sql {
    ($store:ty, $db:ty, $row:ty, $for_update:literal, $skip_locked:literal, $notify:literal) => {
        fn outbox_row_from(row: &$row) -> Result<$crate::store::OutboxRow, sqlx::Error> {
            use sqlx::Row;
            Ok($crate::store::OutboxRow {
                id: row.try_get("id")?,
                practice_id: $crate::domain::ResourceId::from_trusted(row.try_get("practice_id")?),
                connection_id: row.try_get("connection_id")?,
                claim_id: row.try_get("claim_id")?,
                claim_seq: row.try_get("claim_seq")?,
                patient_id: row.try_get("patient_id")?,
                source: row.try_get("source")?,
                payload: row.try_get("payload")?,
                attempts: row.try_get("attempts")?,
                created_us: row.try_get("created_us")?,
            })
        }

        /// A dead letter and its sealed payload.
        fn dead_letter_from(
            row: &$row,
        ) -> Result<($crate::store::DeadLetter, $crate::store::OutboxRow), sqlx::Error> {
            use sqlx::Row;
            use $crate::store::outbox::from_micros;
            let created_us: i64 = row.try_get("created_us")?;
            let last_attempt_us: Option<i64> = row.try_get("last_attempt_us")?;
            let dead_us: i64 = row.try_get("dead_us")?;
            let letter = $crate::store::DeadLetter {
                id: row.try_get("id")?,
                practice_id: row.try_get("practice_id")?,
                connection_id: row.try_get("connection_id")?,
                claim_id: row.try_get("claim_id")?,
                source: row.try_get("source")?,
                attempts: row.try_get("attempts")?,
                last_error: row.try_get("last_error")?,
                created_at: from_micros(created_us),
                last_attempt_at: last_attempt_us.map(from_micros),
                dead_at: from_micros(dead_us),
                dead_us,
            };
            let sealed = $crate::store::OutboxRow {
                id: letter.id.clone(),
                practice_id: $crate::domain::ResourceId::from_trusted(letter.practice_id.clone()),
                connection_id: letter.connection_id.clone(),
                claim_id: letter.claim_id.clone(),
                claim_seq: row.try_get("claim_seq")?,
                patient_id: row.try_get("patient_id")?,
                source: letter.source.clone(),
                payload: row.try_get("payload")?,
                attempts: letter.attempts,
                created_us,
            };
            Ok((letter, sealed))
        }

        impl $store {
            /// Applies lifecycle changes inside `tx` (the caller commits), each compared and set
            /// on its `expected_version` (0: the claim has no status row yet). `false` when one
            /// did not hold: the caller rolls back.
            /// A claim's stored status, read inside `tx` (`None`: never changed, a draft).
            async fn claim_state_in(
                tx: &mut sqlx::Transaction<'_, $db>,
                practice: &$crate::domain::ResourceId,
                claim_id: &str,
            ) -> Result<Option<$crate::store::ClaimState>, $crate::store::StoreError> {
                use sqlx::Row;
                let row = sqlx::query(
                    "SELECT claim_id, status, version, updated_at FROM claim_states
                     WHERE practice_id = $1 AND claim_id = $2",
                )
                .bind(practice.as_str())
                .bind(claim_id)
                .fetch_optional(&mut **tx)
                .await?;
                let Some(row) = row else { return Ok(None) };
                let status: String = row.try_get("status")?;
                Ok(Some($crate::store::ClaimState {
                    claim_id: row.try_get("claim_id")?,
                    // Only parsed statuses are ever written.
                    status: $crate::domain::ClaimStatus::parse(&status).map_err(|_| {
                        $crate::store::StoreError::Database("unknown claim status stored".into())
                    })?,
                    version: row.try_get("version")?,
                    updated_at: Some(row.try_get("updated_at")?),
                }))
            }

            pub(crate) async fn apply_claim_changes_in(
                tx: &mut sqlx::Transaction<'_, $db>,
                changes: &[$crate::store::ClaimStatusChange],
                now: time::OffsetDateTime,
            ) -> Result<bool, $crate::store::StoreError> {
                for change in changes {
                    let done = if change.expected_version == 0 {
                        sqlx::query(
                            "INSERT INTO claim_states (practice_id, claim_id, status, version, updated_at)
                             VALUES ($1, $2, $3, 1, $4) ON CONFLICT (practice_id, claim_id) DO NOTHING",
                        )
                        .bind(change.practice_id.as_str())
                        .bind(&change.claim_id)
                        .bind(change.status.as_str())
                        .bind(now)
                        .execute(&mut **tx)
                        .await?
                    } else {
                        sqlx::query(
                            "UPDATE claim_states SET status = $1, version = version + 1, updated_at = $2
                             WHERE practice_id = $3 AND claim_id = $4 AND version = $5",
                        )
                        .bind(change.status.as_str())
                        .bind(now)
                        .bind(change.practice_id.as_str())
                        .bind(&change.claim_id)
                        .bind(change.expected_version)
                        .execute(&mut **tx)
                        .await?
                    };
                    if done.rows_affected() == 0 {
                        return Ok(false);
                    }
                }
                Ok(true)
            }

            /// Writes outbox rows inside `tx` (the caller commits): each takes the next number of
            /// its claim (locking the claim's head until commit), then wakes other instances.
            pub(crate) async fn insert_outbox_in(
                tx: &mut sqlx::Transaction<'_, $db>,
                rows: &[$crate::store::NewOutboxRow],
                now_us: i64,
            ) -> Result<(), $crate::store::StoreError> {
                for r in rows {
                    let seq: i64 = sqlx::query_scalar(
                        "INSERT INTO claim_push_heads (practice_id, claim_id, last_seq)
                         VALUES ($1, $2, 1)
                         ON CONFLICT (practice_id, claim_id)
                         DO UPDATE SET last_seq = claim_push_heads.last_seq + 1
                         RETURNING last_seq",
                    )
                    .bind(r.practice_id.as_str())
                    .bind(&r.claim_id)
                    .fetch_one(&mut **tx)
                    .await?;
                    sqlx::query(
                        "INSERT INTO claim_outbox (id, practice_id, connection_id, claim_id,
                             claim_seq, patient_id, source, payload, created_us, available_us)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)",
                    )
                    .bind(&r.id)
                    .bind(r.practice_id.as_str())
                    .bind(&r.connection_id)
                    .bind(&r.claim_id)
                    .bind(seq)
                    .bind(&r.patient_id)
                    .bind(r.source.as_str())
                    .bind(&r.payload)
                    .bind(now_us)
                    .execute(&mut **tx)
                    .await?;
                }
                if !rows.is_empty() && !$notify.is_empty() {
                    sqlx::query($notify).execute(&mut **tx).await?;
                }
                Ok(())
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::OutboxStore for $store {
            async fn claim_state(
                &self,
                practice: &$crate::domain::ResourceId,
                claim_id: &str,
            ) -> Result<Option<$crate::store::ClaimState>, $crate::store::StoreError> {
                let mut tx = self.begin_for(practice).await?;
                let state = Self::claim_state_in(&mut tx, practice, claim_id).await?;
                tx.commit().await?;
                Ok(state)
            }

            async fn transition_claims(
                &self,
                practice: &$crate::domain::ResourceId,
                changes: &[$crate::store::ClaimTransition],
            ) -> Result<Vec<$crate::store::Transitioned>, $crate::store::StoreError> {
                use $crate::store::Transitioned;
                let now = $crate::store::now();
                let _turn = self.write_turn().await?;
                let mut tx = self.begin_for(practice).await?;
                let mut answers = Vec::with_capacity(changes.len());
                let mut outbox = Vec::new();
                let mut audit = Vec::new();
                for asked in changes {
                    let mut answer = Transitioned::Busy;
                    for _ in 0..$crate::store::outbox::TRANSITION_READS {
                        let current = Self::claim_state_in(&mut tx, practice, &asked.claim_id)
                            .await?
                            .unwrap_or($crate::store::ClaimState {
                                claim_id: asked.claim_id.clone(),
                                status: $crate::domain::ClaimStatus::INITIAL,
                                version: 0,
                                updated_at: None,
                            });
                        if asked.if_match.is_some_and(|v| v != current.version)
                            || !current.status.can_become(asked.status)
                        {
                            answer = Transitioned::Refused(current);
                            break;
                        }
                        let change = $crate::store::ClaimStatusChange {
                            practice_id: practice.clone(),
                            claim_id: asked.claim_id.clone(),
                            status: asked.status,
                            expected_version: current.version,
                        };
                        // Nothing applied: another transaction changed the claim since the
                        // read and has committed (the write waited for it); read again.
                        if Self::apply_claim_changes_in(&mut tx, std::slice::from_ref(&change), now)
                            .await?
                        {
                            outbox.extend(asked.outbox.iter().cloned());
                            audit.extend(asked.audit.iter().cloned());
                            answer = Transitioned::Changed($crate::store::ClaimState {
                                claim_id: change.claim_id,
                                status: change.status,
                                version: current.version + 1,
                                updated_at: Some(now),
                            });
                            break;
                        }
                    }
                    answers.push(answer);
                }
                Self::insert_outbox_in(&mut tx, &outbox, $crate::store::jobs::micros(now)).await?;
                self.append_audit_in(&mut tx, &audit, now).await?;
                tx.commit().await?;
                Ok(answers)
            }

            async fn claim_due(
                &self,
                runner: &str,
                now_us: i64,
                lease_until_us: i64,
                limit: i64,
            ) -> Result<Vec<$crate::store::OutboxRow>, $crate::store::StoreError> {
                let _turn = self.write_turn().await?;
                let rows = sqlx::query(&format!(
                    "UPDATE claim_outbox SET runner = $1, lease_until_us = $2,
                         attempts = attempts + 1, last_attempt_us = $3
                     WHERE id IN (
                         SELECT o.id FROM claim_outbox o
                         WHERE o.available_us <= $3
                           AND (o.lease_until_us IS NULL OR o.lease_until_us < $3)
                           AND NOT EXISTS (
                               SELECT 1 FROM claim_outbox e
                               WHERE e.practice_id = o.practice_id AND e.claim_id = o.claim_id
                                 AND e.claim_seq < o.claim_seq)
                         ORDER BY o.available_us, o.created_us, o.id
                         LIMIT $4{})
                     RETURNING {}",
                    $skip_locked,
                    $crate::store::outbox::OUTBOX_COLUMNS
                ))
                .bind(runner)
                .bind(lease_until_us)
                .bind(now_us)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.iter().map(outbox_row_from).collect::<Result<_, _>>()?)
            }

            async fn delivered(
                &self,
                runner: &str,
                ids: &[String],
                audit: &[$crate::audit::NewAuditEvent],
            ) -> Result<u64, $crate::store::StoreError> {
                if ids.is_empty() {
                    return Ok(0);
                }
                let _turn = self.write_turn().await?;
                let mut tx = self.pool.begin().await?;
                let mut removed = 0;
                for chunk in ids.chunks($crate::store::ROW_INSERT_CHUNK) {
                    let mut q = sqlx::QueryBuilder::<$db>::new(
                        "DELETE FROM claim_outbox WHERE runner = ",
                    );
                    q.push_bind(runner).push(" AND id IN (");
                    let mut list = q.separated(", ");
                    for id in chunk {
                        list.push_bind(id);
                    }
                    q.push(")");
                    removed += q.build().execute(&mut *tx).await?.rows_affected();
                }
                self.append_audit_in(&mut tx, audit, $crate::store::now()).await?;
                tx.commit().await?;
                Ok(removed)
            }

            async fn retry_later(
                &self,
                id: &str,
                runner: &str,
                available_us: i64,
                error: &str,
            ) -> Result<bool, $crate::store::StoreError> {
                let _turn = self.write_turn().await?;
                let done = sqlx::query(
                    "UPDATE claim_outbox SET runner = NULL, lease_until_us = NULL,
                         available_us = $1, last_error = $2
                     WHERE id = $3 AND runner = $4",
                )
                .bind(available_us)
                .bind(error)
                .bind(id)
                .bind(runner)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn dead_letter(
                &self,
                id: &str,
                runner: &str,
                error: &str,
                audit: &[$crate::audit::NewAuditEvent],
            ) -> Result<bool, $crate::store::StoreError> {
                let now = $crate::store::now();
                let _turn = self.write_turn().await?;
                let mut tx = self.pool.begin().await?;
                let moved = sqlx::query(
                    "INSERT INTO claim_dead_letters (id, practice_id, connection_id, claim_id,
                         claim_seq, patient_id, source, payload, attempts, last_error, created_us,
                         last_attempt_us, dead_us)
                     SELECT id, practice_id, connection_id, claim_id, claim_seq, patient_id,
                         source, payload, attempts, $1, created_us, last_attempt_us, $2
                     FROM claim_outbox WHERE id = $3 AND runner = $4",
                )
                .bind(error)
                .bind($crate::store::jobs::micros(now))
                .bind(id)
                .bind(runner)
                .execute(&mut *tx)
                .await?;
                if moved.rows_affected() == 0 {
                    return Ok(false);
                }
                sqlx::query("DELETE FROM claim_outbox WHERE id = $1 AND runner = $2")
                    .bind(id)
                    .bind(runner)
                    .execute(&mut *tx)
                    .await?;
                self.append_audit_in(&mut tx, audit, now).await?;
                tx.commit().await?;
                Ok(true)
            }

            async fn release(&self, runner: &str) -> Result<u64, $crate::store::StoreError> {
                let _turn = self.write_turn().await?;
                let done = sqlx::query(
                    "UPDATE claim_outbox SET runner = NULL, lease_until_us = NULL WHERE runner = $1",
                )
                .bind(runner)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected())
            }

            async fn list_dead_letters(
                &self,
                practice: Option<&$crate::domain::ResourceId>,
                after: Option<(i64, String)>,
                limit: i64,
            ) -> Result<Vec<$crate::store::DeadLetter>, $crate::store::StoreError> {
                let mut q = sqlx::QueryBuilder::<$db>::new(format!(
                    "SELECT {} FROM claim_dead_letters WHERE 1 = 1",
                    $crate::store::outbox::DEAD_LETTER_COLUMNS
                ));
                if let Some(practice) = practice {
                    q.push(" AND practice_id = ").push_bind(practice.as_str().to_owned());
                }
                if let Some((dead_us, id)) = after {
                    q.push(" AND (dead_us > ")
                        .push_bind(dead_us)
                        .push(" OR (dead_us = ")
                        .push_bind(dead_us)
                        .push(" AND id > ")
                        .push_bind(id)
                        .push("))");
                }
                q.push(" ORDER BY dead_us, id LIMIT ").push_bind(limit);
                let rows = match practice {
                    Some(practice) => {
                        let mut tx = self.begin_for(practice).await?;
                        let rows = q.build().fetch_all(&mut *tx).await?;
                        tx.commit().await?;
                        rows
                    }
                    None => q.build().fetch_all(&self.pool).await?,
                };
                Ok(rows
                    .iter()
                    .map(|r| dead_letter_from(r).map(|(letter, _)| letter))
                    .collect::<Result<_, _>>()?)
            }

            async fn get_dead_letter(
                &self,
                practice: Option<&$crate::domain::ResourceId>,
                id: &str,
            ) -> Result<$crate::store::DeadLetter, $crate::store::StoreError> {
                let sql = format!(
                    "SELECT {} FROM claim_dead_letters WHERE id = $1",
                    $crate::store::outbox::DEAD_LETTER_COLUMNS
                );
                let row = match practice {
                    Some(practice) => {
                        let mut tx = self.begin_for(practice).await?;
                        let row = sqlx::query(&format!("{sql} AND practice_id = $2"))
                            .bind(id)
                            .bind(practice.as_str())
                            .fetch_one(&mut *tx)
                            .await?;
                        tx.commit().await?;
                        row
                    }
                    None => sqlx::query(&sql).bind(id).fetch_one(&self.pool).await?,
                };
                Ok(dead_letter_from(&row)?.0)
            }

            async fn replay_dead_letter(
                &self,
                practice: &$crate::domain::ResourceId,
                id: &str,
                audit: &[$crate::audit::NewAuditEvent],
            ) -> Result<$crate::store::DeadLetter, $crate::store::StoreError> {
                let now = $crate::store::now();
                let _turn = self.write_turn().await?;
                let mut tx = self.begin_for(practice).await?;
                let row = sqlx::query(&format!(
                    "SELECT {} FROM claim_dead_letters WHERE id = $1 AND practice_id = $2{}",
                    $crate::store::outbox::DEAD_LETTER_COLUMNS,
                    $for_update
                ))
                .bind(id)
                .bind(practice.as_str())
                .fetch_one(&mut *tx)
                .await?;
                let (letter, sealed) = dead_letter_from(&row)?;
                sqlx::query("DELETE FROM claim_dead_letters WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                let again = $crate::store::NewOutboxRow {
                    id: sealed.id,
                    practice_id: sealed.practice_id,
                    connection_id: sealed.connection_id,
                    claim_id: sealed.claim_id,
                    patient_id: sealed.patient_id,
                    source: if sealed.source == "claim-response" {
                        $crate::store::PushSource::ClaimResponse
                    } else {
                        $crate::store::PushSource::Status
                    },
                    payload: sealed.payload,
                };
                Self::insert_outbox_in(
                    &mut tx,
                    std::slice::from_ref(&again),
                    $crate::store::jobs::micros(now),
                )
                .await?;
                self.append_audit_in(&mut tx, audit, now).await?;
                tx.commit().await?;
                Ok(letter)
            }

            async fn queue_stats(
                &self,
            ) -> Result<Vec<$crate::store::QueueStat>, $crate::store::StoreError> {
                $crate::store::fetch_queue_stats!(
                    &self.pool,
                    "SELECT connection_id, COUNT(*) AS depth, MIN(created_us) AS oldest
                     FROM claim_outbox GROUP BY connection_id ORDER BY connection_id"
                )
            }

            async fn dead_letter_counts(
                &self,
            ) -> Result<Vec<(String, i64)>, $crate::store::StoreError> {
                use sqlx::Row;
                let rows = sqlx::query(
                    "SELECT connection_id, COUNT(*) AS n FROM claim_dead_letters
                     GROUP BY connection_id ORDER BY connection_id",
                )
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|row| Ok((row.try_get("connection_id")?, row.try_get("n")?)))
                    .collect::<Result<_, sqlx::Error>>()
                    .map_err(Into::into)
            }

            async fn wakeups(
                &self,
            ) -> Result<Option<tokio::sync::mpsc::Receiver<()>>, $crate::store::StoreError> {
                self.outbox_wakeups().await
            }
        }
    };
}
pub(crate) use shared_outbox_sql;
