//! `fhirgate sync`: run a connection's pull now (as a recorded job run, with a progress line on
//! a terminal) and show each connection's schedule, watermark and runs. Output is JSON lines on
//! stdout; nothing printed names a patient.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use clap::Subcommand;
use serde_json::json;

use super::{print_json, CliError};
use crate::config::Settings;
use crate::domain::ResourceId;
use crate::startup::{load_profiles, open_vault, pool_options};
use crate::store::{self, RunCounts, Store};
use crate::sync::jobs::PULL;
use crate::sync::scheduler::{last_slot, parse_schedule};
use crate::sync::{Connections, PullJobs, StartedBy};

#[derive(Debug, Subcommand)]
pub enum SyncCommand {
    /// Pull one connection's changed patients now (resuming its interrupted run, if any);
    /// prints the run as one JSON line; exit 1 if it failed or another run holds the connection.
    Run {
        #[arg(long)]
        connection: String,
    },
    /// One JSON line per connection: schedule, time zone, next slot, watermark, last run and
    /// quarantined records; with --runs N, the N newest runs (one JSON line each) instead.
    Status {
        #[arg(long)]
        practice: Option<String>,
        #[arg(long)]
        connection: Option<String>,
        #[arg(long, value_name = "N")]
        runs: Option<i64>,
    },
}

pub async fn run(cmd: SyncCommand, settings: Settings) -> Result<(), CliError> {
    let usage = |e: &dyn std::fmt::Display| CliError::Usage(e.to_string());
    let failed = |e: &dyn std::fmt::Display| CliError::Failed(e.to_string());
    let practice = match &cmd {
        SyncCommand::Status {
            practice: Some(p), ..
        } => Some(ResourceId::parse("practice", p.as_str()).map_err(|e| usage(&e))?),
        _ => None,
    };
    if let SyncCommand::Status { runs: Some(n), .. } = &cmd {
        if !(1..=10_000).contains(n) {
            return Err(CliError::Usage("--runs: 1 to 10000".into()));
        }
    }
    let master = crate::keys::MasterSecret::from_settings(&settings).map_err(|e| usage(&e))?;
    let profiles = Arc::new(load_profiles(&settings).map_err(|e| usage(&e))?);
    let store = store::connect(&settings.database_url, &pool_options(&settings))
        .await
        .map_err(|e| failed(&e))?;
    let result = async {
        store.migrate().await.map_err(|e| failed(&e))?;
        match cmd {
            SyncCommand::Run { connection } => {
                let keys = crate::crypto::PhiKeys::new(master.keyring());
                let vault = open_vault(&*store, &keys).await.map_err(|e| failed(&e))?;
                let connections = Connections::new(store.clone(), master.keyring(), profiles);
                let (log, writer) = crate::audit::AuditLog::start(store.clone());
                let jobs = PullJobs::new(store.clone(), connections, log, vault, &settings.sync);
                let outcome = run_now(&jobs, &connection).await;
                drop(jobs);
                let _ = tokio::time::timeout(Duration::from_secs(10), writer).await;
                outcome
            }
            SyncCommand::Status {
                connection, runs, ..
            } => match runs {
                Some(n) => {
                    for run in store
                        .jobs()
                        .list_runs(practice.as_ref(), connection.as_deref(), n)
                        .await
                        .map_err(|e| failed(&e))?
                    {
                        print_json(&run);
                    }
                    Ok(())
                }
                None => status(&*store, practice.as_ref(), connection.as_deref()).await,
            },
        }
    }
    .await;
    store.close().await;
    result
}

async fn run_now(jobs: &PullJobs, connection: &str) -> Result<(), CliError> {
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(120));
        bar.set_message("starting");
        bar
    });
    let mut on_progress = |c: &RunCounts| {
        if let Some(bar) = &bar {
            bar.set_message(progress_line(c));
        }
    };
    let outcome = jobs
        .run(connection, StartedBy::Manual, None, Some(&mut on_progress))
        .await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    match outcome {
        Ok(Some(run)) => {
            let succeeded = run.status == "succeeded";
            print_json(&run);
            if succeeded {
                Ok(())
            } else {
                Err(CliError::Failed(format!(
                    "pull {} {}: {}",
                    run.id,
                    run.status,
                    run.error.as_deref().unwrap_or("stopped before its end")
                )))
            }
        }
        Ok(None) => Err(CliError::Failed(
            "another pull of this connection is running (see `fhirgate sync status`)".into(),
        )),
        Err(crate::sync::JobError::Connection(crate::sync::ConnectionError::NotFound)) => {
            Err(CliError::Usage("--connection: no such connection".into()))
        }
        Err(e) => Err(CliError::Failed(e.to_string())),
    }
}

fn progress_line(c: &RunCounts) -> String {
    format!(
        "{} pages · {} received · {} created · {} updated · {} unchanged · {} quarantined · {} coverages",
        c.pages, c.received, c.created, c.updated, c.unchanged, c.failed, c.coverages
    )
}

async fn status(
    store: &dyn Store,
    practice: Option<&ResourceId>,
    connection: Option<&str>,
) -> Result<(), CliError> {
    let failed = |e: &dyn std::fmt::Display| CliError::Failed(e.to_string());
    let quarantined = store
        .jobs()
        .quarantine_stats()
        .await
        .map_err(|e| failed(&e))?;
    let now = time::OffsetDateTime::now_utc();
    for c in store
        .connections()
        .list_connections(practice)
        .await
        .map_err(|e| failed(&e))?
    {
        if connection.is_some_and(|id| id != c.id) {
            continue;
        }
        let timezone = store
            .get_practice(&c.practice_id)
            .await
            .map(|p| p.timezone)
            .unwrap_or_else(|_| "UTC".into());
        let tz: chrono_tz::Tz = timezone.parse().unwrap_or(chrono_tz::Tz::UTC);
        let next = parse_schedule(&c.schedule).ok().and_then(|cron| {
            let now_tz =
                chrono::DateTime::from_timestamp(now.unix_timestamp(), 0)?.with_timezone(&tz);
            cron.find_next_occurrence(&now_tz, false)
                .ok()
                .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t.timestamp()).ok())
        });
        let last_slot = parse_schedule(&c.schedule)
            .ok()
            .and_then(|cron| last_slot(&cron, tz, now));
        let last = store
            .jobs()
            .last_run(&c.id, PULL)
            .await
            .map_err(|e| failed(&e))?;
        let q = quarantined.iter().find(|q| q.connection_id == c.id);
        let rfc = |t: Option<time::OffsetDateTime>| {
            t.and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
        };
        print_json(&json!({
            "connection_id": c.id,
            "practice_id": c.practice_id.as_str(),
            "vendor": c.vendor,
            "status": if c.active { "active" } else { "disabled" },
            "schedule": c.schedule,
            "timezone": timezone,
            "last_slot": rfc(last_slot),
            "next_run": rfc(next),
            "watermark": c.watermark,
            "last_run": last,
            "quarantined": q.map_or(0, |q| q.depth),
        }));
    }
    Ok(())
}
