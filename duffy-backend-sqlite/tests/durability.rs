//! "Acknowledged means fsynced", checked at the fsync itself.
//!
//! The store's test hook `wal_sync` replaces the syncer thread's
//! `fdatasync` of the WAL with a disk the test controls: one that blocks
//! until the test releases it, or one that fails. While an fsync is
//! blocked, no caller of the batches it covers may have been answered and
//! no read may return them; when it fails, every one of those callers gets
//! an error and no read ever returns the batch.
//!
//! Each check is a function returning what it found wrong, run once on the
//! real store (it must find nothing) and once on a deliberately broken
//! store (the `answer_before_sync` and `release_reads_before_sync` hooks),
//! where it must find the defect: a check that cannot fail proves nothing.
//! Each runs on both ways a batch becomes durable: fsynced by the writer
//! itself (a batch nothing else waits behind, as in these checks' first
//! batch) and by the syncer thread (forced with the `syncer_only` hook).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use duffy_backend_sqlite::{SqliteOptions, SqliteStore, TestHooks};
use duffy_core::testkit::conformance::check_history;
use duffy_core::{Arch, PoolKey, PoolTarget, Store, StoreError};
use futures::poll;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A real `fdatasync`.
    Pass,
    /// Blocks until released (then a real `fdatasync`).
    Block,
    /// Fails with EIO.
    Fail,
}

struct DiskState {
    mode: Mode,
    /// fsyncs begun.
    entered: u64,
    /// fsyncs returned.
    finished: u64,
    released: bool,
}

/// The WAL's disk, as the test wants it.
struct Disk {
    state: Mutex<DiskState>,
    changed: Condvar,
}

impl Disk {
    fn new() -> Arc<Disk> {
        Arc::new(Disk {
            state: Mutex::new(DiskState { mode: Mode::Pass, entered: 0, finished: 0, released: false }),
            changed: Condvar::new(),
        })
    }

    fn set(&self, mode: Mode) {
        let mut s = self.state.lock().expect("disk");
        s.mode = mode;
        s.released = false;
    }

    fn entered(&self) -> u64 {
        self.state.lock().expect("disk").entered
    }

    fn release(&self) {
        let mut s = self.state.lock().expect("disk");
        s.released = true;
        s.mode = Mode::Pass;
        self.changed.notify_all();
    }

    /// The hook: runs on the store's syncer thread, or on its writer
    /// thread.
    fn sync(&self, wal: &std::fs::File) -> std::io::Result<()> {
        let r = self.sync_inner(wal);
        self.state.lock().expect("disk").finished += 1;
        r
    }

    fn sync_inner(&self, wal: &std::fs::File) -> std::io::Result<()> {
        let mut s = self.state.lock().expect("disk");
        s.entered += 1;
        match s.mode {
            Mode::Pass => {}
            Mode::Fail => return Err(std::io::Error::from_raw_os_error(5)),
            Mode::Block => {
                // Bounded, so that a broken test cannot hang the suite.
                let deadline = Instant::now() + Duration::from_secs(60);
                while !s.released && Instant::now() < deadline {
                    s = self.changed.wait_timeout(s, Duration::from_millis(100)).expect("disk").0;
                }
            }
        }
        drop(s);
        wal.sync_data()
    }

    /// Waits until at least `at_least` fsyncs have begun and every one
    /// begun has returned, for a while: the syncer is idle, so the next
    /// fsync is for the writes the test makes next (a broken store that
    /// answers early may still be syncing what it answered).
    async fn settle(&self, at_least: u64) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut quiet_since: Option<(Instant, u64)> = None;
        loop {
            let (entered, finished) = {
                let s = self.state.lock().expect("disk");
                (s.entered, s.finished)
            };
            if entered >= at_least && entered == finished {
                match quiet_since {
                    Some((t, n)) if n == entered && t.elapsed() > Duration::from_millis(20) => return Ok(()),
                    Some((_, n)) if n == entered => {}
                    _ => quiet_since = Some((Instant::now(), entered)),
                }
            } else {
                quiet_since = None;
            }
            if Instant::now() > deadline {
                return Err(format!("the syncer did not settle: {entered} fsyncs begun, {finished} returned"));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Which deliberately broken store to run a check on.
#[derive(Debug, Clone, Copy)]
enum Variant {
    Correct,
    AnswerBeforeSync,
    ReleaseReadsBeforeSync,
}

/// Which thread fsyncs the batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// As the store decides: the writer for a batch nothing waits behind.
    Either,
    /// Always the syncer thread.
    SyncerOnly,
}

const PATHS: [Path; 2] = [Path::Either, Path::SyncerOnly];

fn open(dir: &tempfile::TempDir, disk: &Arc<Disk>, variant: Variant, path: Path) -> SqliteStore {
    let d = Arc::clone(disk);
    let hooks = TestHooks {
        wal_sync: Some(Arc::new(move |wal: &std::fs::File| d.sync(wal))),
        syncer_only: path == Path::SyncerOnly,
        answer_before_sync: matches!(variant, Variant::AnswerBeforeSync),
        release_reads_before_sync: matches!(variant, Variant::ReleaseReadsBeforeSync),
        ..TestHooks::default()
    };
    SqliteStore::open(dir.path().join("duffy.db"), SqliteOptions { test_hooks: hooks, ..SqliteOptions::default() })
        .expect("open")
}

fn target(release: &str, standby: u32) -> PoolTarget {
    PoolTarget { pool: PoolKey::new(release, Arch::X86_64, None), standby }
}

type Fut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

async fn wait_entered(disk: &Disk, more_than: u64) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while disk.entered() <= more_than {
        if Instant::now() > deadline {
            return Err("the syncer never began an fsync".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// Releases the disk when dropped, so a failed check cannot leave the
/// syncer blocked (and the store's drop hanging).
struct Releaser<'a>(&'a Disk);

impl Drop for Releaser<'_> {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// While the fsync covering a batch is blocked: none of its callers is
/// answered, and a read started after its COMMIT does not return within
/// `read_window` (it would return the batch). Then the fsync completes and
/// everything is answered. Returns what was wrong.
async fn check_slow_fsync(variant: Variant, path: Path, read_window: Duration) -> Result<(), String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = Disk::new();
    let store = open(&dir, &disk, variant, path);
    store.set_pool_target(target("before", 1)).await.map_err(|e| e.to_string())?;
    disk.settle(1).await?;

    // Callers: three writes; the first batch's fsync blocks (on the
    // writer thread, or with `SyncerOnly` on the syncer while the others
    // commit behind it), the others wait.
    let entered = disk.entered();
    disk.set(Mode::Block);
    let release = Releaser(&disk);
    let mut writes: Vec<Fut<'_, Result<(), StoreError>>> = Vec::new();
    for i in 0..3 {
        let mut w: Fut<'_, _> = Box::pin(store.set_pool_target(target(&format!("slow{i}"), 2)));
        if poll!(&mut w).is_ready() {
            return Err(format!("write {i} was answered before its batch was even fsynced"));
        }
        writes.push(w);
    }
    wait_entered(&disk, entered).await?;
    // Give a broken store every chance to answer.
    tokio::time::sleep(Duration::from_millis(50)).await;
    for (i, w) in writes.iter_mut().enumerate() {
        if let std::task::Poll::Ready(r) = poll!(w) {
            return Err(format!("write {i} was answered ({r:?}) while the fsync of its batch was in flight"));
        }
    }
    drop(release);
    for (i, w) in writes.into_iter().enumerate() {
        tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .map_err(|_| format!("write {i} was never answered after the fsync"))?
            .map_err(|e| format!("write {i} failed: {e}"))?;
    }

    // Readers: one write (so that nothing is committed after it), its
    // fsync blocked, then a read.
    disk.settle(2).await?;
    let entered = disk.entered();
    disk.set(Mode::Block);
    let release = Releaser(&disk);
    let mut w: Fut<'_, _> = Box::pin(store.set_pool_target(target("slow-read", 2)));
    if poll!(&mut w).is_ready() {
        return Err("a write was answered before its batch was even fsynced".into());
    }
    wait_entered(&disk, entered).await?;
    match tokio::time::timeout(read_window, store.pool_targets()).await {
        Err(_) => {}
        Ok(Ok(targets)) => {
            let saw = targets.iter().any(|t| t.pool.release == "slow-read");
            return Err(format!(
                "a read returned while the fsync was in flight ({}): {targets:?}",
                if saw { "and saw the unsynced batch" } else { "without the committed batch" }
            ));
        }
        Ok(Err(e)) => return Err(format!("a read failed while the fsync was in flight: {e}")),
    }
    drop(release);
    tokio::time::timeout(Duration::from_secs(10), w)
        .await
        .map_err(|_| "the write was never answered after the fsync".to_string())?
        .map_err(|e| format!("the write failed: {e}"))?;
    let targets = store.pool_targets().await.map_err(|e| e.to_string())?;
    if targets.len() != 5 {
        return Err(format!("after the fsyncs, a read sees {targets:?}"));
    }
    Ok(())
}

/// When the fsync covering a batch fails: every caller of it gets an
/// error, and no read returns the batch (the store refuses the reads it
/// cannot vouch for, and every later write, until reopened). Returns what
/// was wrong.
async fn check_failed_fsync(variant: Variant, path: Path) -> Result<(), String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = Disk::new();
    let store = open(&dir, &disk, variant, path);
    store.set_pool_target(target("before", 1)).await.map_err(|e| e.to_string())?;
    disk.settle(1).await?;
    disk.set(Mode::Fail);
    let writes = (0..4).map(|i| store.set_pool_target(target(&format!("lost{i}"), 2)));
    let results = futures::future::join_all(writes).await;
    for (i, r) in results.iter().enumerate() {
        if r.is_ok() {
            return Err(format!("write {i} was answered Ok, yet the fsync of its batch failed"));
        }
    }
    for _ in 0..3 {
        match store.pool_targets().await {
            Ok(t) if t.iter().any(|t| t.pool.release.starts_with("lost")) => {
                return Err(format!("a read returned a batch whose fsync failed: {t:?}"));
            }
            Ok(_) | Err(_) => {}
        }
    }
    match store.set_pool_target(target("after", 3)).await {
        Err(StoreError::Backend { context, .. }) if context.contains("refusing") => {}
        other => return Err(format!("a write after a failed fsync: {other:?}")),
    }
    // And it says so without any I/O, so that a service can stop.
    if !matches!(store.health(), duffy_core::StoreHealth::Failed(_)) {
        return Err(format!("health after a failed fsync: {:?}", store.health()));
    }
    drop(store);

    // Reads, once more with one write alone, so that nothing is committed
    // after it: a read then sees exactly its batch, if anything new.
    disk.set(Mode::Pass);
    let store = open(&dir, &disk, variant, path);
    disk.set(Mode::Fail);
    if store.set_pool_target(target("lost-read", 2)).await.is_ok() {
        return Err("a write was answered Ok, yet the fsync of its batch failed".into());
    }
    if let Ok(t) = store.pool_targets().await {
        if t.iter().any(|t| t.pool.release == "lost-read") {
            return Err(format!("a read returned a batch whose fsync failed: {t:?}"));
        }
    }
    drop(store);

    // Reopened, the store works again (whether the failed batches are
    // there is not known: their callers were told they failed, not that
    // they are gone).
    disk.set(Mode::Pass);
    let store = open(&dir, &disk, Variant::Correct, path);
    store.set_pool_target(target("after", 3)).await.map_err(|e| format!("after reopening: {e}"))?;
    check_history(&store).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_fsync_answers_no_caller_and_shows_no_reader_the_batch() {
    for path in PATHS {
        check_slow_fsync(Variant::Correct, path, Duration::from_millis(300))
            .await
            .unwrap_or_else(|e| panic!("{path:?}: the store must hold answers and reads: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_fails_every_caller_and_shows_no_reader_the_batch() {
    for path in PATHS {
        check_failed_fsync(Variant::Correct, path)
            .await
            .unwrap_or_else(|e| panic!("{path:?}: the store must fail the batch: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slow_fsync_check_catches_answers_before_the_fsync() {
    for path in PATHS {
        let e = check_slow_fsync(Variant::AnswerBeforeSync, path, Duration::from_secs(10))
            .await
            .expect_err("must be caught");
        // Usually seen while the fsync is blocked; now and then the broken
        // store answers even before the test's first look.
        assert!(
            e.contains("while the fsync of its batch was in flight") || e.contains("before its batch was even fsynced"),
            "{path:?}: {e}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slow_fsync_check_catches_reads_released_before_the_fsync() {
    // The window only bounds how long a correct store is watched; a broken
    // one answers at once, so a long window costs nothing here.
    for path in PATHS {
        let e = check_slow_fsync(Variant::ReleaseReadsBeforeSync, path, Duration::from_secs(10))
            .await
            .expect_err("must be caught");
        assert!(e.contains("saw the unsynced batch"), "{path:?}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_failed_fsync_check_catches_answers_before_the_fsync() {
    for path in PATHS {
        let e = check_failed_fsync(Variant::AnswerBeforeSync, path).await.expect_err("must be caught");
        assert!(e.contains("answered Ok, yet the fsync of its batch failed"), "{path:?}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_failed_fsync_check_catches_reads_released_before_the_fsync() {
    for path in PATHS {
        let e = check_failed_fsync(Variant::ReleaseReadsBeforeSync, path).await.expect_err("must be caught");
        assert!(e.contains("a read returned a batch whose fsync failed"), "{path:?}: {e}");
    }
}

/// A store on a disk that records which thread made each fsync, in
/// order, and takes `delay` for each; `max_batch` operations per batch.
fn recording_store(
    dir: &tempfile::TempDir,
    syncer_only: bool,
    max_batch: usize,
    delay: Duration,
) -> (SqliteStore, Arc<Mutex<Vec<String>>>) {
    let threads = Arc::new(Mutex::new(Vec::new()));
    let t = Arc::clone(&threads);
    let hooks = TestHooks {
        wal_sync: Some(Arc::new(move |wal: &std::fs::File| {
            let name = std::thread::current().name().unwrap_or("?").to_string();
            t.lock().expect("threads").push(name);
            std::thread::sleep(delay);
            wal.sync_data()
        })),
        syncer_only,
        ..TestHooks::default()
    };
    let options = SqliteOptions { test_hooks: hooks, max_batch, ..SqliteOptions::default() };
    (SqliteStore::open(dir.path().join("duffy.db"), options).expect("open"), threads)
}

/// One operation at a time (one job at a time), the writer fsyncs each
/// batch itself: the caller does not wait for the syncer thread to wake.
/// With `syncer_only` the same writes all go through the syncer, so the
/// check can tell the two apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_nothing_waits_behind_is_fsynced_by_the_writer() {
    for syncer_only in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, threads) = recording_store(&dir, syncer_only, 256, Duration::ZERO);
        for i in 0..8 {
            store.set_pool_target(target(&format!("one{i}"), 1)).await.expect("write");
        }
        let seen = threads.lock().expect("threads").clone();
        assert_eq!(seen.len(), 8, "one fsync per write: {seen:?}");
        let expected = if syncer_only { "duffy-sqlite-syncer" } else { "duffy-sqlite-writer" };
        assert!(seen.iter().all(|t| t == expected), "syncer_only={syncer_only}: {seen:?}");
        assert_eq!(store.pool_targets().await.expect("read").len(), 8);
    }
}

/// When operations wait behind a batch, the writer hands the batch to the
/// syncer and runs the next one meanwhile (fsyncs overlap the writer's
/// work): with a slow disk and a queue, the syncer does fsyncs too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_committed_while_others_wait_go_to_the_syncer() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A slow disk, so that writes queue up behind each fsync, and one
    // operation per batch: whatever else is queued waits behind it.
    let (store, threads) = recording_store(&dir, false, 1, Duration::from_millis(5));
    let writes = (0..32).map(|i| store.set_pool_target(target(&format!("many{i}"), 1)));
    for r in futures::future::join_all(writes).await {
        r.expect("write");
    }
    let seen = threads.lock().expect("threads").clone();
    assert!(seen.iter().any(|t| t == "duffy-sqlite-syncer"), "32 queued writes, no fsync by the syncer: {seen:?}");
    assert_eq!(store.pool_targets().await.expect("read").len(), 32);
}

#[test]
fn the_default_options_set_no_hook() {
    let o = SqliteOptions::default();
    assert_eq!(o.test_hooks, TestHooks::default());
    let shown = format!("{:?}", o.test_hooks);
    assert!(shown.contains("answer_before_sync: false") && shown.contains("wal_sync: false"), "{shown}");
}
