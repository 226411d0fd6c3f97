//! The dashboard's security over real HTTP against a real `duffy serve`:
//! read-only without an admin key, every POST refused without this
//! browser's CSRF token, the cookies `HttpOnly` and `SameSite=Strict`, and
//! a refused request changes nothing. (The browser test, `ui_browser.rs`,
//! drives the same through Chromium; this one forges what a browser would
//! not send.)

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use duffy_testsupport::duffy;
use duffy_testsupport::service::Service;
use reqwest::redirect::Policy;

struct Browser {
    http: reqwest::Client,
    base: String,
}

struct Page {
    status: u16,
    cookies: Vec<String>,
    body: String,
}

impl Browser {
    fn new(server: &Service) -> Browser {
        let http = reqwest::Client::builder().redirect(Policy::none()).build().unwrap();
        Browser { http, base: format!("http://127.0.0.1:{}", server.port()) }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Page {
        let r = req.send().await.expect("request");
        let cookies = r.headers().get_all("set-cookie").iter().map(|v| v.to_str().unwrap().to_string()).collect();
        Page { status: r.status().as_u16(), cookies, body: r.text().await.unwrap() }
    }

    async fn get(&self, path: &str, cookie: &str) -> Page {
        self.send(self.http.get(format!("{}{path}", self.base)).header("cookie", cookie)).await
    }

    async fn post(&self, path: &str, cookie: &str, form: &str) -> Page {
        let req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("cookie", cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.to_string());
        self.send(req).await
    }
}

/// The value of `name="csrf"` in a page.
fn csrf(body: &str) -> String {
    let at = body.find("name=\"csrf\" value=\"").expect("a CSRF field") + "name=\"csrf\" value=\"".len();
    body[at..].split('"').next().unwrap().to_string()
}

/// `name=value` of the Set-Cookie for `name`.
fn cookie_pair(cookies: &[String], name: &str) -> String {
    let c =
        cookies.iter().find(|c| c.starts_with(&format!("{name}="))).unwrap_or_else(|| panic!("{name} in {cookies:?}"));
    c.split(';').next().unwrap().to_string()
}

fn key(db: &std::path::Path, args: &[&str]) -> String {
    let out = duffy!().run(db, &[&["key", "create"], args].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_changes_nothing_without_an_admin_key_and_a_csrf_token() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("duffy.db");
    let admin = key(&db, &["--project", "ops", "--admin"]);
    let job = key(&db, &["--project", "ci"]);
    let server = duffy!().serve(&db).start();
    let b = Browser::new(&server);
    let paused = || async {
        let p = b.get("/ui", "").await;
        assert_eq!(p.status, 200);
        p.body.contains("Paused: no new allocations")
    };

    // A first visit: a random browser id in an HttpOnly, SameSite=Strict
    // cookie, and forms carrying a token bound to it.
    let first = b.get("/ui", "").await;
    assert_eq!(first.status, 200, "{}", first.body);
    let ui = first.cookies.iter().find(|c| c.starts_with("duffy_ui=")).expect("a duffy_ui cookie");
    assert!(ui.contains("HttpOnly") && ui.contains("SameSite=Strict") && ui.contains("Path=/ui"), "{ui}");
    assert!(!ui.contains("Secure"), "plain HTTP, no proxy: a Secure cookie would never come back: {ui}");
    let ui = cookie_pair(&first.cookies, "duffy_ui");
    let token = csrf(&first.body);
    assert!(!first.body.contains("do-pause"), "no admin controls without a key");

    // Another browser's id and token.
    let other = b.get("/ui", "").await;
    let (other_ui, other_token) = (cookie_pair(&other.cookies, "duffy_ui"), csrf(&other.body));
    assert_ne!(other_token, token);

    // Without an admin key: refused, whatever the token.
    let p = b.post("/ui/action", &ui, &format!("action=pause&csrf={token}")).await;
    assert_eq!(p.status, 403, "{}", p.body);
    assert!(p.body.contains("needs an admin key"), "{}", p.body);
    // Logging in: refused without the token, with another browser's token,
    // with an unknown key, and with a key that is not an admin key.
    for (cookie, form) in [
        (ui.clone(), format!("key={admin}")),
        (ui.clone(), format!("key={admin}&csrf={other_token}")),
        (other_ui.clone(), format!("key={admin}&csrf={token}")),
        (String::new(), format!("key={admin}&csrf={token}")),
        (ui.clone(), format!("key=00000000-0000-4000-8000-000000000000&csrf={token}")),
        (ui.clone(), format!("key={job}&csrf={token}")),
    ] {
        let p = b.post("/ui/login", &cookie, &form).await;
        assert_eq!(p.status, 403, "{form}: {}", p.body);
        assert!(!p.cookies.iter().any(|c| c.starts_with("duffy_admin=")), "{form}: no key cookie");
    }

    // With this browser's token, the admin key is let in, kept HttpOnly.
    let p = b.post("/ui/login", &ui, &format!("key={admin}&csrf={token}&back=/ui/pools")).await;
    assert_eq!(p.status, 303, "{}", p.body);
    let set = p.cookies.iter().find(|c| c.starts_with("duffy_admin=")).expect("the admin cookie");
    assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict") && set.contains("Path=/ui"), "{set}");
    let both = format!("{ui}; {}", cookie_pair(&p.cookies, "duffy_admin"));
    assert!(b.get("/ui", &both).await.body.contains("do-pause"), "admin controls with the key");

    // An admin key without the token, or with another browser's: refused,
    // nothing changed.
    for (cookie, form) in [
        (both.clone(), "action=pause".to_string()),
        (both.clone(), format!("action=pause&csrf={other_token}")),
        (both.clone(), "action=pause&csrf=".to_string()),
        (format!("{other_ui}; {}", cookie_pair(&p.cookies, "duffy_admin")), format!("action=pause&csrf={token}")),
    ] {
        let r = b.post("/ui/action", &cookie, &form).await;
        assert_eq!(r.status, 403, "{form}: {}", r.body);
    }
    assert!(!paused().await, "nothing was paused");

    // Both: the pause takes effect, through the same engine operation as
    // /PauseService (the legacy API refuses to allocate).
    let r = b.post("/ui/action", &both, &format!("action=pause&csrf={token}&back=/ui/pools")).await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert!(paused().await);
    let (_, body) = server.get(&format!("/Node/get?key={job}&ver=7&arch=x86_64&count=1"));
    assert!(body.contains("paused"), "{body}");
    // Resume twice: the second is a conflict, shown as such.
    let r = b.post("/ui/action", &both, &format!("action=resume&csrf={token}")).await;
    assert_eq!(r.status, 303);
    let r = b.post("/ui/action", &both, &format!("action=resume&csrf={token}")).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(!paused().await);
    // Bad input: an unknown action, a node that does not exist, a name
    // that is not a hostname; each refused with what was wrong.
    let r = b.post("/ui/action", &both, &format!("action=reboot&csrf={token}")).await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("allowed: pause, resume, set-admin, recover"), "{}", r.body);
    let r = b.post("/ui/action", &both, &format!("action=set-admin&host=nope.example.org&csrf={token}")).await;
    assert_eq!(r.status, 404, "{}", r.body);
    let r = b.post("/ui/action", &both, &format!("action=set-admin&host=%3Cscript%3E&csrf={token}")).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(!r.body.contains("<script>"), "input is escaped");
    // Set admin and recover a machine from its page.
    let r = b.post("/ui/action", &both, &format!("action=set-admin&host=n48.sim.duffy&csrf={token}")).await;
    assert_eq!(r.status, 303, "{}", r.body);
    let node = b.get("/ui/node/n48.sim.duffy", &both).await;
    assert!(node.body.contains("Reserved since"), "{}", node.body);
    let r = b.post("/ui/action", &both, &format!("action=recover&host=n48.sim.duffy&csrf={token}")).await;
    assert_eq!(r.status, 303, "{}", r.body);
    // A form cannot send the browser elsewhere.
    let r = b.post("/ui/action", &both, &format!("action=pause&csrf={token}&back=//evil.example")).await;
    assert_eq!(r.status, 303);
    let r2 = b.post("/ui/action", &both, &format!("action=resume&csrf={token}&back=https://evil.example")).await;
    assert_eq!(r2.status, 303);
    assert!(!paused().await);

    // Logging out forgets the key; the controls are gone.
    let r = b.post("/ui/logout", &ui, &format!("csrf={token}")).await;
    assert_eq!(r.status, 303);
    assert!(r.cookies.iter().any(|c| c.starts_with("duffy_admin=;") && c.contains("Max-Age=0")), "{:?}", r.cookies);

    // Every page answers, with no inline script allowed.
    for path in ["/ui", "/ui/pools", "/ui/sessions", "/ui/charts", "/ui/node/n1.sim.duffy", "/ui?state=Ready"] {
        let r = b.send(b.http.get(format!("{}{path}", b.base))).await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
    }
    let r = b.http.get(format!("{}/ui", b.base)).send().await.unwrap();
    let csp = r.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.contains("default-src 'self'") && !csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(b.get("/ui/node/nope.example.org", "").await.status, 404);
    assert_eq!(b.get("/ui?state=Broken", "").await.status, 400);
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// Behind a TLS-terminating proxy (it says `X-Forwarded-Proto: https` or
/// `Forwarded: proto=https`), the dashboard's cookies, the admin key's
/// above all, are `Secure`: the browser never sends them over plain HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_an_https_proxy_the_cookies_are_secure() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("duffy.db");
    let admin = key(&db, &["--project", "ops", "--admin"]);
    let server = duffy!().serve(&db).start();
    let b = Browser::new(&server);
    for (header, value) in [("x-forwarded-proto", "https"), ("forwarded", "for=192.0.2.1;proto=https;by=203.0.113.9")] {
        let with = |r: reqwest::RequestBuilder| r.header(header, value);
        let first = b.send(with(b.http.get(format!("{}/ui", b.base)))).await;
        let ui = first.cookies.iter().find(|c| c.starts_with("duffy_ui=")).expect("a duffy_ui cookie");
        assert!(ui.contains("; Secure") && ui.contains("HttpOnly"), "{header}: {ui}");
        let (ui, token) = (cookie_pair(&first.cookies, "duffy_ui"), csrf(&first.body));
        let login = b.http.post(format!("{}/ui/login", b.base)).header("cookie", &ui);
        let login = with(login.header("content-type", "application/x-www-form-urlencoded"))
            .body(format!("key={admin}&csrf={token}"));
        let p = b.send(login).await;
        assert_eq!(p.status, 303, "{}", p.body);
        let set = p.cookies.iter().find(|c| c.starts_with("duffy_admin=")).expect("the admin cookie");
        assert!(set.contains("; Secure") && set.contains("HttpOnly"), "{header}: {set}");
    }
    // Another proxy's hop saying https does not count: only the client's.
    let p = b.send(b.http.get(format!("{}/ui", b.base)).header("forwarded", "proto=http, proto=https")).await;
    let ui = p.cookies.iter().find(|c| c.starts_with("duffy_ui=")).expect("a duffy_ui cookie");
    assert!(!ui.contains("Secure"), "{ui}");
}
