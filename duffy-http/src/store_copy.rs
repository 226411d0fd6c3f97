//! `duffy store copy --from A --to B`: a whole farm from one store into an
//! empty one (the embedded SQLite file to PostgreSQL, or back), then
//! checked there.
//!
//! The source is read as one snapshot; the destination is written in one
//! transaction (nothing of a failed copy remains) with every row as it is
//! (ids, versions, `seq`), the event log in pages. Then the destination is
//! read back: its dump must equal the source's, its event log must match
//! page by page, and the farm-wide invariants and the history replay must
//! hold there. A SQLite file is locked for the copy (a service running on
//! it is refused: stop it first); PostgreSQL replicas should be stopped
//! too, or the copy is of one moment of a farm that moves on.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use duffy_backend_postgres::{PgExport, PgImport, PgOptions, PgStore};
use duffy_backend_sqlite::{SqliteExport, SqliteImport, SqliteOptions, SqliteStore};
use duffy_core::audit::{check_history, check_invariants};
use duffy_core::dump::{DumpCounts, FarmDump};
use duffy_core::{Event, Store, StoreError};

use crate::control::{ControlPaths, DbLock};

/// Events per page.
const PAGE: usize = 10_000;

/// Why a copy failed. The destination holds no farm unless the message
/// says the copy was written and the check after it failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// Opening, reading or writing a store failed.
    #[error("{what}: {source}")]
    Store {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// A SQLite file is in use.
    #[error("{0}")]
    InUse(String),
    /// The copy was written but does not match its source.
    #[error("the copy in {to} was written but does not match {from}: {detail}")]
    Mismatch {
        /// The source.
        from: String,
        /// The destination.
        to: String,
        /// What differs.
        detail: String,
    },
}

/// What a copy did, as printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyReport {
    /// The source, as shown (no password).
    pub from: String,
    /// The destination, as shown.
    pub to: String,
    /// Rows copied.
    pub counts: DumpCounts,
}

impl fmt::Display for CopyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "copied {} from {} to {}", self.counts, self.from, self.to)?;
        writeln!(f, "checked: the copy reads back equal to the source; invariants and history hold")
    }
}

/// A store location as shown in messages: a path, or a URL without its
/// password.
pub fn describe(db: &Path) -> String {
    match db.to_str().filter(|s| duffy_backend_postgres::is_postgres_url(s)) {
        Some(url) => match url.parse::<duffy_backend_postgres::tokio_postgres::Config>() {
            Ok(cfg) => {
                let host = match cfg.get_hosts().first() {
                    Some(duffy_backend_postgres::tokio_postgres::config::Host::Tcp(h)) => h.clone(),
                    Some(duffy_backend_postgres::tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
                    None => "localhost".into(),
                };
                format!(
                    "postgres://{}@{host}:{}/{}",
                    cfg.get_user().unwrap_or("?"),
                    cfg.get_ports().first().copied().unwrap_or(5432),
                    cfg.get_dbname().unwrap_or("?")
                )
            }
            Err(_) => "an invalid postgres:// URL".into(),
        },
        None => db.display().to_string(),
    }
}

fn store_err(what: impl Into<String>) -> impl FnOnce(StoreError) -> CopyError {
    let what = what.into();
    move |source| CopyError::Store { what, source }
}

fn pg_options() -> PgOptions {
    PgOptions { pool_size: 2, role: "command".into(), ..PgOptions::default() }
}

/// Takes a SQLite file's lock: the copy must be the only user.
fn lock(db: &Path) -> Result<DbLock, CopyError> {
    let paths = ControlPaths::for_db(db).map_err(|e| CopyError::InUse(e.to_string()))?;
    DbLock::try_acquire(&paths, "duffy store copy").map_err(|e| CopyError::InUse(e.to_string()))?.ok_or_else(|| {
        CopyError::InUse(format!(
            "{} is in use by {}; stop it (the copy must be the only user of the file)",
            db.display(),
            paths.holder()
        ))
    })
}

enum Source {
    Sqlite(Option<SqliteExport>),
    /// The store is kept open for as long as its snapshot is read.
    Postgres {
        export: PgExport,
        _store: PgStore,
    },
}

impl Source {
    async fn dump(&mut self) -> Result<FarmDump, StoreError> {
        match self {
            Source::Sqlite(e) => {
                let e = e.take().ok_or(StoreError::Closed)?;
                let (e, d) = blocking(move || {
                    let d = e.dump();
                    (e, d)
                })
                .await?;
                *self = Source::Sqlite(Some(e));
                d
            }
            Source::Postgres { export, .. } => export.dump().await,
        }
    }

    async fn events(&mut self, after: u64) -> Result<Vec<Event>, StoreError> {
        match self {
            Source::Sqlite(e) => {
                let e = e.take().ok_or(StoreError::Closed)?;
                let (e, page) = blocking(move || {
                    let p = e.events(after, PAGE);
                    (e, p)
                })
                .await?;
                *self = Source::Sqlite(Some(e));
                page
            }
            Source::Postgres { export, .. } => export.events(after, PAGE).await,
        }
    }
}

enum Dest {
    Sqlite(Option<SqliteImport>),
    Postgres(PgImport, PgStore),
}

impl Dest {
    async fn run<T: Send + 'static>(
        &mut self,
        sqlite: impl FnOnce(&mut SqliteImport) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let Dest::Sqlite(slot) = self else { return Err(StoreError::Closed) };
        let mut i = slot.take().ok_or(StoreError::Closed)?;
        let (i, r) = blocking(move || {
            let r = sqlite(&mut i);
            (i, r)
        })
        .await?;
        *slot = Some(i);
        r
    }

    async fn write_dump(&mut self, dump: &FarmDump) -> Result<(), StoreError> {
        match self {
            Dest::Postgres(i, _) => i.write_dump(dump).await,
            Dest::Sqlite(_) => {
                let dump = dump.clone();
                self.run(move |i| i.write_dump(&dump)).await
            }
        }
    }

    async fn write_events(&mut self, events: Vec<Event>) -> Result<(), StoreError> {
        match self {
            Dest::Postgres(i, _) => i.write_events(&events).await,
            Dest::Sqlite(_) => self.run(move |i| i.write_events(&events)).await,
        }
    }

    async fn finish(self) -> Result<(), StoreError> {
        match self {
            Dest::Postgres(i, _) => i.finish().await,
            Dest::Sqlite(Some(i)) => blocking(move || i.finish()).await?,
            Dest::Sqlite(None) => Err(StoreError::Closed),
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| StoreError::backend("running a blocking step of the copy", e))
}

/// Copies the farm at `from` into the empty store at `to`, then checks it.
pub async fn copy(from: &Path, to: &Path) -> Result<CopyReport, CopyError> {
    let (from_name, to_name) = (describe(from), describe(to));
    if from == to {
        return Err(CopyError::InUse(format!("--from and --to are the same store ({from_name})")));
    }
    // Locks of SQLite files, held until the copy is checked.
    let mut locks = Vec::new();
    let mut source = match from.to_str().filter(|s| duffy_backend_postgres::is_postgres_url(s)) {
        Some(url) => {
            let store = PgStore::connect(url, pg_options())
                .await
                .map_err(|e| store_err(format!("opening {from_name}"))(e.into()))?;
            let export = store.export().await.map_err(store_err(format!("reading {from_name}")))?;
            Source::Postgres { export, _store: store }
        }
        None => {
            locks.push(lock(from)?);
            let path = from.to_path_buf();
            let export = blocking(move || SqliteExport::open(path))
                .await
                .map_err(store_err(format!("opening {from_name}")))?
                .map_err(|e| store_err(format!("opening {from_name}"))(e.into()))?;
            Source::Sqlite(Some(export))
        }
    };
    let mut dest = match to.to_str().filter(|s| duffy_backend_postgres::is_postgres_url(s)) {
        Some(url) => {
            let store = PgStore::connect(url, pg_options())
                .await
                .map_err(|e| store_err(format!("opening {to_name}"))(e.into()))?;
            let import = store.import().await.map_err(store_err(format!("writing {to_name}")))?;
            Dest::Postgres(import, store)
        }
        None => {
            locks.push(lock(to)?);
            let path = to.to_path_buf();
            let import = blocking(move || SqliteImport::create(path))
                .await
                .map_err(store_err(format!("opening {to_name}")))?
                .map_err(store_err(format!("writing {to_name}")))?;
            Dest::Sqlite(Some(import))
        }
    };

    let dump = source.dump().await.map_err(store_err(format!("reading {from_name}")))?;
    dest.write_dump(&dump).await.map_err(store_err(format!("writing {to_name}")))?;
    let mut after = 0;
    let mut events = 0u64;
    loop {
        let page = source.events(after).await.map_err(store_err(format!("reading {from_name}'s events")))?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        events += page.len() as u64;
        dest.write_events(page).await.map_err(store_err(format!("writing {to_name}'s events")))?;
    }
    let dest_pg = match &dest {
        Dest::Postgres(_, s) => Some(s.clone()),
        Dest::Sqlite(_) => None,
    };
    dest.finish().await.map_err(store_err(format!("committing {to_name}")))?;
    let counts = dump.counts(events);

    // Read the copy back: as a dump, page by page, and as a store.
    let mismatch = |detail: String| CopyError::Mismatch { from: from_name.clone(), to: to_name.clone(), detail };
    let (copied, mut reread): (Arc<dyn Store>, Source) = match dest_pg {
        Some(pg) => {
            let export = pg.export().await.map_err(store_err(format!("reading {to_name}")))?;
            (Arc::new(pg.clone()), Source::Postgres { export, _store: pg })
        }
        None => {
            let path = to.to_path_buf();
            let store = blocking(move || SqliteStore::open(path, SqliteOptions::default()))
                .await
                .map_err(store_err(format!("opening {to_name}")))?
                .map_err(|e| store_err(format!("opening {to_name}"))(e.into()))?;
            let path = to.to_path_buf();
            let export = blocking(move || SqliteExport::open(path))
                .await
                .map_err(store_err(format!("reading {to_name}")))?
                .map_err(|e| store_err(format!("reading {to_name}"))(e.into()))?;
            (Arc::new(store), Source::Sqlite(Some(export)))
        }
    };
    let back = reread.dump().await.map_err(store_err(format!("reading {to_name}")))?;
    if back != dump {
        let got = back.counts(0);
        let want = dump.counts(0);
        return Err(mismatch(format!("read back {got}, expected {want} (or rows differ)")));
    }
    let mut after = 0;
    let mut seen = 0u64;
    loop {
        let a = source.events(after).await.map_err(store_err(format!("reading {from_name}'s events")))?;
        let b = reread.events(after).await.map_err(store_err(format!("reading {to_name}'s events")))?;
        if a != b {
            let at = a.iter().zip(&b).find(|(x, y)| x != y).map(|(x, _)| x.seq).unwrap_or(after);
            return Err(mismatch(format!("the event logs differ from seq {at} on")));
        }
        let Some(last) = a.last() else { break };
        after = last.seq;
        seen += a.len() as u64;
    }
    if seen != events {
        return Err(mismatch(format!("{seen} events read back, {events} written")));
    }
    check_invariants(&*copied).await.map_err(|e| mismatch(format!("invariants: {e}")))?;
    check_history(&*copied).await.map_err(|e| mismatch(format!("history: {e}")))?;
    drop(copied);
    drop(locks);
    Ok(CopyReport { from: from_name, to: to_name, counts })
}
