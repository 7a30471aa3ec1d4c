-- Run ownership: the node executing a run holds a lease on it, renewed by
-- heartbeat; every takeover raises the epoch, and every write of a run's
-- state is fenced by it (a node that lost the lease cannot overwrite its
-- successor). Times are Unix milliseconds.
ALTER TABLE runs ADD COLUMN owner_node TEXT;
ALTER TABLE runs ADD COLUMN lease_expires_at INTEGER;
ALTER TABLE runs ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
