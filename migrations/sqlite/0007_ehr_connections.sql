-- EHR connections as issue 5 uses them: any vendor the adapter registry knows (the vendor list
-- lives in code, adapters/src/registry.rs, not in a CHECK, so adding a vendor needs no
-- migration), the scopes to ask for, vendor settings (JSON), and the key id each sealed secret
-- is under. The credential and webhook secret are AES-256-GCM envelopes (src/crypto/field.rs)
-- whose AAD names the column and the row id. SQLite cannot drop a CHECK: the table is rebuilt
-- (it was unused before this migration).
CREATE TABLE ehr_connections_v7 (
    id              TEXT PRIMARY KEY,
    practice_id     TEXT NOT NULL REFERENCES practices(id),
    vendor          TEXT NOT NULL CHECK (length(vendor) BETWEEN 1 AND 64),
    base_url        TEXT NOT NULL,
    client_id       TEXT NOT NULL,
    token_url       TEXT,
    credential      BLOB,
    scopes          TEXT,
    settings        TEXT NOT NULL DEFAULT '{}',
    schedule        TEXT NOT NULL DEFAULT '0 0 2 * * *',
    webhook_secret  BLOB,
    watermark       TEXT,
    status          TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL
);
INSERT INTO ehr_connections_v7 (id, practice_id, vendor, base_url, client_id, token_url,
    credential, schedule, webhook_secret, watermark, status, created_at, updated_at)
SELECT id, practice_id, vendor, base_url, client_id, token_url, credential, schedule,
    webhook_secret, watermark, status, created_at, updated_at FROM ehr_connections;
DROP TABLE ehr_connections;
ALTER TABLE ehr_connections_v7 RENAME TO ehr_connections;
CREATE INDEX ehr_connections_practice ON ehr_connections(practice_id);

-- Outbound calls to EHRs are audited in the same trail: which connection, and how long the
-- call took. Both are NULL for inbound events (whose hashes are unchanged: see
-- src/audit/chain.rs).
ALTER TABLE audit_events ADD COLUMN connection_id TEXT;
ALTER TABLE audit_events ADD COLUMN duration_ms INTEGER;
