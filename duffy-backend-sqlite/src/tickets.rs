//! [`InstallTickets`] on SQLite: the tables `install_tickets` (one row per
//! host name) and `install_ticket_tokens` (token hashes, deleted with
//! their ticket), schema version 10.
//!
//! Writes run on the writer thread like every other write, so each is one
//! step of the single writer: the read, the decision (duffy-core's
//! [`check_access`] and [`settle_effect`]) and the write cannot interleave
//! with another. Reads go to the reader pool. A waiting installer's poll
//! of a ticket still pending is a read only.

use std::net::IpAddr;

use async_trait::async_trait;
use duffy_core::tickets::{
    InstallTicket, InstallTickets, MAX_TICKET_TOKENS, Settle, SettleEffect, TICKET_COLUMNS, TicketAccess,
    TicketColumns, TicketId, TicketOutcome, TicketRecord, TicketState, TokenHash, check_access, settle_effect,
    state_columns,
};
use duffy_core::{StoreError, Timestamp};
use futures::channel::oneshot;
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::SqliteStore;
use crate::queries::Context;
use crate::writer::{Finish, Op, Reply, outcome};

fn record(r: &Row<'_>) -> Result<TicketRecord, StoreError> {
    TicketColumns::read(|i| r.get(i), |i| r.get(i), |i| r.get(i))?.into_record()
}

fn one(
    conn: &Connection,
    sql: &str,
    param: &dyn rusqlite::ToSql,
    what: &str,
) -> Result<Option<TicketRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).ctx(what)?;
    let mut rows = stmt.query([param]).ctx(what)?;
    match rows.next().ctx(what)? {
        Some(r) => record(r).map(Some),
        None => Ok(None),
    }
}

pub(crate) fn of_host(conn: &Connection, hostname: &str) -> Result<Option<TicketRecord>, StoreError> {
    let sql = format!("SELECT {TICKET_COLUMNS} FROM install_tickets t WHERE t.hostname = ?1");
    one(conn, &sql, &hostname, "reading an install ticket")
}

pub(crate) fn by_token(conn: &Connection, token: &TokenHash) -> Result<Option<TicketRecord>, StoreError> {
    let sql = format!(
        "SELECT {TICKET_COLUMNS} FROM install_ticket_tokens k JOIN install_tickets t ON t.hostname = k.hostname WHERE k.hash = ?1"
    );
    one(conn, &sql, &token.0.as_slice(), "reading an install ticket by token")
}

pub(crate) fn pending(conn: &Connection) -> Result<u64, StoreError> {
    let what = "counting pending install tickets";
    let n: i64 = conn
        .prepare_cached("SELECT count(*) FROM install_tickets WHERE state = 'pending'")
        .ctx(what)?
        .query_row([], |r| r.get(0))
        .ctx(what)?;
    Ok(u64::try_from(n).unwrap_or(0))
}

fn delete(conn: &Connection, hostname: &str) -> Result<(), StoreError> {
    // The tokens go with it (ON DELETE CASCADE).
    conn.prepare_cached("DELETE FROM install_tickets WHERE hostname = ?1")
        .ctx("deleting an install ticket")?
        .execute([hostname])
        .ctx("deleting an install ticket")?;
    Ok(())
}

fn set_state(conn: &Connection, hostname: &str, state: &TicketState) -> Result<(), StoreError> {
    let (name, host_key, reason) = state_columns(state);
    conn.prepare_cached("UPDATE install_tickets SET state = ?2, host_key = ?3, reason = ?4 WHERE hostname = ?1")
        .ctx("updating an install ticket")?
        .execute(params![hostname, name, host_key, reason])
        .ctx("updating an install ticket")?;
    Ok(())
}

fn register(conn: &Connection, t: &InstallTicket) -> Result<Option<TicketId>, StoreError> {
    let old = of_host(conn, &t.hostname)?;
    delete(conn, &t.hostname)?;
    conn.prepare_cached(
        "INSERT INTO install_tickets (hostname, ticket_id, ip, hardware_arch, image_release, image_arch, \
         image_flavor, expires_at, state) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'pending')",
    )
    .ctx("registering an install ticket")?
    .execute(params![
        t.hostname,
        t.id.0,
        t.ip.to_canonical().to_string(),
        t.hardware_arch.as_str(),
        t.image.release,
        t.image.arch.as_str(),
        t.image.flavor,
        t.expires_at.0,
    ])
    .ctx("registering an install ticket")?;
    Ok(old.filter(|r| r.state != TicketState::Expired).map(|r| r.ticket.id))
}

fn issue(
    conn: &Connection,
    hostname: &str,
    id: &TicketId,
    token: &TokenHash,
    peer: IpAddr,
    now: Timestamp,
) -> Result<TicketAccess, StoreError> {
    let Some(rec) = of_host(conn, hostname)?.filter(|r| r.ticket.id == *id && r.state == TicketState::Pending) else {
        return Ok(TicketAccess::Unknown);
    };
    let access = check_access(&rec, peer, now);
    if !matches!(access, TicketAccess::Granted(_)) {
        return Ok(access);
    }
    let what = "issuing an install token";
    let owner: Option<String> = conn
        .prepare_cached("SELECT hostname FROM install_ticket_tokens WHERE hash = ?1")
        .ctx(what)?
        .query_row([token.0.as_slice()], |r| r.get(0))
        .optional()
        .ctx(what)?;
    match owner {
        Some(h) if h == hostname => return Ok(access),
        Some(_) => return Err(StoreError::Duplicate("install token".into())),
        None => {}
    }
    conn.prepare_cached("INSERT INTO install_ticket_tokens (hash, hostname) VALUES (?1, ?2)")
        .ctx(what)?
        .execute(params![token.0.as_slice(), hostname])
        .ctx(what)?;
    conn.prepare_cached(
        "DELETE FROM install_ticket_tokens WHERE hostname = ?1 AND seq NOT IN \
         (SELECT seq FROM install_ticket_tokens WHERE hostname = ?1 ORDER BY seq DESC LIMIT ?2)",
    )
    .ctx(what)?
    .execute(params![hostname, MAX_TICKET_TOKENS as i64])
    .ctx(what)?;
    Ok(access)
}

fn use_ticket(
    conn: &Connection,
    token: &TokenHash,
    peer: IpAddr,
    now: Timestamp,
    outcome: TicketOutcome,
) -> Result<TicketAccess, StoreError> {
    let Some(rec) = by_token(conn, token)? else { return Ok(TicketAccess::Unknown) };
    let access = check_access(&rec, peer, now);
    match &access {
        TicketAccess::Granted(_) => set_state(conn, &rec.ticket.hostname, &TicketState::Used(outcome))?,
        TicketAccess::Expired { .. } if rec.state == TicketState::Pending => {
            set_state(conn, &rec.ticket.hostname, &TicketState::Expired)?;
        }
        _ => {}
    }
    Ok(access)
}

fn settle(conn: &Connection, hostname: &str, id: &TicketId, how: Settle) -> Result<Option<TicketState>, StoreError> {
    let Some(rec) = of_host(conn, hostname)?.filter(|r| r.ticket.id == *id) else { return Ok(None) };
    let (answer, effect) = settle_effect(&rec.state, how);
    match effect {
        SettleEffect::Keep => {}
        SettleEffect::Delete => delete(conn, hostname)?,
        SettleEffect::Tombstone => set_state(conn, hostname, &TicketState::Expired)?,
    }
    Ok(Some(answer))
}

/// A ticket write, queued for the writer thread.
pub(crate) enum TicketOp {
    Register {
        ticket: InstallTicket,
        reply: Reply<Result<Option<TicketId>, StoreError>>,
    },
    Issue {
        hostname: String,
        id: TicketId,
        token: TokenHash,
        peer: IpAddr,
        now: Timestamp,
        reply: Reply<Result<TicketAccess, StoreError>>,
    },
    Use {
        token: TokenHash,
        peer: IpAddr,
        now: Timestamp,
        outcome: TicketOutcome,
        reply: Reply<Result<TicketAccess, StoreError>>,
    },
    Settle {
        hostname: String,
        id: TicketId,
        how: Settle,
        reply: Reply<Result<Option<TicketState>, StoreError>>,
    },
}

fn store_err<T>(e: StoreError) -> Result<T, StoreError> {
    Err(e)
}

impl TicketOp {
    /// Runs it on the writer's open transaction (inside its savepoint);
    /// its writes are kept if it succeeded.
    pub(crate) fn run(self, conn: &Connection, wrote: &mut bool) -> (Box<dyn Finish>, bool) {
        *wrote = true;
        match self {
            TicketOp::Register { ticket, reply } => {
                let v = register(conn, &ticket);
                let keep = v.is_ok();
                (outcome(reply, v, store_err), keep)
            }
            TicketOp::Issue { hostname, id, token, peer, now, reply } => {
                let v = issue(conn, &hostname, &id, &token, peer, now);
                let keep = v.is_ok();
                (outcome(reply, v, store_err), keep)
            }
            TicketOp::Use { token, peer, now, outcome: o, reply } => {
                let v = use_ticket(conn, &token, peer, now, o);
                let keep = v.is_ok();
                (outcome(reply, v, store_err), keep)
            }
            TicketOp::Settle { hostname, id, how, reply } => {
                let v = settle(conn, &hostname, &id, how);
                let keep = v.is_ok();
                (outcome(reply, v, store_err), keep)
            }
        }
    }

    /// Answers with `err` without running.
    pub(crate) fn fail(self, err: StoreError) {
        match self {
            TicketOp::Register { reply, .. } => {
                let _ = reply.send(Err(err));
            }
            TicketOp::Issue { reply, .. } | TicketOp::Use { reply, .. } => {
                let _ = reply.send(Err(err));
            }
            TicketOp::Settle { reply, .. } => {
                let _ = reply.send(Err(err));
            }
        }
    }
}

impl SqliteStore {
    async fn ticket_write<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> TicketOp,
    ) -> Result<T, StoreError> {
        self.write(|reply| Op::Tickets(op(reply)), store_err).await
    }
}

#[async_trait]
impl InstallTickets for SqliteStore {
    async fn register_ticket(&self, ticket: InstallTicket) -> Result<Option<TicketId>, StoreError> {
        self.ticket_write(|reply| TicketOp::Register { ticket, reply }).await
    }

    async fn ticket_of_host(&self, hostname: &str) -> Result<Option<TicketRecord>, StoreError> {
        let hostname = hostname.to_string();
        self.readers.read(move |c| of_host(c, &hostname)).await
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
        self.ticket_write(|reply| TicketOp::Issue { hostname, id, token, peer, now, reply }).await
    }

    async fn ticket_by_token(
        &self,
        token: &TokenHash,
        peer: IpAddr,
        now: Timestamp,
    ) -> Result<TicketAccess, StoreError> {
        let token = *token;
        let rec = self.readers.read(move |c| by_token(c, &token)).await?;
        Ok(rec.map_or(TicketAccess::Unknown, |r| check_access(&r, peer, now)))
    }

    async fn use_ticket(
        &self,
        token: &TokenHash,
        peer: IpAddr,
        now: Timestamp,
        outcome: TicketOutcome,
    ) -> Result<TicketAccess, StoreError> {
        let token = *token;
        self.ticket_write(|reply| TicketOp::Use { token, peer, now, outcome, reply }).await
    }

    async fn settle_ticket(
        &self,
        hostname: &str,
        id: &TicketId,
        how: Settle,
    ) -> Result<Option<TicketState>, StoreError> {
        let (hostname, id) = (hostname.to_string(), id.clone());
        if how == Settle::Poll {
            // Most polls find the ticket still pending: a read, not a
            // write (and its fsync) on the writer thread.
            let (h, i) = (hostname.clone(), id.clone());
            let rec = self.readers.read(move |c| of_host(c, &h)).await?;
            match rec {
                Some(r) if r.ticket.id == i && r.state != TicketState::Pending && r.state != TicketState::Expired => {}
                Some(r) if r.ticket.id == i => return Ok(Some(settle_effect(&r.state, how).0)),
                _ => return Ok(None),
            }
        }
        self.ticket_write(|reply| TicketOp::Settle { hostname, id, how, reply }).await
    }

    async fn pending_tickets(&self) -> Result<u64, StoreError> {
        self.readers.read(pending).await
    }
}
