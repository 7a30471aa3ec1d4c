-- One row per finished item attempt, written in the same transaction as the
-- item's transition. Times are Unix milliseconds.
CREATE TABLE run_item_attempts (
    run_id      TEXT NOT NULL REFERENCES runs (id),
    item_id     TEXT NOT NULL,
    attempt     BIGINT NOT NULL,
    -- succeeded | failed (the item's last attempt) | retried (another
    -- follows) | throttled (the upstream answered 429; not a failure)
    outcome     TEXT NOT NULL CHECK (outcome IN ('succeeded', 'failed', 'retried', 'throttled')),
    error_code  TEXT,
    finished_at BIGINT NOT NULL,
    PRIMARY KEY (run_id, item_id, attempt)
);

-- Attempts the upstream throttled, which do not count toward max_attempts.
ALTER TABLE run_items ADD COLUMN throttled BIGINT NOT NULL DEFAULT 0;
