//! [`InstallTickets`] on PostgreSQL: the tables `install_tickets` (one row
//! per host name) and `install_ticket_tokens` (token hashes, deleted with
//! their ticket), schema version 3.
//!
//! This is what lets a machine's callback reach any replica: the replica
//! that answers it checks and uses the ticket in the database, and the
//! leader, which waits for the install, reads the outcome from there.
//!
//! Every write is one transaction that locks the ticket's row
//! (`SELECT … FOR UPDATE`), decides with duffy-core's [`check_access`] or
//! [`settle_effect`] on what it read, and writes: two callbacks with one
//! token are serialised on the row, and the second reads the ticket the
//! first used (READ COMMITTED re-reads a row it waited for). Transactions
//! run through the store's write path (`tx::write`: retried on
//! serialisation failures and lost connections, a lost `COMMIT`
//! resolved), in a task of their own. A waiting installer's poll of a
//! ticket still pending is one read. Nothing here takes the claim's or
//! the fence's locks: tickets are independent of the farm's rows.

use std::net::IpAddr;

use async_trait::async_trait;
use deadpool_postgres::Object;
use duffy_core::tickets::{
    InstallTicket, InstallTickets, MAX_TICKET_TOKENS, Settle, SettleEffect, TICKET_COLUMNS, TicketAccess,
    TicketColumns, TicketId, TicketOutcome, TicketRecord, TicketState, TokenHash, check_access, settle_effect,
    state_columns,
};
use duffy_core::{StoreError, Timestamp};
use futures::FutureExt;
use tokio_postgres::Row;

use crate::PgStore;
use crate::tx::{self, Decision};

fn record(r: &Row) -> Result<TicketRecord, StoreError> {
    TicketColumns::read(|i| r.try_get(i), |i| r.try_get(i), |i| r.try_get(i))?.into_record()
}

fn records(rows: &[Row]) -> Result<Option<TicketRecord>, StoreError> {
    rows.first().map(record).transpose()
}

fn of_host_sql(lock: bool) -> String {
    let lock = if lock { " FOR UPDATE" } else { "" };
    format!("SELECT {TICKET_COLUMNS} FROM install_tickets t WHERE t.hostname = $1{lock}")
}

fn by_token_sql(lock: bool) -> String {
    let lock = if lock { " FOR UPDATE OF t" } else { "" };
    format!(
        "SELECT {TICKET_COLUMNS} FROM install_ticket_tokens k JOIN install_tickets t ON t.hostname = k.hostname \
         WHERE k.hash = $1{lock}"
    )
}

async fn of_host(c: &Object, hostname: &str, lock: bool) -> Result<Vec<Row>, tokio_postgres::Error> {
    let stmt = c.prepare_cached(&of_host_sql(lock)).await?;
    c.query(&stmt, &[&hostname]).await
}

async fn by_token(c: &Object, hash: &[u8], lock: bool) -> Result<Vec<Row>, tokio_postgres::Error> {
    let stmt = c.prepare_cached(&by_token_sql(lock)).await?;
    c.query(&stmt, &[&hash]).await
}

async fn delete(c: &Object, hostname: &str) -> Result<(), tokio_postgres::Error> {
    // The tokens go with it (ON DELETE CASCADE).
    let stmt = c.prepare_cached("DELETE FROM install_tickets WHERE hostname = $1").await?;
    c.execute(&stmt, &[&hostname]).await.map(drop)
}

async fn set_state(c: &Object, hostname: &str, state: &TicketState) -> Result<(), tokio_postgres::Error> {
    let (name, host_key, reason) = state_columns(state);
    let stmt = c
        .prepare_cached("UPDATE install_tickets SET state = $2, host_key = $3, reason = $4 WHERE hostname = $1")
        .await?;
    c.execute(&stmt, &[&hostname, &name, &host_key, &reason]).await.map(drop)
}

/// A decision on rows read in the transaction: refused (nothing written)
/// when the rows cannot be decoded.
type Decided<T> = Result<Decision<Result<T, StoreError>>, tokio_postgres::Error>;

fn undecodable<T>(e: StoreError) -> Decided<T> {
    Ok(Decision::Rollback(Err(e)))
}

impl PgStore {
    /// Runs a ticket transaction (`body` is called once per attempt).
    async fn ticket_tx<T, B>(&self, what: &'static str, body: B) -> Result<T, StoreError>
    where
        T: Send + 'static,
        B: for<'c> Fn(&'c Object) -> futures::future::BoxFuture<'c, Decided<T>> + Send + Sync + 'static,
    {
        self.spawned(what, move |store| async move { tx::write(&store.inner.pool, &store.inner.tx, what, body).await? })
            .await
    }
}

#[async_trait]
impl InstallTickets for PgStore {
    async fn register_ticket(&self, ticket: InstallTicket) -> Result<Option<TicketId>, StoreError> {
        self.ticket_tx("registering an install ticket", move |c| {
            let t = ticket.clone();
            async move {
                let old = match records(&of_host(c, &t.hostname, true).await?) {
                    Ok(o) => o,
                    Err(e) => return undecodable(e),
                };
                delete(c, &t.hostname).await?;
                let stmt = c
                    .prepare_cached(
                        "INSERT INTO install_tickets (hostname, ticket_id, ip, hardware_arch, image_release, \
                         image_arch, image_flavor, expires_at, state) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending')",
                    )
                    .await?;
                c.execute(
                    &stmt,
                    &[
                        &t.hostname,
                        &t.id.0,
                        &t.ip.to_canonical().to_string(),
                        &t.hardware_arch.as_str(),
                        &t.image.release,
                        &t.image.arch.as_str(),
                        &t.image.flavor,
                        &t.expires_at.0,
                    ],
                )
                .await?;
                Ok(Decision::Commit(Ok(old.filter(|r| r.state != TicketState::Expired).map(|r| r.ticket.id))))
            }
            .boxed()
        })
        .await
    }

    async fn ticket_of_host(&self, hostname: &str) -> Result<Option<TicketRecord>, StoreError> {
        let hostname = hostname.to_string();
        let rows = self
            .read("reading an install ticket", move |c| {
                let hostname = hostname.clone();
                async move { of_host(&c, &hostname, false).await }
            })
            .await?;
        records(&rows)
    }

    async fn issue_ticket_token(
        &self,
        hostname: &str,
        id: &TicketId,
        token: TokenHash,
        peer: IpAddr,
        now: Timestamp,
    ) -> Result<TicketAccess, StoreError> {
        let (hostname, id) = (hostname.to_string(), id.clone());
        self.ticket_tx("issuing an install token", move |c| {
            let (hostname, id) = (hostname.clone(), id.clone());
            async move {
                let rec = match records(&of_host(c, &hostname, true).await?) {
                    Ok(r) => r,
                    Err(e) => return undecodable(e),
                };
                let Some(rec) = rec.filter(|r| r.ticket.id == id && r.state == TicketState::Pending) else {
                    return Ok(Decision::Rollback(Ok(TicketAccess::Unknown)));
                };
                let access = check_access(&rec, peer, now);
                if !matches!(access, TicketAccess::Granted(_)) {
                    return Ok(Decision::Rollback(Ok(access)));
                }
                let hash = token.0.as_slice();
                let owner = c.prepare_cached("SELECT hostname FROM install_ticket_tokens WHERE hash = $1").await?;
                match c.query_opt(&owner, &[&hash]).await?.map(|r| r.try_get::<_, String>(0)).transpose()? {
                    Some(h) if h == hostname => return Ok(Decision::Rollback(Ok(access))),
                    Some(_) => return Ok(Decision::Rollback(Err(StoreError::Duplicate("install token".into())))),
                    None => {}
                }
                let insert =
                    c.prepare_cached("INSERT INTO install_ticket_tokens (hash, hostname) VALUES ($1, $2)").await?;
                c.execute(&insert, &[&hash, &hostname]).await?;
                let trim = c
                    .prepare_cached(
                        "DELETE FROM install_ticket_tokens WHERE hostname = $1 AND seq NOT IN \
                         (SELECT seq FROM install_ticket_tokens WHERE hostname = $1 ORDER BY seq DESC LIMIT $2)",
                    )
                    .await?;
                c.execute(&trim, &[&hostname, &(MAX_TICKET_TOKENS as i64)]).await?;
                Ok(Decision::Commit(Ok(access)))
            }
            .boxed()
        })
        .await
    }

    async fn ticket_by_token(
        &self,
        token: &TokenHash,
        peer: IpAddr,
        now: Timestamp,
    ) -> Result<TicketAccess, StoreError> {
        let hash = token.0.to_vec();
        let rows = self
            .read("reading an install ticket by token", move |c| {
                let hash = hash.clone();
                async move { by_token(&c, &hash, false).await }
            })
            .await?;
        Ok(records(&rows)?.map_or(TicketAccess::Unknown, |r| check_access(&r, peer, now)))
    }

    async fn use_ticket(
        &self,
        token: &TokenHash,
        peer: IpAddr,
        now: Timestamp,
        outcome: TicketOutcome,
    ) -> Result<TicketAccess, StoreError> {
        let hash = token.0.to_vec();
        self.ticket_tx("recording an install's outcome", move |c| {
            let (hash, outcome) = (hash.clone(), outcome.clone());
            async move {
                let rec = match records(&by_token(c, &hash, true).await?) {
                    Ok(Some(r)) => r,
                    Ok(None) => return Ok(Decision::Rollback(Ok(TicketAccess::Unknown))),
                    Err(e) => return undecodable(e),
                };
                let access = check_access(&rec, peer, now);
                match &access {
                    TicketAccess::Granted(_) => {
                        set_state(c, &rec.ticket.hostname, &TicketState::Used(outcome)).await?;
                    }
                    TicketAccess::Expired { .. } if rec.state == TicketState::Pending => {
                        set_state(c, &rec.ticket.hostname, &TicketState::Expired).await?;
                    }
                    _ => return Ok(Decision::Rollback(Ok(access))),
                }
                Ok(Decision::Commit(Ok(access)))
            }
            .boxed()
        })
        .await
    }

    async fn settle_ticket(
        &self,
        hostname: &str,
        id: &TicketId,
        how: Settle,
    ) -> Result<Option<TicketState>, StoreError> {
        if how == Settle::Poll {
            // Most polls find the ticket still pending: one read, no
            // transaction.
            match self.ticket_of_host(hostname).await? {
                Some(r) if r.ticket.id == *id && matches!(r.state, TicketState::Used(_)) => {}
                Some(r) if r.ticket.id == *id => return Ok(Some(settle_effect(&r.state, how).0)),
                _ => return Ok(None),
            }
        }
        let (hostname, id) = (hostname.to_string(), id.clone());
        self.ticket_tx("settling an install ticket", move |c| {
            let (hostname, id) = (hostname.clone(), id.clone());
            async move {
                let rec = match records(&of_host(c, &hostname, true).await?) {
                    Ok(r) => r,
                    Err(e) => return undecodable(e),
                };
                let Some(rec) = rec.filter(|r| r.ticket.id == id) else {
                    return Ok(Decision::Rollback(Ok(None)));
                };
                let (answer, effect) = settle_effect(&rec.state, how);
                match effect {
                    SettleEffect::Keep => return Ok(Decision::Rollback(Ok(Some(answer)))),
                    SettleEffect::Delete => delete(c, &hostname).await?,
                    SettleEffect::Tombstone => set_state(c, &hostname, &TicketState::Expired).await?,
                }
                Ok(Decision::Commit(Ok(Some(answer))))
            }
            .boxed()
        })
        .await
    }

    async fn pending_tickets(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .read("counting pending install tickets", |c| async move {
                let row = c.query_one("SELECT count(*) FROM install_tickets WHERE state = 'pending'", &[]).await?;
                row.try_get(0)
            })
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}
