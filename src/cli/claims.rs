//! `fhirgate claims check-rules`: loads claim preparation's code tables and payer rules the way
//! `serve` does at start, so an operator can check a new payer file before restarting.

use clap::Subcommand;

use super::{print_json, CliError};
use crate::claims::{ClaimRules, ClaimsSettings};
use crate::config::Settings;

#[derive(Debug, Subcommand)]
pub enum ClaimsCommand {
    /// Check `claims.rules_dir` (or --dir): prints what loaded as one JSON line, or exits 2
    /// naming the file and the key that is wrong.
    CheckRules {
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
}

pub fn run(cmd: ClaimsCommand, settings: Settings) -> Result<(), CliError> {
    match cmd {
        ClaimsCommand::CheckRules { dir } => {
            let settings = ClaimsSettings {
                rules_dir: dir.unwrap_or(settings.claims.rules_dir),
            };
            let rules = ClaimRules::from_settings(&settings)
                .map_err(|e| CliError::Usage(format!("claim rules: {e}")))?;
            print_json(&serde_json::json!({
                "rules_dir": settings.rules_dir,
                "cpt_codes": rules.cpt().len(),
                "icd10_codes": rules.icd10().len(),
                "payers": rules
                    .payers()
                    .map(|p| serde_json::json!({
                        "id": p.id(),
                        "name": p.name(),
                        "timely_filing_days": p.timely_filing_days(),
                        "rules": p.rules().len(),
                    }))
                    .collect::<Vec<_>>(),
            }));
            Ok(())
        }
    }
}
