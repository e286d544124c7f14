-- Internal practice model and the gateway's own tables (PostgreSQL).
-- Every tenant table carries practice_id. Timestamps are timestamptz.
-- PHI columns are plain text here; the gate issue turns them into ciphertext plus blind indexes.

CREATE TABLE practices (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    tax_id      TEXT,
    npi         TEXT,
    address     TEXT,                       -- JSON: {"line": [...], "city", "state", "postal_code", "country"}
    timezone    TEXT NOT NULL DEFAULT 'UTC',
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);

CREATE TABLE practitioners (
    id           TEXT PRIMARY KEY,
    practice_id  TEXT NOT NULL REFERENCES practices(id),
    npi          TEXT,
    family_name  TEXT,
    given_names  TEXT,
    active       BOOLEAN NOT NULL DEFAULT TRUE,
    version      INTEGER NOT NULL DEFAULT 1,
    deleted_at   TIMESTAMPTZ,
    created_at   TIMESTAMPTZ NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL
);
CREATE INDEX practitioners_practice ON practitioners(practice_id);

CREATE TABLE patients (
    id           TEXT PRIMARY KEY,
    practice_id  TEXT NOT NULL REFERENCES practices(id),
    family_name  TEXT,
    given_names  TEXT,
    birth_date   DATE,
    gender       TEXT CHECK (gender IN ('male', 'female', 'other', 'unknown')),
    address      TEXT,
    phone        TEXT,
    email        TEXT,
    version      INTEGER NOT NULL DEFAULT 1,
    deleted_at   TIMESTAMPTZ,
    created_at   TIMESTAMPTZ NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL
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
    period_start  DATE,
    period_end    DATE,
    version       INTEGER NOT NULL DEFAULT 1,
    created_at    TIMESTAMPTZ NOT NULL,
    updated_at    TIMESTAMPTZ NOT NULL
);
CREATE INDEX coverages_patient ON coverages(practice_id, patient_id);

-- A therapy session (FHIR Encounter).
CREATE TABLE sessions (
    id               TEXT PRIMARY KEY,
    practice_id      TEXT NOT NULL REFERENCES practices(id),
    practitioner_id  TEXT NOT NULL REFERENCES practitioners(id),
    patient_id       TEXT NOT NULL REFERENCES patients(id),
    session_date     DATE NOT NULL,
    cpt_code         TEXT NOT NULL,
    icd10_code       TEXT NOT NULL,
    fee_cents        BIGINT NOT NULL CHECK (fee_cents >= 0),
    copay_cents      BIGINT NOT NULL DEFAULT 0 CHECK (copay_cents >= 0),
    version          INTEGER NOT NULL DEFAULT 1,
    created_at       TIMESTAMPTZ NOT NULL,
    updated_at       TIMESTAMPTZ NOT NULL
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
    created_at   TIMESTAMPTZ NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL
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
    created_at   TIMESTAMPTZ NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL,
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
    credential      BYTEA,
    schedule        TEXT NOT NULL DEFAULT '0 0 2 * * *',
    webhook_secret  BYTEA,
    watermark       TEXT,
    status          TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    created_at      TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL
);
CREATE INDEX ehr_connections_practice ON ehr_connections(practice_id);

-- HIPAA audit trail: append-only, hash-chained per practice (chain fields filled by the gate issue).
CREATE TABLE audit_events (
    seq             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id              TEXT NOT NULL UNIQUE,
    practice_id     TEXT REFERENCES practices(id),
    recorded_at     TIMESTAMPTZ NOT NULL,
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
    prev_hash       BYTEA,
    hash            BYTEA
);
CREATE INDEX audit_events_practice ON audit_events(practice_id, seq);

-- Scheduled and manual job runs (nightly pulls, pushes), with a resumable checkpoint.
CREATE TABLE job_runs (
    id              TEXT PRIMARY KEY,
    practice_id     TEXT NOT NULL REFERENCES practices(id),
    connection_id   TEXT REFERENCES ehr_connections(id),
    kind            TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
    started_at      TIMESTAMPTZ NOT NULL,
    finished_at     TIMESTAMPTZ,
    created_count   BIGINT NOT NULL DEFAULT 0,
    updated_count   BIGINT NOT NULL DEFAULT 0,
    unchanged_count BIGINT NOT NULL DEFAULT 0,
    failed_count    BIGINT NOT NULL DEFAULT 0,
    checkpoint      TEXT,
    error           TEXT
);
CREATE INDEX job_runs_connection ON job_runs(practice_id, connection_id, started_at);

-- Row-level security. Tenant-scoped work runs as the NOLOGIN role fhirgate_tenant
-- (`SET LOCAL ROLE` per transaction) with the practice id in the transaction setting
-- `fhirgate.practice_id`; without that setting a tenant query sees no rows. The login role
-- (owner or superuser) stays free of the policies for migrations and cross-practice admin work.
DO $$
BEGIN
    CREATE ROLE fhirgate_tenant NOLOGIN NOBYPASSRLS;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL; -- created already (roles are cluster-wide; another database of this cluster made it)
END
$$;

DO $$
BEGIN
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        EXECUTE format('GRANT fhirgate_tenant TO %I', current_user);
    END IF;
END
$$;

GRANT USAGE ON SCHEMA public TO fhirgate_tenant;
GRANT SELECT, INSERT, UPDATE, DELETE ON practices, practitioners, patients, patient_identifiers,
    coverages, sessions, claims, api_clients, ehr_connections, job_runs TO fhirgate_tenant;
-- The audit trail is append-only for tenant work.
GRANT SELECT, INSERT ON audit_events TO fhirgate_tenant;

ALTER TABLE practices ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON practices
    USING (id = current_setting('fhirgate.practice_id', true))
    WITH CHECK (id = current_setting('fhirgate.practice_id', true));

ALTER TABLE practitioners ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON practitioners
    USING (practice_id = current_setting('fhirgate.practice_id', true))
    WITH CHECK (practice_id = current_setting('fhirgate.practice_id', true));

ALTER TABLE patients ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON patients
    USING (practice_id = current_setting('fhirgate.practice_id', true))
    WITH CHECK (practice_id = current_setting('fhirgate.practice_id', true));

ALTER TABLE patient_identifiers ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON patient_identifiers
    USING (practice_id = current_setting('fhirgate.practice_id', true))
    WITH CHECK (practice_id = current_setting('fhirgate.practice_id', true));

ALTER TABLE coverages ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON coverages
    USING (practice_id = current_setting('fhirgate.practice_id', true))
    WITH CHECK (practice_id = current_setting('fhirgate.practice_id', true));

ALTER TABLE sessions ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON sessions
    USING (practice_id = current_setting('fhirgate.practice_id', true))
    WITH CHECK (practice_id = current_setting('fhirgate.practice_id', true));

ALTER TABLE claims ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON claims
    USING (practice_id = current_setting('fhirgate.practice_id', true))
    WITH CHECK (practice_id = current_setting('fhirgate.practice_id', true));

ALTER TABLE api_clients ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON api_clients
    USING (practice_id = current_setting('fhirgate.practice_id', true))
    WITH CHECK (practice_id = current_setting('fhirgate.practice_id', true));

ALTER TABLE ehr_connections ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON ehr_connections
    USING (practice_id = current_setting('fhirgate.practice_id', true))
    WITH CHECK (practice_id = current_setting('fhirgate.practice_id', true));

ALTER TABLE audit_events ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON audit_events
    USING (practice_id = current_setting('fhirgate.practice_id', true))
    WITH CHECK (practice_id = current_setting('fhirgate.practice_id', true));

ALTER TABLE job_runs ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON job_runs
    USING (practice_id = current_setting('fhirgate.practice_id', true))
    WITH CHECK (practice_id = current_setting('fhirgate.practice_id', true));
