-- EHR connections as issue 5 uses them: any vendor the adapter registry knows (the vendor list
-- lives in code, adapters/src/registry.rs, not in a CHECK, so adding a vendor needs no
-- migration), the scopes to ask for, vendor settings (JSON), and the key id each sealed secret
-- is under. The credential and webhook secret are AES-256-GCM envelopes (src/crypto/field.rs)
-- whose AAD names the column and the row id.
ALTER TABLE ehr_connections DROP CONSTRAINT IF EXISTS ehr_connections_vendor_check;
ALTER TABLE ehr_connections ADD CONSTRAINT ehr_connections_vendor_length
    CHECK (length(vendor) BETWEEN 1 AND 64);
ALTER TABLE ehr_connections ADD COLUMN scopes TEXT;
ALTER TABLE ehr_connections ADD COLUMN settings TEXT NOT NULL DEFAULT '{}';

-- Outbound calls to EHRs are audited in the same trail: which connection, and how long the
-- call took. Both are NULL for inbound events (whose hashes are unchanged: see
-- src/audit/chain.rs).
ALTER TABLE audit_events ADD COLUMN connection_id TEXT;
ALTER TABLE audit_events ADD COLUMN duration_ms BIGINT;
