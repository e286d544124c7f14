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
    since_us             INTEGER,
    transaction_time_us  INTEGER NOT NULL,
    -- The kick-off URL with only the parameters understood (never an ignored one, which could
    -- carry anything).
    request_url          TEXT NOT NULL,
    status               TEXT NOT NULL CHECK (status IN ('accepted', 'running', 'complete', 'failed')),
    -- What is sealed so far, committed with each chunk: a runner resumes exactly here.
    type_index           INTEGER NOT NULL DEFAULT 0,
    after_us             INTEGER,
    after_id             TEXT,
    file_no              INTEGER NOT NULL DEFAULT 0,
    file_resources       INTEGER NOT NULL DEFAULT 0,
    chunk_no             INTEGER NOT NULL DEFAULT 0,
    type_exported        INTEGER NOT NULL DEFAULT 0,
    exported             INTEGER NOT NULL DEFAULT 0,
    -- Resources of the current type read so far (for X-Progress; ahead of what is sealed).
    progress             INTEGER NOT NULL DEFAULT 0,
    -- The runner holding the job, until its lease runs out.
    runner               TEXT,
    lease_until_us       INTEGER,
    attempts             INTEGER NOT NULL DEFAULT 0,
    -- A fixed phrase, never data.
    error                TEXT,
    created_us           INTEGER NOT NULL,
    finished_us          INTEGER,
    -- When the job and its files are deleted.
    expires_us           INTEGER
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
    resources      INTEGER NOT NULL,
    key_id         TEXT NOT NULL,
    content        BLOB NOT NULL,
    PRIMARY KEY (job_id, file_no, chunk_no)
);
