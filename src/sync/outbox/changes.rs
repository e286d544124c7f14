//! Group commit for claim-status changes: handlers hand their change (with its outbox rows and
//! audit events) to one background writer and wait for its answer; the writer commits
//! everything queued meanwhile in one transaction per practice, the practices at once, as the
//! webhook inbox and the audit writer do.
//!
//! Each change still stands alone: inside the transaction it reads its claim's state (seeing
//! the changes before it in the batch) and is written only when that state allows it, so two
//! requests moving one claim at once commit one change and refuse the other. The batch holds
//! its practice's audit chain head once for all of them: under load one commit serves many
//! changes, where one each made every change of a practice wait for the one before.
//!
//! A handler answers only after its change committed; if the transaction fails, every change of
//! it is answered with the failure (nothing of it was written).

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::domain::ResourceId;
use crate::store::{ClaimTransition, Store, StoreError, Transitioned};

/// Most changes committed in one transaction.
const MAX_BATCH: usize = 256;
/// Changes waiting for the writer before handlers are pushed back (bounded memory).
const QUEUE: usize = 4096;

type Reply = oneshot::Sender<Result<Transitioned, StoreError>>;

struct Queued {
    practice: ResourceId,
    change: ClaimTransition,
    reply: Reply,
}

/// A handle to the claim-status writer; cheap to clone. The writer stops once every handle is
/// gone, after committing what was queued.
#[derive(Clone)]
pub struct ChangeWriter {
    queue: mpsc::Sender<Queued>,
}

impl ChangeWriter {
    /// Starts the writer on the current runtime.
    pub fn start(store: Arc<dyn Store>) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(store, rx));
        Self { queue }
    }

    /// Commits `change` of a claim of `practice` if the claim's state allows it, and returns
    /// once the answer is durable.
    pub async fn transition(
        &self,
        practice: &ResourceId,
        change: ClaimTransition,
    ) -> Result<Transitioned, StoreError> {
        let (reply, wait) = oneshot::channel();
        let stopped = || StoreError::Unavailable("the claim-status writer has stopped".into());
        self.queue
            .send(Queued {
                practice: practice.clone(),
                change,
                reply,
            })
            .await
            .map_err(|_| stopped())?;
        wait.await.unwrap_or_else(|_| Err(stopped()))
    }
}

async fn run(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Queued>) {
    let mut batch: Vec<Queued> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // One transaction per practice, all at once: each appends to its practice's audit
        // chain only, so none holds one chain's head while it waits for another's.
        let mut practices: Vec<Vec<Queued>> = Vec::new();
        for queued in batch.drain(..) {
            match practices
                .iter_mut()
                .find(|group| group[0].practice == queued.practice)
            {
                Some(group) => group.push(queued),
                None => practices.push(vec![queued]),
            }
        }
        futures_util::future::join_all(practices.into_iter().map(|group| commit(&*store, group)))
            .await;
    }
}

/// Commits one practice's changes and answers their handlers.
async fn commit(store: &dyn Store, group: Vec<Queued>) {
    let practice = group[0].practice.clone();
    let (changes, replies): (Vec<ClaimTransition>, Vec<Reply>) =
        group.into_iter().map(|q| (q.change, q.reply)).unzip();
    match store.outbox().transition_claims(&practice, &changes).await {
        Ok(answers) => {
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(Ok(answer));
            }
        }
        Err(err) => {
            tracing::warn!(error = %err, changes = changes.len(), "claim-status commit failed");
            for reply in replies {
                let _ = reply.send(Err(err.clone()));
            }
        }
    }
}
