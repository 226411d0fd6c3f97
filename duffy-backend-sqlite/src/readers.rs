//! The reader pool: a few threads, each with its own read-only connection,
//! taking read jobs from one shared queue.
//!
//! In WAL mode a reader sees the last committed state as of the start of
//! its statement and never waits for the writer, and the writer never
//! waits for readers. Answers come back on oneshot channels, so the pool
//! works under any async executor.

use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use duffy_core::StoreError;
use futures::channel::oneshot;
use rusqlite::Connection;
use tracing::debug;

use crate::durability::Durability;

/// A read to run on some reader's connection.
pub(crate) type Job = Box<dyn FnOnce(&Connection) + Send>;

/// The pool's handle: a queue and its threads.
pub(crate) struct Readers {
    tx: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
    durability: Arc<Durability>,
}

impl Readers {
    /// Starts one thread per connection.
    pub(crate) fn start(conns: Vec<Connection>, durability: Arc<Durability>) -> Result<Readers, std::io::Error> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut readers = Readers { tx: Some(tx), threads: Vec::with_capacity(conns.len()), durability };
        for (i, conn) in conns.into_iter().enumerate() {
            let rx = Arc::clone(&rx);
            let t = std::thread::Builder::new()
                .name(format!("duffy-sqlite-reader-{i}"))
                .spawn(move || reader_loop(&conn, &rx))?;
            readers.threads.push(t);
        }
        Ok(readers)
    }

    /// Runs `f` on a reader connection and returns its result, once
    /// everything it could have seen is durable (see
    /// [`crate::durability`]).
    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let durability = Arc::clone(&self.durability);
        let job: Job = Box::new(move |conn| {
            let result = f(conn);
            let seen = durability.visible();
            durability.when_durable(
                seen,
                Box::new(move |durable: Result<(), StoreError>| {
                    let _ = reply.send(durable.and(result));
                }),
            );
        });
        let tx = self.tx.as_ref().ok_or(StoreError::Closed)?;
        tx.send(job).map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

fn reader_loop(conn: &Connection, rx: &Mutex<Receiver<Job>>) {
    loop {
        // Whoever holds the lock waits for the next job; the others wait
        // for the lock. The lock is released before the job runs.
        let job = {
            let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
            rx.recv()
        };
        match job {
            Ok(job) => job(conn),
            Err(_) => break,
        }
    }
    debug!("SQLite reader thread stopping");
}

impl Drop for Readers {
    fn drop(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
