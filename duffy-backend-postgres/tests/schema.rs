//! Versioned, forward-only migrations: applied once (even by replicas
//! starting together), data kept across reopening, a newer schema or
//! another application's database refused untouched.

mod common;

use duffy_backend_postgres::test_cluster::shared;
use duffy_backend_postgres::{OpenError, PgStore, SCHEMA_VERSION};
use duffy_core::{Actor, Arch, NewNode, Store, Timestamp};

/// The database's tables and columns and the rows of the bookkeeping
/// tables: what a refused open must leave exactly as it was.
async fn fingerprint(c: &tokio_postgres::Client) -> Vec<String> {
    let mut out: Vec<String> = c
        .query(
            "SELECT table_name || '.' || column_name FROM information_schema.columns \
             WHERE table_schema = current_schema() ORDER BY 1",
            &[],
        )
        .await
        .expect("columns")
        .iter()
        .map(|r| r.get(0))
        .collect();
    for t in ["duffy_migrations", "instances", "nodes"] {
        let exists: bool = c.query_one("SELECT to_regclass($1) IS NOT NULL", &[&t]).await.expect("regclass").get(0);
        if exists {
            let n: i64 = c.query_one(&format!("SELECT count(*) FROM {t}"), &[]).await.expect("count").get(0);
            out.push(format!("{t}: {n} rows"));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_database_is_migrated_and_reopening_keeps_the_data() {
    let db = shared().database().await;
    let store = PgStore::connect(&db.url, common::options()).await.expect("open");
    let added = store
        .add_nodes(vec![NewNode::new("a.example", Arch::X86_64)], Actor::Operator, Timestamp(1))
        .await
        .expect("add");
    drop(store);
    let store = PgStore::connect(&db.url, common::options()).await.expect("reopen");
    assert_eq!(store.nodes().await.expect("nodes"), added);
    let c = common::raw(&db.url).await;
    let versions: Vec<i32> = c
        .query("SELECT version FROM duffy_migrations ORDER BY version", &[])
        .await
        .expect("read")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_starting_together_migrate_once() {
    let db = shared().database().await;
    let opens = (0..4).map(|_| PgStore::connect(&db.url, common::options()));
    let stores = futures::future::join_all(opens).await;
    for s in &stores {
        assert!(s.is_ok(), "{s:?}");
    }
    let c = common::raw(&db.url).await;
    let n: i64 = c.query_one("SELECT count(*) FROM duffy_migrations", &[]).await.expect("count").get(0);
    assert_eq!(n, i64::from(SCHEMA_VERSION));
    let ids: Vec<i32> = stores.iter().map(|s| s.as_ref().expect("open").instance()).collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 4, "each process registered once: {ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_refused_untouched() {
    let db = shared().database().await;
    drop(PgStore::connect(&db.url, common::options()).await.expect("open"));
    let c = common::raw(&db.url).await;
    c.execute(
        "INSERT INTO duffy_migrations (version, description) VALUES ($1, 'from the future')",
        &[&(SCHEMA_VERSION + 1)],
    )
    .await
    .expect("bump");
    let before = fingerprint(&c).await;
    match PgStore::connect(&db.url, common::options()).await {
        Err(OpenError::SchemaTooNew { found, supported, .. }) => {
            assert_eq!((found, supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
    let e = PgStore::connect(&db.url, common::options()).await.expect_err("still refused");
    assert!(e.to_string().contains("upgrade Duffy"), "{e}");
    assert_eq!(fingerprint(&c).await, before, "nothing was changed, not even a process registered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_applications_database_is_refused_untouched() {
    let db = shared().database().await;
    let c = common::raw(&db.url).await;
    c.batch_execute("CREATE TABLE orders (id integer PRIMARY KEY); INSERT INTO orders VALUES (1)")
        .await
        .expect("foreign");
    let before = fingerprint(&c).await;
    match PgStore::connect(&db.url, common::options()).await {
        Err(OpenError::ForeignDatabase { tables, .. }) => assert_eq!(tables, 1),
        other => panic!("expected ForeignDatabase, got {other:?}"),
    }
    assert_eq!(fingerprint(&c).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_and_unreachable_servers_say_what_is_wrong() {
    let e = PgStore::connect("postgres://duffy@localhost:notaport/x", common::options()).await.expect_err("bad url");
    assert!(matches!(e, OpenError::InvalidUrl(_)), "{e}");
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let url = format!("postgres://duffy:secret-password@127.0.0.1:{port}/duffy");
    let e = PgStore::connect(&url, common::options()).await.expect_err("nobody there");
    let msg = e.to_string();
    assert!(msg.contains(&format!("127.0.0.1:{port}/duffy")), "names the database: {msg}");
    assert!(!msg.contains("secret-password"), "never the password: {msg}");
}
