//! Configuration: how to reach each node's BMC.
//!
//! A service reads an [`IpmiConfig`] (for example the `[ipmi]` table of its
//! TOML file) and resolves it into a [`BmcInventory`], one [`BmcConfig`] per
//! node, reading password files on the way:
//!
//! ```toml
//! [defaults]
//! username = "admin"
//! password_file = "/etc/duffy/bmc-password"
//! timeout = "1s"       # wait for one answer (ipmitool -N)
//! retries = 2          # retransmissions per request (ipmitool -R)
//! deadline = "20s"     # the most one power operation may take
//!
//! [[bmc]]
//! node = "n1.ci.example.org"
//! address = "n1-bmc.ci.example.org"
//!
//! [[bmc]]
//! node = "n2.ci.example.org"
//! address = "10.0.0.12"
//! port = 6230
//! username = "root"
//! password = "calvin"
//! driver = "ipmitool"
//! ```

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::lanplus::messages::MAX_USERNAME;

/// The standard RMCP port.
pub const DEFAULT_PORT: u16 = 623;
/// Default wait for one answer before retransmitting.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default number of retransmissions of one request.
pub const DEFAULT_RETRIES: u32 = 2;
/// Default limit on one whole power operation.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(20);
/// The longest password RAKP-HMAC-SHA1 uses (the key is 20 bytes).
pub const MAX_PASSWORD: usize = 20;

/// A secret string, such as a BMC password. `Debug` and `Display` print
/// `***`; it cannot be serialized; [`Secret::expose`] is the only way to
/// read it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret::new(s)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// Which implementation talks to a BMC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    /// The built-in RMCP+ client ([`crate::NativeDriver`]).
    #[default]
    Native,
    /// The `ipmitool` program ([`crate::IpmitoolDriver`]), for BMCs the
    /// native driver does not handle.
    Ipmitool,
}

/// How to reach one BMC, fully resolved.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BmcConfig {
    /// Host name or IP address of the BMC.
    pub address: String,
    /// UDP port (623 by default).
    #[serde(default = "default_port")]
    pub port: u16,
    /// IPMI user name (at most 16 bytes).
    pub username: String,
    /// The user's password (at most 20 bytes).
    pub password: Secret,
    /// Which driver to use.
    #[serde(default)]
    pub driver: Driver,
    /// How long to wait for one answer before retransmitting (ipmitool
    /// `-N`, rounded up to whole seconds there).
    #[serde(default = "default_timeout", deserialize_with = "duffy_core::time::serde_duration::deserialize")]
    pub timeout: Duration,
    /// How many times to retransmit an unanswered request (ipmitool `-R`).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// The most one power operation may take, waiting included; past it the
    /// operation fails with `Timeout` (the ipmitool child is killed).
    #[serde(default = "default_deadline", deserialize_with = "duffy_core::time::serde_duration::deserialize")]
    pub deadline: Duration,
}

fn default_port() -> u16 {
    DEFAULT_PORT
}
fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}
fn default_retries() -> u32 {
    DEFAULT_RETRIES
}
fn default_deadline() -> Duration {
    DEFAULT_DEADLINE
}

impl BmcConfig {
    /// A configuration with the default port, driver and timings.
    pub fn new(address: impl Into<String>, username: impl Into<String>, password: Secret) -> Self {
        BmcConfig {
            address: address.into(),
            port: DEFAULT_PORT,
            username: username.into(),
            password,
            driver: Driver::default(),
            timeout: DEFAULT_TIMEOUT,
            retries: DEFAULT_RETRIES,
            deadline: DEFAULT_DEADLINE,
        }
    }

    /// `address:port`, the key that serialises operations on this BMC.
    pub fn key(&self) -> String {
        format!("{}:{}", self.address, self.port)
    }

    /// Checks the values IPMI and the drivers can use.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |why: String| Err(ConfigError::Invalid { bmc: self.key(), why });
        let a = &self.address;
        if a.is_empty() || a.starts_with('-') || a.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return bad(format!("address {a:?} is not a host name or IP address"));
        }
        if self.username.len() > MAX_USERNAME || self.username.starts_with('-') {
            return bad(format!("user name must be at most {MAX_USERNAME} bytes and not start with '-'"));
        }
        if self.username.contains('\0') {
            return bad("user name contains a NUL byte".into());
        }
        if self.password.expose().len() > MAX_PASSWORD {
            return bad(format!("password longer than {MAX_PASSWORD} bytes"));
        }
        if self.timeout.is_zero() || self.deadline.is_zero() {
            return bad("timeout and deadline must be more than zero".into());
        }
        Ok(())
    }
}

/// Why a configuration cannot be used. Never contains a password.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value is out of range.
    #[error("BMC {bmc}: {why}")]
    Invalid {
        /// The BMC's `address:port`.
        bmc: String,
        /// What is wrong.
        why: String,
    },
    /// A required value is missing from an entry and from the defaults.
    #[error("BMC of node {node}: no {field} given, neither in the entry nor in [defaults]")]
    Missing {
        /// The node whose BMC entry is incomplete.
        node: String,
        /// The field (address, user or password) found nowhere.
        field: &'static str,
    },
    /// The same node is configured twice.
    #[error("node {0} has two BMC entries")]
    Duplicate(String),
    /// An entry gives both `password` and `password_file`.
    #[error("BMC of node {0}: give password or password_file, not both")]
    TwoPasswords(String),
    /// A password file could not be read.
    #[error("cannot read password file {path}: {source}")]
    PasswordFile {
        /// The password file named by the entry.
        path: PathBuf,
        /// The OS error reading it.
        source: std::io::Error,
    },
}

/// Settings shared by all entries of an [`IpmiConfig`]; an entry's own value
/// wins.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BmcDefaults {
    /// UDP port.
    pub port: Option<u16>,
    /// User name.
    pub username: Option<String>,
    /// Password (prefer `password_file`).
    pub password: Option<Secret>,
    /// A file holding the password (one line; a trailing newline is ignored).
    pub password_file: Option<PathBuf>,
    /// Driver.
    pub driver: Option<Driver>,
    /// Wait for one answer.
    #[serde(default, deserialize_with = "duffy_core::time::serde_duration::deserialize_option")]
    pub timeout: Option<Duration>,
    /// Retransmissions per request.
    pub retries: Option<u32>,
    /// Limit on one operation.
    #[serde(default, deserialize_with = "duffy_core::time::serde_duration::deserialize_option")]
    pub deadline: Option<Duration>,
}

/// One node's BMC in an [`IpmiConfig`]; fields left out come from
/// [`BmcDefaults`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BmcEntry {
    /// The node's host name, as in the store ([`duffy_core::model::Node::hostname`]).
    pub node: String,
    /// The BMC's host name or IP address.
    pub address: String,
    /// UDP port.
    pub port: Option<u16>,
    /// User name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<Secret>,
    /// A file holding the password.
    pub password_file: Option<PathBuf>,
    /// Driver.
    pub driver: Option<Driver>,
    /// Wait for one answer.
    #[serde(default, deserialize_with = "duffy_core::time::serde_duration::deserialize_option")]
    pub timeout: Option<Duration>,
    /// Retransmissions per request.
    pub retries: Option<u32>,
    /// Limit on one operation.
    #[serde(default, deserialize_with = "duffy_core::time::serde_duration::deserialize_option")]
    pub deadline: Option<Duration>,
}

/// The IPMI section of a configuration file: defaults and one entry per
/// node (`[[bmc]]` in TOML).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpmiConfig {
    /// Shared settings.
    #[serde(default)]
    pub defaults: BmcDefaults,
    /// One entry per node.
    #[serde(default, rename = "bmc")]
    pub bmcs: Vec<BmcEntry>,
}

impl IpmiConfig {
    /// Applies the defaults, reads password files and checks every entry.
    pub fn resolve(&self) -> Result<BmcInventory, ConfigError> {
        let mut inv = BmcInventory::default();
        let mut file_cache: HashMap<PathBuf, Secret> = HashMap::new();
        for e in &self.bmcs {
            let d = &self.defaults;
            let username = e.username.clone().or_else(|| d.username.clone());
            let username = username.ok_or_else(|| ConfigError::Missing { node: e.node.clone(), field: "username" })?;
            if e.password.is_some() && e.password_file.is_some() {
                return Err(ConfigError::TwoPasswords(e.node.clone()));
            }
            let password = match (&e.password, &e.password_file) {
                (Some(p), _) => p.clone(),
                (None, Some(f)) => read_password_cached(f, &mut file_cache)?,
                (None, None) => match (&d.password, &d.password_file) {
                    (Some(p), _) => p.clone(),
                    (None, Some(f)) => read_password_cached(f, &mut file_cache)?,
                    (None, None) => return Err(ConfigError::Missing { node: e.node.clone(), field: "password" }),
                },
            };
            let cfg = BmcConfig {
                address: e.address.clone(),
                port: e.port.or(d.port).unwrap_or(DEFAULT_PORT),
                username,
                password,
                driver: e.driver.or(d.driver).unwrap_or_default(),
                timeout: e.timeout.or(d.timeout).unwrap_or(DEFAULT_TIMEOUT),
                retries: e.retries.or(d.retries).unwrap_or(DEFAULT_RETRIES),
                deadline: e.deadline.or(d.deadline).unwrap_or(DEFAULT_DEADLINE),
            };
            cfg.validate()?;
            if inv.insert(e.node.clone(), cfg).is_some() {
                return Err(ConfigError::Duplicate(e.node.clone()));
            }
        }
        Ok(inv)
    }
}

fn read_password_cached(path: &Path, cache: &mut HashMap<PathBuf, Secret>) -> Result<Secret, ConfigError> {
    if let Some(s) = cache.get(path) {
        return Ok(s.clone());
    }
    let s = read_password_file(path)?;
    cache.insert(path.to_path_buf(), s.clone());
    Ok(s)
}

/// Reads a password file: its first line, without the line ending. Warns
/// (through `tracing`) when others than the owner can read it.
pub fn read_password_file(path: &Path) -> Result<Secret, ConfigError> {
    let err = |source| ConfigError::PasswordFile { path: path.to_path_buf(), source };
    let text = std::fs::read_to_string(path).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).map(|m| m.permissions().mode()).unwrap_or(0);
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "BMC password file is readable by group or others");
        }
    }
    let line = text.lines().next().unwrap_or("");
    Ok(Secret::new(line.trim_end_matches('\r')))
}

/// Each node's BMC, by node host name.
#[derive(Debug, Clone, Default)]
pub struct BmcInventory {
    by_host: HashMap<String, BmcConfig>,
}

impl BmcInventory {
    /// An empty inventory.
    pub fn new() -> Self {
        BmcInventory::default()
    }

    /// Adds or replaces a node's BMC; returns the previous one.
    pub fn insert(&mut self, hostname: impl Into<String>, bmc: BmcConfig) -> Option<BmcConfig> {
        self.by_host.insert(hostname.into(), bmc)
    }

    /// The BMC of the node with this host name.
    pub fn get(&self, hostname: &str) -> Option<&BmcConfig> {
        self.by_host.get(hostname)
    }

    /// How many nodes have a BMC.
    pub fn len(&self) -> usize {
        self.by_host.len()
    }

    /// Whether no node has a BMC.
    pub fn is_empty(&self) -> bool {
        self.by_host.is_empty()
    }

    /// Every node's host name and BMC, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &BmcConfig)> {
        self.by_host.iter().map(|(h, b)| (h.as_str(), b))
    }
}

impl FromIterator<(String, BmcConfig)> for BmcInventory {
    fn from_iter<T: IntoIterator<Item = (String, BmcConfig)>>(iter: T) -> Self {
        BmcInventory { by_host: iter.into_iter().collect() }
    }
}

/// Parses a duration (see [`duffy_core::time::parse_duration`]).
pub use duffy_core::time::parse_duration;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "*** ***");
        let b = BmcConfig::new("10.0.0.1", "admin", s);
        let dbg = format!("{b:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(dbg.contains("***"));
        assert_eq!(b.password.expose(), "hunter2");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn bmc_config_from_json_with_defaults() {
        let b: BmcConfig =
            serde_json::from_str(r#"{"address":"10.0.0.1","username":"admin","password":"pw","timeout":0.25}"#)
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b.port, 623);
        assert_eq!(b.driver, Driver::Native);
        assert_eq!(b.timeout, Duration::from_millis(250));
        assert_eq!(b.retries, DEFAULT_RETRIES);
        assert_eq!(b.deadline, DEFAULT_DEADLINE);
        assert!(b.validate().is_ok());
        let unknown = serde_json::from_str::<BmcConfig>(r#"{"address":"a","username":"u","password":"p","pw":1}"#);
        assert!(unknown.is_err());
    }

    #[test]
    fn validation() {
        let ok = BmcConfig::new("bmc1", "admin", "pw".into());
        assert!(ok.validate().is_ok());
        let long_user = BmcConfig { username: "u".repeat(17), ..ok.clone() };
        assert!(long_user.validate().is_err());
        let long_pw = BmcConfig { password: Secret::new("p".repeat(21)), ..ok.clone() };
        let e = long_pw.validate().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("password longer") && !e.contains("ppp"), "{e}");
        assert!(BmcConfig { address: "-oProxy".into(), ..ok.clone() }.validate().is_err());
        assert!(BmcConfig { address: "".into(), ..ok.clone() }.validate().is_err());
        assert!(BmcConfig { timeout: Duration::ZERO, ..ok }.validate().is_err());
    }

    #[test]
    fn resolve_applies_defaults_and_reads_password_files() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap_or_else(|e| panic!("{e}"));
        let toml_text = format!(
            r#"
            [defaults]
            username = "admin"
            password_file = "{}"
            timeout = "300ms"

            [[bmc]]
            node = "n1.example.org"
            address = "10.0.0.1"

            [[bmc]]
            node = "n2.example.org"
            address = "10.0.0.2"
            port = 6230
            username = "root"
            password = "calvin"
            driver = "ipmitool"
            retries = 0
            deadline = 5
            "#,
            pw.display()
        );
        let cfg: IpmiConfig = toml::from_str(&toml_text).unwrap_or_else(|e| panic!("{e}"));
        let inv = cfg.resolve().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(inv.len(), 2);
        let n1 = inv.get("n1.example.org").cloned().unwrap_or_else(|| panic!("n1"));
        assert_eq!((n1.username.as_str(), n1.password.expose(), n1.port), ("admin", "s3cret", 623));
        assert_eq!((n1.driver, n1.timeout, n1.retries), (Driver::Native, Duration::from_millis(300), 2));
        let n2 = inv.get("n2.example.org").cloned().unwrap_or_else(|| panic!("n2"));
        assert_eq!((n2.username.as_str(), n2.password.expose(), n2.port), ("root", "calvin", 6230));
        assert_eq!((n2.driver, n2.retries, n2.deadline), (Driver::Ipmitool, 0, Duration::from_secs(5)));
        assert!(inv.get("n3.example.org").is_none());
    }

    #[test]
    fn resolve_errors() {
        let e = |s: &str| {
            let cfg: IpmiConfig = toml::from_str(s).unwrap_or_else(|e| panic!("{e}"));
            cfg.resolve().err().map(|e| e.to_string()).unwrap_or_default()
        };
        assert!(e("[[bmc]]\nnode='a'\naddress='x'\npassword='p'").contains("no username"));
        assert!(e("[[bmc]]\nnode='a'\naddress='x'\nusername='u'").contains("no password"));
        let dup =
            "[defaults]\nusername='u'\npassword='p'\n[[bmc]]\nnode='a'\naddress='x'\n[[bmc]]\nnode='a'\naddress='y'";
        assert!(e(dup).contains("two BMC entries"));
        let both = "[[bmc]]\nnode='a'\naddress='x'\nusername='u'\npassword='p'\npassword_file='/nonexistent'";
        assert!(e(both).contains("not both"));
        let missing = "[[bmc]]\nnode='a'\naddress='x'\nusername='u'\npassword_file='/nonexistent/pw'";
        assert!(e(missing).contains("/nonexistent/pw"));
        assert!(toml::from_str::<IpmiConfig>("[[bmc]]\nnode='a'\naddress='x'\ntimeout='soon'").is_err());
    }
}
