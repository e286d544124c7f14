-- Nightly pulls as job runs (issue 6): resumable, run once across instances, with a history.
-- A run holds its connection while `status = 'running'` and its lease (`runner`,
-- `lease_until_us`) is alive; a run whose lease ran out (its process died) is taken over and
-- resumed from `checkpoint` by the next instance that looks. A scheduled run names its slot
-- (`scheduled_for_us`), so two instances firing the same slot start one run. Times in `_us`
-- columns are microseconds since the Unix epoch (UTC), as in `resources`.
ALTER TABLE job_runs ADD COLUMN started_by TEXT NOT NULL DEFAULT 'manual';
ALTER TABLE job_runs ADD COLUMN scheduled_for_us INTEGER;
ALTER TABLE job_runs ADD COLUMN runner TEXT;
ALTER TABLE job_runs ADD COLUMN lease_until_us INTEGER;
ALTER TABLE job_runs ADD COLUMN since TEXT;
ALTER TABLE job_runs ADD COLUMN pages INTEGER NOT NULL DEFAULT 0;
ALTER TABLE job_runs ADD COLUMN received_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE job_runs ADD COLUMN coverage_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE job_runs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1;
CREATE UNIQUE INDEX job_runs_one_running ON job_runs(connection_id, kind) WHERE status = 'running';
CREATE UNIQUE INDEX job_runs_slot ON job_runs(connection_id, kind, scheduled_for_us)
    WHERE scheduled_for_us IS NOT NULL;
CREATE INDEX job_runs_started ON job_runs(started_at);

-- EHR records that did not map (or failed the FHIR checks), kept with the reason instead of
-- being dropped: one row per EHR resource (keyed by the local id it would have had, a hash with
-- no PHI), its latest JSON sealed (AES-256-GCM, AAD
-- `sync_quarantine.payload:{connection}/{type}/{local id}`). A later pull that admits the
-- resource removes its row.
CREATE TABLE sync_quarantine (
    id             TEXT PRIMARY KEY,
    practice_id    TEXT NOT NULL REFERENCES practices(id),
    connection_id  TEXT NOT NULL REFERENCES ehr_connections(id),
    run_id         TEXT,
    resource_type  TEXT NOT NULL,
    local_id       TEXT NOT NULL,
    -- A fixed phrase naming the rule that failed, never a value.
    reason         TEXT NOT NULL,
    payload        BLOB NOT NULL,
    seen_count     INTEGER NOT NULL DEFAULT 1,
    first_seen_us  INTEGER NOT NULL,
    last_seen_us   INTEGER NOT NULL,
    UNIQUE (connection_id, resource_type, local_id)
);
CREATE INDEX sync_quarantine_connection ON sync_quarantine(connection_id, first_seen_us);

-- What each pulled resource last looked like at the EHR: a keyed digest (HMAC-SHA256 under the
-- blind index key, so it reveals nothing), so a pull writes only what changed and a resumed pull
-- rewrites nothing it already committed.
CREATE TABLE sync_digests (
    connection_id  TEXT NOT NULL REFERENCES ehr_connections(id),
    resource_type  TEXT NOT NULL,
    local_id       TEXT NOT NULL,
    practice_id    TEXT NOT NULL REFERENCES practices(id),
    digest         BLOB NOT NULL,
    updated_us     INTEGER NOT NULL,
    PRIMARY KEY (connection_id, resource_type, local_id)
);
