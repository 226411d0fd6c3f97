//! [`PxeRegistry`]: pending installs, kept in the store as install
//! tickets ([`duffy_core::tickets`]) so that any service process sharing
//! the store may answer a machine's requests, checked against the
//! caller's address; what the machine is served comes from
//! [`Templates`](super::templates).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use duffy_core::model::NewNode;
use duffy_core::tickets::{
    InstallTicket, InstallTickets, Settle, TicketAccess, TicketId, TicketOutcome, TicketState, TokenHash,
};
use duffy_core::{Clock, Node, PoolKey, Timestamp};
use futures::FutureExt;
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use tokio::sync::Notify;

use super::templates::{Install, InstallEndpoints, Kind, Templates};
use super::{PxeConfig, PxeError};
use crate::keys::PublicKey;
use crate::util::{one_line, token_prefix};

/// How much of a machine's failure reason is kept.
pub(super) const MAX_REASON: usize = 1000;

/// Canonical form of an address: an IPv4-mapped IPv6 address (what a
/// dual-stack `[::]` socket reports for an IPv4 peer) becomes the IPv4
/// address.
pub(super) fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// A registered install this process waits for.
pub(super) struct Waiting {
    /// Its ticket.
    pub(super) id: TicketId,
    /// Notified when a callback for it lands in this process, or a newer
    /// install of the node replaces it here.
    pub(super) wake: Arc<Notify>,
}

/// Pending PXE installs, shared (in an `Arc`) between the
/// [`PxeInstaller`](super::PxeInstaller) and the HTTP handlers that serve
/// the machines. The installs themselves are in the store (see the module
/// docs); the registry holds this process's token key and its waiting
/// installs.
pub struct PxeRegistry {
    clock: Arc<dyn Clock>,
    templates: Templates,
    require_host_key: bool,
    poll_interval: Duration,
    tickets: Arc<dyn InstallTickets>,
    /// This process's key for its tokens: the token it gives a machine for
    /// a ticket is HMAC-SHA256(key, ticket id). The store keeps only the
    /// token's hash and cannot give a token back, so each process derives
    /// its own, the same every time it serves the ticket (a machine that
    /// fetches its boot script twice gets the same script), and no other
    /// process or database reader can compute it. Never stored or logged.
    token_key: [u8; 64],
    /// The installs this process waits for, by ticket: a callback answered
    /// here wakes its install at once instead of at its next poll.
    waiters: Mutex<HashMap<TicketId, Arc<Notify>>>,
}

impl fmt::Debug for PxeRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the tokens, nor the key they are made with.
        f.debug_struct("PxeRegistry")
            .field("public_url", &self.templates.public_url())
            .field("templates", &self.templates.file_names())
            .field("poll_interval", &self.poll_interval)
            .field("waiting_here", &self.waiters().len())
            .finish_non_exhaustive()
    }
}

/// A store failure while serving or waiting for an install.
fn store_error(what: &str) -> impl FnOnce(duffy_core::StoreError) -> PxeError + '_ {
    move |source| PxeError::Store { what: what.to_string(), source }
}

impl PxeRegistry {
    /// Builds a registry from `config`: validates the public URL, the
    /// provisioning key and the URL patterns, and loads and checks the
    /// templates of `templates_dir`. `endpoints` are where the HTTP
    /// service serves the install endpoints, which the kickstart and the
    /// first-boot report call. `tickets` is where the pending installs are
    /// kept (the store's, [`Store::install_tickets`](duffy_core::Store::install_tickets):
    /// every service process sharing the store then answers every
    /// machine). `clock` decides when tokens expire.
    pub fn new(
        config: &PxeConfig,
        endpoints: InstallEndpoints,
        tickets: Arc<dyn InstallTickets>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, PxeError> {
        let templates = Templates::new(config, endpoints)?;
        tracing::info!(public_url = %templates.public_url(), templates = ?templates.file_names(),
            token_ttl = ?config.token_ttl, poll_interval = ?config.poll_interval, "PXE registry ready");
        let mut token_key = [0u8; 64];
        rand::rngs::OsRng.fill_bytes(&mut token_key);
        Ok(PxeRegistry {
            clock,
            templates,
            require_host_key: config.require_host_key,
            poll_interval: config.poll_interval,
            tickets,
            token_key,
            waiters: Mutex::new(HashMap::new()),
        })
    }

    /// The iPXE script for `hostname`'s pending install, asked for from
    /// `peer`: boots the installer kernel and initrd with `inst.ks=`
    /// pointing at the kickstart URL. May be fetched any number of times
    /// while the install is pending, from the node's own address only.
    ///
    /// The script carries this process's token for the install, whose hash
    /// the store adds to the install's tokens (in the step that checks the
    /// address and the deadline): the kickstart and the reports may then
    /// reach any process.
    ///
    /// A host with no pending install, and a request from any other
    /// address, get [`PxeError::NoPendingInstall`] (the latter is logged
    /// with the address); the HTTP layer answers both alike.
    pub async fn ipxe_script(&self, hostname: &str, peer: IpAddr) -> Result<String, PxeError> {
        let none = || PxeError::NoPendingInstall { hostname: one_line(hostname, 80) };
        let found = self.tickets.ticket_of_host(hostname).await.map_err(store_error("reading an install"))?;
        let Some(rec) = found.filter(|r| r.state == TicketState::Pending) else {
            return Err(none());
        };
        let token = self.token_for(&rec.ticket.id);
        let access = self
            .tickets
            .issue_ticket_token(hostname, &rec.ticket.id, TokenHash::of(&token), peer, self.clock.now())
            .await
            .map_err(store_error("issuing an install token"))?;
        let ticket = match access {
            TicketAccess::Granted(t) => t,
            TicketAccess::WrongAddress { hostname, ip } => {
                refused_from(ip, peer, &hostname, "iPXE script", &token);
                return Err(none());
            }
            TicketAccess::Expired { hostname } => return Err(PxeError::Expired { hostname }),
            TicketAccess::Unknown => return Err(none()),
        };
        let vars = self.templates.vars(&as_install(&ticket, &token))?;
        let (name, script) = self.templates.render(Kind::Ipxe, &ticket.image, &vars)?;
        tracing::info!(node = %hostname, %peer, template = %name, token = %token_prefix(&token), "serving iPXE script");
        Ok(script)
    }

    /// The kickstart for the install holding `token`, asked for from
    /// `peer`. May be fetched any number of times while the install is
    /// pending, from the node's own address only (any other gets
    /// [`PxeError::UnknownToken`]).
    pub async fn kickstart(&self, token: &str, peer: IpAddr) -> Result<String, PxeError> {
        if !is_token_shaped(token) {
            return Err(PxeError::UnknownToken);
        }
        let access = self
            .tickets
            .ticket_by_token(&TokenHash::of(token), peer, self.clock.now())
            .await
            .map_err(store_error("reading an install"))?;
        let ticket = granted(access, peer, "kickstart", token)?;
        let vars = self.templates.vars(&as_install(&ticket, token))?;
        let (name, ks) = self.templates.render(Kind::Kickstart, &ticket.image, &vars)?;
        tracing::info!(node = %ticket.hostname, token = %token_prefix(token), template = %name, "serving kickstart");
        Ok(ks)
    }

    /// The machine at `peer` reports its install done, with its SSH host
    /// public key (`ssh-ed25519 AAAA… [comment]`; `None` or blank when it
    /// has none). The waiting install (in whichever process) returns the
    /// key without its comment. The token is used up, whatever the
    /// outcome, unless the request came from another address than the
    /// node's: that changes nothing and gets [`PxeError::UnknownToken`].
    ///
    /// A key that is not an OpenSSH host key is refused with
    /// [`PxeError::InvalidHostKey`], and no key at all (when
    /// [`PxeConfig::require_host_key`] is on, the default) with
    /// [`PxeError::MissingHostKey`]; the install then fails with that
    /// reason.
    pub async fn complete(&self, token: &str, peer: IpAddr, host_key: Option<&str>) -> Result<(), PxeError> {
        if !is_token_shaped(token) {
            return Err(PxeError::UnknownToken);
        }
        let refusal = |hostname: String| -> Result<Option<String>, PxeError> {
            match host_key.map(str::trim).filter(|k| !k.is_empty()) {
                None if self.require_host_key => Err(PxeError::MissingHostKey { hostname }),
                None => Ok(None),
                Some(k) => match PublicKey::parse_host_key(k) {
                    Ok(k) => Ok(Some(k.without_comment())),
                    Err(source) => Err(PxeError::InvalidHostKey { hostname, source }),
                },
            }
        };
        let outcome = match refusal(String::new()) {
            Ok(host_key) => TicketOutcome::Done { host_key },
            Err(_) => {
                // The reason names the node: read which it is (the use
                // below checks everything again, atomically).
                let hash = TokenHash::of(token);
                let now = self.clock.now();
                let read = self.tickets.ticket_by_token(&hash, peer, now).await;
                let hostname = match read.map_err(store_error("reading an install"))? {
                    TicketAccess::Granted(t) => t.hostname,
                    _ => "the node".to_string(),
                };
                let err = refusal(hostname).err().map_or_else(String::new, |e| e.to_string());
                TicketOutcome::Failed { reason: format!("the machine's done callback was refused: {err}") }
            }
        };
        let refused = matches!(outcome, TicketOutcome::Failed { .. });
        let ticket = self.use_ticket(token, peer, "done callback", outcome).await?;
        if refused {
            let err = refusal(ticket.hostname.clone()).err().unwrap_or(PxeError::UnknownToken);
            tracing::warn!(node = %ticket.hostname, token = %token_prefix(token), error = %err,
                "refused install done callback; failing the install");
            return Err(err);
        }
        tracing::info!(node = %ticket.hostname, token = %token_prefix(token), host_key = host_key.is_some(),
            "install reported done");
        Ok(())
    }

    /// The machine at `peer` reports its install failed, with a reason
    /// (kept, on one line and cut to 1000 characters, in the node's
    /// history). The waiting install (in whichever process) fails. The
    /// token is used up; a request from another address changes nothing
    /// and gets [`PxeError::UnknownToken`].
    pub async fn fail(&self, token: &str, peer: IpAddr, reason: &str) -> Result<(), PxeError> {
        if !is_token_shaped(token) {
            return Err(PxeError::UnknownToken);
        }
        let reason = match one_line(reason, MAX_REASON) {
            r if r.is_empty() => "no reason given".to_string(),
            r => r,
        };
        let outcome = TicketOutcome::Failed { reason: reason.clone() };
        let ticket = self.use_ticket(token, peer, "failed callback", outcome).await?;
        tracing::warn!(node = %ticket.hostname, token = %token_prefix(token), reason = %reason,
            "install reported failed");
        Ok(())
    }

    /// Whether `hostname` has a pending install (in any process).
    pub async fn is_pending(&self, hostname: &str) -> Result<bool, PxeError> {
        let rec = self.tickets.ticket_of_host(hostname).await.map_err(store_error("reading an install"))?;
        Ok(rec.is_some_and(|r| r.state == TicketState::Pending))
    }

    /// How many installs are pending (in every process sharing the store).
    pub async fn pending_count(&self) -> Result<u64, PxeError> {
        self.tickets.pending_tickets().await.map_err(store_error("counting pending installs"))
    }

    /// How long a waiting install sleeps between two reads of its ticket.
    pub(super) fn poll_interval(&self) -> Duration {
        self.poll_interval
    }

    /// Registers a pending install of `image` on `node` until `expires_at`,
    /// replacing any older one of the node (whose waiter, if it is in this
    /// process, is woken to find it gone). A node without a valid IP
    /// address is refused: its address is what the install endpoints check.
    pub(super) async fn register(
        &self,
        node: &Node,
        image: &PoolKey,
        expires_at: Timestamp,
    ) -> Result<Waiting, PxeError> {
        let invalid = |reason: String| PxeError::InvalidNode { hostname: one_line(&node.hostname, 80), reason };
        // Host name, image and address go verbatim into the templates.
        let mut check = NewNode::new(node.hostname.clone(), node.hardware_arch);
        check.flavor = node.flavor.clone();
        check.validate().map_err(|e| invalid(e.to_string()))?;
        image.validate().map_err(|e| invalid(e.to_string()))?;
        let ip = node_address(node.ip.as_deref()).map_err(invalid)?;
        let id = TicketId(random_hex());
        let wake = Arc::new(Notify::new());
        self.waiters().insert(id.clone(), wake.clone());
        let ticket = InstallTicket {
            id: id.clone(),
            hostname: node.hostname.clone(),
            ip,
            hardware_arch: node.hardware_arch,
            image: image.clone(),
            expires_at,
        };
        let replaced = match self.tickets.register_ticket(ticket).await {
            Ok(r) => r,
            Err(e) => {
                self.waiters().remove(&id);
                return Err(store_error("registering an install")(e));
            }
        };
        if let Some(old) = replaced {
            tracing::warn!(node = %node.hostname, old_ticket = %old, "replacing an older pending install of the node");
            self.wake(&old);
        }
        Ok(Waiting { id, wake })
    }

    /// Reads (and, as `how` says, settles) the ticket `id` of `hostname`
    /// for its waiting install: see [`InstallTickets::settle_ticket`].
    pub(super) async fn settle(
        &self,
        hostname: &str,
        id: &TicketId,
        how: Settle,
    ) -> Result<Option<TicketState>, PxeError> {
        self.tickets.settle_ticket(hostname, id, how).await.map_err(store_error("reading an install's outcome"))
    }

    /// The install of ticket `id` is no longer waited for here.
    pub(super) fn forget(&self, id: &TicketId) {
        self.waiters().remove(id);
    }

    /// Cancels the install of ticket `id` (its future was dropped): a
    /// later callback gets [`PxeError::UnknownToken`]. Done at once when
    /// the store answers without waiting (in memory); otherwise in a task
    /// of its own, since the install future that asks is going away.
    pub(super) fn cancel(self: &Arc<Self>, hostname: &str, id: &TicketId) {
        self.forget(id);
        let (me, hostname, id) = (self.clone(), hostname.to_string(), id.clone());
        let cancel = async move {
            match me.tickets.settle_ticket(&hostname, &id, Settle::Cancel).await {
                Ok(Some(TicketState::Expired) | None) => {}
                Ok(Some(_)) => {
                    tracing::info!(node = %hostname, ticket = %id, "PXE install cancelled; pending entry removed");
                }
                Err(e) => tracing::warn!(node = %hostname, ticket = %id, error = %e,
                    "could not remove a cancelled PXE install; the node's next install replaces it"),
            }
        };
        spawn_unless_ready(cancel);
    }

    /// Uses the ticket of `token` for a report from `peer`: the token is
    /// used up, in the store's one step that checks the address and the
    /// deadline. A request from elsewhere uses nothing. An expired
    /// install is turned into a tombstone (its waiter learns it).
    async fn use_ticket(
        &self,
        token: &str,
        peer: IpAddr,
        what: &str,
        outcome: TicketOutcome,
    ) -> Result<InstallTicket, PxeError> {
        let access = self
            .tickets
            .use_ticket(&TokenHash::of(token), peer, self.clock.now(), outcome)
            .await
            .map_err(store_error("recording an install's outcome"))?;
        if let TicketAccess::Expired { hostname } = &access {
            tracing::warn!(node = %hostname, token = %token_prefix(token), "install callback after the token expired");
        }
        let ticket = granted(access, peer, what, token)?;
        self.wake(&ticket.id);
        Ok(ticket)
    }

    /// Wakes this process's install of ticket `id`, if it has one.
    fn wake(&self, id: &TicketId) {
        if let Some(w) = self.waiters().get(id) {
            w.notify_one();
        }
    }

    /// This process's token for ticket `id` (see `token_key`): 64
    /// lowercase hex digits.
    fn token_for(&self, id: &TicketId) -> String {
        // A key of SHA-256's block size: HMAC takes it as it is.
        let mut mac = <Hmac<Sha256> as KeyInit>::new(&self.token_key.into());
        mac.update(id.0.as_bytes());
        hex(&mac.finalize().into_bytes())
    }

    fn waiters(&self) -> MutexGuard<'_, HashMap<TicketId, Arc<Notify>>> {
        // Each change is one insert or remove: a poisoned lock is usable.
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs `fut` to its end: at once if it finishes on its first poll,
/// otherwise in a task of its own (or, outside a runtime, not at all: the
/// runtime is going away, and the node's next install replaces the ticket).
fn spawn_unless_ready(fut: impl Future<Output = ()> + Send + 'static) {
    let mut fut = Box::pin(fut);
    if fut.as_mut().now_or_never().is_some() {
        return;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn(fut);
        }
        Err(_) => tracing::warn!("no runtime to finish removing a cancelled PXE install"),
    }
}

fn as_install<'a>(t: &'a InstallTicket, token: &'a str) -> Install<'a> {
    Install { hostname: &t.hostname, ip: t.ip, hardware_arch: t.hardware_arch, image: &t.image, token }
}

/// The ticket the store granted, or the error for its refusal: a request
/// from another address is logged with both addresses and answered as an
/// unknown token.
fn granted(access: TicketAccess, peer: IpAddr, what: &str, token: &str) -> Result<InstallTicket, PxeError> {
    match access {
        TicketAccess::Granted(t) => Ok(t),
        TicketAccess::Unknown => Err(PxeError::UnknownToken),
        TicketAccess::WrongAddress { hostname, ip } => {
            refused_from(ip, peer, &hostname, what, token);
            Err(PxeError::UnknownToken)
        }
        TicketAccess::Expired { hostname } => Err(PxeError::Expired { hostname }),
    }
}

/// Logs a request for `hostname`'s install from `peer`, another address
/// than the node's `ip` (and never the whole token).
fn refused_from(ip: IpAddr, peer: IpAddr, hostname: &str, what: &str, token: &str) {
    let peer = canonical(peer);
    tracing::warn!(node = %hostname, %peer, node_ip = %ip, token = %token_prefix(token),
        "{what} requested from another address than the node's; refused, nothing changed");
}

/// The address of a node to be installed by PXE, canonical, or why it has
/// none a PXE install can use: the check [`PxeInstaller::install`](duffy_core::Installer::install) makes
/// before anything else, public so that configuration can refuse such a
/// node early.
pub fn node_address(ip: Option<&str>) -> Result<IpAddr, String> {
    let Some(text) = ip.map(str::trim).filter(|ip| !ip.is_empty()) else {
        return Err("it has no IP address; a node installed by PXE needs one (the install endpoints answer \
                    only requests from the node's own address)"
            .to_string());
    };
    text.parse::<IpAddr>()
        .map(canonical)
        .map_err(|_| format!("invalid IP address {:?} (an IPv4 or IPv6 address is needed)", one_line(text, 80)))
}

/// 128 random bits from the OS, as 32 lowercase hex digits: a ticket's
/// identity (not a secret).
fn random_hex() -> String {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex(&bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn is_token_shaped(token: &str) -> bool {
    token.len() == 64 && token.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_hex_and_differ_per_ticket() {
        let a = hex(&[0xab; 32]);
        assert!(is_token_shaped(&a));
        assert!(!is_token_shaped("ABC"));
        assert!(!is_token_shaped(&a.to_uppercase()));
        assert_ne!(random_hex(), random_hex());
        assert_eq!(random_hex().len(), 32);
    }
}
