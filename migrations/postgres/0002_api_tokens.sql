-- Bearer tokens, stored as SHA-256 hashes only. Times are Unix milliseconds.
CREATE TABLE api_tokens (
    id           TEXT PRIMARY KEY NOT NULL,
    -- hex SHA-256 of the whole token
    token_hash   TEXT NOT NULL UNIQUE,
    label        TEXT,
    -- TRUE: reaches every tenant; FALSE: only the tenants listed
    all_tenants  BOOLEAN NOT NULL,
    -- JSON array of tenant ids
    tenants      TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    last_used_at BIGINT,
    revoked_at   BIGINT
);
