//! The store: runs and items as rows, every transition committed before it
//! is reported. Two backends behind one API, chosen by the URL's scheme:
//! SQLite (`sqlite.rs`: one writer task that group-commits, reads from a
//! pool) and PostgreSQL (`postgres.rs`: a pool, one transaction per write).
//! Both decode rows the same way (`rows.rs`). No actix here: the runtime
//! calls these methods and awaits them.

mod postgres;
mod rows;
mod sqlite;

use crate::config::DatabaseConfig;
use crate::domain::{
    DedupKey, ItemError, ItemId, ItemRecord, ItemStatus, RunId, RunRecord, RunStatus, RunType,
    SafeError, TenantId, Timestamp, TokenRecord, TokenScope,
};

/// What went wrong in the store. `Unavailable` is worth retrying later;
/// callers answer it with 503.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    #[error("a stored value is not valid: {0}")]
    Corrupt(String),
    #[error("database error")]
    Database(#[source] sqlx::Error),
    #[error("this node no longer holds the run (its epoch moved on)")]
    Fenced,
    #[error("migration failed")]
    Migrate(#[source] sqlx::migrate::MigrateError),
}

impl StoreError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Tls(_) => StoreError::Unavailable(e.to_string()),
            sqlx::Error::Database(db) if means_unavailable(db.as_ref()) => {
                StoreError::Unavailable(e.to_string())
            }
            _ => StoreError::Database(e),
        }
    }
}

/// Database answers that say "not now" rather than "never": worth retrying.
fn means_unavailable(db: &dyn sqlx::error::DatabaseError) -> bool {
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        // SQLite's "busy"/"locked": another process holds the write lock
        // past the busy timeout.
        matches!(db.code().as_deref(), Some("5" | "6" | "517"))
    } else if db
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .is_some()
    {
        match db.code().as_deref() {
            // Class 08: the connection failed or was refused.
            // Class 53: insufficient resources (too many connections,
            // disk full, out of memory).
            Some(code) if code.starts_with("08") || code.starts_with("53") => true,
            // The server is shutting down, crashed, or still starting up.
            Some("57P01" | "57P02" | "57P03") => true,
            // A read-only transaction: the server is a standby, as during
            // a failover; the primary comes back under the same URL.
            Some("25006") => true,
            Some(_) | None => false,
        }
    } else {
        false
    }
}

/// A run to create: the start request as validated at the edge.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub id: RunId,
    pub tenant: TenantId,
    pub key: DedupKey,
    /// The items given at start; `None` means the executor plans them.
    pub item_ids: Option<Vec<ItemId>>,
    pub created_at: Timestamp,
    /// The node that creates the run owns it first (epoch 1) …
    pub owner: String,
    /// … until then, unless it renews.
    pub lease_expires_at: Timestamp,
}

/// Which of a tenant's runs to list.
#[derive(Debug, Clone, Copy)]
pub struct RunQuery {
    pub run_type: Option<RunType>,
    pub status: Option<RunStatus>,
    /// Runs created before this one (ids are UUID v7: they sort by time).
    pub before: Option<RunId>,
    pub limit: u32,
}

/// A run whose lease this node renewed, with what the heartbeat needs.
#[derive(Debug, Clone)]
pub struct Renewed {
    pub tenant: TenantId,
    pub id: RunId,
    /// A cancel was stored (perhaps through another node).
    pub cancel_requested: bool,
}

/// Which active runs a node takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimScope {
    /// Runs whose lease expired (another node died or stalled).
    Expired,
    /// Those, and runs already held under this node's id (a restart with
    /// the same `cluster.node_id`).
    ExpiredOrOwn,
    /// Every active run: the only process on an embedded (SQLite) store.
    All,
}

/// The answer to a create: a new run, or the active run that holds the key.
#[derive(Debug, Clone)]
pub enum Created {
    New(RunRecord),
    Existing(RunRecord),
}

/// How an item attempt ended, as it is written.
#[derive(Debug, Clone)]
pub enum ItemOutcome {
    Succeeded,
    Failed(ItemError),
}

/// A token to store: its hash only.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub id: String,
    /// Hex SHA-256 of the token.
    pub hash: String,
    pub label: Option<String>,
    pub scope: TokenScope,
    pub created_at: Timestamp,
}

/// A stored token with its hash, for the constant-time comparison.
#[derive(Debug, Clone)]
pub struct StoredToken {
    pub record: TokenRecord,
    pub hash: String,
}

/// The store's handle; cheap to clone.
#[derive(Clone)]
pub struct Store {
    /// Which database holds the runs; chosen once, by the URL's scheme.
    backend: Backend,
}

/// The two backends. Every `Store` method matches on this, so a third
/// backend breaks the build wherever it needs an answer.
#[derive(Clone)]
enum Backend {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PostgresStore),
}

/// Calls the same method with the same arguments on whichever backend the
/// store holds; the two backends keep identical signatures for this.
macro_rules! on_backend {
    ($store:expr, $method:ident($($arg:expr),*)) => {
        match &$store.backend {
            Backend::Sqlite(b) => b.$method($($arg),*).await,
            Backend::Postgres(b) => b.$method($($arg),*).await,
        }
    };
}

impl Store {
    /// Opens the database named by the URL (`sqlite:…`, `postgres://…` or
    /// `postgresql://…`), creating a SQLite file and its folder when
    /// missing, and runs the migrations. A PostgreSQL database must exist.
    pub async fn open(config: &DatabaseConfig) -> Result<Self, StoreError> {
        let url = config.url.as_str();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite(sqlite::SqliteStore::open(config).await?)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres(postgres::PostgresStore::open(config).await?)
        } else {
            // The configuration refuses other schemes; this guards library
            // users who build a `DatabaseConfig` themselves.
            return Err(StoreError::Unavailable(
                "the database URL must start with sqlite:, postgres:// or postgresql://".into(),
            ));
        };
        Ok(Self { backend })
    }

    /// The embedded store (SQLite): one process, which owns every run.
    pub fn is_embedded(&self) -> bool {
        match self.backend {
            Backend::Sqlite(_) => true,
            Backend::Postgres(_) => false,
        }
    }

    /// Finishes the writes under way and closes the connections.
    pub async fn close(&self) {
        on_backend!(self, close())
    }

    /// Whether the store answers a trivial query.
    pub async fn ping(&self) -> Result<(), StoreError> {
        on_backend!(self, ping())
    }

    /// Creates the run (status `queued`, with its items when they were
    /// given), or finds the active run that holds its dedup key.
    pub async fn create_run(&self, run: NewRun) -> Result<Created, StoreError> {
        on_backend!(self, create_run(run))
    }

    /// `queued` → `running`; `None` when the run was not queued.
    pub async fn mark_running(
        &self,
        id: RunId,
        epoch: u64,
        at: Timestamp,
    ) -> Result<Option<RunRecord>, StoreError> {
        on_backend!(self, mark_running(id, epoch, at))
    }

    /// Records the planned items and `counts.total`; `None` when the run
    /// was planned already.
    pub async fn record_plan(
        &self,
        id: RunId,
        epoch: u64,
        items: Vec<ItemId>,
        at: Timestamp,
    ) -> Result<Option<RunRecord>, StoreError> {
        on_backend!(self, record_plan(id, epoch, items, at))
    }

    /// Marks items `running` with the attempt number each starts.
    pub async fn start_items(
        &self,
        id: RunId,
        epoch: u64,
        items: Vec<(ItemId, u32)>,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        on_backend!(self, start_items(id, epoch, items, at))
    }

    /// A failed attempt that will be retried: the item waits as `pending`
    /// with its last error. `throttled`: the upstream throttled it (429),
    /// counted apart from failures.
    pub async fn retry_item(
        &self,
        id: RunId,
        epoch: u64,
        item: ItemId,
        error: ItemError,
        throttled: bool,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        on_backend!(self, retry_item(id, epoch, item, error, throttled, at))
    }

    /// A running item's final outcome, counted in the run in the same
    /// transaction; `None` when the item was not running (never counted twice).
    pub async fn finish_item(
        &self,
        id: RunId,
        epoch: u64,
        item: ItemId,
        outcome: ItemOutcome,
        at: Timestamp,
    ) -> Result<Option<RunRecord>, StoreError> {
        on_backend!(self, finish_item(id, epoch, item, outcome, at))
    }

    /// The run's terminal transition; items not finished become `canceled`
    /// when `cancel_rest`. `None` when the run had ended already.
    pub async fn finish_run(
        &self,
        id: RunId,
        epoch: u64,
        status: RunStatus,
        safe_error: Option<SafeError>,
        cancel_rest: bool,
        at: Timestamp,
    ) -> Result<Option<RunRecord>, StoreError> {
        on_backend!(
            self,
            finish_run(id, epoch, status, safe_error, cancel_rest, at)
        )
    }

    /// One run of one tenant and type.
    pub async fn get_run(
        &self,
        tenant: &TenantId,
        run_type: RunType,
        id: RunId,
    ) -> Result<Option<RunRecord>, StoreError> {
        on_backend!(self, get_run(tenant, run_type, id))
    }

    /// A tenant's runs, newest first: those older than `before`, of
    /// `run_type` and `status` when given, at most `limit`.
    pub async fn list_runs(
        &self,
        tenant: &TenantId,
        query: RunQuery,
    ) -> Result<Vec<RunRecord>, StoreError> {
        on_backend!(self, list_runs(tenant, query))
    }

    /// Takes the active runs in `scope` for `node`: each gets a new epoch
    /// (fencing out its previous holder) and a lease until `expires_at`.
    /// Oldest first.
    pub async fn claim_runs(
        &self,
        node: &str,
        scope: ClaimScope,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<Vec<RunRecord>, StoreError> {
        let mut runs = on_backend!(self, claim_runs(node, scope, now, expires_at))?;
        runs.sort_by_key(|r| (r.created_at, r.id));
        Ok(runs)
    }

    /// Extends the leases `node` holds on active runs.
    pub async fn renew_leases(
        &self,
        node: &str,
        expires_at: Timestamp,
    ) -> Result<Vec<Renewed>, StoreError> {
        on_backend!(self, renew_leases(node, expires_at))
    }

    /// Lets the leases of `node` lapse now (a graceful stop), so that
    /// another node takes its unfinished runs without waiting.
    pub async fn release_leases(&self, node: &str) -> Result<(), StoreError> {
        on_backend!(self, release_leases(node))
    }

    /// A run's items in their planned order.
    pub async fn items(&self, id: RunId) -> Result<Vec<ItemRecord>, StoreError> {
        on_backend!(self, items(id))
    }

    /// One page of a run's items in planned order: those after position
    /// `after`, with `status` when given, at most `limit`; each with its position.
    pub async fn item_page(
        &self,
        id: RunId,
        status: Option<ItemStatus>,
        after: Option<u64>,
        limit: u32,
    ) -> Result<Vec<(u64, ItemRecord)>, StoreError> {
        on_backend!(self, item_page(id, status, after, limit))
    }

    /// Records a cancel request on an active run; `None` when the run has
    /// ended (or does not exist).
    pub async fn request_cancel(
        &self,
        id: RunId,
        at: Timestamp,
    ) -> Result<Option<RunRecord>, StoreError> {
        on_backend!(self, request_cancel(id, at))
    }

    /// Stores a new token (its hash).
    pub async fn create_token(&self, token: NewToken) -> Result<TokenRecord, StoreError> {
        on_backend!(self, create_token(token))
    }

    /// The token with that hash, revoked or not.
    pub async fn token_by_hash(&self, hash: &str) -> Result<Option<StoredToken>, StoreError> {
        on_backend!(self, token_by_hash(hash))
    }

    /// Every stored token, oldest first.
    pub async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        on_backend!(self, list_tokens())
    }

    /// Revokes a token (again is a no-op); `None` when there is no such token.
    pub async fn revoke_token(
        &self,
        id: &str,
        at: Timestamp,
    ) -> Result<Option<TokenRecord>, StoreError> {
        on_backend!(self, revoke_token(id, at))
    }

    /// How many tokens were ever stored (revoked ones included).
    pub async fn count_tokens(&self) -> Result<u64, StoreError> {
        on_backend!(self, count_tokens())
    }

    /// Records that a token was used.
    pub async fn touch_token(&self, id: &str, at: Timestamp) -> Result<(), StoreError> {
        on_backend!(self, touch_token(id, at))
    }
}
