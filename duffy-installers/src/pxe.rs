//! Network installs: PXE boot, iPXE script, kickstart, install callbacks.
//!
//! # How an install runs
//!
//! 1. [`PxeInstaller::install`] registers a *pending install* for the node
//!    in the shared [`PxeRegistry`], under a random one-time token (256
//!    bits, 64 hex digits). An older pending install of the same node is
//!    replaced (its waiter fails with "superseded").
//! 2. It sets the node's next boot to PXE through the
//!    [`PowerController`] and power-cycles it (powers it on if it is off).
//! 3. The machine PXE-boots and fetches its iPXE script from Duffy's HTTP
//!    service, which calls [`PxeRegistry::ipxe_script`] with the host
//!    name. The script boots the installer kernel with
//!    `inst.ks={public_url}/Install/kickstart?token=…`.
//! 4. Anaconda fetches the kickstart ([`PxeRegistry::kickstart`]). The
//!    built-in kickstart's `%post` installs Duffy's provisioning key for
//!    root and a one-shot first-boot hook; on an error it calls
//!    `{public_url}/Install/failed?token=…&reason=…`.
//! 5. At first boot, once sshd runs, the hook calls
//!    `{public_url}/Install/done?token=…&host_key=…` with the contents of
//!    the SSH host public key (ed25519, else ecdsa, else rsa),
//!    URL-encoded. The HTTP layer calls [`PxeRegistry::complete`] (or
//!    [`PxeRegistry::fail`]), which wakes the waiting install; it returns
//!    [`Installed`] with the host key.
//!
//! The callback comes from the installed system's first boot rather than
//! from `%post` (which runs before the installer reboots) because the
//! [`Installer`] contract is "installed and reachable": right after
//! `install` returns, the node may be handed out and Duffy logs in to it.
//!
//! Tokens are single use (a second callback is [`PxeError::UnknownToken`])
//! and expire after `token_ttl` ([`PxeError::Expired`]); the install then
//! fails with an error naming the node. When the install future is dropped
//! (the reconciler's own deadline, shutdown), its pending entry is removed.
//!
//! # Who may call the install endpoints
//!
//! The endpoints are unauthenticated: a machine being installed has no
//! API key. What stands in for one is the pair (token, address):
//!
//! - every node installed by PXE has an IP address ([`PxeInstaller::install`]
//!   refuses one without, before anything is powered);
//! - every registry call takes the caller's address (`peer`), and checks
//!   it against the node's address *inside the registry's lock*, in the
//!   same critical section that reads or uses up the pending install, so
//!   nothing can change between check and use. IPv4-mapped IPv6 addresses
//!   (`::ffff:10.0.0.11`, what a `[::]` listener reports for an IPv4
//!   client) are canonicalised first;
//! - a request from another address changes nothing and gets the same
//!   answer as an unknown token ([`PxeError::UnknownToken`]), or, for the
//!   iPXE script, as a host with no install ([`PxeError::NoPendingInstall`]);
//!   the registry logs it with the address;
//! - a done callback must carry a valid OpenSSH host key (unless
//!   [`PxeConfig::require_host_key`] is off): it is what every later SSH
//!   connection to the node checks, so a "done" without one, or with a
//!   malformed one, fails the install instead of making the node Ready.
//!
//! A sniffed token is then useless from anywhere but the node's own
//! address. What is left is an attacker who can send from that address
//! (on the provisioning network, or by spoofing it there): hence the
//! recommended deployment, a separate listener for the install endpoints
//! on the provisioning network only ([`PxeConfig::listen`]).
//!
//! # HTTP mapping
//!
//! `GET /Install/ipxe?host=…` → [`PxeRegistry::ipxe_script`] (on
//! [`PxeError::NoPendingInstall`] and [`PxeError::Expired`], serve
//! [`LOCAL_BOOT_SCRIPT`], so a stranger cannot tell which hosts are being
//! installed); `GET /Install/kickstart?token=…` →
//! [`PxeRegistry::kickstart`]; `GET /Install/done?token=…&host_key=…` →
//! [`PxeRegistry::complete`]; `GET /Install/failed?token=…&reason=…` →
//! [`PxeRegistry::fail`]. [`PxeError::http_status`] gives the status code
//! for each error.
//!
//! # Templates
//!
//! The iPXE script and the kickstart are rendered from templates with
//! [`template::render`]. With `templates_dir`
//! set, the registry loads, at construction, `ipxe-{release}-{arch}.tmpl`,
//! `ipxe.tmpl`, `ks-{release}-{arch}.tmpl` and `ks.tmpl` from it (the first
//! that exists wins for each image; built-in defaults otherwise), and
//! refuses any with an unknown placeholder. Placeholders: see
//! [`PLACEHOLDERS`]. Values are inserted verbatim: they are URLs Duffy
//! builds from validated parts, validated host names and a validated key.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use duffy_core::model::NewNode;
use duffy_core::time::timeout;
use duffy_core::{
    Arch, BootDevice, Clock, InstallError, Installed, Installer, Node, PoolKey, PowerAction, PowerController,
    PowerState, Timestamp,
};
use rand::RngCore;
use serde::Deserialize;
use tokio::sync::oneshot;

use crate::keys::{KeyError, PublicKey};
use crate::template::{self, TemplateError};
use crate::util::{one_line, token_prefix};

/// The built-in iPXE template.
pub const DEFAULT_IPXE_TEMPLATE: &str = include_str!("templates/ipxe.tmpl");

/// The built-in kickstart template (Anaconda, EL7 and later).
pub const DEFAULT_KICKSTART_TEMPLATE: &str = include_str!("templates/ks.tmpl");

/// An iPXE script that boots the local disk: what the HTTP layer can serve
/// a machine that PXE-boots with no install pending.
pub const LOCAL_BOOT_SCRIPT: &str =
    "#!ipxe\n# Duffy: no install pending for this machine; boot from the local disk.\nexit\n";

/// Every placeholder the iPXE and kickstart templates may use:
///
/// - `hostname`, `ip` (empty when unknown), `hardware_arch`: the node;
/// - `release`, `arch`, `flavor` (empty when none): the image;
/// - `kernel_url`, `initrd_url`, `repo_url`: the image's boot files and
///   package repository (see [`PxeConfig`]);
/// - `kickstart_url`: `{public_url}/Install/kickstart?token=…`;
/// - `callback_done`: `{public_url}/Install/done?token=…` (append
///   `&host_key=…`, e.g. with `curl -G --data-urlencode`);
/// - `callback_failed`: `{public_url}/Install/failed?token=…` (append
///   `&reason=…`);
/// - `provisioning_key`: Duffy's SSH public key, one line;
/// - `token`: the install token; `public_url`: Duffy's base URL.
pub const PLACEHOLDERS: [&str; 15] = [
    "hostname",
    "ip",
    "hardware_arch",
    "release",
    "arch",
    "flavor",
    "kernel_url",
    "initrd_url",
    "repo_url",
    "kickstart_url",
    "callback_done",
    "callback_failed",
    "provisioning_key",
    "token",
    "public_url",
];

/// The placeholders the URL patterns of [`PxeConfig`] may use.
pub const URL_PLACEHOLDERS: [&str; 3] = ["release", "arch", "flavor"];

/// The largest template file accepted.
const MAX_TEMPLATE: u64 = 1024 * 1024;

/// How much of a machine's failure reason is kept.
const MAX_REASON: usize = 1000;

/// PXE install configuration.
///
/// ```toml
/// public_url = "http://10.0.0.1:8081"
/// listen = "10.0.0.1:8081"           # the provisioning network only
/// provisioning_public_key = "ssh-ed25519 AAAA… duffy@farm"
/// token_ttl = "90m"
/// templates_dir = "/etc/duffy/pxe"
/// kernel_url = "http://mirror.example.org/centos/{{release}}/os/{{arch}}/images/pxeboot/vmlinuz"
///
/// [[images]]
/// release = "9"
/// arch = "aarch64"
/// repo_url = "http://mirror.example.org/stream9/BaseOS/aarch64/os/"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PxeConfig {
    /// The base URL at which machines reach Duffy's HTTP service, e.g.
    /// `http://10.0.0.1:8080` (no path query or fragment; a trailing `/` is
    /// ignored).
    pub public_url: String,
    /// How long an install token is valid, i.e. how long an install may
    /// take from registration to the machine's callback. Default 1 h.
    #[serde(default = "default_token_ttl", deserialize_with = "duffy_core::time::serde_duration::deserialize")]
    pub token_ttl: Duration,
    /// A directory of templates overriding the built-in ones (see the
    /// module docs). Loaded once, when the registry is built.
    #[serde(default)]
    pub templates_dir: Option<PathBuf>,
    /// Duffy's own SSH public key, installed for root by the kickstart so
    /// Duffy can log in to hand the machine over.
    pub provisioning_public_key: String,
    /// Installer kernel URL pattern; `{{release}}`, `{{arch}}` and
    /// `{{flavor}}` are replaced.
    #[serde(default = "default_kernel_url")]
    pub kernel_url: String,
    /// Installer initrd URL pattern.
    #[serde(default = "default_initrd_url")]
    pub initrd_url: String,
    /// Package repository (install tree) URL pattern.
    #[serde(default = "default_repo_url")]
    pub repo_url: String,
    /// Per-image URLs, overriding the patterns.
    #[serde(default)]
    pub images: Vec<PxeImage>,
    /// Whether a done callback must carry the machine's SSH host key.
    /// Default `true`: the key is what SSH contextualization checks, so a
    /// node without one could not be handed over, and a "done" without
    /// one is the first sign of a forged or half-finished report. With
    /// `false`, a done callback without a key records none (a key that is
    /// given must still be valid).
    #[serde(default = "default_true")]
    pub require_host_key: bool,
    /// A separate address for the install endpoints (`/Install/*`), e.g.
    /// `10.0.0.1:8081` on the provisioning network. Read by the HTTP
    /// service, which then serves `/Install/*` only there and not on its
    /// main listener. `public_url` must point at it. Default: none, the
    /// install endpoints are on the main listener.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

/// URLs for one (release, arch), overriding [`PxeConfig`]'s patterns. Each
/// may itself use `{{release}}`, `{{arch}}` and `{{flavor}}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PxeImage {
    /// The image's release.
    pub release: String,
    /// The image's architecture.
    pub arch: Arch,
    /// Installer kernel URL.
    #[serde(default)]
    pub kernel_url: Option<String>,
    /// Installer initrd URL.
    #[serde(default)]
    pub initrd_url: Option<String>,
    /// Package repository URL.
    #[serde(default)]
    pub repo_url: Option<String>,
}

fn default_true() -> bool {
    true
}

fn default_token_ttl() -> Duration {
    Duration::from_secs(3600)
}

fn default_kernel_url() -> String {
    "http://mirror.centos.org/centos/{{release}}/os/{{arch}}/images/pxeboot/vmlinuz".to_string()
}

fn default_initrd_url() -> String {
    "http://mirror.centos.org/centos/{{release}}/os/{{arch}}/images/pxeboot/initrd.img".to_string()
}

fn default_repo_url() -> String {
    "http://mirror.centos.org/centos/{{release}}/os/{{arch}}/".to_string()
}

impl PxeConfig {
    /// A configuration with the defaults: 1 h tokens, built-in templates,
    /// the default URL patterns.
    pub fn new(public_url: impl Into<String>, provisioning_public_key: impl Into<String>) -> Self {
        PxeConfig {
            public_url: public_url.into(),
            token_ttl: default_token_ttl(),
            templates_dir: None,
            provisioning_public_key: provisioning_public_key.into(),
            kernel_url: default_kernel_url(),
            initrd_url: default_initrd_url(),
            repo_url: default_repo_url(),
            images: Vec::new(),
            require_host_key: true,
            listen: None,
        }
    }
}

/// A PXE install or callback was refused.
#[derive(Debug, thiserror::Error)]
pub enum PxeError {
    /// The token is not one of a pending install: malformed, never issued,
    /// already used, or its install was cancelled.
    #[error("unknown, already used or cancelled install token")]
    UnknownToken,
    /// The token's install ran out of time.
    #[error("the install token of {hostname} has expired")]
    Expired {
        /// The node.
        hostname: String,
    },
    /// An iPXE script was asked for a host with no pending install.
    #[error("no install pending for host {hostname:?}")]
    NoPendingInstall {
        /// The host name asked for (cut to 80 characters).
        hostname: String,
    },
    /// A done callback carried something that is not an OpenSSH host key.
    /// The install fails with this reason.
    #[error("{hostname} reported an invalid SSH host key: {source}")]
    InvalidHostKey {
        /// The node.
        hostname: String,
        /// Why the key was refused.
        #[source]
        source: KeyError,
    },
    /// A done callback carried no host key, and the configuration
    /// requires one ([`PxeConfig::require_host_key`]). The install fails
    /// with this reason.
    #[error("{hostname} reported its install done without an SSH host key; the PXE installer requires one")]
    MissingHostKey {
        /// The node.
        hostname: String,
    },
    /// A template has an error.
    #[error("PXE template {name}: {source}")]
    Template {
        /// The template's file name (or `built-in …`, or a URL field).
        name: String,
        /// The error.
        #[source]
        source: TemplateError,
    },
    /// A template could not be read.
    #[error("PXE templates: cannot read {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is invalid.
    #[error("invalid PXE configuration: {0}")]
    Config(String),
    /// The node or image cannot be installed by PXE (invalid name).
    #[error("cannot install {hostname:?} by PXE: {reason}")]
    InvalidNode {
        /// The node (cut to 80 characters).
        hostname: String,
        /// What is wrong.
        reason: String,
    },
}

impl PxeError {
    /// The HTTP status an endpoint should answer with: 404 for an unknown
    /// token or host, 410 for an expired token, 400 for an invalid or
    /// missing host key, 500 otherwise.
    pub fn http_status(&self) -> u16 {
        match self {
            PxeError::UnknownToken | PxeError::NoPendingInstall { .. } => 404,
            PxeError::Expired { .. } => 410,
            PxeError::InvalidHostKey { .. } | PxeError::MissingHostKey { .. } => 400,
            _ => 500,
        }
    }
}

/// What a waiting install is told.
#[derive(Debug)]
enum Outcome {
    Done(Option<String>),
    Failed(String),
    Expired,
}

struct Pending {
    hostname: String,
    /// The node's address, canonical: the only one its requests may come
    /// from.
    ip: IpAddr,
    hardware_arch: Arch,
    image: PoolKey,
    expires_at: Timestamp,
    tx: oneshot::Sender<Outcome>,
}

#[derive(Default)]
struct State {
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
struct Expired {
    hostname: String,
    ip: IpAddr,
}

/// Canonical form of an address: an IPv4-mapped IPv6 address (what a
/// dual-stack `[::]` socket reports for an IPv4 peer) becomes the IPv4
/// address.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// The URLs of one image.
struct ImageUrls {
    kernel: String,
    initrd: String,
    repo: String,
}

/// Pending PXE installs, shared (in an `Arc`) between the [`PxeInstaller`]
/// and the HTTP handlers that serve the machines. See the module docs.
pub struct PxeRegistry {
    clock: Arc<dyn Clock>,
    public_url: String,
    provisioning_key: String,
    kernel_url: String,
    initrd_url: String,
    repo_url: String,
    images: Vec<PxeImage>,
    /// Templates from `templates_dir`, by file name.
    templates: BTreeMap<String, String>,
    require_host_key: bool,
    state: Mutex<State>,
}

impl fmt::Debug for PxeRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the tokens.
        f.debug_struct("PxeRegistry")
            .field("public_url", &self.public_url)
            .field("templates", &self.templates.keys().collect::<Vec<_>>())
            .field("pending", &self.pending_count())
            .finish_non_exhaustive()
    }
}

impl PxeRegistry {
    /// Builds a registry from `config`: validates the public URL, the
    /// provisioning key and the URL patterns, and loads and checks the
    /// templates of `templates_dir`. `clock` decides when tokens expire.
    pub fn new(config: &PxeConfig, clock: Arc<dyn Clock>) -> Result<Self, PxeError> {
        let public_url = config.public_url.trim().trim_end_matches('/').to_string();
        validate_public_url(&public_url)?;
        let provisioning_key = PublicKey::parse(&config.provisioning_public_key)
            .map_err(|e| PxeError::Config(format!("provisioning_public_key: {e}")))?
            .to_string();
        if config.token_ttl.is_zero() {
            return Err(PxeError::Config("token_ttl must be more than zero".to_string()));
        }
        let mut patterns = vec![
            ("kernel_url".to_string(), config.kernel_url.as_str()),
            ("initrd_url".to_string(), config.initrd_url.as_str()),
            ("repo_url".to_string(), config.repo_url.as_str()),
        ];
        for img in &config.images {
            duffy_core::model::validate_token("release", &img.release, 64)
                .map_err(|e| PxeError::Config(format!("images: {e}")))?;
            let at = |field: &str| format!("images[{}/{}].{field}", img.release, img.arch);
            patterns.extend(img.kernel_url.as_deref().map(|u| (at("kernel_url"), u)));
            patterns.extend(img.initrd_url.as_deref().map(|u| (at("initrd_url"), u)));
            patterns.extend(img.repo_url.as_deref().map(|u| (at("repo_url"), u)));
        }
        for (name, pattern) in patterns {
            validate_url_pattern(&name, pattern)?;
        }
        let templates = match &config.templates_dir {
            Some(dir) => load_templates(dir)?,
            None => BTreeMap::new(),
        };
        tracing::info!(public_url = %public_url, templates = ?templates.keys().collect::<Vec<_>>(),
            token_ttl = ?config.token_ttl, "PXE registry ready");
        Ok(PxeRegistry {
            clock,
            public_url,
            provisioning_key,
            kernel_url: config.kernel_url.clone(),
            initrd_url: config.initrd_url.clone(),
            repo_url: config.repo_url.clone(),
            images: config.images.clone(),
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
            (self.vars(p, token)?, p.image.clone())
        };
        let (name, text) = self.template("ipxe", &image, DEFAULT_IPXE_TEMPLATE);
        tracing::info!(node = %hostname, %peer, template = %name, "serving iPXE script");
        render(&name, text, &vars)
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
            (self.vars(p, token)?, p.image.clone(), p.hostname.clone())
        };
        let (name, text) = self.template("ks", &image, DEFAULT_KICKSTART_TEMPLATE);
        tracing::info!(node = %hostname, token = %token_prefix(token), template = %name, "serving kickstart");
        render(&name, text, &vars)
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
    fn register(
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
    fn cancel(&self, token: &str) {
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
    fn expire(&self, token: &str) {
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

    /// The template for `kind` (`ipxe` or `ks`) and `image`: from
    /// `templates_dir` if there is one, else the built-in.
    fn template<'a>(&'a self, kind: &str, image: &PoolKey, builtin: &'a str) -> (String, &'a str) {
        for name in [format!("{kind}-{}-{}.tmpl", image.release, image.arch), format!("{kind}.tmpl")] {
            if let Some(t) = self.templates.get(&name) {
                return (name, t.as_str());
            }
        }
        (format!("built-in {kind}.tmpl"), builtin)
    }

    fn image_urls(&self, image: &PoolKey) -> Result<ImageUrls, PxeError> {
        let own = self.images.iter().find(|i| i.release == image.release && i.arch == image.arch);
        let pick = |field: &str, own: Option<&String>, default: &str| -> Result<String, PxeError> {
            let pattern = own.map(String::as_str).unwrap_or(default);
            template::render(
                pattern,
                &[
                    ("release", image.release.as_str()),
                    ("arch", image.arch.as_str()),
                    ("flavor", image.flavor.as_deref().unwrap_or("")),
                ],
            )
            .map_err(|source| PxeError::Template { name: field.to_string(), source })
        };
        Ok(ImageUrls {
            kernel: pick("kernel_url", own.and_then(|i| i.kernel_url.as_ref()), &self.kernel_url)?,
            initrd: pick("initrd_url", own.and_then(|i| i.initrd_url.as_ref()), &self.initrd_url)?,
            repo: pick("repo_url", own.and_then(|i| i.repo_url.as_ref()), &self.repo_url)?,
        })
    }

    fn vars(&self, p: &Pending, token: &str) -> Result<Vec<(&'static str, String)>, PxeError> {
        let urls = self.image_urls(&p.image)?;
        let base = &self.public_url;
        Ok(vec![
            ("hostname", p.hostname.clone()),
            ("ip", p.ip.to_string()),
            ("hardware_arch", p.hardware_arch.as_str().to_string()),
            ("release", p.image.release.clone()),
            ("arch", p.image.arch.as_str().to_string()),
            ("flavor", p.image.flavor.clone().unwrap_or_default()),
            ("kernel_url", urls.kernel),
            ("initrd_url", urls.initrd),
            ("repo_url", urls.repo),
            ("kickstart_url", format!("{base}/Install/kickstart?token={token}")),
            ("callback_done", format!("{base}/Install/done?token={token}")),
            ("callback_failed", format!("{base}/Install/failed?token={token}")),
            ("provisioning_key", self.provisioning_key.clone()),
            ("token", token.to_string()),
            ("public_url", base.clone()),
        ])
    }
}

fn render(name: &str, text: &str, vars: &[(&'static str, String)]) -> Result<String, PxeError> {
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    template::render(text, &vars).map_err(|source| PxeError::Template { name: name.to_string(), source })
}

/// Whether a request for `hostname`'s install comes from its address
/// `ip`; logs a refusal with both addresses (and never the whole token).
fn from_node(ip: IpAddr, peer: IpAddr, hostname: &str, what: &str, token: &str) -> bool {
    let peer = canonical(peer);
    if peer == ip {
        return true;
    }
    tracing::warn!(node = %hostname, %peer, node_ip = %ip, token = %token_prefix(token),
        "{what} requested from another address than the node's; refused, nothing changed");
    false
}

/// The address of a node to be installed by PXE, canonical, or why it has
/// none a PXE install can use: the check [`PxeInstaller::install`] makes
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
fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn is_token_shaped(token: &str) -> bool {
    token.len() == 64 && token.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Characters allowed in URLs that go verbatim into iPXE scripts and
/// single-quoted shell strings: no whitespace, quotes, `$`, backslash or
/// backtick.
fn url_char_ok(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~:/[]@%+,=!*();?&#".contains(&b)
}

fn validate_public_url(url: &str) -> Result<(), PxeError> {
    let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
    let ok = match rest {
        Some(rest) => {
            !rest.is_empty()
                && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~:/[]@%".contains(&b))
                && !rest.starts_with('/')
        }
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(PxeError::Config(format!(
            "public_url {:?} must be http(s)://host[:port][/path] without query, quotes or spaces",
            one_line(url, 200)
        )))
    }
}

fn validate_url_pattern(name: &str, pattern: &str) -> Result<(), PxeError> {
    template::check(pattern, &URL_PLACEHOLDERS)
        .map_err(|source| PxeError::Template { name: name.to_string(), source })?;
    let scheme_ok = pattern.split_once("://").is_some_and(|(s, _)| {
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+.-".contains(&b))
    });
    if !scheme_ok || !pattern.bytes().all(|b| url_char_ok(b) || b == b'{' || b == b'}') {
        return Err(PxeError::Config(format!(
            "{name} {:?} must be a URL (scheme://…) without spaces, quotes, '$', '\\' or '`'",
            one_line(pattern, 200)
        )));
    }
    Ok(())
}

fn load_templates(dir: &Path) -> Result<BTreeMap<String, String>, PxeError> {
    use std::io::Read;
    let io = |path: &Path, source| PxeError::Io { path: path.to_path_buf(), source };
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let entry = entry.map_err(|e| io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = (name.starts_with("ipxe") || name.starts_with("ks")) && name.ends_with(".tmpl");
        if !ours {
            tracing::debug!(file = %name, "ignoring a file in the PXE templates directory");
            continue;
        }
        let path = entry.path();
        let mut text = String::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(MAX_TEMPLATE + 1).read_to_string(&mut text))
            .map_err(|e| io(&path, e))?;
        if text.len() as u64 > MAX_TEMPLATE {
            return Err(PxeError::Config(format!("template {} is larger than {MAX_TEMPLATE} bytes", path.display())));
        }
        template::check(&text, &PLACEHOLDERS).map_err(|source| PxeError::Template { name: name.clone(), source })?;
        out.insert(name, text);
    }
    Ok(out)
}

/// An [`Installer`] that installs by PXE. See the module docs.
pub struct PxeInstaller {
    token_ttl: Duration,
    power: Arc<dyn PowerController>,
    registry: Arc<PxeRegistry>,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for PxeInstaller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PxeInstaller").field("token_ttl", &self.token_ttl).field("registry", &self.registry).finish()
    }
}

impl PxeInstaller {
    /// An installer using `power` to boot machines and `registry` to meet
    /// their callbacks. From `config` it takes only `token_ttl` (how long
    /// it waits for a machine); `registry` was built from the same
    /// configuration. Waits are measured on `clock`.
    pub fn new(
        config: &PxeConfig,
        power: Arc<dyn PowerController>,
        registry: Arc<PxeRegistry>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        PxeInstaller { token_ttl: config.token_ttl, power, registry, clock }
    }

    /// The registry the HTTP handlers serve from.
    pub fn registry(&self) -> &Arc<PxeRegistry> {
        &self.registry
    }
}

/// Removes a pending install when the install future is dropped before it
/// finished. After a callback or expiry it finds nothing to remove.
struct PendingGuard<'a> {
    registry: &'a PxeRegistry,
    token: String,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.registry.cancel(&self.token);
    }
}

#[async_trait]
impl Installer for PxeInstaller {
    async fn install(&self, node: &Node, image: &PoolKey) -> Result<Installed, InstallError> {
        let host = &node.hostname;
        let ttl = self.token_ttl;
        let expires_at = self.clock.now().plus(ttl);
        let (token, mut rx) =
            self.registry.register(node, image, expires_at).map_err(|e| InstallError::new(e.to_string()))?;
        let _guard = PendingGuard { registry: &self.registry, token: token.clone() };
        tracing::info!(node = %host, image = %image, token = %token_prefix(&token), expires_at = %expires_at,
            "PXE install registered");

        let power_err = |what: &str, e: duffy_core::PowerError| {
            InstallError::new(format!("PXE install of {host} ({image}): cannot {what}: {e}"))
        };
        self.power.set_next_boot(node, BootDevice::Pxe).await.map_err(|e| power_err("set next boot to PXE", e))?;
        let action = match self.power.status(node).await.map_err(|e| power_err("read the power state", e))? {
            PowerState::Off => PowerAction::On,
            PowerState::On | PowerState::Unknown => PowerAction::Cycle,
        };
        self.power.power(node, action).await.map_err(|e| power_err(&format!("power {action}"), e))?;
        tracing::info!(node = %host, %action, "machine booting into the installer; waiting for its callback");

        let remaining = expires_at.since(self.clock.now());
        let outcome = match timeout(&*self.clock, remaining, &mut rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => {
                return Err(InstallError::new(format!(
                    "PXE install of {host} ({image}): superseded by a newer install of the same node"
                )));
            }
            // A callback may have landed just as the deadline passed.
            Err(_) => match rx.try_recv() {
                Ok(outcome) => outcome,
                Err(_) => {
                    self.registry.expire(&token);
                    Outcome::Expired
                }
            },
        };
        match outcome {
            Outcome::Done(host_key) => {
                tracing::info!(node = %host, image = %image, "PXE install done");
                Ok(Installed { host_key })
            }
            Outcome::Failed(reason) => Err(InstallError::new(format!(
                "PXE install of {host} ({image}) failed; the machine reported: {reason}"
            ))),
            Outcome::Expired => {
                tracing::warn!(node = %host, image = %image, ?ttl, "PXE install token expired without a callback");
                Err(InstallError::new(format!(
                    "PXE install of {host} ({image}): no callback from the machine within {ttl:?}; its install token expired"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_templates_use_known_placeholders() {
        template::check(DEFAULT_IPXE_TEMPLATE, &PLACEHOLDERS).unwrap();
        template::check(DEFAULT_KICKSTART_TEMPLATE, &PLACEHOLDERS).unwrap();
        for p in [default_kernel_url(), default_initrd_url(), default_repo_url()] {
            validate_url_pattern("x", &p).unwrap();
        }
    }

    #[test]
    fn tokens_are_long_random_hex() {
        let a = new_token();
        let b = new_token();
        assert!(is_token_shaped(&a) && is_token_shaped(&b));
        assert_ne!(a, b);
        assert!(!is_token_shaped("ABC"));
        assert!(!is_token_shaped(&a.to_uppercase()));
    }

    #[test]
    fn public_url_is_checked() {
        assert!(validate_public_url("http://10.0.0.1:8080").is_ok());
        assert!(validate_public_url("https://duffy.example.org/base").is_ok());
        for bad in ["ftp://x", "http://", "http://a b", "http://x/'y", "http://x/?q=1", "http://x/$y", "10.0.0.1"] {
            assert!(validate_public_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn url_patterns_are_checked() {
        assert!(validate_url_pattern("k", "tftp://10.0.0.1/{{release}}/vmlinuz").is_ok());
        assert!(validate_url_pattern("k", "http://m/{{version}}/").is_err());
        assert!(validate_url_pattern("k", "http://m/'x").is_err());
        assert!(validate_url_pattern("k", "/no/scheme").is_err());
    }
}
