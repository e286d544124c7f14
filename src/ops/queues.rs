//! The durable queues' health: for each queue (the claim-status outbox, the webhook inbox, the
//! quarantine of EHR records that did not map) and each EHR connection, how
//! many rows wait and how old the oldest is. `/metrics` exports it; `/readyz` names a queue stuck
//! past `sync.stuck_after_secs` without failing (a stuck queue needs a person, not a restart).
//! Labels are queue names and connection ids (opaque, bounded by the connections configured):
//! never PHI.

use time::OffsetDateTime;

use crate::store::{QueueStat, Store, StoreError};

/// One queue's standing for one connection.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueHealth {
    pub queue: &'static str,
    pub connection_id: String,
    pub depth: i64,
    /// Seconds since the oldest waiting row was written (0 when none waits).
    pub oldest_age_secs: f64,
}

/// Dead letters per connection (claim-status updates that need a person).
pub async fn dead_letters(store: &dyn Store) -> Result<Vec<(String, i64)>, StoreError> {
    store.outbox().dead_letter_counts().await
}

/// Every queue's standing now.
pub async fn queue_health(store: &dyn Store) -> Result<Vec<QueueHealth>, StoreError> {
    let now = OffsetDateTime::now_utc();
    let mut out = Vec::new();
    let queues: [(&'static str, Vec<QueueStat>); 3] = [
        ("outbox", store.outbox().queue_stats().await?),
        ("webhook_inbox", store.inbox().queue_stats().await?),
        ("quarantine", store.jobs().quarantine_stats().await?),
    ];
    for (queue, stats) in queues {
        for s in stats {
            let oldest_age_secs = s
                .oldest_pending_at
                .map_or(0.0, |t| (now - t).as_seconds_f64().max(0.0));
            out.push(QueueHealth {
                queue,
                connection_id: s.connection_id,
                depth: s.depth,
                oldest_age_secs,
            });
        }
    }
    Ok(out)
}
