//! The background side of bulk export: a runner per job, and a sweeper per instance.
//!
//! A runner claims its job with a lease (so one runner holds it across instances), waits one
//! second past the transaction time (so writes stamped before it have committed), then pages
//! through each type in (lastUpdated, id) order, appending each resource's stored JSON as one
//! NDJSON line. When the buffer reaches `chunk_kib`, when a file reaches `file_max_resources`
//! and at the end of each type, it seals the buffer as one chunk and commits it together with
//! the cursor that follows it, conditional on still holding the job. So what is committed is
//! always a prefix of the export: a job interrupted anywhere (crash, restart, lost lease)
//! resumes from its last chunk with nothing skipped or repeated. Memory stays at about a page
//! and a chunk, whatever the number of resources.
//!
//! The sweeper (every `sweep_secs`, and at start-up) deletes expired jobs and gives a runner to
//! every unfinished job nobody holds: a job whose instance died is resumed by whichever instance
//! sweeps first once its lease ran out (`lease_secs`); one stopped gracefully is released at
//! once. A job claimed five times in a row without sealing anything fails. Never logs content:
//! ids, counts, fixed phrases.

use std::time::Duration;

use actix_web::web;
use zeroize::{Zeroize, Zeroizing};

use super::{ExportType, Exports};
use crate::crypto::{ExportChunkRef, PhiVault};
use crate::domain::ResourceId;
use crate::fhir::resources::{now_us, open_json};
use crate::startup::AppState;
use crate::store::{
    ExportCursor, ExportEnd, ExportJob, ExportLevel, ExportQuery, ExportScope, ExportStep,
    SealedChunk, StoreError,
};

/// How long after the transaction time a runner starts reading: a write stamped just before it
/// may still be committing, and keyset paging would not come back for it.
const SETTLE: Duration = Duration::from_secs(1);
/// Claims in a row that sealed nothing after which a job is failed: its runners keep dying
/// (or losing it) before they get anywhere. A claim that seals a chunk starts the count again
/// (`export_jobs.attempts` is reset with the cursor), so a long export interrupted by many
/// restarts, each resuming it further, still completes; counting every claim failed it after its
/// fifth restart (found by `tests/api/kill.rs`).
const MAX_ATTEMPTS: i64 = 5;

fn us(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Why a run ended without finishing its job.
#[derive(Debug)]
enum Halt {
    /// The job is no longer ours: cancelled (deleted), or taken over after our lease ran out.
    Lost,
    /// The instance is stopping; the job was released for another runner.
    Stopping,
    /// The database failed; the lease runs out and a sweep resumes the job.
    Store(StoreError),
    /// The job cannot be completed; it is marked failed with this phrase.
    Fatal(&'static str),
}

impl From<StoreError> for Halt {
    fn from(e: StoreError) -> Self {
        Halt::Store(e)
    }
}

/// Removes a job from this instance's active set when its task ends, however it ends.
struct Active<'a> {
    exports: &'a Exports,
    id: String,
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        if let Ok(mut active) = self.exports.inner.active.lock() {
            active.remove(&self.id);
        }
    }
}

impl Exports {
    /// Runs the job on the application's runtime, once a permit is free, unless this instance
    /// already has a task for it.
    pub(crate) fn spawn(&self, state: web::Data<AppState>, practice: ResourceId, job_id: String) {
        if self.stopping() {
            return;
        }
        let fresh = self
            .inner
            .active
            .lock()
            .is_ok_and(|mut active| active.insert(job_id.clone()));
        if !fresh {
            return;
        }
        let exports = self.clone();
        self.inner.runtime.spawn(async move {
            let _active = Active {
                exports: &exports,
                id: job_id.clone(),
            };
            let mut stop = exports.inner.stop.subscribe();
            let permit = tokio::select! {
                permit = exports.inner.permits.clone().acquire_owned() => permit,
                _ = stop.wait_for(|s| *s) => return,
            };
            let Ok(_permit) = permit else { return };
            let runner = uuid::Uuid::new_v4().simple().to_string();
            match run(&state, &exports, &practice, &job_id, &runner).await {
                Ok(true) => tracing::info!(job = %job_id, "export complete"),
                Ok(false) => {}
                Err(Halt::Lost) => tracing::info!(job = %job_id, "export no longer held (cancelled or taken over)"),
                Err(Halt::Stopping) => tracing::info!(job = %job_id, "export paused for shutdown"),
                Err(Halt::Store(e)) => {
                    tracing::warn!(job = %job_id, error = %e, "export interrupted by a database error; it resumes once its lease runs out")
                }
                Err(Halt::Fatal(why)) => {
                    tracing::error!(job = %job_id, reason = why, "export failed");
                    fail(&state, &exports, &practice, &job_id, &runner, why).await;
                }
            }
        });
    }
}

async fn fail(
    state: &AppState,
    exports: &Exports,
    practice: &ResourceId,
    job_id: &str,
    runner: &str,
    why: &str,
) {
    let now = now_us();
    let end = ExportEnd::Failed {
        error: why.to_owned(),
        expires_us: now.saturating_add(exports.settings().retention_us()),
    };
    if let Err(e) = state
        .store
        .exports()
        .finish_export_job(practice, job_id, runner, &end, now)
        .await
    {
        tracing::warn!(job = %job_id, error = %e, "could not record the export's failure");
    }
}

/// Runs one job to its end; `Ok(false)` when it was not ours to run (finished, or held).
async fn run(
    state: &AppState,
    exports: &Exports,
    practice: &ResourceId,
    job_id: &str,
    runner: &str,
) -> Result<bool, Halt> {
    let store = state.store.exports();
    let now = now_us();
    let lease = us(exports.settings().lease());
    let Some(job) = store
        .claim_export_job(practice, job_id, runner, now, now + lease)
        .await?
    else {
        return Ok(false);
    };
    if job.attempts > MAX_ATTEMPTS {
        return Err(Halt::Fatal("the export was interrupted too many times"));
    }
    let wait = job.transaction_time_us + us(SETTLE) - now_us();
    if wait > 0 {
        tokio::time::sleep(Duration::from_micros(wait.unsigned_abs())).await;
    }
    let vault = state
        .vault()
        .await
        .map_err(|_| Halt::Fatal("the PHI keys are unavailable"))?;
    let mut writer = Writer::new(state, exports, vault, &job, runner);
    for type_index in job.cursor.type_index..job.types.len() {
        let ty = exports
            .find(&job.types[type_index])
            .ok_or(Halt::Fatal("a type of this export is no longer served"))?;
        writer.export_type(ty).await?;
    }
    let now = now_us();
    let end = ExportEnd::Complete {
        expires_us: now.saturating_add(exports.settings().retention_us()),
    };
    if store
        .finish_export_job(practice, job_id, runner, &end, now)
        .await?
    {
        Ok(true)
    } else {
        Err(Halt::Lost)
    }
}

/// Which resources of `ty` the job reads.
fn scope(job: &ExportJob, ty: ExportType) -> Result<ExportScope, Halt> {
    let group = || {
        job.group_id
            .clone()
            .ok_or(Halt::Fatal("the export names no group"))
    };
    Ok(match (job.level, ty.compartment_param) {
        (ExportLevel::System, _) => ExportScope::All,
        (ExportLevel::Patient, None) => ExportScope::All,
        (ExportLevel::Patient, Some(param)) => ExportScope::Compartment { param },
        (ExportLevel::Group, None) => ExportScope::GroupMembers {
            group_id: group()?,
            member_param: "member",
        },
        (ExportLevel::Group, Some(param)) => ExportScope::GroupCompartment {
            group_id: group()?,
            member_param: "member",
            param,
        },
    })
}

/// Turns pages of resources into sealed chunks, committing each with the cursor after it.
struct Writer<'a> {
    state: &'a AppState,
    exports: &'a Exports,
    vault: &'a PhiVault,
    job: &'a ExportJob,
    runner: &'a str,
    /// What is sealed and committed.
    sealed: ExportCursor,
    /// NDJSON not sealed yet: whole lines of resources of the current type. Zeroed when sealed.
    buffer: Zeroizing<Vec<u8>>,
    buffered: i64,
    /// The key of the last resource in `buffer`.
    last: Option<(i64, String)>,
    chunk_bytes: usize,
    file_max: i64,
}

impl<'a> Writer<'a> {
    fn new(
        state: &'a AppState,
        exports: &'a Exports,
        vault: &'a PhiVault,
        job: &'a ExportJob,
        runner: &'a str,
    ) -> Self {
        let settings = exports.settings();
        let chunk_bytes =
            usize::try_from(settings.chunk_kib.saturating_mul(1024)).unwrap_or(1 << 20);
        Self {
            state,
            exports,
            vault,
            job,
            runner,
            sealed: job.cursor.clone(),
            buffer: Zeroizing::new(Vec::with_capacity(chunk_bytes + 4096)),
            buffered: 0,
            last: None,
            chunk_bytes,
            file_max: i64::try_from(settings.file_max_resources).unwrap_or(i64::MAX),
        }
    }

    fn lease(&self) -> i64 {
        now_us() + us(self.exports.settings().lease())
    }

    /// Commits a step; `Halt::Lost` when the job is no longer ours. `progress` counts the
    /// resources of the current type read so far.
    async fn commit(
        &self,
        progress: i64,
        sealed: Option<(ExportCursor, Option<SealedChunk>)>,
    ) -> Result<(), Halt> {
        let step = ExportStep {
            lease_until_us: self.lease(),
            progress,
            sealed,
        };
        let held = self
            .state
            .store
            .exports()
            .advance_export_job(&self.job.practice, &self.job.id, self.runner, &step)
            .await?;
        if held {
            Ok(())
        } else {
            Err(Halt::Lost)
        }
    }

    /// Seals the buffer as the next chunk of the current file and commits it with `after`,
    /// the cursor that follows it (computed by `next` from the cursor with the chunk counted).
    async fn seal(&mut self, next: impl FnOnce(ExportCursor) -> ExportCursor) -> Result<(), Halt> {
        let mut cursor = self.sealed.clone();
        let chunk = if self.buffered > 0 {
            let at = ExportChunkRef {
                practice_id: self.job.practice.as_str(),
                job_id: &self.job.id,
                file_no: cursor.file_no,
                chunk_no: cursor.chunk_no,
            };
            let (key_id, content) = self.vault.seal_chunk(at, &self.buffer);
            let chunk = SealedChunk {
                file_no: cursor.file_no,
                chunk_no: cursor.chunk_no,
                resource_type: self.job.types[cursor.type_index].clone(),
                resources: self.buffered,
                key_id,
                content,
            };
            cursor.after = self.last.clone();
            cursor.file_resources += self.buffered;
            cursor.chunk_no += 1;
            cursor.type_exported += self.buffered;
            cursor.exported += self.buffered;
            Some(chunk)
        } else {
            None
        };
        let cursor = next(cursor);
        self.commit(cursor.type_exported, Some((cursor.clone(), chunk)))
            .await?;
        self.sealed = cursor;
        self.buffer.zeroize();
        self.buffered = 0;
        Ok(())
    }

    /// Exports what is left of one type (the type at `sealed.type_index`).
    async fn export_type(&mut self, ty: ExportType) -> Result<(), Halt> {
        let scope = scope(self.job, ty)?;
        let page_size = i64::try_from(self.exports.settings().page_size).unwrap_or(500);
        let mut query = ExportQuery {
            practice: self.job.practice.clone(),
            resource_type: ty.name().to_owned(),
            scope,
            since_us: self.job.since_us,
            until_us: self.job.transaction_time_us,
            after: self.sealed.after.clone(),
            limit: page_size,
        };
        loop {
            if self.exports.stopping() {
                self.release().await;
                return Err(Halt::Stopping);
            }
            let page = self.state.store.exports().export_resources(&query).await?;
            let last_page = (page.len() as i64) < page_size;
            let mut sealed_in_page = false;
            for v in &page {
                let json = open_json(self.vault, &self.job.practice, v)
                    .map_err(|_| Halt::Fatal("a stored resource does not open"))?;
                self.buffer.extend_from_slice(&json);
                self.buffer.push(b'\n');
                self.buffered += 1;
                self.last = Some((v.last_updated_us, v.id.clone()));
                query.after = self.last.clone();
                if self.sealed.file_resources + self.buffered >= self.file_max {
                    // The file is full: the next chunk starts the next file.
                    self.seal(|c| ExportCursor {
                        file_no: c.file_no + 1,
                        file_resources: 0,
                        chunk_no: 0,
                        ..c
                    })
                    .await?;
                    sealed_in_page = true;
                } else if self.buffer.len() >= self.chunk_bytes {
                    self.seal(|c| c).await?;
                    sealed_in_page = true;
                }
            }
            if last_page {
                // The type is done: its last chunk, then the next type (and a new file, unless
                // this type's last file is still empty).
                return self
                    .seal(|c| ExportCursor {
                        type_index: c.type_index + 1,
                        after: None,
                        file_no: if c.file_resources > 0 {
                            c.file_no + 1
                        } else {
                            c.file_no
                        },
                        file_resources: 0,
                        chunk_no: 0,
                        type_exported: 0,
                        exported: c.exported,
                    })
                    .await;
            }
            if !sealed_in_page {
                // Lease and progress only: buffered lines are not committed yet.
                self.commit(self.sealed.type_exported + self.buffered, None)
                    .await?;
            }
        }
    }

    /// Gives the job back (no runner, no lease) so the next sweep anywhere resumes it at once.
    async fn release(&self) {
        let step = ExportStep {
            lease_until_us: 0,
            progress: self.sealed.type_exported,
            sealed: None,
        };
        let _ = self
            .state
            .store
            .exports()
            .advance_export_job(&self.job.practice, &self.job.id, self.runner, &step)
            .await;
    }
}

/// Starts this instance's sweeper: at once, then every `sweep_secs` until shutdown.
pub(crate) fn start(state: web::Data<AppState>) {
    let exports = state.exports.clone();
    let mut stop = exports.inner.stop.subscribe();
    exports.inner.runtime.clone().spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(exports.settings().sweep_secs));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            if let Err(e) = sweep(&state).await {
                tracing::warn!(error = %e, "export sweep failed; retrying at the next one");
            }
        }
    });
}

async fn sweep(state: &web::Data<AppState>) -> Result<(), StoreError> {
    let store = state.store.exports();
    let now = now_us();
    let expired = store.expire_export_jobs(now).await?;
    if expired > 0 {
        tracing::info!(jobs = expired, "expired exports deleted");
    }
    for (practice, id) in store.orphaned_export_jobs(now, 100).await? {
        state.exports.spawn(state.clone(), practice, id);
    }
    Ok(())
}
