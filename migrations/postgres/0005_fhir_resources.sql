-- FHIR resources as clients wrote them, versioned, encrypted at rest, with a search index.
-- Ids are scoped to a practice: (practice_id, resource_type, id) is the key, so a client-chosen
-- id in one practice never collides with, or reveals, another practice's resource.
-- Times are microseconds since the Unix epoch (UTC), so they order and compare as integers on
-- both backends.

-- The current version of each resource (its head).
CREATE TABLE resources (
    practice_id      TEXT NOT NULL REFERENCES practices(id),
    resource_type    TEXT NOT NULL,
    id               TEXT NOT NULL,
    version_id       BIGINT NOT NULL CHECK (version_id >= 1),
    last_updated_us  BIGINT NOT NULL,
    deleted          BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (practice_id, resource_type, id)
);
CREATE INDEX resources_by_update ON resources(practice_id, resource_type, last_updated_us, id);

-- Every version, the current one included. `content` is the resource's JSON exactly as stored
-- (meta.versionId and meta.lastUpdated set by the server), sealed with AES-256-GCM under the key
-- named in `key_id` (also inside the envelope); a deletion has no content.
CREATE TABLE resource_versions (
    practice_id      TEXT NOT NULL REFERENCES practices(id),
    resource_type    TEXT NOT NULL,
    id               TEXT NOT NULL,
    version_id       BIGINT NOT NULL,
    last_updated_us  BIGINT NOT NULL,
    deleted          BOOLEAN NOT NULL DEFAULT FALSE,
    key_id           TEXT,
    content          BYTEA,
    PRIMARY KEY (practice_id, resource_type, id, version_id),
    CHECK (deleted = (content IS NULL))
);
CREATE INDEX resource_versions_key ON resource_versions(key_id);

-- Search parameters of current, non-deleted versions. PHI values are only ever stored as keyed
-- blind indexes (`hash`); `value` holds non-PHI tokens (codes, identifier systems, reference
-- ids); `low`/`high` a date range in seconds (`high` exclusive), coarsened to the year for
-- birth dates.
CREATE TABLE search_index (
    practice_id    TEXT NOT NULL REFERENCES practices(id),
    resource_type  TEXT NOT NULL,
    resource_id    TEXT NOT NULL,
    param          TEXT NOT NULL,
    value          TEXT,
    hash           BYTEA,
    low            BIGINT,
    high           BIGINT
);
-- Both cover resource_id (searches read only the index). The hash index also carries `value`,
-- so an identifier search (system and hash) prefers it over the far less selective system.
CREATE INDEX search_index_hash ON search_index(practice_id, resource_type, param, hash, value, resource_id);
CREATE INDEX search_index_value ON search_index(practice_id, resource_type, param, value, resource_id);
CREATE INDEX search_index_resource ON search_index(practice_id, resource_type, resource_id);

-- Settings the data depends on, such as the id of the key the blind indexes were computed
-- under (never a key itself). Not a tenant table: read and written by the login role only.
CREATE TABLE crypto_settings (
    name   TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
-- No grant and no policy: invisible to tenant work.
ALTER TABLE crypto_settings ENABLE ROW LEVEL SECURITY;

GRANT SELECT, INSERT, UPDATE, DELETE ON resources, search_index TO fhirgate_tenant;
-- Versions are history: tenant work adds them and never rewrites them (key rotation runs as
-- the login role).
GRANT SELECT, INSERT ON resource_versions TO fhirgate_tenant;

ALTER TABLE resources ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON resources
    USING (practice_id = current_setting('fhirgate.practice_id', true))
    WITH CHECK (practice_id = current_setting('fhirgate.practice_id', true));

ALTER TABLE resource_versions ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON resource_versions
    USING (practice_id = current_setting('fhirgate.practice_id', true))
    WITH CHECK (practice_id = current_setting('fhirgate.practice_id', true));

ALTER TABLE search_index ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON search_index
    USING (practice_id = current_setting('fhirgate.practice_id', true))
    WITH CHECK (practice_id = current_setting('fhirgate.practice_id', true));
