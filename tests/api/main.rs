//! The API, tested over HTTP against the application on a random port,
//! each test with its own database. Every test that stores runs has a
//! `::sqlite` and a `::postgres` variant (`helpers::on_both_backends!`); the
//! PostgreSQL ones run when `RUNPILOT_TEST_POSTGRES_URL` names a server.

mod access;
mod cancel;
mod cluster;
mod contract;
mod dedup;
mod errors;
mod helpers;
mod http_executor;
mod items;
mod outcomes;
mod persistence;
mod process;
mod runs_list;
mod store;
mod supervision;
