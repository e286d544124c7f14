//! Group commit for the webhook inbox: handlers hand their notification's writes to one
//! background writer and wait until they are durable; the writer commits everything queued
//! meanwhile in one transaction per practice (inbox rows and audit events alike, the practices
//! at once), so under load one commit serves many requests, as the audit writer does for reads
//! (`crate::audit::writer`).
//!
//! A handler answers only after its writes committed; if the batch fails, every request of it
//! is answered with the failure (the senders retry, and whatever was written before is
//! recognised as a duplicate). Never sees anything in clear: rows arrive sealed.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::store::{Accepted, InboxAccept, Store, StoreError};

/// Most notifications committed in one transaction.
const MAX_BATCH: usize = 256;
/// Notifications waiting for the writer before handlers are pushed back (bounded memory).
const QUEUE: usize = 4096;

type Reply = oneshot::Sender<Result<Accepted, StoreError>>;

/// A handle to the inbox writer; cheap to clone. The writer stops once every handle is gone,
/// after committing what was queued.
#[derive(Clone)]
pub(super) struct InboxWriter {
    queue: mpsc::Sender<(InboxAccept, Reply)>,
}

impl InboxWriter {
    /// Starts the writer on the current runtime.
    pub(super) fn start(store: Arc<dyn Store>) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(store, rx));
        Self { queue }
    }

    /// Writes `accept` and returns once it is committed.
    pub(super) async fn accept(&self, accept: InboxAccept) -> Result<Accepted, StoreError> {
        let (done, wait) = oneshot::channel();
        let stopped = || StoreError::Unavailable("the webhook inbox writer has stopped".into());
        self.queue
            .send((accept, done))
            .await
            .map_err(|_| stopped())?;
        wait.await.unwrap_or_else(|_| Err(stopped()))
    }
}

async fn run(store: Arc<dyn Store>, mut rx: mpsc::Receiver<(InboxAccept, Reply)>) {
    let mut batch: Vec<(InboxAccept, Reply)> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // One transaction per practice, all at once: each appends to its practice's audit
        // chain only, so none holds one chain's head while it waits for another's.
        let mut practices: Vec<Vec<(InboxAccept, Reply)>> = Vec::new();
        for (accept, reply) in batch.drain(..) {
            match practices
                .iter_mut()
                .find(|group| group[0].0.practice_id == accept.practice_id)
            {
                Some(group) => group.push((accept, reply)),
                None => practices.push(vec![(accept, reply)]),
            }
        }
        futures_util::future::join_all(practices.into_iter().map(|group| commit(&*store, group)))
            .await;
    }
}

/// Commits one practice's notifications and answers their handlers.
async fn commit(store: &dyn Store, group: Vec<(InboxAccept, Reply)>) {
    let (accepts, replies): (Vec<InboxAccept>, Vec<Reply>) = group.into_iter().unzip();
    match store.inbox().accept(&accepts).await {
        Ok(results) => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok(result));
            }
        }
        Err(err) => {
            tracing::warn!(error = %err, notifications = accepts.len(), "webhook inbox commit failed");
            for reply in replies {
                let _ = reply.send(Err(err.clone()));
            }
        }
    }
}
