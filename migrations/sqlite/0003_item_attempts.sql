-- One row per finished item attempt, written in the same transaction as the
-- item's transition. Times are Unix milliseconds.
CREATE TABLE run_item_attempts (
    run_id      TEXT NOT NULL REFERENCES runs (id),
    item_id     TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    -- succeeded | failed (the item's last attempt) | retried (another follows)
    outcome     TEXT NOT NULL CHECK (outcome IN ('succeeded', 'failed', 'retried')),
    error_code  TEXT,
    finished_at INTEGER NOT NULL,
    PRIMARY KEY (run_id, item_id, attempt)
);
