//! Claim-status push through a transactional outbox: when a claim's status changes (the status
//! route, or a FHIR ClaimResponse written to the gateway), the update for the claim's EHR is
//! written to `claim_outbox` in the same database transaction as the change; a dispatcher on
//! every instance then delivers it through the connection's adapter.
//!
//! What it owns:
//! - finding where an update goes ([`rows`]): the EHR connection the claim's patient was pulled
//!   from, the patient's and the claim's ids there, and the update sealed at rest;
//! - delivering ([`dispatcher`]): within a second of the commit (an in-process wake-up for rows
//!   this instance wrote, PostgreSQL `LISTEN/NOTIFY` or a short poll for other instances'),
//!   at least once, in order per claim, with the row's id as the idempotency key, retried with
//!   backoff, dead-lettered after `max_attempts`;
//! - replaying dead letters.
//!
//! What it must never do: log, store in clear or put in an error anything of the update's
//! content (patient ids at the EHR, dispositions): logs carry row, claim and connection ids,
//! counts and fixed phrases only.

pub mod changes;
pub(crate) mod dispatcher;
pub mod rows;

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::crypto::{FieldCipher, Keyring};

pub use rows::{PushTarget, PAYLOAD_COLUMN};

/// `[outbox]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxSettings {
    /// Attempts (the first included) before an update moves to the dead letters.
    pub max_attempts: u32,
    /// How often a dispatcher looks for due rows it was not woken for.
    pub poll_interval_ms: u64,
    /// First retry delay; doubled per attempt, jittered.
    pub retry_base_ms: u64,
    /// Longest retry delay (an EHR's `Retry-After` may ask for more, and is honoured).
    pub retry_max_ms: u64,
    /// Updates one instance has in flight at once (always of different claims).
    pub batch: u32,
    /// How long a dispatcher holds an update in flight; past it, another may retry it.
    pub lease_ms: u64,
}

impl OutboxSettings {
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if !(1..=100).contains(&self.max_attempts) {
            return Err(("outbox.max_attempts", "must be between 1 and 100"));
        }
        if !(1..=60_000).contains(&self.poll_interval_ms) {
            return Err(("outbox.poll_interval_ms", "must be between 1 and 60000"));
        }
        if self.retry_base_ms == 0 {
            return Err(("outbox.retry_base_ms", "must be at least 1"));
        }
        if self.retry_max_ms < self.retry_base_ms {
            return Err(("outbox.retry_max_ms", "must be at least retry_base_ms"));
        }
        if !(1..=1_000).contains(&self.batch) {
            return Err(("outbox.batch", "must be between 1 and 1000"));
        }
        if !(1_000..=3_600_000).contains(&self.lease_ms) {
            return Err((
                "outbox.lease_ms",
                "must be between 1000 and 3600000 (one hour)",
            ));
        }
        Ok(())
    }

    fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }

    fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }
}

/// The claim-status outbox of one instance: what writers need (the cipher that seals payloads,
/// the wake-up of the local dispatcher) and the dispatcher's lifecycle. Cheap to clone.
#[derive(Clone)]
pub struct ClaimOutbox {
    inner: Arc<Inner>,
}

struct Inner {
    settings: OutboxSettings,
    cipher: FieldCipher,
    /// Wakes this instance's dispatcher after a commit that wrote rows.
    wake: tokio::sync::Notify,
    stop: tokio::sync::watch::Sender<bool>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl ClaimOutbox {
    pub fn new(settings: &OutboxSettings, keyring: &Keyring) -> Self {
        let (stop, _) = tokio::sync::watch::channel(false);
        Self {
            inner: Arc::new(Inner {
                settings: settings.clone(),
                cipher: FieldCipher::new(keyring),
                wake: tokio::sync::Notify::new(),
                stop,
                task: std::sync::Mutex::new(None),
            }),
        }
    }

    pub fn settings(&self) -> &OutboxSettings {
        &self.inner.settings
    }

    pub(crate) fn cipher(&self) -> &FieldCipher {
        &self.inner.cipher
    }

    /// Tells this instance's dispatcher that rows were committed (call after the commit).
    pub fn written(&self) {
        self.inner.wake.notify_one();
    }

    /// Stops the dispatcher: no new deliveries; those in flight get a few seconds to finish,
    /// then every row this instance still holds is given back for the next dispatcher (here
    /// after a restart, or another instance) to deliver.
    pub async fn shutdown(&self) {
        let _ = self.inner.stop.send(true);
        let task = self
            .inner
            .task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(mut task) = task {
            let bound = dispatcher::SHUTDOWN_GRACE + Duration::from_secs(5);
            if tokio::time::timeout(bound, &mut task).await.is_err() {
                task.abort();
                tracing::warn!("claim-status dispatcher did not stop in time");
            }
        }
    }
}
