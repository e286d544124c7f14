-- Retention: events older than the retention period (never less than six years, 45 CFR
-- 164.316(b)(2)) may be purged from the start of a chain. The purge leaves a checkpoint, the last
-- purged event's sequence and hash, from which `audit verify` continues the chain.
CREATE TABLE audit_purges (
    chain          TEXT PRIMARY KEY,
    practice_id    TEXT,
    through_seq    INTEGER NOT NULL,
    through_hash   BLOB NOT NULL,
    purged_at      TEXT NOT NULL
);
