//! `duffy-load`: simulates M concurrent Jenkins jobs against a Duffy server.
//!
//! Each job gets k nodes (`/Node/get`), holds them for a configurable time
//! (zero for a pure API benchmark) and releases them (`/Node/done`), over
//! and over, for a fixed duration or number of jobs. It reports get+done
//! cycles per second, request latency percentiles, errors by kind and how
//! often jobs had to wait for nodes; a progress line while it runs; JSON for
//! scripts.
//!
//! It speaks HTTP/1.1 itself over keep-alive connections (one per job), so
//! that on a shared 2-core machine the generator costs as little CPU as
//! possible and the numbers measure the server.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Load generator for Duffy.
#[derive(Debug, Parser, Clone)]
#[command(name = "duffy-load", version, about)]
struct Args {
    /// The server, e.g. http://127.0.0.1:8080. Repeat the flag for several
    /// replicas: jobs are spread over them in turn.
    #[arg(long = "url", default_values_t = ["http://127.0.0.1:8080".to_string()])]
    urls: Vec<String>,
    /// API key(s); jobs use them in turn. Repeat the flag for several.
    #[arg(long = "key", required = true)]
    keys: Vec<String>,
    /// Concurrent jobs.
    #[arg(long, short = 'c', default_value_t = 64)]
    concurrency: usize,
    /// Nodes per job.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Release (`ver`).
    #[arg(long, default_value = "7")]
    ver: String,
    /// Architecture.
    #[arg(long, default_value = "x86_64")]
    arch: String,
    /// How long a job holds its nodes, in milliseconds.
    #[arg(long, default_value_t = 0)]
    hold_ms: u64,
    /// Run for this many seconds...
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// ...or stop after this many completed jobs (overrides --duration).
    #[arg(long)]
    jobs: Option<u64>,
    /// Seconds of warm-up excluded from the results.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Milliseconds to wait before asking again when no node is Ready.
    #[arg(long, default_value_t = 5)]
    retry_ms: u64,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
    /// Baseline mode: instead of jobs, every worker GETs this path in a loop
    /// (e.g. /healthz), to measure the HTTP stack alone in the same run.
    #[arg(long, value_name = "PATH")]
    baseline_path: Option<String>,
    /// Measure fsync (write 4 KiB + fdatasync) in this directory before the
    /// run (put it where the server's database is) and report it.
    #[arg(long, value_name = "DIR")]
    fsync_dir: Option<std::path::PathBuf>,
}

#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error("bad --url {0:?}: only http://host:port is supported")]
    Url(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("bad response: {0}")]
    Protocol(String),
}

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    addr: String,
    host: String,
    stream: Option<BufReader<TcpStream>>,
}

impl Conn {
    fn new(addr: &str) -> Self {
        Conn { addr: addr.to_string(), host: addr.to_string(), stream: None }
    }

    /// GET `path`; returns (status, body). Reconnects once if the server
    /// closed the connection.
    async fn get(&mut self, path: &str) -> Result<(u16, String), LoadError> {
        for attempt in 0..2 {
            if self.stream.is_none() {
                let s = TcpStream::connect(&self.addr).await?;
                s.set_nodelay(true)?;
                self.stream = Some(BufReader::new(s));
            }
            match self.try_get(path).await {
                Ok(r) => return Ok(r),
                Err(e) => {
                    self.stream = None;
                    if attempt == 1 {
                        return Err(e);
                    }
                }
            }
        }
        Err(LoadError::Protocol("unreachable".into()))
    }

    async fn try_get(&mut self, path: &str) -> Result<(u16, String), LoadError> {
        let s = self.stream.as_mut().ok_or_else(|| LoadError::Protocol("not connected".into()))?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\n\r\n", self.host);
        s.get_mut().write_all(req.as_bytes()).await?;
        let mut line = String::new();
        if s.read_line(&mut line).await? == 0 {
            return Err(LoadError::Protocol("connection closed".into()));
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| LoadError::Protocol(format!("status line {line:?}")))?;
        let mut len = None;
        let mut close = false;
        loop {
            line.clear();
            s.read_line(&mut line).await?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse::<usize>().ok();
                } else if k.eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close") {
                    close = true;
                }
            }
        }
        let len = len.ok_or_else(|| LoadError::Protocol("no content-length".into()))?;
        let mut body = vec![0; len];
        s.read_exact(&mut body).await?;
        if close {
            self.stream = None;
        }
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

#[derive(Default)]
struct JobStats {
    get_us: Vec<u32>,
    done_us: Vec<u32>,
    cycles: u64,
    waits: u64,
    errors: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
struct Percentiles {
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    count: usize,
}

#[derive(Debug, Serialize)]
struct Report {
    concurrency: usize,
    count: u32,
    hold_ms: u64,
    seconds: f64,
    cycles: u64,
    cycles_per_second: f64,
    requests_per_second: f64,
    all_requests: Percentiles,
    get: Percentiles,
    done: Percentiles,
    waits_for_nodes: u64,
    errors: BTreeMap<String, u64>,
    /// Write 4 KiB + fdatasync in --fsync-dir, measured before the run.
    fsync: Option<Percentiles>,
}

/// Times `n` rounds of writing 4 KiB and `fdatasync` in `dir`.
fn measure_fsync(dir: &std::path::Path, n: usize) -> Result<Percentiles, LoadError> {
    use std::io::Write;
    let path = dir.join(format!(".duffy-load-fsync-{}", std::process::id()));
    let mut f = std::fs::File::create(&path)?;
    let block = [0x5au8; 4096];
    let mut us = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        us.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
    }
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(percentiles(&mut us))
}

/// Baseline worker: GET `path` in a loop.
async fn baseline(
    addr: String,
    path: String,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> JobStats {
    let mut st = JobStats::default();
    let mut conn = Conn::new(&addr);
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let r = conn.get(&path).await;
        let took = t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
        match r {
            Ok((s, _)) if s < 400 => {
                if measuring.load(Ordering::Relaxed) {
                    st.get_us.push(took);
                    st.cycles += 1;
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok((s, b)) => {
                let b: String = b.trim().chars().take(80).collect();
                *st.errors.entry(format!("{path} {s}: {b}")).or_default() += 1;
            }
            Err(e) => *st.errors.entry(format!("{path}: {e}")).or_default() += 1,
        }
    }
    st
}

fn percentiles(v: &mut [u32]) -> Percentiles {
    v.sort_unstable();
    let at = |p: f64| {
        if v.is_empty() { 0.0 } else { f64::from(v[((v.len() as f64 - 1.0) * p).round() as usize]) / 1000.0 }
    };
    Percentiles { p50_ms: at(0.5), p95_ms: at(0.95), p99_ms: at(0.99), max_ms: at(1.0), count: v.len() }
}

fn field<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    // The success body is {"hosts":[...],"ssid":"..."}: find "ssid":"...".
    let key = format!("\"{name}\":\"");
    let start = body.find(&key)? + key.len();
    let end = body[start..].find('"')? + start;
    Some(&body[start..end])
}

async fn job(
    args: Arc<Args>,
    addr: String,
    key: String,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    done_jobs: Arc<AtomicU64>,
) -> JobStats {
    let mut st = JobStats::default();
    let mut conn = Conn::new(&addr);
    let get_path = format!("/Node/get?key={key}&ver={}&arch={}&count={}", args.ver, args.arch, args.count);
    let err = |st: &mut JobStats, kind: String| *st.errors.entry(kind).or_default() += 1;
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let r = conn.get(&get_path).await;
        let took = t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
        let measure = measuring.load(Ordering::Relaxed);
        let (status, body) = match r {
            Ok(x) => x,
            Err(e) => {
                err(&mut st, format!("get: {e}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if measure {
            st.get_us.push(took);
        }
        let Some(ssid) = field(&body, "ssid").map(str::to_string) else {
            if body == "Insufficient Nodes in READY State" {
                if measure {
                    st.waits += 1;
                }
                tokio::time::sleep(Duration::from_millis(args.retry_ms)).await;
            } else if measure {
                err(&mut st, format!("get {status}: {}", body.trim().chars().take(80).collect::<String>()));
            }
            continue;
        };
        if args.hold_ms > 0 {
            tokio::time::sleep(Duration::from_millis(args.hold_ms)).await;
        }
        let t = Instant::now();
        let r = conn.get(&format!("/Node/done?key={key}&ssid={ssid}")).await;
        let took = t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
        let measure = measuring.load(Ordering::Relaxed);
        match r {
            Ok((200, b)) if b.trim() == "\"Done\"" => {
                if measure {
                    st.done_us.push(took);
                    st.cycles += 1;
                }
                done_jobs.fetch_add(1, Ordering::Relaxed);
            }
            Ok((status, b)) => {
                err(&mut st, format!("done {status}: {}", b.trim().chars().take(80).collect::<String>()))
            }
            Err(e) => err(&mut st, format!("done: {e}")),
        }
    }
    st
}

async fn run(args: Args) -> Result<Report, LoadError> {
    let addrs = args
        .urls
        .iter()
        .map(|url| {
            url.strip_prefix("http://")
                .map(|r| r.trim_end_matches('/').to_string())
                .filter(|a| !a.is_empty() && !a.contains('/'))
                .ok_or_else(|| LoadError::Url(url.clone()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let fsync = match &args.fsync_dir {
        Some(dir) => Some(measure_fsync(dir, 300)?),
        None => None,
    };
    // Fail fast if nothing listens there.
    for addr in &addrs {
        Conn::new(addr).get("/healthz").await?;
    }
    let args = Arc::new(args);
    let measuring = Arc::new(AtomicBool::new(args.warmup <= 0.0));
    let stop = Arc::new(AtomicBool::new(false));
    let done_jobs = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..args.concurrency {
        let key = args.keys[i % args.keys.len()].clone();
        let addr = addrs[i % addrs.len()].clone();
        if let Some(path) = &args.baseline_path {
            let path = path.clone();
            tasks.push(tokio::spawn(baseline(addr.clone(), path, measuring.clone(), stop.clone(), done_jobs.clone())));
        } else {
            tasks.push(tokio::spawn(job(
                args.clone(),
                addr.clone(),
                key,
                measuring.clone(),
                stop.clone(),
                done_jobs.clone(),
            )));
        }
    }
    if args.warmup > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
        measuring.store(true, Ordering::Relaxed);
    }
    let started = Instant::now();
    let base_jobs = done_jobs.load(Ordering::Relaxed);
    let deadline = started + Duration::from_secs_f64(args.duration);
    let mut last = (started, base_jobs);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = Instant::now();
        let jobs = done_jobs.load(Ordering::Relaxed) - base_jobs;
        let finished = match args.jobs {
            Some(n) => jobs >= n,
            None => now >= deadline,
        };
        if !args.quiet && (now.duration_since(last.0) >= Duration::from_secs(1) || finished) {
            let rate = (jobs - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
            eprint!(
                "\r{:>6.1}s  {:>9} cycles  {:>9.0} cycles/s   ",
                now.duration_since(started).as_secs_f64(),
                jobs,
                rate
            );
            last = (now, jobs);
        }
        if finished {
            break;
        }
    }
    measuring.store(false, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    if !args.quiet {
        eprintln!();
    }
    let mut all = JobStats::default();
    for t in tasks {
        let st = t.await.map_err(|e| LoadError::Protocol(format!("a job panicked: {e}")))?;
        all.get_us.extend(st.get_us);
        all.done_us.extend(st.done_us);
        all.cycles += st.cycles;
        all.waits += st.waits;
        for (k, v) in st.errors {
            *all.errors.entry(k).or_default() += v;
        }
    }
    let mut both: Vec<u32> = all.get_us.iter().chain(all.done_us.iter()).copied().collect();
    let requests = both.len();
    Ok(Report {
        concurrency: args.concurrency,
        count: args.count,
        hold_ms: args.hold_ms,
        seconds,
        cycles: all.cycles,
        cycles_per_second: all.cycles as f64 / seconds,
        requests_per_second: requests as f64 / seconds,
        all_requests: percentiles(&mut both),
        get: percentiles(&mut all.get_us),
        done: percentiles(&mut all.done_us),
        waits_for_nodes: all.waits,
        errors: all.errors,
        fsync,
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let json = args.json;
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("duffy-load: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(r) => {
            if json {
                match serde_json::to_string_pretty(&r) {
                    Ok(s) => println!("{s}"),
                    Err(e) => eprintln!("duffy-load: {e}"),
                }
            } else {
                println!(
                    "{} jobs x {} node(s), hold {} ms: {} cycles in {:.1} s = {:.0} cycles/s ({:.0} requests/s)",
                    r.concurrency, r.count, r.hold_ms, r.cycles, r.seconds, r.cycles_per_second, r.requests_per_second
                );
                for (name, p) in [("all", &r.all_requests), ("get", &r.get), ("done", &r.done)] {
                    println!(
                        "  {name:<4} latency ms: p50 {:.2}  p95 {:.2}  p99 {:.2}  max {:.2}  ({} requests)",
                        p.p50_ms, p.p95_ms, p.p99_ms, p.max_ms, p.count
                    );
                }
                println!("  waits for nodes: {}", r.waits_for_nodes);
                if let Some(f) = &r.fsync {
                    println!(
                        "  fsync (4 KiB + fdatasync) ms: p50 {:.2}  p99 {:.2}  max {:.2}",
                        f.p50_ms, f.p99_ms, f.max_ms
                    );
                }
                if r.errors.is_empty() {
                    println!("  errors: none");
                } else {
                    for (k, v) in &r.errors {
                        println!("  error x{v}: {k}");
                    }
                }
            }
            if r.errors.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(2) }
        }
        Err(e) => {
            eprintln!("duffy-load: {e}");
            ExitCode::FAILURE
        }
    }
}
