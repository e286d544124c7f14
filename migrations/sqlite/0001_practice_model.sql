-- Internal practice model and the gateway's own tables (SQLite).
-- Every tenant table carries practice_id. Timestamps are RFC 3339 UTC text.
-- PHI columns are plain text here; the gate issue turns them into ciphertext plus blind indexes.

CREATE TABLE practices (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    tax_id      TEXT,
    npi         TEXT,
    address     TEXT,                       -- JSON: {"line": [...], "city", "state", "postal_code", "country"}
    timezone    TEXT NOT NULL DEFAULT 'UTC',
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);

CREATE TABLE practitioners (
    id           TEXT PRIMARY KEY,
    practice_id  TEXT NOT NULL REFERENCES practices(id),
    npi          TEXT,
    family_name  TEXT,
    given_names  TEXT,
    active       INTEGER NOT NULL DEFAULT 1,
    version      INTEGER NOT NULL DEFAULT 1,
    deleted_at   TEXT,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL
);
CREATE INDEX practitioners_practice ON practitioners(practice_id);

CREATE TABLE patients (
    id           TEXT PRIMARY KEY,
    practice_id  TEXT NOT NULL REFERENCES practices(id),
    family_name  TEXT,
    given_names  TEXT,
    birth_date   TEXT,
    gender       TEXT CHECK (gender IN ('male', 'female', 'other', 'unknown')),
    address      TEXT,
    phone        TEXT,
    email        TEXT,
    version      INTEGER NOT NULL DEFAULT 1,
    deleted_at   TEXT,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL
);
CREATE INDEX patients_practice ON patients(practice_id);

-- Identifiers per source system (MRN at an EHR, the practice's own chart number...).
CREATE TABLE patient_identifiers (
    practice_id           TEXT NOT NULL REFERENCES practices(id),
    patient_id            TEXT NOT NULL REFERENCES patients(id),
    system                TEXT NOT NULL,
    value                 TEXT NOT NULL,
    source_connection_id  TEXT,
    PRIMARY KEY (practice_id, system, value)
);
CREATE INDEX patient_identifiers_patient ON patient_identifiers(patient_id);

CREATE TABLE coverages (
    id            TEXT PRIMARY KEY,
    practice_id   TEXT NOT NULL REFERENCES practices(id),
    patient_id    TEXT NOT NULL REFERENCES patients(id),
    payer_id      TEXT NOT NULL,
    member_id     TEXT NOT NULL,
    plan          TEXT,
    status        TEXT NOT NULL DEFAULT 'active'
                  CHECK (status IN ('active', 'cancelled', 'draft', 'entered-in-error')),
    period_start  TEXT,
    period_end    TEXT,
    version       INTEGER NOT NULL DEFAULT 1,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL
);
CREATE INDEX coverages_patient ON coverages(practice_id, patient_id);

-- A therapy session (FHIR Encounter).
CREATE TABLE sessions (
    id               TEXT PRIMARY KEY,
    practice_id      TEXT NOT NULL REFERENCES practices(id),
    practitioner_id  TEXT NOT NULL REFERENCES practitioners(id),
    patient_id       TEXT NOT NULL REFERENCES patients(id),
    session_date     TEXT NOT NULL,
    cpt_code         TEXT NOT NULL,
    icd10_code       TEXT NOT NULL,
    fee_cents        INTEGER NOT NULL CHECK (fee_cents >= 0),
    copay_cents      INTEGER NOT NULL DEFAULT 0 CHECK (copay_cents >= 0),
    version          INTEGER NOT NULL DEFAULT 1,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL
);
CREATE INDEX sessions_patient ON sessions(practice_id, patient_id);

CREATE TABLE claims (
    id           TEXT PRIMARY KEY,
    practice_id  TEXT NOT NULL REFERENCES practices(id),
    session_id   TEXT NOT NULL REFERENCES sessions(id),
    coverage_id  TEXT REFERENCES coverages(id),
    payer_id     TEXT NOT NULL,
    status       TEXT NOT NULL DEFAULT 'draft'
                 CHECK (status IN ('draft', 'prepared', 'submitted', 'accepted', 'rejected',
                                   'paid', 'denied', 'appealed')),
    version      INTEGER NOT NULL DEFAULT 1,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL
);
CREATE INDEX claims_status ON claims(practice_id, status);

-- SMART backend-services clients of the gateway's own FHIR API.
CREATE TABLE api_clients (
    client_id    TEXT PRIMARY KEY,
    practice_id  TEXT NOT NULL REFERENCES practices(id),
    name         TEXT NOT NULL,
    role         TEXT NOT NULL,
    scopes       TEXT NOT NULL,
    jwks         TEXT,
    jwks_url     TEXT,
    status       TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL,
    CHECK (jwks IS NOT NULL OR jwks_url IS NOT NULL)
);
CREATE INDEX api_clients_practice ON api_clients(practice_id);

-- Connections to EHRs (outbound). Credentials are encrypted by the gate issue's key service.
CREATE TABLE ehr_connections (
    id              TEXT PRIMARY KEY,
    practice_id     TEXT NOT NULL REFERENCES practices(id),
    vendor          TEXT NOT NULL CHECK (vendor IN ('epic', 'cerner', 'generic')),
    base_url        TEXT NOT NULL,
    client_id       TEXT NOT NULL,
    token_url       TEXT,
    credential      BLOB,
    schedule        TEXT NOT NULL DEFAULT '0 0 2 * * *',
    webhook_secret  BLOB,
    watermark       TEXT,
    status          TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL
);
CREATE INDEX ehr_connections_practice ON ehr_connections(practice_id);

-- HIPAA audit trail: append-only, hash-chained per practice (chain fields filled by the gate issue).
CREATE TABLE audit_events (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT NOT NULL UNIQUE,
    practice_id     TEXT REFERENCES practices(id),
    recorded_at     TEXT NOT NULL,
    action          TEXT NOT NULL,
    outcome         TEXT NOT NULL,
    status_code     INTEGER,
    actor_client_id TEXT,
    actor_role      TEXT,
    resource_type   TEXT,
    resource_id     TEXT,
    patient_id      TEXT,
    source_ip       TEXT,
    user_agent      TEXT,
    request_id      TEXT,
    purpose_of_use  TEXT,
    prev_hash       BLOB,
    hash            BLOB
);
CREATE INDEX audit_events_practice ON audit_events(practice_id, seq);

-- Scheduled and manual job runs (nightly pulls, pushes), with a resumable checkpoint.
CREATE TABLE job_runs (
    id              TEXT PRIMARY KEY,
    practice_id     TEXT NOT NULL REFERENCES practices(id),
    connection_id   TEXT REFERENCES ehr_connections(id),
    kind            TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
    started_at      TEXT NOT NULL,
    finished_at     TEXT,
    created_count   INTEGER NOT NULL DEFAULT 0,
    updated_count   INTEGER NOT NULL DEFAULT 0,
    unchanged_count INTEGER NOT NULL DEFAULT 0,
    failed_count    INTEGER NOT NULL DEFAULT 0,
    checkpoint      TEXT,
    error           TEXT
);
CREATE INDEX job_runs_connection ON job_runs(practice_id, connection_id, started_at);
