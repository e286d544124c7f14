-- FHIR Bulk Data export ($export): jobs and their output. Jobs live here, not in a process, so
-- any instance answers a status request and a job interrupted by a restart is resumed by the
-- next instance that sweeps (see src/fhir/export/runner.rs). Times are microseconds since the
-- Unix epoch (UTC), as in `resources`.

CREATE TABLE export_jobs (
    id                   TEXT PRIMARY KEY,
    practice_id          TEXT NOT NULL REFERENCES practices(id),
    -- Only this client of this practice sees the job and its files.
    client_id            TEXT NOT NULL,
    level                TEXT NOT NULL CHECK (level IN ('system', 'patient', 'group')),
    group_id             TEXT,
    -- The resource types to export, comma-separated, in export order.
    types                TEXT NOT NULL,
    since_us             BIGINT,
    transaction_time_us  BIGINT NOT NULL,
    -- The kick-off URL with only the parameters understood (never an ignored one, which could
    -- carry anything).
    request_url          TEXT NOT NULL,
    status               TEXT NOT NULL CHECK (status IN ('accepted', 'running', 'complete', 'failed')),
    -- What is sealed so far, committed with each chunk: a runner resumes exactly here.
    type_index           INTEGER NOT NULL DEFAULT 0,
    after_us             BIGINT,
    after_id             TEXT,
    file_no              INTEGER NOT NULL DEFAULT 0,
    file_resources       BIGINT NOT NULL DEFAULT 0,
    chunk_no             INTEGER NOT NULL DEFAULT 0,
    type_exported        BIGINT NOT NULL DEFAULT 0,
    exported             BIGINT NOT NULL DEFAULT 0,
    -- Resources of the current type read so far (for X-Progress; ahead of what is sealed).
    progress             BIGINT NOT NULL DEFAULT 0,
    -- The runner holding the job, until its lease runs out.
    runner               TEXT,
    lease_until_us       BIGINT,
    attempts             INTEGER NOT NULL DEFAULT 0,
    -- A fixed phrase, never data.
    error                TEXT,
    created_us           BIGINT NOT NULL,
    finished_us          BIGINT,
    -- When the job and its files are deleted.
    expires_us           BIGINT
);
CREATE INDEX export_jobs_unfinished ON export_jobs(status, lease_until_us);
CREATE INDEX export_jobs_expiry ON export_jobs(expires_us);

-- The NDJSON output: each file is a run of chunks of whole lines (about `chunk_kib` each), each
-- sealed with AES-256-GCM under the key named in `key_id`, bound to (practice, job, file,
-- chunk). Never plaintext.
CREATE TABLE export_chunks (
    practice_id    TEXT NOT NULL REFERENCES practices(id),
    job_id         TEXT NOT NULL REFERENCES export_jobs(id) ON DELETE CASCADE,
    file_no        INTEGER NOT NULL,
    chunk_no       INTEGER NOT NULL,
    resource_type  TEXT NOT NULL,
    resources      BIGINT NOT NULL,
    key_id         TEXT NOT NULL,
    content        BYTEA NOT NULL,
    PRIMARY KEY (job_id, file_no, chunk_no)
);

-- Kick-off, status, downloads and cancellation run as the tenant; the sweeps that resume
-- orphaned jobs and delete expired ones run as the login role.
GRANT SELECT, INSERT, UPDATE, DELETE ON export_jobs, export_chunks TO fhirgate_tenant;

ALTER TABLE export_jobs ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON export_jobs
    USING (practice_id = current_setting('fhirgate.practice_id', true))
    WITH CHECK (practice_id = current_setting('fhirgate.practice_id', true));

ALTER TABLE export_chunks ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON export_chunks
    USING (practice_id = current_setting('fhirgate.practice_id', true))
    WITH CHECK (practice_id = current_setting('fhirgate.practice_id', true));
