//! Group commit for audit events: callers hand an event to one background writer and wait until
//! it is durable; the writer appends everything queued meanwhile, one transaction per chain (the
//! chains at once), so under load one commit (one fsync) serves many requests.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::NewAuditEvent;
use crate::domain::ResourceId;
use crate::store::Store;

/// Most events appended in one transaction.
const MAX_BATCH: usize = 512;
/// Events waiting for the writer before callers are pushed back (bounded memory).
const QUEUE: usize = 8192;

#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum AuditError {
    #[error("the audit trail is unavailable")]
    Unavailable,
}

struct Pending {
    event: NewAuditEvent,
    done: oneshot::Sender<Result<(), AuditError>>,
}

/// A handle to the audit writer; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    queue: mpsc::Sender<Pending>,
}

impl AuditLog {
    /// Starts the writer task on the current runtime. It stops once every handle is dropped,
    /// after appending what was queued.
    pub fn start(store: Arc<dyn Store>) -> (Self, JoinHandle<()>) {
        let (queue, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(run(store, rx));
        (Self { queue }, task)
    }

    /// Records `event` and returns once it is committed.
    pub async fn record(&self, event: NewAuditEvent) -> Result<(), AuditError> {
        let (done, wait) = oneshot::channel();
        self.queue
            .send(Pending { event, done })
            .await
            .map_err(|_| AuditError::Unavailable)?;
        wait.await.unwrap_or(Err(AuditError::Unavailable))
    }
}

async fn run(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Pending>) {
    let mut batch: Vec<Pending> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // One transaction per chain, all at once: a batch never holds one practice's chain
        // head while it waits for another's (which a request's own transaction may hold).
        let mut chains: Vec<(Option<ResourceId>, Vec<Pending>)> = Vec::new();
        for pending in batch.drain(..) {
            match chains
                .iter_mut()
                .find(|(chain, _)| *chain == pending.event.practice_id)
            {
                Some((_, group)) => group.push(pending),
                None => chains.push((pending.event.practice_id.clone(), vec![pending])),
            }
        }
        futures_util::future::join_all(chains.into_iter().map(|(_, group)| append(&*store, group)))
            .await;
    }
}

/// Appends one chain's events and tells their callers.
async fn append(store: &dyn Store, group: Vec<Pending>) {
    let (events, waiting): (Vec<NewAuditEvent>, Vec<_>) =
        group.into_iter().map(|p| (p.event, p.done)).unzip();
    let result = store
        .append_audit(&events)
        .await
        .map(|_| ())
        .map_err(|err| {
            tracing::error!(error = %err, events = events.len(), "audit append failed");
            AuditError::Unavailable
        });
    for done in waiting {
        let _ = done.send(result);
    }
}
