//! Pull jobs: a pull of one connection as a recorded, resumable run that runs once across
//! instances. The database decides who runs (see `src/store/jobs.rs`): starting a run fails
//! quietly when the connection already has one running or its schedule slot ran; a run whose
//! runner died is taken over once its lease runs out and resumes from its checkpoint (the
//! watermark after its last committed page). Each committed page renews the lease and moves
//! the checkpoint; a heartbeat renews it while a page is slow (a Bulk export being prepared).
//!
//! A resumed run asks the EHR again from one second before its checkpoint (ties on
//! `meta.lastUpdated` across a page boundary are not lost); what it had already committed comes
//! back unchanged (digests), so it ends with the same data as a run that was never interrupted.
//! Errors recorded on a run are the adapters' fixed phrases, never data.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::pull::{pull, PullError, PullOptions, PullProgress, PullReport, PullTarget};
use super::{ConnectionError, Connections};
use crate::audit::AuditLog;
use crate::crypto::PhiVault;
use crate::store::jobs::micros;
use crate::store::{JobRun, NewJobRun, RunCounts, Store, StoreError};

/// The kind of a pull run in `job_runs`.
pub const PULL: &str = "pull";

/// `[sync]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncSettings {
    /// Run the scheduler (nightly pulls, take-over of orphaned runs) in `serve`.
    pub scheduler: bool,
    /// How long a run's lease lasts without being renewed (seconds).
    pub lease_secs: u64,
    /// How often the scheduler re-reads connections and looks for orphaned runs (seconds).
    pub refresh_secs: u64,
    /// Pull each patient's coverages too.
    pub coverage: bool,
    /// Run a schedule slot missed while no instance was up, once, at start-up.
    pub run_missed: bool,
    /// `/readyz` reports a queue (outbox, webhook inbox, quarantine) whose oldest waiting row is
    /// older than this (seconds), without failing.
    pub stuck_after_secs: u64,
}

impl Default for SyncSettings {
    fn default() -> Self {
        Self {
            scheduler: true,
            lease_secs: 60,
            refresh_secs: 60,
            coverage: true,
            run_missed: true,
            stuck_after_secs: 900,
        }
    }
}

impl SyncSettings {
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if !(1..=3600).contains(&self.lease_secs) {
            return Err(("sync.lease_secs", "must be between 1 and 3600"));
        }
        if !(1..=3600).contains(&self.refresh_secs) {
            return Err(("sync.refresh_secs", "must be between 1 and 3600"));
        }
        if self.stuck_after_secs == 0 {
            return Err(("sync.stuck_after_secs", "must be at least 1"));
        }
        Ok(())
    }
}

/// Why a run was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartedBy {
    Schedule,
    /// A schedule slot missed while no instance was up.
    Startup,
    Manual,
}

impl StartedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            StartedBy::Schedule => "schedule",
            StartedBy::Startup => "startup",
            StartedBy::Manual => "manual",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
}

/// Runs pulls as jobs. Cheap to clone; clones share the shutdown flag.
#[derive(Clone)]
pub struct PullJobs {
    store: Arc<dyn Store>,
    connections: Connections,
    audit: AuditLog,
    vault: PhiVault,
    /// This instance's name in `job_runs.runner`.
    runner: Arc<str>,
    lease: Duration,
    coverage: bool,
    stopping: Arc<AtomicBool>,
}

/// What a caller sees of a run as it goes.
pub type OnProgress<'a> = &'a mut (dyn FnMut(&RunCounts) + Send);

impl PullJobs {
    pub fn new(
        store: Arc<dyn Store>,
        connections: Connections,
        audit: AuditLog,
        vault: PhiVault,
        settings: &SyncSettings,
    ) -> Self {
        Self {
            store,
            connections,
            audit,
            vault,
            runner: uuid::Uuid::new_v4().simple().to_string().into(),
            lease: Duration::from_secs(settings.lease_secs),
            coverage: settings.coverage,
            stopping: Arc::default(),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Asks running pulls to stop after their current page; they hand their lease back, so
    /// another instance (or the next start) resumes them straight away.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Starts a pull of `connection_id` and runs it to its end. `Ok(None)` when the connection
    /// already has a running pull, or `slot` has a run already (another instance took it).
    pub async fn run(
        &self,
        connection_id: &str,
        started_by: StartedBy,
        slot: Option<OffsetDateTime>,
        progress: Option<OnProgress<'_>>,
    ) -> Result<Option<JobRun>, JobError> {
        let stored = self
            .store
            .connections()
            .get_connection(connection_id)
            .await
            .map_err(ConnectionError::from)?;
        let new = NewJobRun {
            id: uuid::Uuid::new_v4().simple().to_string(),
            practice_id: stored.practice_id.clone(),
            connection_id: stored.id.clone(),
            kind: PULL,
            started_by: started_by.as_str(),
            scheduled_for_us: slot.map(micros),
            runner: self.runner.to_string(),
            lease_until_us: self.lease_until(),
            since: stored.watermark.clone(),
        };
        let Some(run) = self.store.jobs().start_run(&new).await? else {
            // A manual run of a connection whose last run was interrupted resumes that run.
            if started_by == StartedBy::Manual {
                if let Some(run) = self.take_over_orphan_of(&stored.id).await? {
                    return self.execute(run, progress).await.map(Some);
                }
            }
            return Ok(None);
        };
        tracing::info!(run = %run.id, connection = %run.connection_id, started_by = started_by.as_str(), "pull started");
        self.execute(run, progress).await.map(Some)
    }

    /// Takes over and finishes every run whose runner died; returns them as they ended.
    pub async fn resume_orphans(&self) -> Result<Vec<JobRun>, JobError> {
        let now = micros(OffsetDateTime::now_utc());
        let mut finished = Vec::new();
        for orphan in self.store.jobs().orphaned_runs(now).await? {
            if self.stopping.load(Ordering::SeqCst) {
                break;
            }
            let Some(run) = self
                .store
                .jobs()
                .take_over_run(&orphan.id, &self.runner, self.lease_until(), now)
                .await?
            else {
                continue; // another instance took it first
            };
            tracing::info!(run = %run.id, connection = %run.connection_id, attempt = run.attempts, "resuming an interrupted pull");
            finished.push(self.execute(run, None).await?);
        }
        Ok(finished)
    }

    async fn take_over_orphan_of(&self, connection_id: &str) -> Result<Option<JobRun>, JobError> {
        let now = micros(OffsetDateTime::now_utc());
        for orphan in self.store.jobs().orphaned_runs(now).await? {
            if orphan.connection_id == connection_id && orphan.kind == PULL {
                return Ok(self
                    .store
                    .jobs()
                    .take_over_run(&orphan.id, &self.runner, self.lease_until(), now)
                    .await?);
            }
        }
        Ok(None)
    }

    fn lease_until(&self) -> i64 {
        micros(OffsetDateTime::now_utc() + self.lease)
    }

    /// Pulls for a run this instance holds, from its checkpoint, and records how it ended.
    async fn execute(
        &self,
        run: JobRun,
        progress: Option<OnProgress<'_>>,
    ) -> Result<JobRun, JobError> {
        let opened = match self
            .connections
            .adapter(&run.connection_id, &self.audit)
            .await
        {
            Ok(opened) => opened,
            Err(e) => {
                self.finish(&run, false, &run.counts, Some(&e.to_string()), None)
                    .await?;
                return Err(e.into());
            }
        };
        let resume_from = resume_point(&run);
        let heartbeat = self.heartbeat(&run.id);
        let target = PullTarget {
            store: &*self.store,
            vault: &self.vault,
            practice: &opened.stored.practice_id,
            connection_id: &run.connection_id,
            run_id: Some(&run.id),
        };
        let mut checkpoints = Checkpoints {
            jobs: self,
            run: &run,
            counts: run.counts.clone(),
            progress,
        };
        let options = PullOptions {
            coverage: self.coverage,
        };
        let outcome = pull(
            &target,
            &*opened.adapter,
            opened.profile(),
            resume_from.as_deref(),
            options,
            &mut checkpoints,
        )
        .await;
        heartbeat.abort();
        let counts = checkpoints.counts.clone();
        match outcome {
            Ok(report) => {
                let watermark = later(report.watermark.as_deref(), run.checkpoint.as_deref());
                self.finish(&run, true, &counts, None, watermark).await
            }
            Err(PullError::Stopped(why)) => {
                // Hand the lease back so the run is resumed at once elsewhere.
                self.store
                    .jobs()
                    .renew_lease(&run.id, &self.runner, 0)
                    .await?;
                tracing::info!(run = %run.id, reason = why, "pull stopped after a committed page");
                Ok(self.store.jobs().get_run(&run.id).await?)
            }
            Err(e) => {
                tracing::warn!(run = %run.id, error = %e, "pull failed");
                self.finish(&run, false, &counts, Some(&e.to_string()), None)
                    .await
            }
        }
    }

    async fn finish(
        &self,
        run: &JobRun,
        succeeded: bool,
        counts: &RunCounts,
        error: Option<&str>,
        watermark: Option<&str>,
    ) -> Result<JobRun, JobError> {
        let held = self
            .store
            .jobs()
            .finish_run(&run.id, &self.runner, succeeded, counts, error, watermark)
            .await?;
        if held {
            tracing::info!(run = %run.id, succeeded, created = counts.created, updated = counts.updated, unchanged = counts.unchanged, failed = counts.failed, "pull finished");
        } else {
            tracing::warn!(run = %run.id, "pull ended after its lease was taken over; its result is not recorded");
        }
        Ok(self.store.jobs().get_run(&run.id).await?)
    }

    /// Renews the run's lease every third of its length until aborted.
    fn heartbeat(&self, run_id: &str) -> tokio::task::JoinHandle<()> {
        let store = Arc::clone(&self.store);
        let runner = Arc::clone(&self.runner);
        let run_id = run_id.to_owned();
        let lease = self.lease;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(lease / 3);
            tick.tick().await;
            loop {
                tick.tick().await;
                let until = micros(OffsetDateTime::now_utc() + lease);
                match store.jobs().renew_lease(&run_id, &runner, until).await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => tracing::warn!(error = %e, "could not renew a pull's lease"),
                }
            }
        })
    }
}

/// Records each committed page on the run (counts, checkpoint, lease), stopping the pull when
/// the lease was lost or the instance is stopping.
struct Checkpoints<'a, 'p> {
    jobs: &'a PullJobs,
    run: &'a JobRun,
    /// The run's counts: what it had when (re)started plus this attempt's report.
    counts: RunCounts,
    progress: Option<OnProgress<'p>>,
}

#[async_trait::async_trait]
impl PullProgress for &mut Checkpoints<'_, '_> {
    async fn page_committed(&mut self, report: &PullReport) -> Result<(), PullError> {
        let base = &self.run.counts;
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.counts = RunCounts {
            pages: base.pages + n(report.pages),
            received: base.received + n(report.received),
            created: base.created + n(report.created),
            updated: base.updated + n(report.updated),
            unchanged: base.unchanged + n(report.unchanged),
            failed: base.failed + n(report.failed),
            coverages: base.coverages + n(report.coverages),
        };
        let held = self
            .jobs
            .store
            .jobs()
            .record_progress(
                &self.run.id,
                &self.jobs.runner,
                &self.counts,
                report.watermark.as_deref(),
                self.jobs.lease_until(),
            )
            .await?;
        if !held {
            return Err(PullError::Stopped("its lease was taken over"));
        }
        if let Some(progress) = self.progress.as_mut() {
            progress(&self.counts);
        }
        if self.jobs.stopping.load(Ordering::SeqCst) {
            return Err(PullError::Stopped("the instance is stopping"));
        }
        Ok(())
    }
}

/// Where a run asks the EHR from: its start watermark, or, once it has committed pages past it,
/// one second before its checkpoint.
fn resume_point(run: &JobRun) -> Option<String> {
    match (&run.checkpoint, &run.since) {
        (Some(checkpoint), since) if Some(checkpoint) != since.as_ref() => {
            match OffsetDateTime::parse(checkpoint, &Rfc3339) {
                Ok(at) => (at - time::Duration::SECOND).format(&Rfc3339).ok(),
                Err(_) => since.clone(),
            }
        }
        (_, since) => since.clone(),
    }
}

/// The later of two FHIR instants (unparseable ones lose).
fn later<'a>(a: Option<&'a str>, b: Option<&'a str>) -> Option<&'a str> {
    let at = |s: &str| OffsetDateTime::parse(s, &Rfc3339).ok();
    match (a, b) {
        (Some(a), Some(b)) => match (at(a), at(b)) {
            (Some(x), Some(y)) if y > x => Some(b),
            (None, Some(_)) => Some(b),
            _ => Some(a),
        },
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(since: Option<&str>, checkpoint: Option<&str>) -> JobRun {
        JobRun {
            id: "r".into(),
            practice_id: "p".into(),
            connection_id: "c".into(),
            kind: PULL.into(),
            status: "running".into(),
            started_by: "manual".into(),
            scheduled_for_us: None,
            started_at: OffsetDateTime::UNIX_EPOCH,
            finished_at: None,
            counts: RunCounts::default(),
            checkpoint: checkpoint.map(Into::into),
            since: since.map(Into::into),
            error: None,
            attempts: 1,
            runner: None,
            lease_until_us: None,
        }
    }

    #[test]
    fn a_run_without_progress_resumes_from_where_it_started() {
        assert_eq!(resume_point(&run(None, None)), None);
        let since = "2026-01-01T00:00:00Z";
        assert_eq!(
            resume_point(&run(Some(since), Some(since))).as_deref(),
            Some(since)
        );
    }

    #[test]
    fn a_run_with_committed_pages_resumes_one_second_before_its_checkpoint() {
        let resumed = resume_point(&run(None, Some("2026-03-04T05:06:07.500+02:00")));
        let at = OffsetDateTime::parse(resumed.as_deref().unwrap(), &Rfc3339).unwrap();
        let checkpoint = OffsetDateTime::parse("2026-03-04T05:06:07.500+02:00", &Rfc3339).unwrap();
        assert_eq!(checkpoint - at, time::Duration::SECOND);
    }

    #[test]
    fn the_later_watermark_wins_whatever_its_offset() {
        assert_eq!(
            later(
                Some("2026-01-01T10:00:00+02:00"),
                Some("2026-01-01T09:00:00Z")
            ),
            Some("2026-01-01T09:00:00Z")
        );
        assert_eq!(
            later(Some("2026-01-01T10:00:00Z"), Some("2026-01-01T09:00:00Z")),
            Some("2026-01-01T10:00:00Z")
        );
        assert_eq!(later(None, Some("x")), Some("x"));
        assert_eq!(later(None, None), None);
    }
}
