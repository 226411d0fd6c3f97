//! PXE installs with two `duffy serve` replicas on one PostgreSQL
//! database, as real processes over real sockets: the leader (which runs
//! the reconciler and waits for the installs) registers them, and the
//! machines' requests — boot script, kickstart, done report — go to the
//! replica that does NOT lead. The installs' tickets live in the
//! database, so that replica answers them and the leader learns the
//! outcome from there: the nodes end Ready with the host keys the machines
//! reported.
//!
//! The machines are played by the test, from their own loopback
//! addresses (127.0.0.2 and 127.0.0.3; Linux routes all of 127/8 to
//! `lo`); their BMCs are `ipmi_sim`, which power them on and nothing else.
//! Node 0 fetches everything from the non-leader; node 1 gets its boot
//! script (and so its token) from the leader and its kickstart and report
//! go to the non-leader: a token one replica issued works on the other.
//! A request from another address than the node's, sent to the
//! non-leader, changes nothing. The database never holds a token, only
//! its SHA-256.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod replica_common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use duffy_testsupport::rig::Rig;
use replica_common::{Replica, Sql, database, serial, wait_until, write};

/// A machine's SSH host key, as its `.pub` file holds it.
const HOST_KEY: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBEcbTzXQ2o4dsaenJU4FAX6E36s81FO7Dgmyh87F2vtByzhlkoZW1TXMxVo0KA2d5aCzif5RzNwrsrWxAYDD9n8=";

/// The nodes' addresses: where their requests come from.
const NODE_IPS: [Ipv4Addr; 2] = [Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3)];
/// Another address on the same network.
const STRANGER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

fn config(url: &str, rig: &Rig) -> String {
    let mut bmcs = String::new();
    let mut nodes = String::new();
    for (i, ip) in NODE_IPS.iter().enumerate() {
        let b = rig.bmc(i);
        bmcs.push_str(&format!(
            "[[hardware.bmc]]\nnode = \"{}\"\naddress = \"127.0.0.1\"\nport = {}\nusername = \"{}\"\npassword = \"{}\"\n\n",
            Rig::hostname(i),
            b.port,
            b.username,
            b.password
        ));
        nodes.push_str(&format!("[[nodes]]\nhostname = \"{}\"\nip = \"{ip}\"\n\n", Rig::hostname(i)));
    }
    format!(
        r#"database = "{url}"

[policy]
rate_limit = "off"
power_check_interval = "off"
tick = 1
install_timeout = 120
install_attempts = 1

[[pools]]
release = "7"
arch = "x86_64"
standby = {standby}

[hardware]
kind = "ipmi"
[hardware.defaults]
timeout = "1s"
retries = 1

{bmcs}
[installer]
kind = "pxe"
public_url = "http://127.0.0.1:1"
token_ttl = "120s"
provisioning_public_key = "{key}"

{nodes}
[postgres]
pool_size = 8
"#,
        standby = NODE_IPS.len(),
        key = duffy_testsupport::sshd::OPERATOR_LINE,
    )
}

/// GET `path` on `port` of 127.0.0.1, from `from`: (status, body).
fn get(from: Ipv4Addr, port: u16, path: &str, query: &[(&str, &str)]) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .local_address(IpAddr::V4(from))
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}{path}");
        let r = client.get(&url).query(query).send().await.unwrap_or_else(|e| panic!("{url} from {from}: {e}"));
        (r.status().as_u16(), r.text().await.unwrap())
    })
}

/// The token in a boot script's kickstart URL.
fn token_of(script: &str) -> Option<String> {
    let at = script.find("/Install/kickstart?token=")? + "/Install/kickstart?token=".len();
    Some(script[at..].chars().take_while(char::is_ascii_hexdigit).collect())
}

/// The boot script of node `i` from the replica on `port`, once the
/// leader has registered its install (until then, and on any replica that
/// cannot see the install, the script boots from disk and has no token).
fn boot_script(i: usize, port: u16) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, script) = get(NODE_IPS[i], port, "/Install/ipxe", &[("host", &Rig::hostname(i))]);
        assert_eq!(status, 200, "{script}");
        if let Some(token) = token_of(&script) {
            assert_eq!(token.len(), 64, "{script}");
            return (script, token);
        }
        assert!(
            Instant::now() < deadline,
            "the replica on port {port} never served node {i} its install's boot script; it answers:\n{script}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn node_row(sql: &Sql, i: usize) -> (String, Option<String>) {
    let r = &sql.query("SELECT state, host_key FROM nodes WHERE hostname = $1", &[&Rig::hostname(i)])[0];
    (r.get(0), r.get(1))
}

#[test]
fn install_callbacks_reach_a_replica_that_does_not_lead() {
    let _serial = serial();
    let rig = Rig::start(NODE_IPS.len());
    let db = database();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "duffy.toml", &config(&db.url, &rig));
    let sql = Sql::connect(&db.url);
    // The first replica leads; the second starts once it does, and does not.
    let leader = Replica::start(&cfg, dir.path().join("leader.log"));
    wait_until(Duration::from_secs(30), "the first replica leads", || sql.leader_pid() == Some(leader.pid() as i32));
    let other = Replica::start(&cfg, dir.path().join("other.log"));
    assert_eq!(sql.leader_pid(), Some(leader.pid() as i32), "the first replica still leads");
    let (lp, op) = (leader.port, other.port);

    // Node 0: everything from the replica that does not lead.
    let (script, token) = boot_script(0, op);
    assert!(script.contains("/centos/7/os/x86_64/"), "{script}");
    // Fetching it again from there gives the same script.
    let again = get(NODE_IPS[0], op, "/Install/ipxe", &[("host", &Rig::hostname(0))]);
    assert_eq!(again, (200, script.clone()));
    let (status, ks) = get(NODE_IPS[0], op, "/Install/kickstart", &[("token", &token)]);
    assert_eq!(status, 200, "{ks}");
    assert!(ks.contains(&format!("/Install/done?token={token}")), "{ks}");
    // The database holds the token's SHA-256, and nowhere the token.
    let hashed =
        sql.query("SELECT count(*) FROM install_ticket_tokens WHERE hash = sha256(convert_to($1, 'UTF8'))", &[&token]);
    assert_eq!(hashed[0].get::<_, i64>(0), 1, "the token's hash is stored");
    let clear = sql.query(
        "SELECT (SELECT count(*) FROM install_tickets x WHERE strpos(x::text, $1) > 0) \
              + (SELECT count(*) FROM install_ticket_tokens k \
                 WHERE strpos(k::text, $1) > 0 OR k.hash = convert_to($1, 'UTF8'))",
        &[&token],
    );
    assert_eq!(clear[0].get::<_, i64>(0), 0, "a token is stored in the clear");
    // A stranger with the token: refused as an unknown token, and
    // nothing changes (checked below: the real report still works).
    let forged = get(STRANGER, op, "/Install/done", &[("token", &token), ("host_key", HOST_KEY)]);
    assert_eq!(forged.0, 404, "{forged:?}");
    assert_eq!(node_row(&sql, 0).0, "Provisioning");
    let (status, body) =
        get(NODE_IPS[0], op, "/Install/done", &[("token", &token), ("host_key", &format!("{HOST_KEY} root@n0"))]);
    assert_eq!((status, body.as_str()), (200, "OK\n"));

    // Node 1: boot script from the leader, the rest from the other.
    let (_, token1) = boot_script(1, lp);
    let (status, ks) = get(NODE_IPS[1], op, "/Install/kickstart", &[("token", &token1)]);
    assert_eq!(status, 200, "a token the leader issued, used on the other replica: {ks}");
    let (status, body) = get(NODE_IPS[1], op, "/Install/done", &[("token", &token1), ("host_key", HOST_KEY)]);
    assert_eq!((status, body.as_str()), (200, "OK\n"));
    // Single use, on either replica.
    for port in [op, lp] {
        let (status, _) = get(NODE_IPS[1], port, "/Install/done", &[("token", &token1), ("host_key", HOST_KEY)]);
        assert_eq!(status, 404);
    }

    // The leader learns both outcomes from the database: both nodes Ready
    // with their host keys, and the tickets gone.
    wait_until(Duration::from_secs(30), "both nodes Ready", || {
        (0..NODE_IPS.len()).all(|i| node_row(&sql, i).0 == "Ready")
    });
    for i in 0..NODE_IPS.len() {
        assert_eq!(node_row(&sql, i), ("Ready".to_string(), Some(HOST_KEY.to_string())), "node {i}");
    }
    wait_until(Duration::from_secs(10), "the tickets are gone", || {
        sql.one_i64("SELECT count(*) FROM install_tickets") == 0
    });
    assert_eq!(sql.leader_pid(), Some(leader.pid() as i32), "the same replica led throughout");
    drop((leader, other));
}
