//! `duffy node power` through the node's configured BMC: real IPMI packets
//! to an `ipmi_sim` BMC.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::process::Output;

use duffy_testsupport::duffy;
use duffy_testsupport::rig::Rig;

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn node_power_goes_through_the_configured_bmc() {
    let rig = Rig::start(2);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("duffy.db");
    let pw = dir.path().join("bmc-password");
    let (b0, b1) = (rig.bmc(0), rig.bmc(1));
    std::fs::write(&pw, format!("{}\n", b0.password)).unwrap();
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let cfg = dir.path().join("duffy.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
database = "{db}"
[installer]
kind = "command"
program = "/bin/true"
[hardware]
kind = "ipmi"
[hardware.defaults]
timeout = "1s"
retries = 1
[[hardware.bmc]]
node = "node0.rig.test"
address = "127.0.0.1"
port = {p0}
username = "{u0}"
password_file = "{pw}"
[[hardware.bmc]]
node = "node1.rig.test"
address = "127.0.0.1"
port = {p1}
username = "{u1}"
password = "{pass1}"
driver = "ipmitool"
"#,
            db = db.display(),
            p0 = b0.port,
            u0 = b0.username,
            pw = pw.display(),
            p1 = b1.port,
            u1 = b1.username,
            pass1 = b1.password,
        ),
    )
    .unwrap();
    for i in 0..2 {
        let o =
            duffy!().run(&db, &["node", "add", &Rig::hostname(i), "--bmc", &format!("127.0.0.1:{}", rig.bmc(i).port)]);
        assert!(o.status.success(), "{}", text(&o));
    }
    let cfg = cfg.to_str().unwrap();
    for (i, driver) in [(0, "native"), (1, "ipmitool")] {
        let host = Rig::hostname(i);
        let run = |action: &str| {
            let o = duffy!().run(&db, &["node", "power", &host, action, "--config", cfg]);
            let t = text(&o);
            assert!(!t.contains(&rig.bmc(i).password), "a password leaked: {t}");
            (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned())
        };
        assert_eq!(run("status"), (true, format!("{host}: power off\n")), "{driver}");
        assert!(run("on").0);
        assert_eq!(rig.bmc(i).power(), "1", "{driver}");
        assert_eq!(run("status").1, format!("{host}: power on\n"));
        assert!(run("pxe").0);
        assert_eq!(rig.bmc(i).boot(), "pxe", "{driver}");
        assert!(run("cycle").0);
        assert!(run("off").0);
        assert_eq!(rig.bmc(i).power(), "0", "{driver}");
    }
    // A node without a BMC entry, and one not in the store.
    let o = duffy!().run(&db, &["node", "power", "nowhere.example", "status", "--config", cfg]);
    assert!(!o.status.success() && text(&o).contains("no [[hardware.bmc]] entry"), "{}", text(&o));
    // A simulated farm has no BMCs.
    let sim = dir.path().join("sim.toml");
    std::fs::write(&sim, "[hardware]\nkind = \"simulated\"\n").unwrap();
    let o = duffy!().run(&db, &["node", "power", &Rig::hostname(0), "status", "--config", sim.to_str().unwrap()]);
    assert!(!o.status.success() && text(&o).contains("needs kind = \"ipmi\""), "{}", text(&o));
    // A wrong password is reported as an authentication failure, without the password.
    std::fs::write(&pw, "wrong-password\n").unwrap();
    let o = duffy!().run(&db, &["node", "power", &Rig::hostname(0), "status", "--config", cfg]);
    let t = text(&o);
    assert!(!o.status.success() && t.contains("AuthFailed") && !t.contains("wrong-password"), "{t}");
}
