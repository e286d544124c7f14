//! The storage interface on the run's backend, and PostgreSQL row-level security.

use fhirgate::domain::{NewPractice, Npi, PracticeName, ResourceId, TaxId, TimeZoneName};
use fhirgate::store::{Backend, PgStore, PoolOptions, StoreError};

use crate::helpers::{backend, spawn_app};

fn practice(name: &str) -> NewPractice {
    NewPractice {
        name: PracticeName::parse(name).unwrap(),
        timezone: TimeZoneName::parse("America/Chicago").unwrap(),
        npi: Some(Npi::parse("1234567893").unwrap()),
        tax_id: Some(TaxId::parse("12-3456789").unwrap()),
    }
}

#[tokio::test]
async fn a_created_practice_reads_back_identically() {
    let app = spawn_app().await;
    let created = app
        .store
        .create_practice(&practice("Lakeside Therapy"))
        .await
        .unwrap();
    let read = app.store.get_practice(&created.id).await.unwrap();
    assert_eq!(read, created);
    assert_eq!(read.timezone, "America/Chicago");
    assert_eq!(read.tax_id.as_deref(), Some("123456789"));

    let second = app
        .store
        .create_practice(&practice("Hillside Dental"))
        .await
        .unwrap();
    let all = app.store.list_practices().await.unwrap();
    assert_eq!(all.len(), 2);
    assert!(all.contains(&created) && all.contains(&second));
}

#[tokio::test]
async fn reading_a_missing_practice_is_not_found() {
    let app = spawn_app().await;
    let missing = ResourceId::parse("id", "does-not-exist").unwrap();
    assert!(matches!(
        app.store.get_practice(&missing).await,
        Err(StoreError::NotFound)
    ));
}

/// Inserts one patient per practice as the (RLS-exempt) owner role.
async fn seed_patients(pool: &sqlx::PgPool, practices: &[&ResourceId]) {
    for (i, p) in practices.iter().enumerate() {
        sqlx::query(
            "INSERT INTO patients (id, practice_id, family_name, created_at, updated_at)
             VALUES ($1, $2, 'Doe', now(), now())",
        )
        .bind(format!("patient-{i}"))
        .bind(p.as_str())
        .execute(pool)
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn postgres_row_level_security_hides_every_row_without_the_practice_setting() {
    if backend() != Backend::Postgres {
        eprintln!(
            "row-level security exists on PostgreSQL only; run with FHIRGATE_TEST_POSTGRES_URL"
        );
        return;
    }
    let app = spawn_app().await;
    let a = app
        .store
        .create_practice(&practice("Practice A"))
        .await
        .unwrap();
    let b = app
        .store
        .create_practice(&practice("Practice B"))
        .await
        .unwrap();
    let pg = PgStore::connect(
        app.database_url.expose(),
        &PoolOptions {
            max_connections: 2,
            acquire_timeout: std::time::Duration::from_secs(5),
        },
    )
    .await
    .unwrap();
    seed_patients(pg.pool(), &[&a.id, &b.id]).await;

    // The tenant role without the practice setting: nothing at all is visible.
    let mut tx = pg.pool().begin().await.unwrap();
    sqlx::query("SET LOCAL ROLE fhirgate_tenant")
        .execute(&mut *tx)
        .await
        .unwrap();
    for table in ["patients", "practices"] {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(n, 0, "{table} leaked rows without the practice setting");
    }
    tx.rollback().await.unwrap();

    // With practice A set: only A's patient, and writing a row of B is refused.
    let mut tx = pg.begin_tenant(&a.id).await.unwrap();
    let visible: Vec<String> = sqlx::query_scalar("SELECT practice_id FROM patients")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert_eq!(visible, vec![a.id.to_string()]);
    let foreign = sqlx::query(
        "INSERT INTO patients (id, practice_id, created_at, updated_at) VALUES ('x', $1, now(), now())",
    )
    .bind(b.id.as_str())
    .execute(&mut *tx)
    .await;
    assert!(foreign.is_err(), "a tenant wrote a row of another practice");
    tx.rollback().await.unwrap();

    // The setting is transaction-local: the next tenant transaction without it sees nothing.
    let mut tx = pg.pool().begin().await.unwrap();
    sqlx::query("SET LOCAL ROLE fhirgate_tenant")
        .execute(&mut *tx)
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM patients")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(n, 0);
    tx.rollback().await.unwrap();
    pg.pool().close().await;
}

#[tokio::test]
async fn every_tenant_table_has_row_level_security_on_postgres() {
    if backend() != Backend::Postgres {
        eprintln!(
            "row-level security exists on PostgreSQL only; run with FHIRGATE_TEST_POSTGRES_URL"
        );
        return;
    }
    let app = spawn_app().await;
    let pg = sqlx::PgPool::connect(app.database_url.expose())
        .await
        .unwrap();
    let unprotected: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND c.relkind = 'r' AND c.relname <> '_sqlx_migrations'
           AND NOT c.relrowsecurity",
    )
    .fetch_all(&pg)
    .await
    .unwrap();
    assert!(
        unprotected.is_empty(),
        "tables without RLS: {unprotected:?}"
    );
    let without_practice: Vec<String> = sqlx::query_scalar(
        "SELECT t.table_name::text FROM information_schema.tables t
         WHERE t.table_schema = 'public'
           AND t.table_name NOT IN ('_sqlx_migrations', 'practices', 'crypto_settings')
           AND NOT EXISTS (SELECT 1 FROM information_schema.columns c
                           WHERE c.table_name = t.table_name AND c.column_name = 'practice_id')",
    )
    .fetch_all(&pg)
    .await
    .unwrap();
    assert!(
        without_practice.is_empty(),
        "tenant tables without practice_id: {without_practice:?}"
    );
    pg.close().await;
}

fn write(
    id: &str,
    expect: fhirgate::store::Expect,
    version_id: i64,
) -> fhirgate::store::ResourceWrite {
    fhirgate::store::ResourceWrite {
        resource_type: "Patient".into(),
        id: id.into(),
        expect,
        version_id,
        last_updated_us: 1_700_000_000_000_000 + version_id,
        sealed: Some(("k1".into(), vec![1, 2, 3])),
        index: vec![fhirgate::store::IndexRow::value("gender", "female")],
    }
}

#[tokio::test]
async fn a_batch_of_writes_commits_whole_or_names_the_write_that_conflicts() {
    use fhirgate::store::Expect::{Absent, Version};
    let app = spawn_app().await;
    let p = app
        .store
        .create_practice(&practice("Batch Practice"))
        .await
        .unwrap()
        .id;
    let store = &app.store;
    store
        .write_resources(&p, &[write("a", Absent, 1), write("b", Absent, 1)], &[])
        .await
        .unwrap();
    // A create of an existing resource: the whole batch is refused, naming that write.
    let err = store
        .write_resources(&p, &[write("c", Absent, 1), write("a", Absent, 1)], &[])
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::VersionConflict { index: 1 }),
        "{err:?}"
    );
    assert!(store
        .read_resource(&p, "Patient", "c", None)
        .await
        .unwrap()
        .is_none());
    // Two creates of one id in a batch.
    let err = store
        .write_resources(&p, &[write("d", Absent, 1), write("d", Absent, 1)], &[])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::VersionConflict { .. }), "{err:?}");
    assert!(store
        .read_resource(&p, "Patient", "d", None)
        .await
        .unwrap()
        .is_none());
    // An update against a stale version, after a good one: neither is written.
    let err = store
        .write_resources(
            &p,
            &[write("a", Version(1), 2), write("b", Version(5), 6)],
            &[],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::VersionConflict { index: 1 }),
        "{err:?}"
    );
    let a = store
        .read_resource(&p, "Patient", "a", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.version_id, 1);
    // Creates and updates together commit together, the index following each version.
    store
        .write_resources(&p, &[write("e", Absent, 1), write("a", Version(1), 2)], &[])
        .await
        .unwrap();
    let a = store
        .read_resource(&p, "Patient", "a", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.version_id, 2);
    let query = fhirgate::store::ResourceQuery {
        practice: p.clone(),
        resource_type: "Patient".into(),
        conds: vec![fhirgate::store::Cond::Index {
            param: "gender",
            any: vec![fhirgate::store::IndexMatch {
                value: Some("female".into()),
                ..Default::default()
            }],
        }],
        sort: fhirgate::store::SortKey::Id,
        descending: false,
        after: None,
        limit: 10,
    };
    let ids: Vec<String> = store
        .search_resources(&query)
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.id)
        .collect();
    assert_eq!(ids, ["a", "b", "e"]);
}

#[tokio::test]
async fn the_operator_is_warned_when_postgres_runs_without_autovacuum() {
    let app = spawn_app().await;
    let warnings = app.store.server_warnings().await;
    if backend() != Backend::Postgres {
        assert!(warnings.is_empty(), "{warnings:?}");
        return;
    }
    let pg = sqlx::PgPool::connect(app.database_url.expose())
        .await
        .unwrap();
    let autovacuum: String = sqlx::query_scalar("SHOW autovacuum")
        .fetch_one(&pg)
        .await
        .unwrap();
    // Whichever way this server is set, the gateway says so truthfully.
    if autovacuum == "off" {
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("autovacuum is off"), "{warnings:?}");
    } else {
        assert!(warnings.is_empty(), "{warnings:?}");
    }
}
