-- Hash chain of the audit trail: one chain per practice ('-' for events with no practice, such as
-- a token request from an unknown client). Each event stores the hash of the previous event of
-- its chain and its own hash; `chain_seq` numbers the chain without gaps, so a deleted event is
-- as visible as an edited one. SQLite has no way to forbid UPDATE/DELETE to the file's owner:
-- there `fhirgate audit verify` is what detects tampering.
ALTER TABLE audit_events ADD COLUMN chain TEXT NOT NULL DEFAULT '-';
ALTER TABLE audit_events ADD COLUMN chain_seq INTEGER NOT NULL DEFAULT 0;
CREATE UNIQUE INDEX audit_events_chain_seq ON audit_events(chain, chain_seq);
CREATE INDEX audit_events_recorded ON audit_events(practice_id, recorded_at);

-- The head of each chain, updated in the transaction that appends to it (serialises appends).
CREATE TABLE audit_chain_heads (
    chain        TEXT PRIMARY KEY,
    practice_id  TEXT,
    last_seq     INTEGER NOT NULL,
    last_hash    BLOB NOT NULL
);
