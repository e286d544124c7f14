//! Job runs (nightly pulls), the quarantine of EHR records that did not map, and the digests
//! that tell a pull what changed. The SQL is written once, in [`shared_job_sql!`], and expanded in
//! each backend's module.
//!
//! One runner across instances comes from the database, not from the process: a run holds its
//! connection while it is `running` (a partial unique index allows one) and its lease is alive;
//! a scheduled run names its slot (unique), so the same slot never runs twice; a run whose lease
//! ran out is taken over by a conditional UPDATE, which only one instance can win. Nothing here
//! holds PHI in clear: quarantined JSON arrives sealed, digests are keyed hashes.

use std::collections::HashMap;

use async_trait::async_trait;
use serde::Serialize;

use super::{QueueStat, StoreError};
use crate::domain::ResourceId;

/// A run to start.
#[derive(Debug, Clone)]
pub struct NewJobRun {
    pub id: String,
    pub practice_id: ResourceId,
    pub connection_id: String,
    pub kind: &'static str,
    /// `schedule`, `startup` (a missed slot) or `manual`.
    pub started_by: &'static str,
    /// The schedule slot a scheduled run is for (microseconds since the epoch).
    pub scheduled_for_us: Option<i64>,
    pub runner: String,
    pub lease_until_us: i64,
    /// The watermark the run starts from.
    pub since: Option<String>,
}

/// The digests of pulled resources of one connection and type (`sync_digests`), written with
/// the resources themselves ([`Store::write_pulled_resources`](crate::store::Store)).
#[derive(Debug, Clone, Copy)]
pub struct SyncDigests<'a> {
    pub connection: &'a str,
    pub resource_type: &'a str,
    pub digests: &'a [(String, [u8; 32])],
}

/// Counts a run has reached (committed pages only).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RunCounts {
    pub pages: i64,
    pub received: i64,
    pub created: i64,
    pub updated: i64,
    pub unchanged: i64,
    pub failed: i64,
    pub coverages: i64,
}

/// A job run as stored.
#[derive(Debug, Clone, Serialize)]
pub struct JobRun {
    pub id: String,
    pub practice_id: String,
    pub connection_id: String,
    pub kind: String,
    /// `running`, `succeeded` or `failed`.
    pub status: String,
    pub started_by: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduled_for_us: Option<i64>,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: time::OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<time::OffsetDateTime>,
    #[serde(flatten)]
    pub counts: RunCounts,
    /// Where a resumed run starts: the watermark after the last committed page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// A fixed phrase or error kind, never data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How many times the run was started (1, plus one per take-over after a crash).
    pub attempts: i64,
    #[serde(skip)]
    pub runner: Option<String>,
    #[serde(skip)]
    pub lease_until_us: Option<i64>,
}

/// A record to keep out of the store, with the reason.
#[derive(Debug, Clone)]
pub struct QuarantineRow {
    pub id: String,
    pub practice_id: ResourceId,
    pub connection_id: String,
    pub run_id: Option<String>,
    pub resource_type: String,
    pub local_id: String,
    pub reason: String,
    /// The EHR's JSON, sealed with AAD `sync_quarantine.payload:{connection}/{type}/{local id}`
    /// (stable for the record, so a record seen again can replace it).
    pub payload: Vec<u8>,
}

/// A quarantined record as listed (its sealed JSON stays in the database).
#[derive(Debug, Clone, Serialize)]
pub struct QuarantinedRecord {
    pub id: String,
    pub connection_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    pub resource_type: String,
    pub reason: String,
    pub seen_count: i64,
    pub first_seen_us: i64,
    pub last_seen_us: i64,
}

#[async_trait]
pub trait JobStore: Send + Sync {
    /// Starts a run; `None` when its connection already has a running run of that kind or its
    /// schedule slot has a run already.
    async fn start_run(&self, new: &NewJobRun) -> Result<Option<JobRun>, StoreError>;
    /// Running runs whose lease ran out before `now_us` (their runner died).
    async fn orphaned_runs(&self, now_us: i64) -> Result<Vec<JobRun>, StoreError>;
    /// Gives an orphaned run to `runner` (one instance wins); the run as claimed.
    async fn take_over_run(
        &self,
        id: &str,
        runner: &str,
        lease_until_us: i64,
        now_us: i64,
    ) -> Result<Option<JobRun>, StoreError>;
    /// Records a committed page: counts, checkpoint and a renewed lease; `false` when `runner`
    /// no longer holds the run (it must stop).
    async fn record_progress(
        &self,
        id: &str,
        runner: &str,
        counts: &RunCounts,
        checkpoint: Option<&str>,
        lease_until_us: i64,
    ) -> Result<bool, StoreError>;
    /// Extends (or, with 0, hands back) the lease of a run `runner` holds; `false` when it no
    /// longer holds it.
    async fn renew_lease(
        &self,
        id: &str,
        runner: &str,
        lease_until_us: i64,
    ) -> Result<bool, StoreError>;
    /// Ends a run held by `runner`; a succeeded run with a `watermark` moves its connection's
    /// watermark there, in the same transaction. `false` when the run was not held.
    async fn finish_run(
        &self,
        id: &str,
        runner: &str,
        succeeded: bool,
        counts: &RunCounts,
        error: Option<&str>,
        watermark: Option<&str>,
    ) -> Result<bool, StoreError>;
    async fn get_run(&self, id: &str) -> Result<JobRun, StoreError>;
    /// Runs, newest first, of one practice and/or connection.
    async fn list_runs(
        &self,
        practice: Option<&ResourceId>,
        connection: Option<&str>,
        limit: i64,
    ) -> Result<Vec<JobRun>, StoreError>;
    /// The newest run of a connection (any status).
    async fn last_run(&self, connection: &str, kind: &str) -> Result<Option<JobRun>, StoreError>;

    /// Keeps records (one row per EHR record: seen again, its row is refreshed).
    async fn quarantine(&self, rows: &[QuarantineRow]) -> Result<(), StoreError>;
    /// Removes the quarantine rows of records that have now been admitted.
    async fn release_quarantine(
        &self,
        connection: &str,
        resource_type: &str,
        local_ids: &[String],
    ) -> Result<(), StoreError>;
    async fn list_quarantine(
        &self,
        practice: Option<&ResourceId>,
        connection: Option<&str>,
        limit: i64,
    ) -> Result<Vec<QuarantinedRecord>, StoreError>;
    /// Quarantined records per connection, and when the oldest was first seen.
    async fn quarantine_stats(&self) -> Result<Vec<QueueStat>, StoreError>;

    /// The stored digests of `local_ids`.
    async fn digests(
        &self,
        connection: &str,
        resource_type: &str,
        local_ids: &[String],
    ) -> Result<HashMap<String, Vec<u8>>, StoreError>;
    async fn save_digests(
        &self,
        practice: &ResourceId,
        connection: &str,
        resource_type: &str,
        digests: &[(String, [u8; 32])],
    ) -> Result<(), StoreError>;
}

pub(crate) const JOB_COLUMNS: &str = "id, practice_id, connection_id, kind, status, started_by, \
    scheduled_for_us, started_at, finished_at, pages, received_count, created_count, \
    updated_count, unchanged_count, failed_count, coverage_count, checkpoint, since, error, \
    attempts, runner, lease_until_us";

/// Rows per multi-row INSERT (at most 8 parameters each).
pub(crate) const JOB_INSERT_CHUNK: usize = 1000;

/// Microseconds since the epoch of a time.
pub(crate) fn micros(at: time::OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos() / 1_000).unwrap_or(i64::MAX)
}

macro_rules! shared_job_sql {
    ($store:ty, $db:ty, $row:ty) => {
        fn job_run_from(row: &$row) -> Result<$crate::store::JobRun, sqlx::Error> {
            use sqlx::Row;
            Ok($crate::store::JobRun {
                id: row.try_get("id")?,
                practice_id: row.try_get("practice_id")?,
                connection_id: row.try_get::<Option<String>, _>("connection_id")?.unwrap_or_default(),
                kind: row.try_get("kind")?,
                status: row.try_get("status")?,
                started_by: row.try_get("started_by")?,
                scheduled_for_us: row.try_get("scheduled_for_us")?,
                started_at: row.try_get("started_at")?,
                finished_at: row.try_get("finished_at")?,
                counts: $crate::store::RunCounts {
                    pages: row.try_get("pages")?,
                    received: row.try_get("received_count")?,
                    created: row.try_get("created_count")?,
                    updated: row.try_get("updated_count")?,
                    unchanged: row.try_get("unchanged_count")?,
                    failed: row.try_get("failed_count")?,
                    coverages: row.try_get("coverage_count")?,
                },
                checkpoint: row.try_get("checkpoint")?,
                since: row.try_get("since")?,
                error: row.try_get("error")?,
                attempts: row.try_get("attempts")?,
                runner: row.try_get("runner")?,
                lease_until_us: row.try_get("lease_until_us")?,
            })
        }

        impl $store {
            /// Upserts pulled resources' digests inside `tx` (the caller commits).
            pub(crate) async fn save_digests_in(
                tx: &mut sqlx::Transaction<'_, $db>,
                practice: &$crate::domain::ResourceId,
                d: &$crate::store::SyncDigests<'_>,
            ) -> Result<(), $crate::store::StoreError> {
                let (connection, resource_type, digests) = (d.connection, d.resource_type, d.digests);
                let now_us = $crate::store::jobs::micros($crate::store::now());
                for chunk in digests.chunks($crate::store::jobs::JOB_INSERT_CHUNK) {
                    let mut q = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO sync_digests (connection_id, resource_type, local_id,
                             practice_id, digest, updated_us) ",
                    );
                    q.push_values(chunk, |mut b, (id, digest)| {
                        b.push_bind(connection)
                            .push_bind(resource_type)
                            .push_bind(id)
                            .push_bind(practice.as_str())
                            .push_bind(digest.to_vec())
                            .push_bind(now_us);
                    });
                    q.push(
                        " ON CONFLICT (connection_id, resource_type, local_id) DO UPDATE SET
                             digest = excluded.digest, updated_us = excluded.updated_us",
                    );
                    q.build().execute(&mut **tx).await?;
                }
                Ok(())
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::JobStore for $store {
            async fn start_run(
                &self,
                new: &$crate::store::NewJobRun,
            ) -> Result<Option<$crate::store::JobRun>, $crate::store::StoreError> {
                // One writer at a time on SQLite: a lease renewal committing between a page
                // write's read and its write would fail that write (SQLITE_BUSY_SNAPSHOT).
                let _turn = self.write_turn().await?;
                let inserted = sqlx::query(
                    "INSERT INTO job_runs (id, practice_id, connection_id, kind, status,
                         started_by, scheduled_for_us, started_at, runner, lease_until_us, since,
                         checkpoint)
                     VALUES ($1, $2, $3, $4, 'running', $5, $6, $7, $8, $9, $10, $10)",
                )
                .bind(&new.id)
                .bind(new.practice_id.as_str())
                .bind(&new.connection_id)
                .bind(new.kind)
                .bind(new.started_by)
                .bind(new.scheduled_for_us)
                .bind($crate::store::now())
                .bind(&new.runner)
                .bind(new.lease_until_us)
                .bind(&new.since)
                .execute(&self.pool)
                .await;
                match inserted.map_err($crate::store::StoreError::from) {
                    Ok(_) => Ok(Some(self.get_run(&new.id).await?)),
                    Err($crate::store::StoreError::Conflict(_)) => Ok(None),
                    Err(e) => Err(e),
                }
            }

            async fn orphaned_runs(
                &self,
                now_us: i64,
            ) -> Result<Vec<$crate::store::JobRun>, $crate::store::StoreError> {
                let rows = sqlx::query(&format!(
                    "SELECT {} FROM job_runs WHERE status = 'running'
                       AND (lease_until_us IS NULL OR lease_until_us < $1)
                     ORDER BY started_at, id",
                    $crate::store::JOB_COLUMNS
                ))
                .bind(now_us)
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.iter().map(job_run_from).collect::<Result<_, _>>()?)
            }

            async fn take_over_run(
                &self,
                id: &str,
                runner: &str,
                lease_until_us: i64,
                now_us: i64,
            ) -> Result<Option<$crate::store::JobRun>, $crate::store::StoreError> {
                // One writer at a time on SQLite: a lease renewal committing between a page
                // write's read and its write would fail that write (SQLITE_BUSY_SNAPSHOT).
                let _turn = self.write_turn().await?;
                let done = sqlx::query(
                    "UPDATE job_runs SET runner = $1, lease_until_us = $2, attempts = attempts + 1
                     WHERE id = $3 AND status = 'running'
                       AND (lease_until_us IS NULL OR lease_until_us < $4)",
                )
                .bind(runner)
                .bind(lease_until_us)
                .bind(id)
                .bind(now_us)
                .execute(&self.pool)
                .await?;
                if done.rows_affected() == 0 {
                    return Ok(None);
                }
                Ok(Some(self.get_run(id).await?))
            }

            async fn record_progress(
                &self,
                id: &str,
                runner: &str,
                counts: &$crate::store::RunCounts,
                checkpoint: Option<&str>,
                lease_until_us: i64,
            ) -> Result<bool, $crate::store::StoreError> {
                // One writer at a time on SQLite: a lease renewal committing between a page
                // write's read and its write would fail that write (SQLITE_BUSY_SNAPSHOT).
                let _turn = self.write_turn().await?;
                let done = sqlx::query(
                    "UPDATE job_runs SET pages = $1, received_count = $2, created_count = $3,
                         updated_count = $4, unchanged_count = $5, failed_count = $6,
                         coverage_count = $7, checkpoint = COALESCE($8, checkpoint),
                         lease_until_us = $9
                     WHERE id = $10 AND runner = $11 AND status = 'running'",
                )
                .bind(counts.pages)
                .bind(counts.received)
                .bind(counts.created)
                .bind(counts.updated)
                .bind(counts.unchanged)
                .bind(counts.failed)
                .bind(counts.coverages)
                .bind(checkpoint)
                .bind(lease_until_us)
                .bind(id)
                .bind(runner)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn renew_lease(
                &self,
                id: &str,
                runner: &str,
                lease_until_us: i64,
            ) -> Result<bool, $crate::store::StoreError> {
                // One writer at a time on SQLite: a lease renewal committing between a page
                // write's read and its write would fail that write (SQLITE_BUSY_SNAPSHOT).
                let _turn = self.write_turn().await?;
                let done = sqlx::query(
                    "UPDATE job_runs SET lease_until_us = $1
                     WHERE id = $2 AND runner = $3 AND status = 'running'",
                )
                .bind(lease_until_us)
                .bind(id)
                .bind(runner)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn finish_run(
                &self,
                id: &str,
                runner: &str,
                succeeded: bool,
                counts: &$crate::store::RunCounts,
                error: Option<&str>,
                watermark: Option<&str>,
            ) -> Result<bool, $crate::store::StoreError> {
                // One writer at a time on SQLite: a lease renewal committing between a page
                // write's read and its write would fail that write (SQLITE_BUSY_SNAPSHOT).
                let _turn = self.write_turn().await?;
                let mut tx = self.pool.begin().await?;
                let done = sqlx::query(
                    "UPDATE job_runs SET status = $1, finished_at = $2, pages = $3,
                         received_count = $4, created_count = $5, updated_count = $6,
                         unchanged_count = $7, failed_count = $8, coverage_count = $9,
                         error = $10, checkpoint = COALESCE($11, checkpoint),
                         runner = NULL, lease_until_us = NULL
                     WHERE id = $12 AND runner = $13 AND status = 'running'",
                )
                .bind(if succeeded { "succeeded" } else { "failed" })
                .bind($crate::store::now())
                .bind(counts.pages)
                .bind(counts.received)
                .bind(counts.created)
                .bind(counts.updated)
                .bind(counts.unchanged)
                .bind(counts.failed)
                .bind(counts.coverages)
                .bind(error)
                .bind(watermark)
                .bind(id)
                .bind(runner)
                .execute(&mut *tx)
                .await?;
                if done.rows_affected() == 0 {
                    return Ok(false);
                }
                if let (true, Some(watermark)) = (succeeded, watermark) {
                    sqlx::query(
                        "UPDATE ehr_connections SET watermark = $1, updated_at = $2
                         WHERE id = (SELECT connection_id FROM job_runs WHERE id = $3)",
                    )
                    .bind(watermark)
                    .bind($crate::store::now())
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(true)
            }

            async fn get_run(
                &self,
                id: &str,
            ) -> Result<$crate::store::JobRun, $crate::store::StoreError> {
                let row = sqlx::query(&format!(
                    "SELECT {} FROM job_runs WHERE id = $1",
                    $crate::store::JOB_COLUMNS
                ))
                .bind(id)
                .fetch_one(&self.pool)
                .await?;
                Ok(job_run_from(&row)?)
            }

            async fn list_runs(
                &self,
                practice: Option<&$crate::domain::ResourceId>,
                connection: Option<&str>,
                limit: i64,
            ) -> Result<Vec<$crate::store::JobRun>, $crate::store::StoreError> {
                let mut q = sqlx::QueryBuilder::<$db>::new(format!(
                    "SELECT {} FROM job_runs WHERE 1 = 1",
                    $crate::store::JOB_COLUMNS
                ));
                if let Some(practice) = practice {
                    q.push(" AND practice_id = ").push_bind(practice.as_str());
                }
                if let Some(connection) = connection {
                    q.push(" AND connection_id = ").push_bind(connection);
                }
                q.push(" ORDER BY started_at DESC, id DESC LIMIT ")
                    .push_bind(limit);
                let rows = q.build().fetch_all(&self.pool).await?;
                Ok(rows.iter().map(job_run_from).collect::<Result<_, _>>()?)
            }

            async fn last_run(
                &self,
                connection: &str,
                kind: &str,
            ) -> Result<Option<$crate::store::JobRun>, $crate::store::StoreError> {
                let row = sqlx::query(&format!(
                    "SELECT {} FROM job_runs WHERE connection_id = $1 AND kind = $2
                     ORDER BY started_at DESC, id DESC LIMIT 1",
                    $crate::store::JOB_COLUMNS
                ))
                .bind(connection)
                .bind(kind)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.as_ref().map(job_run_from).transpose()?)
            }

            async fn quarantine(
                &self,
                rows: &[$crate::store::QuarantineRow],
            ) -> Result<(), $crate::store::StoreError> {
                // One writer at a time on SQLite: a lease renewal committing between a page
                // write's read and its write would fail that write (SQLITE_BUSY_SNAPSHOT).
                let _turn = self.write_turn().await?;
                if rows.is_empty() {
                    return Ok(());
                }
                let now_us = $crate::store::jobs::micros($crate::store::now());
                let mut tx = self.pool.begin().await?;
                for chunk in rows.chunks($crate::store::jobs::JOB_INSERT_CHUNK) {
                    let mut q = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO sync_quarantine (id, practice_id, connection_id, run_id,
                             resource_type, local_id, reason, payload, first_seen_us,
                             last_seen_us) ",
                    );
                    q.push_values(chunk, |mut b, r| {
                        b.push_bind(&r.id)
                            .push_bind(r.practice_id.as_str())
                            .push_bind(&r.connection_id)
                            .push_bind(&r.run_id)
                            .push_bind(&r.resource_type)
                            .push_bind(&r.local_id)
                            .push_bind(&r.reason)
                            .push_bind(&r.payload)
                            .push_bind(now_us)
                            .push_bind(now_us);
                    });
                    // A record seen again keeps its row (and id) with the latest reason and JSON.
                    q.push(
                        " ON CONFLICT (connection_id, resource_type, local_id) DO UPDATE SET
                             seen_count = sync_quarantine.seen_count + 1,
                             last_seen_us = excluded.last_seen_us, reason = excluded.reason,
                             run_id = excluded.run_id, payload = excluded.payload",
                    );
                    q.build().execute(&mut *tx).await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn release_quarantine(
                &self,
                connection: &str,
                resource_type: &str,
                local_ids: &[String],
            ) -> Result<(), $crate::store::StoreError> {
                // One writer at a time on SQLite: a lease renewal committing between a page
                // write's read and its write would fail that write (SQLITE_BUSY_SNAPSHOT).
                let _turn = self.write_turn().await?;
                for chunk in local_ids.chunks($crate::store::jobs::JOB_INSERT_CHUNK) {
                    let mut q = sqlx::QueryBuilder::<$db>::new(
                        "DELETE FROM sync_quarantine WHERE connection_id = ",
                    );
                    q.push_bind(connection)
                        .push(" AND resource_type = ")
                        .push_bind(resource_type)
                        .push(" AND local_id IN (");
                    let mut ids = q.separated(", ");
                    for id in chunk {
                        ids.push_bind(id);
                    }
                    q.push(")");
                    q.build().execute(&self.pool).await?;
                }
                Ok(())
            }

            async fn list_quarantine(
                &self,
                practice: Option<&$crate::domain::ResourceId>,
                connection: Option<&str>,
                limit: i64,
            ) -> Result<Vec<$crate::store::QuarantinedRecord>, $crate::store::StoreError> {
                use sqlx::Row;
                let mut q = sqlx::QueryBuilder::<$db>::new(
                    "SELECT id, connection_id, run_id, resource_type, reason, seen_count,
                         first_seen_us, last_seen_us
                     FROM sync_quarantine WHERE 1 = 1",
                );
                if let Some(practice) = practice {
                    q.push(" AND practice_id = ").push_bind(practice.as_str());
                }
                if let Some(connection) = connection {
                    q.push(" AND connection_id = ").push_bind(connection);
                }
                q.push(" ORDER BY first_seen_us, id LIMIT ").push_bind(limit);
                let rows = q.build().fetch_all(&self.pool).await?;
                let mut out = Vec::with_capacity(rows.len());
                for row in rows {
                    out.push($crate::store::QuarantinedRecord {
                        id: row.try_get("id")?,
                        connection_id: row.try_get("connection_id")?,
                        run_id: row.try_get("run_id")?,
                        resource_type: row.try_get("resource_type")?,
                        reason: row.try_get("reason")?,
                        seen_count: row.try_get("seen_count")?,
                        first_seen_us: row.try_get("first_seen_us")?,
                        last_seen_us: row.try_get("last_seen_us")?,
                    });
                }
                Ok(out)
            }

            async fn quarantine_stats(
                &self,
            ) -> Result<Vec<$crate::store::QueueStat>, $crate::store::StoreError> {
                $crate::store::fetch_queue_stats!(
                    &self.pool,
                    "SELECT connection_id, COUNT(*) AS depth, MIN(first_seen_us) AS oldest
                     FROM sync_quarantine GROUP BY connection_id ORDER BY connection_id"
                )
            }

            async fn digests(
                &self,
                connection: &str,
                resource_type: &str,
                local_ids: &[String],
            ) -> Result<std::collections::HashMap<String, Vec<u8>>, $crate::store::StoreError>
            {
                use sqlx::Row;
                let mut out = std::collections::HashMap::with_capacity(local_ids.len());
                for chunk in local_ids.chunks($crate::store::jobs::JOB_INSERT_CHUNK) {
                    let mut q = sqlx::QueryBuilder::<$db>::new(
                        "SELECT local_id, digest FROM sync_digests WHERE connection_id = ",
                    );
                    q.push_bind(connection)
                        .push(" AND resource_type = ")
                        .push_bind(resource_type)
                        .push(" AND local_id IN (");
                    let mut ids = q.separated(", ");
                    for id in chunk {
                        ids.push_bind(id);
                    }
                    q.push(")");
                    for row in q.build().fetch_all(&self.pool).await? {
                        out.insert(row.try_get("local_id")?, row.try_get("digest")?);
                    }
                }
                Ok(out)
            }

            async fn save_digests(
                &self,
                practice: &$crate::domain::ResourceId,
                connection: &str,
                resource_type: &str,
                digests: &[(String, [u8; 32])],
            ) -> Result<(), $crate::store::StoreError> {
                // One writer at a time on SQLite: a lease renewal committing between a page
                // write's read and its write would fail that write (SQLITE_BUSY_SNAPSHOT).
                let _turn = self.write_turn().await?;
                if digests.is_empty() {
                    return Ok(());
                }
                let mut tx = self.pool.begin().await?;
                let digests = $crate::store::SyncDigests {
                    connection,
                    resource_type,
                    digests,
                };
                Self::save_digests_in(&mut tx, practice, &digests).await?;
                tx.commit().await?;
                Ok(())
            }
        }
    };
}
pub(crate) use shared_job_sql;
