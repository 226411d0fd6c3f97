//! The operator commands against a real database file.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::process::Output;

use duffy_testsupport::duffy;

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
        out(&duffy!().run(&db, &["node", "add", "n1.example.org", "--ip", "10.0.0.1"])).trim(),
        "added n1.example.org (id 1, Active)"
    );
    let file = dir.path().join("nodes.toml");
    std::fs::write(&file, "[[nodes]]\nhostname = \"n1.example.org\"\n[[nodes]]\nhostname = \"n2.example.org\"\narch = \"aarch64\"\nflavor = \"tiny\"\n").unwrap();
    assert_eq!(
        out(&duffy!().run(&db, &["node", "import", file.to_str().unwrap()])).trim(),
        "added 1 nodes, 1 already present"
    );
    let list = out(&duffy!().run(&db, &["node", "list"]));
    assert!(list.contains("n2.example.org") && list.contains("aarch64"), "{list}");
    assert_eq!(
        out(&duffy!().run(&db, &["pool", "set", "9", "aarch64", "--standby", "2"])).trim(),
        "pool 9/aarch64/tiny: standby 2"
    );

    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("# the team\n{KEY}\n\n")).unwrap();
    assert_eq!(
        out(&duffy!().run(&db, &["project", "set", "ci", "--quota", "4", "--ssh-keys", keys.to_str().unwrap()])).trim(),
        "project ci: quota 4, 1 SSH keys"
    );
    let show = out(&duffy!().run(&db, &["project", "show", "ci"]));
    assert!(show.contains("quota 4") && show.contains("alice@laptop"), "{show}");
    // A key with an injected second line is refused with its line number, and nothing changes.
    std::fs::write(&keys, format!("{KEY}\nssh-ed25519 not$base64\n")).unwrap();
    let bad = duffy!().run(&db, &["project", "set", "ci", "--ssh-keys", keys.to_str().unwrap()]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains(":2:"), "{}", String::from_utf8_lossy(&bad.stderr));
    assert!(out(&duffy!().run(&db, &["project", "show", "ci"])).contains("alice@laptop"));
    out(&duffy!().run(&db, &["project", "set", "batch"]));
    assert_eq!(
        out(&duffy!().run(&db, &["project", "list"])),
        "batch\tquota none\t0 SSH keys\nci\tquota 4\t1 SSH keys\n",
        "every project by name"
    );
    // Keys: printed alone, usable, refused for bad project names.
    let key = out(&duffy!().run(&db, &["key", "create", "--project", "ci", "--admin"]));
    assert_eq!(key.trim().len(), 36);
    let bad = duffy!().run(&db, &["key", "create", "--project", "no spaces"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("invalid project name"));
    let bad = duffy!().run(&db, &["node", "add", "-bad-"]);
    assert!(!bad.status.success());
}

#[test]
fn read_only_commands_refuse_a_missing_database_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("dufy.db");
    for args in [
        &["node", "list"][..],
        &["project", "show", "ci"],
        &["project", "list"],
        &["key", "list"],
        &["key", "revoke", "1"],
    ] {
        let o = duffy!().run(&typo, args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success(),
            "{args:?} succeeded on a missing database: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        assert!(err.contains("no database at") && err.contains("dufy.db") && err.contains("--db"), "{args:?}: {err}");
        assert!(!typo.exists(), "{args:?} created the file");
    }
    // Commands that add things create it.
    out(&duffy!().run(&typo, &["project", "set", "ci"]));
    assert!(out(&duffy!().run(&typo, &["project", "show", "ci"])).contains("project ci"));
}

#[test]
fn keys_are_listed_expire_and_are_revoked_without_a_service() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("duffy.db");
    let k1 = out(&duffy!().run(&db, &["key", "create", "--project", "ci", "--expires", "90d"]));
    out(&duffy!().run(&db, &["key", "create", "--project", "qa", "--admin"]));
    let list = out(&duffy!().run(&db, &["key", "list"]));
    let rows: Vec<Vec<&str>> = list.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 2, "{list}");
    // id, project, admin, created, expires, last used, revoked
    assert_eq!((rows[0][0], rows[0][1], rows[0][2], rows[0][5], rows[0][6]), ("1", "ci", "no", "-", "-"), "{list}");
    assert!(rows[0][4] > rows[0][3] && rows[0][4].ends_with('Z'), "{list}");
    assert_eq!((rows[1][1], rows[1][2], rows[1][4]), ("qa", "yes", "-"), "{list}");
    assert!(!list.contains(k1.trim()), "{list}");
    assert_eq!(out(&duffy!().run(&db, &["key", "list", "--project", "qa"])).lines().count(), 2);
    assert_eq!(out(&duffy!().run(&db, &["key", "revoke", "1"])).trim(), "revoked key 1 (project ci)");
    assert!(out(&duffy!().run(&db, &["key", "revoke", "1"])).contains("was already revoked at"));
    let list = out(&duffy!().run(&db, &["key", "list", "--project", "ci"]));
    assert!(
        list.lines().nth(1).is_some_and(|l| l.split_whitespace().nth(6).is_some_and(|r| r.ends_with('Z'))),
        "{list}"
    );
    for bad in ["0s", "soon", "500ms"] {
        let o = duffy!().run(&db, &["key", "create", "--project", "ci", "--expires", bad]);
        assert!(!o.status.success(), "--expires {bad} accepted");
        assert!(String::from_utf8_lossy(&o.stderr).contains("--expires"), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(out(&duffy!().run(&db, &["key", "list"])).lines().count(), 3, "the refused keys were not made");
}
