//! The command line (SPEC 6).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "runpilot",
    version,
    about = "Starts, supervises and reports tenant-scoped runs"
)]
pub struct Cli {
    /// The configuration file (default: config/runpilot.toml when present).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service (migrates the database first, resumes unfinished runs).
    Serve,
    /// Create or update the database schema, then exit.
    Migrate,
}
