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
pub use templates::{DEFAULT_IPXE_TEMPLATE, DEFAULT_KICKSTART_TEMPLATE, LOCAL_BOOT_SCRIPT, PLACEHOLDERS};

use crate::keys::KeyError;
use crate::template::TemplateError;

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

#[cfg(test)]
mod tests {
    use super::config::*;
    use super::registry::*;
    use super::*;
    use crate::template;

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
