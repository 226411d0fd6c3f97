//! The `duffy-client` crate and the `duffy client` commands against a real
//! service (SQLite file, simulated farm, loopback socket): typed answers,
//! problems as typed errors, tables and `--json`, and the key only from
//! `DUFFY_KEY` or a private configuration file.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Output;

use common::{Setup, TestServer};
use duffy_client::wire::CreateSession;
use duffy_client::{Client, ClientError, ProblemType};

fn pool(p: &str, count: u32) -> CreateSession {
    CreateSession { pool: Some(p.into()), count: Some(count), ..CreateSession::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_speaks_every_session_call_and_types_its_errors() {
    let s = TestServer::start(Setup::default()).await;
    s.wait_pools_full().await;
    let key = s.key("alice", false, None).await;
    let c = Client::new(&s.base, &key).expect("client");

    let session = c.request_session(&pool("7/x86_64", 2), |_| {}).await.expect("session");
    assert_eq!((session.state.as_str(), session.hosts.len()), ("Prod", 2));
    assert_eq!(c.session(&session.id).await.expect("show"), session);
    assert_eq!(c.sessions().await.expect("list"), vec![session.clone()]);
    let pools = c.pools().await.expect("pools");
    assert!(pools.iter().any(|p| p.pool == "7/x86_64" && p.standby == 6), "{pools:?}");
    let nodes = c.nodes(Some("Deployed"), None).await.expect("nodes");
    assert_eq!(nodes.len(), 2);
    let detail = c.node(&session.hosts[0]).await.expect("node");
    assert_eq!(detail.node.session.as_deref(), Some(session.id.as_str()));
    let released = c.release(&session.id).await.expect("release");
    assert_eq!(released.state, "Done");

    // Problems come back typed.
    let e = c.release(&session.id).await.expect_err("released twice");
    assert_eq!(e.problem_type(), Some(ProblemType::Conflict), "{e}");
    let e = c.session("nope").await.expect_err("unknown");
    assert_eq!(e.problem_type(), Some(ProblemType::NotFound), "{e}");
    let e = c.request_session(&pool("9/x86_64", 1), |_| {}).await.expect_err("no pool");
    let ClientError::Problem(p) = &e else { panic!("{e}") };
    assert_eq!(p.kind(), Some(ProblemType::NoSuchPool));
    assert!(p.allowed.as_ref().unwrap().contains(&"7/x86_64".to_string()), "{p:?}");
    let e = c.request_session(&pool("7/x86_64", 7), |_| {}).await.expect_err("more than the pool");
    assert_eq!(e.problem_type(), Some(ProblemType::BadRequest), "{e}");
    let e = c.keys().await.expect_err("not admin");
    assert_eq!(e.problem_type(), Some(ProblemType::Forbidden), "{e}");
    let stranger = Client::new(&s.base, "not-a-key").expect("client");
    assert_eq!(stranger.sessions().await.expect_err("bad key").problem_type(), Some(ProblemType::Unauthorized));
    // Not Duffy at all: a legacy endpoint's page is not mistaken for an answer.
    let nothing = Client::new("http://127.0.0.1:9", &key).expect("client");
    assert!(matches!(nothing.sessions().await, Err(ClientError::Transport { .. })));

    // An admin key manages keys through the client too.
    let admin = Client::new(&s.base, &s.key("ops", true, None).await).expect("client");
    let created = admin
        .create_key(&duffy_client::wire::CreateKey { project: "bob".into(), ..Default::default() })
        .await
        .expect("create key");
    assert_eq!(created.record.project, "bob");
    assert!(admin.revoke_key(created.record.id).await.expect("revoke").revoked_at.is_some());
    let set = duffy_client::wire::SetProject { quota: Some(3), ssh_keys: None };
    assert_eq!(admin.set_project("bob", &set).await.expect("set project").quota, Some(3));
    assert_eq!(admin.project("bob").await.expect("project").quota, Some(3));
    let names: Vec<String> = admin.projects().await.expect("projects").into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["alice", "bob", "ops"]);
    assert!(admin.overtime().await.expect("overtime").is_empty());
    assert!(admin.pause().await.expect("pause").paused);
    assert!(!admin.resume().await.expect("resume").paused);
    assert_eq!(admin.set_admin("n12.sim.duffy").await.expect("set admin").state, "Reserved");
    assert_eq!(admin.recover("n12.sim.duffy").await.expect("recover").state, "Active");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_reports_a_short_pool_with_its_ready_count() {
    let s = TestServer::start(Setup { reconcile: false, ..Setup::default() }).await;
    let key = s.key("alice", false, None).await;
    let c = Client::new(&s.base, &key).expect("client");
    let req = CreateSession { wait: Some(false), ..pool("7/x86_64", 2) };
    let e = c.request_session(&req, |_| {}).await.expect_err("nothing Ready");
    let ClientError::Problem(p) = &e else { panic!("{e}") };
    assert_eq!((p.kind(), p.requested, p.ready), (Some(ProblemType::Insufficient), Some(2), Some(0)), "{p:?}");
    assert!(p.estimated_ready_in_secs.is_some(), "{p:?}");
    s.stop().await;
}

/// `duffy client ARGS` with `env` and nothing else of the environment
/// running the tests.
fn cli_command(env: &[(&str, &str)], args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_duffy"));
    cmd.arg("client").args(args).env_remove("DUFFY_KEY").env_remove("DUFFY_URL").env_remove("DUFFY_CONFIG");
    // No configuration file of the user running the tests.
    cmd.env("HOME", "/nonexistent").env_remove("XDG_CONFIG_HOME");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// [`cli_command`], run to completion off the runtime's threads (the
/// service runs on them).
async fn cli(env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = cli_command(env, args);
    tokio::task::spawn_blocking(move || cmd.output().expect("run duffy client")).await.expect("join")
}

/// A service whose 6/i386 pool (2 nodes, no spare machine: the targets
/// are 6 + 2 of 8) is held whole by a session of `alice`: a request for
/// it waits in the queue. Returns the service, alice's key, a client
/// with it, and the holding session.
async fn i386_pool_held() -> (TestServer, String, Client, duffy_client::wire::SessionView) {
    let s = TestServer::start(Setup { machines: 8, ..Setup::default() }).await;
    s.wait_pools_full().await;
    let key = s.key("alice", false, None).await;
    let c = Client::new(&s.base, &key).expect("client");
    let holder = c.request_session(&pool("6/i386", 2), |_| {}).await.expect("the whole i386 pool");
    (s, key, c, holder)
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    assert!(!o.status.success(), "succeeded: {}", String::from_utf8_lossy(&o.stdout));
    String::from_utf8(o.stderr.clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duffy_client_commands_against_a_real_service() {
    let s = TestServer::start(Setup::default()).await;
    s.wait_pools_full().await;
    let key = s.key("alice", false, None).await;
    let env = [("DUFFY_KEY", key.as_str()), ("DUFFY_URL", s.base.as_str())];

    let o = cli(&env, &["--json", "request-session", "--pool", "7/x86_64", "--count", "2"]).await;
    let session: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("JSON");
    let id = session["id"].as_str().unwrap().to_string();
    let hosts: Vec<String> = session["hosts"].as_array().unwrap().iter().map(|h| h.as_str().unwrap().into()).collect();
    assert_eq!(hosts.len(), 2);

    let table = stdout(&cli(&env, &["list"]).await);
    assert!(table.starts_with("session"), "{table}");
    assert!(table.contains(&id) && table.contains(&hosts[0]), "{table}");
    let shown = stdout(&cli(&env, &["show", &id]).await);
    assert!(shown.contains(&format!("session   {id}")) && shown.contains("state     Prod"), "{shown}");
    let json_list: serde_json::Value = serde_json::from_str(&stdout(&cli(&env, &["list", "--json"]).await)).unwrap();
    assert_eq!(json_list[0]["id"], id.as_str());
    let pools = stdout(&cli(&env, &["pools"]).await);
    assert!(pools.lines().any(|l| l.starts_with("7/x86_64")), "{pools}");
    let released = stdout(&cli(&env, &["release", &id]).await);
    assert!(released.starts_with(&format!("released {id}")), "{released}");
    let err = stderr(&cli(&env, &["release", &id]).await);
    assert!(err.contains("Conflict") && err.contains("Done"), "{err}");

    let o = cli(&env, &["--json", "request-session", "--release", "7", "--arch", "x86_64", "--lifetime", "30m"]).await;
    let second: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let extended = stdout(&cli(&env, &["--json", "extend", second["id"].as_str().unwrap(), "--by", "10m"]).await);
    let extended: serde_json::Value = serde_json::from_str(&extended).unwrap();
    let ts = |v: &serde_json::Value| v.as_str().unwrap().parse::<duffy_core::Timestamp>().unwrap().0;
    assert_eq!(ts(&extended["expires_at"]) - ts(&second["expires_at"]), 600_000, "{extended}");
    let err = stderr(&cli(&env, &["extend", second["id"].as_str().unwrap(), "--by", "7h"]).await);
    assert!(err.contains("Bad request") && err.contains("max"), "{err}");
    let failed = stdout(&cli(&env, &["fail", second["id"].as_str().unwrap()]).await);
    assert!(failed.contains("nodes held until"), "{failed}");

    // Errors say what is wrong.
    let err = stderr(&cli(&env, &["request-session", "--pool", "9/x86_64", "--no-wait"]).await);
    assert!(err.contains("No such pool") && err.contains("7/x86_64"), "{err}");
    let err = stderr(&cli(&env, &["show", "nope"]).await);
    assert!(err.contains("Not found"), "{err}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_comes_from_the_environment_or_a_private_file_only() {
    let s = TestServer::start(Setup { reconcile: false, ..Setup::default() }).await;
    let key = s.key("alice", false, None).await;

    // No key anywhere: a clear error, and no flag to give one.
    let err = stderr(&cli(&[("DUFFY_URL", &s.base)], &["list"]).await);
    assert!(err.contains("no API key") && err.contains("DUFFY_KEY"), "{err}");
    let err = stderr(&cli(&[("DUFFY_URL", &s.base)], &["--key", &key, "list"]).await);
    assert!(err.contains("unexpected argument '--key'"), "{err}");

    // A configuration file: refused while others can read it.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("client.toml");
    std::fs::write(&file, format!("url = \"{}\"\nkey = \"{key}\"\n", s.base)).unwrap();
    let path = file.to_str().unwrap();
    for mode in [0o644, 0o640, 0o604] {
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        let err = stderr(&cli(&[], &["--config", path, "list"]).await);
        assert!(err.contains("readable by others") && err.contains("chmod 600"), "{mode:o}: {err}");
        let err = stderr(&cli(&[("DUFFY_CONFIG", path)], &["list"]).await);
        assert!(err.contains("readable by others"), "{mode:o}: {err}");
    }
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(stdout(&cli(&[], &["--config", path, "--json", "list"]).await).trim(), "[]");
    assert_eq!(stdout(&cli(&[("DUFFY_CONFIG", path)], &["--json", "list"]).await).trim(), "[]");
    // The default place, under XDG_CONFIG_HOME.
    std::fs::create_dir_all(dir.path().join("duffy")).unwrap();
    std::fs::rename(&file, dir.path().join("duffy/client.toml")).unwrap();
    let xdg = dir.path().to_str().unwrap();
    assert_eq!(stdout(&cli(&[("XDG_CONFIG_HOME", xdg)], &["--json", "list"]).await).trim(), "[]");
    // A file with a setting it does not know says which ones it knows.
    std::fs::write(dir.path().join("duffy/client.toml"), "secret = \"x\"\n").unwrap();
    let err = stderr(&cli(&[("XDG_CONFIG_HOME", xdg)], &["list"]).await);
    assert!(err.contains("allowed settings: url, key"), "{err}");
    // A wrong key from the environment is refused by the service.
    let err = stderr(&cli(&[("DUFFY_URL", &s.base), ("DUFFY_KEY", "wrong")], &["list"]).await);
    assert!(err.contains("Missing or invalid API key"), "{err}");
    s.stop().await;
}

/// `examples/jenkins_job_v1.sh` against the service: passing tests
/// release the nodes, failing tests keep them for debugging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_job_script_gets_runs_and_hands_back() {
    let s = TestServer::start(Setup::default()).await;
    s.wait_pools_full().await;
    let key = s.key("jenkins", false, None).await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/jenkins_job_v1.sh");
    let job = |run: &str| {
        let mut cmd = std::process::Command::new("bash");
        cmd.arg(&script)
            .args(["--pool", "7/x86_64", "--count", "2", "--run", run])
            .env("DUFFY", env!("CARGO_BIN_EXE_duffy"))
            .env("DUFFY_KEY", &key)
            .env("DUFFY_URL", &s.base)
            .env_remove("DUFFY_CONFIG");
        tokio::task::spawn_blocking(move || {
            let o = cmd.output().expect("bash runs the job script");
            (
                o.status.success(),
                format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
            )
        })
    };
    let (ok, out) = job("test -n {host}").await.unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("+ test -n n") && out.contains("tests passed; nodes released"), "{out}");
    assert!(s.store.live_sessions().await.unwrap().is_empty(), "{out}");

    let (ok, out) = job("false").await.unwrap();
    assert!(!ok, "{out}");
    assert!(out.contains("tests failed; nodes kept for debugging"), "{out}");
    let live = s.store.live_sessions().await.unwrap();
    assert_eq!((live.len(), live[0].state), (1, duffy_core::SessionState::Fail), "{out}");
    s.stop().await;
}

/// `request-session` waits in the queue with a progress line and returns
/// the session once the pool has nodes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_session_waits_in_the_queue_with_progress() {
    let (s, key, c, holder) = i386_pool_held().await;
    let env = [("DUFFY_KEY", key.as_str()), ("DUFFY_URL", s.base.as_str())];
    let waiting = tokio::spawn({
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        async move {
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            cli(&env, &["--json", "request-session", "--pool", "6/i386"]).await
        }
    });
    // Release once the request is queued.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while c.pools().await.expect("pools").iter().all(|p| p.waiting == 0) {
        assert!(std::time::Instant::now() < deadline, "the request was not queued");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // A second request waits behind it; its owner can see and cancel it.
    let queued = match c.create_session(&CreateSession { wait: Some(true), ..pool("6/i386", 1) }).await {
        Ok(duffy_client::wire::Created::Queued(q)) => q,
        other => panic!("queued: {other:?}"),
    };
    let status = c.queued(&queued.id).await.expect("status");
    assert_eq!((status.state.as_str(), status.position), ("waiting", Some(2)), "{status:?}");
    assert_eq!(c.cancel_request(&queued.id).await.expect("cancel").state, "cancelled");
    c.release(&holder.id).await.expect("release");
    let o = tokio::time::timeout(std::time::Duration::from_secs(60), waiting).await.expect("served").expect("join");
    let session: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("JSON");
    assert_eq!((session["state"].as_str(), session["pool"].as_str()), (Some("Prod"), Some("6/i386")), "{session}");
    let progress = String::from_utf8_lossy(&o.stderr);
    assert!(progress.contains("waiting for 1 node(s) of 6/i386"), "{progress}");
    s.stop().await;
}

/// Waits until the service shows `n` requests waiting in its pools.
async fn until_waiting(c: &Client, n: u32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while c.pools().await.expect("pools").iter().map(|p| p.waiting).sum::<u32>() != n {
        assert!(std::time::Instant::now() < deadline, "never {n} requests waiting");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_request_is_cancelled_and_no_session_comes_of_it() {
    let (s, _, c, holder) = i386_pool_held().await;
    // Stopped once the request waits in the queue.
    let watcher = c.clone();
    let req = CreateSession { wait: Some(true), ..pool("6/i386", 1) };
    let e = c.request_session_until(&req, |_| {}, until_waiting(&watcher, 1)).await.expect_err("stopped");
    let ClientError::Interrupted(duffy_client::Interrupted::RequestCancelled { id }) = &e else { panic!("{e:?}") };
    assert_eq!(c.queued(id).await.expect("status").state, "cancelled");
    until_waiting(&c, 0).await;
    // Nodes freed now are not handed to the cancelled request.
    c.release(&holder.id).await.expect("release");
    s.wait_pools_full().await;
    assert!(c.sessions().await.expect("list").is_empty());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_stopped_as_it_is_served_releases_its_session() {
    let s = TestServer::start(Setup::default()).await;
    s.wait_pools_full().await;
    let key = s.key("alice", false, None).await;
    let c = Client::new(&s.base, &key).expect("client");
    // Stopped from the start: the creation is not abandoned halfway, and
    // the session it answers with is handed back.
    let e = c.request_session_until(&pool("7/x86_64", 2), |_| {}, std::future::ready(())).await.expect_err("stopped");
    let ClientError::Interrupted(duffy_client::Interrupted::SessionReleased { id }) = &e else { panic!("{e:?}") };
    assert_eq!(c.session(id).await.expect("the session").state, "Done");
    assert!(c.sessions().await.expect("list").is_empty());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_on_a_waiting_request_session_cancels_it() {
    let (s, key, c, holder) = i386_pool_held().await;
    let env = [("DUFFY_KEY", key.as_str()), ("DUFFY_URL", s.base.as_str())];
    let child = cli_command(&env, &["request-session", "--pool", "6/i386"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start duffy client");
    until_waiting(&c, 1).await;
    let pid = child.id().to_string();
    let killed = std::process::Command::new("kill").args(["-INT", &pid]).status().expect("kill");
    assert!(killed.success());
    let o = tokio::task::spawn_blocking(move || child.wait_with_output().expect("wait")).await.expect("join");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted: request") && err.contains("cancelled"), "{err}");
    until_waiting(&c, 0).await;
    c.release(&holder.id).await.expect("release");
    s.wait_pools_full().await;
    assert!(c.sessions().await.expect("list").is_empty());
    s.stop().await;
}
