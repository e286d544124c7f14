//! The inbox worker: claims due rows under a lease (any instance may; `FOR UPDATE SKIP LOCKED`
//! on PostgreSQL), and for each one upserts its patient (the resource the sender included, or
//! `adapter.patient(id)`) through `sync::ingest`, or pulls from the connection's watermark for a
//! resync (without moving the watermark). Done rows lose their sealed payload; failures are
//! retried with exponential backoff and, after `max_attempts` or when retrying cannot help, the
//! row is marked dead with a fixed phrase and kept for an operator.
//!
//! It wakes at once for rows this instance wrote and every `poll_interval_ms` for the rest
//! (other instances' rows, retries, rows whose worker died and whose lease ran out). A lease is
//! renewed while its row is worked on; a row whose lease was lost is dropped mid-way, so it is
//! finished once, by its new holder. Logs row and connection ids and fixed phrases only.

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
    ingest, on_page, pull, ConnectionError, PullError, PullOptions, PullReport, PullTarget,
};

/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// Why an attempt did not finish its row. Phrases are fixed (they are stored in the row).
#[derive(Debug)]
enum Failure {
    /// May pass: try again later (not before `after`, when the EHR said).
    Retry {
        phrase: &'static str,
        after: Option<Duration>,
    },
    /// Retrying cannot help.
    Dead(&'static str),
    /// Another worker holds the row now.
    Lost,
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

/// The worker loop, until the instance stops.
pub(super) async fn run(state: web::Data<AppState>, hooks: Webhooks) {
    let settings = hooks.settings().clone();
    let mut stop = hooks.inner.stop.subscribe();
    let poll = Duration::from_millis(settings.poll_interval_ms);
    let lease = Duration::from_secs(settings.lease_secs);
    // Claim a few more than are worked on at once, so a batch keeps every slot busy.
    let batch = i64::try_from(settings.concurrency.saturating_mul(2)).unwrap_or(32);
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
        futures_util::stream::iter(claimed)
            .for_each_concurrent(settings.concurrency, |row| {
                let state = &state;
                let hooks = &hooks;
                async move { settle(state, hooks, row, lease).await }
            })
            .await;
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

/// Works on one claimed row while keeping its lease, then records how it ended.
async fn settle(state: &AppState, hooks: &Webhooks, row: ClaimedEvent, lease: Duration) {
    let runner = hooks.inner.runner.as_str();
    let outcome = tokio::select! {
        outcome = work(state, &row) => outcome,
        lost = keep_lease(state, &row.id, runner, lease) => lost,
    };
    let inbox = state.store.inbox();
    let settings = hooks.settings();
    let recorded = match outcome {
        Ok(()) => inbox.complete_event(&row.id, runner, now_us()).await,
        Err(Failure::Lost) => {
            tracing::warn!(event = %row.id, "webhook event lease lost; its new holder finishes it");
            return;
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
    match recorded {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(event = %row.id, "webhook event was taken over before its outcome was recorded")
        }
        Err(e) => {
            tracing::warn!(event = %row.id, error = %e, "webhook event outcome not recorded; it is retried once its lease runs out")
        }
    }
}

/// Renews the lease every third of its length; returns only when it is lost.
async fn keep_lease(
    state: &AppState,
    id: &str,
    runner: &str,
    lease: Duration,
) -> Result<(), Failure> {
    let every = (lease / 3).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        match state
            .store
            .inbox()
            .renew_event(id, runner, now_us() + micros(lease))
            .await
        {
            Ok(true) => {}
            Ok(false) => return Err(Failure::Lost),
            // The lease still runs; try again at the next beat.
            Err(e) => tracing::warn!(event = %id, error = %e, "webhook lease renewal failed"),
        }
    }
}

/// One attempt at a row.
async fn work(state: &AppState, row: &ClaimedEvent) -> Result<(), Failure> {
    let opened = state
        .connections
        .adapter(&row.connection_id, &state.audit)
        .await?;
    let vault = state
        .vault()
        .await
        .map_err(|_| retry("the PHI vault is unavailable"))?;
    let target = PullTarget {
        store: &*state.store,
        vault,
        practice: &row.practice_id,
        connection_id: &row.connection_id,
        run_id: None,
    };
    let options = PullOptions { coverage: true };
    match row.kind {
        InboxKind::Patient => {
            let event = open_payload(state, row)?;
            let resource = match event.resource {
                Some(resource) => resource,
                None => opened.adapter.patient(&event.patient_id).await?,
            };
            let mut report = PullReport::default();
            ingest(
                &target,
                &*opened.adapter,
                opened.profile(),
                vec![resource],
                options,
                &mut report,
            )
            .await?;
            if report.created + report.updated == 0 && report.failed > 0 {
                return Err(Failure::Dead(
                    "the patient did not map to the internal model",
                ));
            }
        }
        InboxKind::Resync => {
            // From the watermark the nightly pull keeps, which this does not move: the events
            // missed since then are covered, and the nightly run still sees everything.
            let report = pull(
                &target,
                &*opened.adapter,
                opened.profile(),
                opened.stored.watermark.as_deref(),
                options,
                on_page(|_| {}),
            )
            .await?;
            tracing::info!(event = %row.id, connection = %row.connection_id, received = report.received, created = report.created, updated = report.updated, failed = report.failed, "webhook resync pulled");
        }
    }
    Ok(())
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
