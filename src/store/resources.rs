//! Versioned FHIR resources: the types the store speaks, and the SQL both backends share.
//!
//! A resource is a head row (`resources`: current version, time, deleted flag), one row per
//! version (`resource_versions`: the sealed JSON) and its search index rows (`search_index`).
//! The store never sees plaintext: contents arrive sealed and index values arrive as blind
//! indexes or non-PHI tokens, both computed by the FHIR layer (`crate::fhir::resources`).
//!
//! The SQL is written once, in [`shared_resource_sql!`], and expanded for SQLite and PostgreSQL:
//! placeholders are `$N` (SQLite numbers `$N` parameters by first appearance, which is why each
//! statement introduces them in ascending order) or come from `QueryBuilder`.

use crate::domain::ResourceId;

/// A version as stored: the content is an AES-256-GCM envelope (absent for a deletion).
#[derive(Debug, Clone)]
pub struct StoredVersion {
    pub resource_type: String,
    pub id: String,
    pub version_id: i64,
    pub last_updated_us: i64,
    pub deleted: bool,
    pub content: Option<Vec<u8>>,
}

/// What a write expects to find, checked atomically (compare and set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The resource must not exist (in this practice).
    Absent,
    /// The head must be at this version (deleted or not).
    Version(i64),
}

/// One new version of a resource: a create, an update or (with no content) a deletion.
#[derive(Debug, Clone)]
pub struct ResourceWrite {
    pub resource_type: String,
    pub id: String,
    pub expect: Expect,
    pub version_id: i64,
    pub last_updated_us: i64,
    /// The sealed JSON and the id of the key that sealed it; `None` deletes.
    pub sealed: Option<(String, Vec<u8>)>,
    /// The search index rows of this version (replacing the previous version's).
    pub index: Vec<IndexRow>,
}

/// One search index entry. PHI only ever appears as `hash`, a keyed blind index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexRow {
    pub param: &'static str,
    pub value: Option<String>,
    pub hash: Option<Vec<u8>>,
    pub low: Option<i64>,
    pub high: Option<i64>,
}

impl IndexRow {
    pub fn value(param: &'static str, value: impl Into<String>) -> Self {
        Self {
            param,
            value: Some(value.into()),
            hash: None,
            low: None,
            high: None,
        }
    }

    pub fn hash(param: &'static str, hash: [u8; 32]) -> Self {
        Self {
            param,
            value: None,
            hash: Some(hash.to_vec()),
            low: None,
            high: None,
        }
    }

    pub fn range(param: &'static str, low: i64, high: i64) -> Self {
        Self {
            param,
            value: None,
            hash: None,
            low: Some(low),
            high: Some(high),
        }
    }
}

/// A condition on an index row's date range (`high` is exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    LowGe(i64),
    LowLt(i64),
    HighLe(i64),
    HighGt(i64),
}

/// What one index row must hold to match: every part given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexMatch {
    pub value: Option<String>,
    /// `Some(None)`: the value must be absent (an identifier with no system).
    pub value_is_null: bool,
    pub hash: Option<Vec<u8>>,
    pub bounds: Vec<Bound>,
}

/// One condition of a search; all conditions must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    /// Some index row of `param` satisfies any of `any` (a comma-separated OR).
    Index {
        param: &'static str,
        any: Vec<IndexMatch>,
    },
    /// The id is one of these.
    Ids(Vec<String>),
    /// `last_updated_us` compared with a value.
    LastUpdated(CmpOp, i64),
}

/// A comparison of `_lastUpdated` with an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Ge,
    Gt,
    Le,
    Lt,
}

impl CmpOp {
    pub(crate) fn sql(self) -> &'static str {
        match self {
            CmpOp::Ge => " >= ",
            CmpOp::Gt => " > ",
            CmpOp::Le => " <= ",
            CmpOp::Lt => " < ",
        }
    }
}

/// The order of a search (keyset paging runs over the same key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    LastUpdated,
    Id,
}

/// A search of one practice's current, non-deleted resources of one type.
#[derive(Debug, Clone)]
pub struct ResourceQuery {
    pub practice: ResourceId,
    pub resource_type: String,
    pub conds: Vec<Cond>,
    pub sort: SortKey,
    pub descending: bool,
    /// Keyset cursor: the (last_updated_us, id) of the last row already returned.
    pub after: Option<(i64, String)>,
    pub limit: i64,
}

/// A sealed version awaiting re-encryption under the active key (`fhirgate keys rotate`).
#[derive(Debug, Clone)]
pub struct SealedVersion {
    pub practice_id: String,
    pub resource_type: String,
    pub id: String,
    pub version_id: i64,
    pub key_id: String,
    pub content: Vec<u8>,
}

/// Index rows per multi-row INSERT (8 parameters each, far below both backends' limits).
pub(crate) const INDEX_INSERT_CHUNK: usize = 1000;
/// Resource and version rows per multi-row INSERT (at most 8 parameters each).
pub(crate) const ROW_INSERT_CHUNK: usize = 500;

pub(crate) const VERSION_COLUMNS: &str =
    "v.resource_type, v.id, v.version_id, v.last_updated_us, v.deleted, v.content";

/// The SQL shared by both backends, expanded once per backend as inherent methods of its store.
/// `$for_update` is the row-lock suffix for the audit chain head (`FOR UPDATE` on PostgreSQL;
/// SQLite's transaction holds the database write lock already).
macro_rules! shared_resource_sql {
    ($store:ty, $db:ty, $row:ty, $for_update:literal) => {
        fn version_from(row: &$row) -> Result<$crate::store::StoredVersion, sqlx::Error> {
            use sqlx::Row;
            Ok($crate::store::StoredVersion {
                resource_type: row.try_get("resource_type")?,
                id: row.try_get("id")?,
                version_id: row.try_get("version_id")?,
                last_updated_us: row.try_get("last_updated_us")?,
                deleted: row.try_get("deleted")?,
                content: row.try_get("content")?,
            })
        }

        fn push_bound(q: &mut sqlx::QueryBuilder<'_, $db>, column_prefix: &str, bound: $crate::store::Bound) {
            use $crate::store::Bound;
            let (column, op, value) = match bound {
                Bound::LowGe(v) => ("low", " >= ", v),
                Bound::LowLt(v) => ("low", " < ", v),
                Bound::HighLe(v) => ("high", " <= ", v),
                Bound::HighGt(v) => ("high", " > ", v),
            };
            q.push(" AND ").push(column_prefix).push(column).push(op).push_bind(value);
        }

        /// The WHERE clause of a search (without paging).
        fn push_search_filter(q: &mut sqlx::QueryBuilder<'_, $db>, query: &$crate::store::ResourceQuery) {
            use $crate::store::Cond;
            q.push(" WHERE r.practice_id = ")
                .push_bind(query.practice.as_str().to_owned())
                .push(" AND r.resource_type = ")
                .push_bind(query.resource_type.clone())
                .push(" AND r.deleted = ")
                .push_bind(false);
            for cond in &query.conds {
                match cond {
                    Cond::Index { param, any } => {
                        // An uncorrelated IN: evaluated once through the most selective index
                        // (the blind index hash, usually), not once per resource row.
                        q.push(" AND r.id IN (SELECT s.resource_id FROM search_index s WHERE s.practice_id = ")
                            .push_bind(query.practice.as_str().to_owned())
                            .push(" AND s.resource_type = ")
                            .push_bind(query.resource_type.clone())
                            .push(" AND s.param = ")
                            .push_bind(*param)
                            .push(" AND (");
                        for (i, m) in any.iter().enumerate() {
                            if i > 0 {
                                q.push(" OR ");
                            }
                            q.push("(1 = 1");
                            if let Some(hash) = &m.hash {
                                q.push(" AND s.hash = ").push_bind(hash.clone());
                            }
                            if let Some(value) = &m.value {
                                // Beside a blind index hash, the value (an identifier's system,
                                // shared by thousands of rows) is checked, not sought: written
                                // as an expression it cannot lead an index scan. PostgreSQL's
                                // generic plan for a prepared search otherwise ranked the two
                                // indexes alike, took `search_index_value` and read every row
                                // of the system to filter on the hash (27 ms at 10,000 patients
                                // a practice instead of 0.6 ms; the soak's identifier searches
                                // grew from 0.2 ms to 8 ms mean over ten minutes).
                                let column = if m.hash.is_some() {
                                    " AND s.value || '' = "
                                } else {
                                    " AND s.value = "
                                };
                                q.push(column).push_bind(value.clone());
                            }
                            if m.value_is_null {
                                q.push(" AND s.value IS NULL");
                            }
                            for bound in &m.bounds {
                                push_bound(q, "s.", *bound);
                            }
                            q.push(")");
                        }
                        if any.is_empty() {
                            q.push("1 = 0");
                        }
                        q.push("))");
                    }
                    Cond::Ids(ids) => {
                        q.push(" AND r.id IN (");
                        let mut list = q.separated(", ");
                        for id in ids {
                            list.push_bind(id.clone());
                        }
                        if ids.is_empty() {
                            list.push("NULL");
                        }
                        q.push(")");
                    }
                    Cond::LastUpdated(op, value) => {
                        q.push(" AND r.last_updated_us").push(op.sql()).push_bind(*value);
                    }
                }
            }
        }

        /// One audit record's values, in `AUDIT_COLUMNS` order.
        fn push_audit_record<'args>(
            mut row: sqlx::query_builder::Separated<'_, 'args, $db, &'static str>,
            r: &'args $crate::audit::AuditRecord,
        ) {
            row.push_bind(&r.id)
                .push_bind(&r.chain)
                .push_bind(r.chain_seq)
                .push_bind(r.recorded_at)
                .push_bind(&r.practice_id)
                .push_bind(&r.action)
                .push_bind(&r.outcome)
                .push_bind(r.status_code)
                .push_bind(&r.actor_client_id)
                .push_bind(&r.actor_role)
                .push_bind(&r.resource_type)
                .push_bind(&r.resource_id)
                .push_bind(&r.patient_id)
                .push_bind(&r.source_ip)
                .push_bind(&r.user_agent)
                .push_bind(&r.request_id)
                .push_bind(&r.purpose_of_use)
                .push_bind(&r.connection_id)
                .push_bind(r.duration_ms)
                .push_bind(&r.prev_hash)
                .push_bind(&r.hash);
        }

        impl $store {
            /// Appends audit events to their chains inside `tx` (the caller commits).
            pub(crate) async fn append_audit_in(
                &self,
                tx: &mut sqlx::Transaction<'_, $db>,
                events: &[$crate::audit::NewAuditEvent],
                at: time::OffsetDateTime,
            ) -> Result<(), $crate::store::StoreError> {
                use sqlx::Row;
                if events.is_empty() {
                    return Ok(());
                }
                let mut heads: std::collections::HashMap<String, (i64, Vec<u8>)> =
                    std::collections::HashMap::new();
                for chain in $crate::store::chains_of(events) {
                    let practice =
                        (chain != $crate::audit::SYSTEM_CHAIN).then_some(chain.as_str());
                    // Creates the head if need be and locks it, in one statement: from here
                    // to the commit no other transaction appends to this chain, so the few
                    // statements below are all that hold it.
                    let row = sqlx::query(
                        "INSERT INTO audit_chain_heads (chain, practice_id, last_seq, last_hash)
                         VALUES ($1, $2, 0, $3)
                         ON CONFLICT (chain) DO UPDATE SET last_seq = audit_chain_heads.last_seq
                         RETURNING last_seq, last_hash",
                    )
                    .bind(&chain)
                    .bind(practice)
                    .bind($crate::audit::chain::GENESIS.as_slice())
                    .fetch_one(&mut **tx)
                    .await?;
                    heads.insert(chain, (row.try_get("last_seq")?, row.try_get("last_hash")?));
                }
                // Chain every event first, then write them with one multi-row INSERT per chunk.
                let records = $crate::store::chain_records(events, &mut heads, at)?;
                // On PostgreSQL a single chain's head moves in the statement that inserts its
                // last events (a data-modifying WITH): one round trip less under the lock.
                let merged_head = if <$db as sqlx::Database>::NAME == "PostgreSQL" && heads.len() == 1 {
                    heads.iter().next()
                } else {
                    None
                };
                let chunks: Vec<&[$crate::audit::AuditRecord]> =
                    records.chunks($crate::store::AUDIT_INSERT_CHUNK).collect();
                for (at, chunk) in chunks.iter().enumerate() {
                    let merge = merged_head.filter(|_| at + 1 == chunks.len());
                    let mut insert = sqlx::QueryBuilder::<$db>::new(format!(
                        "{}INSERT INTO audit_events ({}) ",
                        if merge.is_some() { "WITH appended AS (" } else { "" },
                        $crate::store::AUDIT_COLUMNS
                    ));
                    insert.push_values(chunk.iter(), push_audit_record);
                    if let Some((chain, (seq, hash))) = merge {
                        insert
                            .push(") UPDATE audit_chain_heads SET last_seq = ")
                            .push_bind(*seq)
                            .push(", last_hash = ")
                            .push_bind(hash.as_slice())
                            .push(" WHERE chain = ")
                            .push_bind(chain.as_str());
                    }
                    insert.build().execute(&mut **tx).await?;
                }
                if merged_head.is_none() {
                    for (chain, (seq, hash)) in &heads {
                        sqlx::query(
                            "UPDATE audit_chain_heads SET last_seq = $1, last_hash = $2 WHERE chain = $3",
                        )
                        .bind(seq)
                        .bind(hash)
                        .bind(chain)
                        .execute(&mut **tx)
                        .await?;
                    }
                }
                // Read under the lock: these are the heads once `tx` commits (if it rolls back
                // instead, the next unlocked append misses and comes back here).
                self.heads_moved(heads);
                Ok(())
            }

            async fn shared_write_resources(
                &self,
                practice: &$crate::domain::ResourceId,
                writes: &[$crate::store::ResourceWrite],
                audit: &[$crate::audit::NewAuditEvent],
                claims: $crate::store::ClaimEffects<'_>,
                digests: Option<&$crate::store::SyncDigests<'_>>,
            ) -> Result<(), $crate::store::StoreError> {
                use $crate::store::{Expect, StoreError, INDEX_INSERT_CHUNK, ROW_INSERT_CHUNK};
                let _turn = self.write_turn().await?;
                let mut tx = self.begin_for(practice).await?;
                // Creates first, many rows a statement: a check that none exists yet (to name
                // the conflicting write), then one INSERT per chunk.
                let creates: Vec<usize> = (0..writes.len())
                    .filter(|i| writes[*i].expect == Expect::Absent)
                    .collect();
                for chunk in creates.chunks(ROW_INSERT_CHUNK) {
                    let mut check = sqlx::QueryBuilder::<$db>::new(
                        "SELECT resource_type, id FROM resources WHERE practice_id = ",
                    );
                    check.push_bind(practice.as_str());
                    check.push(" AND (resource_type, id) IN (");
                    let mut sep = check.separated(", ");
                    for i in chunk {
                        sep.push("(");
                        sep.push_bind_unseparated(&writes[*i].resource_type);
                        sep.push_unseparated(", ");
                        sep.push_bind_unseparated(&writes[*i].id);
                        sep.push_unseparated(")");
                    }
                    check.push(")");
                    let existing = check.build().fetch_all(&mut *tx).await?;
                    if let Some(row) = existing.first() {
                        use sqlx::Row;
                        let (ty, id): (String, String) = (row.try_get(0)?, row.try_get(1)?);
                        let index = chunk
                            .iter()
                            .copied()
                            .find(|i| writes[*i].resource_type == ty && writes[*i].id == id)
                            .unwrap_or(chunk[0]);
                        return Err(StoreError::VersionConflict { index });
                    }
                    let mut insert = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO resources (practice_id, resource_type, id, version_id, last_updated_us, deleted) ",
                    );
                    insert.push_values(chunk, |mut row, i| {
                        let w = &writes[*i];
                        row.push_bind(practice.as_str())
                            .push_bind(&w.resource_type)
                            .push_bind(&w.id)
                            .push_bind(w.version_id)
                            .push_bind(w.last_updated_us)
                            .push_bind(w.sealed.is_none());
                    });
                    insert.push(" ON CONFLICT DO NOTHING");
                    let inserted = insert.build().execute(&mut *tx).await?;
                    if inserted.rows_affected() != chunk.len() as u64 {
                        // Two writes of this call create one resource, or a concurrent
                        // transaction created one since the check.
                        return Err(StoreError::VersionConflict { index: chunk[0] });
                    }
                }
                // Updates and deletions one by one: each is a compare-and-set on its version.
                for (index, w) in writes.iter().enumerate() {
                    let Expect::Version(current) = w.expect else {
                        continue;
                    };
                    let updated = sqlx::query(
                        "UPDATE resources SET version_id = $1, last_updated_us = $2, deleted = $3
                         WHERE practice_id = $4 AND resource_type = $5 AND id = $6 AND version_id = $7",
                    )
                    .bind(w.version_id)
                    .bind(w.last_updated_us)
                    .bind(w.sealed.is_none())
                    .bind(practice.as_str())
                    .bind(&w.resource_type)
                    .bind(&w.id)
                    .bind(current)
                    .execute(&mut *tx)
                    .await?;
                    if updated.rows_affected() != 1 {
                        return Err(StoreError::VersionConflict { index });
                    }
                    sqlx::query(
                        "DELETE FROM search_index WHERE practice_id = $1 AND resource_type = $2 AND resource_id = $3",
                    )
                    .bind(practice.as_str())
                    .bind(&w.resource_type)
                    .bind(&w.id)
                    .execute(&mut *tx)
                    .await?;
                }
                // Every version, then every index row, many rows a statement.
                for chunk in writes.chunks(ROW_INSERT_CHUNK) {
                    let mut insert = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO resource_versions (practice_id, resource_type, id, version_id, last_updated_us, deleted, key_id, content) ",
                    );
                    insert.push_values(chunk, |mut row, w| {
                        let (key_id, content) = match &w.sealed {
                            Some((key_id, content)) => (Some(key_id.as_str()), Some(content.as_slice())),
                            None => (None, None),
                        };
                        row.push_bind(practice.as_str())
                            .push_bind(&w.resource_type)
                            .push_bind(&w.id)
                            .push_bind(w.version_id)
                            .push_bind(w.last_updated_us)
                            .push_bind(w.sealed.is_none())
                            .push_bind(key_id)
                            .push_bind(content);
                    });
                    insert.build().execute(&mut *tx).await?;
                }
                let index_rows: Vec<(&$crate::store::ResourceWrite, &$crate::store::IndexRow)> = writes
                    .iter()
                    .filter(|w| w.sealed.is_some())
                    .flat_map(|w| w.index.iter().map(move |ix| (w, ix)))
                    .collect();
                for chunk in index_rows.chunks(INDEX_INSERT_CHUNK) {
                    let mut insert = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO search_index (practice_id, resource_type, resource_id, param, value, hash, low, high) ",
                    );
                    insert.push_values(chunk, |mut row, (w, ix)| {
                        row.push_bind(practice.as_str())
                            .push_bind(&w.resource_type)
                            .push_bind(&w.id)
                            .push_bind(ix.param)
                            .push_bind(&ix.value)
                            .push_bind(&ix.hash)
                            .push_bind(ix.low)
                            .push_bind(ix.high);
                    });
                    insert.build().execute(&mut *tx).await?;
                }
                // What these writes change of claims, committed with them: see
                // `Store::write_resources_with_claims`.
                let now = $crate::store::now();
                if !Self::apply_claim_changes_in(&mut tx, claims.lifecycle, now).await? {
                    return Err(StoreError::Conflict($crate::store::outbox::LIFECYCLE_CONFLICT));
                }
                Self::insert_outbox_in(&mut tx, claims.outbox, $crate::store::jobs::micros(now))
                    .await?;
                // A pull's digests: see `Store::write_pulled_resources`.
                if let Some(digests) = digests {
                    Self::save_digests_in(&mut tx, practice, digests).await?;
                }
                self.append_audit_in(&mut tx, audit, now).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn shared_head_versions(
                &self,
                practice: &$crate::domain::ResourceId,
                resource_type: &str,
                ids: &[String],
            ) -> Result<std::collections::HashMap<String, i64>, $crate::store::StoreError> {
                use sqlx::Row;
                let mut heads = std::collections::HashMap::with_capacity(ids.len());
                if ids.is_empty() {
                    return Ok(heads);
                }
                let mut tx = self.begin_for(practice).await?;
                for chunk in ids.chunks($crate::store::ROW_INSERT_CHUNK) {
                    let mut q = sqlx::QueryBuilder::<$db>::new(
                        "SELECT id, version_id FROM resources WHERE practice_id = ",
                    );
                    q.push_bind(practice.as_str())
                        .push(" AND resource_type = ")
                        .push_bind(resource_type)
                        .push(" AND id IN (");
                    let mut list = q.separated(", ");
                    for id in chunk {
                        list.push_bind(id);
                    }
                    q.push(")");
                    for row in q.build().fetch_all(&mut *tx).await? {
                        heads.insert(row.try_get("id")?, row.try_get("version_id")?);
                    }
                }
                tx.commit().await?;
                Ok(heads)
            }

            async fn shared_read_resource(
                &self,
                practice: &$crate::domain::ResourceId,
                resource_type: &str,
                id: &str,
                version: Option<i64>,
            ) -> Result<Option<$crate::store::StoredVersion>, $crate::store::StoreError> {
                let mut tx = self.begin_for(practice).await?;
                let row = match version {
                    None => {
                        sqlx::query(
                            "SELECT v.resource_type, v.id, v.version_id, v.last_updated_us, v.deleted, v.content
                             FROM resources r JOIN resource_versions v
                               ON v.practice_id = r.practice_id AND v.resource_type = r.resource_type
                              AND v.id = r.id AND v.version_id = r.version_id
                             WHERE r.practice_id = $1 AND r.resource_type = $2 AND r.id = $3",
                        )
                        .bind(practice.as_str())
                        .bind(resource_type)
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await?
                    }
                    Some(vid) => {
                        sqlx::query(
                            "SELECT v.resource_type, v.id, v.version_id, v.last_updated_us, v.deleted, v.content
                             FROM resource_versions v
                             WHERE v.practice_id = $1 AND v.resource_type = $2 AND v.id = $3 AND v.version_id = $4",
                        )
                        .bind(practice.as_str())
                        .bind(resource_type)
                        .bind(id)
                        .bind(vid)
                        .fetch_optional(&mut *tx)
                        .await?
                    }
                };
                tx.commit().await?;
                Ok(row.as_ref().map(version_from).transpose()?)
            }

            async fn shared_resource_history(
                &self,
                practice: &$crate::domain::ResourceId,
                resource_type: &str,
                id: &str,
                before_version: Option<i64>,
                limit: i64,
            ) -> Result<(Vec<$crate::store::StoredVersion>, i64), $crate::store::StoreError> {
                let mut tx = self.begin_for(practice).await?;
                let rows = sqlx::query(
                    "SELECT v.resource_type, v.id, v.version_id, v.last_updated_us, v.deleted, v.content
                     FROM resource_versions v
                     WHERE v.practice_id = $1 AND v.resource_type = $2 AND v.id = $3 AND v.version_id < $4
                     ORDER BY v.version_id DESC LIMIT $5",
                )
                .bind(practice.as_str())
                .bind(resource_type)
                .bind(id)
                .bind(before_version.unwrap_or(i64::MAX))
                .bind(limit)
                .fetch_all(&mut *tx)
                .await?;
                let total: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM resource_versions WHERE practice_id = $1 AND resource_type = $2 AND id = $3",
                )
                .bind(practice.as_str())
                .bind(resource_type)
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                let versions = rows.iter().map(version_from).collect::<Result<_, _>>()?;
                Ok((versions, total))
            }

            async fn shared_search_resources(
                &self,
                query: &$crate::store::ResourceQuery,
            ) -> Result<Vec<$crate::store::StoredVersion>, $crate::store::StoreError> {
                use $crate::store::SortKey;
                let mut q = sqlx::QueryBuilder::<$db>::new(format!(
                    "SELECT {} FROM resources r JOIN resource_versions v
                       ON v.practice_id = r.practice_id AND v.resource_type = r.resource_type
                      AND v.id = r.id AND v.version_id = r.version_id",
                    $crate::store::VERSION_COLUMNS
                ));
                push_search_filter(&mut q, query);
                let (cmp, dir) = if query.descending { (" < ", " DESC") } else { (" > ", " ASC") };
                if let Some((last_updated, id)) = &query.after {
                    match query.sort {
                        SortKey::LastUpdated => {
                            q.push(" AND (r.last_updated_us")
                                .push(cmp)
                                .push_bind(*last_updated)
                                .push(" OR (r.last_updated_us = ")
                                .push_bind(*last_updated)
                                .push(" AND r.id")
                                .push(cmp)
                                .push_bind(id.clone())
                                .push("))");
                        }
                        SortKey::Id => {
                            q.push(" AND r.id").push(cmp).push_bind(id.clone());
                        }
                    }
                }
                // With a condition, the matching ids are few: find them by key and sort them.
                // The sort key is then written as an expression (`+ 0`, `|| ''`) so SQLite
                // does not walk the whole practice in index order to avoid that sort.
                let filtered = !query.conds.is_empty();
                let (lu, id) = if filtered {
                    ("r.last_updated_us + 0", "r.id || ''")
                } else {
                    ("r.last_updated_us", "r.id")
                };
                match query.sort {
                    SortKey::LastUpdated => {
                        q.push(" ORDER BY ").push(lu).push(dir).push(", ").push(id).push(dir);
                    }
                    SortKey::Id => {
                        q.push(" ORDER BY ").push(id).push(dir);
                    }
                }
                q.push(" LIMIT ").push_bind(query.limit);
                let mut tx = self.begin_for(&query.practice).await?;
                let rows = q.build().fetch_all(&mut *tx).await?;
                tx.commit().await?;
                Ok(rows.iter().map(version_from).collect::<Result<_, _>>()?)
            }

            async fn shared_count_resources(
                &self,
                query: &$crate::store::ResourceQuery,
            ) -> Result<i64, $crate::store::StoreError> {
                let mut q = sqlx::QueryBuilder::<$db>::new("SELECT COUNT(*) FROM resources r");
                push_search_filter(&mut q, query);
                let mut tx = self.begin_for(&query.practice).await?;
                let total: i64 = q.build_query_scalar().fetch_one(&mut *tx).await?;
                tx.commit().await?;
                Ok(total)
            }

            async fn shared_crypto_setting(
                &self,
                name: &str,
                default: &str,
            ) -> Result<String, $crate::store::StoreError> {
                sqlx::query(
                    "INSERT INTO crypto_settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                )
                .bind(name)
                .bind(default)
                .execute(&self.pool)
                .await?;
                Ok(sqlx::query_scalar("SELECT value FROM crypto_settings WHERE name = $1")
                    .bind(name)
                    .fetch_one(&self.pool)
                    .await?)
            }

            async fn shared_sealed_not_under(
                &self,
                active_key: &str,
                limit: i64,
            ) -> Result<Vec<$crate::store::SealedVersion>, $crate::store::StoreError> {
                use sqlx::Row;
                let rows = sqlx::query(
                    "SELECT practice_id, resource_type, id, version_id, key_id, content
                     FROM resource_versions WHERE key_id IS NOT NULL AND key_id <> $1 LIMIT $2",
                )
                .bind(active_key)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|row| {
                        Ok($crate::store::SealedVersion {
                            practice_id: row.try_get("practice_id")?,
                            resource_type: row.try_get("resource_type")?,
                            id: row.try_get("id")?,
                            version_id: row.try_get("version_id")?,
                            key_id: row.try_get("key_id")?,
                            content: row.try_get("content")?,
                        })
                    })
                    .collect::<Result<_, sqlx::Error>>()
                    .map_err(Into::into)
            }

            async fn shared_sealed_key_counts(
                &self,
            ) -> Result<Vec<(String, i64)>, $crate::store::StoreError> {
                use sqlx::Row;
                let rows = sqlx::query(
                    "SELECT key_id, COUNT(*) AS n FROM resource_versions
                     WHERE key_id IS NOT NULL GROUP BY key_id ORDER BY key_id",
                )
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|row| Ok((row.try_get("key_id")?, row.try_get("n")?)))
                    .collect::<Result<_, sqlx::Error>>()
                    .map_err(Into::into)
            }

            async fn shared_reseal(
                &self,
                resealed: &[($crate::store::SealedVersion, String, Vec<u8>)],
            ) -> Result<u64, $crate::store::StoreError> {
                let _turn = self.write_turn().await?;
                let mut tx = self.pool.begin().await?;
                let mut done = 0;
                for (old, key_id, content) in resealed {
                    done += sqlx::query(
                        "UPDATE resource_versions SET key_id = $1, content = $2
                         WHERE practice_id = $3 AND resource_type = $4 AND id = $5 AND version_id = $6 AND key_id = $7",
                    )
                    .bind(key_id)
                    .bind(content)
                    .bind(&old.practice_id)
                    .bind(&old.resource_type)
                    .bind(&old.id)
                    .bind(old.version_id)
                    .bind(&old.key_id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                }
                tx.commit().await?;
                Ok(done)
            }
        }
    };
}

pub(crate) use shared_resource_sql;
