//! Bulk export jobs (`$export`) as the store keeps them: the job with the cursor of what is
//! sealed so far, and its output as sealed chunks. The SQL is written once, in
//! [`shared_export_sql!`], and expanded in each backend's module (as `shared_resource_sql!` is),
//! where it implements [`ExportStore`].
//!
//! The store never sees plaintext: chunks arrive sealed. Every step a runner commits is
//! conditional on it still holding the job (same runner, lease not taken over), in the same
//! transaction as the chunk it carries, so a cancelled (deleted) or taken-over job never gains
//! a chunk afterwards.

use async_trait::async_trait;

use super::{StoreError, StoredVersion};
use crate::domain::ResourceId;

/// Where an export starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportLevel {
    /// `/$export`: every exported type of the practice.
    System,
    /// `/Patient/$export`: every patient and their compartments.
    Patient,
    /// `/Group/{id}/$export`: the group's patient members and their compartments.
    Group,
}

impl ExportLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            ExportLevel::System => "system",
            ExportLevel::Patient => "patient",
            ExportLevel::Group => "group",
        }
    }

    pub(crate) fn parse(text: &str) -> Self {
        match text {
            "patient" => ExportLevel::Patient,
            "group" => ExportLevel::Group,
            _ => ExportLevel::System,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportStatus {
    /// Waiting for a runner.
    Accepted,
    Running,
    Complete,
    Failed,
}

impl ExportStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ExportStatus::Accepted => "accepted",
            ExportStatus::Running => "running",
            ExportStatus::Complete => "complete",
            ExportStatus::Failed => "failed",
        }
    }

    pub(crate) fn parse(text: &str) -> Self {
        match text {
            "running" => ExportStatus::Running,
            "complete" => ExportStatus::Complete,
            "failed" => ExportStatus::Failed,
            _ => ExportStatus::Accepted,
        }
    }
}

/// A job as the kick-off creates it.
#[derive(Debug, Clone)]
pub struct NewExportJob {
    pub id: String,
    pub practice: ResourceId,
    pub client_id: String,
    pub level: ExportLevel,
    pub group_id: Option<String>,
    pub types: Vec<String>,
    pub since_us: Option<i64>,
    pub transaction_time_us: i64,
    pub request_url: String,
    pub created_us: i64,
}

/// The cursor of what a job has sealed: a runner resumes from here, and it moves only with the
/// chunks it describes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportCursor {
    /// The type being exported (index into the job's types).
    pub type_index: usize,
    /// The (last_updated_us, id) of the last resource sealed of that type.
    pub after: Option<(i64, String)>,
    /// The file being written (numbered across the job) and what it holds so far.
    pub file_no: i64,
    pub file_resources: i64,
    /// The next chunk's number in that file.
    pub chunk_no: i64,
    /// Resources of the current type sealed, and of every type.
    pub type_exported: i64,
    pub exported: i64,
}

#[derive(Debug, Clone)]
pub struct ExportJob {
    pub id: String,
    pub practice: ResourceId,
    pub client_id: String,
    pub level: ExportLevel,
    pub group_id: Option<String>,
    pub types: Vec<String>,
    pub since_us: Option<i64>,
    pub transaction_time_us: i64,
    pub request_url: String,
    pub status: ExportStatus,
    pub cursor: ExportCursor,
    pub progress: i64,
    pub attempts: i64,
    pub error: Option<String>,
    pub created_us: i64,
    pub finished_us: Option<i64>,
    pub expires_us: Option<i64>,
}

/// One output file of a finished job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportFile {
    pub file_no: i64,
    pub resource_type: String,
    pub resources: i64,
    pub chunks: i64,
}

/// A sealed chunk of NDJSON: whole lines of one file.
#[derive(Debug, Clone)]
pub struct SealedChunk {
    pub file_no: i64,
    pub chunk_no: i64,
    pub resource_type: String,
    pub resources: i64,
    pub key_id: String,
    pub content: Vec<u8>,
}

/// What a runner commits after a page: always its lease and progress; with `sealed`, a new
/// cursor and the chunk (if any) that brought it there.
#[derive(Debug, Clone)]
pub struct ExportStep {
    pub lease_until_us: i64,
    pub progress: i64,
    pub sealed: Option<(ExportCursor, Option<SealedChunk>)>,
}

/// How a job ends.
#[derive(Debug, Clone)]
pub enum ExportEnd {
    Complete {
        expires_us: i64,
    },
    /// `error` is a fixed phrase, never data.
    Failed {
        error: String,
        expires_us: i64,
    },
}

/// Which resources of a type an export reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportScope {
    /// Every current resource of the type.
    All,
    /// Resources whose `param` index row names a current Patient of the practice (the patient
    /// compartment).
    Compartment { param: &'static str },
    /// The Patients named by the group's `member_param` index rows.
    GroupMembers {
        group_id: String,
        member_param: &'static str,
    },
    /// Resources whose `param` index row names a current Patient member of the group.
    GroupCompartment {
        group_id: String,
        member_param: &'static str,
        param: &'static str,
    },
}

/// One page of an export: current, non-deleted resources of one type last updated in
/// (`since_us`, `until_us`], in (last_updated_us, id) order after `after`.
#[derive(Debug, Clone)]
pub struct ExportQuery {
    pub practice: ResourceId,
    pub resource_type: String,
    pub scope: ExportScope,
    pub since_us: Option<i64>,
    pub until_us: i64,
    pub after: Option<(i64, String)>,
    pub limit: i64,
}

/// What bulk export asks of the database.
#[async_trait]
pub trait ExportStore: Send + Sync {
    async fn create_export_job(&self, job: &NewExportJob) -> Result<(), StoreError>;
    /// A job of the practice (`None`: no such job there).
    async fn export_job(
        &self,
        practice: &ResourceId,
        id: &str,
    ) -> Result<Option<ExportJob>, StoreError>;
    /// The job's files, in order.
    async fn export_files(
        &self,
        practice: &ResourceId,
        id: &str,
    ) -> Result<Vec<ExportFile>, StoreError>;
    /// One sealed chunk (`None`: no such chunk, or the job is gone).
    async fn export_chunk(
        &self,
        practice: &ResourceId,
        id: &str,
        file_no: i64,
        chunk_no: i64,
    ) -> Result<Option<Vec<u8>>, StoreError>;
    /// Deletes a job and its output; `false` when there was no such job.
    async fn delete_export_job(&self, practice: &ResourceId, id: &str) -> Result<bool, StoreError>;
    /// Gives the job to `runner` until `lease_until_us` if it is unfinished and nobody holds it
    /// (no lease, or one that ran out before `now_us`); the job as claimed, or `None`.
    async fn claim_export_job(
        &self,
        practice: &ResourceId,
        id: &str,
        runner: &str,
        now_us: i64,
        lease_until_us: i64,
    ) -> Result<Option<ExportJob>, StoreError>;
    /// Commits a runner's step if it still holds the job; `false` when it does not (the job was
    /// cancelled, or its lease ran out and another runner took it).
    async fn advance_export_job(
        &self,
        practice: &ResourceId,
        id: &str,
        runner: &str,
        step: &ExportStep,
    ) -> Result<bool, StoreError>;
    /// Ends a job the runner holds; `false` when it no longer does.
    async fn finish_export_job(
        &self,
        practice: &ResourceId,
        id: &str,
        runner: &str,
        end: &ExportEnd,
        now_us: i64,
    ) -> Result<bool, StoreError>;
    /// Unfinished jobs nobody holds at `now_us` (all practices), oldest first.
    async fn orphaned_export_jobs(
        &self,
        now_us: i64,
        limit: i64,
    ) -> Result<Vec<(ResourceId, String)>, StoreError>;
    /// Deletes the jobs (and output) that expired before `now_us` (all practices).
    async fn expire_export_jobs(&self, now_us: i64) -> Result<u64, StoreError>;
    /// One page of resources to export.
    async fn export_resources(&self, query: &ExportQuery)
        -> Result<Vec<StoredVersion>, StoreError>;
}

pub(crate) const JOB_COLUMNS: &str = "id, practice_id, client_id, level, group_id, types, \
    since_us, transaction_time_us, request_url, status, type_index, after_us, after_id, file_no, \
    file_resources, chunk_no, type_exported, exported, progress, attempts, error, created_us, \
    finished_us, expires_us";

/// The SQL of [`ExportStore`], shared by both backends and expanded in each backend's module
/// (so it reaches the store's pool, tenant transactions and write turn). `$N` placeholders are
/// introduced in ascending order (SQLite numbers them by first appearance).
macro_rules! shared_export_sql {
    ($store:ty, $db:ty, $row:ty) => {
        /// An export job from a row of `JOB_COLUMNS`.
        fn export_job_from(row: &$row) -> Result<$crate::store::ExportJob, sqlx::Error> {
            use sqlx::Row;
            use $crate::store::{ExportCursor, ExportJob, ExportLevel, ExportStatus};
            let types: String = row.try_get("types")?;
            let after_us: Option<i64> = row.try_get("after_us")?;
            let after_id: Option<String> = row.try_get("after_id")?;
            let level: String = row.try_get("level")?;
            let status: String = row.try_get("status")?;
            let small = |name: &str| -> Result<i64, sqlx::Error> {
                let n: i32 = row.try_get(name)?;
                Ok(i64::from(n))
            };
            Ok(ExportJob {
                id: row.try_get("id")?,
                practice: $crate::domain::ResourceId::from_trusted(row.try_get("practice_id")?),
                client_id: row.try_get("client_id")?,
                level: ExportLevel::parse(&level),
                group_id: row.try_get("group_id")?,
                types: types
                    .split(',')
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned)
                    .collect(),
                since_us: row.try_get("since_us")?,
                transaction_time_us: row.try_get("transaction_time_us")?,
                request_url: row.try_get("request_url")?,
                status: ExportStatus::parse(&status),
                cursor: ExportCursor {
                    type_index: usize::try_from(small("type_index")?).unwrap_or(0),
                    after: after_us.zip(after_id),
                    file_no: small("file_no")?,
                    file_resources: row.try_get("file_resources")?,
                    chunk_no: small("chunk_no")?,
                    type_exported: row.try_get("type_exported")?,
                    exported: row.try_get("exported")?,
                },
                progress: row.try_get("progress")?,
                attempts: small("attempts")?,
                error: row.try_get("error")?,
                created_us: row.try_get("created_us")?,
                finished_us: row.try_get("finished_us")?,
                expires_us: row.try_get("expires_us")?,
            })
        }

        /// The export scope as a condition on `r` (a `resources` row).
        fn push_export_scope(
            q: &mut sqlx::QueryBuilder<'_, $db>,
            scope: &$crate::store::ExportScope,
        ) {
            use $crate::store::ExportScope;
            // A current (not deleted) Patient of the practice named by `s.value`.
            const LIVE_PATIENT: &str = " JOIN resources p ON p.practice_id = s.practice_id \
                AND p.resource_type = 'Patient' AND p.id = s.value AND p.deleted = ";
            match scope {
                ExportScope::All => {}
                // EXISTS, correlated: the page walks `resources` in key order and probes the
                // index once per row, so a whole export is one pass over the type.
                ExportScope::Compartment { param } => {
                    q.push(" AND EXISTS (SELECT 1 FROM search_index s")
                        .push(LIVE_PATIENT)
                        .push_bind(false)
                        .push(
                            " WHERE s.practice_id = r.practice_id AND s.resource_type = r.resource_type \
                             AND s.resource_id = r.id AND s.param = ",
                        )
                        .push_bind(*param)
                        .push(")");
                }
                ExportScope::GroupMembers {
                    group_id,
                    member_param,
                } => {
                    q.push(
                        " AND EXISTS (SELECT 1 FROM search_index g WHERE g.practice_id = r.practice_id \
                         AND g.resource_type = 'Group' AND g.param = ",
                    )
                    .push_bind(*member_param)
                    .push(" AND g.value = r.id AND g.resource_id = ")
                    .push_bind(group_id.clone())
                    .push(")");
                }
                ExportScope::GroupCompartment {
                    group_id,
                    member_param,
                    param,
                } => {
                    q.push(" AND EXISTS (SELECT 1 FROM search_index s")
                        .push(LIVE_PATIENT)
                        .push_bind(false)
                        .push(
                            " JOIN search_index g ON g.practice_id = s.practice_id \
                             AND g.resource_type = 'Group' AND g.value = s.value AND g.param = ",
                        )
                        .push_bind(*member_param)
                        .push(" AND g.resource_id = ")
                        .push_bind(group_id.clone())
                        .push(
                            " WHERE s.practice_id = r.practice_id AND s.resource_type = r.resource_type \
                             AND s.resource_id = r.id AND s.param = ",
                        )
                        .push_bind(*param)
                        .push(")");
                }
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::ExportStore for $store {
            async fn create_export_job(
                &self,
                job: &$crate::store::NewExportJob,
            ) -> Result<(), $crate::store::StoreError> {
                let _turn = self.write_turn().await?;
                let mut tx = self.begin_for(&job.practice).await?;
                sqlx::query(
                    "INSERT INTO export_jobs (id, practice_id, client_id, level, group_id, types,
                         since_us, transaction_time_us, request_url, status, created_us)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'accepted', $10)",
                )
                .bind(&job.id)
                .bind(job.practice.as_str())
                .bind(&job.client_id)
                .bind(job.level.as_str())
                .bind(&job.group_id)
                .bind(job.types.join(","))
                .bind(job.since_us)
                .bind(job.transaction_time_us)
                .bind(&job.request_url)
                .bind(job.created_us)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn export_job(
                &self,
                practice: &$crate::domain::ResourceId,
                id: &str,
            ) -> Result<Option<$crate::store::ExportJob>, $crate::store::StoreError> {
                let mut tx = self.begin_for(practice).await?;
                let row = sqlx::query(&format!(
                    "SELECT {} FROM export_jobs WHERE practice_id = $1 AND id = $2",
                    $crate::store::export::JOB_COLUMNS
                ))
                .bind(practice.as_str())
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(row
                    .as_ref()
                    .map(export_job_from)
                    .transpose()?)
            }

            async fn export_files(
                &self,
                practice: &$crate::domain::ResourceId,
                id: &str,
            ) -> Result<Vec<$crate::store::ExportFile>, $crate::store::StoreError> {
                use sqlx::Row;
                let mut tx = self.begin_for(practice).await?;
                let rows = sqlx::query(
                    "SELECT file_no, resource_type, CAST(SUM(resources) AS BIGINT) AS resources,
                            CAST(COUNT(*) AS BIGINT) AS chunks
                     FROM export_chunks WHERE practice_id = $1 AND job_id = $2
                     GROUP BY file_no, resource_type ORDER BY file_no",
                )
                .bind(practice.as_str())
                .bind(id)
                .fetch_all(&mut *tx)
                .await?;
                tx.commit().await?;
                rows.iter()
                    .map(|row| {
                        let file_no: i32 = row.try_get("file_no")?;
                        Ok($crate::store::ExportFile {
                            file_no: i64::from(file_no),
                            resource_type: row.try_get("resource_type")?,
                            resources: row.try_get("resources")?,
                            chunks: row.try_get("chunks")?,
                        })
                    })
                    .collect::<Result<_, sqlx::Error>>()
                    .map_err(Into::into)
            }

            async fn export_chunk(
                &self,
                practice: &$crate::domain::ResourceId,
                id: &str,
                file_no: i64,
                chunk_no: i64,
            ) -> Result<Option<Vec<u8>>, $crate::store::StoreError> {
                let mut tx = self.begin_for(practice).await?;
                let content: Option<Vec<u8>> = sqlx::query_scalar(
                    "SELECT content FROM export_chunks
                     WHERE practice_id = $1 AND job_id = $2 AND file_no = $3 AND chunk_no = $4",
                )
                .bind(practice.as_str())
                .bind(id)
                .bind(i32::try_from(file_no).unwrap_or(i32::MAX))
                .bind(i32::try_from(chunk_no).unwrap_or(i32::MAX))
                .fetch_optional(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(content)
            }

            async fn delete_export_job(
                &self,
                practice: &$crate::domain::ResourceId,
                id: &str,
            ) -> Result<bool, $crate::store::StoreError> {
                let _turn = self.write_turn().await?;
                let mut tx = self.begin_for(practice).await?;
                // The chunks go with the job (ON DELETE CASCADE).
                let done = sqlx::query("DELETE FROM export_jobs WHERE practice_id = $1 AND id = $2")
                    .bind(practice.as_str())
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(done.rows_affected() == 1)
            }

            async fn claim_export_job(
                &self,
                practice: &$crate::domain::ResourceId,
                id: &str,
                runner: &str,
                now_us: i64,
                lease_until_us: i64,
            ) -> Result<Option<$crate::store::ExportJob>, $crate::store::StoreError> {
                let _turn = self.write_turn().await?;
                let mut tx = self.begin_for(practice).await?;
                let row = sqlx::query(&format!(
                    "UPDATE export_jobs SET runner = $1, lease_until_us = $2, status = 'running',
                         attempts = attempts + 1, progress = type_exported
                     WHERE practice_id = $3 AND id = $4 AND status IN ('accepted', 'running')
                       AND (lease_until_us IS NULL OR lease_until_us < $5)
                     RETURNING {}",
                    $crate::store::export::JOB_COLUMNS
                ))
                .bind(runner)
                .bind(lease_until_us)
                .bind(practice.as_str())
                .bind(id)
                .bind(now_us)
                .fetch_optional(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(row
                    .as_ref()
                    .map(export_job_from)
                    .transpose()?)
            }

            async fn advance_export_job(
                &self,
                practice: &$crate::domain::ResourceId,
                id: &str,
                runner: &str,
                step: &$crate::store::ExportStep,
            ) -> Result<bool, $crate::store::StoreError> {
                let _turn = self.write_turn().await?;
                let mut tx = self.begin_for(practice).await?;
                // First the condition (and, on PostgreSQL, the row lock a concurrent DELETE
                // waits for), then the chunk.
                let held = sqlx::query(
                    "UPDATE export_jobs SET lease_until_us = $1, progress = $2
                     WHERE practice_id = $3 AND id = $4 AND runner = $5 AND status = 'running'",
                )
                .bind(step.lease_until_us)
                .bind(step.progress)
                .bind(practice.as_str())
                .bind(id)
                .bind(runner)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    == 1;
                if !held {
                    tx.rollback().await?;
                    return Ok(false);
                }
                if let Some((cursor, chunk)) = &step.sealed {
                    let small = |n: i64| i32::try_from(n).unwrap_or(i32::MAX);
                    if let Some(chunk) = chunk {
                        sqlx::query(
                            "INSERT INTO export_chunks (practice_id, job_id, file_no, chunk_no,
                                 resource_type, resources, key_id, content)
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                        )
                        .bind(practice.as_str())
                        .bind(id)
                        .bind(small(chunk.file_no))
                        .bind(small(chunk.chunk_no))
                        .bind(&chunk.resource_type)
                        .bind(chunk.resources)
                        .bind(&chunk.key_id)
                        .bind(&chunk.content)
                        .execute(&mut *tx)
                        .await?;
                    }
                    let (after_us, after_id) = match &cursor.after {
                        Some((us, id)) => (Some(*us), Some(id.as_str())),
                        None => (None, None),
                    };
                    // A step sealed is progress: `attempts` counts the claims since the last one
                    // (see `MAX_ATTEMPTS` in `fhir::export::runner`).
                    sqlx::query(
                        "UPDATE export_jobs SET type_index = $1, after_us = $2, after_id = $3,
                             file_no = $4, file_resources = $5, chunk_no = $6, type_exported = $7,
                             exported = $8, attempts = 0
                         WHERE practice_id = $9 AND id = $10",
                    )
                    .bind(small(i64::try_from(cursor.type_index).unwrap_or(i64::MAX)))
                    .bind(after_us)
                    .bind(after_id)
                    .bind(small(cursor.file_no))
                    .bind(cursor.file_resources)
                    .bind(small(cursor.chunk_no))
                    .bind(cursor.type_exported)
                    .bind(cursor.exported)
                    .bind(practice.as_str())
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(true)
            }

            async fn finish_export_job(
                &self,
                practice: &$crate::domain::ResourceId,
                id: &str,
                runner: &str,
                end: &$crate::store::ExportEnd,
                now_us: i64,
            ) -> Result<bool, $crate::store::StoreError> {
                use $crate::store::ExportEnd;
                let (status, error, expires_us) = match end {
                    ExportEnd::Complete { expires_us } => ("complete", None, *expires_us),
                    ExportEnd::Failed { error, expires_us } => {
                        ("failed", Some(error.as_str()), *expires_us)
                    }
                };
                let _turn = self.write_turn().await?;
                let mut tx = self.begin_for(practice).await?;
                let done = sqlx::query(
                    "UPDATE export_jobs SET status = $1, error = $2, expires_us = $3,
                         finished_us = $4, runner = NULL, lease_until_us = NULL
                     WHERE practice_id = $5 AND id = $6 AND runner = $7 AND status = 'running'",
                )
                .bind(status)
                .bind(error)
                .bind(expires_us)
                .bind(now_us)
                .bind(practice.as_str())
                .bind(id)
                .bind(runner)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(done.rows_affected() == 1)
            }

            async fn orphaned_export_jobs(
                &self,
                now_us: i64,
                limit: i64,
            ) -> Result<Vec<($crate::domain::ResourceId, String)>, $crate::store::StoreError> {
                use sqlx::Row;
                // All practices: the login role, not a tenant transaction.
                let rows = sqlx::query(
                    "SELECT practice_id, id FROM export_jobs
                     WHERE status IN ('accepted', 'running')
                       AND (lease_until_us IS NULL OR lease_until_us < $1)
                     ORDER BY created_us LIMIT $2",
                )
                .bind(now_us)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|row| {
                        Ok((
                            $crate::domain::ResourceId::from_trusted(row.try_get("practice_id")?),
                            row.try_get("id")?,
                        ))
                    })
                    .collect::<Result<_, sqlx::Error>>()
                    .map_err(Into::into)
            }

            async fn expire_export_jobs(&self, now_us: i64) -> Result<u64, $crate::store::StoreError> {
                let _turn = self.write_turn().await?;
                let done = sqlx::query("DELETE FROM export_jobs WHERE expires_us < $1")
                    .bind(now_us)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected())
            }

            async fn export_resources(
                &self,
                query: &$crate::store::ExportQuery,
            ) -> Result<Vec<$crate::store::StoredVersion>, $crate::store::StoreError> {
                let mut q = sqlx::QueryBuilder::<$db>::new(format!(
                    "SELECT {} FROM resources r JOIN resource_versions v
                       ON v.practice_id = r.practice_id AND v.resource_type = r.resource_type
                      AND v.id = r.id AND v.version_id = r.version_id",
                    $crate::store::VERSION_COLUMNS
                ));
                q.push(" WHERE r.practice_id = ")
                    .push_bind(query.practice.as_str().to_owned())
                    .push(" AND r.resource_type = ")
                    .push_bind(query.resource_type.clone())
                    .push(" AND r.deleted = ")
                    .push_bind(false)
                    .push(" AND r.last_updated_us <= ")
                    .push_bind(query.until_us);
                if let Some(since) = query.since_us {
                    q.push(" AND r.last_updated_us > ").push_bind(since);
                }
                if let Some((last_updated, id)) = &query.after {
                    // The first condition alone bounds the index range; the OR refines it.
                    q.push(" AND r.last_updated_us >= ")
                        .push_bind(*last_updated)
                        .push(" AND (r.last_updated_us > ")
                        .push_bind(*last_updated)
                        .push(" OR (r.last_updated_us = ")
                        .push_bind(*last_updated)
                        .push(" AND r.id > ")
                        .push_bind(id.clone())
                        .push("))");
                }
                push_export_scope(&mut q, &query.scope);
                q.push(" ORDER BY r.last_updated_us, r.id LIMIT ")
                    .push_bind(query.limit);
                let mut tx = self.begin_for(&query.practice).await?;
                let rows = q.build().fetch_all(&mut *tx).await?;
                tx.commit().await?;
                Ok(rows.iter().map(version_from).collect::<Result<_, _>>()?)
            }
        }
    };
}

pub(crate) use shared_export_sql;
