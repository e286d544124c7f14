//! The `fhirgate` command line. Every subcommand takes `--config FILE` and honours `FHIRGATE_*`
//! variables. Commands meant for scripts print one JSON object a line on stdout; diagnostics go to
//! stderr and never contain PHI.

mod healthcheck;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::Settings;
use crate::domain::{NewPractice, Npi, PracticeName, TaxId, TimeZoneName};
use crate::startup::{pool_options, Application};
use crate::store;
use crate::telemetry::{get_subscriber, init_subscriber};

#[derive(Debug, Parser)]
#[command(
    name = "fhirgate",
    version,
    about = "HIPAA-audited FHIR R4 integration gateway"
)]
pub struct Cli {
    /// Configuration file (TOML) layered over config/default.toml.
    #[arg(long, global = true, env = "FHIRGATE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (migrates the database first unless migrate_on_start = false).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Manage practices (tenants).
    #[command(subcommand)]
    Practices(PracticesCommand),
    /// Exit 0 when the gateway at --url answers /healthz (for container health checks).
    Healthcheck {
        #[arg(long, default_value = "http://127.0.0.1:8080/healthz")]
        url: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PracticesCommand {
    /// Create a practice; prints it as one JSON line.
    Add(AddPractice),
    /// List practices, one JSON line each.
    List,
}

#[derive(Debug, Args)]
pub struct AddPractice {
    #[arg(long)]
    pub name: String,
    /// IANA time zone of the practice (nightly jobs run in it).
    #[arg(long, default_value = "UTC")]
    pub timezone: String,
    #[arg(long)]
    pub npi: Option<String>,
    /// Employer identification number (NN-NNNNNNN).
    #[arg(long)]
    pub tax_id: Option<String>,
}

/// What went wrong, and the exit code it earns: 2 for bad configuration or arguments, 1 otherwise.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Usage(_) => ExitCode::from(2),
            CliError::Failed(_) => ExitCode::from(1),
        }
    }
}

pub fn run(cli: Cli) -> ExitCode {
    match run_inner(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("fhirgate: {err}");
            err.exit_code()
        }
    }
}

fn run_inner(cli: Cli) -> Result<(), CliError> {
    if let Command::Healthcheck { url } = &cli.command {
        return healthcheck::check(url).map_err(CliError::Failed);
    }
    let settings =
        Settings::load(cli.config.as_deref()).map_err(|e| CliError::Usage(e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Failed(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(dispatch(cli.command, settings))
}

async fn dispatch(command: Command, settings: Settings) -> Result<(), CliError> {
    let failed = |e: &dyn std::fmt::Display| CliError::Failed(e.to_string());
    match command {
        Command::Serve => {
            init_subscriber(get_subscriber(
                &settings.log_level,
                settings.log_format,
                std::io::stdout,
            ));
            let env = settings.env;
            let db = settings.database_url.clone();
            let app = Application::build(settings).await.map_err(|e| failed(&e))?;
            tracing::info!(
                addr = %app.local_addr(),
                database = %db,
                env = ?env,
                "fhirgate listening"
            );
            app.run_until_stopped().await.map_err(|e| failed(&e))
        }
        Command::Migrate => {
            let store = store::connect(&settings.database_url, &pool_options(&settings))
                .await
                .map_err(|e| failed(&e))?;
            store.migrate().await.map_err(|e| failed(&e))?;
            let status = store.migration_status().await.map_err(|e| failed(&e))?;
            store.close().await;
            println!(
                "{}",
                serde_json::json!({ "migrated": true, "applied": status.applied })
            );
            Ok(())
        }
        Command::Practices(cmd) => practices(cmd, settings).await,
        Command::Healthcheck { .. } => unreachable!("handled before loading settings"),
    }
}

async fn practices(cmd: PracticesCommand, settings: Settings) -> Result<(), CliError> {
    let usage = |e: crate::domain::InvalidValue| CliError::Usage(e.to_string());
    let new = match &cmd {
        PracticesCommand::Add(add) => Some(NewPractice {
            name: PracticeName::parse(add.name.as_str()).map_err(usage)?,
            timezone: TimeZoneName::parse(add.timezone.as_str()).map_err(usage)?,
            npi: add
                .npi
                .as_deref()
                .map(Npi::parse)
                .transpose()
                .map_err(usage)?,
            tax_id: add
                .tax_id
                .as_deref()
                .map(TaxId::parse)
                .transpose()
                .map_err(usage)?,
        }),
        PracticesCommand::List => None,
    };
    let store = store::connect(&settings.database_url, &pool_options(&settings))
        .await
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let result = async {
        store.migrate().await?;
        match new {
            Some(new) => {
                let practice = store.create_practice(&new).await?;
                println!("{}", serde_json::to_string(&practice).unwrap_or_default());
            }
            None => {
                for practice in store.list_practices().await? {
                    println!("{}", serde_json::to_string(&practice).unwrap_or_default());
                }
            }
        }
        Ok::<_, store::StoreError>(())
    }
    .await;
    store.close().await;
    result.map_err(|e| CliError::Failed(e.to_string()))
}
