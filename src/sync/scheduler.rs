//! The nightly pulls' scheduler: one tokio-cron-scheduler job per active EHR connection, on the
//! connection's cron schedule in its practice's time zone (default 02:00 local). Every instance
//! runs one; the database makes each schedule slot run once across them (a run names its slot,
//! and the slot is unique), so two gateways on one database never pull the same slot twice.
//!
//! Every `refresh_secs` the scheduler re-reads the connections (added, removed or rescheduled by
//! another process), takes over runs whose instance died (see [`PullJobs::resume_orphans`]),
//! and re-creates a job whose time zone changed its UTC offset: tokio-cron-scheduler 0.15 keeps
//! the offset a job was created with, which would move a 02:00 pull to 01:00 or 03:00 after a
//! daylight-saving change. At start-up, a slot that passed while no instance was up (after the
//! connection was added, with no run since) runs once.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{Offset, TimeZone, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use croner::Cron;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_cron_scheduler::{Job, JobScheduler};

use super::jobs::{PullJobs, StartedBy, PULL};
use super::SyncSettings;
use crate::store::StoredConnection;

/// Parses a schedule as the scheduler reads it: six fields, seconds first.
pub fn parse_schedule(schedule: &str) -> Result<Cron, String> {
    CronParser::builder()
        .seconds(Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(schedule)
        .map_err(|e| e.to_string())
}

/// The latest slot of `cron` in `tz` at or before `now`.
pub fn last_slot(cron: &Cron, tz: Tz, now: OffsetDateTime) -> Option<OffsetDateTime> {
    let now = Utc
        .timestamp_opt(now.unix_timestamp(), 0)
        .single()?
        .with_timezone(&tz);
    let slot = cron.find_previous_occurrence(&now, true).ok()?;
    OffsetDateTime::from_unix_timestamp(slot.timestamp()).ok()
}

/// The running scheduler; stopped by [`SchedulerHandle::stop`].
pub struct SchedulerHandle {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl SchedulerHandle {
    /// Stops scheduling, asks running pulls to stop after their page, and waits up to `grace`.
    pub async fn stop(self, jobs: &PullJobs, grace: Duration) {
        jobs.stop();
        let _ = self.stop.send(true);
        if tokio::time::timeout(grace, self.task).await.is_err() {
            tracing::warn!("the pull scheduler did not stop in time");
        }
    }
}

/// Starts the scheduler on the current runtime.
pub fn start(jobs: PullJobs, settings: &SyncSettings) -> SchedulerHandle {
    let (stop, stopped) = watch::channel(false);
    let settings = settings.clone();
    let task = tokio::spawn(run(jobs, settings, stopped));
    SchedulerHandle { stop, task }
}

/// A connection's job in the scheduler.
struct Entry {
    job: uuid::Uuid,
    schedule: String,
    tz: Tz,
    /// The UTC offset the job was created with (see the module doc).
    offset_secs: i32,
}

async fn run(jobs: PullJobs, settings: SyncSettings, mut stopped: watch::Receiver<bool>) {
    let mut scheduler = match JobScheduler::new().await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "the pull scheduler cannot start; nightly pulls will not run");
            return;
        }
    };
    if let Err(e) = scheduler.start().await {
        tracing::error!(error = %e, "the pull scheduler cannot start; nightly pulls will not run");
        return;
    }
    let mut entries: HashMap<String, Entry> = HashMap::new();
    let mut first = true;
    let mut running: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    loop {
        running.retain(|t| !t.is_finished());
        match jobs.store().connections().list_connections(None).await {
            Ok(connections) => {
                let active: Vec<StoredConnection> =
                    connections.into_iter().filter(|c| c.active).collect();
                let zones = zones(&jobs, &active).await;
                refresh(&scheduler, &jobs, &active, &zones, &mut entries).await;
                if first && settings.run_missed {
                    running.extend(catch_up(&jobs, &active, &zones).await);
                }
                first = false;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read EHR connections; schedules unchanged")
            }
        }
        if running.is_empty() {
            let jobs = jobs.clone();
            running.push(tokio::spawn(async move {
                if let Err(e) = jobs.resume_orphans().await {
                    tracing::warn!(error = %e, "could not resume interrupted pulls");
                }
            }));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(settings.refresh_secs)) => {}
            _ = stopped.changed() => break,
        }
    }
    if let Err(e) = scheduler.shutdown().await {
        tracing::warn!(error = %e, "the pull scheduler did not shut down cleanly");
    }
    for task in running {
        let _ = task.await;
    }
}

/// Each connection's practice's time zone (UTC when the practice's is unknown).
async fn zones(jobs: &PullJobs, connections: &[StoredConnection]) -> HashMap<String, Tz> {
    let mut by_practice: HashMap<String, Tz> = HashMap::new();
    let mut out = HashMap::with_capacity(connections.len());
    for c in connections {
        let practice = c.practice_id.as_str().to_owned();
        let tz = match by_practice.get(&practice) {
            Some(tz) => *tz,
            None => {
                let tz = match jobs.store().get_practice(&c.practice_id).await {
                    Ok(p) => Tz::from_str(&p.timezone).unwrap_or(Tz::UTC),
                    Err(_) => Tz::UTC,
                };
                by_practice.insert(practice, tz);
                tz
            }
        };
        out.insert(c.id.clone(), tz);
    }
    out
}

fn offset_now(tz: Tz) -> i32 {
    Utc::now()
        .with_timezone(&tz)
        .offset()
        .fix()
        .local_minus_utc()
}

/// Brings the scheduler's jobs in line with the connections.
async fn refresh(
    scheduler: &JobScheduler,
    jobs: &PullJobs,
    connections: &[StoredConnection],
    zones: &HashMap<String, Tz>,
    entries: &mut HashMap<String, Entry>,
) {
    let wanted: HashMap<&str, &StoredConnection> =
        connections.iter().map(|c| (c.id.as_str(), c)).collect();
    let stale: Vec<String> = entries
        .iter()
        .filter(|(id, e)| match wanted.get(id.as_str()) {
            Some(c) => {
                let tz = zones.get(&c.id).copied().unwrap_or(Tz::UTC);
                c.schedule != e.schedule || tz != e.tz || offset_now(tz) != e.offset_secs
            }
            None => true,
        })
        .map(|(id, _)| id.clone())
        .collect();
    for id in stale {
        if let Some(entry) = entries.remove(&id) {
            if let Err(e) = scheduler.remove(&entry.job).await {
                tracing::warn!(error = %e, connection = %id, "could not unschedule a pull");
            }
        }
    }
    for c in connections {
        if entries.contains_key(&c.id) {
            continue;
        }
        let tz = zones.get(&c.id).copied().unwrap_or(Tz::UTC);
        match schedule_pull(scheduler, jobs, c, tz).await {
            Ok(job) => {
                entries.insert(
                    c.id.clone(),
                    Entry {
                        job,
                        schedule: c.schedule.clone(),
                        tz,
                        offset_secs: offset_now(tz),
                    },
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, connection = %c.id, "cannot schedule this connection's pull")
            }
        }
    }
}

async fn schedule_pull(
    scheduler: &JobScheduler,
    jobs: &PullJobs,
    connection: &StoredConnection,
    tz: Tz,
) -> Result<uuid::Uuid, String> {
    let cron = Arc::new(parse_schedule(&connection.schedule)?);
    let id = connection.id.clone();
    let jobs = jobs.clone();
    let job = Job::new_async_tz(connection.schedule.as_str(), tz, move |_uuid, _scheduler| {
        let jobs = jobs.clone();
        let id = id.clone();
        let cron = Arc::clone(&cron);
        Box::pin(async move {
            // The slot is computed, not read off the clock, so every instance names the same one.
            let slot = last_slot(&cron, tz, OffsetDateTime::now_utc() + time::Duration::SECOND);
            match jobs.run(&id, StartedBy::Schedule, slot, None).await {
                Ok(Some(_)) => {}
                Ok(None) => {
                    tracing::info!(connection = %id, "scheduled pull already taken by another instance or run")
                }
                Err(e) => tracing::warn!(connection = %id, error = %e, "scheduled pull failed"),
            }
        })
    })
    .map_err(|e| e.to_string())?;
    scheduler.add(job).await.map_err(|e| e.to_string())
}

/// Starts, once, the slot each connection missed while no instance was up.
async fn catch_up(
    jobs: &PullJobs,
    connections: &[StoredConnection],
    zones: &HashMap<String, Tz>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let now = OffsetDateTime::now_utc();
    let mut started = Vec::new();
    for c in connections {
        let Ok(cron) = parse_schedule(&c.schedule) else {
            continue;
        };
        let tz = zones.get(&c.id).copied().unwrap_or(Tz::UTC);
        let Some(slot) = last_slot(&cron, tz, now) else {
            continue;
        };
        if slot <= c.created_at {
            continue;
        }
        let last = match jobs.store().jobs().last_run(&c.id, PULL).await {
            Ok(last) => last,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the last pull; no catch-up");
                continue;
            }
        };
        if last.is_some_and(|r| r.started_at >= slot) {
            continue;
        }
        let jobs = jobs.clone();
        let id = c.id.clone();
        started.push(tokio::spawn(async move {
            match jobs.run(&id, StartedBy::Startup, Some(slot), None).await {
                Ok(Some(_)) => {}
                Ok(None) => {}
                Err(e) => tracing::warn!(connection = %id, error = %e, "missed pull failed"),
            }
        }));
    }
    started
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn the_last_slot_is_at_local_time_in_the_practice_zone() {
        let cron = parse_schedule("0 0 2 * * *").unwrap();
        let ny: Tz = "America/New_York".parse().unwrap();
        // 2026-07-02 10:00 UTC is 06:00 in New York (EDT, UTC-4): the slot is 02:00 EDT.
        let slot = last_slot(&cron, ny, datetime!(2026-07-02 10:00 UTC)).unwrap();
        assert_eq!(slot, datetime!(2026-07-02 06:00 UTC));
        // In January (EST, UTC-5) the same local 02:00 is 07:00 UTC.
        let slot = last_slot(&cron, ny, datetime!(2026-01-15 12:00 UTC)).unwrap();
        assert_eq!(slot, datetime!(2026-01-15 07:00 UTC));
    }

    #[test]
    fn a_slot_is_the_same_whenever_an_instance_computes_it() {
        let cron = parse_schedule("0 */5 * * * *").unwrap();
        let a = last_slot(&cron, Tz::UTC, datetime!(2026-01-01 00:05:00.2 UTC)).unwrap();
        let b = last_slot(&cron, Tz::UTC, datetime!(2026-01-01 00:09:59 UTC)).unwrap();
        assert_eq!(a, b);
        assert_eq!(a, datetime!(2026-01-01 00:05 UTC));
    }

    #[test]
    fn schedules_out_of_range_are_refused() {
        assert!(parse_schedule("0 0 25 * * *").is_err());
        assert!(parse_schedule("0 61 * * * *").is_err());
        assert!(parse_schedule("0 0 2 * * *").is_ok());
    }
}
