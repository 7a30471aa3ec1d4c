//! The API, tested over HTTP against the application on a random port,
//! each test with its own SQLite file.

mod access;
mod cancel;
mod contract;
mod dedup;
mod errors;
mod helpers;
mod http_executor;
mod items;
mod outcomes;
mod persistence;
mod process;
mod supervision;
