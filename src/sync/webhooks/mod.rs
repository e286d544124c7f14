//! Patient-change webhooks: `POST /webhooks/{connection_id}` (and R4 rest-hook `PUT
//! /webhooks/{connection_id}/Patient/{id}`) authenticates an EHR's notification, writes its
//! events sealed to the durable inbox and answers; the inbox worker then fetches and upserts
//! each patient through the connection's adapter, with retries, or pulls from the watermark when
//! events were missed.
//!
//! Owns: the `[webhooks]` settings, the route, this instance's worker (started with the
//! application, stopped before the database closes) and the key that seals inbox payloads.
//! Never: calls an EHR while a request waits, stores an unauthenticated request, stores or logs
//! a patient id, a name or a resource in clear, or advances a connection's watermark (the
//! nightly pull's).

mod commit;
pub mod notification;
mod receive;
mod worker;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::web;
use serde::{Deserialize, Serialize};

use crate::crypto::{FieldCipher, Keyring};
use crate::startup::AppState;
use crate::store::Store;

/// The AAD column of sealed inbox payloads (`field_aad(PAYLOAD_COLUMN, row id)`).
pub(crate) const PAYLOAD_COLUMN: &str = "webhook_inbox.payload";
/// The blind index column label of event keys.
pub(crate) const EVENT_KEY_COLUMN: &str = "webhook_inbox.event_key";

/// What a `patient` row's sealed payload holds.
#[derive(Serialize, Deserialize)]
pub(crate) struct PatientEvent {
    /// The patient's id at the EHR.
    pub patient_id: String,
    /// The Patient the sender included (full-resource payloads); fetched when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<serde_json::Value>,
}

/// How long a connection's webhook secret is kept open in memory: a new secret, or a disabled
/// connection, applies to webhooks within this time.
pub const CONNECTION_TTL: Duration = Duration::from_secs(10);

/// `[webhooks]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// Largest request body accepted (413 above).
    pub max_body_bytes: usize,
    /// How far `webhook-timestamp` may be from now, either way (401 beyond).
    pub tolerance_secs: u64,
    /// Attempts at an event before it is marked dead.
    pub max_attempts: u32,
    /// How often the worker looks for due rows it was not woken for (other instances' rows,
    /// retries, rows whose worker died).
    pub poll_interval_ms: u64,
    /// The first retry's delay; each further one doubles it (at most an hour).
    pub retry_base_ms: u64,
    /// How long a claim holds a row without news from its worker (renewed while it works).
    pub lease_secs: u64,
    /// Patient fetches one instance runs at once per connection, and connections worked on
    /// at once; a batch claims 8 times this many events.
    pub concurrency: usize,
}

impl WebhookSettings {
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if self.max_body_bytes < 1024 {
            return Err(("webhooks.max_body_bytes", "must be at least 1024"));
        }
        if !(1..=3600).contains(&self.tolerance_secs) {
            return Err(("webhooks.tolerance_secs", "must be between 1 and 3600"));
        }
        if self.max_attempts == 0 {
            return Err(("webhooks.max_attempts", "must be at least 1"));
        }
        if self.poll_interval_ms == 0 {
            return Err(("webhooks.poll_interval_ms", "must be at least 1"));
        }
        if self.retry_base_ms == 0 {
            return Err(("webhooks.retry_base_ms", "must be at least 1"));
        }
        if self.lease_secs == 0 {
            return Err(("webhooks.lease_secs", "must be at least 1"));
        }
        if !(1..=256).contains(&self.concurrency) {
            return Err(("webhooks.concurrency", "must be between 1 and 256"));
        }
        Ok(())
    }
}

/// This instance's webhook side: settings, the payload cipher and the worker. Cheap to clone.
#[derive(Clone)]
pub struct Webhooks {
    inner: Arc<Inner>,
}

struct Inner {
    settings: WebhookSettings,
    cipher: FieldCipher,
    store: Arc<dyn Store>,
    /// Commits accepted notifications in groups.
    writer: commit::InboxWriter,
    /// Wakes the worker when this instance wrote rows.
    wake: tokio::sync::Notify,
    stop: tokio::sync::watch::Sender<bool>,
    /// Who this instance's claims are by.
    runner: String,
    /// Connections webhooks were received for, with their secrets opened, for
    /// [`CONNECTION_TTL`]: a request does not read and decrypt its connection every time.
    connections: moka::future::Cache<String, Arc<receive::Receiver>>,
    worker: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Webhooks {
    /// Starts the inbox writer on the current runtime (the worker starts with [`Self::start`]).
    pub fn new(settings: &WebhookSettings, keyring: &Keyring, store: Arc<dyn Store>) -> Self {
        let (stop, _) = tokio::sync::watch::channel(false);
        Self {
            inner: Arc::new(Inner {
                settings: settings.clone(),
                cipher: FieldCipher::new(keyring),
                writer: commit::InboxWriter::start(Arc::clone(&store)),
                store,
                wake: tokio::sync::Notify::new(),
                stop,
                runner: format!("webhooks-{}", uuid::Uuid::new_v4().simple()),
                connections: moka::future::Cache::builder()
                    .max_capacity(10_000)
                    .time_to_live(CONNECTION_TTL)
                    .build(),
                worker: Mutex::new(None),
            }),
        }
    }

    pub fn settings(&self) -> &WebhookSettings {
        &self.inner.settings
    }

    /// Starts this instance's inbox worker on the current runtime.
    pub fn start(state: web::Data<AppState>) {
        let hooks = state.webhooks.clone();
        let task = tokio::spawn(worker::run(state, hooks.clone()));
        let slot = hooks.inner.worker.lock();
        if let Ok(mut slot) = slot {
            *slot = Some(task);
        }
    }

    /// Stops the worker: it takes no new rows and finishes those in hand within `grace`; rows
    /// still unfinished then are given back for the next worker (any instance).
    pub async fn shutdown(&self, grace: Duration) {
        let _ = self.inner.stop.send(true);
        let task = self.inner.worker.lock().ok().and_then(|mut t| t.take());
        if let Some(mut task) = task {
            if tokio::time::timeout(grace, &mut task).await.is_err() {
                task.abort();
                let _ = task.await;
                let given_back = self
                    .inner
                    .store
                    .inbox()
                    .release_events(&self.inner.runner)
                    .await
                    .unwrap_or(0);
                tracing::warn!(
                    given_back,
                    "webhook worker stopped before finishing its events"
                );
            }
        }
    }

    fn wake(&self) {
        self.inner.wake.notify_one();
    }
}

/// The webhook routes: outside the bearer gate (the EHR is not a gateway client), each request
/// rate-limited per connection and audited by its handler.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/webhooks/{connection_id}",
        web::post().to(receive::receive),
    )
    .route(
        "/webhooks/{connection_id}/Patient/{id}",
        web::put().to(receive::receive_put),
    );
}
