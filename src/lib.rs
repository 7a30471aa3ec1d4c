//! runpilot starts, supervises, persists and reports long-running,
//! tenant-scoped admin operations ("runs") for multi-tenant admin products.
//!
//! The crate, from the bottom up (dependencies point one way):
//! - [`domain`]: ids, run types, statuses, the rules that decide an outcome.
//! - [`store`]: runs, items, attempts and tokens as rows, on SQLite (one
//!   writer task with group commit, many readers) or PostgreSQL (a pool);
//!   every write of a run's state fenced by its lease epoch.
//! - [`runtime`]: the actors. A `TenantRegistry` per tenant owns the dedup
//!   key → `RunActor` map; a `RunActor` per live run supervises its items'
//!   attempts and persists every transition before it reports it.
//!   `runtime::executor` does the items' work: the `ItemExecutor` trait, the
//!   simulated executor and the http executor (a worker of the product).
//!   Each registry keeps its tenant's throttle governor (`runtime::throttle`);
//!   a heartbeat renews this node's run leases and takes over expired ones
//!   (`runtime::lease`).
//! - [`access`]: tokens (the admin token and hashed stored tokens).
//! - [`http`]: the API (actix-web). Handlers only send messages through the
//!   runtime's [`runtime::Directory`]; they never touch the store.
//! - [`startup`]: builds the whole application; [`config`], [`cli`] and
//!   [`telemetry`] serve the binary.

pub mod access;
pub mod cli;
pub mod config;
pub mod domain;
pub mod http;
pub mod runtime;
pub mod startup;
pub mod store;
pub mod telemetry;
