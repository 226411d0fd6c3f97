//! schemathesis against a real `duffy serve`: every `/api/v1` operation
//! its OpenAPI document describes, with generated valid and invalid
//! input. No answer may be a server error (5xx) or disagree with the
//! document (body schema, status code, content type). Bounded: a few
//! examples per operation, no stateful phase, and a deadline.
//!
//! schemathesis comes from PyPI into `.venv` (scripts/install-test-deps.sh);
//! without it the test fails, naming how to install it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use duffy_testsupport::{duffy, schemathesis_path};

/// The longest one schemathesis run may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(240);

fn schemathesis(dir: &std::path::Path, port: u16, key: &str, select: &[&str]) -> (bool, String) {
    let mut child = Command::new(schemathesis_path())
        .current_dir(dir)
        .arg("run")
        .arg(format!("http://127.0.0.1:{port}/api/v1/openapi.json"))
        .args(["--header", &format!("Authorization: Bearer {key}")])
        .args([
            "--checks",
            "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance",
        ])
        .args(["--phases", "examples,coverage,fuzzing", "--max-examples", "8", "--workers", "2"])
        .args(["--seed", "1", "--no-color"])
        .args(select)
        .env("SCHEMATHESIS_HOOKS", "")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("st.out")).unwrap())
        .stderr(std::fs::File::create(dir.join("st.err")).unwrap())
        .spawn()
        .expect("run schemathesis");
    let started = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for schemathesis") {
            break st;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("schemathesis did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = std::fs::read_to_string(dir.join("st.out")).unwrap_or_default()
        + &std::fs::read_to_string(dir.join("st.err")).unwrap_or_default();
    (status.success(), out)
}

#[test]
fn api_v1_conforms_to_its_openapi_document() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("duffy.db");
    let out = duffy!().run(&db, &["key", "create", "--project", "ops", "--admin"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let server = duffy!().serve(&db).start();

    // Everything but revoking keys first: schemathesis would revoke its
    // own key (id 1) and test the rest unauthenticated.
    let (ok, out) = schemathesis(dir.path(), server.port(), &key, &["--exclude-operation-id", "revoke"]);
    assert!(ok, "schemathesis found problems:\n{out}\n--- service log ---\n{}", server.log_tail(40));
    assert!(out.contains("Tested: 21"), "every other operation was tested:\n{out}");
    let (ok, out) = schemathesis(dir.path(), server.port(), &key, &["--include-operation-id", "revoke"]);
    assert!(ok, "schemathesis found problems:\n{out}\n--- service log ---\n{}", server.log_tail(40));
    assert!(out.contains("Tested: 1"), "key revocation was tested:\n{out}");
    let log = server.log();
    assert!(!log.contains("panicked"), "{log}");
}
