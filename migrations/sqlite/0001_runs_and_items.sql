-- Runs and their items. Times are milliseconds since the Unix epoch (UTC).
CREATE TABLE runs (
    id                 TEXT PRIMARY KEY NOT NULL,
    tenant             TEXT NOT NULL,
    run_type           TEXT NOT NULL,
    target_object_id   TEXT,
    payload_hash       TEXT,
    -- (targetObjectId, payloadHash) encoded so that null differs from every string
    dedup_key          TEXT NOT NULL,
    status             TEXT NOT NULL
        CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'partial')),
    planned            INTEGER NOT NULL DEFAULT 0,
    total              INTEGER NOT NULL DEFAULT 0,
    succeeded          INTEGER NOT NULL DEFAULT 0,
    failed             INTEGER NOT NULL DEFAULT 0,
    safe_error_code    TEXT,
    safe_error_context TEXT,
    cancel_requested   INTEGER NOT NULL DEFAULT 0,
    created_at         INTEGER NOT NULL,
    started_at         INTEGER,
    finished_at        INTEGER,
    updated_at         INTEGER NOT NULL,
    CHECK (succeeded + failed <= total)
);

-- One active run per dedup key: the database's final word on de-duplication.
CREATE UNIQUE INDEX runs_one_active_per_key
    ON runs (tenant, run_type, dedup_key)
    WHERE status IN ('queued', 'running');

CREATE INDEX runs_unfinished ON runs (created_at) WHERE status IN ('queued', 'running');
CREATE INDEX runs_by_tenant ON runs (tenant, id);

CREATE TABLE run_items (
    run_id             TEXT NOT NULL REFERENCES runs (id),
    position           INTEGER NOT NULL,
    item_id            TEXT NOT NULL,
    status             TEXT NOT NULL
        CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'canceled')),
    attempts           INTEGER NOT NULL DEFAULT 0,
    last_error_code    TEXT,
    last_error_context TEXT,
    started_at         INTEGER,
    finished_at        INTEGER,
    PRIMARY KEY (run_id, position)
);

CREATE UNIQUE INDEX run_items_by_id ON run_items (run_id, item_id);
