//! `fhirgate webhooks`: the webhook inbox for operators. Lists events (waiting, done, dead) by
//! their row ids, connection, status, attempts and fixed-phrase errors, never a payload or an
//! event id (which may carry a patient id); and makes a connection's dead events due again once
//! their cause is fixed.

use clap::Subcommand;

use super::{print_json, CliError};
use crate::config::Settings;
use crate::startup::pool_options;
use crate::store;

#[derive(Debug, Subcommand)]
pub enum WebhooksCommand {
    /// List inbox events, oldest first, one JSON line each (`_us` times are microseconds since
    /// the Unix epoch).
    List {
        #[arg(long)]
        connection: Option<String>,
        #[arg(long, value_parser = ["pending", "done", "dead"])]
        status: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Make a connection's dead events due again, their attempts reset; prints how many.
    Retry {
        #[arg(long)]
        connection: String,
    },
}

pub async fn run(cmd: WebhooksCommand, settings: Settings) -> Result<(), CliError> {
    let store = store::connect(&settings.database_url, &pool_options(&settings))
        .await
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let result = async {
        store.migrate().await?;
        let inbox = store.inbox();
        match &cmd {
            WebhooksCommand::List {
                connection,
                status,
                limit,
            } => {
                for entry in inbox
                    .list_events(connection.as_deref(), status.as_deref(), (*limit).max(1))
                    .await?
                {
                    print_json(&entry);
                }
            }
            WebhooksCommand::Retry { connection } => {
                let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000;
                let revived = inbox
                    .revive_dead_events(connection, i64::try_from(now).unwrap_or(i64::MAX))
                    .await?;
                print_json(&serde_json::json!({ "connection": connection, "revived": revived }));
            }
        }
        Ok::<_, store::StoreError>(())
    }
    .await;
    store.close().await;
    result.map_err(|e| CliError::Failed(e.to_string()))
}
