-- Hash chain of the audit trail: one chain per practice ('-' for events with no practice, such as
-- a token request from an unknown client). Each event stores the hash of the previous event of
-- its chain and its own hash; `chain_seq` numbers the chain without gaps.
ALTER TABLE audit_events ADD COLUMN chain TEXT NOT NULL DEFAULT '-';
ALTER TABLE audit_events ADD COLUMN chain_seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE audit_events ALTER COLUMN status_code TYPE BIGINT;
CREATE UNIQUE INDEX audit_events_chain_seq ON audit_events(chain, chain_seq);
CREATE INDEX audit_events_recorded ON audit_events(practice_id, recorded_at);

-- The head of each chain, row-locked by the transaction that appends to it.
CREATE TABLE audit_chain_heads (
    chain        TEXT PRIMARY KEY,
    practice_id  TEXT,
    last_seq     BIGINT NOT NULL,
    last_hash    BYTEA NOT NULL
);
GRANT SELECT, INSERT, UPDATE ON audit_chain_heads TO fhirgate_tenant;
ALTER TABLE audit_chain_heads ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON audit_chain_heads
    USING (practice_id = current_setting('fhirgate.practice_id', true))
    WITH CHECK (practice_id = current_setting('fhirgate.practice_id', true));

-- Append-only: no role, owner and superuser included, may change or remove an audit event.
CREATE FUNCTION fhirgate_audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_events_no_update_delete
    BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION fhirgate_audit_append_only();
CREATE TRIGGER audit_events_no_truncate
    BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION fhirgate_audit_append_only();
