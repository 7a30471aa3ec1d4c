//! The store: runs and items as rows, every transition committed before it
//! is reported. Writes go through one writer (a task fed by a channel, see
//! `sqlite.rs`) so that group commit lives in one place; reads use a pool.
//! No actix here: the runtime calls these methods and awaits them.

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
            sqlx::Error::Database(db) if is_busy(db.as_ref()) => {
                StoreError::Unavailable(e.to_string())
            }
            _ => StoreError::Database(e),
        }
    }
}

/// SQLite's "busy"/"locked" answers: another process holds the write lock
/// past the busy timeout.
fn is_busy(db: &dyn sqlx::error::DatabaseError) -> bool {
    matches!(db.code().as_deref(), Some("5") | Some("6") | Some("517"))
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
    backend: sqlite::SqliteStore,
}

impl Store {
    /// Opens the database named by the URL, creating a SQLite file and its
    /// folder when missing, and runs the migrations.
    pub async fn open(config: &DatabaseConfig) -> Result<Self, StoreError> {
        if config.url.starts_with("sqlite:") {
            Ok(Self {
                backend: sqlite::SqliteStore::open(config).await?,
            })
        } else {
            Err(StoreError::Unavailable(
                "this build stores runs in SQLite only; PostgreSQL is not supported yet".into(),
            ))
        }
    }

    /// Finishes the writes under way and closes the connections.
    pub async fn close(&self) {
        self.backend.close().await
    }

    /// Whether the store answers a trivial query.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.backend.ping().await
    }

    /// Creates the run (status `queued`, with its items when they were
    /// given), or finds the active run that holds its dedup key.
    pub async fn create_run(&self, run: NewRun) -> Result<Created, StoreError> {
        self.backend.create_run(run).await
    }

    /// `queued` → `running`; `None` when the run was not queued.
    pub async fn mark_running(
        &self,
        id: RunId,
        at: Timestamp,
    ) -> Result<Option<RunRecord>, StoreError> {
        self.backend.mark_running(id, at).await
    }

    /// Records the planned items and `counts.total`; `None` when the run
    /// was planned already.
    pub async fn record_plan(
        &self,
        id: RunId,
        items: Vec<ItemId>,
        at: Timestamp,
    ) -> Result<Option<RunRecord>, StoreError> {
        self.backend.record_plan(id, items, at).await
    }

    /// Marks items `running` with the attempt number each starts.
    pub async fn start_items(
        &self,
        id: RunId,
        items: Vec<(ItemId, u32)>,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        self.backend.start_items(id, items, at).await
    }

    /// A failed attempt that will be retried: the item waits as `pending`
    /// with its last error. `throttled`: the upstream throttled it (429),
    /// counted apart from failures.
    pub async fn retry_item(
        &self,
        id: RunId,
        item: ItemId,
        error: ItemError,
        throttled: bool,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        self.backend
            .retry_item(id, item, error, throttled, at)
            .await
    }

    /// A running item's final outcome, counted in the run in the same
    /// transaction; `None` when the item was not running (never counted twice).
    pub async fn finish_item(
        &self,
        id: RunId,
        item: ItemId,
        outcome: ItemOutcome,
        at: Timestamp,
    ) -> Result<Option<RunRecord>, StoreError> {
        self.backend.finish_item(id, item, outcome, at).await
    }

    /// The run's terminal transition; items not finished become `canceled`
    /// when `cancel_rest`. `None` when the run had ended already.
    pub async fn finish_run(
        &self,
        id: RunId,
        status: RunStatus,
        safe_error: Option<SafeError>,
        cancel_rest: bool,
        at: Timestamp,
    ) -> Result<Option<RunRecord>, StoreError> {
        self.backend
            .finish_run(id, status, safe_error, cancel_rest, at)
            .await
    }

    /// One run of one tenant and type.
    pub async fn get_run(
        &self,
        tenant: &TenantId,
        run_type: RunType,
        id: RunId,
    ) -> Result<Option<RunRecord>, StoreError> {
        self.backend.get_run(tenant, run_type, id).await
    }

    /// Every run not yet terminal, oldest first (for recovery).
    pub async fn unfinished_runs(&self) -> Result<Vec<RunRecord>, StoreError> {
        self.backend.unfinished_runs().await
    }

    /// A run's items in their planned order.
    pub async fn items(&self, id: RunId) -> Result<Vec<ItemRecord>, StoreError> {
        self.backend.items(id).await
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
        self.backend.item_page(id, status, after, limit).await
    }

    /// Records a cancel request on an active run; `None` when the run has
    /// ended (or does not exist).
    pub async fn request_cancel(
        &self,
        id: RunId,
        at: Timestamp,
    ) -> Result<Option<RunRecord>, StoreError> {
        self.backend.request_cancel(id, at).await
    }

    /// Stores a new token (its hash).
    pub async fn create_token(&self, token: NewToken) -> Result<TokenRecord, StoreError> {
        self.backend.create_token(token).await
    }

    /// The token with that hash, revoked or not.
    pub async fn token_by_hash(&self, hash: &str) -> Result<Option<StoredToken>, StoreError> {
        self.backend.token_by_hash(hash).await
    }

    /// Every stored token, oldest first.
    pub async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.backend.list_tokens().await
    }

    /// Revokes a token (again is a no-op); `None` when there is no such token.
    pub async fn revoke_token(
        &self,
        id: &str,
        at: Timestamp,
    ) -> Result<Option<TokenRecord>, StoreError> {
        self.backend.revoke_token(id, at).await
    }

    /// How many tokens were ever stored (revoked ones included).
    pub async fn count_tokens(&self) -> Result<u64, StoreError> {
        self.backend.count_tokens().await
    }

    /// Records that a token was used.
    pub async fn touch_token(&self, id: &str, at: Timestamp) -> Result<(), StoreError> {
        self.backend.touch_token(id, at).await
    }
}
