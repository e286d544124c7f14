-- Claim-status push (issue 6): claim lifecycle statuses, and a transactional outbox of the
-- updates the EHRs are to be told, delivered at least once and in order per claim.
-- Times a person reads are timestamps (`updated_at`); queue times are microseconds since the
-- Unix epoch (UTC) in `_us` columns, as in `sync_quarantine` and the job leases.

-- Where each claim stands with the payer (draft, prepared, submitted, accepted, rejected, paid,
-- denied, appealed). The statuses and their transitions live in code
-- (src/domain/claim_status.rs), not in a CHECK, so issue 7 can extend them without a
-- migration. A claim without a row is a draft. `version` counts changes (If-Match).
CREATE TABLE claim_states (
    practice_id  TEXT NOT NULL REFERENCES practices(id),
    claim_id     TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (length(status) BETWEEN 1 AND 32),
    version      BIGINT NOT NULL CHECK (version >= 1),
    updated_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (practice_id, claim_id)
);

-- The last sequence number given to a claim's outbox rows. Every outbox write bumps it in its
-- own transaction, which locks the claim's row until commit: a claim's rows commit in the order
-- of their numbers, so "deliver the lowest number first" is delivery in order of the changes.
CREATE TABLE claim_push_heads (
    practice_id  TEXT NOT NULL REFERENCES practices(id),
    claim_id     TEXT NOT NULL,
    last_seq     BIGINT NOT NULL,
    PRIMARY KEY (practice_id, claim_id)
);

-- Updates waiting to reach an EHR (pending, waiting for a retry, or held by a dispatcher's
-- lease while in flight); a delivered row is deleted. `id` is also the update's idempotency key
-- (`update_id`) the EHR deduplicates on. `payload` is the ClaimStatusUpdate JSON (it holds the
-- patient's id at the EHR), sealed with AES-256-GCM under AAD `claim_outbox.payload:{id}`.
-- `patient_id` is the gateway's own patient id (as in audit_events), `claim_id` the gateway's
-- Claim id. `last_error` is a fixed phrase, never an EHR's answer.
CREATE TABLE claim_outbox (
    id              TEXT PRIMARY KEY,
    practice_id     TEXT NOT NULL REFERENCES practices(id),
    connection_id   TEXT NOT NULL REFERENCES ehr_connections(id),
    claim_id        TEXT NOT NULL,
    claim_seq       BIGINT NOT NULL,
    patient_id      TEXT,
    source          TEXT NOT NULL CHECK (source IN ('status', 'claim-response')),
    payload         BYTEA NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    last_error      TEXT,
    created_us      BIGINT NOT NULL,
    available_us    BIGINT NOT NULL,
    last_attempt_us BIGINT,
    runner          TEXT,
    lease_until_us  BIGINT,
    UNIQUE (practice_id, claim_id, claim_seq)
);
CREATE INDEX claim_outbox_due ON claim_outbox(available_us);
CREATE INDEX claim_outbox_connection ON claim_outbox(connection_id, created_us);

-- Updates that could not be delivered (attempts exhausted, or an error retrying cannot fix),
-- kept for replay with the same id (so a late duplicate is still deduplicated by the EHR).
CREATE TABLE claim_dead_letters (
    id              TEXT PRIMARY KEY,
    practice_id     TEXT NOT NULL REFERENCES practices(id),
    connection_id   TEXT NOT NULL REFERENCES ehr_connections(id),
    claim_id        TEXT NOT NULL,
    claim_seq       BIGINT NOT NULL,
    patient_id      TEXT,
    source          TEXT NOT NULL,
    payload         BYTEA NOT NULL,
    attempts        BIGINT NOT NULL,
    last_error      TEXT NOT NULL,
    created_us      BIGINT NOT NULL,
    last_attempt_us BIGINT,
    dead_us         BIGINT NOT NULL
);
CREATE INDEX claim_dead_letters_practice ON claim_dead_letters(practice_id, dead_us, id);
CREATE INDEX claim_dead_letters_connection ON claim_dead_letters(connection_id);

GRANT SELECT, INSERT, UPDATE, DELETE ON claim_states, claim_push_heads, claim_outbox,
    claim_dead_letters TO fhirgate_tenant;
ALTER TABLE claim_states ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON claim_states
    USING (practice_id = current_setting('fhirgate.practice_id', true))
    WITH CHECK (practice_id = current_setting('fhirgate.practice_id', true));
ALTER TABLE claim_push_heads ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON claim_push_heads
    USING (practice_id = current_setting('fhirgate.practice_id', true))
    WITH CHECK (practice_id = current_setting('fhirgate.practice_id', true));
ALTER TABLE claim_outbox ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON claim_outbox
    USING (practice_id = current_setting('fhirgate.practice_id', true))
    WITH CHECK (practice_id = current_setting('fhirgate.practice_id', true));
ALTER TABLE claim_dead_letters ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON claim_dead_letters
    USING (practice_id = current_setting('fhirgate.practice_id', true))
    WITH CHECK (practice_id = current_setting('fhirgate.practice_id', true));
