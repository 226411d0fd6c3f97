//! A TCP proxy between the store and PostgreSQL that can lose a
//! connection exactly around a `COMMIT`: after passing it on (the server
//! commits, the client never hears) or instead of passing it on (the
//! server rolls back when the connection drops).
//!
//! It reads the client's side of the wire protocol just enough to find a
//! simple-query message whose text is `COMMIT`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What to do at the next `COMMIT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Nothing: pass everything on.
    Never = 0,
    /// Pass the COMMIT on, give the server a moment, then close both
    /// sides before its answer reaches the client.
    AfterCommit = 1,
    /// Close both sides instead of passing the COMMIT on.
    BeforeCommit = 2,
}

/// A running proxy.
pub struct Proxy {
    /// Where it listens.
    pub port: u16,
    armed: Arc<AtomicU8>,
    cuts: Arc<AtomicU64>,
}

impl Proxy {
    /// Listens on a free port and forwards to `upstream` (host:port).
    pub async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let armed = Arc::new(AtomicU8::new(Cut::Never as u8));
        let cuts = Arc::new(AtomicU64::new(0));
        let (a, c) = (armed.clone(), cuts.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else { continue };
                // Small messages go out at once, as between the store and
                // the server.
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                tokio::spawn(relay(client, server, a.clone(), c.clone()));
            }
        });
        Proxy { port, armed, cuts }
    }

    /// Cuts the connection at the next COMMIT, as `cut` says (once).
    pub fn arm(&self, cut: Cut) {
        self.armed.store(cut as u8, Ordering::SeqCst);
    }

    /// How many connections were cut so far.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::SeqCst)
    }
}

async fn relay(client: TcpStream, server: TcpStream, armed: Arc<AtomicU8>, cuts: Arc<AtomicU64>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let cut = Arc::new(tokio::sync::Notify::new());
    let cut2 = cut.clone();
    let mut down = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            tokio::select! {
                n = sr.read(&mut buf) => match n {
                    Ok(0) | Err(_) => return,
                    Ok(n) => if cw.write_all(&buf[..n]).await.is_err() { return },
                },
                () = cut2.notified() => return,
            }
        }
    });
    // Client to server, message by message. The first messages (an
    // optional SSLRequest, the startup message) have no type byte.
    let mut started = false;
    loop {
        let mut head = if started { vec![0u8; 5] } else { vec![0u8; 4] };
        if cr.read_exact(&mut head).await.is_err() {
            break;
        }
        let len_at = if started { 1 } else { 0 };
        let len = u32::from_be_bytes(head[len_at..len_at + 4].try_into().expect("4 bytes")) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        if cr.read_exact(&mut body).await.is_err() {
            break;
        }
        if !started && body.len() >= 4 {
            let code = u32::from_be_bytes(body[..4].try_into().expect("4 bytes"));
            // 196608: protocol 3.0, the startup message proper.
            started = code == 196_608;
        }
        let is_commit = head[0] == b'Q' && body.starts_with(b"COMMIT");
        let mode = if is_commit { armed.swap(Cut::Never as u8, Ordering::SeqCst) } else { Cut::Never as u8 };
        if mode == Cut::BeforeCommit as u8 {
            cuts.fetch_add(1, Ordering::SeqCst);
            cut.notify_one();
            return;
        }
        if mode == Cut::AfterCommit as u8 {
            // The client's side goes first (no answer can reach it), then
            // the COMMIT goes to the server, which commits; then the
            // server's side closes too.
            cuts.fetch_add(1, Ordering::SeqCst);
            cut.notify_one();
            let _ = (&mut down).await;
            drop(cr);
            let _ = sw.write_all(&head).await;
            let _ = sw.write_all(&body).await;
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            return;
        }
        if sw.write_all(&head).await.is_err() || sw.write_all(&body).await.is_err() {
            break;
        }
    }
    cut.notify_one();
    let _ = down.await;
}
