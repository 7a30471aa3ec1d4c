-- Runs and their items: the same columns as migrations/sqlite. Times are
-- milliseconds since the Unix epoch (UTC), as BIGINT so both backends read
-- them the same way.
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
    planned            BOOLEAN NOT NULL DEFAULT FALSE,
    total              BIGINT NOT NULL DEFAULT 0,
    succeeded          BIGINT NOT NULL DEFAULT 0,
    failed             BIGINT NOT NULL DEFAULT 0,
    safe_error_code    TEXT,
    safe_error_context TEXT,
    cancel_requested   BOOLEAN NOT NULL DEFAULT FALSE,
    created_at         BIGINT NOT NULL,
    started_at         BIGINT,
    finished_at        BIGINT,
    updated_at         BIGINT NOT NULL,
    CHECK (succeeded + failed <= total)
);

-- One active run per dedup key: the database's final word on de-duplication,
-- across every node that shares this database.
CREATE UNIQUE INDEX runs_one_active_per_key
    ON runs (tenant, run_type, dedup_key)
    WHERE status IN ('queued', 'running');

CREATE INDEX runs_unfinished ON runs (created_at) WHERE status IN ('queued', 'running');
CREATE INDEX runs_by_tenant ON runs (tenant, id);

CREATE TABLE run_items (
    run_id             TEXT NOT NULL REFERENCES runs (id),
    position           BIGINT NOT NULL,
    item_id            TEXT NOT NULL,
    status             TEXT NOT NULL
        CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'canceled')),
    attempts           BIGINT NOT NULL DEFAULT 0,
    last_error_code    TEXT,
    last_error_context TEXT,
    started_at         BIGINT,
    finished_at        BIGINT,
    PRIMARY KEY (run_id, position)
);

CREATE UNIQUE INDEX run_items_by_id ON run_items (run_id, item_id);
