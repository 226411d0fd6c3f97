//! The install-ticket cases of the conformance suite catch broken stores:
//! each is run against a deliberately broken `InstallTickets` (behind a
//! `MockStore` that hands it out) and must fail, while the real
//! `MemStore` passes them (`mem_store_conformance.rs`).

use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use duffy_core::mem::MemStore;
use duffy_core::mock::MockStore;
use duffy_core::testkit::conformance;
use duffy_core::tickets::{
    InstallTicket, InstallTickets, Settle, TicketAccess, TicketId, TicketOutcome, TicketRecord, TicketState, TokenHash,
};
use duffy_core::{Store, StoreError, Timestamp};

/// How the tickets are broken.
#[derive(Clone, Copy)]
enum Broken {
    /// Checks, then uses in a second step: two callbacks may both win.
    CheckThenUse,
    /// Takes any caller for the node.
    AnyAddress,
    /// Answers "expired" without leaving a tombstone.
    NoTombstone,
    /// Keeps a registration's old ticket when the host registers again.
    NoReplace,
}

struct BrokenTickets {
    inner: Arc<MemStore>,
    how: Broken,
}

#[async_trait]
impl InstallTickets for BrokenTickets {
    async fn register_ticket(&self, ticket: InstallTicket) -> Result<Option<TicketId>, StoreError> {
        if let Broken::NoReplace = self.how {
            if let Some(old) = self.inner.ticket_of_host(&ticket.hostname).await? {
                return Ok(Some(old.ticket.id));
            }
        }
        self.inner.register_ticket(ticket).await
    }

    async fn ticket_of_host(&self, hostname: &str) -> Result<Option<TicketRecord>, StoreError> {
        self.inner.ticket_of_host(hostname).await
    }

    async fn issue_ticket_token(
        &self,
        hostname: &str,
        id: &TicketId,
        token: TokenHash,
        peer: IpAddr,
        now: Timestamp,
    ) -> Result<TicketAccess, StoreError> {
        self.inner.issue_ticket_token(hostname, id, token, peer, now).await
    }

    async fn ticket_by_token(
        &self,
        token: &TokenHash,
        peer: IpAddr,
        now: Timestamp,
    ) -> Result<TicketAccess, StoreError> {
        self.inner.ticket_by_token(token, peer, now).await
    }

    async fn use_ticket(
        &self,
        token: &TokenHash,
        peer: IpAddr,
        now: Timestamp,
        outcome: TicketOutcome,
    ) -> Result<TicketAccess, StoreError> {
        match self.how {
            Broken::CheckThenUse => {
                let checked = self.inner.ticket_by_token(token, peer, now).await?;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                if let TicketAccess::Granted(t) = &checked {
                    // Writes the outcome however the ticket changed meanwhile.
                    let _ = self.inner.use_ticket(token, t.ip, now, outcome).await?;
                }
                Ok(checked)
            }
            Broken::AnyAddress => {
                let peer = match self.inner.ticket_by_token(token, peer, now).await? {
                    TicketAccess::WrongAddress { ip, .. } => ip,
                    _ => peer,
                };
                self.inner.use_ticket(token, peer, now, outcome).await
            }
            Broken::NoTombstone => match self.inner.ticket_by_token(token, peer, now).await? {
                e @ TicketAccess::Expired { .. } => Ok(e),
                _ => self.inner.use_ticket(token, peer, now, outcome).await,
            },
            Broken::NoReplace => self.inner.use_ticket(token, peer, now, outcome).await,
        }
    }

    async fn settle_ticket(
        &self,
        hostname: &str,
        id: &TicketId,
        how: Settle,
    ) -> Result<Option<TicketState>, StoreError> {
        self.inner.settle_ticket(hostname, id, how).await
    }

    async fn pending_tickets(&self) -> Result<u64, StoreError> {
        self.inner.pending_tickets().await
    }
}

fn broken_store(how: Broken) -> Arc<dyn Store> {
    let tickets: Arc<dyn InstallTickets> = Arc::new(BrokenTickets { inner: Arc::new(MemStore::new()), how });
    let mut store = MockStore::new();
    store.expect_install_tickets().returning(move || Some(tickets.clone()));
    Arc::new(store)
}

/// Runs `check` on a store broken `how`; it must fail.
async fn must_fail<F>(how: Broken, check: fn(Arc<dyn Store>) -> F, name: &str)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let outcome = tokio::spawn(check(broken_store(how))).await;
    assert!(outcome.is_err_and(|e| e.is_panic()), "{name} passed on a broken store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_ticket_cases_catch_broken_stores() {
    must_fail(
        Broken::CheckThenUse,
        conformance::concurrent_uses_of_one_install_token_grant_exactly_one,
        "concurrent_uses_of_one_install_token_grant_exactly_one",
    )
    .await;
    must_fail(
        Broken::AnyAddress,
        conformance::install_tickets_are_single_use_and_bound_to_the_address,
        "install_tickets_are_single_use_and_bound_to_the_address",
    )
    .await;
    must_fail(
        Broken::NoTombstone,
        conformance::expired_install_tickets_become_tombstones,
        "expired_install_tickets_become_tombstones",
    )
    .await;
    must_fail(
        Broken::NoReplace,
        conformance::install_tickets_are_replaced_by_the_hosts_next_registration,
        "install_tickets_are_replaced_by_the_hosts_next_registration",
    )
    .await;
    // The same wrapper, unbroken in what a case checks, passes it: the
    // failures above are the breakage's.
    let ok = tokio::spawn(conformance::install_ticket_tokens_are_bounded(broken_store(Broken::NoTombstone))).await;
    assert!(ok.is_ok(), "the wrapper itself is sound");
}
