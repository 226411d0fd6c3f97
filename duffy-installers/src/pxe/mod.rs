//! Network installs: PXE boot, iPXE script, kickstart, install callbacks.
//!
//! # How an install runs
//!
//! 1. [`PxeInstaller::install`] registers a *pending install* for the node
//!    through the shared [`PxeRegistry`]: an install ticket in the store
//!    ([`duffy_core::tickets`]), so that every service process sharing the
//!    store (replicas on PostgreSQL) can serve the machine. An older
//!    pending install of the same node is replaced (its waiter fails with
//!    "superseded").
//! 2. It sets the node's next boot to PXE through the
//!    [`PowerController`] and power-cycles it (powers it on if it is off).
//! 3. The machine PXE-boots and fetches its iPXE script from Duffy's HTTP
//!    service, which calls [`PxeRegistry::ipxe_script`] with the host
//!    name. The script boots the installer kernel with `inst.ks=` the
//!    kickstart's URL: [`PxeConfig::public_url`], the kickstart endpoint
//!    the HTTP service gave ([`InstallEndpoints::kickstart`]) and a
//!    one-time token (256 bits, 64 hex digits). The token is this
//!    process's for the install: HMAC-SHA256 of the ticket's id under a
//!    key the process draws at start and never stores, so the script is
//!    the same every time this process serves it; the store keeps only
//!    the token's SHA-256, added to the ticket when the script is served
//!    (another process serving the script adds its own).
//! 4. Anaconda fetches the kickstart ([`PxeRegistry::kickstart`]). The
//!    built-in kickstart's `%post` installs Duffy's provisioning key for
//!    root and a one-shot first-boot hook; on an error it calls the failed
//!    endpoint ([`InstallEndpoints::failed`]) with `&reason=…`.
//! 5. At first boot, once sshd runs, the hook calls the done endpoint
//!    ([`InstallEndpoints::done`]) with `&host_key=…`, the contents of
//!    the SSH host public key (ed25519, else ecdsa, else rsa),
//!    URL-encoded. The HTTP layer calls [`PxeRegistry::complete`] (or
//!    [`PxeRegistry::fail`]), which records the outcome on the ticket. The
//!    waiting install reads its ticket every [`PxeConfig::poll_interval`]
//!    (and at once when the callback lands in its own process) and
//!    returns [`Installed`] with the host key.
//!
//! The callback comes from the installed system's first boot rather than
//! from `%post` (which runs before the installer reboots) because the
//! [`Installer`] contract is "installed and reachable": right after
//! `install` returns, the node may be handed out and Duffy logs in to it.
//!
//! Tokens are single use (a second callback is [`PxeError::UnknownToken`])
//! and expire after `token_ttl` ([`PxeError::Expired`]); the install then
//! fails with an error naming the node; the ticket is then a tombstone (a
//! late callback from the node's address is told it expired) until the
//! node's next install. When the install future is dropped (the
//! reconciler's own deadline, shutdown), its ticket is removed.
//!
//! # Who may call the install endpoints
//!
//! The endpoints are unauthenticated: a machine being installed has no
//! API key. What stands in for one is the pair (token, address):
//!
//! - every node installed by PXE has an IP address ([`PxeInstaller::install`]
//!   refuses one without, before anything is powered);
//! - every registry call takes the caller's address (`peer`), and the
//!   store checks it against the node's address *in the same store
//!   operation* that reads or uses up the pending install, so nothing can
//!   change between check and use. IPv4-mapped IPv6 addresses
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
//! # The HTTP side
//!
//! This crate knows no HTTP: the service (duffy-http) owns the routes,
//! gives their paths to [`PxeRegistry::new`] as [`InstallEndpoints`], and
//! maps each [`PxeError`] to its answer. It serves the iPXE script with
//! [`PxeRegistry::ipxe_script`] (and, on [`PxeError::NoPendingInstall`]
//! and [`PxeError::Expired`], [`LOCAL_BOOT_SCRIPT`], so a stranger cannot
//! tell which hosts are being installed), the kickstart with
//! [`PxeRegistry::kickstart`], and the machine's reports with
//! [`PxeRegistry::complete`] and [`PxeRegistry::fail`].
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
//!
//! [`PowerController`]: duffy_core::PowerController
//! [`Installed`]: duffy_core::Installed
//! [`Installer`]: duffy_core::Installer
//! [`PxeInstaller::install`]: duffy_core::Installer::install
//! [`template::render`]: crate::template::render

mod config;
mod installer;
mod registry;
mod templates;

use std::path::PathBuf;

pub use config::{PxeConfig, PxeImage, URL_PLACEHOLDERS};
pub use installer::PxeInstaller;
pub use registry::{PxeRegistry, node_address};
pub use templates::{
    DEFAULT_IPXE_TEMPLATE, DEFAULT_KICKSTART_TEMPLATE, InstallEndpoints, LOCAL_BOOT_SCRIPT, PLACEHOLDERS,
};

use crate::keys::KeyError;
use crate::template::TemplateError;

/// A PXE install or callback was refused, or the PXE configuration is
/// wrong. The HTTP service decides what each variant is answered with;
/// the display is written for the machine's log or the operator.
#[derive(Debug, thiserror::Error)]
pub enum PxeError {
    /// The token is not one of a pending install: malformed, never issued,
    /// already used, or its install was cancelled.
    #[error("unknown, already used or cancelled install token")]
    UnknownToken,
    /// The token's install ran out of time.
    #[error("the install token of {hostname} has expired")]
    Expired {
        /// The node's host name.
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
        /// The node's host name.
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
        /// The node's host name.
        hostname: String,
    },
    /// A template has an error.
    #[error("PXE template {name}: {source}")]
    Template {
        /// The template's file name (or `built-in …`, or a URL field).
        name: String,
        /// What is wrong in it (an unknown placeholder, say).
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
    /// The store that keeps the pending installs failed; nothing is known
    /// to have changed. The machine should try again.
    #[error("PXE installs: {what}: {source}")]
    Store {
        /// What the registry was doing.
        what: String,
        /// The store's error.
        #[source]
        source: duffy_core::StoreError,
    },
    /// The configuration is invalid.
    #[error("invalid PXE configuration: {0}")]
    Config(String),
    /// The node or image cannot be installed by PXE (invalid name).
    #[error("cannot install {hostname:?} by PXE: {reason}")]
    InvalidNode {
        /// The node's host name (cut to 80 characters).
        hostname: String,
        /// What is wrong: the name's rule, or why its address cannot be
        /// used.
        reason: String,
    },
}
