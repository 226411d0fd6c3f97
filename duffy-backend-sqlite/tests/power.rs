//! Power cuts: "acknowledged means fsynced", checked against a model of
//! the disk.
//!
//! A SIGKILL leaves the page cache intact, so `crash.rs` cannot tell an
//! fsynced write from one that only reached the cache. Here the child (the
//! shared workload of `common/workload.rs`) runs with an `LD_PRELOAD` shim
//! (`tests/power/shim.c`, built by this test with the system C compiler)
//! that records every write to the database and its WAL and, at every
//! fsync or fdatasync of either, copies what that call makes durable into a
//! shadow file: whoever calls it, SQLite (checkpoints, the WAL header) or
//! the store's syncer thread (its own `fdatasync` of the WAL). An
//! `LD_PRELOAD` shim rather than a SQLite VFS: the syncer's fsync does not
//! go through SQLite, and the shim sees the real system calls of the real
//! build, unchanged.
//!
//! Each round cuts the power at a random moment: either the parent
//! SIGKILLs the child at a random time, or the shim does it during a
//! chosen fsync (after a pause in which the other threads go on writing,
//! and a broken store would answer). Then the files are rebuilt as a disk
//! would hold them, in one of two modes:
//!
//! - **synced**: everything fsynced, nothing after;
//! - **torn**: that, plus a random subset of the 4 KiB pages written since
//!   (in any order; a pending truncation applied or not).
//!
//! The `-shm` file is not durable state and is removed. Then the store is
//! reopened and checked: every acknowledged operation present, every batch
//! whole or absent, invariants, event history, SQLite's integrity check.
//! The next round runs on the rebuilt files.
//!
//! `DUFFY_POWER_CUTS` sets the number of cuts (default 24, half in each
//! mode; the documented long run uses 500); `DUFFY_POWER_SEED` replays a
//! run. `the_power_cut_test_catches_answers_before_the_fsync` runs the same
//! rounds on a store that answers before its fsync, and must fail.
//!
//! Not modelled: directory entries (the store fsyncs the directory once
//! the WAL exists), and intermediate versions of a page written twice
//! between two fsyncs (a page is either as last fsynced or as last
//! written).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::workload::{self, Acks, CHILD_ANSWER_EARLY, Child};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const PAGE: usize = 4096;

/// The child's body: does nothing unless run by the parent.
#[test]
fn power_child() {
    workload::child_main();
}

/// The shim, compiled for this run.
struct Shim {
    so: PathBuf,
    _dir: tempfile::TempDir,
}

fn build_shim() -> Shim {
    let dir = tempfile::tempdir().expect("tempdir");
    let so = dir.path().join("libpowercut.so");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/power/shim.c");
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o"])
        .arg(&so)
        .arg(&src)
        .args(["-ldl", "-lpthread"])
        .output()
        .unwrap_or_else(|e| panic!("the power-cut test needs a C compiler (cc) to build its shim: {e}"));
    assert!(out.status.success(), "building the shim failed:\n{}", String::from_utf8_lossy(&out.stderr));
    Shim { so, _dir: dir }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Synced,
    Torn,
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// What a round did, for the report.
#[derive(Debug, Default, Clone, Copy)]
struct Round {
    acknowledged: u64,
    /// Pages written since their file's last fsync when the power went.
    unsynced_pages: u64,
    /// Of those, the pages the torn rebuild kept.
    kept_pages: u64,
    /// fsyncs of the database and WAL the shim recorded.
    syncs: u64,
    /// The shim cut during an fsync (else the parent, at a random time).
    at_fsync: bool,
}

/// The page `i` of `data`, if the file reaches it.
fn page(data: &[u8], i: usize) -> Option<&[u8]> {
    let start = i * PAGE;
    (start < data.len()).then(|| &data[start..data.len().min(start + PAGE)])
}

/// The file as a disk would hold it: `durable` (as of its last fsync;
/// `None`: never synced) plus, torn, a random subset of the pages of
/// `cache` (as last written) that differ from it.
fn rebuild_file(
    durable: Option<Vec<u8>>,
    cache: &[u8],
    mode: Mode,
    rng: &mut StdRng,
    round: &mut Round,
) -> Option<Vec<u8>> {
    let base = durable.clone().unwrap_or_default();
    let pages = base.len().max(cache.len()).div_ceil(PAGE);
    let mut out = base.clone();
    let mut kept_any = false;
    for i in 0..pages {
        let (d, c) = (page(&base, i), page(cache, i));
        if d == c {
            continue;
        }
        round.unsynced_pages += 1;
        let Some(c) = c else { continue }; // truncated since: decided below
        if mode == Mode::Torn && rng.gen_bool(0.5) {
            round.kept_pages += 1;
            kept_any = true;
            let start = i * PAGE;
            if out.len() < start + c.len() {
                out.resize(start + c.len(), 0);
            }
            out[start..start + c.len()].copy_from_slice(c);
        }
    }
    if mode == Mode::Torn && cache.len() < base.len() && rng.gen_bool(0.5) {
        out.truncate(cache.len());
    }
    if durable.is_none() && !kept_any {
        return None;
    }
    Some(out)
}

/// Rebuilds the database and its WAL from the shadows (and, torn, from the
/// page cache the SIGKILL left), and removes the `-shm`.
fn rebuild(path: &Path, shadow: &Path, mode: Mode, rng: &mut StdRng, round: &mut Round) {
    for (real, durable) in [(path.to_path_buf(), shadow.join("db")), (with_suffix(path, "-wal"), shadow.join("wal"))] {
        let cache = std::fs::read(&real).unwrap_or_default();
        let durable = std::fs::read(&durable).ok();
        match rebuild_file(durable, &cache, mode, rng, round) {
            Some(data) => std::fs::write(&real, data).expect("write a rebuilt file"),
            None => {
                let _ = std::fs::remove_file(&real);
            }
        }
    }
    let _ = std::fs::remove_file(with_suffix(path, "-shm"));
}

/// The shadows start as the files are (the last round ended with a clean
/// close).
fn reset_shadow(path: &Path, shadow: &Path) {
    let _ = std::fs::remove_dir_all(shadow);
    std::fs::create_dir_all(shadow).expect("shadow dir");
    std::fs::copy(path, shadow.join("db")).expect("shadow of the database");
    if let Ok(wal) = std::fs::read(with_suffix(path, "-wal")) {
        std::fs::write(shadow.join("wal"), wal).expect("shadow of the WAL");
    }
}

struct Harness {
    shim: Shim,
    _dir: tempfile::TempDir,
    path: PathBuf,
    shadow: PathBuf,
    acks: Acks,
    rng: StdRng,
    /// Extra environment for the child (the broken store).
    env: Vec<(&'static str, String)>,
    /// Every cut during an fsync past the store's opening (else half of
    /// them, at any fsync).
    fsync_cuts_only: bool,
}

impl Harness {
    fn new(seed: u64, env: Vec<(&'static str, String)>) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("duffy.db");
        workload::seed(&path);
        let shadow = dir.path().join("shadow");
        Harness {
            shim: build_shim(),
            shadow,
            path,
            _dir: dir,
            acks: Acks::default(),
            rng: StdRng::seed_from_u64(seed),
            env,
            fsync_cuts_only: false,
        }
    }

    /// One power cut and its checks.
    fn round(&mut self, n: u64, mode: Mode) -> Result<Round, String> {
        reset_shadow(&self.path, &self.shadow);
        let mut round = Round { at_fsync: self.fsync_cuts_only || self.rng.gen_bool(0.5), ..Round::default() };
        let mut env: Vec<(&str, String)> = vec![
            ("LD_PRELOAD", self.shim.so.display().to_string()),
            ("POWERCUT_DB", self.path.display().to_string()),
            ("POWERCUT_SHADOW", self.shadow.display().to_string()),
            ("POWERCUT_PAUSE_MS", "20".into()),
        ];
        if round.at_fsync {
            let first = if self.fsync_cuts_only { 5 } else { 1 };
            env.push(("POWERCUT_CUT_AT", self.rng.gen_range(first..=60u32).to_string()));
        }
        env.extend(self.env.iter().cloned());
        let child = Child::spawn("power_child", &self.path, n, &env);
        let ended = if round.at_fsync {
            // Bounded: should the child never reach that fsync, the
            // parent cuts.
            child.wait_at_most(Duration::from_secs(15))
        } else {
            if child.wait_ready(Duration::from_secs(30)) {
                std::thread::sleep(Duration::from_millis(self.rng.gen_range(5..300)));
            }
            child.kill()
        };
        ended.killed()?;
        round.acknowledged = workload::record(&mut self.acks, &ended.lines)?;
        // "syncs N writes M", rewritten at every fsync.
        let stats = std::fs::read_to_string(self.shadow.join("stats")).unwrap_or_default();
        round.syncs = stats.split(' ').nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
        rebuild(&self.path, &self.shadow, mode, &mut self.rng, &mut round);
        workload::verify(&self.path, &self.acks)?;
        Ok(round)
    }
}

fn seed() -> u64 {
    std::env::var("DUFFY_POWER_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    })
}

#[test]
fn acknowledged_operations_survive_power_cuts() {
    let cuts: u64 = std::env::var("DUFFY_POWER_CUTS").ok().and_then(|r| r.parse().ok()).unwrap_or(24);
    let seed = seed();
    eprintln!("power-cut test: {cuts} cuts, DUFFY_POWER_SEED={seed}");
    let started = Instant::now();
    let mut totals = [(Mode::Synced, 0u64, Round::default()), (Mode::Torn, 0u64, Round::default())];
    // One harness per mode, each on its own file.
    for (mode, count, sum) in totals.iter_mut() {
        let mut h = Harness::new(seed ^ (*mode as u64), Vec::new());
        let rounds = cuts / 2 + if *mode == Mode::Synced { cuts % 2 } else { 0 };
        for n in 0..rounds {
            match h.round(n, *mode) {
                Ok(r) => {
                    *count += 1;
                    sum.acknowledged += r.acknowledged;
                    sum.unsynced_pages += r.unsynced_pages;
                    sum.kept_pages += r.kept_pages;
                    sum.syncs += r.syncs;
                    sum.at_fsync |= r.at_fsync;
                    eprintln!("{mode:?} cut {n}: {r:?}");
                }
                Err(e) => panic!("{mode:?} cut {n} (DUFFY_POWER_SEED={seed}): {e}"),
            }
        }
        let total = h.acks.total;
        assert!(total >= rounds * 5, "{mode:?}: the child did too little work to mean anything: {total}");
    }
    for (mode, count, sum) in &totals {
        eprintln!(
            "power-cut test, {mode:?}: {count} cuts, {} acknowledged operations checked, {} fsyncs recorded, \
             {} unsynced pages at the cuts, {} of them kept",
            sum.acknowledged, sum.syncs, sum.unsynced_pages, sum.kept_pages
        );
    }
    eprintln!("power-cut test: {:.1?}", started.elapsed());
}

/// The same rounds on a store that answers its callers before the fsync
/// (the test-only `answer_before_sync` hook): acknowledged operations are
/// lost, and the harness must say so.
#[test]
fn the_power_cut_test_catches_answers_before_the_fsync() {
    let seed = seed();
    let mut h = Harness::new(seed, vec![(CHILD_ANSWER_EARLY, "1".into())]);
    h.fsync_cuts_only = true;
    for n in 0..20 {
        match h.round(n, Mode::Synced) {
            Ok(_) => {}
            Err(e) => {
                assert!(e.contains("acknowledged"), "caught, but not as lost acknowledged work: {e}");
                eprintln!("caught after {} cuts: {e}", n + 1);
                return;
            }
        }
    }
    panic!("20 power cuts and the store that answers before its fsync was never caught (DUFFY_POWER_SEED={seed})");
}
