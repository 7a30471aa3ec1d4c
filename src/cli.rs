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
    /// Manage API tokens stored in the database (works while `serve` runs).
    Token {
        #[command(subcommand)]
        action: TokenCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it once (alone on the last line).
    Create {
        /// A tenant the token reaches; repeat for several.
        #[arg(
            long = "tenant",
            value_name = "TENANT",
            required_unless_present = "all_tenants"
        )]
        tenants: Vec<String>,
        /// A token that reaches every tenant (an admin token).
        #[arg(long, conflicts_with = "tenants")]
        all_tenants: bool,
        /// What the token is for, shown by `token list`.
        #[arg(long)]
        label: Option<String>,
    },
    /// List the stored tokens (never the tokens themselves).
    List,
    /// Revoke a token by its id; it is refused from the next request on.
    Revoke {
        /// The id `token create` and `token list` show.
        id: String,
    },
}
