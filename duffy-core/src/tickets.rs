//! Install tickets: the PXE installer's pending installs, kept in the
//! store so that a machine's callbacks (`/Install/*`) may reach any
//! service process sharing it, not only the one waiting for the install.
//!
//! A *ticket* is one pending install of one node: its host name, the only
//! address its requests may come from, the image and the deadline. The
//! waiting installer registers it ([`InstallTickets::register_ticket`]);
//! whichever process serves the machine checks and uses it
//! ([`InstallTickets::issue_ticket_token`], [`InstallTickets::ticket_by_token`],
//! [`InstallTickets::use_ticket`]); the waiting installer reads the outcome
//! ([`InstallTickets::settle_ticket`]).
//!
//! **Tokens are stored only as hashes.** The machine proves which install
//! it speaks for with a bearer token (256 bits, 64 hex digits) in its
//! URLs. The store keeps the [`TokenHash`] (SHA-256) of each token it was
//! given and looks tokens up by hash; it never sees or keeps a token. Each
//! process that serves a ticket's boot script issues a token of its own
//! for it (a process cannot recover another's token from a hash), so a
//! ticket may have several, at most [`MAX_TICKET_TOKENS`]; they all die
//! with the ticket.
//!
//! **Every check is made in the store, in the same atomic step as the
//! change it allows**: the caller's address, the deadline and the single
//! use. A request from another address than the node's changes nothing;
//! a used ticket answers no further callback; an expired ticket used from
//! the node's address becomes a *tombstone* (so the machine is told its
//! install expired) in the step that refuses it.
//!
//! **Bounded**: one ticket per host name (pending, used and not yet read
//! by its installer, or a tombstone), replaced by the host's next
//! registration together with its tokens.
//!
//! The decisions are pure functions here ([`check_access`],
//! [`settle_effect`]), so every backend decides exactly alike; the
//! conformance suite (`testkit::conformance`) holds each to them.

use std::fmt;
use std::net::IpAddr;

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use crate::model::{Arch, PoolKey};
use crate::store::StoreError;
use crate::time::Timestamp;

/// Most tokens one ticket keeps: the newest ones issued. One per service
/// process that served the node's boot script (a restart makes a new
/// one), so eight leaves room for a restart or two of every replica.
pub const MAX_TICKET_TOKENS: usize = 8;

/// The identity of one registration, chosen (at random) by whoever
/// registers it: a host's next registration has another, so a waiting
/// installer can tell its ticket from a newer one of the same host. Not a
/// secret.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TicketId(pub String);

impl fmt::Display for TicketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// SHA-256 of an install token: what the store keeps and looks tokens up
/// by, never the token itself.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    /// The hash of `token`.
    pub fn of(token: &str) -> TokenHash {
        TokenHash(Sha256::digest(token.as_bytes()).into())
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not a secret, but keep logs short.
        write!(f, "TokenHash({:02x}{:02x}{:02x}{:02x}…)", self.0[0], self.0[1], self.0[2], self.0[3])
    }
}

/// One pending install, as registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallTicket {
    /// This registration's identity.
    pub id: TicketId,
    /// The node's host name (one ticket per host name).
    pub hostname: String,
    /// The node's address, canonical (an IPv4-mapped IPv6 address is
    /// stored as the IPv4 address): the only one its requests may come
    /// from.
    pub ip: IpAddr,
    /// The node's hardware architecture.
    pub hardware_arch: Arch,
    /// The image being installed.
    pub image: PoolKey,
    /// From this instant on the ticket is expired.
    pub expires_at: Timestamp,
}

/// What the machine reported, written by [`InstallTickets::use_ticket`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TicketOutcome {
    /// Installed; with the machine's SSH host key (without its comment),
    /// if it gave one.
    Done {
        /// The host key.
        host_key: Option<String>,
    },
    /// The install failed (as the machine reported it, or because its
    /// report was refused).
    Failed {
        /// Why, on one line.
        reason: String,
    },
}

/// Where a ticket stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TicketState {
    /// Waiting for the machine.
    Pending,
    /// Used by a callback: the outcome waits for its installer.
    Used(TicketOutcome),
    /// A tombstone: the install ran out of time. A late callback from the
    /// node's address is told so.
    Expired,
}

/// A ticket as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketRecord {
    /// The registration.
    pub ticket: InstallTicket,
    /// Where it stands.
    pub state: TicketState,
}

/// The answer to a machine's request, after the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TicketAccess {
    /// The checks passed (for [`InstallTickets::use_ticket`]: and the
    /// ticket is now used).
    Granted(InstallTicket),
    /// No pending ticket answers to this token (or host and id): never
    /// issued, used, replaced or cancelled.
    Unknown,
    /// The ticket is the node's, and the request came from another address.
    /// Nothing changed; the caller answers as [`TicketAccess::Unknown`]
    /// (a stranger learns nothing) and logs the two addresses.
    WrongAddress {
        /// The node's host name.
        hostname: String,
        /// The node's address.
        ip: IpAddr,
    },
    /// The ticket expired (from the node's address). A used-up attempt
    /// ([`InstallTickets::use_ticket`]) leaves a tombstone.
    Expired {
        /// The node's host name.
        hostname: String,
    },
}

/// What a waiting installer does with its ticket
/// ([`InstallTickets::settle_ticket`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Reads it; a used ticket's outcome is taken (the ticket deleted).
    Poll,
    /// Its time is up: a pending ticket becomes a tombstone; a used one's
    /// outcome is taken (the callback came just in time).
    Expire,
    /// The install was abandoned: the ticket is deleted, unless it is a
    /// tombstone (which stays, to tell a late machine).
    Cancel,
}

/// What [`settle_effect`] does to the stored ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleEffect {
    /// Nothing.
    Keep,
    /// Delete it (and its tokens).
    Delete,
    /// Make it a tombstone ([`TicketState::Expired`]).
    Tombstone,
}

/// A ticket's state as the SQL backends store it: the `state` column's
/// word and the `host_key` and `reason` columns. One definition, so that
/// every backend writes and reads the same words.
pub fn state_columns(state: &TicketState) -> (&'static str, Option<&str>, Option<&str>) {
    match state {
        TicketState::Pending => ("pending", None, None),
        TicketState::Used(TicketOutcome::Done { host_key }) => ("done", host_key.as_deref(), None),
        TicketState::Used(TicketOutcome::Failed { reason }) => ("failed", None, Some(reason.as_str())),
        TicketState::Expired => ("expired", None, None),
    }
}

/// The columns an SQL backend keeps a ticket in, as read (text and
/// integers), in the order of [`TICKET_COLUMNS`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketColumns {
    /// `hostname`.
    pub hostname: String,
    /// `ticket_id`.
    pub ticket_id: String,
    /// `ip`, as text.
    pub ip: String,
    /// `hardware_arch`.
    pub hardware_arch: String,
    /// `image_release`.
    pub image_release: String,
    /// `image_arch`.
    pub image_arch: String,
    /// `image_flavor`.
    pub image_flavor: Option<String>,
    /// `expires_at`, in milliseconds since the epoch.
    pub expires_at: i64,
    /// `state`: a word of [`state_columns`].
    pub state: String,
    /// `host_key`.
    pub host_key: Option<String>,
    /// `reason`.
    pub reason: Option<String>,
}

/// The columns of [`TicketColumns`], in its order, of a table aliased `t`.
pub const TICKET_COLUMNS: &str = "t.hostname, t.ticket_id, t.ip, t.hardware_arch, t.image_release, t.image_arch, \
                                  t.image_flavor, t.expires_at, t.state, t.host_key, t.reason";

impl TicketColumns {
    /// Reads one row selected with [`TICKET_COLUMNS`] through a backend's
    /// typed getters (column index to value, or why it could not be read):
    /// the one place the column order is spelled for reading. A column
    /// that cannot be read is [`StoreError::Corrupt`], naming it.
    pub fn read<E: std::fmt::Display>(
        text: impl Fn(usize) -> Result<String, E>,
        opt: impl Fn(usize) -> Result<Option<String>, E>,
        int: impl Fn(usize) -> Result<i64, E>,
    ) -> Result<TicketColumns, StoreError> {
        let corrupt = |what: &'static str| move |e: E| StoreError::Corrupt(format!("install_tickets.{what}: {e}"));
        Ok(TicketColumns {
            hostname: text(0).map_err(corrupt("hostname"))?,
            ticket_id: text(1).map_err(corrupt("ticket_id"))?,
            ip: text(2).map_err(corrupt("ip"))?,
            hardware_arch: text(3).map_err(corrupt("hardware_arch"))?,
            image_release: text(4).map_err(corrupt("image_release"))?,
            image_arch: text(5).map_err(corrupt("image_arch"))?,
            image_flavor: opt(6).map_err(corrupt("image_flavor"))?,
            expires_at: int(7).map_err(corrupt("expires_at"))?,
            state: text(8).map_err(corrupt("state"))?,
            host_key: opt(9).map_err(corrupt("host_key"))?,
            reason: opt(10).map_err(corrupt("reason"))?,
        })
    }

    /// The ticket these columns hold, or which column is not what a
    /// backend writes (named, with what it holds).
    pub fn into_record(self) -> Result<TicketRecord, StoreError> {
        fn corrupt(what: &str, e: impl fmt::Display) -> StoreError {
            StoreError::Corrupt(format!("install_tickets.{what}: {e}"))
        }
        let ip: IpAddr = self.ip.parse().map_err(|e| corrupt("ip", e))?;
        let hardware_arch: Arch = self.hardware_arch.parse().map_err(|e| corrupt("hardware_arch", e))?;
        let arch: Arch = self.image_arch.parse().map_err(|e| corrupt("image_arch", e))?;
        let state = match self.state.as_str() {
            "pending" => TicketState::Pending,
            "done" => TicketState::Used(TicketOutcome::Done { host_key: self.host_key }),
            "failed" => TicketState::Used(TicketOutcome::Failed { reason: self.reason.unwrap_or_default() }),
            "expired" => TicketState::Expired,
            other => return Err(corrupt("state", format!("unknown state {other:?}"))),
        };
        let ticket = InstallTicket {
            id: TicketId(self.ticket_id),
            hostname: self.hostname,
            ip,
            hardware_arch,
            image: PoolKey { release: self.image_release, arch, flavor: self.image_flavor },
            expires_at: Timestamp(self.expires_at),
        };
        Ok(TicketRecord { ticket, state })
    }
}

/// Whether a request from `peer` at `now` may use `record`: the one
/// decision every backend makes for [`InstallTickets::ticket_by_token`],
/// [`InstallTickets::issue_ticket_token`] and [`InstallTickets::use_ticket`]
/// (which then tombstones an expired pending ticket, and writes the
/// outcome on [`TicketAccess::Granted`]). `peer` is compared in canonical
/// form.
pub fn check_access(record: &TicketRecord, peer: IpAddr, now: Timestamp) -> TicketAccess {
    let t = &record.ticket;
    let wrong = || TicketAccess::WrongAddress { hostname: t.hostname.clone(), ip: t.ip };
    let from_node = peer.to_canonical() == t.ip.to_canonical();
    match &record.state {
        TicketState::Used(_) => TicketAccess::Unknown,
        TicketState::Expired if from_node => TicketAccess::Expired { hostname: t.hostname.clone() },
        TicketState::Expired => wrong(),
        TicketState::Pending if !from_node => wrong(),
        TicketState::Pending if now >= t.expires_at => TicketAccess::Expired { hostname: t.hostname.clone() },
        TicketState::Pending => TicketAccess::Granted(t.clone()),
    }
}

/// What [`InstallTickets::settle_ticket`] answers for a ticket in `state`
/// and does to it: the one decision every backend makes.
pub fn settle_effect(state: &TicketState, how: Settle) -> (TicketState, SettleEffect) {
    match (state, how) {
        (TicketState::Pending, Settle::Poll) => (TicketState::Pending, SettleEffect::Keep),
        (TicketState::Pending, Settle::Expire) => (TicketState::Expired, SettleEffect::Tombstone),
        (TicketState::Pending, Settle::Cancel) => (TicketState::Pending, SettleEffect::Delete),
        (TicketState::Used(o), _) => (TicketState::Used(o.clone()), SettleEffect::Delete),
        (TicketState::Expired, _) => (TicketState::Expired, SettleEffect::Keep),
    }
}

/// Where the PXE installer's pending installs live: a store several
/// service processes share, so that a machine's callback may reach any of
/// them. See the module docs for the rules every implementation keeps
/// (checked by the conformance suite).
///
/// Reached through [`Store::install_tickets`](crate::Store::install_tickets).
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait InstallTickets: Send + Sync {
    /// Registers `ticket` as the host's pending install, replacing, in one
    /// atomic step, whatever the host had (a pending or used ticket, or a
    /// tombstone) with all its tokens. Returns the id of the ticket it
    /// replaced, if it was not a tombstone (its installer is to be told).
    async fn register_ticket(&self, ticket: InstallTicket) -> Result<Option<TicketId>, StoreError>;

    /// The host's ticket, in whatever state.
    async fn ticket_of_host(&self, hostname: &str) -> Result<Option<TicketRecord>, StoreError>;

    /// For the node's boot script: if the host's ticket is still `id`, and
    /// [`check_access`] grants `peer` at `now`, adds `token` to its tokens
    /// (nothing if it has it already; beyond [`MAX_TICKET_TOKENS`], the
    /// oldest goes), atomically with the check. A ticket that is not `id`,
    /// or not pending, is [`TicketAccess::Unknown`]; any refusal changes
    /// nothing.
    async fn issue_ticket_token(
        &self,
        hostname: &str,
        id: &TicketId,
        token: TokenHash,
        peer: IpAddr,
        now: Timestamp,
    ) -> Result<TicketAccess, StoreError>;

    /// For the kickstart: the ticket holding `token`, after
    /// [`check_access`] for `peer` at `now`. Changes nothing.
    async fn ticket_by_token(
        &self,
        token: &TokenHash,
        peer: IpAddr,
        now: Timestamp,
    ) -> Result<TicketAccess, StoreError>;

    /// For the machine's report: in one atomic step, checks the ticket
    /// holding `token` with [`check_access`] and, if granted, uses it up,
    /// recording `outcome` (the ticket is [`TicketState::Used`]; of two
    /// concurrent calls exactly one is granted). An expired pending ticket
    /// used from the node's address becomes a tombstone
    /// ([`TicketAccess::Expired`]). A request from another address changes
    /// nothing.
    async fn use_ticket(
        &self,
        token: &TokenHash,
        peer: IpAddr,
        now: Timestamp,
        outcome: TicketOutcome,
    ) -> Result<TicketAccess, StoreError>;

    /// For the waiting installer: if the host's ticket is still `id`,
    /// answers and changes it as [`settle_effect`] says, atomically;
    /// `None` if the host has no ticket `id` (replaced by a newer
    /// registration, or deleted).
    async fn settle_ticket(
        &self,
        hostname: &str,
        id: &TicketId,
        how: Settle,
    ) -> Result<Option<TicketState>, StoreError>;

    /// How many tickets are pending.
    async fn pending_tickets(&self) -> Result<u64, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(state: TicketState) -> TicketRecord {
        TicketRecord {
            ticket: InstallTicket {
                id: TicketId("t1".into()),
                hostname: "n1.example.org".into(),
                ip: IpAddr::from([10, 0, 0, 11]),
                hardware_arch: Arch::X86_64,
                image: PoolKey::new("9", Arch::X86_64, None),
                expires_at: Timestamp(1000),
            },
            state,
        }
    }

    #[test]
    fn access_checks_address_state_and_deadline() {
        let node = IpAddr::from([10, 0, 0, 11]);
        let mapped = IpAddr::V6(std::net::Ipv4Addr::new(10, 0, 0, 11).to_ipv6_mapped());
        let other = IpAddr::from([10, 0, 0, 12]);
        let pending = record(TicketState::Pending);
        assert!(matches!(check_access(&pending, node, Timestamp(999)), TicketAccess::Granted(_)));
        assert!(matches!(check_access(&pending, mapped, Timestamp(999)), TicketAccess::Granted(_)));
        assert!(matches!(check_access(&pending, other, Timestamp(999)), TicketAccess::WrongAddress { .. }));
        assert!(matches!(check_access(&pending, node, Timestamp(1000)), TicketAccess::Expired { .. }));
        assert!(matches!(check_access(&pending, other, Timestamp(1000)), TicketAccess::WrongAddress { .. }));
        let tomb = record(TicketState::Expired);
        assert!(matches!(check_access(&tomb, node, Timestamp(0)), TicketAccess::Expired { .. }));
        assert!(matches!(check_access(&tomb, other, Timestamp(0)), TicketAccess::WrongAddress { .. }));
        let used = record(TicketState::Used(TicketOutcome::Done { host_key: None }));
        assert_eq!(check_access(&used, node, Timestamp(0)), TicketAccess::Unknown);
    }

    #[test]
    fn token_hash_is_sha256() {
        assert_eq!(TokenHash::of("abc").0[..4], [0xba, 0x78, 0x16, 0xbf]);
    }

    #[test]
    fn stored_columns_read_back_as_written() {
        let states = [
            TicketState::Pending,
            TicketState::Used(TicketOutcome::Done { host_key: Some("ssh-ed25519 AAAA".into()) }),
            TicketState::Used(TicketOutcome::Failed { reason: "disk".into() }),
            TicketState::Expired,
        ];
        for state in states {
            let want = record(state);
            let t = &want.ticket;
            let (word, host_key, reason) = state_columns(&want.state);
            let cols = TicketColumns {
                hostname: t.hostname.clone(),
                ticket_id: t.id.0.clone(),
                ip: t.ip.to_string(),
                hardware_arch: t.hardware_arch.as_str().into(),
                image_release: t.image.release.clone(),
                image_arch: t.image.arch.as_str().into(),
                image_flavor: t.image.flavor.clone(),
                expires_at: t.expires_at.0,
                state: word.into(),
                host_key: host_key.map(Into::into),
                reason: reason.map(Into::into),
            };
            assert_eq!(cols.clone().into_record().expect("reads back"), want);
            let bad = TicketColumns { state: "finished".into(), ..cols };
            assert!(matches!(bad.into_record(), Err(StoreError::Corrupt(m)) if m.contains("install_tickets.state")));
        }
    }
}
