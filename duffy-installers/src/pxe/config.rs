//! [`PxeConfig`]: what the operator configures, and its checks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use duffy_core::Arch;
use serde::Deserialize;

use super::PxeError;
use crate::template;
use crate::util::one_line;

/// The placeholders the URL patterns of [`PxeConfig`] may use.
pub const URL_PLACEHOLDERS: [&str; 3] = ["release", "arch", "flavor"];

/// PXE install configuration.
///
/// ```toml
/// public_url = "http://10.0.0.1:8081"
/// listen = "10.0.0.1:8081"           # the provisioning network only
/// provisioning_public_key = "ssh-ed25519 AAAA… duffy@farm"
/// token_ttl = "90m"
/// poll_interval = "1s"
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
    /// How often a waiting install reads its ticket from the store, to
    /// learn of a callback another service process answered (replicas on
    /// PostgreSQL); a callback answered by the waiting process wakes it at
    /// once. Default 1 s.
    #[serde(default = "default_poll_interval", deserialize_with = "duffy_core::time::serde_duration::deserialize")]
    pub poll_interval: Duration,
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
    /// A separate address for the install endpoints, e.g.
    /// `10.0.0.1:8081` on the provisioning network. Read by the HTTP
    /// service, which then serves the install endpoints only there and not on its
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

pub(super) fn default_true() -> bool {
    true
}

pub(super) fn default_token_ttl() -> Duration {
    Duration::from_secs(3600)
}

pub(super) fn default_poll_interval() -> Duration {
    Duration::from_secs(1)
}

pub(super) fn default_kernel_url() -> String {
    "http://mirror.centos.org/centos/{{release}}/os/{{arch}}/images/pxeboot/vmlinuz".to_string()
}

pub(super) fn default_initrd_url() -> String {
    "http://mirror.centos.org/centos/{{release}}/os/{{arch}}/images/pxeboot/initrd.img".to_string()
}

pub(super) fn default_repo_url() -> String {
    "http://mirror.centos.org/centos/{{release}}/os/{{arch}}/".to_string()
}

impl PxeConfig {
    /// A configuration with the defaults: 1 h tokens, built-in templates,
    /// the default URL patterns.
    pub fn new(public_url: impl Into<String>, provisioning_public_key: impl Into<String>) -> Self {
        PxeConfig {
            public_url: public_url.into(),
            token_ttl: default_token_ttl(),
            poll_interval: default_poll_interval(),
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

/// Characters allowed in URLs that go verbatim into iPXE scripts and
/// single-quoted shell strings: no whitespace, quotes, `$`, backslash or
/// backtick.
pub(super) fn url_char_ok(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~:/[]@%+,=!*();?&#".contains(&b)
}

pub(super) fn validate_public_url(url: &str) -> Result<(), PxeError> {
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

pub(super) fn validate_url_pattern(name: &str, pattern: &str) -> Result<(), PxeError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_url_patterns_are_valid() {
        for p in [default_kernel_url(), default_initrd_url(), default_repo_url()] {
            validate_url_pattern("x", &p).unwrap();
        }
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
