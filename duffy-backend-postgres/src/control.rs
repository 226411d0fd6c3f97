//! The control connection: one dedicated connection per process (not from
//! the pool) that makes the process known to the others.
//!
//! - **Liveness.** The process registers a row in `instances` and holds
//!   the session advisory lock `(LOCK_INSTANCE, id)` on this connection.
//!   PostgreSQL drops the lock with the connection, so "alive" means "its
//!   control connection is open": a killed process is dead at once (the
//!   kernel closes its socket), a frozen one (SIGSTOP) once the server ends
//!   its idle session (`idle_session_timeout`, set on this connection; the
//!   process pings every [`ControlOptions::ping_every`]).
//! - **Leadership.** When the process wants to lead, it polls
//!   `pg_try_advisory_lock(LOCK_LEADER, 0)` on this connection; holding it
//!   makes it the leader, and it then starts a new term
//!   (`settings.leader_epoch + 1`, under the exclusive fence lock). It
//!   stops being the leader when the connection fails, when a ping fails,
//!   or when one of its fenced writes is refused.
//! - **Key changes.** It `LISTEN`s on [`CHANNEL_KEYS`]: each notification
//!   moves the process's key generation (the engine forgets every key it
//!   remembers) and is then confirmed in `instances.key_version_seen`, so
//!   that whoever changed a key can wait until every live process has
//!   forgotten it. While the connection is down, or a ping has not
//!   succeeded recently (a process that was frozen and wakes up), the key
//!   generation moves on every read, so nothing is answered from memory.
//! - **Kicks.** Writes that free nodes (or pause, or change targets) ask
//!   for a `NOTIFY` on [`CHANNEL_KICK`] (at most one per
//!   [`KICK_DEBOUNCE`]); the leader's reconciler re-plans when it hears
//!   one from another process.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::{Notify, mpsc, watch};
use tokio_postgres::{AsyncMessage, Client, NoTls, Notification};
use tracing::{debug, info, warn};

use crate::OpenError;
use crate::sql::{CHANNEL_KEYS, CHANNEL_KICK, LOCK_FENCE, LOCK_INSTANCE, LOCK_LEADER};

/// At most one kick notification per this long.
pub(crate) const KICK_DEBOUNCE: Duration = Duration::from_millis(50);

/// Timing of the control connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlOptions {
    /// How often the process pings the database on its control connection
    /// (default 1 s).
    pub ping_every: Duration,
    /// The server ends the control session after this long without a
    /// message from the process (`idle_session_timeout`), which releases
    /// its liveness and leader locks: how long a frozen process keeps them
    /// (default 5 s; at least 2 × `ping_every`).
    pub idle_timeout: Duration,
    /// How often a process that wants to lead tries the leader lock
    /// (default 250 ms).
    pub leader_poll: Duration,
}

impl Default for ControlOptions {
    fn default() -> Self {
        ControlOptions {
            ping_every: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
            leader_poll: Duration::from_millis(250),
        }
    }
}

impl ControlOptions {
    /// How long after a ping was sent the process may trust it has heard
    /// of every key change: less than the idle timeout, so that a process
    /// whose session the server ended stops trusting its memory first.
    fn trust_for(&self) -> Duration {
        self.idle_timeout.saturating_sub(self.ping_every).max(self.ping_every)
    }
}

type KickTarget = Arc<dyn Fn() + Send + Sync>;

/// The process's side of the control connection, shared with the store.
pub(crate) struct Control {
    /// This process's id in `instances`.
    pub(crate) instance: i32,
    options: ControlOptions,
    base: Instant,
    key_gen: AtomicU64,
    trusted_until_ms: AtomicU64,
    kick_wanted: AtomicBool,
    kick: Notify,
    kick_target: Mutex<Option<KickTarget>>,
    want_leader: watch::Sender<bool>,
    leader: watch::Sender<Option<u64>>,
    lost: Notify,
    stop: watch::Sender<bool>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").field("instance", &self.instance).field("leader", &*self.leader.borrow()).finish()
    }
}

impl Control {
    /// The key generation (see the module documentation).
    pub(crate) fn key_generation(&self) -> u64 {
        let now = self.base.elapsed().as_millis() as u64;
        if now >= self.trusted_until_ms.load(Ordering::Acquire) {
            // Not sure to have heard of every change: never the same twice.
            self.key_gen.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            self.key_gen.load(Ordering::Acquire)
        }
    }

    fn trust_until(&self, sent: Instant) {
        let until = (sent + self.options.trust_for()).duration_since(self.base).as_millis() as u64;
        self.trusted_until_ms.store(until, Ordering::Release);
    }

    fn distrust(&self) {
        self.trusted_until_ms.store(0, Ordering::Release);
        self.key_gen.fetch_add(1, Ordering::AcqRel);
    }

    /// Asks for a kick notification to the leader.
    pub(crate) fn want_kick(&self) {
        self.kick_wanted.store(true, Ordering::Release);
        self.kick.notify_one();
    }

    /// What to call when another process kicks.
    pub(crate) fn set_kick_target(&self, target: Option<KickTarget>) {
        *self.kick_target.lock().unwrap_or_else(|p| p.into_inner()) = target;
    }

    /// Whether to compete for leadership.
    pub(crate) fn want_leadership(&self, want: bool) {
        self.want_leader.send_replace(want);
    }

    /// The leadership term this process holds now, if any; changes as it
    /// wins and loses.
    pub(crate) fn leader(&self) -> watch::Receiver<Option<u64>> {
        self.leader.subscribe()
    }

    /// A fenced write of term `epoch` was refused: if that is this
    /// process's term, it is no longer the leader.
    pub(crate) fn fenced(&self, epoch: u64) {
        if *self.leader.borrow() == Some(epoch) {
            self.leader.send_replace(None);
            self.lost.notify_one();
        }
    }

    /// Stops the control task (dropping the connection releases the
    /// locks).
    pub(crate) fn stop(&self) {
        self.stop.send_replace(true);
    }
}

/// An open control connection.
struct Established {
    client: Client,
    notes: mpsc::UnboundedReceiver<Notification>,
}

fn pg(context: &str) -> impl FnOnce(tokio_postgres::Error) -> OpenError + '_ {
    move |source| OpenError::Postgres { context: context.to_string(), source }
}

async fn connect(cfg: &tokio_postgres::Config, options: &ControlOptions) -> Result<Established, OpenError> {
    let (client, mut connection) = cfg.connect(NoTls).await.map_err(pg("opening the control connection"))?;
    let (tx, notes) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    debug!(error = %e, "the control connection ended");
                    break;
                }
            }
        }
    });
    client
        .batch_execute(&format!(
            "SET idle_session_timeout = {}; SET application_name = 'duffy control'; LISTEN {CHANNEL_KEYS}; \
             LISTEN {CHANNEL_KICK}",
            options.idle_timeout.as_millis()
        ))
        .await
        .map_err(pg("setting up the control connection"))?;
    Ok(Established { client, notes })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Registers this process, takes its liveness lock and starts the control
/// task. `role` is recorded ("service", "command").
pub(crate) async fn start(
    cfg: tokio_postgres::Config,
    options: ControlOptions,
    role: &str,
) -> Result<Arc<Control>, OpenError> {
    if options.idle_timeout < options.ping_every * 2 {
        return Err(OpenError::InvalidOptions(format!(
            "the control connection's idle timeout ({:?}) must be at least twice its ping interval ({:?})",
            options.idle_timeout, options.ping_every
        )));
    }
    let est = connect(&cfg, &options).await?;
    let pid = std::process::id() as i32;
    let instance: i32 = est
        .client
        .query_one(
            "INSERT INTO instances (host, pid, role) VALUES ($1, $2, $3) RETURNING id",
            &[&hostname(), &pid, &role],
        )
        .await
        .map_err(pg("registering this process"))?
        .get(0);
    let locked: bool = est
        .client
        .query_one("SELECT pg_try_advisory_lock($1, $2)", &[&LOCK_INSTANCE, &instance])
        .await
        .map_err(pg("taking this process's liveness lock"))?
        .get(0);
    if !locked {
        return Err(OpenError::InvalidOptions(format!("process id {instance} is already locked by another process")));
    }
    let (want_leader, _) = watch::channel(false);
    let (leader, _) = watch::channel(None);
    let (stop, _) = watch::channel(false);
    let ctl = Arc::new(Control {
        instance,
        options,
        base: Instant::now(),
        key_gen: AtomicU64::new(1),
        trusted_until_ms: AtomicU64::new(0),
        kick_wanted: AtomicBool::new(false),
        kick: Notify::new(),
        kick_target: Mutex::new(None),
        want_leader,
        leader,
        lost: Notify::new(),
        stop,
    });
    ctl.trust_until(Instant::now());
    confirm_current_keys(&ctl, &est.client).await.map_err(pg("confirming key changes"))?;
    info!(instance, role, "registered with the database");
    tokio::spawn(run(Arc::downgrade(&ctl), cfg, est));
    Ok(ctl)
}

/// Records that this process has applied every key change so far.
async fn confirm_current_keys(ctl: &Control, client: &Client) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE instances SET key_version_seen = greatest(key_version_seen, \
             (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM key_changes)) WHERE id = $1",
            &[&ctl.instance],
        )
        .await
        .map(|_| ())
}

/// The control task: serves the connection, reconnecting after failures,
/// until the store is dropped or stopped.
async fn run(ctl: std::sync::Weak<Control>, cfg: tokio_postgres::Config, first: Established) {
    let mut est = Some(first);
    let mut failures = 0u32;
    loop {
        let Some(c) = ctl.upgrade() else { return };
        let stopped = *c.stop.borrow();
        if stopped {
            return;
        }
        let conn = match est.take() {
            Some(e) => Ok(e),
            None => reconnect(&c, &cfg).await,
        };
        let result = match conn {
            Ok(e) => {
                failures = 0;
                serve(&c, e).await
            }
            Err(e) => Err(e.to_string()),
        };
        c.distrust();
        if c.leader.borrow().is_some() {
            warn!("lost leadership: the control connection failed");
            c.leader.send_replace(None);
        }
        match result {
            Ok(()) => return,
            Err(e) => {
                failures += 1;
                warn!(error = %e, "the control connection failed; reconnecting");
            }
        }
        let wait = Duration::from_millis(100u64 << failures.min(5));
        let mut stop = c.stop.subscribe();
        drop(c);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            () = async { let _ = stop.wait_for(|s| *s).await; } => return,
        }
    }
}

/// Opens the connection again and takes the same liveness lock (once the
/// server has ended the old session).
async fn reconnect(ctl: &Control, cfg: &tokio_postgres::Config) -> Result<Established, OpenError> {
    let est = connect(cfg, &ctl.options).await?;
    let deadline = Instant::now() + ctl.options.idle_timeout * 4;
    loop {
        let locked: bool = est
            .client
            .query_one("SELECT pg_try_advisory_lock($1, $2)", &[&LOCK_INSTANCE, &ctl.instance])
            .await
            .map_err(pg("taking this process's liveness lock again"))?
            .get(0);
        if locked {
            break;
        }
        if Instant::now() >= deadline {
            return Err(OpenError::InvalidOptions(format!(
                "the liveness lock of process {} is still held by its old session",
                ctl.instance
            )));
        }
        tokio::time::sleep(ctl.options.ping_every / 2).await;
    }
    // Changes made while the connection was down were not heard of: forget
    // everything (the key generation moved in `distrust`), then confirm.
    ctl.key_gen.fetch_add(1, Ordering::AcqRel);
    confirm_current_keys(ctl, &est.client).await.map_err(pg("confirming key changes"))?;
    ctl.trust_until(Instant::now());
    info!(instance = ctl.instance, "control connection restored");
    Ok(est)
}

/// Serves one connection until it fails (`Err`) or the store stops.
async fn serve(ctl: &Control, mut est: Established) -> Result<(), String> {
    let opts = ctl.options;
    let mut ping = tokio::time::interval(opts.ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut poll = tokio::time::interval(opts.leader_poll);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut want = ctl.want_leader.subscribe();
    let mut stop = ctl.stop.subscribe();
    let mut leading = false;
    let mut last_kick = Instant::now() - KICK_DEBOUNCE;
    let ping_timeout = opts.idle_timeout.saturating_sub(opts.ping_every).max(Duration::from_millis(500));
    loop {
        let compete = *want.borrow() && !leading;
        tokio::select! {
            () = async { let _ = stop.wait_for(|s| *s).await; } => return Ok(()),
            note = est.notes.recv() => {
                let Some(note) = note else { return Err("the connection closed".into()) };
                on_notification(ctl, &est.client, note).await.map_err(|e| e.to_string())?;
            }
            _ = ping.tick() => {
                let sent = Instant::now();
                match tokio::time::timeout(ping_timeout, est.client.simple_query("SELECT 1")).await {
                    Ok(Ok(_)) => ctl.trust_until(sent),
                    Ok(Err(e)) => return Err(format!("ping: {e}")),
                    Err(_) => return Err(format!("ping: no answer within {ping_timeout:?}")),
                }
            }
            _ = ctl.kick.notified() => {
                let since = last_kick.elapsed();
                if since < KICK_DEBOUNCE {
                    tokio::time::sleep(KICK_DEBOUNCE - since).await;
                }
                if ctl.kick_wanted.swap(false, Ordering::AcqRel) {
                    last_kick = Instant::now();
                    est.client
                        .execute("SELECT pg_notify($1, $2)", &[&CHANNEL_KICK, &ctl.instance.to_string()])
                        .await
                        .map_err(|e| format!("kick: {e}"))?;
                }
            }
            _ = poll.tick(), if compete => {
                let got: bool = est
                    .client
                    .query_one("SELECT pg_try_advisory_lock($1, 0)", &[&LOCK_LEADER])
                    .await
                    .map_err(|e| format!("trying the leader lock: {e}"))?
                    .get(0);
                if got {
                    let epoch = begin_term(ctl, &mut est.client).await.map_err(|e| format!("starting a term: {e}"))?;
                    leading = true;
                    info!(instance = ctl.instance, epoch, "became the leader");
                    ctl.leader.send_replace(Some(epoch));
                }
            }
            changed = want.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let wanted = *want.borrow();
                if !wanted && leading {
                    est.client
                        .query_one("SELECT pg_advisory_unlock($1, 0)", &[&LOCK_LEADER])
                        .await
                        .map_err(|e| format!("releasing the leader lock: {e}"))?;
                    leading = false;
                    ctl.leader.send_replace(None);
                    info!(instance = ctl.instance, "stepped down as leader");
                }
            }
            _ = ctl.lost.notified(), if leading => {
                // Another process began a newer term: this connection's
                // lock cannot be what it was; start afresh.
                return Err("a fenced write was refused: another process leads".into());
            }
        }
    }
}

async fn on_notification(ctl: &Control, client: &Client, note: Notification) -> Result<(), tokio_postgres::Error> {
    match note.channel() {
        CHANNEL_KEYS => {
            let version: i64 = note.payload().parse().unwrap_or(i64::MAX);
            // Forget first, then confirm: whoever waits for the
            // confirmation may rely on every later request of this
            // process seeing the new generation.
            ctl.key_gen.fetch_add(1, Ordering::AcqRel);
            client
                .execute(
                    "UPDATE instances SET key_version_seen = greatest(key_version_seen, $2) WHERE id = $1",
                    &[&ctl.instance, &version.min(i64::MAX - 1)],
                )
                .await?;
            debug!(version, "key change applied");
        }
        CHANNEL_KICK if note.payload() != ctl.instance.to_string() => {
            let target = ctl.kick_target.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(kick) = target {
                kick();
            }
        }
        _ => {}
    }
    Ok(())
}

/// Starts a new leadership term on this connection: the exclusive fence
/// lock waits for every fenced write of the old term to finish, then the
/// epoch moves forward.
async fn begin_term(ctl: &Control, client: &mut Client) -> Result<u64, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.query_one("SELECT pg_advisory_xact_lock($1, 0)", &[&LOCK_FENCE]).await?;
    let row = tx
        .query_one(
            "UPDATE settings SET leader_epoch = leader_epoch + 1, leader_instance = $1, leader_since = now() \
             WHERE id = 1 RETURNING leader_epoch",
            &[&ctl.instance],
        )
        .await?;
    tx.commit().await?;
    let epoch: i64 = row.get(0);
    Ok(u64::try_from(epoch).unwrap_or(0))
}
