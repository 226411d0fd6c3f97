//! The endpoints machines being installed by PXE call: `/Install/*`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::StatusCode;
use duffy_installers::pxe::LOCAL_BOOT_SCRIPT;
use duffy_installers::{PxeError, PxeRegistry};
use tracing::{error, warn};

use super::AppState;
use super::wire::*;

/// The longest host key a machine may report: an RSA-16384 key is about
/// 2.8 KB, an RSA-4096 one about 750 bytes (see `keys::MAX_KEY_LINE`).
pub(super) const MAX_HOST_KEY: usize = duffy_installers::keys::MAX_KEY_LINE;
/// The longest failure reason a machine may report (the node's history
/// keeps the first 1000 characters).
pub(super) const MAX_REASON: usize = 4096;

pub(super) const INSTALL_IPXE: Spec =
    Spec { endpoint: "/Install/ipxe", params: &[param("host")], unknown: Unknown::Refuse };
pub(super) const INSTALL_KICKSTART: Spec =
    Spec { endpoint: "/Install/kickstart", params: &[param("token")], unknown: Unknown::Refuse };
pub(super) const INSTALL_DONE: Spec = Spec {
    endpoint: "/Install/done",
    params: &[param("token"), Param { name: "host_key", max: MAX_HOST_KEY }],
    unknown: Unknown::Refuse,
};
pub(super) const INSTALL_FAILED: Spec = Spec {
    endpoint: "/Install/failed",
    params: &[param("token"), Param { name: "reason", max: MAX_REASON }],
    unknown: Unknown::Refuse,
};

pub(super) fn pxe_registry(st: &AppState) -> Result<&Arc<PxeRegistry>, Reply> {
    st.pxe.as_ref().ok_or_else(|| Reply::Text(StatusCode::NOT_FOUND, "no PXE installer is configured\n".into()))
}

/// The reply to a refused install request. Refusals are logged with the
/// caller's address; server errors (templates) are logged in full and
/// answered without details (file names, template text).
pub(super) fn pxe_error(e: &PxeError, peer: IpAddr) -> Reply {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
    if status.is_server_error() {
        error!(error = %e, %peer, "PXE installer");
        return Reply::Text(status, "internal error; see the service's log\n".into());
    }
    warn!(error = %e, %peer, "PXE request refused");
    Reply::Text(status, format!("{e}\n"))
}

/// `/Install/ipxe?host=HOSTNAME`: the boot script of a machine that is
/// being installed, for that machine's own address only (the script
/// carries its one-time install token). Any other request, for a host
/// with no install pending, from another address, or after the install's
/// time ran out, gets the same boot-from-disk script: a stranger learns
/// nothing about which hosts are being installed.
pub(super) async fn install_ipxe(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(raw): RawQuery,
) -> Reply {
    let reg = match pxe_registry(&st) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let q = match query(&st, &INSTALL_IPXE, raw.as_deref()) {
        Ok(q) => q,
        Err(r) => return r,
    };
    let Some(host) = q.get("host").filter(|h| check_hostname(h).is_ok()) else {
        return Reply::Text(StatusCode::BAD_REQUEST, "host=HOSTNAME is required\n".into());
    };
    match reg.ipxe_script(host, peer.ip()) {
        Ok(script) => Reply::Text(StatusCode::OK, script),
        Err(PxeError::NoPendingInstall { .. } | PxeError::Expired { .. }) => {
            Reply::Text(StatusCode::OK, LOCAL_BOOT_SCRIPT.into())
        }
        Err(e) => pxe_error(&e, peer.ip()),
    }
}

pub(super) fn token_query(st: &AppState, spec: &Spec, raw: Option<&str>) -> Result<Query, Reply> {
    let q = query(st, spec, raw)?;
    if q.get("token").is_none_or(str::is_empty) {
        return Err(Reply::Text(StatusCode::BAD_REQUEST, "token=TOKEN is required\n".into()));
    }
    Ok(q)
}

/// `/Install/kickstart?token=T`: the kickstart of a pending install, for
/// the node's own address.
pub(super) async fn install_kickstart(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(raw): RawQuery,
) -> Reply {
    let (reg, q) = match (pxe_registry(&st), token_query(&st, &INSTALL_KICKSTART, raw.as_deref())) {
        (Ok(r), Ok(q)) => (r, q),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    match reg.kickstart(q.get("token").unwrap_or_default(), peer.ip()) {
        Ok(ks) => Reply::Text(StatusCode::OK, ks),
        Err(e) => pxe_error(&e, peer.ip()),
    }
}

/// `/Install/done?token=T&host_key=K`: the installed machine, from its own
/// address, reports success with its SSH host key (once; the token is then
/// spent). A missing (unless not required) or invalid key fails the
/// install.
pub(super) async fn install_done(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(raw): RawQuery,
) -> Reply {
    let (reg, q) = match (pxe_registry(&st), token_query(&st, &INSTALL_DONE, raw.as_deref())) {
        (Ok(r), Ok(q)) => (r, q),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    match reg.complete(q.get("token").unwrap_or_default(), peer.ip(), q.get("host_key")) {
        Ok(()) => Reply::Text(StatusCode::OK, "OK\n".into()),
        Err(e) => pxe_error(&e, peer.ip()),
    }
}

/// `/Install/failed?token=T&reason=R`: the machine, from its own address,
/// reports a failed install; the reason goes into the node's history.
pub(super) async fn install_failed(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(raw): RawQuery,
) -> Reply {
    let (reg, q) = match (pxe_registry(&st), token_query(&st, &INSTALL_FAILED, raw.as_deref())) {
        (Ok(r), Ok(q)) => (r, q),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    match reg.fail(q.get("token").unwrap_or_default(), peer.ip(), q.get("reason").unwrap_or("no reason given")) {
        Ok(()) => Reply::Text(StatusCode::OK, "OK\n".into()),
        Err(e) => pxe_error(&e, peer.ip()),
    }
}
