//! Migrations compiled into the binary, one list per backend. Each file in
//! `migrations/{sqlite,postgres}/` must be listed here; a unit test checks that the lists and the
//! folders agree, so a new file cannot be forgotten.

use futures_util::future::BoxFuture;
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};

pub(crate) struct Embedded(pub &'static [(i64, &'static str, &'static str)]);

pub(crate) const SQLITE: Embedded = Embedded(&[
    (
        1,
        "practice_model",
        include_str!("../../migrations/sqlite/0001_practice_model.sql"),
    ),
    (
        2,
        "client_assertions",
        include_str!("../../migrations/sqlite/0002_client_assertions.sql"),
    ),
    (
        3,
        "audit_chain",
        include_str!("../../migrations/sqlite/0003_audit_chain.sql"),
    ),
    (
        4,
        "audit_retention",
        include_str!("../../migrations/sqlite/0004_audit_retention.sql"),
    ),
    (
        5,
        "fhir_resources",
        include_str!("../../migrations/sqlite/0005_fhir_resources.sql"),
    ),
    (
        6,
        "bulk_export",
        include_str!("../../migrations/sqlite/0006_bulk_export.sql"),
    ),
    (
        7,
        "ehr_connections",
        include_str!("../../migrations/sqlite/0007_ehr_connections.sql"),
    ),
    (
        8,
        "sync_jobs",
        include_str!("../../migrations/sqlite/0008_sync_jobs.sql"),
    ),
    (
        9,
        "webhook_inbox",
        include_str!("../../migrations/sqlite/0009_webhook_inbox.sql"),
    ),
    (
        10,
        "claim_outbox",
        include_str!("../../migrations/sqlite/0010_claim_outbox.sql"),
    ),
]);

pub(crate) const POSTGRES: Embedded = Embedded(&[
    (
        1,
        "practice_model",
        include_str!("../../migrations/postgres/0001_practice_model.sql"),
    ),
    (
        2,
        "client_assertions",
        include_str!("../../migrations/postgres/0002_client_assertions.sql"),
    ),
    (
        3,
        "audit_chain",
        include_str!("../../migrations/postgres/0003_audit_chain.sql"),
    ),
    (
        4,
        "audit_retention",
        include_str!("../../migrations/postgres/0004_audit_retention.sql"),
    ),
    (
        5,
        "fhir_resources",
        include_str!("../../migrations/postgres/0005_fhir_resources.sql"),
    ),
    (
        6,
        "bulk_export",
        include_str!("../../migrations/postgres/0006_bulk_export.sql"),
    ),
    (
        7,
        "ehr_connections",
        include_str!("../../migrations/postgres/0007_ehr_connections.sql"),
    ),
    (
        8,
        "sync_jobs",
        include_str!("../../migrations/postgres/0008_sync_jobs.sql"),
    ),
    (
        9,
        "webhook_inbox",
        include_str!("../../migrations/postgres/0009_webhook_inbox.sql"),
    ),
    (
        10,
        "claim_outbox",
        include_str!("../../migrations/postgres/0010_claim_outbox.sql"),
    ),
]);

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.iter().map(|m| m.0)).finish()
    }
}

impl<'s> MigrationSource<'s> for Embedded {
    fn resolve(self) -> BoxFuture<'s, Result<Vec<Migration>, BoxDynError>> {
        Box::pin(async move {
            Ok(self
                .0
                .iter()
                .map(|(version, description, sql)| {
                    Migration::new(
                        *version,
                        (*description).into(),
                        MigrationType::Simple,
                        (*sql).into(),
                        false,
                    )
                })
                .collect())
        })
    }
}

impl Embedded {
    pub(crate) async fn migrator(self) -> Result<Migrator, sqlx::migrate::MigrateError> {
        Migrator::new(self).await
    }

    pub(crate) fn versions(&self) -> impl Iterator<Item = i64> + '_ {
        self.0.iter().map(|m| m.0)
    }
}

/// Which of the embedded migrations the database has applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationStatus {
    pub expected: Vec<i64>,
    pub applied: Vec<i64>,
}

impl MigrationStatus {
    pub(crate) fn new(embedded: &Embedded, mut applied: Vec<i64>) -> Self {
        applied.sort_unstable();
        Self {
            expected: embedded.versions().collect(),
            applied,
        }
    }

    pub fn pending(&self) -> usize {
        self.expected
            .iter()
            .filter(|v| !self.applied.contains(v))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files_in(dir: &str) -> Vec<(i64, String)> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let mut found: Vec<(i64, String)> = std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .map(|n| {
                let (version, rest) = n.split_once('_').unwrap();
                (
                    version.parse().unwrap(),
                    rest.trim_end_matches(".sql").to_owned(),
                )
            })
            .collect();
        found.sort();
        found
    }

    fn listed(e: &Embedded) -> Vec<(i64, String)> {
        e.0.iter().map(|m| (m.0, m.1.to_owned())).collect()
    }

    #[test]
    fn every_migration_file_is_embedded_in_order() {
        assert_eq!(listed(&SQLITE), files_in("migrations/sqlite"));
        assert_eq!(listed(&POSTGRES), files_in("migrations/postgres"));
    }

    #[test]
    fn both_backends_have_the_same_migration_versions() {
        assert_eq!(
            SQLITE.versions().collect::<Vec<_>>(),
            POSTGRES.versions().collect::<Vec<_>>()
        );
    }
}
