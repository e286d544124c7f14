//! The inbox worker: claims due rows under a lease (any instance may; `FOR UPDATE SKIP LOCKED`
//! on PostgreSQL) and works on them a batch at a time. A batch's patient events are grouped by
//! connection: each group opens its connection once, fetches the patients the senders did not
//! include (`adapter.patient(id)`, several at once), fetches a patient named by several events
//! once (the latest event's copy wins), and upserts them all through one `sync::ingest_each`
//! (one transaction per resource type, with their audit events); a resync row pulls from the
//! connection's watermark (without moving it). Done rows are marked together and lose their
//! sealed payload; failures are retried with exponential backoff and, after `max_attempts` or
//! when retrying cannot help, the row is marked dead with a fixed phrase and kept for an
//! operator.
//!
//! It wakes at once for rows this instance wrote and every `poll_interval_ms` for the rest
//! (other instances' rows, retries, rows whose worker died and whose lease ran out). The
//! batch's leases are renewed while it is worked on. A row whose lease was lost meanwhile is
//! not marked by this worker: its new holder finishes it, and upserting the same patient twice
//! writes no second version (an unchanged resource is not written again). Logs row and
//! connection ids and fixed phrases only.

use std::collections::HashMap;
use std::time::Duration;

use actix_web::web;
use fhirgate_adapters::AdapterError;
use futures_util::StreamExt;

use super::{PatientEvent, Webhooks, PAYLOAD_COLUMN};
use crate::crypto::field_aad;
use crate::fhir::resources::now_us;
use crate::startup::AppState;
use crate::store::{ClaimedEvent, InboxKind, StoreError};
use crate::sync::retry::{backoff, micros};
use crate::sync::{
    ingest_each, on_page, pull, ConnectionError, Ingested, OpenedConnection, PullError,
    PullOptions, PullReport, PullTarget,
};

/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// Why an attempt did not finish its row. Phrases are fixed (they are stored in the row).
#[derive(Debug, Clone)]
enum Failure {
    /// May pass: try again later (not before `after`, when the EHR said).
    Retry {
        phrase: &'static str,
        after: Option<Duration>,
    },
    /// Retrying cannot help.
    Dead(&'static str),
}

fn retry(phrase: &'static str) -> Failure {
    Failure::Retry {
        phrase,
        after: None,
    }
}

impl From<AdapterError> for Failure {
    fn from(err: AdapterError) -> Self {
        match err {
            AdapterError::RateLimited { retry_after } => Failure::Retry {
                phrase: "the EHR asked the gateway to slow down",
                after: Some(retry_after),
            },
            AdapterError::Transient(_) => retry("the EHR failed or did not answer"),
            AdapterError::Auth(_) => Failure::Dead("the EHR refused the gateway's credentials"),
            AdapterError::NotFound => Failure::Dead("the EHR has no such patient"),
            AdapterError::Permanent(_) if err.is_refusal() => {
                Failure::Dead("the EHR refused the request")
            }
            // Not a refusal: the EHR answered with something unusable. Saying "refused" here
            // sent operators to look for a 4xx that never happened.
            AdapterError::Permanent(_) => Failure::Dead(
                "the EHR's answer could not be used (malformed, or not the resource asked for)",
            ),
            AdapterError::Mapping(_) => {
                Failure::Dead("the patient did not map to the internal model")
            }
        }
    }
}

impl From<StoreError> for Failure {
    fn from(_: StoreError) -> Self {
        retry("the gateway's database failed")
    }
}

impl From<PullError> for Failure {
    fn from(err: PullError) -> Self {
        match err {
            PullError::Adapter(e) => e.into(),
            PullError::Store(e) => e.into(),
            PullError::Stopped(_) => retry("the pull was stopped"),
        }
    }
}

impl From<ConnectionError> for Failure {
    fn from(err: ConnectionError) -> Self {
        match err {
            ConnectionError::NotFound | ConnectionError::UnknownPractice => {
                Failure::Dead("the connection no longer exists")
            }
            ConnectionError::Sealed(_) => {
                Failure::Dead("the connection's credential cannot be opened with the master keys")
            }
            ConnectionError::Invalid { .. } => {
                Failure::Dead("the connection's settings are invalid")
            }
            ConnectionError::Store(e) => e.into(),
        }
    }
}

/// Rows claimed at once, per event worked on at once: a batch's events for one connection are
/// fetched together and written in one transaction per resource type.
const BATCH_PER_SLOT: usize = 8;

/// The worker loop, until the instance stops.
pub(super) async fn run(state: web::Data<AppState>, hooks: Webhooks) {
    let settings = hooks.settings().clone();
    let mut stop = hooks.inner.stop.subscribe();
    let poll = Duration::from_millis(settings.poll_interval_ms);
    let lease = Duration::from_secs(settings.lease_secs);
    let batch = i64::try_from(settings.concurrency.saturating_mul(BATCH_PER_SLOT)).unwrap_or(64);
    loop {
        if *stop.borrow() {
            break;
        }
        let now = now_us();
        let claimed = match state
            .store
            .inbox()
            .claim_events(&hooks.inner.runner, now, now + micros(lease), batch)
            .await
        {
            Ok(claimed) => claimed,
            Err(e) => {
                tracing::warn!(error = %e, "webhook inbox claim failed; retrying at the next poll");
                Vec::new()
            }
        };
        if claimed.is_empty() {
            tokio::select! {
                _ = hooks.inner.wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            continue;
        }
        work_batch(&state, &hooks, claimed, lease).await;
    }
    match state
        .store
        .inbox()
        .release_events(&hooks.inner.runner)
        .await
    {
        Ok(0) => {}
        Ok(n) => tracing::info!(events = n, "webhook events given back at shutdown"),
        Err(e) => tracing::warn!(error = %e, "webhook events not given back; their leases run out"),
    }
}

/// Works on a claimed batch while keeping its leases, then records how each row ended.
async fn work_batch(
    state: &AppState,
    hooks: &Webhooks,
    claimed: Vec<ClaimedEvent>,
    lease: Duration,
) {
    let runner = hooks.inner.runner.as_str();
    let concurrency = hooks.settings().concurrency;
    let ids: Vec<String> = claimed.iter().map(|row| row.id.clone()).collect();
    // Patient events grouped by connection (in the order received); each resync on its own.
    let mut groups: Vec<Vec<ClaimedEvent>> = Vec::new();
    let mut by_connection: HashMap<String, usize> = HashMap::new();
    for row in claimed {
        match row.kind {
            InboxKind::Patient => match by_connection.get(&row.connection_id) {
                Some(g) => groups[*g].push(row),
                None => {
                    by_connection.insert(row.connection_id.clone(), groups.len());
                    groups.push(vec![row]);
                }
            },
            InboxKind::Resync => groups.push(vec![row]),
        }
    }
    let work = futures_util::stream::iter(groups)
        .map(|rows| work_group(state, rows, concurrency))
        .buffer_unordered(concurrency)
        .flat_map(futures_util::stream::iter)
        .collect::<Vec<_>>();
    let outcomes = tokio::select! {
        outcomes = work => outcomes,
        never = keep_leases(state, &ids, runner, lease) => match never {},
    };
    let inbox = state.store.inbox();
    let settings = hooks.settings();
    let mut done = Vec::with_capacity(outcomes.len());
    for (row, outcome) in outcomes {
        let recorded = match outcome {
            Ok(()) => {
                done.push(row.id);
                continue;
            }
            Err(Failure::Dead(phrase)) => {
                tracing::warn!(event = %row.id, connection = %row.connection_id, reason = phrase, "webhook event is dead");
                inbox.bury_event(&row.id, runner, phrase, now_us()).await
            }
            Err(Failure::Retry { phrase, after }) => {
                if row.attempts >= i64::from(settings.max_attempts) {
                    tracing::warn!(event = %row.id, connection = %row.connection_id, reason = phrase, attempts = row.attempts, "webhook event is dead after its last attempt");
                    let reason = format!("{phrase} (gave up after {} attempts)", row.attempts);
                    inbox.bury_event(&row.id, runner, &reason, now_us()).await
                } else {
                    let wait = backoff(
                        row.attempts,
                        Duration::from_millis(settings.retry_base_ms),
                        MAX_BACKOFF,
                        after,
                    );
                    tracing::info!(event = %row.id, connection = %row.connection_id, reason = phrase, attempts = row.attempts, retry_in_ms = wait.as_millis() as u64, "webhook event will be retried");
                    inbox
                        .retry_event(&row.id, runner, now_us() + micros(wait), phrase)
                        .await
                }
            }
        };
        taken_over(&row.id, recorded.map(u64::from));
    }
    match inbox.complete_events(&done, runner, now_us()).await {
        Ok(completed) if completed.len() == done.len() => {}
        Ok(completed) => {
            let completed: std::collections::HashSet<&String> = completed.iter().collect();
            for id in done.iter().filter(|id| !completed.contains(id)) {
                taken_over(id, Ok(0));
            }
        }
        Err(e) => {
            tracing::warn!(events = done.len(), error = %e, "webhook events done but not recorded; they are retried once their leases run out")
        }
    }
}

/// Logs an outcome that could not be recorded (`Ok(0)`: another worker holds the row now).
fn taken_over(id: &str, recorded: Result<u64, StoreError>) {
    match recorded {
        Ok(0) => {
            tracing::warn!(event = %id, "webhook event was taken over before its outcome was recorded")
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(event = %id, error = %e, "webhook event outcome not recorded; it is retried once its lease runs out")
        }
    }
}

/// Renews the batch's leases every third of their length; never returns.
async fn keep_leases(
    state: &AppState,
    ids: &[String],
    runner: &str,
    lease: Duration,
) -> std::convert::Infallible {
    let every = (lease / 3).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        match state
            .store
            .inbox()
            .renew_events(ids, runner, now_us() + micros(lease))
            .await
        {
            Ok(n) if n == ids.len() as u64 => {}
            Ok(n) => tracing::warn!(
                events = ids.len() as u64 - n,
                "webhook event leases lost; their new holders finish them"
            ),
            // The leases still run; try again at the next beat.
            Err(e) => tracing::warn!(error = %e, "webhook lease renewal failed"),
        }
    }
}

/// One attempt at a group: a resync row alone, or one connection's patient events.
async fn work_group(
    state: &AppState,
    rows: Vec<ClaimedEvent>,
    concurrency: usize,
) -> Vec<(ClaimedEvent, Result<(), Failure>)> {
    let outcomes = match open_group(state, &rows[0]).await {
        Err(failure) => vec![Err(failure); rows.len()],
        Ok((opened, vault)) => {
            let target = PullTarget {
                store: &*state.store,
                vault,
                practice: &rows[0].practice_id,
                connection_id: &rows[0].connection_id,
                run_id: None,
            };
            match rows[0].kind {
                InboxKind::Resync => vec![resync(&target, &opened, &rows[0]).await],
                InboxKind::Patient => patients(state, &target, &opened, &rows, concurrency).await,
            }
        }
    };
    rows.into_iter().zip(outcomes).collect()
}

async fn open_group<'s>(
    state: &'s AppState,
    row: &ClaimedEvent,
) -> Result<(OpenedConnection, &'s crate::crypto::PhiVault), Failure> {
    let opened = state
        .connections
        .adapter(&row.connection_id, &state.audit)
        .await?;
    let vault = state
        .vault()
        .await
        .map_err(|_| retry("the PHI vault is unavailable"))?;
    Ok((opened, vault))
}

const OPTIONS: PullOptions = PullOptions { coverage: true };

/// Pulls from the watermark the nightly pull keeps, which this does not move: the events
/// missed since then are covered, and the nightly run still sees everything.
async fn resync(
    target: &PullTarget<'_>,
    opened: &OpenedConnection,
    row: &ClaimedEvent,
) -> Result<(), Failure> {
    let report = pull(
        target,
        &*opened.adapter,
        opened.profile(),
        opened.stored.watermark.as_deref(),
        OPTIONS,
        on_page(|_| {}),
    )
    .await?;
    tracing::info!(event = %row.id, connection = %row.connection_id, received = report.received, created = report.created, updated = report.updated, failed = report.failed, "webhook resync pulled");
    Ok(())
}

/// One connection's patient events: each patient fetched once (unless its sender included
/// it), all upserted together. One outcome per row, in order.
async fn patients(
    state: &AppState,
    target: &PullTarget<'_>,
    opened: &OpenedConnection,
    rows: &[ClaimedEvent],
    concurrency: usize,
) -> Vec<Result<(), Failure>> {
    let mut outcomes: Vec<Option<Result<(), Failure>>> = vec![None; rows.len()];
    // The row whose copy of each patient is used: the last received (rows come in that order).
    let mut latest: HashMap<String, usize> = HashMap::with_capacity(rows.len());
    let mut events: Vec<Option<PatientEvent>> = Vec::with_capacity(rows.len());
    for (at, row) in rows.iter().enumerate() {
        match open_payload(state, row) {
            Ok(event) => {
                latest.insert(event.patient_id.clone(), at);
                events.push(Some(event));
            }
            Err(failure) => {
                outcomes[at] = Some(Err(failure));
                events.push(None);
            }
        }
    }
    // Each row follows the row that carries its patient.
    let follows: Vec<Option<usize>> = events
        .iter()
        .map(|e| e.as_ref().and_then(|e| latest.get(&e.patient_id).copied()))
        .collect();
    let mut leaders: Vec<usize> = latest.into_values().collect();
    leaders.sort_unstable();
    let fetched: Vec<(usize, Result<serde_json::Value, AdapterError>)> =
        futures_util::stream::iter(leaders.into_iter().filter_map(|at| {
            let event = events[at].take()?;
            Some(async move {
                match event.resource {
                    Some(resource) => (at, Ok(resource)),
                    None => (at, opened.adapter.patient(&event.patient_id).await),
                }
            })
        }))
        .buffered(concurrency)
        .collect()
        .await;
    let mut positions = Vec::with_capacity(fetched.len());
    let mut resources = Vec::with_capacity(fetched.len());
    for (at, result) in fetched {
        match result {
            Ok(resource) => {
                positions.push(at);
                resources.push(resource);
            }
            Err(e) => outcomes[at] = Some(Err(e.into())),
        }
    }
    let mut report = PullReport::default();
    match ingest_each(
        target,
        &*opened.adapter,
        opened.profile(),
        resources,
        OPTIONS,
        &mut report,
    )
    .await
    {
        Ok(ingested) => {
            for (at, ingested) in positions.into_iter().zip(ingested) {
                outcomes[at] = Some(match ingested {
                    Ingested::Stored => Ok(()),
                    Ingested::Refused => Err(Failure::Dead(
                        "the patient did not map to the internal model",
                    )),
                    Ingested::Adapter(e) => Err(e.into()),
                });
            }
        }
        Err(e) => {
            let failure = Failure::from(e);
            for at in positions {
                outcomes[at] = Some(Err(failure.clone()));
            }
        }
    }
    (0..rows.len())
        .map(|at| match outcomes[at].clone() {
            Some(outcome) => outcome,
            None => match follows[at].and_then(|leader| outcomes[leader].clone()) {
                Some(outcome) => outcome,
                None => Err(retry("the event was not worked on")),
            },
        })
        .collect()
}

fn open_payload(state: &AppState, row: &ClaimedEvent) -> Result<PatientEvent, Failure> {
    let unreadable = Failure::Dead("the event payload cannot be opened");
    let sealed = row
        .payload
        .as_deref()
        .ok_or(Failure::Dead("the event has no payload"))?;
    let plain = state
        .webhooks
        .inner
        .cipher
        .decrypt(sealed, field_aad(PAYLOAD_COLUMN, &row.id).as_bytes())
        .map_err(|_| Failure::Dead("the event payload cannot be opened"))?;
    serde_json::from_slice(&plain).map_err(|_| unreadable)
}
