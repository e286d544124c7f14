-- Retention: events older than the retention period (never less than six years, 45 CFR
-- 164.316(b)(2)) may be purged from the start of a chain. The purge leaves a checkpoint, the last
-- purged event's sequence and hash, from which `audit verify` continues the chain.
CREATE TABLE audit_purges (
    chain          TEXT PRIMARY KEY,
    practice_id    TEXT,
    through_seq    BIGINT NOT NULL,
    through_hash   BYTEA NOT NULL,
    purged_at      TIMESTAMPTZ NOT NULL
);
GRANT SELECT ON audit_purges TO fhirgate_tenant;
ALTER TABLE audit_purges ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON audit_purges
    USING (practice_id = current_setting('fhirgate.practice_id', true));

-- Still append-only, with one exception: a purge (transaction setting fhirgate.audit_purge = on)
-- may delete events older than six years. Nothing may ever update an event or delete a younger one.
CREATE OR REPLACE FUNCTION fhirgate_audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE'
       AND current_setting('fhirgate.audit_purge', true) = 'on'
       AND OLD.recorded_at < now() - interval '6 years' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit_events is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
