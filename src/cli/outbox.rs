//! `fhirgate outbox`: the claim-status updates that could not be delivered (dead letters), one
//! JSON line each, and their replay. Works on the database directly (no running gateway
//! needed; a running one picks a replayed update up at its next poll or notification). Prints
//! ids, counts, times and fixed phrases, never an update's content, which stays sealed.

use clap::Subcommand;

use super::{print_json, CliError};
use crate::audit::{Action, NewAuditEvent};
use crate::config::Settings;
use crate::domain::ResourceId;
use crate::startup::pool_options;
use crate::store::{self, StoreError};

#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// List dead letters, oldest first, one JSON line each.
    DeadLetters {
        /// Only this practice's.
        #[arg(long)]
        practice: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: i64,
    },
    /// Move a dead letter back to the outbox (same update id); prints it as one JSON line.
    Replay {
        /// The dead letter's id (its update id).
        id: String,
    },
}

pub async fn run(cmd: OutboxCommand, settings: Settings) -> Result<(), CliError> {
    let usage = |e: crate::domain::InvalidValue| CliError::Usage(e.to_string());
    let practice = match &cmd {
        OutboxCommand::DeadLetters { practice, limit } => {
            if !(1..=1_000_000).contains(limit) {
                return Err(CliError::Usage("--limit: expected 1 to 1000000".into()));
            }
            practice
                .as_deref()
                .map(|p| ResourceId::parse("--practice", p))
                .transpose()
                .map_err(usage)?
        }
        OutboxCommand::Replay { id } => {
            if id.is_empty() || id.len() > 64 {
                return Err(CliError::Usage("ID: not a dead letter id".into()));
            }
            None
        }
    };
    let store = store::connect(&settings.database_url, &pool_options(&settings))
        .await
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let result = async {
        store.migrate().await.map_err(failed)?;
        let outbox = store.outbox();
        match cmd {
            OutboxCommand::DeadLetters { limit, .. } => {
                let mut after = None;
                let mut left = limit;
                while left > 0 {
                    let page = outbox
                        .list_dead_letters(practice.as_ref(), after.take(), left.min(500))
                        .await
                        .map_err(failed)?;
                    for letter in &page {
                        print_json(letter);
                    }
                    left -= page.len() as i64;
                    match page.last() {
                        Some(last) if page.len() == 500 => {
                            after = Some((last.dead_us, last.id.clone()))
                        }
                        _ => break,
                    }
                }
                Ok(())
            }
            OutboxCommand::Replay { id } => {
                let letter = match outbox.get_dead_letter(None, &id).await {
                    Ok(letter) => letter,
                    Err(StoreError::NotFound) => {
                        return Err(CliError::Usage(format!("no dead letter {id}")))
                    }
                    Err(e) => return Err(failed(e)),
                };
                let practice = ResourceId::parse("practice", letter.practice_id.clone())
                    .map_err(|e| CliError::Failed(e.to_string()))?;
                // The operator acted, from the command line: no client, no network address.
                let event = NewAuditEvent {
                    practice_id: Some(practice.clone()),
                    action: Some(Action::Push),
                    status_code: 202,
                    actor_role: Some("operator".into()),
                    resource_type: Some("Claim".into()),
                    resource_id: Some(letter.claim_id.clone()),
                    connection_id: Some(letter.connection_id.clone()),
                    user_agent: Some("fhirgate outbox replay".into()),
                    ..NewAuditEvent::default()
                };
                match outbox.replay_dead_letter(&practice, &id, &[event]).await {
                    Ok(_) => {}
                    Err(StoreError::NotFound) => {
                        return Err(CliError::Usage(format!("no dead letter {id}")))
                    }
                    Err(e) => return Err(failed(e)),
                }
                print_json(&serde_json::json!({
                    "id": letter.id,
                    "practice_id": letter.practice_id,
                    "claim_id": letter.claim_id,
                    "connection_id": letter.connection_id,
                    "status": "pending",
                }));
                Ok(())
            }
        }
    }
    .await;
    store.close().await;
    result
}

fn failed(e: StoreError) -> CliError {
    CliError::Failed(e.to_string())
}
