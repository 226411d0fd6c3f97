//! End to end with the real legacy client: `cico` (python-cicoclient 0.4.7,
//! installed in `.venv` by `scripts/install-test-deps.sh`) against
//! `duffy serve` on its embedded default.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::process::Output;
use std::time::Duration;

use duffy_testsupport::duffy;
use duffy_testsupport::service::cico;

fn ok(o: &Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "cico failed: {}\n{}", out, String::from_utf8_lossy(&o.stderr));
    out
}

#[test]
fn cico_against_the_embedded_default() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("duffy.db");
    // A key before the server starts, as an operator would.
    let out = duffy!().run(&db, &["key", "create", "--project", "ci-project"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(key.len(), 36, "the key alone on stdout: {key:?}");
    let server = duffy!().serve(&db).start();
    // The embedded default fills its pools within a minute.
    server.wait_ready("7", 4, Duration::from_secs(90));
    let port = server.port();

    let inv = ok(&cico(port, &key, &["inventory", "--all"]));
    assert!(inv.contains("n1.sim.duffy") && inv.contains("Ready"), "{inv}");

    // node get --count 2: the comment column shows the ssid.
    let got = ok(&cico(port, &key, &["node", "get", "--count", "2", "-f", "json"]));
    let rows: Vec<serde_json::Value> = serde_json::from_str(&got).unwrap_or_else(|e| panic!("{e}: {got}"));
    assert_eq!(rows.len(), 2, "{got}");
    let ssid = rows[0]["comment"].as_str().expect("ssid in the comment column").to_string();
    assert!(rows.iter().all(|r| r["comment"] == ssid.as_str() && r["current_state"] == "Deployed"), "{got}");
    let table = ok(&cico(port, &key, &["inventory"]));
    assert!(table.contains(&ssid), "the default table shows the ssid: {table}");

    let mine = ok(&cico(port, &key, &["inventory", "--ssid", &ssid, "-f", "json"]));
    let mine: Vec<serde_json::Value> = serde_json::from_str(&mine).unwrap();
    assert_eq!(mine.len(), 2);

    let done = ok(&cico(port, &key, &["node", "done", &ssid, "-f", "json"]));
    let done: Vec<serde_json::Value> = serde_json::from_str(&done).unwrap();
    assert_eq!(done.len(), 2, "cico lists the released hosts");
    let after = ok(&cico(port, &key, &["inventory", "--ssid", &ssid, "-f", "json"]));
    assert_eq!(serde_json::from_str::<Vec<serde_json::Value>>(&after).unwrap().len(), 0);

    // An unknown key: cico fails, and nothing is allocated.
    let bad = cico(port, "00000000-0000-4000-8000-000000000000", &["node", "get", "--retry-interval", "0"]);
    assert!(!bad.status.success(), "an unknown key must fail: {}", String::from_utf8_lossy(&bad.stdout));
    assert_eq!(server.count("Deployed"), 0, "nothing deployed after the bad key");

    // Stops cleanly on SIGTERM.
    server.stop();
}
