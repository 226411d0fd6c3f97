//! Where the service's log lines go: a buffer that a thread of its own
//! writes out in batches.
//!
//! A request's worker thread formats its line and appends it to a shared
//! buffer under a short lock; it never writes to stderr (a file or a pipe
//! under a service manager, which can block). The first line into an
//! empty buffer wakes the writer thread, which lets [`FLUSH_EVERY`] of
//! lines gather (less if the buffer fills), takes everything buffered and
//! writes it with one call: at most one wake-up per period under load,
//! none while the service is idle.
//!
//! Why not `tracing-appender`'s non-blocking writer, which the service
//! used before: its worker thread blocks on a channel and is woken for
//! every line, and writes each line with its own `write(2)`. At two INFO
//! lines per get+done cycle that was a thread wake-up and a system call
//! per line: one job at a time, `RUST_LOG=warn` made get and done 5–20%
//! faster than `info` (BENCHMARKS.md, issue 13). Batching the lines makes
//! that cost a few wake-ups per second whatever the rate.
//!
//! Not lossy: when the buffer holds [`MAX_BUFFERED`] bytes, loggers wait
//! for the writer thread to take it. A line is never split or interleaved
//! with another (a line is appended whole, when the formatter is done
//! with it). What was buffered when the process dies without unwinding
//! (SIGKILL, abort) is lost: at most [`FLUSH_EVERY`] of lines.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long a line may wait in the buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(20);

/// How much may be buffered before loggers wait for the writer thread.
pub const MAX_BUFFERED: usize = 4 << 20;

struct State {
    buf: Vec<u8>,
    /// The guard was dropped: write what is left and stop.
    closing: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when the buffer is full or the writer must stop (wakes the
    /// writer thread), and when the writer has taken the buffer (wakes
    /// waiting loggers).
    changed: Condvar,
    max: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The `MakeWriter` of the subscriber: cheap to clone, one per line.
#[derive(Clone)]
pub struct BatchedWriter {
    shared: Arc<Shared>,
}

/// Flushes what is buffered and stops the writer thread when dropped:
/// hold it until the process ends.
pub struct FlushOnDrop {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl BatchedWriter {
    /// A writer to `out`, written by a thread named `name` every `every`
    /// (`None`: only when `max` bytes are buffered, and at the end; for
    /// tests, which must not depend on timing).
    pub fn new<W: Write + Send + 'static>(
        out: W,
        name: &str,
        every: Option<Duration>,
        max: usize,
    ) -> io::Result<(BatchedWriter, FlushOnDrop)> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State { buf: Vec::new(), closing: false }),
            changed: Condvar::new(),
            max: max.max(1),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new().name(name.to_string()).spawn(move || drain(&s, out, every))?;
        Ok((BatchedWriter { shared: shared.clone() }, FlushOnDrop { shared, thread: Some(thread) }))
    }
}

/// The writer thread: takes the buffer when its time comes, the buffer is
/// full, or the guard is dropped, and writes it out. A failed write (stderr
/// closed) drops those lines: there is nowhere to report it.
fn drain<W: Write>(shared: &Shared, mut out: W, every: Option<Duration>) {
    let mut taken = Vec::new();
    loop {
        let closing = {
            let mut st = shared.lock();
            let full = |st: &mut State| st.closing || st.buf.len() >= shared.max;
            st = match every {
                // Asleep while there is nothing to write (an idle service
                // wakes no thread), then a period for more lines to
                // gather, cut short if the buffer fills.
                Some(d) => {
                    let idle = |st: &mut State| st.buf.is_empty() && !st.closing;
                    st = shared.changed.wait_while(st, idle).unwrap_or_else(PoisonError::into_inner);
                    shared.changed.wait_timeout_while(st, d, |st| !full(st)).unwrap_or_else(PoisonError::into_inner).0
                }
                None => shared.changed.wait_while(st, |st| !full(st)).unwrap_or_else(PoisonError::into_inner),
            };
            std::mem::swap(&mut st.buf, &mut taken);
            st.closing
        };
        // Loggers waiting for room may go on.
        shared.changed.notify_all();
        if !taken.is_empty() {
            let _ = out.write_all(&taken).and_then(|()| out.flush());
            taken.clear();
        }
        if closing && shared.lock().buf.is_empty() {
            return;
        }
    }
}

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One line being formatted: appended to the shared buffer whole when the
/// formatter drops it.
pub struct Line {
    shared: Arc<Shared>,
    line: Vec<u8>,
}

impl Write for Line {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.line.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if self.line.is_empty() {
            return;
        }
        let shared = &self.shared;
        let mut st = shared.lock();
        // Full: wake the writer thread and wait until it has taken the
        // buffer (or is gone, when the line is written straight out).
        while st.buf.len() >= shared.max && !st.closing {
            shared.changed.notify_all();
            st = shared.changed.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        if st.closing {
            drop(st);
            let _ = io::stderr().write_all(&self.line);
            return;
        }
        let was_empty = st.buf.is_empty();
        st.buf.extend_from_slice(&self.line);
        // The first line after a write wakes the writer thread (it then
        // lets a period's lines gather); a full buffer wakes it at once.
        if was_empty || st.buf.len() >= shared.max {
            shared.changed.notify_all();
        }
    }
}

impl<'a> MakeWriter<'a> for BatchedWriter {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line { shared: self.shared.clone(), line: Vec::with_capacity(256) }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

    use super::*;

    /// Records each `write_all` it gets.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn log(w: &BatchedWriter, text: &str) {
        let mut l = w.make_writer();
        // As the formatter does: a line in several writes.
        let (a, b) = text.split_at(text.len() / 2);
        l.write_all(a.as_bytes()).unwrap();
        l.write_all(b.as_bytes()).unwrap();
        l.write_all(b"\n").unwrap();
    }

    /// Every line of every thread arrives whole, each thread's in its
    /// order, in writes of many lines; nothing is left when the guard is
    /// dropped.
    #[test]
    fn lines_arrive_whole_in_order_and_batched() {
        let sink = Sink::default();
        let (w, guard) = BatchedWriter::new(sink.clone(), "test-log", None, 64 << 10).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..2_000 {
                        log(&w, &format!("thread {t} line {i} {}", "x".repeat(i % 50)));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let writes = sink.0.lock().unwrap().clone();
        let text = String::from_utf8(writes.concat()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 8_000);
        for t in 0..4 {
            let mine: Vec<usize> = lines
                .iter()
                .filter(|l| l.starts_with(&format!("thread {t} ")))
                .map(|l| {
                    let i: usize = l.split(' ').nth(3).unwrap().parse().unwrap();
                    assert_eq!(*l, format!("thread {t} line {i} {}", "x".repeat(i % 50)), "a line arrived whole");
                    i
                })
                .collect();
            assert_eq!(mine, (0..2_000).collect::<Vec<_>>(), "thread {t}'s lines in order");
        }
        // About 300 KB through a 64 KB buffer: a few writes, not 8,000.
        assert!(writes.len() <= 8_000 * 60 / (64 << 10) + 2 * 4 + 1, "{} writes", writes.len());
    }

    /// A full buffer makes the logger wait for the writer thread; nothing
    /// is dropped.
    #[test]
    fn a_full_buffer_makes_loggers_wait_not_drop() {
        let sink = Sink::default();
        let (w, guard) = BatchedWriter::new(sink.clone(), "test-log", None, 100).unwrap();
        for i in 0..1_000 {
            log(&w, &format!("line {i:04} of a small buffer"));
        }
        drop(guard);
        let text = String::from_utf8(sink.0.lock().unwrap().concat()).unwrap();
        let expected: String = (0..1_000).map(|i| format!("line {i:04} of a small buffer\n")).collect();
        assert_eq!(text, expected);
    }

    /// With a period, a line goes out without the guard being dropped.
    #[test]
    fn a_line_is_written_within_the_period() {
        let sink = Sink::default();
        let (w, _guard) =
            BatchedWriter::new(sink.clone(), "test-log", Some(Duration::from_millis(5)), 1 << 20).unwrap();
        log(&w, "hello");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while sink.0.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "never written");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(sink.0.lock().unwrap().concat(), b"hello\n");
    }
}
