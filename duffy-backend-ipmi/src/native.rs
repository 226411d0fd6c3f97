//! The native driver: IPMI 2.0 RMCP+ sessions over UDP (tokio), cipher
//! suite 3, one session per operation.
//!
//! An operation opens a session (Get Channel Authentication Capabilities,
//! Open Session, RAKP 1 to 4, Set Session Privilege Level ADMINISTRATOR),
//! sends its commands and closes the session. Every request waits
//! [`BmcConfig::timeout`] for its answer and is retransmitted up to
//! [`BmcConfig::retries`] times, with a new session sequence number and the
//! same `rqSeq`; the whole operation is bounded by [`BmcConfig::deadline`].

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use duffy_core::model::PowerState;
use duffy_core::power::{BootDevice, PowerAction, PowerError, PowerErrorKind};
use tokio::net::UdpSocket;
use tokio::time::Instant;
use tracing::{debug, trace, warn};

use crate::config::{BmcConfig, BmcInventory};
use crate::controller::BmcDriver;
use crate::lanplus::codes::{completion_code_text, rmcp_status_text};
use crate::lanplus::commands::{
    CHANNEL_AUTH_CAPABILITIES_REQUEST, CMD_CHASSIS_CONTROL, CMD_CLOSE_SESSION, CMD_GET_CHANNEL_AUTH_CAPABILITIES,
    CMD_GET_CHASSIS_STATUS, CMD_SET_SESSION_PRIVILEGE, CMD_SET_SYSTEM_BOOT_OPTIONS, ChannelAuthCapabilities,
    ChassisControl, NETFN_APP, NETFN_CHASSIS, boot_flags, boot_info_ack, decode_chassis_status, plan,
};
use crate::lanplus::crypto::{Rakp, SessionKeys, codes_match};
use crate::lanplus::messages::{
    NAME_ONLY_LOOKUP, OpenSessionRequest, OpenSessionResponse, PRIV_ADMINISTRATOR, Rakp1, Rakp2, Rakp3, Rakp4,
};
use crate::lanplus::packet::{
    PayloadType, Request, Response, decode_v15, decode_v20, encode_v15, encode_v20_clear, encode_v20_secure,
};
use crate::locks::BmcLocks;

/// RMCP+ status code the console sends in RAKP 3 to abandon a session whose
/// RAKP 2 did not authenticate.
const STATUS_INVALID_INTEGRITY_CHECK: u8 = 0x0F;

/// What went wrong in a native operation, before it is classified into a
/// [`PowerError`] by [`NativeError::classify`]. Never contains a password.
#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    /// The BMC's address did not resolve.
    #[error("cannot resolve the BMC address: {0}")]
    Resolve(String),
    /// The BMC's host said nothing listens on the port (ICMP port unreachable).
    #[error("{step}: connection refused (nothing listens on the BMC's port)")]
    Refused {
        /// The step that was refused.
        step: &'static str,
    },
    /// Sending or receiving failed.
    #[error("{step}: {source}")]
    Io {
        /// The protocol step under way (e.g. "open session").
        step: &'static str,
        /// The socket error.
        source: io::Error,
    },
    /// No valid answer came to a request.
    #[error(
        "{step}: no answer after {attempts} attempt(s) of {timeout:?}{}",
        if *ignored > 0 { format!(" ({ignored} unrelated or invalid packet(s) ignored)") } else { String::new() }
    )]
    NoAnswer {
        /// The protocol step that went unanswered.
        step: &'static str,
        /// How many times it was sent.
        attempts: u32,
        /// The wait after each.
        timeout: Duration,
        /// Whether the BMC had answered anything earlier in the operation.
        answered_before: bool,
        /// Packets received but not accepted as the answer.
        ignored: u32,
    },
    /// The BMC answered an RMCP+ status code other than "no errors".
    #[error("{step}: RMCP+ status 0x{code:02X} ({})", rmcp_status_text(*code))]
    Rmcp {
        /// The message that carried it.
        step: &'static str,
        /// The RMCP+ status code the BMC sent.
        code: u8,
    },
    /// The BMC answered a completion code other than "completed normally".
    #[error("{step}: completion code 0x{code:02X} ({})", completion_code_text(*code))]
    Completion {
        /// The IPMI command the BMC refused.
        step: &'static str,
        /// The completion code the BMC sent (see IPMI v2.0 table 5-2).
        code: u8,
    },
    /// The key exchange did not authenticate.
    #[error("{0}")]
    Auth(String),
    /// The BMC said something this driver cannot work with.
    #[error("{0}")]
    Protocol(String),
}

impl NativeError {
    /// The class of this failure, as [`PowerController`](duffy_core::PowerController) callers see it.
    pub fn kind(&self) -> PowerErrorKind {
        use PowerErrorKind::*;
        match self {
            NativeError::Resolve(_) | NativeError::Refused { .. } | NativeError::Io { .. } => Unreachable,
            NativeError::NoAnswer { answered_before: true, .. } => Timeout,
            NativeError::NoAnswer { answered_before: false, .. } => Unreachable,
            NativeError::Rmcp { code, .. } => match code {
                0x01 | 0x0B => Busy,
                0x09 | 0x0A | 0x0C | 0x0D | 0x0E | 0x0F => AuthFailed,
                _ => BmcError,
            },
            NativeError::Completion { step, code } => match code {
                0xC0 | 0xD1 | 0xD2 => Busy,
                0xD4 => AuthFailed,
                0x80 | 0x81 if *step == STEP_SET_PRIVILEGE => AuthFailed,
                _ => BmcError,
            },
            NativeError::Auth(_) => AuthFailed,
            NativeError::Protocol(_) => BmcError,
        }
    }

    /// The [`PowerError`] for this failure on the BMC `bmc` (`address:port`).
    pub fn classify(&self, bmc: &str) -> PowerError {
        PowerError::new(self.kind(), format!("BMC {bmc}: {self}"))
    }
}

const STEP_CHANNEL_AUTH: &str = "Get Channel Authentication Capabilities";
const STEP_OPEN_SESSION: &str = "Open Session";
const STEP_RAKP1: &str = "RAKP 1";
const STEP_RAKP3: &str = "RAKP 3";
const STEP_SET_PRIVILEGE: &str = "Set Session Privilege Level";

/// A connected UDP socket with the retransmission policy of one BMC.
struct Transport {
    sock: UdpSocket,
    timeout: Duration,
    retries: u32,
    /// Whether anything came back from the BMC yet.
    answered: bool,
    buf: Vec<u8>,
}

impl Transport {
    async fn connect(bmc: &BmcConfig) -> Result<Transport, NativeError> {
        let peer = tokio::net::lookup_host((bmc.address.as_str(), bmc.port))
            .await
            .map_err(|e| NativeError::Resolve(format!("{}: {e}", bmc.address)))?
            .next()
            .ok_or_else(|| NativeError::Resolve(format!("{}: no address", bmc.address)))?;
        let local: SocketAddr =
            if peer.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
        let io_err = |source| NativeError::Io { step: "connect", source };
        let sock = UdpSocket::bind(local).await.map_err(io_err)?;
        sock.connect(peer).await.map_err(io_err)?;
        Ok(Transport { sock, timeout: bmc.timeout, retries: bmc.retries, answered: false, buf: vec![0; 2048] })
    }

    /// Sends `make()` and waits for a datagram that `accept` takes (returns
    /// `Some` for), retransmitting a fresh `make()` after each timeout.
    async fn exchange<T>(
        &mut self,
        step: &'static str,
        mut make: impl FnMut() -> Vec<u8>,
        mut accept: impl FnMut(&[u8]) -> Option<Result<T, NativeError>>,
    ) -> Result<T, NativeError> {
        let attempts = self.retries.saturating_add(1);
        let mut ignored = 0;
        for attempt in 1..=attempts {
            if attempt > 1 {
                debug!(step, attempt, "no answer, retransmitting");
            }
            self.send(step, &make()).await?;
            let until = Instant::now() + self.timeout;
            loop {
                let n = match tokio::time::timeout_at(until, self.sock.recv(&mut self.buf)).await {
                    Err(_elapsed) => break,
                    Ok(Ok(n)) => n,
                    Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        return Err(NativeError::Refused { step });
                    }
                    Ok(Err(source)) => return Err(NativeError::Io { step, source }),
                };
                self.answered = true;
                match accept(&self.buf[..n]) {
                    Some(result) => return result,
                    None => {
                        ignored += 1;
                        trace!(step, len = n, "ignored a packet that does not answer this request");
                    }
                }
            }
        }
        Err(NativeError::NoAnswer { step, attempts, timeout: self.timeout, answered_before: self.answered, ignored })
    }

    async fn send(&self, step: &'static str, packet: &[u8]) -> Result<(), NativeError> {
        match self.sock.send(packet).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Err(NativeError::Refused { step }),
            Err(source) => Err(NativeError::Io { step, source }),
        }
    }
}

fn next_rq_seq(seq: u8) -> u8 {
    (seq + 1) & 0x3f
}

/// An active RMCP+ session with one BMC, at ADMINISTRATOR privilege.
///
/// Dropping it without [`Session::close`] leaves the session open on the BMC
/// until the BMC times it out (about a minute on most BMCs).
pub struct Session {
    transport: Transport,
    keys: SessionKeys,
    console_sid: u32,
    bmc_sid: u32,
    out_seq: u32,
    rq_seq: u8,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("console_sid", &format_args!("{:#010x}", self.console_sid))
            .field("bmc_sid", &format_args!("{:#010x}", self.bmc_sid))
            .field("out_seq", &self.out_seq)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Opens and activates a session with cipher suite 3, then raises it to
    /// ADMINISTRATOR privilege.
    pub async fn open(bmc: &BmcConfig) -> Result<Session, NativeError> {
        let mut t = Transport::connect(bmc).await?;
        let mut rq_seq = rand::random::<u8>() & 0x3f;

        // Get Channel Authentication Capabilities: the first contact, in
        // IPMI v1.5 framing; tells whether the BMC speaks RMCP+ at all.
        let req = Request {
            netfn: NETFN_APP,
            cmd: CMD_GET_CHANNEL_AUTH_CAPABILITIES,
            rq_seq,
            data: CHANNEL_AUTH_CAPABILITIES_REQUEST.to_vec(),
        };
        let packet = encode_v15(&req.encode());
        let resp = t
            .exchange(
                STEP_CHANNEL_AUTH,
                || packet.clone(),
                |d| {
                    let m = match decode_v15(d) {
                        Ok(m) => m.to_vec(),
                        Err(_) => {
                            decode_v20(d, None).ok().filter(|i| i.payload_type == Some(PayloadType::Ipmi))?.payload
                        }
                    };
                    let r = Response::decode(&m).ok()?;
                    req.is_answered_by(&r).then_some(Ok(r))
                },
            )
            .await?;
        rq_seq = next_rq_seq(rq_seq);
        if resp.completion == 0 {
            let caps = ChannelAuthCapabilities::decode(&resp.data).map_err(|e| NativeError::Protocol(e.to_string()))?;
            if !caps.ipmi_v2 {
                return Err(NativeError::Protocol(
                    "the BMC does not offer IPMI v2.0/RMCP+ on this channel; use the ipmitool driver".into(),
                ));
            }
        } else {
            debug!(code = resp.completion, "Get Channel Authentication Capabilities refused; trying RMCP+ anyway");
        }

        // Open Session: propose cipher suite 3.
        let console_sid = loop {
            let v = rand::random::<u32>();
            if v != 0 {
                break v;
            }
        };
        let tag = rand::random::<u8>() & 0x3f;
        let osr = OpenSessionRequest { tag, max_privilege: PRIV_ADMINISTRATOR, console_sid }.encode();
        let packet = encode_v20_clear(PayloadType::OpenSessionRequest, &osr);
        let resp = t
            .exchange(
                STEP_OPEN_SESSION,
                || packet.clone(),
                |d| {
                    let inb = decode_v20(d, None).ok()?;
                    (inb.payload_type == Some(PayloadType::OpenSessionResponse)).then_some(())?;
                    let r = OpenSessionResponse::decode(&inb.payload).ok()?;
                    (r.tag == tag && (r.console_sid == console_sid || r.status != 0)).then_some(Ok(r))
                },
            )
            .await?;
        if resp.status != 0 {
            return Err(NativeError::Rmcp { step: STEP_OPEN_SESSION, code: resp.status });
        }
        if resp.algorithms != Some([1, 1, 1]) {
            return Err(NativeError::Protocol(format!(
                "{STEP_OPEN_SESSION}: the BMC chose algorithms {:?} instead of cipher suite 3",
                resp.algorithms
            )));
        }
        let bmc_sid = resp.bmc_sid;

        // RAKP 1 and 2.
        let console_rand: [u8; 16] = rand::random();
        let role = PRIV_ADMINISTRATOR | NAME_ONLY_LOOKUP;
        let username = bmc.username.as_bytes();
        let rakp1 = Rakp1 { tag, bmc_sid, console_rand, role, username }.encode();
        let packet = encode_v20_clear(PayloadType::Rakp1, &rakp1);
        let r2 = t
            .exchange(
                STEP_RAKP1,
                || packet.clone(),
                |d| {
                    let inb = decode_v20(d, None).ok()?;
                    (inb.payload_type == Some(PayloadType::Rakp2)).then_some(())?;
                    let r = Rakp2::decode(&inb.payload).ok()?;
                    (r.tag == tag && (r.console_sid == console_sid || r.status != 0)).then_some(Ok(r))
                },
            )
            .await?;
        if r2.status != 0 {
            return Err(NativeError::Rmcp { step: "RAKP 2", code: r2.status });
        }
        let rakp =
            Rakp { console_sid, bmc_sid, console_rand, bmc_rand: r2.bmc_rand, bmc_guid: r2.bmc_guid, role, username };
        let kuid = bmc.password.expose().as_bytes();
        if !codes_match(&r2.auth_code, &rakp.rakp2_auth_code(kuid)) {
            // Tell the BMC to drop the half-open session; no answer expected.
            let abort = Rakp3 { tag, status: STATUS_INVALID_INTEGRITY_CHECK, bmc_sid, auth_code: Vec::new() };
            let _ = t.send(STEP_RAKP3, &encode_v20_clear(PayloadType::Rakp3, &abort.encode())).await;
            return Err(NativeError::Auth(format!(
                "RAKP 2: the BMC's key exchange authentication code does not match the password for user {:?} \
                 (wrong password)",
                bmc.username
            )));
        }

        // RAKP 3 and 4.
        let sik = rakp.session_integrity_key(kuid);
        let rakp3 = Rakp3 { tag, status: 0, bmc_sid, auth_code: rakp.rakp3_auth_code(kuid).to_vec() }.encode();
        let packet = encode_v20_clear(PayloadType::Rakp3, &rakp3);
        let r4 = t
            .exchange(
                STEP_RAKP3,
                || packet.clone(),
                |d| {
                    let inb = decode_v20(d, None).ok()?;
                    (inb.payload_type == Some(PayloadType::Rakp4)).then_some(())?;
                    let r = Rakp4::decode(&inb.payload).ok()?;
                    (r.tag == tag && (r.console_sid == console_sid || r.status != 0)).then_some(Ok(r))
                },
            )
            .await?;
        if r4.status != 0 {
            return Err(NativeError::Rmcp { step: "RAKP 4", code: r4.status });
        }
        if !codes_match(&r4.integrity_check, &rakp.rakp4_integrity_check(&sik)) {
            return Err(NativeError::Auth(
                "RAKP 4: the BMC's integrity check value does not match (the BMC uses a BMC key, Kg, \
                 which this driver does not support)"
                    .into(),
            ));
        }

        let mut session =
            Session { transport: t, keys: SessionKeys::from_sik(&sik), console_sid, bmc_sid, out_seq: 0, rq_seq };
        debug!(session = ?session, "session activated");

        // Sessions start at USER privilege whatever was asked; chassis
        // control needs more, and real BMCs answer 0xD4 without this.
        let granted =
            session.command(STEP_SET_PRIVILEGE, NETFN_APP, CMD_SET_SESSION_PRIVILEGE, &[PRIV_ADMINISTRATOR]).await?;
        if granted.first().is_some_and(|p| p & 0x0f != PRIV_ADMINISTRATOR) {
            warn!(granted = ?granted.first(), "BMC granted a privilege level other than ADMINISTRATOR");
        }
        Ok(session)
    }

    /// Sends one IPMI request in the session and returns the response,
    /// whatever its completion code.
    pub async fn request(
        &mut self,
        step: &'static str,
        netfn: u8,
        cmd: u8,
        data: &[u8],
    ) -> Result<Response, NativeError> {
        self.rq_seq = next_rq_seq(self.rq_seq);
        let req = Request { netfn, cmd, rq_seq: self.rq_seq, data: data.to_vec() };
        let msg = req.encode();
        let keys = &self.keys;
        let (bmc_sid, console_sid) = (self.bmc_sid, self.console_sid);
        let out_seq = &mut self.out_seq;
        self.transport
            .exchange(
                step,
                || {
                    // A new session sequence number for every packet, even
                    // a retransmission: the BMC drops repeated numbers.
                    *out_seq = out_seq.wrapping_add(1).max(1);
                    let iv: [u8; 16] = rand::random();
                    encode_v20_secure(keys, bmc_sid, *out_seq, &iv, &msg)
                },
                |d| {
                    let inb = decode_v20(d, Some(keys)).ok()?;
                    let ours = inb.session_id == console_sid && inb.authenticated;
                    (ours && inb.payload_type == Some(PayloadType::Ipmi)).then_some(())?;
                    let r = Response::decode(&inb.payload).ok()?;
                    req.is_answered_by(&r).then_some(Ok(r))
                },
            )
            .await
    }

    /// Sends one IPMI request and returns the response data, or the
    /// completion code as an error.
    pub async fn command(
        &mut self,
        step: &'static str,
        netfn: u8,
        cmd: u8,
        data: &[u8],
    ) -> Result<Vec<u8>, NativeError> {
        let resp = self.request(step, netfn, cmd, data).await?;
        if resp.completion != 0 {
            return Err(NativeError::Completion { step, code: resp.completion });
        }
        Ok(resp.data)
    }

    /// Get Chassis Status: whether the machine is on.
    pub async fn chassis_status(&mut self) -> Result<PowerState, NativeError> {
        let d = self.command("Get Chassis Status", NETFN_CHASSIS, CMD_GET_CHASSIS_STATUS, &[]).await?;
        decode_chassis_status(&d).map_err(|e| NativeError::Protocol(format!("Get Chassis Status: {e}")))
    }

    /// Chassis Control.
    pub async fn chassis_control(&mut self, control: ChassisControl) -> Result<(), NativeError> {
        self.command("Chassis Control", NETFN_CHASSIS, CMD_CHASSIS_CONTROL, &[control.code()]).await.map(|_| ())
    }

    /// Set System Boot Options: boot info acknowledge (parameter 4, errors
    /// ignored: many BMCs do not implement it), then the boot flags
    /// (parameter 5) for the next boot only.
    pub async fn set_boot_device(&mut self, device: BootDevice) -> Result<(), NativeError> {
        let step = "Set System Boot Options (boot info acknowledge)";
        match self.command(step, NETFN_CHASSIS, CMD_SET_SYSTEM_BOOT_OPTIONS, &boot_info_ack()).await {
            Ok(_) => {}
            Err(NativeError::Completion { code, .. }) => debug!(code, "boot info acknowledge refused; ignored"),
            Err(e) => return Err(e),
        }
        let step = "Set System Boot Options (boot flags)";
        self.command(step, NETFN_CHASSIS, CMD_SET_SYSTEM_BOOT_OPTIONS, &boot_flags(device)).await.map(|_| ())
    }

    /// Closes the session (one attempt: a BMC that does not answer times the
    /// session out by itself).
    pub async fn close(mut self) -> Result<(), NativeError> {
        self.transport.retries = 0;
        let sid = self.bmc_sid.to_le_bytes();
        self.command("Close Session", NETFN_APP, CMD_CLOSE_SESSION, &sid).await.map(|_| ())
    }
}

type SessionFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, NativeError>> + Send + 'a>>;

/// Power control through the built-in RMCP+ client. As a
/// [`PowerController`](duffy_core::PowerController) it uses every node's BMC from its inventory with
/// this driver, whatever their [`crate::Driver`] says.
#[derive(Debug, Clone, Default)]
pub struct NativeDriver {
    inventory: Arc<BmcInventory>,
    locks: BmcLocks,
}

impl NativeDriver {
    /// A driver for the nodes of `inventory`, with its own BMC locks.
    pub fn new(inventory: Arc<BmcInventory>) -> Self {
        NativeDriver { inventory, locks: BmcLocks::new() }
    }

    /// Shares `locks` with other drivers, so that they never talk to one
    /// BMC at the same time.
    pub fn with_locks(mut self, locks: BmcLocks) -> Self {
        self.locks = locks;
        self
    }

    /// Runs `work` in a session with `bmc`, holding its lock, within its
    /// deadline.
    async fn run<T, F>(&self, bmc: &BmcConfig, op: &str, work: F) -> Result<T, PowerError>
    where
        T: Send,
        F: for<'a> FnOnce(&'a mut Session) -> SessionFuture<'a, T> + Send,
    {
        let key = bmc.key();
        bmc.validate().map_err(|e| PowerError::new(PowerErrorKind::NotConfigured, e.to_string()))?;
        let _guard = self.locks.acquire(&key, bmc.deadline).await?;
        let started = Instant::now();
        let attempt = async {
            let mut session = Session::open(bmc).await?;
            let result = work(&mut session).await;
            // Close unless the BMC stopped answering: closing would only
            // wait once more for nothing.
            if !matches!(result, Err(NativeError::NoAnswer { .. })) {
                if let Err(e) = session.close().await {
                    debug!(bmc = %key, error = %e, "Close Session failed; the BMC will time the session out");
                }
            }
            result
        };
        let outcome = match tokio::time::timeout(bmc.deadline, attempt).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.classify(&key)),
            Err(_) => Err(PowerError::new(
                PowerErrorKind::Timeout,
                format!("BMC {key}: {op} did not finish within its deadline of {:?}", bmc.deadline),
            )),
        };
        match &outcome {
            Ok(_) => debug!(bmc = %key, op, elapsed = ?started.elapsed(), "native IPMI operation done"),
            Err(e) => {
                warn!(bmc = %key, op, elapsed = ?started.elapsed(), kind = ?e.kind, error = %e.message, "native IPMI operation failed")
            }
        }
        outcome
    }
}

#[async_trait]
impl BmcDriver for NativeDriver {
    async fn status(&self, bmc: &BmcConfig) -> Result<PowerState, PowerError> {
        self.run(bmc, "status", |s| Box::pin(s.chassis_status())).await
    }

    async fn power(&self, bmc: &BmcConfig, action: PowerAction) -> Result<(), PowerError> {
        self.run(bmc, action.as_str(), move |s| {
            Box::pin(async move {
                let current = s.chassis_status().await?;
                match plan(action, current) {
                    None => {
                        debug!(%action, ?current, "nothing to do");
                        Ok(())
                    }
                    Some(control) => s.chassis_control(control).await,
                }
            })
        })
        .await
    }

    async fn set_next_boot(&self, bmc: &BmcConfig, device: BootDevice) -> Result<(), PowerError> {
        self.run(bmc, "set next boot", move |s| Box::pin(s.set_boot_device(device))).await
    }
}

crate::controller::power_controller_by_inventory!(NativeDriver);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        use PowerErrorKind::*;
        let no_answer = |answered_before| NativeError::NoAnswer {
            step: "Open Session",
            attempts: 3,
            timeout: Duration::from_millis(300),
            answered_before,
            ignored: 0,
        };
        assert_eq!(no_answer(false).kind(), Unreachable);
        assert_eq!(no_answer(true).kind(), Timeout);
        assert_eq!(NativeError::Refused { step: "x" }.kind(), Unreachable);
        assert_eq!(NativeError::Rmcp { step: "RAKP 2", code: 0x0D }.kind(), AuthFailed);
        assert_eq!(NativeError::Rmcp { step: "Open Session", code: 0x01 }.kind(), Busy);
        assert_eq!(NativeError::Rmcp { step: "Open Session", code: 0x11 }.kind(), BmcError);
        assert_eq!(NativeError::Completion { step: "Chassis Control", code: 0xFF }.kind(), BmcError);
        assert_eq!(NativeError::Completion { step: "Chassis Control", code: 0xC0 }.kind(), Busy);
        assert_eq!(NativeError::Completion { step: "Chassis Control", code: 0xD4 }.kind(), AuthFailed);
        assert_eq!(NativeError::Completion { step: STEP_SET_PRIVILEGE, code: 0x81 }.kind(), AuthFailed);
        assert_eq!(NativeError::Completion { step: "Chassis Control", code: 0x81 }.kind(), BmcError);
        let e = NativeError::Completion { step: "Chassis Control", code: 0xFF }.classify("10.0.0.1:623");
        assert_eq!(e.message, "BMC 10.0.0.1:623: Chassis Control: completion code 0xFF (unspecified error)");
        let e = NativeError::Rmcp { step: "RAKP 2", code: 0x0D }.classify("b:623");
        assert_eq!(e.message, "BMC b:623: RAKP 2: RMCP+ status 0x0D (unauthorized name)");
        let e = no_answer(true).classify("b:623");
        assert_eq!(e.message, "BMC b:623: Open Session: no answer after 3 attempt(s) of 300ms");
    }

    #[test]
    fn rq_seq_wraps_in_six_bits() {
        assert_eq!(next_rq_seq(0), 1);
        assert_eq!(next_rq_seq(63), 0);
    }
}
