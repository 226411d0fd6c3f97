//! The dashboard in a real browser: headless Chromium, driven through
//! chromedriver (WebDriver, with fantoccini), against a real `duffy serve`
//! child on its embedded default farm. Both come from Debian's `chromium`
//! and `chromium-driver` (`scripts/install-test-deps.sh`); without them the
//! test fails, saying what to install.
//!
//! Screenshots of every page go to `target/ui-screenshots/`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use axum::http::Method;
use duffy_testsupport::duffy;
use duffy_testsupport::service::Service;
use duffy_testsupport::{free_port, require};
use fantoccini::actions::{InputSource, KeyAction, KeyActions};
use fantoccini::key::Key;
use fantoccini::wd::{Capabilities, WebDriverCompatibleCommand};
use fantoccini::{Client, ClientBuilder, Locator};
use reqwest::Url;
use serde_json::{Value, json};

/// A chromedriver child on a free port; killed and reaped when dropped.
struct ChromeDriver {
    child: Child,
    port: u16,
}

impl ChromeDriver {
    /// Starts chromedriver; the browsers it starts keep their
    /// configuration (crash reporter's database) and temporary files
    /// under `home`, a temporary directory, not the user's or `/tmp`.
    fn start(home: &std::path::Path) -> ChromeDriver {
        require("chromium", &["--version"], "apt-get install chromium");
        require("chromedriver", &["--version"], "apt-get install chromium-driver");
        let port = free_port();
        // Chromium's shared memory files and profile copies go here too,
        // so that a killed browser leaves nothing in /tmp.
        let tmp = home.join("tmp");
        std::fs::create_dir_all(&tmp).expect("a temporary directory for the browser");
        // Its own process group, so that dropping it also ends the
        // browsers it started, even when the test fails before closing
        // its session.
        let child = Command::new("chromedriver")
            .process_group(0)
            .env("XDG_CONFIG_HOME", home.join("config"))
            .env("XDG_CACHE_HOME", home.join("cache"))
            .env("TMPDIR", &tmp)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let driver = ChromeDriver { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen on port {port} within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        driver
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).stderr(Stdio::null()).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// chromedriver's `POST /session/{id}/se/log`: the browser's console
/// messages since the last call (needs `goog:loggingPrefs`).
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(&self, base: &Url, session: Option<&str>) -> Result<Url, <Url as FromStr>::Err> {
        base.join(&format!("session/{}/se/log", session.unwrap_or_default()))
    }

    fn method_and_body(&self, _: &Url) -> (Method, Option<String>) {
        (Method::POST, Some(json!({ "type": "browser" }).to_string()))
    }
}

/// A headless Chromium session; its profile lives in `profile` (a
/// temporary directory the test removes), not in a directory of
/// chromedriver's that a killed chromedriver would leave behind.
async fn browser(driver: &ChromeDriver, profile: &std::path::Path) -> Client {
    let mut caps = Capabilities::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1000", "--no-first-run", "--disable-extensions",
                     "--disable-crash-reporter", "--disable-breakpad",
                     format!("--user-data-dir={}", profile.display())]
        }),
    );
    caps.insert("goog:loggingPrefs".into(), json!({ "browser": "ALL" }));
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.enforce_http(true);
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a WebDriver session with headless Chromium")
}

/// Fails the test if the browser logged an error (a script error, a
/// resource that failed to load, a blocked inline script) since the last
/// call.
async fn assert_no_console_errors(c: &Client, page: &str) {
    let errors = console_errors(c).await;
    assert!(errors.is_empty(), "console errors on {page}: {errors:#?}");
}

/// The messages of the errors the browser logged since the last call.
async fn console_errors(c: &Client) -> Vec<String> {
    let log = c.issue_cmd(BrowserLog).await.expect("read the browser log");
    log.as_array()
        .expect("a list of log entries")
        .iter()
        .filter(|e| e["level"] == "SEVERE")
        .map(|e| e["message"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).parent().expect("target dir").join("ui-screenshots");
    std::fs::create_dir_all(&dir).expect("create target/ui-screenshots");
    dir
}

async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    std::fs::write(screenshots().join(format!("{name}.png")), png).expect("write the screenshot");
}

/// The text of the element `css` selects, read in one script (a live
/// update may replace the element between two WebDriver calls).
async fn text(c: &Client, css: &str) -> String {
    let script = format!("const e = document.querySelector({css:?}); return e ? e.textContent : null;");
    match js(c, &script).await {
        Value::String(t) => t,
        other => panic!("{css}: no such element ({other})"),
    }
}

async fn js(c: &Client, script: &str) -> Value {
    c.execute(script, vec![]).await.unwrap_or_else(|e| panic!("{script}: {e}"))
}

/// Waits (at most `secs`) until `check` holds on the current page.
async fn until(c: &Client, secs: u64, what: &str, script: &str) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if js(c, script).await == Value::Bool(true) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "waited {secs} s for {what}; page:\n{}",
            c.source().await.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const STATES: [&str; 7] = ["Active", "Provisioning", "Ready", "Contextualizing", "Deployed", "Failed", "Reserved"];

/// The map's total, every cell as `[state, letter]`, and the legend's
/// count per state.
const MAP_STATE: &str = "return {
    total: document.getElementById('farm-total').textContent,
    cells: Array.from(document.querySelectorAll('#map a.cell')).map(a => [a.dataset.state, a.textContent]),
    counts: Object.fromEntries(Array.from(document.querySelectorAll('[id^=count-]')).map(e => [e.id.slice(6), e.textContent])),
};";

async fn legacy(server: &Service, path: &str) -> (u16, Value) {
    let r = reqwest::get(format!("http://127.0.0.1:{}{path}", server.port())).await.expect("legacy API call");
    let status = r.status().as_u16();
    let body = r.text().await.expect("body");
    (status, serde_json::from_str(&body).unwrap_or(Value::String(body)))
}

fn key(db: &std::path::Path, args: &[&str]) -> String {
    let out = duffy!().run(db, &[&["key", "create"], args].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("duffy.db");
    let admin = key(&db, &["--project", "ops", "--admin"]);
    let job = key(&db, &["--project", "ci"]);
    let server = duffy!().serve(&db).start();
    server.wait_ready("7", 4, Duration::from_secs(90));
    let base = format!("http://127.0.0.1:{}", server.port());
    let driver = ChromeDriver::start(dir.path());
    let c = browser(&driver, &dir.path().join("chromium-profile")).await;

    // The farm map shows the seeded farm's states: one cell per machine,
    // each with its state's letter, and per-state counts that add up.
    c.goto(&format!("{base}/ui")).await.expect("open the farm map");
    assert_no_console_errors(&c, "/ui").await;
    let letter = |s: &str| match s {
        "Active" => "A",
        "Provisioning" => "P",
        "Ready" => "R",
        "Contextualizing" => "C",
        "Deployed" => "D",
        "Failed" => "F",
        "Reserved" => "X",
        other => panic!("unknown state {other}"),
    };
    // The counts and the cells are two reads of a farm that is still
    // installing, so a transition may fall between them: read until they
    // agree (they must, within a few tries).
    let mut agreed = false;
    for _ in 0..20 {
        // One script: the page cannot change under it.
        let page = js(&c, MAP_STATE).await;
        assert_eq!(page["total"], json!("48 machines"), "the embedded default farm has 48 machines");
        let cells = page["cells"].as_array().unwrap();
        assert_eq!(cells.len(), 48, "every machine is a cell");
        let mut all_counted = true;
        for state in STATES {
            let of_state: Vec<&Value> = cells.iter().filter(|c| c[0] == state).collect();
            assert!(of_state.iter().all(|c| c[1] == letter(state)), "{state} cells show {}", letter(state));
            all_counted &= page["counts"][state] == json!(of_state.len().to_string());
        }
        if all_counted && cells.iter().any(|c| c[0] == "Ready") {
            agreed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.refresh().await.unwrap();
    }
    assert!(agreed, "the legend's counts match the cells' states, and some machines are Ready");
    // Keyboard: Tab reaches the skip link first, and a focused cell opens
    // its node's page with Enter.
    let tab = KeyActions::new("keyboard".into())
        .then(KeyAction::Down { value: Key::Tab.into() })
        .then(KeyAction::Up { value: Key::Tab.into() });
    c.perform_actions(tab).await.expect("press Tab");
    assert_eq!(js(&c, "return document.activeElement.className;").await, json!("skip"));
    let first =
        js(&c, "const a = document.querySelector('#map a.cell'); a.focus(); return a.getAttribute('href');").await;
    c.active_element().await.unwrap().send_keys(&Key::Enter.to_string()).await.unwrap();
    let host = first.as_str().unwrap().trim_start_matches("/ui/node/").to_string();
    until(&c, 10, "the node page", &format!("return document.querySelector('h1').textContent === 'Node {host}';"))
        .await;
    // The filters narrow the map.
    c.goto(&format!("{base}/ui?state=Ready")).await.unwrap();
    let ready =
        js(&c, "return Array.from(document.querySelectorAll('#map a.cell')).every(a => a.dataset.state === 'Ready');")
            .await;
    assert_eq!(ready, Value::Bool(true));
    c.goto(&format!("{base}/ui?host=n1.sim")).await.unwrap();
    let hosts =
        js(&c, "return Array.from(document.querySelectorAll('#map a.cell')).map(a => a.getAttribute('href'));").await;
    assert!(hosts.as_array().unwrap().iter().all(|h| h.as_str().unwrap().contains("n1.sim")), "{hosts}");
    assert_no_console_errors(&c, "/ui?filters").await;

    // Live: with the map open, a get through the legacy API shows up
    // without a reload (a marker set on the page survives).
    c.goto(&format!("{base}/ui")).await.unwrap();
    screenshot(&c, "farm-map").await;
    js(&c, "window.duffyMarker = 'same page'; return true;").await;
    let deployed_before: usize = text(&c, "#count-Deployed").await.parse().unwrap();
    let (status, got) = legacy(&server, &format!("/Node/get?key={job}&ver=7&arch=x86_64&count=1")).await;
    assert_eq!(status, 200, "{got}");
    let ssid = got["ssid"].as_str().expect("an ssid").to_string();
    let host = got["hosts"][0].as_str().expect("a host").to_string();
    until(
        &c,
        20,
        "the live update",
        &format!("return Number(document.getElementById('count-Deployed').textContent) > {deployed_before} && Number(document.body.dataset.updates || 0) > 0;"),
    )
    .await;
    assert_eq!(js(&c, "return window.duffyMarker;").await, json!("same page"), "updated without a reload");
    assert_no_console_errors(&c, "/ui (live)").await;

    // Fail and done through the legacy API: the node's timeline shows
    // the handover, the fail hold and the release, with causes.
    let (status, body) = legacy(&server, &format!("/Node/fail?key={job}&ssid={ssid}")).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = legacy(&server, &format!("/Node/done?key={job}&ssid={ssid}")).await;
    assert_eq!(status, 200, "{body}");
    c.goto(&format!("{base}/ui/node/{host}")).await.unwrap();
    assert_no_console_errors(&c, "/ui/node").await;
    let causes =
        js(&c, "return Array.from(document.querySelectorAll('#timeline li')).map(li => li.dataset.cause);").await;
    let causes: Vec<&str> = causes.as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let released = causes.iter().position(|c| *c == "released").unwrap_or_else(|| panic!("released in {causes:?}"));
    let failed =
        causes.iter().position(|c| *c == "failed_by_user").unwrap_or_else(|| panic!("failed_by_user in {causes:?}"));
    let given = causes
        .iter()
        .position(|c| *c == "delivered" || *c == "allocated")
        .unwrap_or_else(|| panic!("the handover in {causes:?}"));
    assert!(released < failed && failed < given, "newest first: {causes:?}");
    assert!(causes.contains(&"install_succeeded") && causes.contains(&"install_started"), "{causes:?}");
    let timeline = text(&c, "#timeline").await;
    assert!(timeline.contains("Deployed → Failed") && timeline.contains(&ssid[..8]), "{timeline}");
    assert!(!text(&c, "#last-install").await.contains("not in"), "the last install's duration is shown");
    screenshot(&c, "node").await;

    // The other pages load cleanly.
    for (path, marker) in [("/ui/pools", "#pools"), ("/ui/sessions", "#sessions"), ("/ui/charts", "#chart-ready svg")] {
        c.goto(&format!("{base}{path}")).await.unwrap();
        c.find(Locator::Css(marker)).await.unwrap_or_else(|e| panic!("{path}: {marker}: {e}"));
        assert_no_console_errors(&c, path).await;
        screenshot(&c, path.trim_start_matches("/ui/")).await;
    }

    // Without an admin key, a pause is refused and changes nothing: a
    // POST with this browser's CSRF token but no key, and one with a key
    // cookie but no token.
    c.goto(&format!("{base}/ui")).await.unwrap();
    assert_no_console_errors(&c, "/ui (before the admin steps)").await;
    let refused = js(
        &c,
        "const csrf = document.querySelector('#login input[name=csrf]').value;
         return fetch('/ui/action', {method: 'POST', headers: {'Content-Type': 'application/x-www-form-urlencoded'},
                body: 'action=pause&csrf=' + encodeURIComponent(csrf)}).then(r => r.status);",
    )
    .await;
    assert_eq!(refused, json!(403));
    assert_eq!(text(&c, "#paused-flag").await, "Serving allocations");
    // A non-admin key is not let in.
    c.find(Locator::Css("#admin-key")).await.unwrap().send_keys(&job).await.unwrap();
    c.find(Locator::Css("#login button")).await.unwrap().click().await.unwrap();
    until(&c, 10, "the refusal", "return document.getElementById('message') !== null;").await;
    assert!(text(&c, "#message").await.contains("not an admin key"));
    c.goto(&format!("{base}/ui")).await.unwrap();
    assert!(c.find(Locator::Css("#do-pause")).await.is_err(), "no admin controls without an admin key");
    // A valid admin key in the form: the controls appear, and a POST
    // without the CSRF token is still refused.
    c.find(Locator::Css("#admin-key")).await.unwrap().send_keys(&admin).await.unwrap();
    c.find(Locator::Css("#login button")).await.unwrap().click().await.unwrap();
    until(&c, 10, "the admin status", "return document.getElementById('admin-status') !== null;").await;
    assert_eq!(text(&c, "#admin-status").await, "Admin (ops)");
    let forged = js(
        &c,
        "return fetch('/ui/action', {method: 'POST', headers: {'Content-Type': 'application/x-www-form-urlencoded'},
                body: 'action=pause'}).then(r => r.status);",
    )
    .await;
    assert_eq!(forged, json!(403));
    let (status, body) = legacy(&server, &format!("/Node/get?key={job}&ver=7&arch=x86_64&count=1")).await;
    assert_eq!(status, 200, "not paused yet: {body}");
    legacy(&server, &format!("/Node/done?key={job}&ssid={}", body["ssid"].as_str().unwrap())).await;
    // Pause from the UI: it takes effect (the legacy API refuses to
    // allocate), and the page says so.
    c.find(Locator::Css("#do-pause")).await.unwrap().click().await.unwrap();
    until(&c, 10, "the paused flag", "return document.getElementById('paused-flag').textContent.startsWith('Paused');")
        .await;
    screenshot(&c, "paused").await;
    let (_, body) = legacy(&server, &format!("/Node/get?key={job}&ver=7&arch=x86_64&count=1")).await;
    assert!(body.to_string().to_lowercase().contains("paus"), "allocation refused while paused: {body}");
    c.find(Locator::Css("#do-resume")).await.unwrap().click().await.unwrap();
    until(&c, 10, "resumed", "return document.getElementById('paused-flag').textContent === 'Serving allocations';")
        .await;
    // Logged out, the controls are gone again.
    c.find(Locator::Css(".admin form button")).await.unwrap().click().await.unwrap();
    until(&c, 10, "the login form", "return document.getElementById('login') !== null;").await;
    assert!(c.find(Locator::Css("#do-pause")).await.is_err());
    // The only errors are the three refusals the test provoked (the
    // browser logs every 403 it is answered).
    let errors = console_errors(&c).await;
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(
        errors
            .iter()
            .all(|e| (e.contains("/ui/action - ") || e.contains("/ui/login - ")) && e.contains("status of 403")),
        "{errors:#?}"
    );

    c.close().await.expect("close the browser");
    drop(driver);
    drop(server);
}
