//! The webhook inbox as the store keeps it: authenticated patient-change events waiting for the
//! worker, each unique per (connection, event key), and the event numbers each FHIR subscription
//! has delivered. The SQL is written once, in [`shared_inbox_sql!`], and expanded in each
//! backend's module, where it implements [`InboxStore`].
//!
//! The store never sees an event in clear: payloads arrive sealed and event ids as keyed
//! digests. Work is claimed with a lease (`FOR UPDATE SKIP LOCKED` on PostgreSQL, a conditional
//! UPDATE under the writer queue on SQLite), and every later step is conditional on the claimer
//! still holding the row, so a row taken over after its lease ran out is finished once.

use async_trait::async_trait;
use serde::Serialize;

use super::{QueueStat, StoreError};
use crate::domain::ResourceId;

/// What an inbox row asks the worker to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InboxKind {
    /// Fetch (or take from the payload) one patient and upsert it.
    Patient,
    /// Something changed that no single event describes (an id-only ping, missed events): pull
    /// what changed since the connection's watermark.
    Resync,
}

impl InboxKind {
    pub fn as_str(self) -> &'static str {
        match self {
            InboxKind::Patient => "patient",
            InboxKind::Resync => "resync",
        }
    }

    pub(crate) fn parse(text: &str) -> Self {
        match text {
            "resync" => InboxKind::Resync,
            _ => InboxKind::Patient,
        }
    }
}

/// An event to write. A `Resync` row is skipped when its connection already has one waiting
/// that no worker holds yet (that one will see the same changes).
#[derive(Debug, Clone)]
pub struct NewInboxEvent {
    pub id: String,
    /// The sender's event id as a keyed digest (see migrations/*/0009_webhook_inbox.sql).
    pub event_key: String,
    pub kind: InboxKind,
    /// Sealed under `field_aad("webhook_inbox.payload", id)`.
    pub payload: Option<Vec<u8>>,
}

/// The event numbers a FHIR subscription notification accounts for: `first` is the lowest event
/// it delivers (none for a heartbeat or handshake), `through` the highest it says exists
/// (`eventsSinceSubscriptionStart`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceMark {
    pub subscription: String,
    pub first: Option<i64>,
    pub through: i64,
}

/// One notification's writes.
#[derive(Debug, Clone)]
pub struct InboxAccept {
    pub practice_id: ResourceId,
    pub connection_id: String,
    pub received_us: i64,
    pub events: Vec<NewInboxEvent>,
    pub sequence: Option<SequenceMark>,
    /// Written when `sequence` starts past what the subscription delivered before.
    pub resync_on_gap: Option<NewInboxEvent>,
    /// The request's audit event, appended in the same transaction.
    pub audit: Option<crate::audit::NewAuditEvent>,
}

/// What [`InboxStore::accept`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Accepted {
    /// Events written.
    pub stored: usize,
    /// Events already there (same connection and event key), or resyncs coalesced into a
    /// waiting one.
    pub duplicates: usize,
    /// Whether the sequence revealed missed events.
    pub gap: bool,
}

/// A row as a worker claims it.
#[derive(Debug, Clone)]
pub struct ClaimedEvent {
    pub id: String,
    pub practice_id: ResourceId,
    pub connection_id: String,
    pub kind: InboxKind,
    pub payload: Option<Vec<u8>>,
    /// Claims so far, this one included.
    pub attempts: i64,
    pub received_us: i64,
}

/// A row as operators see it: no payload, no event key.
#[derive(Debug, Clone, Serialize)]
pub struct InboxEntry {
    pub id: String,
    pub practice_id: String,
    pub connection_id: String,
    pub kind: InboxKind,
    pub status: String,
    pub attempts: i64,
    pub next_attempt_us: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_until_us: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub received_us: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_us: Option<i64>,
    /// Whether a sealed payload is still kept (waiting or dead rows).
    pub has_payload: bool,
}

#[async_trait]
pub trait InboxStore: Send + Sync {
    /// Writes notifications in order, in one transaction (a group commit): each one's events
    /// (skipping duplicates, also of an earlier notification of the batch), its subscription's
    /// sequence and its audit event. One [`Accepted`] per notification.
    async fn accept(&self, accepts: &[InboxAccept]) -> Result<Vec<Accepted>, StoreError>;
    /// Gives up to `limit` due rows nobody holds to `runner` until `lease_until_us`, counting an
    /// attempt on each.
    async fn claim_events(
        &self,
        runner: &str,
        now_us: i64,
        lease_until_us: i64,
        limit: i64,
    ) -> Result<Vec<ClaimedEvent>, StoreError>;
    /// Extends the leases of held rows; how many `runner` still holds (a row another runner
    /// took over is left alone).
    async fn renew_events(
        &self,
        ids: &[String],
        runner: &str,
        lease_until_us: i64,
    ) -> Result<u64, StoreError>;
    /// Marks held rows done and drops their payloads, in one statement; the ids `runner` still
    /// held (and so marked done).
    async fn complete_events(
        &self,
        ids: &[String],
        runner: &str,
        now_us: i64,
    ) -> Result<Vec<String>, StoreError>;
    /// Gives a held row back to be tried again at `next_attempt_us`; `error` is a fixed phrase.
    async fn retry_event(
        &self,
        id: &str,
        runner: &str,
        next_attempt_us: i64,
        error: &str,
    ) -> Result<bool, StoreError>;
    /// Marks a held row dead (kept, with its payload, for an operator); `reason` is a fixed
    /// phrase.
    async fn bury_event(
        &self,
        id: &str,
        runner: &str,
        reason: &str,
        now_us: i64,
    ) -> Result<bool, StoreError>;
    /// Gives back every row `runner` holds, its attempt uncounted (a graceful stop).
    async fn release_events(&self, runner: &str) -> Result<u64, StoreError>;
    /// Dead rows of a connection become due again, their attempts reset; how many.
    async fn revive_dead_events(&self, connection: &str, now_us: i64) -> Result<u64, StoreError>;
    /// Rows oldest first, of a connection and/or a status.
    async fn list_events(
        &self,
        connection: Option<&str>,
        status: Option<&str>,
        limit: i64,
    ) -> Result<Vec<InboxEntry>, StoreError>;
    /// Waiting rows (pending, whether held or not) per connection, and when the oldest arrived.
    async fn queue_stats(&self) -> Result<Vec<QueueStat>, StoreError>;
}

/// Whether a notification starting at `mark` skips events past `previous` (the highest event
/// its subscription accounted for before).
pub fn reveals_gap(previous: i64, mark: &SequenceMark) -> bool {
    let start = mark.first.unwrap_or(mark.through.saturating_add(1));
    start > previous.saturating_add(1)
}

pub(crate) const INBOX_ENTRY_COLUMNS: &str = "id, practice_id, connection_id, kind, status, \
    attempts, next_attempt_us, runner, lease_until_us, last_error, received_us, finished_us, \
    payload IS NOT NULL AS has_payload";

/// Patient events written per statement by `accept` (8 parameters each, well inside
/// SQLite's and PostgreSQL's limits).
pub(crate) const PATIENT_ROWS: usize = 500;

/// The SQL of [`InboxStore`], for `$store` over `$db`; `$skip_locked` is what a claim's row
/// selection ends with (`FOR UPDATE SKIP LOCKED` on PostgreSQL) and `$for_update` what a read
/// that is updated next ends with.
macro_rules! shared_inbox_sql {
    ($store:ty, $db:ty, $row:ty, $skip_locked:literal, $for_update:literal) => {
        /// The `WHERE` of an update to the rows of `ids` that `runner` holds, still pending.
        fn push_held<'a>(q: &mut sqlx::QueryBuilder<'a, $db>, runner: &'a str, ids: &'a [String]) {
            q.push(" WHERE runner = ")
                .push_bind(runner)
                .push(" AND status = 'pending' AND id IN (");
            let mut list = q.separated(", ");
            for id in ids {
                list.push_bind(id);
            }
            q.push(")");
        }

        fn inbox_entry_from(row: &$row) -> Result<$crate::store::inbox::InboxEntry, sqlx::Error> {
            use sqlx::Row;
            let kind: String = row.try_get("kind")?;
            Ok($crate::store::inbox::InboxEntry {
                id: row.try_get("id")?,
                practice_id: row.try_get("practice_id")?,
                connection_id: row.try_get("connection_id")?,
                kind: $crate::store::inbox::InboxKind::parse(&kind),
                status: row.try_get("status")?,
                attempts: row.try_get("attempts")?,
                next_attempt_us: row.try_get("next_attempt_us")?,
                runner: row.try_get("runner")?,
                lease_until_us: row.try_get("lease_until_us")?,
                last_error: row.try_get("last_error")?,
                received_us: row.try_get("received_us")?,
                finished_us: row.try_get("finished_us")?,
                has_payload: row.try_get("has_payload")?,
            })
        }

        impl $store {
            /// Writes one event in `tx`; whether it was new.
            async fn insert_inbox_event(
                tx: &mut sqlx::Transaction<'static, $db>,
                accept: &$crate::store::inbox::InboxAccept,
                event: &$crate::store::inbox::NewInboxEvent,
            ) -> Result<bool, sqlx::Error> {
                let done = match event.kind {
                    $crate::store::inbox::InboxKind::Patient => {
                        sqlx::query(
                            "INSERT INTO webhook_inbox (id, practice_id, connection_id,
                                 event_key, kind, payload, next_attempt_us, received_us)
                             VALUES ($1, $2, $3, $4, 'patient', $5, $6, $6)
                             ON CONFLICT (connection_id, event_key) DO NOTHING",
                        )
                        .bind(&event.id)
                        .bind(accept.practice_id.as_str())
                        .bind(&accept.connection_id)
                        .bind(&event.event_key)
                        .bind(&event.payload)
                        .bind(accept.received_us)
                        .execute(&mut **tx)
                        .await?
                    }
                    // A resync waiting for a worker already covers whatever this one would.
                    $crate::store::inbox::InboxKind::Resync => {
                        sqlx::query(
                            "INSERT INTO webhook_inbox (id, practice_id, connection_id,
                                 event_key, kind, payload, next_attempt_us, received_us)
                             SELECT $1, $2, $3, $4, 'resync', $5, $6, $6
                             WHERE NOT EXISTS (
                                 SELECT 1 FROM webhook_inbox WHERE connection_id = $3
                                   AND kind = 'resync' AND status = 'pending'
                                   AND runner IS NULL)
                             ON CONFLICT (connection_id, event_key) DO NOTHING",
                        )
                        .bind(&event.id)
                        .bind(accept.practice_id.as_str())
                        .bind(&accept.connection_id)
                        .bind(&event.event_key)
                        .bind(&event.payload)
                        .bind(accept.received_us)
                        .execute(&mut **tx)
                        .await?
                    }
                };
                Ok(done.rows_affected() == 1)
            }

            /// Every patient event of a batch in one statement (chunks of `PATIENT_ROWS`); the
            /// ids written (an event key already there writes nothing).
            async fn insert_patient_events(
                tx: &mut sqlx::Transaction<'static, $db>,
                accepts: &[$crate::store::inbox::InboxAccept],
            ) -> Result<std::collections::HashSet<String>, sqlx::Error> {
                use sqlx::Row;
                let events: Vec<_> = accepts
                    .iter()
                    .flat_map(|a| a.events.iter().map(move |e| (a, e)))
                    .filter(|(_, e)| e.kind == $crate::store::inbox::InboxKind::Patient)
                    .collect();
                let mut written = std::collections::HashSet::with_capacity(events.len());
                for chunk in events.chunks($crate::store::inbox::PATIENT_ROWS) {
                    let mut insert = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO webhook_inbox (id, practice_id, connection_id, event_key,
                             kind, payload, next_attempt_us, received_us) ",
                    );
                    insert.push_values(chunk, |mut row, (accept, event)| {
                        row.push_bind(&event.id)
                            .push_bind(accept.practice_id.as_str())
                            .push_bind(&accept.connection_id)
                            .push_bind(&event.event_key)
                            .push("'patient'")
                            .push_bind(&event.payload)
                            .push_bind(accept.received_us)
                            .push_bind(accept.received_us);
                    });
                    insert.push(" ON CONFLICT (connection_id, event_key) DO NOTHING RETURNING id");
                    for row in insert.build().fetch_all(&mut **tx).await? {
                        written.insert(row.try_get::<String, _>("id")?);
                    }
                }
                Ok(written)
            }

            /// One notification's writes in `tx` (its patient events are in `written` if
            /// [`Self::insert_patient_events`] wrote them).
            async fn accept_one(
                tx: &mut sqlx::Transaction<'static, $db>,
                accept: &$crate::store::inbox::InboxAccept,
                written: &std::collections::HashSet<String>,
            ) -> Result<$crate::store::inbox::Accepted, sqlx::Error> {
                let mut out = $crate::store::inbox::Accepted::default();
                for event in &accept.events {
                    let stored = match event.kind {
                        $crate::store::inbox::InboxKind::Patient => written.contains(&event.id),
                        $crate::store::inbox::InboxKind::Resync => {
                            Self::insert_inbox_event(tx, accept, event).await?
                        }
                    };
                    if stored {
                        out.stored += 1;
                    } else {
                        out.duplicates += 1;
                    }
                }
                let Some(mark) = &accept.sequence else {
                    return Ok(out);
                };
                // The row exists and is locked: `accept` did both for the whole batch.
                let previous: i64 = sqlx::query_scalar(
                    "SELECT last_event FROM webhook_subscriptions
                     WHERE connection_id = $1 AND subscription = $2",
                )
                .bind(&accept.connection_id)
                .bind(&mark.subscription)
                .fetch_one(&mut **tx)
                .await?;
                out.gap = $crate::store::inbox::reveals_gap(previous, mark);
                let last = previous.max(mark.through).max(mark.first.unwrap_or(0));
                if last != previous {
                    sqlx::query(
                        "UPDATE webhook_subscriptions SET last_event = $1, updated_us = $2
                         WHERE connection_id = $3 AND subscription = $4",
                    )
                    .bind(last)
                    .bind(accept.received_us)
                    .bind(&accept.connection_id)
                    .bind(&mark.subscription)
                    .execute(&mut **tx)
                    .await?;
                }
                if let (true, Some(resync)) = (out.gap, &accept.resync_on_gap) {
                    if Self::insert_inbox_event(tx, accept, resync).await? {
                        out.stored += 1;
                    }
                }
                Ok(out)
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::inbox::InboxStore for $store {
            async fn accept(
                &self,
                accepts: &[$crate::store::inbox::InboxAccept],
            ) -> Result<Vec<$crate::store::inbox::Accepted>, $crate::store::StoreError> {
                let _turn = self.write_turn().await?;
                let mut tx = self.pool.begin().await?;
                // Subscriptions are locked in one order by every batch, so two instances'
                // batches cannot deadlock on them.
                let mut marks: Vec<(&str, &str, &str, i64)> = accepts
                    .iter()
                    .filter_map(|a| {
                        a.sequence.as_ref().map(|m| {
                            (
                                a.connection_id.as_str(),
                                m.subscription.as_str(),
                                a.practice_id.as_str(),
                                a.received_us,
                            )
                        })
                    })
                    .collect();
                marks.sort_unstable();
                marks.dedup_by(|a, b| (a.0, a.1) == (b.0, b.1));
                for (connection, subscription, practice, at) in marks {
                    sqlx::query(
                        "INSERT INTO webhook_subscriptions (connection_id, subscription,
                             practice_id, last_event, updated_us)
                         VALUES ($1, $2, $3, 0, $4)
                         ON CONFLICT (connection_id, subscription) DO NOTHING",
                    )
                    .bind(connection)
                    .bind(subscription)
                    .bind(practice)
                    .bind(at)
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query(concat!(
                        "SELECT last_event FROM webhook_subscriptions
                         WHERE connection_id = $1 AND subscription = $2",
                        $for_update
                    ))
                    .bind(connection)
                    .bind(subscription)
                    .fetch_one(&mut *tx)
                    .await?;
                }
                let written = Self::insert_patient_events(&mut tx, accepts).await?;
                let mut results = Vec::with_capacity(accepts.len());
                for accept in accepts {
                    results.push(Self::accept_one(&mut tx, accept, &written).await?);
                }
                let audit: Vec<$crate::audit::NewAuditEvent> =
                    accepts.iter().filter_map(|a| a.audit.clone()).collect();
                self.append_audit_in(&mut tx, &audit, $crate::store::now())
                    .await?;
                tx.commit().await?;
                Ok(results)
            }

            async fn claim_events(
                &self,
                runner: &str,
                now_us: i64,
                lease_until_us: i64,
                limit: i64,
            ) -> Result<Vec<$crate::store::inbox::ClaimedEvent>, $crate::store::StoreError> {
                use sqlx::Row;
                let _turn = self.write_turn().await?;
                let rows = sqlx::query(concat!(
                    "UPDATE webhook_inbox SET runner = $1, lease_until_us = $2,
                         attempts = attempts + 1
                     WHERE id IN (
                         SELECT id FROM webhook_inbox
                         WHERE status = 'pending' AND next_attempt_us <= $3
                           AND (lease_until_us IS NULL OR lease_until_us < $3)
                         ORDER BY next_attempt_us, received_us LIMIT $4",
                    $skip_locked,
                    ")
                     RETURNING id, practice_id, connection_id, kind, payload, attempts,
                         received_us"
                ))
                .bind(runner)
                .bind(lease_until_us)
                .bind(now_us)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                let mut out = Vec::with_capacity(rows.len());
                for row in rows {
                    let kind: String = row.try_get("kind")?;
                    out.push($crate::store::inbox::ClaimedEvent {
                        id: row.try_get("id")?,
                        practice_id: $crate::domain::ResourceId::from_trusted(
                            row.try_get("practice_id")?,
                        ),
                        connection_id: row.try_get("connection_id")?,
                        kind: $crate::store::inbox::InboxKind::parse(&kind),
                        payload: row.try_get("payload")?,
                        attempts: row.try_get("attempts")?,
                        received_us: row.try_get("received_us")?,
                    });
                }
                out.sort_by_key(|e| e.received_us);
                Ok(out)
            }

            async fn renew_events(
                &self,
                ids: &[String],
                runner: &str,
                lease_until_us: i64,
            ) -> Result<u64, $crate::store::StoreError> {
                if ids.is_empty() {
                    return Ok(0);
                }
                let _turn = self.write_turn().await?;
                let mut renewed = 0;
                for chunk in ids.chunks($crate::store::ROW_INSERT_CHUNK) {
                    let mut q = sqlx::QueryBuilder::<$db>::new(
                        "UPDATE webhook_inbox SET lease_until_us = ",
                    );
                    q.push_bind(lease_until_us);
                    push_held(&mut q, runner, chunk);
                    renewed += q.build().execute(&self.pool).await?.rows_affected();
                }
                Ok(renewed)
            }

            async fn complete_events(
                &self,
                ids: &[String],
                runner: &str,
                now_us: i64,
            ) -> Result<Vec<String>, $crate::store::StoreError> {
                use sqlx::Row;
                let mut done = Vec::with_capacity(ids.len());
                if ids.is_empty() {
                    return Ok(done);
                }
                let _turn = self.write_turn().await?;
                for chunk in ids.chunks($crate::store::ROW_INSERT_CHUNK) {
                    let mut q = sqlx::QueryBuilder::<$db>::new(
                        "UPDATE webhook_inbox SET status = 'done', payload = NULL, runner = NULL,
                             lease_until_us = NULL, last_error = NULL, finished_us = ",
                    );
                    q.push_bind(now_us);
                    push_held(&mut q, runner, chunk);
                    q.push(" RETURNING id");
                    for row in q.build().fetch_all(&self.pool).await? {
                        done.push(row.try_get("id")?);
                    }
                }
                Ok(done)
            }

            async fn retry_event(
                &self,
                id: &str,
                runner: &str,
                next_attempt_us: i64,
                error: &str,
            ) -> Result<bool, $crate::store::StoreError> {
                let _turn = self.write_turn().await?;
                let done = sqlx::query(
                    "UPDATE webhook_inbox SET runner = NULL, lease_until_us = NULL,
                         next_attempt_us = $1, last_error = $2
                     WHERE id = $3 AND runner = $4 AND status = 'pending'",
                )
                .bind(next_attempt_us)
                .bind(error)
                .bind(id)
                .bind(runner)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn bury_event(
                &self,
                id: &str,
                runner: &str,
                reason: &str,
                now_us: i64,
            ) -> Result<bool, $crate::store::StoreError> {
                let _turn = self.write_turn().await?;
                let done = sqlx::query(
                    "UPDATE webhook_inbox SET status = 'dead', runner = NULL,
                         lease_until_us = NULL, last_error = $1, finished_us = $2
                     WHERE id = $3 AND runner = $4 AND status = 'pending'",
                )
                .bind(reason)
                .bind(now_us)
                .bind(id)
                .bind(runner)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn release_events(&self, runner: &str) -> Result<u64, $crate::store::StoreError> {
                let _turn = self.write_turn().await?;
                let done = sqlx::query(
                    "UPDATE webhook_inbox SET runner = NULL, lease_until_us = NULL,
                         attempts = attempts - 1
                     WHERE runner = $1 AND status = 'pending'",
                )
                .bind(runner)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected())
            }

            async fn revive_dead_events(
                &self,
                connection: &str,
                now_us: i64,
            ) -> Result<u64, $crate::store::StoreError> {
                let _turn = self.write_turn().await?;
                let done = sqlx::query(
                    "UPDATE webhook_inbox SET status = 'pending', attempts = 0,
                         next_attempt_us = $1, last_error = NULL, finished_us = NULL
                     WHERE connection_id = $2 AND status = 'dead'",
                )
                .bind(now_us)
                .bind(connection)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected())
            }

            async fn list_events(
                &self,
                connection: Option<&str>,
                status: Option<&str>,
                limit: i64,
            ) -> Result<Vec<$crate::store::inbox::InboxEntry>, $crate::store::StoreError> {
                let mut q = sqlx::QueryBuilder::<$db>::new(format!(
                    "SELECT {} FROM webhook_inbox WHERE 1 = 1",
                    $crate::store::inbox::INBOX_ENTRY_COLUMNS
                ));
                if let Some(connection) = connection {
                    q.push(" AND connection_id = ").push_bind(connection);
                }
                if let Some(status) = status {
                    q.push(" AND status = ").push_bind(status);
                }
                q.push(" ORDER BY received_us, id LIMIT ").push_bind(limit);
                let rows = q.build().fetch_all(&self.pool).await?;
                Ok(rows
                    .iter()
                    .map(inbox_entry_from)
                    .collect::<Result<_, _>>()?)
            }

            async fn queue_stats(
                &self,
            ) -> Result<Vec<$crate::store::QueueStat>, $crate::store::StoreError> {
                $crate::store::fetch_queue_stats!(
                    &self.pool,
                    "SELECT connection_id, COUNT(*) AS depth, MIN(received_us) AS oldest
                     FROM webhook_inbox WHERE status = 'pending'
                     GROUP BY connection_id ORDER BY connection_id"
                )
            }
        }
    };
}
pub(crate) use shared_inbox_sql;

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(first: Option<i64>, through: i64) -> SequenceMark {
        SequenceMark {
            subscription: "Subscription/s1".into(),
            first,
            through,
        }
    }

    #[test]
    fn the_next_event_or_a_redelivery_is_no_gap() {
        assert!(!reveals_gap(0, &mark(Some(1), 1)));
        assert!(!reveals_gap(4, &mark(Some(5), 5)));
        assert!(!reveals_gap(9, &mark(Some(5), 5)), "a redelivered event");
    }

    #[test]
    fn an_event_past_the_next_one_is_a_gap() {
        assert!(reveals_gap(1, &mark(Some(3), 3)));
        assert!(
            reveals_gap(0, &mark(Some(2), 2)),
            "the first event was never seen"
        );
    }

    #[test]
    fn a_heartbeat_counting_more_events_than_delivered_is_a_gap() {
        assert!(!reveals_gap(0, &mark(None, 0)), "a handshake");
        assert!(!reveals_gap(2, &mark(None, 2)));
        assert!(reveals_gap(2, &mark(None, 3)));
    }
}
