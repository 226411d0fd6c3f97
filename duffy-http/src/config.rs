//! The `duffy serve` configuration file (TOML). Every field has a default,
//! so an empty file (or none) is the embedded default: a SQLite file, a
//! simulated farm shaped like the original pool table, on 127.0.0.1:8080.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use duffy_core::sim::SimConfig;
use duffy_core::{Arch, NewNode, Policy, PoolKey, PoolTarget};
use serde::Deserialize;

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The configuration file that could not be read.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {source}")]
    Parse {
        /// The configuration file that did not parse.
        path: PathBuf,
        /// What is wrong, with line and column.
        #[source]
        source: toml::de::Error,
    },
    /// A value is out of range or inconsistent.
    #[error("{0}")]
    Invalid(String),
}

/// The configuration file of `duffy serve --config`: every section, each
/// with its defaults (an empty file is a simulated farm on 127.0.0.1:8080).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on (`127.0.0.1:8080`).
    pub listen: SocketAddr,
    /// The SQLite database file (`duffy.db`).
    pub database: PathBuf,
    /// Leases, holds, quotas, rate limits, concurrency (see
    /// `duffy_core::Policy`; durations in seconds).
    pub policy: Policy,
    /// Warm pools and their standby targets (default: the original farm's
    /// table).
    pub pools: Vec<PoolConfig>,
    /// What drives the machines' power.
    pub hardware: HardwareConfig,
    /// What installs them (default: the simulated farm's installs).
    pub installer: InstallerConfig,
    /// How they are prepared for a project at allocation (default: not at
    /// all; `ssh` pushes the project's keys).
    pub contextualize: ContextualizeConfig,
    /// Machines of a real farm (added on start if missing).
    pub nodes: Vec<NewNode>,
    /// Limits on connections and time that keep idle or slow clients from
    /// exhausting the service.
    pub limits: LimitsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            database: PathBuf::from("duffy.db"),
            policy: Policy { max_concurrent_installs: 16, ..Policy::default() },
            pools: Vec::new(),
            hardware: HardwareConfig::default(),
            installer: InstallerConfig::Simulated,
            contextualize: ContextualizeConfig::None,
            nodes: Vec::new(),
            limits: LimitsConfig::default(),
        }
    }
}

/// `[limits]`: how long a client may take and how many connections may be
/// open at once (durations in seconds, or "10s", "2m").
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Time a client has to send a request's complete header: from
    /// connecting for the first request, from its first byte on a kept-alive
    /// connection (10 s). Cuts off slowloris clients and connections that
    /// never send anything.
    #[serde(deserialize_with = "duffy_core::time::serde_duration::deserialize")]
    pub header_read: Duration,
    /// A kept-alive connection with no request in progress, or a response
    /// the client stopped reading, is closed after this long (60 s).
    #[serde(deserialize_with = "duffy_core::time::serde_duration::deserialize")]
    pub idle: Duration,
    /// A request not answered within this time gets a 503 and its handler
    /// is abandoned. Default: `policy.prepare_timeout` + 60 s, because
    /// `/Node/get` legitimately takes as long as preparing the nodes (SSH
    /// contextualization); a value must exceed `prepare_timeout` by 10 s.
    #[serde(deserialize_with = "duffy_core::time::serde_duration::deserialize_option")]
    pub request: Option<Duration>,
    /// Most connections open at once, over every listener; one more is
    /// answered at once with a 503 and closed. Default: the open-file limit
    /// (raised to its hard limit at start-up) less 256 for the database,
    /// installers and BMCs, at most 10,000.
    pub max_connections: Option<usize>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            header_read: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            request: None,
            max_connections: None,
        }
    }
}

impl LimitsConfig {
    /// The margin by which `request` must exceed `policy.prepare_timeout`.
    pub const REQUEST_MARGIN: Duration = Duration::from_secs(10);

    /// The per-request timeout: the configured one, or derived from the
    /// longest legitimate handler, `/Node/get` preparing its nodes.
    pub fn request_timeout(&self, policy: &Policy) -> Duration {
        self.request.unwrap_or(policy.prepare_timeout + Duration::from_secs(60))
    }

    fn validate(&self, policy: &Policy) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(format!("limits: {m}")));
        if self.header_read.is_zero() || self.idle.is_zero() {
            return bad("header_read and idle must be longer than zero".into());
        }
        if let Some(r) = self.request {
            if r < policy.prepare_timeout + Self::REQUEST_MARGIN {
                return bad(format!(
                    "request ({} s) must be at least {} s longer than policy.prepare_timeout ({} s), or /Node/get \
                     would be cut short while it prepares the nodes; omit it to use prepare_timeout + 60 s",
                    r.as_secs_f64(),
                    Self::REQUEST_MARGIN.as_secs(),
                    policy.prepare_timeout.as_secs()
                ));
            }
        }
        if let Some(m) = self.max_connections {
            if m == 0 || m > 1_000_000 {
                return bad(format!("max_connections must be between 1 and 1000000, got {m}"));
            }
        }
        Ok(())
    }
}

/// One warm pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// OS release (`ver` in the API), e.g. "7".
    pub release: String,
    /// Image architecture.
    pub arch: Arch,
    /// Hardware flavor (aarch64 and ppc64le default to "tiny").
    #[serde(default)]
    pub flavor: Option<String>,
    /// Ready nodes to keep.
    pub standby: u32,
    /// How this pool's image is installed, when not by the service's
    /// `[installer]` (e.g. `{ kind = "command", program = "..." }` for one
    /// pool of an otherwise PXE-installed farm).
    #[serde(default)]
    pub installer: Option<InstallerConfig>,
}

/// What powers and installs the machines.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "lowercase")]
pub enum HardwareConfig {
    /// A simulated farm: no hardware, installs take a few seconds.
    Simulated(SimulatedConfig),
    /// Real machines whose BMCs speak IPMI 2.0: `[hardware.defaults]` and
    /// one `[[hardware.bmc]]` per node (`node`, `address`, credentials,
    /// `driver = "native" | "ipmitool"`).
    Ipmi(duffy_backend_ipmi::IpmiConfig),
}

impl Default for HardwareConfig {
    fn default() -> Self {
        HardwareConfig::Simulated(SimulatedConfig::default())
    }
}

/// How machines get a fresh OS.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "lowercase")]
pub enum InstallerConfig {
    /// The simulated farm installs (only with simulated hardware).
    #[default]
    Simulated,
    /// Network install: next boot PXE, power cycle, the machine fetches
    /// its iPXE script and kickstart from this service and calls back
    /// (`public_url`, `provisioning_public_key`, `token_ttl`,
    /// `templates_dir`, kernel/initrd/repo URL patterns).
    Pxe(duffy_installers::PxeConfig),
    /// An operator's command (e.g. an Ansible playbook): node and image as
    /// JSON on stdin and in `DUFFY_*` variables, JSON result on stdout
    /// (`program`, `args`, `timeout`, `env`).
    Command(duffy_installers::CommandConfig),
}

/// How a node is prepared for the project it is given to.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "lowercase")]
pub enum ContextualizeConfig {
    /// Not at all.
    #[default]
    None,
    /// Log in as root with Duffy's provisioning key (checking the host
    /// key the install recorded) and append the project's public keys to
    /// `authorized_keys` between marker lines.
    Ssh(duffy_installers::SshConfig),
}

/// `[hardware] kind = "simulated"`: machines without hardware, whose
/// installs take a random time, for trying Duffy out and for tests.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimulatedConfig {
    /// Machines to create when the database has none (48: the 38 standby
    /// of the original table plus spares).
    pub machines: usize,
    /// Shortest simulated install, in milliseconds (2000).
    pub install_min_ms: u64,
    /// Longest simulated install, in milliseconds (5000).
    pub install_max_ms: u64,
    /// Chance that an install attempt fails (0.0).
    pub install_failure_rate: f64,
    /// Time to prepare a node for a project, in milliseconds (50).
    pub prepare_ms: u64,
    /// Chance that preparing a node fails (0.0).
    pub prepare_failure_rate: f64,
    /// Seed for the simulated latencies and failures.
    pub seed: u64,
}

impl Default for SimulatedConfig {
    fn default() -> Self {
        SimulatedConfig {
            machines: 48,
            install_min_ms: 2000,
            install_max_ms: 5000,
            install_failure_rate: 0.0,
            prepare_ms: 50,
            prepare_failure_rate: 0.0,
            seed: 1,
        }
    }
}

impl SimulatedConfig {
    /// The simulated farm's configuration for these settings.
    pub fn sim(&self) -> SimConfig {
        SimConfig {
            seed: self.seed,
            install_min: Duration::from_millis(self.install_min_ms),
            install_max: Duration::from_millis(self.install_max_ms.max(self.install_min_ms)),
            install_failure_rate: self.install_failure_rate,
            prepare_time: Duration::from_millis(self.prepare_ms),
            prepare_failure_rate: self.prepare_failure_rate,
            power_latency: Duration::from_millis(5),
        }
    }
}

/// A file of nodes for `duffy node import`: `[[nodes]]` tables.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    /// One `[[nodes]]` table per machine.
    pub nodes: Vec<NewNode>,
}

impl Config {
    /// Reads and checks a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let cfg: Config =
            toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.to_path_buf(), source })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that the types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.policy.validate().map_err(|e| ConfigError::Invalid(format!("policy: {e}")))?;
        self.limits.validate(&self.policy)?;
        for p in &self.pools {
            self.pool_key(p).validate().map_err(|e| ConfigError::Invalid(format!("pools: {e}")))?;
        }
        for n in &self.nodes {
            n.validate().map_err(|e| ConfigError::Invalid(format!("nodes: {e}")))?;
        }
        let installers = std::iter::once(("[installer]".to_string(), &self.installer)).chain(
            self.pools.iter().filter_map(|p| p.installer.as_ref().map(|i| (format!("pool {}", self.pool_key(p)), i))),
        );
        let mut pxe = Vec::new();
        for (whose, installer) in installers {
            match (installer, &self.hardware) {
                (InstallerConfig::Simulated, HardwareConfig::Ipmi(_)) => {
                    return Err(ConfigError::Invalid(format!(
                        "{whose}: hardware kind \"ipmi\" needs a real installer: kind = \"pxe\" or \"command\""
                    )));
                }
                (InstallerConfig::Pxe(_), HardwareConfig::Simulated(_)) => {
                    return Err(ConfigError::Invalid(format!(
                        "{whose}: kind = \"pxe\" network-boots real machines: it needs [hardware] kind = \"ipmi\""
                    )));
                }
                (InstallerConfig::Pxe(p), _) => pxe.push(p),
                _ => {}
            }
        }
        if pxe.len() > 1 {
            return Err(ConfigError::Invalid(
                "PXE is configured more than once: one PXE configuration (one set of /Install endpoints) per service"
                    .into(),
            ));
        }
        if let Some(p) = pxe.first() {
            self.validate_pxe(p)?;
        }
        match &self.hardware {
            HardwareConfig::Simulated(s) => {
                for (name, r) in
                    [("install_failure_rate", s.install_failure_rate), ("prepare_failure_rate", s.prepare_failure_rate)]
                {
                    if !(0.0..=1.0).contains(&r) {
                        return Err(ConfigError::Invalid(format!("hardware.{name} must be between 0 and 1, got {r}")));
                    }
                }
            }
            HardwareConfig::Ipmi(ipmi) => {
                let inv = ipmi.resolve().map_err(|e| ConfigError::Invalid(format!("hardware: {e}")))?;
                for n in &self.nodes {
                    if inv.get(&n.hostname).is_none() {
                        return Err(ConfigError::Invalid(format!(
                            "node {} has no [[hardware.bmc]] entry with node = {:?}",
                            n.hostname, n.hostname
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// With PXE installs: every node has an address (the install endpoints
    /// answer only the node's own), the install listener is not the main
    /// one, and a PXE install may finish without a host key only if
    /// contextualization does not need one.
    fn validate_pxe(&self, p: &duffy_installers::PxeConfig) -> Result<(), ConfigError> {
        // Any node may be installed by PXE: the planner gives idle machines
        // to whichever pool needs them.
        for n in &self.nodes {
            duffy_installers::pxe::node_address(n.ip.as_deref()).map_err(|reason| {
                ConfigError::Invalid(format!("node {}: {reason}; set ip = \"…\" in its [[nodes]] entry", n.hostname))
            })?;
        }
        if p.listen == Some(self.listen) {
            return Err(ConfigError::Invalid(format!(
                "[installer] listen = \"{}\" is the main listen address; give the install endpoints their own \
                 address (on the provisioning network), or leave it out to serve them on the main listener",
                self.listen
            )));
        }
        if let ContextualizeConfig::Ssh(ssh) = &self.contextualize {
            if !p.require_host_key && ssh.require_host_key {
                return Err(ConfigError::Invalid(
                    "[installer] require_host_key = false lets a PXE install finish without a host key, but \
                     [contextualize] requires one (require_host_key = true): such a node could never be handed \
                     over. Require the host key in [installer], or set require_host_key = false in both"
                        .into(),
                ));
            }
        }
        Ok(())
    }

    fn pool_key(&self, p: &PoolConfig) -> PoolKey {
        PoolKey::new(p.release.clone(), p.arch, p.flavor.clone())
    }

    /// The BMCs of an IPMI farm, resolved (password files read), or `None`
    /// for a simulated farm.
    pub fn bmc_inventory(&self) -> Result<Option<duffy_backend_ipmi::BmcInventory>, ConfigError> {
        match &self.hardware {
            HardwareConfig::Simulated(_) => Ok(None),
            HardwareConfig::Ipmi(ipmi) => {
                ipmi.resolve().map(Some).map_err(|e| ConfigError::Invalid(format!("hardware: {e}")))
            }
        }
    }

    /// The pool targets: the configured ones, or the original table.
    pub fn targets(&self) -> Vec<PoolTarget> {
        if self.pools.is_empty() {
            return PoolTarget::seed_defaults();
        }
        self.pools.iter().map(|p| PoolTarget { pool: self.pool_key(p), standby: p.standby }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_embedded_default() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.targets().len(), 5);
        assert!(matches!(c.hardware, HardwareConfig::Simulated(ref s) if s.machines == 48));
    }

    #[test]
    fn a_full_file_parses() {
        let c: Config = toml::from_str(
            r#"
            listen = "0.0.0.0:9000"
            database = "/var/lib/duffy/duffy.db"
            [policy]
            lease = 7200
            fail_hold = 3600
            default_quota = 10
            rate_limit = { max = 20, window = 60 }
            [[pools]]
            release = "9"
            arch = "x86_64"
            standby = 3
            [[pools]]
            release = "9"
            arch = "aarch64"
            standby = 1
            [hardware]
            kind = "simulated"
            machines = 10
            install_min_ms = 0
            install_max_ms = 0
            [[nodes]]
            hostname = "n1.example.org"
            bmc = "10.0.0.1"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.policy.lease, Duration::from_secs(7200));
        assert_eq!(c.policy.rate_limit.unwrap().max, 20);
        assert_eq!(c.targets()[1].pool.flavor.as_deref(), Some("tiny"));
    }

    const PXE_FARM: &str = r#"
        [hardware]
        kind = "ipmi"
        [[hardware.bmc]]
        node = "n1.example.org"
        address = "10.1.0.11"
        username = "admin"
        password = "x"
        [installer]
        kind = "pxe"
        public_url = "http://10.0.0.1:8081"
        provisioning_public_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIByrgFoRodMpGoIGtVxnK/CTnXeEUb1KLNez/P0VJgK+ duffy"
        "#;

    fn pxe_config(installer_extra: &str, node_extra: &str, rest: &str) -> Result<(), ConfigError> {
        let text =
            format!("{PXE_FARM}{installer_extra}\n{rest}\n[[nodes]]\nhostname = \"n1.example.org\"\n{node_extra}\n");
        toml::from_str::<Config>(&text).expect("parses").validate()
    }

    #[test]
    fn pxe_farms_are_checked() {
        pxe_config("", "ip = \"10.0.0.11\"", "").expect("a valid PXE farm");
        pxe_config("listen = \"10.0.0.1:8081\"", "ip = \"10.0.0.11\"", "").expect("with its own install listener");
        let c: Config =
            toml::from_str(&format!("{PXE_FARM}listen = \"10.0.0.1:8081\"\nrequire_host_key = false")).unwrap();
        let InstallerConfig::Pxe(p) = &c.installer else { panic!("PXE") };
        assert_eq!(p.listen, Some("10.0.0.1:8081".parse().unwrap()));
        assert!(!p.require_host_key);

        // A node installed by PXE needs an address: the install endpoints
        // answer only the node's own.
        for node in ["", "ip = \"\"", "ip = \"n1\""] {
            let e = pxe_config("", node, "").unwrap_err().to_string();
            assert!(e.contains("n1.example.org") && e.contains("IP address"), "{node}: {e}");
        }
        // The install listener is not the main one.
        let e = pxe_config("listen = \"127.0.0.1:8080\"", "ip = \"10.0.0.11\"", "").unwrap_err().to_string();
        assert!(e.contains("main listen address"), "{e}");
        // No host key from the install, but contextualization needs one.
        let ssh = "[contextualize]\nkind = \"ssh\"\nprivate_key = \"/etc/duffy/key\"";
        let e = pxe_config("require_host_key = false", "ip = \"10.0.0.11\"", ssh).unwrap_err().to_string();
        assert!(e.contains("require_host_key"), "{e}");
        pxe_config("", "ip = \"10.0.0.11\"", ssh).expect("both require the host key");
        pxe_config("require_host_key = false", "ip = \"10.0.0.11\"", &format!("{ssh}\nrequire_host_key = false"))
            .expect("neither requires it");
    }

    #[test]
    fn limits_parse_and_default_from_the_policy() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(c.limits, LimitsConfig::default());
        assert_eq!(c.limits.request_timeout(&c.policy), Duration::from_secs(180), "prepare_timeout + 60 s");
        let c: Config = toml::from_str(
            "[policy]\nprepare_timeout = 600\n[limits]\nheader_read = \"2.5s\"\nidle = 75\nmax_connections = 500",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.limits.header_read, Duration::from_millis(2500));
        assert_eq!(c.limits.idle, Duration::from_secs(75));
        assert_eq!(c.limits.max_connections, Some(500));
        assert_eq!(c.limits.request_timeout(&c.policy), Duration::from_secs(660), "follows prepare_timeout");
        let c: Config = toml::from_str("[limits]\nrequest = \"3m\"").unwrap();
        c.validate().unwrap();
        assert_eq!(c.limits.request_timeout(&c.policy), Duration::from_secs(180));
    }

    #[test]
    fn limits_that_would_break_the_service_are_refused() {
        let err = |text: &str| toml::from_str::<Config>(text).unwrap().validate().unwrap_err().to_string();
        let e = err("[limits]\nrequest = 60");
        assert!(e.contains("prepare_timeout (120 s)") && e.contains("/Node/get"), "{e}");
        assert!(err("[policy]\nprepare_timeout = 30\n[limits]\nrequest = 39").contains("request"));
        toml::from_str::<Config>("[policy]\nprepare_timeout = 30\n[limits]\nrequest = 40").unwrap().validate().unwrap();
        assert!(err("[limits]\nheader_read = 0").contains("header_read"));
        assert!(err("[limits]\nidle = 0").contains("idle"));
        assert!(err("[limits]\nmax_connections = 0").contains("max_connections"));
        assert!(toml::from_str::<Config>("[limits]\nidle_timeout = 5").is_err(), "unknown keys are refused");
    }

    #[test]
    fn mistakes_are_reported() {
        assert!(toml::from_str::<Config>("lisen = \"x\"").is_err(), "unknown keys are refused");
        let c: Config = toml::from_str("[policy]\nmax_concurrent_installs = 0").unwrap();
        assert!(c.validate().is_err());
        let c: Config = toml::from_str("[hardware]\nkind = \"simulated\"\ninstall_failure_rate = 2.0").unwrap();
        assert!(c.validate().is_err());
    }
}
