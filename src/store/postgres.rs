//! The PostgreSQL store: a pool of connections, each write one transaction of
//! its own. PostgreSQL orders concurrent writers itself (row locks, the
//! unique index), so unlike SQLite there is no single writer to group
//! commits; every transition is still a compare-and-set in SQL
//! (`… WHERE status = 'expected'`, zero rows means refused), the same
//! statements as `sqlite.rs`.

use std::str::FromStr;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde_json::Value;
use sqlx::PgConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use tokio_util::task::TaskTracker;

use super::rows::{
    ITEM_COLUMNS, RUN_COLUMNS, TOKEN_COLUMNS, corrupt, count, item_from_row, renewed_from_row,
    run_from_row, token_from_row,
};
use super::{
    ClaimScope, Created, ItemOutcome, NewRun, NewToken, Renewed, RunQuery, StoreError, StoredToken,
};
use crate::config::DatabaseConfig;
use crate::domain::{
    ItemError, ItemId, ItemRecord, ItemStatus, RunId, RunRecord, RunStatus, RunType, SafeError,
    TenantId, Timestamp, TokenRecord, TokenScope,
};

/// Connections per process: the runtime's writes are short transactions,
/// so a few connections serve many runs, and several nodes stay well under
/// the server's `max_connections` (100 by default).
const MAX_CONNECTIONS: u32 = 10;
/// How long a store call waits for a free connection before it reports the
/// store unavailable (the same bound as SQLite's read pool).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a session may sit idle inside a transaction before the server
/// ends it, in milliseconds.
const IDLE_IN_TRANSACTION_TIMEOUT_MS: u64 = 5_000;
/// A transaction PostgreSQL aborted to break a deadlock or a serialization
/// conflict did nothing; it is tried this many times in all before the
/// caller hears "unavailable".
const MAX_TRANSACTION_TRIES: u32 = 3;
/// A create that lost the insert to a run which then ended before it could
/// be read tries the insert again, this many times in all.
const MAX_CREATE_TRIES: u32 = 3;

#[derive(Clone)]
pub(super) struct PostgresStore {
    /// Every read and every write transaction takes a connection from here.
    pool: PgPool,
    /// The tasks that run the store's calls, one each. A call thus ends
    /// (committed or rolled back) even when its caller is dropped, as a
    /// write queued to the SQLite writer does, and `close` can wait for
    /// every call: a pooled connection still held when an actor system is
    /// torn down would be dropped outside any runtime, where sqlx panics.
    calls: TaskTracker,
}

impl PostgresStore {
    pub(super) async fn open(config: &DatabaseConfig) -> Result<Self, StoreError> {
        // The name shows in `pg_stat_activity`, so an operator can tell
        // runpilot's connections from others.
        let options = PgConnectOptions::from_str(&config.url)?
            .application_name("runpilot")
            // A node paused inside a transaction (SIGSTOP, a long GC-free
            // stall, a cut network) would hold its row locks and keep every
            // other node from taking its runs; the server ends such a
            // session instead. runpilot's transactions take milliseconds.
            .options([(
                "idle_in_transaction_session_timeout",
                IDLE_IN_TRANSACTION_TIMEOUT_MS.to_string(),
            )]);
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        // sqlx takes an advisory lock while it migrates, so nodes starting
        // together do not apply a migration twice.
        sqlx::migrate!("./migrations/postgres")
            .run(&pool)
            .await
            .map_err(StoreError::Migrate)?;
        Ok(Self {
            pool,
            calls: TaskTracker::new(),
        })
    }

    pub(super) async fn close(&self) {
        // From here on no call gets a connection; the calls under way keep
        // theirs, commit, and end.
        self.pool.close().await;
        self.calls.close();
        self.calls.wait().await;
    }

    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        let pool = self.pool.clone();
        self.call(async move {
            sqlx::query("SELECT 1").execute(&pool).await?;
            Ok(())
        })
        .await
    }

    /// Runs one store call on a task of its own (see `calls`).
    async fn call<T, W>(&self, work: W) -> Result<T, StoreError>
    where
        W: Future<Output = Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
    {
        match self.calls.spawn(work).await {
            Ok(result) => result,
            // A bug in the store panics in the caller, as it would have
            // without the task.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(StoreError::Unavailable(
                "the store call was cancelled: the runtime is shutting down".into(),
            )),
        }
    }

    /// Runs `op` in a transaction of its own (see `transaction`).
    async fn write<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        F: for<'c> Fn(&'c mut PgConnection) -> BoxFuture<'c, Result<T, StoreError>>
            + Send
            + 'static,
        T: Send + 'static,
    {
        self.call(transaction(self.pool.clone(), op)).await
    }

    pub(super) async fn create_run(&self, run: NewRun) -> Result<Created, StoreError> {
        self.write(move |conn| create_run(conn, run.clone()).boxed())
            .await
    }

    pub(super) async fn mark_running(
        &self,
        id: RunId,
        epoch: u64,
        at: Timestamp,
    ) -> Result<Option<RunRecord>, StoreError> {
        self.write(move |conn| {
            async move {
                check_fence(&mut *conn, id, epoch).await?;
                mark_running(&mut *conn, id, at).await
            }
            .boxed()
        })
        .await
    }

    pub(super) async fn record_plan(
        &self,
        id: RunId,
        epoch: u64,
        items: Vec<ItemId>,
        at: Timestamp,
    ) -> Result<Option<RunRecord>, StoreError> {
        self.write(move |conn| {
            let items = items.clone();
            async move {
                check_fence(&mut *conn, id, epoch).await?;
                record_plan(&mut *conn, id, items, at).await
            }
            .boxed()
        })
        .await
    }

    pub(super) async fn start_items(
        &self,
        id: RunId,
        epoch: u64,
        items: Vec<(ItemId, u32)>,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            let items = items.clone();
            async move {
                check_fence(&mut *conn, id, epoch).await?;
                start_items(&mut *conn, id, items, at).await
            }
            .boxed()
        })
        .await
    }

    pub(super) async fn retry_item(
        &self,
        id: RunId,
        epoch: u64,
        item: ItemId,
        error: ItemError,
        throttled: bool,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            let (item, error) = (item.clone(), error.clone());
            async move {
                check_fence(&mut *conn, id, epoch).await?;
                retry_item(&mut *conn, id, item, error, throttled, at).await
            }
            .boxed()
        })
        .await
    }

    pub(super) async fn finish_item(
        &self,
        id: RunId,
        epoch: u64,
        item: ItemId,
        outcome: ItemOutcome,
        at: Timestamp,
    ) -> Result<Option<RunRecord>, StoreError> {
        self.write(move |conn| {
            let (item, outcome) = (item.clone(), outcome.clone());
            async move {
                check_fence(&mut *conn, id, epoch).await?;
                finish_item(&mut *conn, id, item, outcome, at).await
            }
            .boxed()
        })
        .await
    }

    pub(super) async fn finish_run(
        &self,
        id: RunId,
        epoch: u64,
        status: RunStatus,
        safe_error: Option<SafeError>,
        cancel_rest: bool,
        at: Timestamp,
    ) -> Result<Option<RunRecord>, StoreError> {
        self.write(move |conn| {
            let safe_error = safe_error.clone();
            async move {
                check_fence(&mut *conn, id, epoch).await?;
                finish_run(&mut *conn, id, status, safe_error, cancel_rest, at).await
            }
            .boxed()
        })
        .await
    }

    pub(super) async fn list_runs(
        &self,
        tenant: &TenantId,
        query: RunQuery,
    ) -> Result<Vec<RunRecord>, StoreError> {
        let (pool, tenant) = (self.pool.clone(), tenant.clone());
        self.call(async move {
            let rows = sqlx::query(&format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE tenant = $1 \
                 AND ($2::TEXT IS NULL OR run_type = $2) AND ($3::TEXT IS NULL OR status = $3) \
                 AND ($4::TEXT IS NULL OR id < $4) ORDER BY id DESC LIMIT $5"
            ))
            .bind(tenant.as_str())
            .bind(query.run_type.map(RunType::as_str))
            .bind(query.status.map(RunStatus::as_str))
            .bind(query.before.map(|id| id.to_string()))
            .bind(i64::from(query.limit))
            .fetch_all(&pool)
            .await?;
            rows.iter().map(run_from_row).collect()
        })
        .await
    }

    pub(super) async fn get_run(
        &self,
        tenant: &TenantId,
        run_type: RunType,
        id: RunId,
    ) -> Result<Option<RunRecord>, StoreError> {
        let (pool, tenant) = (self.pool.clone(), tenant.clone());
        self.call(async move {
            let row = sqlx::query(&format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE id = $1 AND tenant = $2 AND run_type = $3"
            ))
            .bind(id.to_string())
            .bind(tenant.as_str())
            .bind(run_type.as_str())
            .fetch_optional(&pool)
            .await?;
            row.as_ref().map(run_from_row).transpose()
        })
        .await
    }

    pub(super) async fn claim_runs(
        &self,
        node: &str,
        scope: ClaimScope,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<Vec<RunRecord>, StoreError> {
        let node = node.to_owned();
        self.write(move |conn| {
            let node = node.clone();
            async move {
                // Row locks make each run go to one claimer: rows another
                // transaction holds (a concurrent claimer, or a stalled
                // holder) are skipped, not waited for; the next heartbeat
                // takes them once they are free (the server ends a stalled
                // session after IDLE_IN_TRANSACTION_TIMEOUT_MS).
                let rows = sqlx::query(&format!(
                    "UPDATE runs SET owner_node = $1, epoch = epoch + 1, lease_expires_at = $3 \
                     WHERE id IN (SELECT id FROM runs \
                       WHERE status IN ('queued', 'running') AND ($4 \
                         OR lease_expires_at IS NULL OR lease_expires_at < $2 \
                         OR ($5 AND owner_node = $1)) \
                       FOR UPDATE SKIP LOCKED) \
                     AND status IN ('queued', 'running') \
                     RETURNING {RUN_COLUMNS}"
                ))
                .bind(&node)
                .bind(now.as_millis())
                .bind(expires_at.as_millis())
                .bind(scope == ClaimScope::All)
                .bind(scope == ClaimScope::ExpiredOrOwn)
                .fetch_all(&mut *conn)
                .await?;
                rows.iter().map(run_from_row).collect()
            }
            .boxed()
        })
        .await
    }

    pub(super) async fn renew_leases(
        &self,
        node: &str,
        expires_at: Timestamp,
    ) -> Result<Vec<Renewed>, StoreError> {
        let node = node.to_owned();
        self.write(move |conn| {
            let node = node.clone();
            async move {
                let rows = sqlx::query(
                    "UPDATE runs SET lease_expires_at = $2 \
                     WHERE owner_node = $1 AND status IN ('queued', 'running') \
                     RETURNING tenant, id, cancel_requested",
                )
                .bind(&node)
                .bind(expires_at.as_millis())
                .fetch_all(&mut *conn)
                .await?;
                rows.iter().map(renewed_from_row).collect()
            }
            .boxed()
        })
        .await
    }

    pub(super) async fn release_leases(&self, node: &str) -> Result<(), StoreError> {
        let node = node.to_owned();
        self.write(move |conn| {
            let node = node.clone();
            async move {
                sqlx::query(
                    "UPDATE runs SET lease_expires_at = 0 \
                     WHERE owner_node = $1 AND status IN ('queued', 'running')",
                )
                .bind(&node)
                .execute(&mut *conn)
                .await?;
                Ok(())
            }
            .boxed()
        })
        .await
    }

    pub(super) async fn request_cancel(
        &self,
        id: RunId,
        at: Timestamp,
    ) -> Result<Option<RunRecord>, StoreError> {
        self.write(move |conn| {
            async move {
                let row = sqlx::query(&format!(
                    "UPDATE runs SET cancel_requested = TRUE, updated_at = $2 \
                     WHERE id = $1 AND status IN ('queued', 'running') RETURNING {RUN_COLUMNS}"
                ))
                .bind(id.to_string())
                .bind(at.as_millis())
                .fetch_optional(&mut *conn)
                .await?;
                row.as_ref().map(run_from_row).transpose()
            }
            .boxed()
        })
        .await
    }

    pub(super) async fn item_page(
        &self,
        id: RunId,
        status: Option<ItemStatus>,
        after: Option<u64>,
        limit: u32,
    ) -> Result<Vec<(u64, ItemRecord)>, StoreError> {
        let pool = self.pool.clone();
        self.call(async move {
            let after = after.map_or(-1, |p| i64::try_from(p).unwrap_or(i64::MAX));
            let rows = sqlx::query(&format!(
                "SELECT position, {ITEM_COLUMNS} FROM run_items \
                 WHERE run_id = $1 AND position > $2 AND ($3::TEXT IS NULL OR status = $3) \
                 ORDER BY position LIMIT $4"
            ))
            .bind(id.to_string())
            .bind(after)
            .bind(status.map(ItemStatus::as_str))
            .bind(i64::from(limit))
            .fetch_all(&pool)
            .await?;
            rows.iter()
                .map(|row| Ok((count(row, "position")?, item_from_row(row)?)))
                .collect()
        })
        .await
    }

    pub(super) async fn create_token(&self, token: NewToken) -> Result<TokenRecord, StoreError> {
        self.write(move |conn| {
            let token = token.clone();
            async move {
                let (all, tenants): (bool, Vec<String>) = match &token.scope {
                    TokenScope::AllTenants => (true, Vec::new()),
                    TokenScope::Tenants(t) => {
                        (false, t.iter().map(|t| t.as_str().to_owned()).collect())
                    }
                };
                let row = sqlx::query(&format!(
                    "INSERT INTO api_tokens (id, token_hash, label, all_tenants, tenants, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6) RETURNING {TOKEN_COLUMNS}"
                ))
                .bind(&token.id)
                .bind(&token.hash)
                .bind(token.label.as_deref())
                .bind(all)
                .bind(serde_json::to_string(&tenants).map_err(|e| corrupt("tenants", e))?)
                .bind(token.created_at.as_millis())
                .fetch_one(&mut *conn)
                .await?;
                token_from_row(&row)
            }
            .boxed()
        })
        .await
    }

    pub(super) async fn revoke_token(
        &self,
        id: &str,
        at: Timestamp,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let id = id.to_owned();
        self.write(move |conn| {
            let id = id.clone();
            async move {
                let row = sqlx::query(&format!(
                    "UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1 \
                     RETURNING {TOKEN_COLUMNS}"
                ))
                .bind(&id)
                .bind(at.as_millis())
                .fetch_optional(&mut *conn)
                .await?;
                row.as_ref().map(token_from_row).transpose()
            }
            .boxed()
        })
        .await
    }

    pub(super) async fn touch_token(&self, id: &str, at: Timestamp) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.write(move |conn| {
            let id = id.clone();
            async move {
                sqlx::query("UPDATE api_tokens SET last_used_at = $2 WHERE id = $1")
                    .bind(&id)
                    .bind(at.as_millis())
                    .execute(&mut *conn)
                    .await?;
                Ok(())
            }
            .boxed()
        })
        .await
    }

    pub(super) async fn token_by_hash(
        &self,
        hash: &str,
    ) -> Result<Option<StoredToken>, StoreError> {
        let (pool, hash) = (self.pool.clone(), hash.to_owned());
        self.call(async move {
            let row = sqlx::query(&format!(
                "SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE token_hash = $1"
            ))
            .bind(&hash)
            .fetch_optional(&pool)
            .await?;
            row.map(|row| {
                Ok(StoredToken {
                    record: token_from_row(&row)?,
                    hash: sqlx::Row::try_get(&row, "token_hash")?,
                })
            })
            .transpose()
        })
        .await
    }

    pub(super) async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let pool = self.pool.clone();
        self.call(async move {
            let rows = sqlx::query(&format!(
                "SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY created_at, id"
            ))
            .fetch_all(&pool)
            .await?;
            rows.iter().map(token_from_row).collect()
        })
        .await
    }

    pub(super) async fn count_tokens(&self) -> Result<u64, StoreError> {
        let pool = self.pool.clone();
        self.call(async move {
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_tokens")
                .fetch_one(&pool)
                .await?;
            u64::try_from(n).map_err(|e| corrupt("count", e))
        })
        .await
    }

    pub(super) async fn items(&self, id: RunId) -> Result<Vec<ItemRecord>, StoreError> {
        let pool = self.pool.clone();
        self.call(async move {
            let rows = sqlx::query(&format!(
                "SELECT {ITEM_COLUMNS} FROM run_items WHERE run_id = $1 ORDER BY position"
            ))
            .bind(id.to_string())
            .fetch_all(&pool)
            .await?;
            rows.iter().map(item_from_row).collect()
        })
        .await
    }
}

/// Refuses a write of a run's state unless the stored epoch is the
/// writer's. The row lock holds off a takeover until this transaction ends,
/// so the check stays true until the commit; taking it first (not a shared
/// lock upgraded later) keeps concurrent writes of one run from deadlocking.
async fn check_fence(conn: &mut PgConnection, id: RunId, epoch: u64) -> Result<(), StoreError> {
    let stored: Option<i64> =
        sqlx::query_scalar("SELECT epoch FROM runs WHERE id = $1 FOR NO KEY UPDATE")
            .bind(id.to_string())
            .fetch_optional(&mut *conn)
            .await?;
    match stored {
        Some(stored) if u64::try_from(stored).ok() == Some(epoch) => Ok(()),
        Some(_) | None => Err(StoreError::Fenced),
    }
}

/// Runs `op` in a transaction and commits it; nothing is returned before
/// the commit. A transaction PostgreSQL aborted as a deadlock victim or for a
/// serialization conflict did nothing and is run again.
async fn transaction<T, F>(pool: PgPool, op: F) -> Result<T, StoreError>
where
    F: for<'c> Fn(&'c mut PgConnection) -> BoxFuture<'c, Result<T, StoreError>>,
{
    let mut tries = 0;
    loop {
        tries += 1;
        let mut tx = pool.begin().await?;
        let result = match op(&mut tx).await {
            Ok(value) => tx.commit().await.map(|()| value).map_err(StoreError::from),
            Err(e) => {
                // The error is what the caller needs; a failed rollback
                // adds nothing (the server drops the transaction anyway).
                let _ = tx.rollback().await;
                Err(e)
            }
        };
        match result {
            Err(StoreError::Database(e)) if is_conflict(&e) => {
                if tries >= MAX_TRANSACTION_TRIES {
                    return Err(StoreError::Unavailable(e.to_string()));
                }
                tracing::debug!(error = %e, tries, "a store transaction was aborted; trying again");
            }
            other => return other,
        }
    }
}

/// A deadlock victim (40P01) or a serialization failure (40001): the
/// transaction was rolled back whole and may simply run again.
fn is_conflict(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => matches!(db.code().as_deref(), Some("40001" | "40P01")),
        _ => false,
    }
}

async fn create_run(conn: &mut PgConnection, run: NewRun) -> Result<Created, StoreError> {
    let planned = run.item_ids.is_some();
    let total = run.item_ids.as_ref().map_or(0, Vec::len) as i64;
    for _ in 0..MAX_CREATE_TRIES {
        // A concurrent insert of the same key waits here for the other
        // transaction: its commit makes this one do nothing, its rollback
        // lets this one insert.
        let inserted = sqlx::query(&format!(
            "INSERT INTO runs (id, tenant, run_type, target_object_id, payload_hash, dedup_key, \
             status, planned, total, created_at, updated_at, owner_node, lease_expires_at, epoch) \
             VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7, $8, $9, $9, $10, $11, 1) \
             ON CONFLICT (tenant, run_type, dedup_key) WHERE status IN ('queued', 'running') \
             DO NOTHING RETURNING {RUN_COLUMNS}"
        ))
        .bind(run.id.to_string())
        .bind(run.tenant.as_str())
        .bind(run.key.run_type.as_str())
        .bind(run.key.target_object_id.as_deref())
        .bind(run.key.payload_hash.as_deref())
        .bind(run.key.storage_key())
        .bind(planned)
        .bind(total)
        .bind(run.created_at.as_millis())
        .bind(&run.owner)
        .bind(run.lease_expires_at.as_millis())
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(row) = inserted {
            if let Some(items) = &run.item_ids {
                insert_items(conn, run.id, items).await?;
            }
            return Ok(Created::New(run_from_row(&row)?));
        }
        // Read committed: this statement sees the holder's commit. Unlike
        // SQLite's single writer, another connection may have ended the
        // holder since the insert; then there is no row and the key is free.
        let holder = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE tenant = $1 AND run_type = $2 \
             AND dedup_key = $3 AND status IN ('queued', 'running')"
        ))
        .bind(run.tenant.as_str())
        .bind(run.key.run_type.as_str())
        .bind(run.key.storage_key())
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(row) = holder {
            return Ok(Created::Existing(run_from_row(&row)?));
        }
    }
    Err(StoreError::Unavailable(format!(
        "the dedup key of run {} kept changing hands; try again",
        run.id
    )))
}

async fn mark_running(
    conn: &mut PgConnection,
    id: RunId,
    at: Timestamp,
) -> Result<Option<RunRecord>, StoreError> {
    let row = sqlx::query(&format!(
        "UPDATE runs SET status = 'running', started_at = $2, updated_at = $2 \
         WHERE id = $1 AND status = 'queued' RETURNING {RUN_COLUMNS}"
    ))
    .bind(id.to_string())
    .bind(at.as_millis())
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(run_from_row).transpose()
}

async fn record_plan(
    conn: &mut PgConnection,
    id: RunId,
    items: Vec<ItemId>,
    at: Timestamp,
) -> Result<Option<RunRecord>, StoreError> {
    let run = sqlx::query(&format!(
        "UPDATE runs SET planned = TRUE, total = $2, updated_at = $3 \
         WHERE id = $1 AND NOT planned AND status IN ('queued', 'running') \
         RETURNING {RUN_COLUMNS}"
    ))
    .bind(id.to_string())
    .bind(items.len() as i64)
    .bind(at.as_millis())
    .fetch_optional(&mut *conn)
    .await?;
    if run.is_some() {
        insert_items(conn, id, &items).await?;
    }
    run.as_ref().map(run_from_row).transpose()
}

async fn start_items(
    conn: &mut PgConnection,
    id: RunId,
    items: Vec<(ItemId, u32)>,
    at: Timestamp,
) -> Result<(), StoreError> {
    for (item, attempt) in items {
        sqlx::query(
            "UPDATE run_items SET status = 'running', attempts = $3, \
             started_at = COALESCE(started_at, $4) \
             WHERE run_id = $1 AND item_id = $2 AND status IN ('pending', 'running')",
        )
        .bind(id.to_string())
        .bind(item.as_str())
        .bind(i64::from(attempt))
        .bind(at.as_millis())
        .execute(&mut *conn)
        .await?;
    }
    touch(conn, id, at).await
}

async fn retry_item(
    conn: &mut PgConnection,
    id: RunId,
    item: ItemId,
    error: ItemError,
    throttled: bool,
    at: Timestamp,
) -> Result<(), StoreError> {
    let changed = sqlx::query(
        "UPDATE run_items SET status = 'pending', last_error_code = $3, \
         last_error_context = $4, throttled = throttled + $5 \
         WHERE run_id = $1 AND item_id = $2 AND status = 'running'",
    )
    .bind(id.to_string())
    .bind(item.as_str())
    .bind(&error.code)
    .bind(Value::Object(error.context).to_string())
    .bind(i64::from(throttled))
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if changed > 0 {
        let outcome = if throttled { "throttled" } else { "retried" };
        record_attempt(conn, id, &item, outcome, Some(&error.code), at).await?;
    }
    touch(conn, id, at).await
}

/// The history row of a finished attempt (the attempt number is the item's).
async fn record_attempt(
    conn: &mut PgConnection,
    id: RunId,
    item: &ItemId,
    outcome: &str,
    error_code: Option<&str>,
    at: Timestamp,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO run_item_attempts (run_id, item_id, attempt, outcome, error_code, finished_at) \
         SELECT run_id, item_id, attempts, $3, $4, $5 FROM run_items WHERE run_id = $1 AND item_id = $2 \
         ON CONFLICT (run_id, item_id, attempt) DO UPDATE SET outcome = EXCLUDED.outcome, \
         error_code = EXCLUDED.error_code, finished_at = EXCLUDED.finished_at",
    )
    .bind(id.to_string())
    .bind(item.as_str())
    .bind(outcome)
    .bind(error_code)
    .bind(at.as_millis())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn finish_item(
    conn: &mut PgConnection,
    id: RunId,
    item: ItemId,
    outcome: ItemOutcome,
    at: Timestamp,
) -> Result<Option<RunRecord>, StoreError> {
    let (status, column, error) = match outcome {
        ItemOutcome::Succeeded => (ItemStatus::Succeeded, "succeeded", None),
        ItemOutcome::Failed(e) => (ItemStatus::Failed, "failed", Some(e)),
    };
    let error_code = error.as_ref().map(|e| e.code.clone());
    let changed = sqlx::query(
        "UPDATE run_items SET status = $3, finished_at = $4, \
         last_error_code = COALESCE($5, last_error_code), \
         last_error_context = COALESCE($6, last_error_context) \
         WHERE run_id = $1 AND item_id = $2 AND status = 'running'",
    )
    .bind(id.to_string())
    .bind(item.as_str())
    .bind(status.as_str())
    .bind(at.as_millis())
    .bind(error_code.clone())
    .bind(error.map(|e| Value::Object(e.context).to_string()))
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if changed == 0 {
        return Ok(None);
    }
    record_attempt(conn, id, &item, status.as_str(), error_code.as_deref(), at).await?;
    let row = sqlx::query(&format!(
        "UPDATE runs SET {column} = {column} + 1, updated_at = $2 WHERE id = $1 \
         RETURNING {RUN_COLUMNS}"
    ))
    .bind(id.to_string())
    .bind(at.as_millis())
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(run_from_row).transpose()
}

async fn finish_run(
    conn: &mut PgConnection,
    id: RunId,
    status: RunStatus,
    safe_error: Option<SafeError>,
    cancel_rest: bool,
    at: Timestamp,
) -> Result<Option<RunRecord>, StoreError> {
    if cancel_rest {
        sqlx::query(
            "UPDATE run_items SET status = 'canceled', finished_at = $2 \
             WHERE run_id = $1 AND status IN ('pending', 'running')",
        )
        .bind(id.to_string())
        .bind(at.as_millis())
        .execute(&mut *conn)
        .await?;
    }
    let (code, context) = match safe_error {
        Some(e) => (
            Some(e.code.as_str()),
            Some(Value::Object(e.context).to_string()),
        ),
        None => (None, None),
    };
    let row = sqlx::query(&format!(
        "UPDATE runs SET status = $2, safe_error_code = $3, safe_error_context = $4, \
         finished_at = $5, updated_at = $5, \
         started_at = COALESCE(started_at, $5) \
         WHERE id = $1 AND status IN ('queued', 'running') RETURNING {RUN_COLUMNS}"
    ))
    .bind(id.to_string())
    .bind(status.as_str())
    .bind(code)
    .bind(context)
    .bind(at.as_millis())
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(run_from_row).transpose()
}

/// All the items in one statement: a plan may hold up to
/// `max_items_per_run` ids, and one round trip each would dominate.
async fn insert_items(
    conn: &mut PgConnection,
    id: RunId,
    items: &[ItemId],
) -> Result<(), StoreError> {
    let ids: Vec<&str> = items.iter().map(ItemId::as_str).collect();
    sqlx::query(
        "INSERT INTO run_items (run_id, position, item_id, status) \
         SELECT $1, given.ordinality - 1, given.item_id, 'pending' \
         FROM UNNEST($2::TEXT[]) WITH ORDINALITY AS given (item_id, ordinality)",
    )
    .bind(id.to_string())
    .bind(ids)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn touch(conn: &mut PgConnection, id: RunId, at: Timestamp) -> Result<(), StoreError> {
    sqlx::query("UPDATE runs SET updated_at = $2 WHERE id = $1")
        .bind(id.to_string())
        .bind(at.as_millis())
        .execute(&mut *conn)
        .await?;
    Ok(())
}
