-- Bearer tokens, stored as SHA-256 hashes only. Times are Unix milliseconds.
CREATE TABLE api_tokens (
    id           TEXT PRIMARY KEY NOT NULL,
    -- hex SHA-256 of the whole token
    token_hash   TEXT NOT NULL UNIQUE,
    label        TEXT,
    -- 1: reaches every tenant; 0: only the tenants listed
    all_tenants  INTEGER NOT NULL,
    -- JSON array of tenant ids
    tenants      TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    last_used_at INTEGER,
    revoked_at   INTEGER
);
