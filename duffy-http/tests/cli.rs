//! The operator commands against a real database file.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::process::{Command, Output};

fn duffy(db: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_duffy")).arg("--db").arg(db).args(args).output().expect("run duffy")
}

fn out(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone()).unwrap()
}

const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIByrgFoRodMpGoIGtVxnK/CTnXeEUb1KLNez/P0VJgK+ alice@laptop";

#[test]
fn nodes_pools_projects_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("duffy.db");
    assert_eq!(
        out(&duffy(&db, &["node", "add", "n1.example.org", "--ip", "10.0.0.1"])).trim(),
        "added n1.example.org (id 1, Active)"
    );
    let file = dir.path().join("nodes.toml");
    std::fs::write(&file, "[[nodes]]\nhostname = \"n1.example.org\"\n[[nodes]]\nhostname = \"n2.example.org\"\narch = \"aarch64\"\nflavor = \"tiny\"\n").unwrap();
    assert_eq!(
        out(&duffy(&db, &["node", "import", file.to_str().unwrap()])).trim(),
        "added 1 nodes, 1 already present"
    );
    let list = out(&duffy(&db, &["node", "list"]));
    assert!(list.contains("n2.example.org") && list.contains("aarch64"), "{list}");
    assert_eq!(
        out(&duffy(&db, &["pool", "set", "9", "aarch64", "--standby", "2"])).trim(),
        "pool 9/aarch64/tiny: standby 2"
    );

    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("# the team\n{KEY}\n\n")).unwrap();
    assert_eq!(
        out(&duffy(&db, &["project", "set", "ci", "--quota", "4", "--ssh-keys", keys.to_str().unwrap()])).trim(),
        "project ci: quota 4, 1 SSH keys"
    );
    let show = out(&duffy(&db, &["project", "show", "ci"]));
    assert!(show.contains("quota 4") && show.contains("alice@laptop"), "{show}");
    // A key with an injected second line is refused with its line number, and nothing changes.
    std::fs::write(&keys, format!("{KEY}\nssh-ed25519 not$base64\n")).unwrap();
    let bad = duffy(&db, &["project", "set", "ci", "--ssh-keys", keys.to_str().unwrap()]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains(":2:"), "{}", String::from_utf8_lossy(&bad.stderr));
    assert!(out(&duffy(&db, &["project", "show", "ci"])).contains("alice@laptop"));
    // Keys: printed alone, usable, refused for bad project names.
    let key = out(&duffy(&db, &["key", "create", "--project", "ci", "--admin"]));
    assert_eq!(key.trim().len(), 36);
    let bad = duffy(&db, &["key", "create", "--project", "no spaces"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("invalid project name"));
    let bad = duffy(&db, &["node", "add", "-bad-"]);
    assert!(!bad.status.success());
}
