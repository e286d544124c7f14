use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    fhirgate::cli::run(fhirgate::cli::Cli::parse())
}
