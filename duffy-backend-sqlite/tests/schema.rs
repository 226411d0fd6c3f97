//! Opening files: migrations, versions, foreign and broken files, options.

use duffy_backend_sqlite::{APPLICATION_ID, OpenError, SCHEMA_VERSION, SqliteOptions, SqliteStore};
use duffy_core::{Actor, Arch, NewNode, Store, StoreError, Timestamp};
use rusqlite::Connection;

fn pragma(path: &std::path::Path, name: &str) -> i64 {
    let c = Connection::open(path).expect("raw open");
    c.query_row(&format!("PRAGMA {name}"), [], |r| r.get(0)).expect("pragma")
}

#[test]
fn a_new_file_gets_the_current_schema_and_reopening_changes_nothing() {
    let (_dir, path, added) = file_with_nodes(vec![NewNode::new("a", Arch::X86_64)]);
    assert_eq!(pragma(&path, "user_version"), SCHEMA_VERSION);
    assert_eq!(pragma(&path, "application_id"), i64::from(APPLICATION_ID));
    let c = Connection::open(&path).expect("raw open");
    let mode: String = c.query_row("PRAGMA journal_mode", [], |r| r.get(0)).expect("mode");
    assert_eq!(mode, "wal");
    drop(c);
    let store = SqliteStore::open(&path, SqliteOptions::default()).expect("reopen");
    assert_eq!(futures::executor::block_on(store.nodes()).expect("nodes"), added);
}

#[test]
fn a_file_from_a_newer_version_is_refused_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("duffy.db");
    drop(SqliteStore::open(&path, SqliteOptions::default()).expect("open"));
    let newer = SCHEMA_VERSION + 1;
    Connection::open(&path).expect("raw").execute_batch(&format!("PRAGMA user_version = {newer}")).expect("bump");
    match SqliteStore::open(&path, SqliteOptions::default()) {
        Err(OpenError::SchemaTooNew { found, supported, .. }) => {
            assert_eq!((found, supported), (newer, SCHEMA_VERSION));
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
    assert_eq!(pragma(&path, "user_version"), newer, "nothing was changed");
    let e = SqliteStore::open(&path, SqliteOptions::default()).expect_err("still refused");
    assert!(e.to_string().contains("newer"), "{e}");
    // As a StoreError it is a backend error with context, not corruption.
    let e: StoreError = e.into();
    assert!(matches!(e, StoreError::Backend { .. }), "{e}");
}

#[test]
fn another_applications_database_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("other.db");
    Connection::open(&path)
        .expect("raw")
        .execute_batch("CREATE TABLE t (x); PRAGMA user_version = 3;")
        .expect("other app's schema");
    assert!(matches!(
        SqliteStore::open(&path, SqliteOptions::default()),
        Err(OpenError::ForeignDatabase { user_version: 3, application_id: 0, .. })
    ));
    let path = dir.path().join("other2.db");
    Connection::open(&path).expect("raw").execute_batch("PRAGMA application_id = 1234;").expect("app id");
    assert!(matches!(
        SqliteStore::open(&path, SqliteOptions::default()),
        Err(OpenError::ForeignDatabase { application_id: 1234, .. })
    ));
}

#[test]
fn a_file_that_is_not_a_database_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("garbage.db");
    std::fs::write(&path, vec![0x5a; 8192]).expect("write");
    match SqliteStore::open(&path, SqliteOptions::default()) {
        Err(OpenError::Sqlite { source, .. }) => {
            assert_eq!(source.sqlite_error_code(), Some(rusqlite::ErrorCode::NotADatabase), "{source}");
        }
        other => panic!("expected a SQLite error, got {other:?}"),
    }
    let missing_dir = dir.path().join("no/such/dir/duffy.db");
    assert!(matches!(SqliteStore::open(&missing_dir, SqliteOptions::default()), Err(OpenError::Sqlite { .. })));
}

#[test]
fn in_memory_databases_and_bad_options_are_refused() {
    assert!(matches!(SqliteStore::open(":memory:", SqliteOptions::default()), Err(OpenError::NotWal { .. })));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("duffy.db");
    for options in [
        SqliteOptions { read_connections: 0, ..SqliteOptions::default() },
        SqliteOptions { max_batch: 0, ..SqliteOptions::default() },
    ] {
        assert!(matches!(SqliteStore::open(&path, options), Err(OpenError::InvalidOptions(_))));
    }
}

#[test]
fn two_stores_on_one_file_share_it_safely() {
    // Not the intended deployment (one process owns the file), but SQLite's
    // locking keeps it correct: the second writer waits for the first.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("duffy.db");
    let a = SqliteStore::open(&path, SqliteOptions::default()).expect("open a");
    let b = SqliteStore::open(&path, SqliteOptions::default()).expect("open b");
    futures::executor::block_on(async {
        a.add_nodes(vec![NewNode::new("x", Arch::X86_64)], Actor::Operator, Timestamp(1)).await.expect("a adds");
        let dup = b.add_nodes(vec![NewNode::new("x", Arch::X86_64)], Actor::Operator, Timestamp(1)).await;
        assert!(matches!(dup, Err(StoreError::Duplicate(_))), "{dup:?}");
        assert_eq!(b.nodes().await.expect("read").len(), 1);
    });
}

/// Undoes migration 8 (node histories as chains instead of an index; the
/// sessions' live flag without an `IN` list; the index on every node's
/// state replaced by two partial ones).
const V8_DOWN: &str = "CREATE INDEX events_node ON events (node, seq); ALTER TABLE events DROP COLUMN prev; \
    ALTER TABLE nodes DROP COLUMN last_event; DROP INDEX nodes_provisioning; DROP INDEX nodes_failed; \
    CREATE INDEX nodes_state ON nodes (state, id); \
    DROP INDEX sessions_live; DROP INDEX sessions_live_project; ALTER TABLE sessions DROP COLUMN live; \
    ALTER TABLE sessions ADD COLUMN live INTEGER NOT NULL \
        GENERATED ALWAYS AS (state IN ('Allocating', 'Prod', 'Fail')) VIRTUAL; \
    CREATE INDEX sessions_live ON sessions (created_at, id) WHERE live = 1; \
    CREATE INDEX sessions_live_project ON sessions (project) WHERE live = 1;";

/// Undoes migration 10 (install tickets).
const V10_DOWN: &str = "DROP TABLE install_ticket_tokens; DROP TABLE install_tickets;";

/// Undoes migration 9 (each session's node count, in the index of the
/// live sessions).
const V9_DOWN: &str = "DROP INDEX sessions_live_project; ALTER TABLE sessions DROP COLUMN node_count; \
    CREATE INDEX sessions_live_project ON sessions (project) WHERE live = 1;";

/// Undoes migration 5 (key expiry, revocation and last use), after 8, 7
/// and 6.
const V5_DOWN: &str = "ALTER TABLE api_keys DROP COLUMN expires_at; ALTER TABLE api_keys DROP COLUMN revoked_at; \
                       ALTER TABLE api_keys DROP COLUMN last_used;";

/// Undoes migration 6 (session expiry), after 8 and 7.
const V6_DOWN: &str = "DROP INDEX sessions_expiry; ALTER TABLE sessions DROP COLUMN expires_at;";

/// Undoes migration 7 (the leadership epoch).
const V7_DOWN: &str = "ALTER TABLE settings DROP COLUMN leader_epoch;";

#[test]
fn a_version_1_file_is_migrated_forward_keeping_its_data() {
    let (_dir, path, added) = file_with_nodes(vec![NewNode::new("old.example", Arch::X86_64)]);
    // Make it the file a version-1 build wrote: no host_key column.
    Connection::open(&path)
        .expect("raw")
        .execute_batch(&format!(
            "{V10_DOWN} {V9_DOWN} {V8_DOWN} {V7_DOWN} {V6_DOWN} DROP INDEX nodes_state; DROP INDEX nodes_stale; DROP INDEX nodes_idle; \
             ALTER TABLE nodes DROP COLUMN host_key; {V5_DOWN} PRAGMA user_version = 1;"
        ))
        .expect("downgrade");
    let store = SqliteStore::open(&path, SqliteOptions::default()).expect("migrates");
    let nodes = futures::executor::block_on(store.nodes()).expect("nodes");
    assert_eq!(nodes, added, "rows survive the migration");
    assert_eq!(nodes[0].host_key, None);
    drop(store);
    assert_eq!(pragma(&path, "user_version"), SCHEMA_VERSION);
    assert_eq!(SCHEMA_VERSION, 10);
}

/// A new store file in a temporary directory holding `nodes` (added by
/// the operator at time 1), closed: the directory, the file, the nodes.
fn file_with_nodes(nodes: Vec<NewNode>) -> (tempfile::TempDir, std::path::PathBuf, Vec<duffy_core::Node>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("duffy.db");
    let store = SqliteStore::open(&path, SqliteOptions::default()).expect("open");
    let added = futures::executor::block_on(store.add_nodes(nodes, Actor::Operator, Timestamp(1))).expect("add");
    drop(store);
    (dir, path, added)
}

fn index_names(path: &std::path::Path) -> Vec<String> {
    let c = Connection::open(path).expect("raw open");
    let mut stmt = c
        .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'nodes' ORDER BY name")
        .expect("q");
    stmt.query_map([], |r| r.get(0)).expect("query").collect::<Result<_, _>>().expect("rows")
}

#[test]
fn a_version_2_file_is_migrated_forward_keeping_its_data() {
    let (_dir, path, added) =
        file_with_nodes(vec![NewNode::new("old.example", Arch::X86_64), NewNode::new("older.example", Arch::X86_64)]);
    // Make it the file a version-2 build wrote: no reconciler indexes.
    Connection::open(&path)
        .expect("raw")
        .execute_batch(&format!(
            "{V10_DOWN} {V9_DOWN} {V8_DOWN} {V7_DOWN} {V6_DOWN} DROP INDEX nodes_state; DROP INDEX nodes_stale; DROP INDEX nodes_idle; {V5_DOWN} \
             PRAGMA user_version = 2;"
        ))
        .expect("downgrade");
    assert!(!index_names(&path).iter().any(|n| n == "nodes_state" || n == "nodes_stale"));
    let store = SqliteStore::open(&path, SqliteOptions::default()).expect("migrates");
    let nodes = futures::executor::block_on(store.nodes()).expect("nodes");
    assert_eq!(nodes, added, "rows survive the migration");
    let active = futures::executor::block_on(store.nodes_in_states(&[duffy_core::NodeState::Active])).expect("read");
    assert_eq!(active, added, "the new reads work on the migrated file");
    drop(store);
    assert_eq!(pragma(&path, "user_version"), SCHEMA_VERSION);
    let names = index_names(&path);
    assert!(names.iter().any(|n| n == "nodes_provisioning"), "{names:?}");
    assert!(names.iter().any(|n| n == "nodes_stale") && names.iter().any(|n| n == "nodes_idle"), "{names:?}");
}

#[test]
fn a_version_3_file_gets_the_idle_index_by_kind_of_machine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("duffy.db");
    let store = SqliteStore::open(&path, SqliteOptions::default()).expect("open");
    let mut arm = NewNode::new("arm.example", Arch::Aarch64);
    arm.flavor = Some("tiny".into());
    let added = futures::executor::block_on(store.add_nodes(
        vec![NewNode::new("x86.example", Arch::X86_64), arm],
        Actor::Operator,
        Timestamp(1),
    ))
    .expect("add");
    drop(store);
    // Make it the file a version-3 build wrote: idle nodes by use only.
    Connection::open(&path)
        .expect("raw")
        .execute_batch(&format!(
            "{V10_DOWN} {V9_DOWN} {V8_DOWN} {V7_DOWN} {V6_DOWN} DROP INDEX nodes_idle; CREATE INDEX nodes_idle ON nodes (used_count, id) WHERE state = 'Active'; \
                 {V5_DOWN} PRAGMA user_version = 3;"
        ))
        .expect("downgrade");
    let store = SqliteStore::open(&path, SqliteOptions::default()).expect("migrates");
    let kind = duffy_core::Hardware::of(&added[1]);
    let idle = futures::executor::block_on(store.idle_nodes(&kind, 10)).expect("read");
    assert_eq!(idle, vec![added[1].clone()], "the new read works on the migrated file");
    drop(store);
    assert_eq!(pragma(&path, "user_version"), SCHEMA_VERSION);
    let c = Connection::open(&path).expect("raw open");
    let cols: Vec<String> = c
        .prepare("SELECT name FROM pragma_index_info('nodes_idle') ORDER BY seqno")
        .expect("q")
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert_eq!(cols, ["hardware_arch", "flavor", "used_count", "id"]);
}

fn column_names(path: &std::path::Path, table: &str) -> Vec<String> {
    let c = Connection::open(path).expect("raw open");
    let mut stmt = c.prepare(&format!("SELECT name FROM pragma_table_info('{table}')")).expect("q");
    stmt.query_map([], |r| r.get(0)).expect("query").collect::<Result<_, _>>().expect("rows")
}

#[test]
fn a_version_4_file_is_migrated_forward_keeping_its_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("duffy.db");
    let store = SqliteStore::open(&path, SqliteOptions::default()).expect("open");
    let key = futures::executor::block_on(async {
        store
            .upsert_project(duffy_core::Project { name: "ci".into(), quota: None, ssh_keys: vec![] })
            .await
            .expect("project");
        store.add_api_key("ci", duffy_core::hash_api_key("old-key"), true, Timestamp(7), None).await.expect("key")
    });
    drop(store);
    // Make it the file a version-4 build wrote: keys without expiry,
    // revocation or last use.
    Connection::open(&path)
        .expect("raw")
        .execute_batch(&format!(
            "{V10_DOWN} {V9_DOWN} {V8_DOWN} {V7_DOWN} {V6_DOWN} {V5_DOWN} PRAGMA user_version = 4;"
        ))
        .expect("downgrade");
    assert!(!column_names(&path, "api_keys").iter().any(|c| c == "revoked_at"));
    let store = SqliteStore::open(&path, SqliteOptions::default()).expect("migrates");
    futures::executor::block_on(async {
        let read = store.api_key_by_hash(&key.hash).await.expect("read").expect("the key survives");
        assert_eq!(read, key, "same row, no expiry, not revoked, never used");
        assert_eq!(store.api_keys(None).await.expect("list"), vec![key.clone()]);
        let revoked = store.revoke_api_key(key.id, Timestamp(9)).await.expect("revocable after the migration");
        assert_eq!(revoked.revoked_at, Some(Timestamp(9)));
        store.record_key_use(vec![(key.id, Timestamp(8))]).await.expect("use recorded");
        assert_eq!(store.api_keys(Some("ci")).await.expect("list")[0].last_used, Some(Timestamp(8)));
    });
    drop(store);
    assert_eq!(pragma(&path, "user_version"), SCHEMA_VERSION);
    let cols = column_names(&path, "api_keys");
    for c in ["expires_at", "revoked_at", "last_used"] {
        assert!(cols.iter().any(|n| n == c), "{c} missing: {cols:?}");
    }
}

#[test]
fn a_version_5_file_gets_session_expiry_at_the_lease() {
    use duffy_core::testkit::conformance::{add_ready, claim_ok, claim_req, pool7};
    use duffy_core::{Batch, SessionCause, SessionId, SessionState, SessionWrite};
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("duffy.db");
    let t0 = Timestamp(1_700_000_000_000);
    let at = |secs: u64| t0.plus(Duration::from_secs(secs));
    let store = SqliteStore::open(&path, SqliteOptions::default()).expect("open");
    futures::executor::block_on(async {
        add_ready(&store, "n", 3, &pool7()).await;
        let mut prod = claim_req("prod", 1, "p", 1, t0);
        prod.deliver = Some(at(3600));
        claim_ok(&store, prod).await;
        let mut late = claim_req("late", 1, "p", 1, t0);
        late.deliver = Some(at(60));
        claim_ok(&store, late).await;
        claim_ok(&store, claim_req("allocating", 1, "p", 1, t0)).await;
    });
    drop(store);
    // Make it the file a version-5 build wrote: sessions with a lease and
    // no expiry.
    Connection::open(&path)
        .expect("raw")
        .execute_batch(&format!("{V10_DOWN} {V9_DOWN} {V8_DOWN} {V7_DOWN} {V6_DOWN} PRAGMA user_version = 5;"))
        .expect("downgrade");
    assert!(!column_names(&path, "sessions").iter().any(|c| c == "expires_at"));
    let store = SqliteStore::open(&path, SqliteOptions::default()).expect("migrates");
    futures::executor::block_on(async {
        let read = |id: &str| {
            let store = &store;
            let id = SessionId(id.into());
            async move { store.session(&id).await.expect("read").expect("survives the migration") }
        };
        let prod = read("prod").await;
        assert_eq!(
            (prod.state, prod.lease_until, prod.expires_at),
            (SessionState::Prod, Some(at(3600)), Some(at(3600)))
        );
        assert_eq!(read("late").await.expires_at, Some(at(60)), "expires at its lease, as every session now does");
        assert_eq!(read("allocating").await.expires_at, None, "not delivered: no expiry");
        // The reconciler's read finds the one past its lease at once.
        let due: Vec<String> =
            store.expired_sessions(at(61), 10).await.expect("read").into_iter().map(|s| s.id.0).collect();
        assert_eq!(due, ["late"]);
        // And an extension is written on the migrated file.
        let w = SessionWrite::transition(&prod, SessionCause::Extended { until: at(7200), max_until: None }, at(10))
            .expect("legal");
        store.commit(Batch { sessions: vec![w], ..Batch::default() }).await.expect("extend");
        assert_eq!(read("prod").await.expires_at, Some(at(7200)));
        assert_eq!(read("prod").await.lease_until, Some(at(3600)));
    });
    drop(store);
    assert_eq!(pragma(&path, "user_version"), SCHEMA_VERSION);
    let c = Connection::open(&path).expect("raw open");
    let indexes: Vec<String> = c
        .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'sessions'")
        .expect("q")
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert!(indexes.iter().any(|n| n == "sessions_expiry"), "{indexes:?}");
}

#[test]
fn a_version_6_file_gets_the_leadership_epoch() {
    let (_dir, path, added) = file_with_nodes(vec![NewNode::new("old.example", Arch::X86_64)]);
    // Make it the file a version-6 build wrote: no leadership epoch.
    Connection::open(&path)
        .expect("raw")
        .execute_batch(&format!("{V10_DOWN} {V9_DOWN} {V8_DOWN} {V7_DOWN} PRAGMA user_version = 6;"))
        .expect("downgrade");
    let store = SqliteStore::open(&path, SqliteOptions::default()).expect("migrates");
    futures::executor::block_on(async {
        assert_eq!(store.nodes().await.expect("nodes"), added, "rows survive the migration");
        assert_eq!(store.new_leader_epoch().await.expect("first term"), 1, "no term had started");
        let w =
            duffy_core::NodeWrite::transition(&added[0], duffy_core::Cause::SetAdmin, Actor::Reconciler, Timestamp(2))
                .expect("legal");
        let batch = duffy_core::Batch { nodes: vec![w], ..duffy_core::Batch::default() };
        store.commit_fenced(batch, 1).await.expect("the term writes");
    });
    drop(store);
    assert_eq!(pragma(&path, "user_version"), SCHEMA_VERSION);
    assert!(column_names(&path, "settings").iter().any(|c| c == "leader_epoch"));
}

#[test]
fn a_version_7_file_is_migrated_forward_keeping_its_sessions() {
    use duffy_core::testkit::conformance::{add_ready, claim_ok, claim_req, pool7, release};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("duffy.db");
    let store = SqliteStore::open(&path, SqliteOptions::default()).expect("open");
    let (live, ended) = futures::executor::block_on(async {
        add_ready(&store, "n", 3, &pool7()).await;
        let live = claim_ok(&store, claim_req("live", 1, "p", 1, Timestamp(5))).await;
        let ended = claim_ok(&store, claim_req("ended", 1, "p", 1, Timestamp(6))).await;
        release(&store, &ended.session.id, Timestamp(7)).await.expect("release");
        (live, ended)
    });
    drop(store);
    // Make it the file a version-7 build wrote: `live` through an IN list,
    // every node indexed by state.
    Connection::open(&path)
        .expect("raw")
        .execute_batch(&format!("{V10_DOWN} {V9_DOWN} {V8_DOWN} PRAGMA user_version = 7;"))
        .expect("downgrade");
    assert!(index_names(&path).iter().any(|n| n == "nodes_state"));
    let store = SqliteStore::open(&path, SqliteOptions::default()).expect("migrates");
    futures::executor::block_on(async {
        let listed: Vec<_> = store.live_sessions().await.expect("live").into_iter().map(|s| s.id).collect();
        assert_eq!(listed, vec![live.session.id.clone()], "the live flag is computed for the old rows");
        let done = store.session(&ended.session.id).await.expect("read").expect("kept");
        assert_eq!(done.state, duffy_core::SessionState::Aborted, "an allocation that ends is aborted");
        // A released node started on its reinstall is found by the new
        // index on Provisioning nodes.
        let idle = store.node(ended.nodes[0].id).await.expect("read").expect("node");
        let cause = duffy_core::Cause::InstallStarted { image: pool7(), why: "test".into() };
        let w = duffy_core::NodeWrite::transition(&idle, cause, Actor::Reconciler, Timestamp(8)).expect("legal");
        let provisioning = w.node.clone();
        store.commit(duffy_core::Batch { nodes: vec![w], ..Default::default() }).await.expect("install started");
        let found = store.nodes_in_states(&[duffy_core::NodeState::Provisioning]).await.expect("read");
        assert_eq!(found, vec![provisioning]);
        // Every node's history, linked from the old index, goes on with
        // the events written since.
        duffy_core::testkit::conformance::check_history(&store).await.expect("histories");
        let history =
            store.events(duffy_core::EventQuery { node: Some(idle.id), ..Default::default() }).await.expect("history");
        let causes: Vec<_> = history.iter().map(|e| e.cause).collect();
        use duffy_core::CauseKind as C;
        assert_eq!(
            causes,
            [C::Added, C::InstallStarted, C::InstallSucceeded, C::Allocated, C::AllocationAborted, C::InstallStarted]
        );
    });
    drop(store);
    assert_eq!(pragma(&path, "user_version"), SCHEMA_VERSION);
    let names = index_names(&path);
    assert!(!names.iter().any(|n| n == "nodes_state"), "{names:?}");
    assert!(names.iter().any(|n| n == "nodes_provisioning") && names.iter().any(|n| n == "nodes_failed"), "{names:?}");
}

#[test]
fn a_version_8_file_counts_the_nodes_its_live_sessions_hold() {
    use duffy_core::ClaimRefusal;
    use duffy_core::testkit::conformance::{add_ready, claim_ok, claim_req, pool7, release};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("duffy.db");
    let store = SqliteStore::open(&path, SqliteOptions::default()).expect("open");
    futures::executor::block_on(async {
        add_ready(&store, "n", 6, &pool7()).await;
        claim_ok(&store, claim_req("two", 1, "p", 2, Timestamp(5))).await;
        let ended = claim_ok(&store, claim_req("ended", 1, "p", 1, Timestamp(6))).await;
        release(&store, &ended.session.id, Timestamp(7)).await.expect("release");
        claim_ok(&store, claim_req("other", 2, "q", 1, Timestamp(8))).await;
    });
    drop(store);
    // Make it the file a version-8 build wrote: no node count.
    Connection::open(&path)
        .expect("raw")
        .execute_batch(&format!("{V10_DOWN} {V9_DOWN} PRAGMA user_version = 8;"))
        .expect("downgrade");
    let store = SqliteStore::open(&path, SqliteOptions::default()).expect("migrates");
    futures::executor::block_on(async {
        // p's live session holds 2 (the ended one nothing, q's is q's):
        // with a quota of 3, one more fits and two do not.
        let mut req = claim_req("over", 1, "p", 2, Timestamp(9));
        req.default_quota = Some(3);
        match store.claim(req).await.expect("store") {
            Err(ClaimRefusal::QuotaExceeded { held, requested, quota }) => {
                assert_eq!((held, requested, quota), (2, 2, 3))
            }
            other => panic!("expected the quota to refuse: {other:?}"),
        }
        let mut req = claim_req("fits", 1, "p", 1, Timestamp(10));
        req.default_quota = Some(3);
        claim_ok(&store, req).await;
    });
    drop(store);
    assert_eq!(pragma(&path, "user_version"), SCHEMA_VERSION);
}

#[test]
fn a_version_9_file_gets_install_tickets_keeping_its_nodes() {
    use duffy_core::tickets::{InstallTicket, Settle, TicketAccess, TicketId, TicketState, TokenHash};
    let (_dir, path, added) = file_with_nodes(vec![NewNode::new("n1.example", Arch::X86_64)]);
    // Make it the file a version-9 build wrote: no install tickets.
    Connection::open(&path)
        .expect("raw")
        .execute_batch(&format!("{V10_DOWN} PRAGMA user_version = 9;"))
        .expect("downgrade");
    let store = std::sync::Arc::new(SqliteStore::open(&path, SqliteOptions::default()).expect("migrates"));
    futures::executor::block_on(async {
        assert_eq!(store.nodes().await.expect("nodes"), added, "rows survive the migration");
        let tickets = store.clone().install_tickets().expect("tickets");
        let ip = std::net::IpAddr::from([10, 0, 0, 11]);
        let t = InstallTicket {
            id: TicketId("t1".into()),
            hostname: "n1.example".into(),
            ip,
            hardware_arch: Arch::X86_64,
            image: duffy_core::PoolKey::new("9", Arch::X86_64, None),
            expires_at: Timestamp(1000),
        };
        assert_eq!(tickets.register_ticket(t.clone()).await.expect("register"), None);
        let tok = TokenHash::of("token");
        let issued = tickets.issue_ticket_token("n1.example", &t.id, tok, ip, Timestamp(2)).await.expect("issue");
        assert_eq!(issued, TicketAccess::Granted(t.clone()));
        let polled = tickets.settle_ticket("n1.example", &t.id, Settle::Poll).await.expect("poll");
        assert_eq!(polled, Some(TicketState::Pending));
    });
    drop(store);
    assert_eq!(pragma(&path, "user_version"), SCHEMA_VERSION);
    let cols = column_names(&path, "install_tickets");
    assert!(cols.iter().any(|c| c == "ticket_id") && !cols.iter().any(|c| c == "token"), "{cols:?}");
}
