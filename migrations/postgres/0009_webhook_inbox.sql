-- Patient-change webhooks (issue 6): the durable inbox an authenticated notification is written
-- to before it is acknowledged, and what each FHIR subscription has delivered so far.
--
-- `event_key` is the sender's event id as an HMAC-SHA256 under the blind index key (hex): an
-- event id may carry the patient's id at the EHR (an R4 rest-hook's is the resource id and
-- version), so it is never stored in clear; equal ids give equal keys, which is all the
-- duplicate check needs. `payload` is the event's JSON sealed with AES-256-GCM (AAD
-- `webhook_inbox.payload:{id}`), dropped (NULL) once the event is done; a `resync` row has none.
-- A row is waiting while `status = 'pending'`; a worker holds it while its lease
-- (`runner`, `lease_until_us`) is alive, and a row whose worker died is claimed again once the
-- lease ran out. `last_error` is a fixed phrase, never an EHR response. Times in `_us` columns
-- are microseconds since the Unix epoch (UTC), as in `job_runs`.
CREATE TABLE webhook_inbox (
    id               TEXT PRIMARY KEY,
    practice_id      TEXT NOT NULL REFERENCES practices(id),
    connection_id    TEXT NOT NULL REFERENCES ehr_connections(id),
    event_key        TEXT NOT NULL,
    kind             TEXT NOT NULL CHECK (kind IN ('patient', 'resync')),
    payload          BYTEA,
    status           TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done', 'dead')),
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt_us  BIGINT NOT NULL,
    runner           TEXT,
    lease_until_us   BIGINT,
    last_error       TEXT,
    received_us      BIGINT NOT NULL,
    finished_us      BIGINT,
    UNIQUE (connection_id, event_key)
);
CREATE INDEX webhook_inbox_due ON webhook_inbox(status, next_attempt_us);
CREATE INDEX webhook_inbox_connection ON webhook_inbox(connection_id, status, received_us);

-- The highest event number each FHIR subscription (its reference as the EHR sends it: no PHI)
-- has accounted for (`eventsSinceSubscriptionStart` / `eventNumber`): a notification that
-- starts past it reveals missed events, recovered by a resync pull.
CREATE TABLE webhook_subscriptions (
    connection_id  TEXT NOT NULL REFERENCES ehr_connections(id),
    subscription   TEXT NOT NULL,
    practice_id    TEXT NOT NULL REFERENCES practices(id),
    last_event     BIGINT NOT NULL,
    updated_us     BIGINT NOT NULL,
    PRIMARY KEY (connection_id, subscription)
);

GRANT SELECT, INSERT, UPDATE, DELETE ON webhook_inbox, webhook_subscriptions TO fhirgate_tenant;
ALTER TABLE webhook_inbox ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON webhook_inbox
    USING (practice_id = current_setting('fhirgate.practice_id', true))
    WITH CHECK (practice_id = current_setting('fhirgate.practice_id', true));
ALTER TABLE webhook_subscriptions ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON webhook_subscriptions
    USING (practice_id = current_setting('fhirgate.practice_id', true))
    WITH CHECK (practice_id = current_setting('fhirgate.practice_id', true));
