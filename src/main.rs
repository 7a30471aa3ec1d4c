use std::process::ExitCode;

use clap::Parser;
use runpilot::access::AccessControl;
use runpilot::cli::{Cli, Command, TokenCommand};
use runpilot::config::Config;
use runpilot::domain::{TenantId, TokenRecord, TokenScope};
use runpilot::startup::Application;
use runpilot::store::Store;
use runpilot::telemetry;

#[actix_web::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("runpilot: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Serve => serve(config).await,
        Command::Migrate => migrate(config).await,
        Command::Token { action } => token(config, action).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("runpilot: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    let mut app = Application::build(config).await?;
    if let Some(token) = app.take_first_token() {
        // Printed, never logged: this is the only time it is shown.
        println!(
            "runpilot: no admin token was configured, so one was created; it is shown once, store it now:"
        );
        println!("{token}");
    }
    app.run_until_stopped().await?;
    Ok(())
}

async fn migrate(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    let store = Store::open(&config.database).await?;
    store.close().await;
    println!("the database is up to date");
    Ok(())
}

async fn token(config: Config, action: TokenCommand) -> Result<(), Box<dyn std::error::Error>> {
    let store = Store::open(&config.database).await?;
    let access = AccessControl::new("", store.clone());
    let result = match action {
        TokenCommand::Create {
            tenants,
            all_tenants,
            label,
        } => {
            let scope = if all_tenants {
                TokenScope::AllTenants
            } else {
                TokenScope::Tenants(
                    tenants
                        .iter()
                        .map(|t| TenantId::parse(t).map_err(|e| format!("--tenant {t}: {e}")))
                        .collect::<Result<_, _>>()?,
                )
            };
            let (token, record) = access.create_token(scope, label).await?;
            println!(
                "created token {} for {}",
                record.id,
                describe_scope(&record.scope)
            );
            println!("it is shown once; store it now:");
            println!("{token}");
            Ok(())
        }
        TokenCommand::List => {
            let tokens = store.list_tokens().await?;
            println!(
                "{:<36}  {:<24}  {:<24}  {:<24}  {:<24}  LABEL",
                "ID", "SCOPE", "CREATED", "LAST USED", "REVOKED"
            );
            for t in &tokens {
                print_token(t);
            }
            Ok(())
        }
        TokenCommand::Revoke { id } => {
            match store.revoke_token(&id, runpilot::domain::now()).await? {
                Some(record) => {
                    println!(
                        "revoked token {} ({})",
                        record.id,
                        describe_scope(&record.scope)
                    );
                    Ok(())
                }
                None => Err(format!("no token with id {id}").into()),
            }
        }
    };
    store.close().await;
    result
}

fn describe_scope(scope: &TokenScope) -> String {
    match scope {
        TokenScope::AllTenants => "all tenants".to_owned(),
        TokenScope::Tenants(tenants) => {
            let names: Vec<&str> = tenants.iter().map(TenantId::as_str).collect();
            format!("tenants {}", names.join(","))
        }
    }
}

fn print_token(t: &TokenRecord) {
    let time =
        |ts: Option<runpilot::domain::Timestamp>| ts.map_or("-".to_owned(), |t| t.to_rfc3339());
    println!(
        "{:<36}  {:<24}  {:<24}  {:<24}  {:<24}  {}",
        t.id,
        describe_scope(&t.scope),
        t.created_at.to_rfc3339(),
        time(t.last_used_at),
        time(t.revoked_at),
        t.label.as_deref().unwrap_or("-")
    );
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
