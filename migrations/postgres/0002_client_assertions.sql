-- Client assertion ids (jti) seen by /auth/token, kept until the assertion expires so a replay
-- is refused (SMART Backend Services; RFC 7523 section 3).
CREATE TABLE client_assertions (
    practice_id  TEXT NOT NULL REFERENCES practices(id),
    client_id    TEXT NOT NULL REFERENCES api_clients(client_id),
    jti          TEXT NOT NULL,
    expires_at   BIGINT NOT NULL,           -- unix seconds
    PRIMARY KEY (client_id, jti)
);
CREATE INDEX client_assertions_expiry ON client_assertions(expires_at);

GRANT SELECT, INSERT, DELETE ON client_assertions TO fhirgate_tenant;
ALTER TABLE client_assertions ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON client_assertions
    USING (practice_id = current_setting('fhirgate.practice_id', true))
    WITH CHECK (practice_id = current_setting('fhirgate.practice_id', true));
