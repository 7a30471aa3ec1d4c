//! The SQLite store: WAL, one write connection owned by a writer task that
//! groups the transitions waiting in its channel into one transaction (each
//! in a savepoint of its own), and a pool of read connections.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Connection, Row, SqliteConnection};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::rows::{
    ITEM_COLUMNS, RUN_COLUMNS, TOKEN_COLUMNS, corrupt, count, item_from_row, renewed_from_row,
    run_from_row, token_from_row,
};
use super::{
    ClaimScope, Created, ItemOutcome, NewRun, NewToken, Renewed, RunQuery, StoreError, StoredToken,
};
use crate::config::{self, DatabaseConfig, SqliteSynchronous as Sync};
use crate::domain::{
    ItemError, ItemId, ItemRecord, ItemStatus, RunId, RunRecord, RunStatus, RunType, SafeError,
    TenantId, Timestamp, TokenRecord, TokenScope,
};

/// The value of the expected `Written` variant; any other is a bug of this
/// file (the writer answers each kind of write with one kind of value).
macro_rules! written {
    ($written:expr, $variant:ident) => {
        match $written {
            Written::$variant(value) => Ok(value),
            _ => Err(mismatch()),
        }
    };
}

/// Writes waiting in the channel are committed together, up to this many.
const MAX_BATCH: usize = 256;
/// How long a connection waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub(super) struct SqliteStore {
    writes: mpsc::Sender<Job>,
    reads: SqlitePool,
    writer: Arc<Mutex<Option<JoinHandle<()>>>>,
    /// Asks the writer to finish what is queued and close its connection.
    closing: CancellationToken,
}

/// One write and where its answer goes once the transaction committed.
struct Job {
    op: WriteOp,
    /// The run and epoch the write is fenced by, for a run's state.
    fence: Option<(RunId, u64)>,
    reply: oneshot::Sender<Result<Written, StoreError>>,
}

enum WriteOp {
    CreateRun(NewRun),
    MarkRunning(RunId, Timestamp),
    RecordPlan(RunId, Vec<ItemId>, Timestamp),
    StartItems(RunId, Vec<(ItemId, u32)>, Timestamp),
    /// The bool: the attempt was throttled (429), not failed.
    RetryItem(RunId, ItemId, ItemError, bool, Timestamp),
    FinishItem(RunId, ItemId, ItemOutcome, Timestamp),
    FinishRun {
        id: RunId,
        status: RunStatus,
        safe_error: Option<SafeError>,
        cancel_rest: bool,
        at: Timestamp,
    },
    RequestCancel(RunId, Timestamp),
    ClaimRuns(String, ClaimScope, Timestamp, Timestamp),
    RenewLeases(String, Timestamp),
    ReleaseLeases(String),
    CreateToken(NewToken),
    RevokeToken(String, Timestamp),
    TouchToken(String, Timestamp),
}

enum Written {
    Created(Created),
    Run(Option<RunRecord>),
    Runs(Vec<RunRecord>),
    Renewed(Vec<Renewed>),
    Token(Option<TokenRecord>),
    Nothing,
}

impl SqliteStore {
    pub(super) async fn open(config: &DatabaseConfig) -> Result<Self, StoreError> {
        if let Some(file) = config::sqlite_file(&config.url)
            && let Some(dir) = file.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let options = SqliteConnectOptions::from_str(&config.url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match config.sqlite_synchronous {
                Sync::Full => SqliteSynchronous::Full,
                Sync::Normal => SqliteSynchronous::Normal,
            })
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let mut conn = SqliteConnection::connect_with(&options).await?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&mut conn)
            .await
            .map_err(StoreError::Migrate)?;
        let reads = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        let (writes, jobs) = mpsc::channel(4096);
        let closing = CancellationToken::new();
        let writer = tokio::spawn(write_loop(conn, jobs, closing.clone()));
        Ok(Self {
            writes,
            reads,
            writer: Arc::new(Mutex::new(Some(writer))),
            closing,
        })
    }

    pub(super) async fn close(&self) {
        self.closing.cancel();
        if let Some(handle) = self.writer.lock().await.take() {
            let _ = handle.await;
        }
        self.reads.close().await;
    }

    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reads).await?;
        Ok(())
    }

    async fn write(&self, op: WriteOp) -> Result<Written, StoreError> {
        self.write_fenced(op, None).await
    }

    async fn write_fenced(
        &self,
        op: WriteOp,
        fence: Option<(RunId, u64)>,
    ) -> Result<Written, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.writes
            .send(Job { op, fence, reply })
            .await
            .map_err(|_| StoreError::Unavailable("the store is closed".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the store writer stopped".into()))?
    }

    async fn write_run(
        &self,
        op: WriteOp,
        fence: (RunId, u64),
    ) -> Result<Option<RunRecord>, StoreError> {
        written!(self.write_fenced(op, Some(fence)).await?, Run)
    }

    pub(super) async fn create_run(&self, run: NewRun) -> Result<Created, StoreError> {
        written!(self.write(WriteOp::CreateRun(run)).await?, Created)
    }

    pub(super) async fn mark_running(
        &self,
        id: RunId,
        epoch: u64,
        at: Timestamp,
    ) -> Result<Option<RunRecord>, StoreError> {
        self.write_run(WriteOp::MarkRunning(id, at), (id, epoch))
            .await
    }

    pub(super) async fn record_plan(
        &self,
        id: RunId,
        epoch: u64,
        items: Vec<ItemId>,
        at: Timestamp,
    ) -> Result<Option<RunRecord>, StoreError> {
        self.write_run(WriteOp::RecordPlan(id, items, at), (id, epoch))
            .await
    }

    pub(super) async fn start_items(
        &self,
        id: RunId,
        epoch: u64,
        items: Vec<(ItemId, u32)>,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        self.write_fenced(WriteOp::StartItems(id, items, at), Some((id, epoch)))
            .await
            .map(drop)
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
        self.write_fenced(
            WriteOp::RetryItem(id, item, error, throttled, at),
            Some((id, epoch)),
        )
        .await
        .map(drop)
    }

    pub(super) async fn finish_item(
        &self,
        id: RunId,
        epoch: u64,
        item: ItemId,
        outcome: ItemOutcome,
        at: Timestamp,
    ) -> Result<Option<RunRecord>, StoreError> {
        self.write_run(WriteOp::FinishItem(id, item, outcome, at), (id, epoch))
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
        self.write_run(
            WriteOp::FinishRun {
                id,
                status,
                safe_error,
                cancel_rest,
                at,
            },
            (id, epoch),
        )
        .await
    }

    pub(super) async fn list_runs(
        &self,
        tenant: &TenantId,
        query: RunQuery,
    ) -> Result<Vec<RunRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE tenant = ?1 \
                 AND (?2 IS NULL OR run_type = ?2) AND (?3 IS NULL OR status = ?3) \
                 AND (?4 IS NULL OR id < ?4) ORDER BY id DESC LIMIT ?5"
        ))
        .bind(tenant.as_str())
        .bind(query.run_type.map(RunType::as_str))
        .bind(query.status.map(RunStatus::as_str))
        .bind(query.before.map(|id| id.to_string()))
        .bind(i64::from(query.limit))
        .fetch_all(&self.reads)
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    pub(super) async fn get_run(
        &self,
        tenant: &TenantId,
        run_type: RunType,
        id: RunId,
    ) -> Result<Option<RunRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE id = ? AND tenant = ? AND run_type = ?"
        ))
        .bind(id.to_string())
        .bind(tenant.as_str())
        .bind(run_type.as_str())
        .fetch_optional(&self.reads)
        .await?;
        row.as_ref().map(run_from_row).transpose()
    }

    pub(super) async fn claim_runs(
        &self,
        node: &str,
        scope: ClaimScope,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<Vec<RunRecord>, StoreError> {
        written!(
            self.write(WriteOp::ClaimRuns(node.to_owned(), scope, now, expires_at))
                .await?,
            Runs
        )
    }

    pub(super) async fn renew_leases(
        &self,
        node: &str,
        expires_at: Timestamp,
    ) -> Result<Vec<Renewed>, StoreError> {
        written!(
            self.write(WriteOp::RenewLeases(node.to_owned(), expires_at))
                .await?,
            Renewed
        )
    }

    pub(super) async fn release_leases(&self, node: &str) -> Result<(), StoreError> {
        self.write(WriteOp::ReleaseLeases(node.to_owned()))
            .await
            .map(drop)
    }

    async fn write_token(&self, op: WriteOp) -> Result<Option<TokenRecord>, StoreError> {
        written!(self.write(op).await?, Token)
    }

    pub(super) async fn create_token(&self, token: NewToken) -> Result<TokenRecord, StoreError> {
        self.write_token(WriteOp::CreateToken(token))
            .await?
            .ok_or_else(mismatch)
    }

    pub(super) async fn revoke_token(
        &self,
        id: &str,
        at: Timestamp,
    ) -> Result<Option<TokenRecord>, StoreError> {
        self.write_token(WriteOp::RevokeToken(id.to_owned(), at))
            .await
    }

    pub(super) async fn touch_token(&self, id: &str, at: Timestamp) -> Result<(), StoreError> {
        self.write(WriteOp::TouchToken(id.to_owned(), at))
            .await
            .map(drop)
    }

    pub(super) async fn token_by_hash(
        &self,
        hash: &str,
    ) -> Result<Option<StoredToken>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE token_hash = ?"
        ))
        .bind(hash)
        .fetch_optional(&self.reads)
        .await?;
        row.map(|row| {
            Ok(StoredToken {
                record: token_from_row(&row)?,
                hash: row.try_get("token_hash")?,
            })
        })
        .transpose()
    }

    pub(super) async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY created_at, id"
        ))
        .fetch_all(&self.reads)
        .await?;
        rows.iter().map(token_from_row).collect()
    }

    pub(super) async fn count_tokens(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_tokens")
            .fetch_one(&self.reads)
            .await?;
        u64::try_from(n).map_err(|e| corrupt("count", e))
    }

    pub(super) async fn request_cancel(
        &self,
        id: RunId,
        at: Timestamp,
    ) -> Result<Option<RunRecord>, StoreError> {
        written!(self.write(WriteOp::RequestCancel(id, at)).await?, Run)
    }

    pub(super) async fn item_page(
        &self,
        id: RunId,
        status: Option<ItemStatus>,
        after: Option<u64>,
        limit: u32,
    ) -> Result<Vec<(u64, ItemRecord)>, StoreError> {
        let after = after.map_or(-1, |p| i64::try_from(p).unwrap_or(i64::MAX));
        let rows = sqlx::query(&format!(
            "SELECT position, {ITEM_COLUMNS} FROM run_items \
                 WHERE run_id = ?1 AND position > ?2 AND (?3 IS NULL OR status = ?3) \
                 ORDER BY position LIMIT ?4"
        ))
        .bind(id.to_string())
        .bind(after)
        .bind(status.map(ItemStatus::as_str))
        .bind(i64::from(limit))
        .fetch_all(&self.reads)
        .await?;
        rows.iter()
            .map(|row| Ok((count(row, "position")?, item_from_row(row)?)))
            .collect()
    }

    pub(super) async fn items(&self, id: RunId) -> Result<Vec<ItemRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {ITEM_COLUMNS} FROM run_items WHERE run_id = ? ORDER BY position"
        ))
        .bind(id.to_string())
        .fetch_all(&self.reads)
        .await?;
        rows.iter().map(item_from_row).collect()
    }
}

fn mismatch() -> StoreError {
    StoreError::Corrupt("the writer answered a different kind of write".into())
}

/// The writer: takes every job waiting, applies each in a savepoint of one
/// transaction, commits once, then answers each job. Nothing is answered
/// before the commit.
async fn write_loop(
    mut conn: SqliteConnection,
    mut jobs: mpsc::Receiver<Job>,
    closing: CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let received = tokio::select! {
            n = jobs.recv_many(&mut batch, MAX_BATCH) => n,
            // Refuse new writes, then commit what is already queued.
            () = closing.cancelled(), if !jobs.is_closed() => {
                jobs.close();
                continue;
            }
        };
        if received == 0 {
            break;
        }
        let (ops, replies): (Vec<_>, Vec<_>) =
            batch.drain(..).map(|j| ((j.op, j.fence), j.reply)).unzip();
        let began = std::time::Instant::now();
        let applied = apply_batch(&mut conn, ops).await;
        metrics::histogram!("runpilot_store_write_seconds").record(began.elapsed().as_secs_f64());
        metrics::counter!("runpilot_store_commits_total").increment(1);
        metrics::counter!("runpilot_store_writes_total").increment(replies.len() as u64);
        match applied {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "a group of store writes failed; none was applied");
                for reply in replies {
                    let _ = reply.send(Err(StoreError::Unavailable(e.to_string())));
                }
            }
        }
    }
    let _ = conn.close().await;
}

async fn apply_batch(
    conn: &mut SqliteConnection,
    ops: Vec<(WriteOp, Option<(RunId, u64)>)>,
) -> Result<Vec<Result<Written, StoreError>>, StoreError> {
    let mut tx = conn.begin().await?;
    let mut results = Vec::with_capacity(ops.len());
    for (op, fence) in ops {
        let mut savepoint = tx.begin().await?;
        let applied = match fence {
            Some((id, epoch)) => match check_fence(&mut savepoint, id, epoch).await {
                Ok(()) => apply(&mut savepoint, op).await,
                Err(e) => Err(e),
            },
            None => apply(&mut savepoint, op).await,
        };
        match applied {
            Ok(written) => {
                savepoint.commit().await?;
                results.push(Ok(written));
            }
            Err(e) => {
                savepoint.rollback().await?;
                results.push(Err(e));
            }
        }
    }
    tx.commit().await?;
    Ok(results)
}

/// Refuses a write of a run's state unless the stored epoch is the writer's.
async fn check_fence(conn: &mut SqliteConnection, id: RunId, epoch: u64) -> Result<(), StoreError> {
    let stored: Option<i64> = sqlx::query_scalar("SELECT epoch FROM runs WHERE id = ?")
        .bind(id.to_string())
        .fetch_optional(&mut *conn)
        .await?;
    match stored {
        Some(stored) if u64::try_from(stored).ok() == Some(epoch) => Ok(()),
        Some(_) | None => Err(StoreError::Fenced),
    }
}

async fn apply(conn: &mut SqliteConnection, op: WriteOp) -> Result<Written, StoreError> {
    match op {
        WriteOp::ClaimRuns(node, scope, now, expires_at) => {
            let rows = sqlx::query(&format!(
                "UPDATE runs SET owner_node = ?1, epoch = epoch + 1, lease_expires_at = ?3 \
                 WHERE status IN ('queued', 'running') AND (?4 \
                   OR lease_expires_at IS NULL OR lease_expires_at < ?2 \
                   OR (?5 AND owner_node = ?1)) \
                 RETURNING {RUN_COLUMNS}"
            ))
            .bind(&node)
            .bind(now.as_millis())
            .bind(expires_at.as_millis())
            .bind(scope == ClaimScope::All)
            .bind(scope == ClaimScope::ExpiredOrOwn)
            .fetch_all(&mut *conn)
            .await?;
            rows.iter()
                .map(run_from_row)
                .collect::<Result<_, _>>()
                .map(Written::Runs)
        }
        WriteOp::RenewLeases(node, expires_at) => {
            let rows = sqlx::query(
                "UPDATE runs SET lease_expires_at = ?2 \
                 WHERE owner_node = ?1 AND status IN ('queued', 'running') \
                 RETURNING tenant, id, cancel_requested",
            )
            .bind(&node)
            .bind(expires_at.as_millis())
            .fetch_all(&mut *conn)
            .await?;
            rows.iter()
                .map(renewed_from_row)
                .collect::<Result<_, _>>()
                .map(Written::Renewed)
        }
        WriteOp::ReleaseLeases(node) => {
            sqlx::query(
                "UPDATE runs SET lease_expires_at = 0 \
                 WHERE owner_node = ?1 AND status IN ('queued', 'running')",
            )
            .bind(&node)
            .execute(&mut *conn)
            .await?;
            Ok(Written::Nothing)
        }
        WriteOp::CreateRun(run) => create_run(conn, run).await.map(Written::Created),
        WriteOp::MarkRunning(id, at) => {
            let row = sqlx::query(&format!(
                "UPDATE runs SET status = 'running', started_at = ?2, updated_at = ?2 \
                 WHERE id = ?1 AND status = 'queued' RETURNING {RUN_COLUMNS}"
            ))
            .bind(id.to_string())
            .bind(at.as_millis())
            .fetch_optional(&mut *conn)
            .await?;
            row.as_ref().map(run_from_row).transpose().map(Written::Run)
        }
        WriteOp::RecordPlan(id, items, at) => {
            let run = sqlx::query(&format!(
                "UPDATE runs SET planned = 1, total = ?2, updated_at = ?3 \
                 WHERE id = ?1 AND planned = 0 AND status IN ('queued', 'running') \
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
            run.as_ref().map(run_from_row).transpose().map(Written::Run)
        }
        WriteOp::StartItems(id, items, at) => {
            for (item, attempt) in items {
                sqlx::query(
                    "UPDATE run_items SET status = 'running', attempts = ?3, \
                     started_at = COALESCE(started_at, ?4) \
                     WHERE run_id = ?1 AND item_id = ?2 AND status IN ('pending', 'running')",
                )
                .bind(id.to_string())
                .bind(item.as_str())
                .bind(i64::from(attempt))
                .bind(at.as_millis())
                .execute(&mut *conn)
                .await?;
            }
            touch(conn, id, at).await?;
            Ok(Written::Nothing)
        }
        WriteOp::RetryItem(id, item, error, throttled, at) => {
            let changed = sqlx::query(
                "UPDATE run_items SET status = 'pending', last_error_code = ?3, \
                 last_error_context = ?4, throttled = throttled + ?5 \
                 WHERE run_id = ?1 AND item_id = ?2 AND status = 'running'",
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
            touch(conn, id, at).await?;
            Ok(Written::Nothing)
        }
        WriteOp::FinishItem(id, item, outcome, at) => {
            let (status, column, error) = match outcome {
                ItemOutcome::Succeeded => (ItemStatus::Succeeded, "succeeded", None),
                ItemOutcome::Failed(e) => (ItemStatus::Failed, "failed", Some(e)),
            };
            let error_code = error.as_ref().map(|e| e.code.clone());
            let changed = sqlx::query(
                "UPDATE run_items SET status = ?3, finished_at = ?4, \
                 last_error_code = COALESCE(?5, last_error_code), \
                 last_error_context = COALESCE(?6, last_error_context) \
                 WHERE run_id = ?1 AND item_id = ?2 AND status = 'running'",
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
                return Ok(Written::Run(None));
            }
            record_attempt(conn, id, &item, status.as_str(), error_code.as_deref(), at).await?;
            let row = sqlx::query(&format!(
                "UPDATE runs SET {column} = {column} + 1, updated_at = ?2 WHERE id = ?1 \
                 RETURNING {RUN_COLUMNS}"
            ))
            .bind(id.to_string())
            .bind(at.as_millis())
            .fetch_optional(&mut *conn)
            .await?;
            row.as_ref().map(run_from_row).transpose().map(Written::Run)
        }
        WriteOp::FinishRun {
            id,
            status,
            safe_error,
            cancel_rest,
            at,
        } => {
            if cancel_rest {
                sqlx::query(
                    "UPDATE run_items SET status = 'canceled', finished_at = ?2 \
                     WHERE run_id = ?1 AND status IN ('pending', 'running')",
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
                "UPDATE runs SET status = ?2, safe_error_code = ?3, safe_error_context = ?4, \
                 finished_at = ?5, updated_at = ?5, \
                 started_at = COALESCE(started_at, ?5) \
                 WHERE id = ?1 AND status IN ('queued', 'running') RETURNING {RUN_COLUMNS}"
            ))
            .bind(id.to_string())
            .bind(status.as_str())
            .bind(code)
            .bind(context)
            .bind(at.as_millis())
            .fetch_optional(&mut *conn)
            .await?;
            row.as_ref().map(run_from_row).transpose().map(Written::Run)
        }
        WriteOp::RequestCancel(id, at) => {
            let row = sqlx::query(&format!(
                "UPDATE runs SET cancel_requested = 1, updated_at = ?2 \
                 WHERE id = ?1 AND status IN ('queued', 'running') RETURNING {RUN_COLUMNS}"
            ))
            .bind(id.to_string())
            .bind(at.as_millis())
            .fetch_optional(&mut *conn)
            .await?;
            row.as_ref().map(run_from_row).transpose().map(Written::Run)
        }
        WriteOp::CreateToken(token) => {
            let (all, tenants) = match &token.scope {
                TokenScope::AllTenants => (true, Vec::new()),
                TokenScope::Tenants(t) => {
                    (false, t.iter().map(|t| t.as_str().to_owned()).collect())
                }
            };
            let row = sqlx::query(&format!(
                "INSERT INTO api_tokens (id, token_hash, label, all_tenants, tenants, created_at) \
                 VALUES (?, ?, ?, ?, ?, ?) RETURNING {TOKEN_COLUMNS}"
            ))
            .bind(&token.id)
            .bind(&token.hash)
            .bind(token.label.as_deref())
            .bind(all)
            .bind(serde_json::to_string(&tenants).map_err(|e| corrupt("tenants", e))?)
            .bind(token.created_at.as_millis())
            .fetch_one(&mut *conn)
            .await?;
            token_from_row(&row).map(|t| Written::Token(Some(t)))
        }
        WriteOp::RevokeToken(id, at) => {
            let row = sqlx::query(&format!(
                "UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1 \
                 RETURNING {TOKEN_COLUMNS}"
            ))
            .bind(&id)
            .bind(at.as_millis())
            .fetch_optional(&mut *conn)
            .await?;
            row.as_ref()
                .map(token_from_row)
                .transpose()
                .map(Written::Token)
        }
        WriteOp::TouchToken(id, at) => {
            sqlx::query("UPDATE api_tokens SET last_used_at = ?2 WHERE id = ?1")
                .bind(&id)
                .bind(at.as_millis())
                .execute(&mut *conn)
                .await?;
            Ok(Written::Nothing)
        }
    }
}

async fn create_run(conn: &mut SqliteConnection, run: NewRun) -> Result<Created, StoreError> {
    let planned = run.item_ids.is_some();
    let total = run.item_ids.as_ref().map_or(0, Vec::len) as i64;
    let inserted = sqlx::query(&format!(
        "INSERT INTO runs (id, tenant, run_type, target_object_id, payload_hash, dedup_key, \
         status, planned, total, created_at, updated_at, owner_node, lease_expires_at, epoch) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'queued', ?7, ?8, ?9, ?9, ?10, ?11, 1) \
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
    match inserted {
        Some(row) => {
            if let Some(items) = &run.item_ids {
                insert_items(conn, run.id, items).await?;
            }
            Ok(Created::New(run_from_row(&row)?))
        }
        None => {
            // The writer is the only one to change runs on this database,
            // and it runs one job at a time: the holder is still active.
            let row = sqlx::query(&format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE tenant = ? AND run_type = ? \
                 AND dedup_key = ? AND status IN ('queued', 'running')"
            ))
            .bind(run.tenant.as_str())
            .bind(run.key.run_type.as_str())
            .bind(run.key.storage_key())
            .fetch_one(&mut *conn)
            .await?;
            Ok(Created::Existing(run_from_row(&row)?))
        }
    }
}

async fn insert_items(
    conn: &mut SqliteConnection,
    id: RunId,
    items: &[ItemId],
) -> Result<(), StoreError> {
    let run_id = id.to_string();
    for (position, item) in items.iter().enumerate() {
        sqlx::query(
            "INSERT INTO run_items (run_id, position, item_id, status) VALUES (?, ?, ?, 'pending')",
        )
        .bind(&run_id)
        .bind(position as i64)
        .bind(item.as_str())
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// The history row of a finished attempt (the attempt number is the item's).
async fn record_attempt(
    conn: &mut SqliteConnection,
    id: RunId,
    item: &ItemId,
    outcome: &str,
    error_code: Option<&str>,
    at: Timestamp,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT OR REPLACE INTO run_item_attempts (run_id, item_id, attempt, outcome, error_code, finished_at) \
         SELECT run_id, item_id, attempts, ?3, ?4, ?5 FROM run_items WHERE run_id = ?1 AND item_id = ?2",
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

async fn touch(conn: &mut SqliteConnection, id: RunId, at: Timestamp) -> Result<(), StoreError> {
    sqlx::query("UPDATE runs SET updated_at = ?2 WHERE id = ?1")
        .bind(id.to_string())
        .bind(at.as_millis())
        .execute(&mut *conn)
        .await?;
    Ok(())
}
