//! [`InstallTickets`] for [`MemStore`]: one map of tickets by host name and
//! an index of token hashes, under a mutex of their own (the farm's state
//! is not touched by a ticket, nor a ticket by the farm).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::MutexGuard;

use async_trait::async_trait;

use super::MemStore;
use crate::store::StoreError;
use crate::tickets::{
    InstallTicket, InstallTickets, MAX_TICKET_TOKENS, Settle, SettleEffect, TicketAccess, TicketId, TicketOutcome,
    TicketRecord, TicketState, TokenHash, check_access, settle_effect,
};
use crate::time::Timestamp;

/// The tickets of a [`MemStore`].
#[derive(Debug, Default)]
pub(super) struct Tickets {
    /// Host name → its ticket and that ticket's tokens, oldest first.
    by_host: HashMap<String, (TicketRecord, VecDeque<TokenHash>)>,
    /// Token hash → host name.
    by_token: HashMap<TokenHash, String>,
}

impl Tickets {
    /// Deletes the host's ticket and its tokens; returns the ticket.
    fn remove(&mut self, hostname: &str) -> Option<TicketRecord> {
        let (record, tokens) = self.by_host.remove(hostname)?;
        for t in tokens {
            self.by_token.remove(&t);
        }
        Some(record)
    }

    fn by_token_mut(&mut self, token: &TokenHash) -> Option<&mut TicketRecord> {
        let host = self.by_token.get(token)?;
        self.by_host.get_mut(host).map(|(r, _)| r)
    }
}

impl MemStore {
    fn tickets(&self) -> MutexGuard<'_, Tickets> {
        self.tickets.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl InstallTickets for MemStore {
    async fn register_ticket(&self, ticket: InstallTicket) -> Result<Option<TicketId>, StoreError> {
        let mut t = self.tickets();
        let replaced = t.remove(&ticket.hostname).filter(|r| r.state != TicketState::Expired).map(|r| r.ticket.id);
        t.by_host
            .insert(ticket.hostname.clone(), (TicketRecord { ticket, state: TicketState::Pending }, VecDeque::new()));
        Ok(replaced)
    }

    async fn ticket_of_host(&self, hostname: &str) -> Result<Option<TicketRecord>, StoreError> {
        Ok(self.tickets().by_host.get(hostname).map(|(r, _)| r.clone()))
    }

    async fn issue_ticket_token(
        &self,
        hostname: &str,
        id: &TicketId,
        token: TokenHash,
        peer: IpAddr,
        now: Timestamp,
    ) -> Result<TicketAccess, StoreError> {
        let mut guard = self.tickets();
        let t = &mut *guard;
        let Some((record, tokens)) = t.by_host.get_mut(hostname) else { return Ok(TicketAccess::Unknown) };
        if record.ticket.id != *id || record.state != TicketState::Pending {
            return Ok(TicketAccess::Unknown);
        }
        let access = check_access(record, peer, now);
        if matches!(access, TicketAccess::Granted(_)) && !tokens.contains(&token) {
            if t.by_token.contains_key(&token) {
                return Err(StoreError::Duplicate("install token".into()));
            }
            tokens.push_back(token);
            t.by_token.insert(token, hostname.to_string());
            while tokens.len() > MAX_TICKET_TOKENS {
                if let Some(old) = tokens.pop_front() {
                    t.by_token.remove(&old);
                }
            }
        }
        Ok(access)
    }

    async fn ticket_by_token(
        &self,
        token: &TokenHash,
        peer: IpAddr,
        now: Timestamp,
    ) -> Result<TicketAccess, StoreError> {
        let mut t = self.tickets();
        Ok(t.by_token_mut(token).map_or(TicketAccess::Unknown, |r| check_access(r, peer, now)))
    }

    async fn use_ticket(
        &self,
        token: &TokenHash,
        peer: IpAddr,
        now: Timestamp,
        outcome: TicketOutcome,
    ) -> Result<TicketAccess, StoreError> {
        let mut t = self.tickets();
        let Some(record) = t.by_token_mut(token) else { return Ok(TicketAccess::Unknown) };
        let access = check_access(record, peer, now);
        match &access {
            TicketAccess::Granted(_) => record.state = TicketState::Used(outcome),
            TicketAccess::Expired { .. } => record.state = TicketState::Expired,
            TicketAccess::Unknown | TicketAccess::WrongAddress { .. } => {}
        }
        Ok(access)
    }

    async fn settle_ticket(
        &self,
        hostname: &str,
        id: &TicketId,
        how: Settle,
    ) -> Result<Option<TicketState>, StoreError> {
        let mut t = self.tickets();
        let Some((record, _)) = t.by_host.get_mut(hostname).filter(|(r, _)| r.ticket.id == *id) else {
            return Ok(None);
        };
        let (answer, effect) = settle_effect(&record.state, how);
        match effect {
            SettleEffect::Keep => {}
            SettleEffect::Tombstone => record.state = TicketState::Expired,
            SettleEffect::Delete => {
                t.remove(hostname);
            }
        }
        Ok(Some(answer))
    }

    async fn pending_tickets(&self) -> Result<u64, StoreError> {
        Ok(self.tickets().by_host.values().filter(|(r, _)| r.state == TicketState::Pending).count() as u64)
    }
}
