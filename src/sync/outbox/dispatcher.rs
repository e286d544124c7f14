//! The claim-status dispatcher: one task per instance that leases due outbox rows and pushes
//! each through its connection's adapter (`EhrAdapter::push_claim_status`), the row's id being
//! the update's idempotency key.
//!
//! - **When**: at once after this instance commits rows ([`super::ClaimOutbox::written`]), on
//!   PostgreSQL `NOTIFY` from any instance, and every `poll_interval_ms` (retries coming due,
//!   leases running out, SQLite writers in other processes).
//! - **Who**: `claim_due` leases rows to this dispatcher (`FOR UPDATE SKIP LOCKED` on
//!   PostgreSQL, one conditional UPDATE on SQLite), so instances share the work and no two hold
//!   a row at once. A row whose dispatcher died is leased again once its lease runs out.
//! - **Order**: a row is only leased when no earlier row of its claim is still in the outbox,
//!   pending or in flight: a claim's updates reach the EHR one after the other, in order.
//! - **Failures**: retried with exponential backoff (jittered, at least the EHR's
//!   `Retry-After`); after `max_attempts` attempts, or at once for an error retrying cannot fix
//!   (credentials refused, a 4xx, the connection gone), the row moves to the dead letters. The
//!   claim's later rows then go on (the EHR gets the newest status); the dead one waits for a
//!   replay.
//! - **At least once**: a row leaves the outbox only after the EHR answered success. A crash
//!   after the EHR applied an update and before the row was removed sends it again, and the
//!   EHR's conditional create on the update id applies it once.
//!
//! Logs name rows, claims and connections by id and failures by fixed phrases; never content.

use std::time::{Duration, Instant};

use actix_web::web;
use fhirgate_adapters::AdapterError;
use tokio::task::JoinSet;

use super::ClaimOutbox;
use crate::audit::{Action, NewAuditEvent};
use crate::fhir::resources::now_us;
use crate::startup::AppState;
use crate::store::{OutboxRow, StoreError};
use crate::sync::retry::{backoff, micros};
use crate::sync::ConnectionError;

/// How long deliveries in flight may finish once the instance stops.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Starts this instance's dispatcher on the current runtime.
pub(crate) fn start(state: web::Data<AppState>) {
    let outbox = state.outbox.clone();
    let task = tokio::spawn(run(state, outbox.clone()));
    *outbox
        .inner
        .task
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(task);
}

async fn run(state: web::Data<AppState>, outbox: ClaimOutbox) {
    let runner = uuid::Uuid::new_v4().simple().to_string();
    let settings = outbox.settings().clone();
    let batch = usize::try_from(settings.batch).unwrap_or(1).max(1);
    let lease = micros(settings.lease());
    let mut stop = outbox.inner.stop.subscribe();
    let mut wakeups = match state.store.outbox().wakeups().await {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "claim-status dispatcher cannot listen for other instances' updates; polling only");
            None
        }
    };
    let mut in_flight: JoinSet<Attempt> = JoinSet::new();
    // A database that is down (or not migrated yet) fails every poll: say so once a minute.
    let mut last_warned: Option<Instant> = None;
    loop {
        if *stop.borrow() {
            break;
        }
        // Leasing is a write: with deliveries in flight, lease again only once a quarter of
        // the batch is free, so a busy dispatcher leases many rows a statement.
        let room = batch.saturating_sub(in_flight.len());
        if room > 0 && (in_flight.is_empty() || room >= batch.div_ceil(4)) {
            let now = now_us();
            match state
                .store
                .outbox()
                .claim_due(&runner, now, now + lease, room as i64)
                .await
            {
                Ok(rows) => {
                    for row in rows {
                        in_flight.spawn(attempt(state.clone(), outbox.clone(), row));
                    }
                }
                Err(e) => {
                    if last_warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                        last_warned = Some(Instant::now());
                        tracing::warn!(error = %e, "claim-status outbox: leasing due updates failed; retrying at every poll");
                    }
                }
            }
        }
        let full = in_flight.len() >= batch;
        tokio::select! {
            // (The watch's guard must not live across the await below: the task is Send.)
            _ = async { drop(stop.wait_for(|s| *s).await) } => break,
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                // Whatever else has finished too, recorded together.
                let mut finished = vec![done];
                while let Some(more) = in_flight.try_join_next() {
                    finished.push(more);
                }
                record(&state, &outbox, &runner, finished).await;
            }
            _ = outbox.inner.wake.notified(), if !full => {}
            _ = woken(&mut wakeups), if !full => {}
            _ = tokio::time::sleep(settings.poll_interval()), if !full => {}
        }
    }
    // Stopping: deliveries in flight may finish and are recorded; the rest are given back.
    let mut finished = Vec::new();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while let Some(done) = in_flight.join_next().await {
            finished.push(done);
        }
    })
    .await;
    in_flight.abort_all();
    while in_flight.join_next().await.is_some() {}
    record(&state, &outbox, &runner, finished).await;
    match state.store.outbox().release(&runner).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            updates = n,
            "claim-status updates in flight given back for the next dispatcher"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "claim-status updates in flight could not be given back; their leases run out")
        }
    }
}

/// The next wake-up from other instances (never, without a listener).
async fn woken(wakeups: &mut Option<tokio::sync::mpsc::Receiver<()>>) {
    match wakeups {
        Some(rx) => {
            if rx.recv().await.is_none() {
                *wakeups = None;
            }
        }
        None => std::future::pending().await,
    }
}

/// Why an attempt failed: a fixed phrase, and whether trying again may help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Failure {
    kind: &'static str,
    retryable: bool,
    retry_after: Option<Duration>,
}

impl Failure {
    fn permanent(kind: &'static str) -> Self {
        Self {
            kind,
            retryable: false,
            retry_after: None,
        }
    }

    fn transient(kind: &'static str) -> Self {
        Self {
            kind,
            retryable: true,
            retry_after: None,
        }
    }
}

impl From<&AdapterError> for Failure {
    fn from(e: &AdapterError) -> Self {
        match e {
            AdapterError::Auth(_) => {
                Failure::permanent("the EHR refused the gateway's credentials")
            }
            AdapterError::NotFound => Failure::permanent("the EHR answered not found"),
            AdapterError::RateLimited { retry_after } => Failure {
                kind: "the EHR asked the gateway to slow down",
                retryable: true,
                retry_after: Some(*retry_after),
            },
            AdapterError::Transient(_) => {
                Failure::transient("the EHR was unavailable (5xx, timeout or connection failure)")
            }
            AdapterError::Permanent(_) => Failure::permanent("the EHR refused the update"),
            AdapterError::Mapping(_) => {
                Failure::permanent("the update does not map to the EHR's model")
            }
        }
    }
}

impl From<&ConnectionError> for Failure {
    fn from(e: &ConnectionError) -> Self {
        match e {
            ConnectionError::NotFound | ConnectionError::UnknownPractice => {
                Failure::permanent("the EHR connection no longer exists")
            }
            ConnectionError::Invalid { .. } => {
                Failure::permanent("the EHR connection's settings do not build an adapter")
            }
            ConnectionError::Sealed(_) => Failure::permanent(
                "the EHR connection's credential does not open with the configured master keys",
            ),
            ConnectionError::Store(_) => Failure::transient("the database was unavailable"),
        }
    }
}

/// One attempt at one row: what happened, for [`record`].
struct Attempt {
    row: OutboxRow,
    result: Result<(), Failure>,
    took: Duration,
}

async fn attempt(state: web::Data<AppState>, outbox: ClaimOutbox, row: OutboxRow) -> Attempt {
    let started = Instant::now();
    let result = push(&state, &outbox, &row).await;
    Attempt {
        row,
        result,
        took: started.elapsed(),
    }
}

async fn push(state: &AppState, outbox: &ClaimOutbox, row: &OutboxRow) -> Result<(), Failure> {
    let update = outbox
        .open(&row.id, &row.payload)
        .ok_or(Failure::permanent(
            "the update does not open with the configured master keys",
        ))?;
    let opened = state
        .connections
        .adapter(&row.connection_id, &state.audit)
        .await
        .map_err(|e| Failure::from(&e))?;
    // Within the lease, so no other dispatcher starts the same update meanwhile.
    let deadline = outbox.settings().lease().mul_f64(0.75);
    match tokio::time::timeout(deadline, opened.adapter.push_claim_status(&update)).await {
        Ok(Ok(_receipt)) => Ok(()),
        Ok(Err(e)) => Err(Failure::from(&e)),
        Err(_) => Err(Failure::transient("the EHR did not answer in time")),
    }
}

/// The audit event of a push's outcome (200 delivered, 502 dead-lettered).
fn push_event(row: &OutboxRow, status: u16, took: Duration) -> NewAuditEvent {
    NewAuditEvent {
        practice_id: Some(row.practice_id.clone()),
        action: Some(Action::Push),
        status_code: status,
        resource_type: Some("Claim".into()),
        resource_id: Some(row.claim_id.clone()),
        patient_id: row.patient_id.clone(),
        connection_id: Some(row.connection_id.clone()),
        duration_ms: Some(i64::try_from(took.as_millis()).unwrap_or(i64::MAX)),
        ..NewAuditEvent::default()
    }
}

/// Records finished attempts: the delivered ones leave the outbox together, in one
/// transaction with their audit events (so a claim's next update is due at once); a failed one
/// waits for its retry or moves to the dead letters. A record that fails leaves the row leased:
/// it is tried again once the lease runs out (the EHR deduplicates a second delivery).
async fn record(
    state: &AppState,
    outbox: &ClaimOutbox,
    runner: &str,
    finished: Vec<Result<Attempt, tokio::task::JoinError>>,
) {
    let store = state.store.outbox();
    let settings = outbox.settings();
    let mut delivered = Vec::new();
    let mut events = Vec::new();
    for done in finished {
        let Ok(Attempt { row, result, took }) = done else {
            // Aborted at shutdown: its lease is given back, or runs out.
            continue;
        };
        match result {
            Ok(()) => {
                tracing::debug!(update = %row.id, claim = %row.claim_id, connection = %row.connection_id, attempts = row.attempts, "claim-status update delivered");
                if !state.skip_audit {
                    events.push(push_event(&row, 200, took));
                }
                delivered.push(row.id);
            }
            Err(failure)
                if failure.retryable && row.attempts < i64::from(settings.max_attempts) =>
            {
                let delay = backoff(
                    row.attempts,
                    Duration::from_millis(settings.retry_base_ms),
                    Duration::from_millis(settings.retry_max_ms),
                    failure.retry_after,
                );
                tracing::warn!(
                    update = %row.id,
                    claim = %row.claim_id,
                    connection = %row.connection_id,
                    attempts = row.attempts,
                    reason = failure.kind,
                    retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    "claim-status push failed; retrying"
                );
                let kept = store
                    .retry_later(&row.id, runner, now_us() + micros(delay), failure.kind)
                    .await;
                report(&row, kept.map(u64::from));
            }
            Err(failure) => {
                tracing::error!(
                    update = %row.id,
                    claim = %row.claim_id,
                    connection = %row.connection_id,
                    attempts = row.attempts,
                    reason = failure.kind,
                    "claim-status push failed for good; moved to the dead letters"
                );
                let audit = if state.skip_audit {
                    vec![]
                } else {
                    vec![push_event(&row, 502, took)]
                };
                let moved = store
                    .dead_letter(&row.id, runner, failure.kind, &audit)
                    .await;
                report(&row, moved.map(u64::from));
            }
        }
    }
    if !delivered.is_empty() {
        match store.delivered(runner, &delivered, &events).await {
            Ok(n) if n < delivered.len() as u64 => tracing::info!(
                updates = delivered.len() as u64 - n,
                "claim-status updates delivered after another dispatcher took them over (lease ran out)"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(
                updates = delivered.len(),
                error = %e,
                "claim-status deliveries not recorded; the updates are sent again when their leases run out"
            ),
        }
    }
}

/// Logs a record that did not take (the runner lost its lease, or the database failed).
fn report(row: &OutboxRow, recorded: Result<u64, StoreError>) {
    match recorded {
        Ok(0) => tracing::info!(
            update = %row.id,
            "claim-status update was taken over by another dispatcher (lease ran out)"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(
            update = %row.id,
            error = %e,
            "claim-status outcome not recorded; the update is tried again when its lease runs out"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_that_may_pass_are_retried() {
        assert!(Failure::from(&AdapterError::Transient("HTTP 503".into())).retryable);
        let limited = Failure::from(&AdapterError::RateLimited {
            retry_after: Duration::from_secs(7),
        });
        assert!(limited.retryable);
        assert_eq!(limited.retry_after, Some(Duration::from_secs(7)));
        assert!(!Failure::from(&AdapterError::Auth("HTTP 401".into())).retryable);
        assert!(!Failure::from(&AdapterError::Permanent("HTTP 422".into())).retryable);
        assert!(!Failure::from(&ConnectionError::NotFound).retryable);
        assert!(
            Failure::from(&ConnectionError::Store(StoreError::Unavailable(
                "i/o".into()
            )))
            .retryable
        );
    }
}
