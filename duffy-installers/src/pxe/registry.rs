//! [`PxeRegistry`]: pending installs by one-time token, checked against
//! the caller's address; what the machine is served comes from
//! [`Templates`](super::templates).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use duffy_core::model::NewNode;
use duffy_core::{Arch, Clock, Node, PoolKey, Timestamp};
use rand::RngCore;
use tokio::sync::oneshot;

use super::templates::{Install, InstallEndpoints, Kind, Templates};
use super::{PxeConfig, PxeError};
use crate::keys::PublicKey;
use crate::util::{one_line, token_prefix};

/// How much of a machine's failure reason is kept.
pub(super) const MAX_REASON: usize = 1000;

/// What a waiting install is told.
#[derive(Debug)]
pub(super) enum Outcome {
    Done(Option<String>),
    Failed(String),
    Expired,
}

pub(super) struct Pending {
    hostname: String,
    /// The node's address, canonical: the only one its requests may come
    /// from.
    ip: IpAddr,
    hardware_arch: Arch,
    image: PoolKey,
    expires_at: Timestamp,
    tx: oneshot::Sender<Outcome>,
}

impl Pending {
    fn as_install<'a>(&'a self, token: &'a str) -> Install<'a> {
        Install { hostname: &self.hostname, ip: self.ip, hardware_arch: self.hardware_arch, image: &self.image, token }
    }
}

#[derive(Default)]
pub(super) struct State {
    /// Pending installs by token.
    pending: HashMap<String, Pending>,
    /// Host name → token of its pending install.
    by_host: HashMap<String, String>,
    /// Tokens whose install expired, with the host, so a late callback
    /// (from the host's address) gets [`PxeError::Expired`]. At most one per
    /// host: dropped when the host's next install registers.
    expired: HashMap<String, Expired>,
}

/// What is kept of an expired install.
pub(super) struct Expired {
    hostname: String,
    ip: IpAddr,
}

/// Canonical form of an address: an IPv4-mapped IPv6 address (what a
/// dual-stack `[::]` socket reports for an IPv4 peer) becomes the IPv4
/// address.
pub(super) fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Pending PXE installs, shared (in an `Arc`) between the
/// [`PxeInstaller`](super::PxeInstaller) and the HTTP handlers that serve
/// the machines. See the module docs.
pub struct PxeRegistry {
    clock: Arc<dyn Clock>,
    templates: Templates,
    require_host_key: bool,
    state: Mutex<State>,
}

impl fmt::Debug for PxeRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the tokens.
        f.debug_struct("PxeRegistry")
            .field("public_url", &self.templates.public_url())
            .field("templates", &self.templates.file_names())
            .field("pending", &self.pending_count())
            .finish_non_exhaustive()
    }
}

impl PxeRegistry {
    /// Builds a registry from `config`: validates the public URL, the
    /// provisioning key and the URL patterns, and loads and checks the
    /// templates of `templates_dir`. `endpoints` are where the HTTP
    /// service serves the install endpoints, which the kickstart and the
    /// first-boot report call. `clock` decides when tokens expire.
    pub fn new(config: &PxeConfig, endpoints: InstallEndpoints, clock: Arc<dyn Clock>) -> Result<Self, PxeError> {
        let templates = Templates::new(config, endpoints)?;
        tracing::info!(public_url = %templates.public_url(), templates = ?templates.file_names(),
            token_ttl = ?config.token_ttl, "PXE registry ready");
        Ok(PxeRegistry {
            clock,
            templates,
            require_host_key: config.require_host_key,
            state: Mutex::new(State::default()),
        })
    }

    /// The iPXE script for `hostname`'s pending install, asked for from
    /// `peer`: boots the installer kernel and initrd with `inst.ks=`
    /// pointing at the kickstart URL. May be fetched any number of times
    /// while the install is pending, from the node's own address only.
    ///
    /// A host with no pending install, and a request from any other
    /// address, get [`PxeError::NoPendingInstall`] (the latter is logged
    /// with the address); the HTTP layer answers both alike.
    pub fn ipxe_script(&self, hostname: &str, peer: IpAddr) -> Result<String, PxeError> {
        let none = || PxeError::NoPendingInstall { hostname: one_line(hostname, 80) };
        let (vars, image) = {
            let st = self.lock();
            let Some(token) = st.by_host.get(hostname) else {
                return Err(none());
            };
            let Some(p) = st.pending.get(token) else {
                return Err(none());
            };
            if !from_node(p.ip, peer, &p.hostname, "iPXE script", token) {
                return Err(none());
            }
            self.check_not_expired(p)?;
            (self.templates.vars(&p.as_install(token))?, p.image.clone())
        };
        let (name, script) = self.templates.render(Kind::Ipxe, &image, &vars)?;
        tracing::info!(node = %hostname, %peer, template = %name, "serving iPXE script");
        Ok(script)
    }

    /// The kickstart for the install holding `token`, asked for from
    /// `peer`. May be fetched any number of times while the install is
    /// pending, from the node's own address only (any other gets
    /// [`PxeError::UnknownToken`]).
    pub fn kickstart(&self, token: &str, peer: IpAddr) -> Result<String, PxeError> {
        let (vars, image, hostname) = {
            let st = self.lock();
            let p = self.lookup(&st, token, peer, "kickstart")?;
            self.check_not_expired(p)?;
            (self.templates.vars(&p.as_install(token))?, p.image.clone(), p.hostname.clone())
        };
        let (name, ks) = self.templates.render(Kind::Kickstart, &image, &vars)?;
        tracing::info!(node = %hostname, token = %token_prefix(token), template = %name, "serving kickstart");
        Ok(ks)
    }

    /// The machine at `peer` reports its install done, with its SSH host
    /// public key (`ssh-ed25519 AAAA… [comment]`; `None` or blank when it
    /// has none). Wakes the waiting install, which returns the key without
    /// its comment. The token is used up, whatever the outcome, unless the
    /// request came from another address than the node's: that changes
    /// nothing and gets [`PxeError::UnknownToken`].
    ///
    /// A key that is not an OpenSSH host key is refused with
    /// [`PxeError::InvalidHostKey`], and no key at all (when
    /// [`PxeConfig::require_host_key`] is on, the default) with
    /// [`PxeError::MissingHostKey`]; the install then fails with that
    /// reason.
    pub fn complete(&self, token: &str, peer: IpAddr, host_key: Option<&str>) -> Result<(), PxeError> {
        let p = self.take(token, peer, "done callback")?;
        let fail = |p: Pending, err: PxeError| {
            tracing::warn!(node = %p.hostname, token = %token_prefix(token), error = %err,
                "refused install done callback; failing the install");
            let _ = p.tx.send(Outcome::Failed(format!("the machine's done callback was refused: {err}")));
            Err(err)
        };
        let host_key = match host_key.map(str::trim).filter(|k| !k.is_empty()) {
            None if self.require_host_key => {
                let err = PxeError::MissingHostKey { hostname: p.hostname.clone() };
                return fail(p, err);
            }
            None => None,
            Some(k) => match PublicKey::parse_host_key(k) {
                Ok(k) => Some(k.without_comment()),
                Err(source) => {
                    let err = PxeError::InvalidHostKey { hostname: p.hostname.clone(), source };
                    return fail(p, err);
                }
            },
        };
        tracing::info!(node = %p.hostname, token = %token_prefix(token), host_key = host_key.is_some(),
            "install reported done");
        p.tx.send(Outcome::Done(host_key)).map_err(|_| PxeError::UnknownToken)
    }

    /// The machine at `peer` reports its install failed, with a reason
    /// (kept, on one line and cut to 1000 characters, in the node's
    /// history). Wakes the waiting install with an error. The token is used
    /// up; a request from another address changes nothing and gets
    /// [`PxeError::UnknownToken`].
    pub fn fail(&self, token: &str, peer: IpAddr, reason: &str) -> Result<(), PxeError> {
        let p = self.take(token, peer, "failed callback")?;
        let reason = match one_line(reason, MAX_REASON) {
            r if r.is_empty() => "no reason given".to_string(),
            r => r,
        };
        tracing::warn!(node = %p.hostname, token = %token_prefix(token), reason = %reason, "install reported failed");
        p.tx.send(Outcome::Failed(reason)).map_err(|_| PxeError::UnknownToken)
    }

    /// Whether `hostname` has a pending install.
    pub fn is_pending(&self, hostname: &str) -> bool {
        self.lock().by_host.contains_key(hostname)
    }

    /// How many installs are pending.
    pub fn pending_count(&self) -> usize {
        self.lock().pending.len()
    }

    /// Registers a pending install of `image` on `node` until `expires_at`,
    /// replacing any older one of the node. Returns the token and the
    /// receiver of the outcome. A node without a valid IP address is
    /// refused: its address is what the install endpoints check.
    pub(super) fn register(
        &self,
        node: &Node,
        image: &PoolKey,
        expires_at: Timestamp,
    ) -> Result<(String, oneshot::Receiver<Outcome>), PxeError> {
        let invalid = |reason: String| PxeError::InvalidNode { hostname: one_line(&node.hostname, 80), reason };
        // Host name, image and address go verbatim into the templates.
        let mut check = NewNode::new(node.hostname.clone(), node.hardware_arch);
        check.flavor = node.flavor.clone();
        check.validate().map_err(|e| invalid(e.to_string()))?;
        image.validate().map_err(|e| invalid(e.to_string()))?;
        let ip = node_address(node.ip.as_deref()).map_err(invalid)?;
        let token = new_token();
        let (tx, rx) = oneshot::channel();
        let mut st = self.lock();
        if let Some(old) = st.by_host.remove(&node.hostname).filter(|old| st.pending.remove(old).is_some()) {
            tracing::warn!(node = %node.hostname, old_token = %token_prefix(&old),
                "replacing an older pending install of the node");
        }
        st.expired.retain(|_, e| e.hostname != node.hostname);
        st.pending.insert(
            token.clone(),
            Pending {
                hostname: node.hostname.clone(),
                ip,
                hardware_arch: node.hardware_arch,
                image: image.clone(),
                expires_at,
                tx,
            },
        );
        st.by_host.insert(node.hostname.clone(), token.clone());
        Ok((token, rx))
    }

    /// Removes the pending install of `token` (cancelled: its future was
    /// dropped). A later callback gets [`PxeError::UnknownToken`].
    pub(super) fn cancel(&self, token: &str) {
        let mut st = self.lock();
        if let Some(p) = st.pending.remove(token) {
            if st.by_host.get(&p.hostname).is_some_and(|t| t == token) {
                st.by_host.remove(&p.hostname);
            }
            tracing::info!(node = %p.hostname, token = %token_prefix(token), "PXE install cancelled; pending entry removed");
        }
    }

    /// Marks the pending install of `token` expired: a later callback gets
    /// [`PxeError::Expired`].
    pub(super) fn expire(&self, token: &str) {
        let mut st = self.lock();
        if let Some(p) = st.pending.remove(token) {
            if st.by_host.get(&p.hostname).is_some_and(|t| t == token) {
                st.by_host.remove(&p.hostname);
            }
            st.expired.retain(|_, e| e.hostname != p.hostname);
            st.expired.insert(token.to_string(), Expired { hostname: p.hostname, ip: p.ip });
        }
    }

    /// Takes the pending install of `token` for a callback from `peer`:
    /// the token is used up. The address is checked in the same critical
    /// section; a request from elsewhere takes nothing. An expired install
    /// is turned into a tombstone and its waiter told.
    fn take(&self, token: &str, peer: IpAddr, what: &str) -> Result<Pending, PxeError> {
        let mut st = self.lock();
        self.lookup(&st, token, peer, what)?;
        let p = st.pending.remove(token).ok_or(PxeError::UnknownToken)?;
        if st.by_host.get(&p.hostname).is_some_and(|t| t == token) {
            st.by_host.remove(&p.hostname);
        }
        if self.clock.now() >= p.expires_at {
            tracing::warn!(node = %p.hostname, token = %token_prefix(token), "install callback after the token expired");
            st.expired.retain(|_, e| e.hostname != p.hostname);
            st.expired.insert(token.to_string(), Expired { hostname: p.hostname.clone(), ip: p.ip });
            let _ = p.tx.send(Outcome::Expired);
            return Err(PxeError::Expired { hostname: p.hostname });
        }
        Ok(p)
    }

    /// The pending install of `token`, if `peer` is its node's address.
    /// Anything else (malformed, unknown, or another address, also for an
    /// expired token) is [`PxeError::UnknownToken`]; an expired token from
    /// the node's address is [`PxeError::Expired`].
    fn lookup<'s>(&self, st: &'s State, token: &str, peer: IpAddr, what: &str) -> Result<&'s Pending, PxeError> {
        if !is_token_shaped(token) {
            return Err(PxeError::UnknownToken);
        }
        if let Some(e) = st.expired.get(token) {
            if !from_node(e.ip, peer, &e.hostname, what, token) {
                return Err(PxeError::UnknownToken);
            }
            return Err(PxeError::Expired { hostname: e.hostname.clone() });
        }
        let p = st.pending.get(token).ok_or(PxeError::UnknownToken)?;
        if !from_node(p.ip, peer, &p.hostname, what, token) {
            return Err(PxeError::UnknownToken);
        }
        Ok(p)
    }

    fn check_not_expired(&self, p: &Pending) -> Result<(), PxeError> {
        if self.clock.now() >= p.expires_at {
            return Err(PxeError::Expired { hostname: p.hostname.clone() });
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent under panics (each method finishes its
        // changes before anything can panic), so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether a request for `hostname`'s install comes from its address
/// `ip`; logs a refusal with both addresses (and never the whole token).
pub(super) fn from_node(ip: IpAddr, peer: IpAddr, hostname: &str, what: &str, token: &str) -> bool {
    let peer = canonical(peer);
    if peer == ip {
        return true;
    }
    tracing::warn!(node = %hostname, %peer, node_ip = %ip, token = %token_prefix(token),
        "{what} requested from another address than the node's; refused, nothing changed");
    false
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

/// 256 random bits from the OS, as 64 lowercase hex digits.
pub(super) fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn is_token_shaped(token: &str) -> bool {
    token.len() == 64 && token.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_hex() {
        let a = new_token();
        let b = new_token();
        assert!(is_token_shaped(&a) && is_token_shaped(&b));
        assert_ne!(a, b);
        assert!(!is_token_shaped("ABC"));
        assert!(!is_token_shaped(&a.to_uppercase()));
    }
}
