//! The nouns of the farm: nodes, pools, sessions, projects and keys.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::state::NodeState;
use crate::time::Timestamp;

/// A node's identity in the store. Stable for the node's lifetime; the
/// legacy inventory's first column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A session's identity: the `ssid` of the legacy API, a UUID string.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SessionId(pub String);

impl SessionId {
    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An API key's identity (never the key itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KeyId(pub u64);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A machine architecture, of hardware or of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Arch {
    /// 64-bit x86.
    #[serde(rename = "x86_64")]
    X86_64,
    /// 32-bit x86 (images only; installed on x86_64 hardware).
    #[serde(rename = "i386")]
    I386,
    /// 64-bit ARM.
    #[serde(rename = "aarch64")]
    Aarch64,
    /// 64-bit little-endian POWER.
    #[serde(rename = "ppc64le")]
    Ppc64le,
    /// 64-bit big-endian POWER.
    #[serde(rename = "ppc64")]
    Ppc64,
    /// IBM Z.
    #[serde(rename = "s390x")]
    S390x,
}

impl Arch {
    /// Every architecture, in a fixed order (for error messages).
    pub const ALL: [Arch; 6] = [Arch::X86_64, Arch::I386, Arch::Aarch64, Arch::Ppc64le, Arch::Ppc64, Arch::S390x];

    /// The name used on the wire and in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::I386 => "i386",
            Arch::Aarch64 => "aarch64",
            Arch::Ppc64le => "ppc64le",
            Arch::Ppc64 => "ppc64",
            Arch::S390x => "s390x",
        }
    }

    /// Whether hardware of this architecture can run an image of `image`.
    /// 32-bit x86 images run on 64-bit x86 machines, as in the original farm.
    pub fn can_run(self, image: Arch) -> bool {
        self == image || (self == Arch::X86_64 && image == Arch::I386)
    }

    /// The flavor a request gets when it names none: the legacy service gave
    /// `aarch64` and `ppc64le` requests the `tiny` flavor.
    pub fn default_flavor(self) -> Option<&'static str> {
        match self {
            Arch::Aarch64 | Arch::Ppc64le => Some("tiny"),
            _ => None,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error for an architecture name that is not one of [`Arch::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown architecture {0:?}; allowed: x86_64, i386, aarch64, ppc64le, ppc64, s390x")]
pub struct UnknownArch(pub String);

impl FromStr for Arch {
    type Err = UnknownArch;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Arch::ALL.into_iter().find(|a| a.as_str() == s).ok_or_else(|| UnknownArch(s.to_string()))
    }
}

/// What was wrong with a name (release, flavor, hostname, project).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {rule}")]
pub struct InvalidName {
    /// Which kind of name.
    pub what: &'static str,
    /// The value given.
    pub value: String,
    /// What is allowed.
    pub rule: &'static str,
}

/// Checks a host name: 1 to 253 characters of RFC 1123's (ASCII letters,
/// digits, `.` and `-`), not starting with `.` or `-`. The one rule for a
/// node's name, wherever one arrives (configuration, CLI, HTTP).
pub fn validate_hostname(h: &str) -> Result<(), InvalidName> {
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'))
        && !h.starts_with(['.', '-']);
    if ok {
        return Ok(());
    }
    Err(InvalidName {
        what: "hostname",
        value: h.chars().take(80).collect(),
        rule: "1 to 253 characters of letters, digits, '.' and '-', not starting with '.' or '-'",
    })
}

/// Checks a short identifier: 1..=`max` characters of ASCII letters, digits,
/// `.`, `_` and `-`.
pub fn validate_token(what: &'static str, value: &str, max: usize) -> Result<(), InvalidName> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(InvalidName {
            what,
            value: value.chars().take(80).collect(),
            rule: "1 to 64 characters of letters, digits, '.', '_' and '-'",
        })
    }
}

/// One warm pool: the image a node carries, and what a request asks for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PoolKey {
    /// OS release, e.g. `"7"` (the legacy `ver`).
    pub release: String,
    /// Image architecture.
    pub arch: Arch,
    /// Hardware flavor, when the pool is for a particular kind of machine.
    pub flavor: Option<String>,
}

impl PoolKey {
    /// A pool key, with the architecture's default flavor applied when none
    /// is given (see [`Arch::default_flavor`]).
    pub fn new(release: impl Into<String>, arch: Arch, flavor: Option<String>) -> Self {
        let flavor = flavor.or_else(|| arch.default_flavor().map(str::to_string));
        PoolKey { release: release.into(), arch, flavor }
    }

    /// Checks the release and flavor names.
    pub fn validate(&self) -> Result<(), InvalidName> {
        validate_token("release", &self.release, 64)?;
        if let Some(f) = &self.flavor {
            validate_token("flavor", f, 64)?;
        }
        Ok(())
    }
}

impl fmt::Display for PoolKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.release, self.arch)?;
        if let Some(fl) = &self.flavor {
            write!(f, "/{fl}")?;
        }
        Ok(())
    }
}

/// Why a pool name (`release/arch[/flavor]`) could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid pool {value:?}: {reason}; a pool is written release/arch or release/arch/flavor, e.g. 9/x86_64")]
pub struct InvalidPool {
    /// The text given (shortened).
    pub value: String,
    /// What was wrong with it.
    pub reason: String,
}

impl FromStr for PoolKey {
    type Err = InvalidPool;

    /// Reads a pool as [`PoolKey`]'s `Display` writes it:
    /// `release/arch[/flavor]` (the architecture's default flavor applies
    /// when none is given, as in [`PoolKey::new`]); names are validated.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: String| InvalidPool { value: s.chars().take(80).collect(), reason };
        let parts: Vec<&str> = s.split('/').collect();
        let (release, arch, flavor) = match parts.as_slice() {
            [r, a] => (*r, *a, None),
            [r, a, f] => (*r, *a, Some((*f).to_string())),
            _ => return Err(bad(format!("{} parts separated by '/'", parts.len()))),
        };
        let arch: Arch = arch.parse().map_err(|e: UnknownArch| bad(e.to_string()))?;
        let pool = PoolKey::new(release, arch, flavor);
        pool.validate().map_err(|e| bad(e.to_string()))?;
        Ok(pool)
    }
}

/// A kind of machine, as pools are matched against it: the hardware's
/// architecture and flavor. A node of this kind can carry a pool's image
/// when its architecture can run the image's and the flavors are equal.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Hardware {
    /// The hardware's architecture.
    pub arch: Arch,
    /// The hardware's flavor.
    pub flavor: Option<String>,
}

impl Hardware {
    /// The kind of machine `node` is.
    pub fn of(node: &Node) -> Hardware {
        Hardware { arch: node.hardware_arch, flavor: node.flavor.clone() }
    }

    /// Every kind of machine that can carry `pool`'s image (e.g. both
    /// i386 and x86_64 hardware for an i386 pool).
    pub fn able_to_carry(pool: &PoolKey) -> impl Iterator<Item = Hardware> + '_ {
        Arch::ALL
            .into_iter()
            .filter(|a| a.can_run(pool.arch))
            .map(|arch| Hardware { arch, flavor: pool.flavor.clone() })
    }
}

impl fmt::Display for Hardware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.arch)?;
        if let Some(fl) = &self.flavor {
            write!(f, "/{fl}")?;
        }
        Ok(())
    }
}

/// How many Ready nodes a pool should keep on standby.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolTarget {
    /// The pool.
    pub pool: PoolKey,
    /// Ready nodes to keep installed and waiting.
    pub standby: u32,
}

impl PoolTarget {
    /// The original farm's table from the user document: CentOS 7 x86_64 20,
    /// 6 x86_64 6, 6 i386 4, 5 x86_64 4, 5 i386 4.
    pub fn seed_defaults() -> Vec<PoolTarget> {
        [
            ("7", Arch::X86_64, 20),
            ("6", Arch::X86_64, 6),
            ("6", Arch::I386, 4),
            ("5", Arch::X86_64, 4),
            ("5", Arch::I386, 4),
        ]
        .into_iter()
        .map(|(r, a, n)| PoolTarget { pool: PoolKey::new(r, a, None), standby: n })
        .collect()
    }
}

/// What the store believes about a node's power.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum PowerState {
    /// Not known (never asked, or the last operation's outcome is unclear).
    #[default]
    Unknown,
    /// Powered on.
    On,
    /// Powered off.
    Off,
}

impl PowerState {
    /// Stable name for storage and display.
    pub fn as_str(self) -> &'static str {
        match self {
            PowerState::Unknown => "unknown",
            PowerState::On => "on",
            PowerState::Off => "off",
        }
    }
}

impl FromStr for PowerState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "unknown" => Ok(PowerState::Unknown),
            "on" => Ok(PowerState::On),
            "off" => Ok(PowerState::Off),
            other => Err(format!("unknown power state {other:?}")),
        }
    }
}

/// A physical (or virtual) machine in the farm, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Store identity.
    pub id: NodeId,
    /// Fully qualified host name; unique.
    pub hostname: String,
    /// IP address, if known.
    pub ip: Option<String>,
    /// Chassis the machine sits in (informational).
    pub chassis: Option<String>,
    /// The hardware's architecture.
    pub hardware_arch: Arch,
    /// The hardware flavor (e.g. `tiny`), matched against pool flavors.
    pub flavor: Option<String>,
    /// The BMC's address: identity only, used to run one operation at a time
    /// per BMC. Credentials never live in the core.
    pub bmc: Option<String>,
    /// Serial console port, if any (legacy inventory column).
    pub console_port: Option<u16>,
    /// Lifecycle state.
    pub state: NodeState,
    /// The image installed (Ready, Deployed) or being installed (Provisioning).
    pub image: Option<PoolKey>,
    /// How many sessions this machine has been given to.
    pub used_count: u64,
    /// The session holding the node (Contextualizing, Deployed, held Failed).
    pub session: Option<SessionId>,
    /// When the node entered its current state.
    pub state_since: Timestamp,
    /// When the current image finished installing.
    pub installed_at: Option<Timestamp>,
    /// Until when a Failed node is held (after `/Node/fail`, or a failed
    /// install's cool-down). `None` on a Failed node: held until an operator
    /// acts.
    pub hold_until: Option<Timestamp>,
    /// Why the node is Failed.
    pub fail_reason: Option<String>,
    /// Power state as last seen or set.
    pub power: PowerState,
    /// The SSH host key the installed OS reported when its install
    /// finished (`ssh-ed25519 AAAA…`); checked when Duffy connects to the
    /// node. Cleared when a new install starts.
    pub host_key: Option<String>,
    /// Optimistic-concurrency version; bumped by every write.
    pub version: u64,
}

impl Node {
    /// The BMC key used to serialise operations: the BMC address, else the
    /// hostname.
    pub fn bmc_key(&self) -> &str {
        self.bmc.as_deref().unwrap_or(&self.hostname)
    }

    /// Whether this hardware can carry an image of `pool` (see
    /// [`Hardware::able_to_carry`], which must agree).
    pub fn can_host(&self, pool: &PoolKey) -> bool {
        self.hardware_arch.can_run(pool.arch) && self.flavor == pool.flavor
    }
}

/// A node to add to the farm: the one definition of a machine's
/// description, read from configuration files (`[[nodes]]`, with serde) and
/// from the command line (`duffy node add`, with clap under the `clap`
/// feature).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(deny_unknown_fields)]
pub struct NewNode {
    /// Fully qualified host name; unique.
    pub hostname: String,
    /// IP address; required for PXE installs (the install endpoints answer
    /// only the node's own address) and used to reach the node over SSH.
    #[serde(default)]
    #[cfg_attr(feature = "clap", arg(long))]
    pub ip: Option<String>,
    /// Chassis the machine sits in (informational).
    #[serde(default)]
    #[cfg_attr(feature = "clap", arg(long))]
    pub chassis: Option<String>,
    /// Hardware architecture (default x86_64).
    #[serde(rename = "arch", default = "default_hardware_arch")]
    #[cfg_attr(feature = "clap", arg(long = "arch", value_name = "ARCH", default_value = "x86_64"))]
    pub hardware_arch: Arch,
    /// Hardware flavor, matched against pool flavors (e.g. `tiny`).
    #[serde(default)]
    #[cfg_attr(feature = "clap", arg(long))]
    pub flavor: Option<String>,
    /// BMC address (host or host:port): identity for one-operation-per-BMC;
    /// credentials live in the service's `[hardware]` configuration.
    #[serde(default)]
    #[cfg_attr(feature = "clap", arg(long))]
    pub bmc: Option<String>,
    /// Serial console port (legacy inventory column).
    #[serde(default)]
    #[cfg_attr(feature = "clap", arg(long))]
    pub console_port: Option<u16>,
    /// Add it as Reserved (not managed) instead of Active.
    #[serde(default)]
    #[cfg_attr(feature = "clap", arg(long))]
    pub reserved: bool,
}

fn default_hardware_arch() -> Arch {
    Arch::X86_64
}

impl NewNode {
    /// A managed x86_64 node with only a hostname.
    pub fn new(hostname: impl Into<String>, hardware_arch: Arch) -> Self {
        NewNode {
            hostname: hostname.into(),
            ip: None,
            chassis: None,
            hardware_arch,
            flavor: None,
            bmc: None,
            console_port: None,
            reserved: false,
        }
    }

    /// Checks the host name ([`validate_hostname`]) and flavor.
    pub fn validate(&self) -> Result<(), InvalidName> {
        validate_hostname(&self.hostname)?;
        if let Some(f) = &self.flavor {
            validate_token("flavor", f, 64)?;
        }
        Ok(())
    }

    /// The node as first stored, with the given id, at `now`.
    pub fn into_node(self, id: NodeId, now: Timestamp) -> Node {
        Node {
            id,
            hostname: self.hostname,
            ip: self.ip,
            chassis: self.chassis,
            hardware_arch: self.hardware_arch,
            flavor: self.flavor,
            bmc: self.bmc,
            console_port: self.console_port,
            state: if self.reserved { NodeState::Reserved } else { NodeState::Active },
            image: None,
            used_count: 0,
            session: None,
            state_since: now,
            installed_at: None,
            hold_until: None,
            fail_reason: None,
            power: PowerState::Unknown,
            host_key: None,
            version: 1,
        }
    }
}

/// A session's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SessionState {
    /// Nodes claimed, being prepared for the project; not yet given out.
    Allocating,
    /// Nodes handed to the job (legacy name "Prod").
    Prod,
    /// The job called `/Node/fail`; nodes are held for debugging.
    Fail,
    /// Released (by done, or by the fail hold expiring).
    Done,
    /// Allocation failed or was interrupted; nothing was given out.
    Aborted,
}

impl SessionState {
    /// Stable name for storage and display.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Allocating => "Allocating",
            SessionState::Prod => "Prod",
            SessionState::Fail => "Fail",
            SessionState::Done => "Done",
            SessionState::Aborted => "Aborted",
        }
    }

    /// Whether the session still holds nodes.
    pub fn is_live(self) -> bool {
        matches!(self, SessionState::Allocating | SessionState::Prod | SessionState::Fail)
    }
}

impl FromStr for SessionState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [SessionState::Allocating, SessionState::Prod, SessionState::Fail, SessionState::Done, SessionState::Aborted]
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| format!("unknown session state {s:?}"))
    }
}

/// A group of nodes handed to one job, under one API key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// The `ssid`.
    pub id: SessionId,
    /// The project the key belongs to.
    pub project: String,
    /// The key that created the session; only it may see or touch it.
    pub key_id: KeyId,
    /// Lifecycle state.
    pub state: SessionState,
    /// The pool the nodes came from.
    pub pool: PoolKey,
    /// The nodes, in the order they were claimed.
    pub nodes: Vec<NodeId>,
    /// When the request arrived.
    pub created_at: Timestamp,
    /// When the nodes were handed over.
    pub delivered_at: Option<Timestamp>,
    /// When the lease asked for at creation runs out: the policy's
    /// `lease`, or the lifetime the request asked for. Never moved by an
    /// extension (`/Overtime` lists sessions past it: "longer than the
    /// original requested lease").
    pub lease_until: Option<Timestamp>,
    /// When the session expires: its nodes are reclaimed (reinstalled) by
    /// the reconciler from then on, unless it was released or failed
    /// first. Set at delivery to `lease_until`; extensions move it, up to
    /// the policy's `max_lifetime` counted from `created_at`. `None` until
    /// the session is delivered.
    #[serde(default)]
    pub expires_at: Option<Timestamp>,
    /// When a failed session's hold ends and its nodes are reclaimed.
    pub hold_until: Option<Timestamp>,
    /// When it ended (Done or Aborted).
    pub ended_at: Option<Timestamp>,
    /// Why it ended, when it did not end by `/Node/done`.
    pub end_reason: Option<String>,
    /// Optimistic-concurrency version; bumped by every write.
    pub version: u64,
}

impl Session {
    /// The latest instant the session may be extended to: `created_at`
    /// plus the policy's `max_lifetime` (`None`: no maximum).
    pub fn max_until(&self, max_lifetime: Option<std::time::Duration>) -> Option<Timestamp> {
        max_lifetime.map(|d| self.created_at.plus(d))
    }

    /// Whether the session is Prod and its expiry is at or before `now`:
    /// the reconciler reclaims it.
    pub fn is_expired_at(&self, now: Timestamp) -> bool {
        self.state == SessionState::Prod && self.expires_at.is_some_and(|t| t <= now)
    }
}

/// A project: the unit of quotas and SSH keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Project {
    /// Unique name.
    pub name: String,
    /// Most nodes its live sessions may hold at once; `None`: the policy's
    /// default.
    pub quota: Option<u32>,
    /// SSH public keys pushed to root on its nodes at allocation.
    pub ssh_keys: Vec<String>,
}

/// SHA-256 of an API key. Keys are stored only as this hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ApiKeyHash(pub [u8; 32]);

impl fmt::Debug for ApiKeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A hash is not a secret, but keep logs short.
        write!(f, "ApiKeyHash({:02x}{:02x}{:02x}{:02x}…)", self.0[0], self.0[1], self.0[2], self.0[3])
    }
}

/// A stored API key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    /// Identity.
    pub id: KeyId,
    /// Owning project.
    pub project: String,
    /// SHA-256 of the key.
    pub hash: ApiKeyHash,
    /// May call the admin endpoints.
    pub admin: bool,
    /// When it was created.
    pub created_at: Timestamp,
    /// From this time on the key is refused; `None`: it never expires.
    #[serde(default)]
    pub expires_at: Option<Timestamp>,
    /// When an operator revoked it (a revoked key is refused; the row stays
    /// for the history of the sessions it made).
    #[serde(default)]
    pub revoked_at: Option<Timestamp>,
    /// When it last authenticated a request, as last recorded: the engine
    /// keeps uses in memory and records them coarsely (see
    /// `Engine::flush_key_usage`), so this may lag by that interval.
    #[serde(default)]
    pub last_used: Option<Timestamp>,
}

impl ApiKeyRecord {
    /// Whether the key may authenticate a request at `now`: not revoked and
    /// not expired.
    pub fn usable_at(&self, now: Timestamp) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|t| now < t)
    }
}

/// Who caused a change: recorded with every event.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Actor {
    /// The reconciler (installs, reclaims, sweeps).
    Reconciler,
    /// Start-up recovery of work a crash left half-done.
    Recovery,
    /// A request made with an API key.
    Key(KeyId),
    /// An operator at the command line.
    Operator,
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::Reconciler => f.write_str("reconciler"),
            Actor::Recovery => f.write_str("recovery"),
            Actor::Key(k) => write!(f, "key:{k}"),
            Actor::Operator => f.write_str("operator"),
        }
    }
}

impl FromStr for Actor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "reconciler" => Ok(Actor::Reconciler),
            "recovery" => Ok(Actor::Recovery),
            "operator" => Ok(Actor::Operator),
            _ => s
                .strip_prefix("key:")
                .and_then(|k| k.parse().ok())
                .map(|k| Actor::Key(KeyId(k)))
                .ok_or_else(|| format!("unknown actor {s:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_round_trips_and_compat() {
        for a in Arch::ALL {
            assert_eq!(a.as_str().parse::<Arch>(), Ok(a));
        }
        assert!("x86".parse::<Arch>().unwrap_err().to_string().contains("allowed"));
        assert!(Arch::X86_64.can_run(Arch::I386));
        assert!(!Arch::I386.can_run(Arch::X86_64));
        assert!(!Arch::Aarch64.can_run(Arch::X86_64));
    }

    #[test]
    fn pool_key_default_flavor() {
        assert_eq!(PoolKey::new("7", Arch::Aarch64, None).flavor.as_deref(), Some("tiny"));
        assert_eq!(PoolKey::new("7", Arch::X86_64, None).flavor, None);
        assert_eq!(PoolKey::new("8", Arch::Ppc64le, Some("big".into())).to_string(), "8/ppc64le/big");
    }

    #[test]
    fn pool_names_round_trip_and_are_validated() {
        for p in [
            PoolKey::new("7", Arch::X86_64, None),
            PoolKey::new("8", Arch::Aarch64, None),
            PoolKey::new("9", Arch::Ppc64le, Some("big".into())),
        ] {
            assert_eq!(p.to_string().parse::<PoolKey>(), Ok(p));
        }
        assert_eq!("8/aarch64".parse::<PoolKey>().unwrap().flavor.as_deref(), Some("tiny"), "default flavor");
        for bad in ["7", "7/x86_64/a/b", "7/sparc", "/x86_64", "7;rm/x86_64", "7/x86_64/", ""] {
            let e = bad.parse::<PoolKey>().unwrap_err();
            assert!(e.to_string().contains("release/arch"), "{bad}: {e}");
        }
    }

    #[test]
    fn names_are_validated() {
        assert!(NewNode::new("n1.example.org", Arch::X86_64).validate().is_ok());
        assert!(NewNode::new("-bad", Arch::X86_64).validate().is_err());
        assert!(NewNode::new("a b", Arch::X86_64).validate().is_err());
        assert!(PoolKey::new("", Arch::X86_64, None).validate().is_err());
        assert!(PoolKey::new("7;drop", Arch::X86_64, None).validate().is_err());
    }

    #[test]
    fn actor_round_trips() {
        for a in [Actor::Reconciler, Actor::Recovery, Actor::Operator, Actor::Key(KeyId(42))] {
            assert_eq!(a.to_string().parse::<Actor>(), Ok(a));
        }
    }
}
