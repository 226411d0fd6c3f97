//! The endpoints machines being installed by PXE call: `/Install/*`. The
//! routes are declared here only: the PXE registry gets their paths from
//! [`install_endpoints`], and each [`PxeError`] gets its status here.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::StatusCode;
use axum::routing::get;
use duffy_installers::pxe::LOCAL_BOOT_SCRIPT;
use duffy_installers::{InstallEndpoints, PxeError, PxeRegistry};
use tracing::{error, warn};

use super::wire::*;
use super::{AppState, Group, Route};

/// The longest host key a machine may report: an RSA-16384 key is about
/// 2.8 KB, an RSA-4096 one about 750 bytes (see `keys::MAX_KEY_LINE`).
const MAX_HOST_KEY: usize = duffy_installers::keys::MAX_KEY_LINE;
/// The longest failure reason a machine may report (the node's history
/// keeps the first 1000 characters).
const MAX_REASON: usize = 4096;
/// The query parameter that carries the one-time install token.
const TOKEN: &str = "token";

pub(super) static INSTALL_IPXE: Route = Route::install("/Install/ipxe", &[param("host")], || get(install_ipxe));
pub(super) static INSTALL_KICKSTART: Route =
    Route::install("/Install/kickstart", &[param(TOKEN)], || get(install_kickstart));
pub(super) static INSTALL_DONE: Route =
    Route::install("/Install/done", &[param(TOKEN), Param { name: "host_key", max: MAX_HOST_KEY }], || {
        get(install_done)
    });
pub(super) static INSTALL_FAILED: Route =
    Route::install("/Install/failed", &[param(TOKEN), Param { name: "reason", max: MAX_REASON }], || {
        get(install_failed)
    });

impl Route {
    /// An install endpoint (see [`Group::Install`]).
    const fn install(
        path: &'static str,
        params: &'static [Param],
        handler: fn() -> axum::routing::MethodRouter<AppState>,
    ) -> Route {
        Route::new(path, Group::Install, params, handler)
    }
}

/// Where this service serves the endpoints a machine being installed
/// calls back, for [`PxeRegistry::new`]: each path with the start of its
/// query, to which the registry appends the install token.
pub fn install_endpoints() -> InstallEndpoints {
    let with_token = |r: &Route| format!("{}?{TOKEN}=", r.path);
    InstallEndpoints {
        kickstart: with_token(&INSTALL_KICKSTART),
        done: with_token(&INSTALL_DONE),
        failed: with_token(&INSTALL_FAILED),
    }
}

fn pxe_registry(st: &AppState) -> Result<&Arc<PxeRegistry>, Reply> {
    st.pxe.as_ref().ok_or_else(|| Reply::Text(StatusCode::NOT_FOUND, "no PXE installer is configured\n".into()))
}

/// The status of each refusal: 404 for an unknown token or host, 410 for
/// an expired token, 400 for an invalid or missing host key, 500 for
/// Duffy's own problems (templates, configuration), 503 when the store
/// failed (the machine's scripts retry a 5xx).
fn status_of(e: &PxeError) -> StatusCode {
    match e {
        PxeError::UnknownToken | PxeError::NoPendingInstall { .. } => StatusCode::NOT_FOUND,
        PxeError::Expired { .. } => StatusCode::GONE,
        PxeError::InvalidHostKey { .. } | PxeError::MissingHostKey { .. } => StatusCode::BAD_REQUEST,
        PxeError::Template { .. } | PxeError::Io { .. } | PxeError::Config(_) | PxeError::InvalidNode { .. } => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        PxeError::Store { .. } => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The reply to a refused install request. Refusals are logged with the
/// caller's address; server errors (templates) are logged in full and
/// answered without details (file names, template text).
fn pxe_error(e: &PxeError, peer: IpAddr) -> Reply {
    let status = status_of(e);
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
async fn install_ipxe(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(raw): RawQuery,
) -> Result<Reply, Reply> {
    let reg = pxe_registry(&st)?;
    let q = query(&st, &INSTALL_IPXE, raw.as_deref())?;
    let Some(host) = q.get("host").filter(|h| check_hostname(h).is_ok()) else {
        return Err(Reply::Text(StatusCode::BAD_REQUEST, "host=HOSTNAME is required\n".into()));
    };
    match reg.ipxe_script(host, peer.ip()).await {
        Ok(script) => Ok(Reply::Text(StatusCode::OK, script)),
        Err(PxeError::NoPendingInstall { .. } | PxeError::Expired { .. }) => {
            Ok(Reply::Text(StatusCode::OK, LOCAL_BOOT_SCRIPT.into()))
        }
        Err(e) => Err(pxe_error(&e, peer.ip())),
    }
}

/// The registry and the query of a request that must carry a token.
fn token_query<'s>(st: &'s AppState, route: &Route, raw: Option<&str>) -> Result<(&'s PxeRegistry, Query), Reply> {
    let reg = pxe_registry(st)?;
    let q = query(st, route, raw)?;
    if q.get(TOKEN).is_none_or(str::is_empty) {
        return Err(Reply::Text(StatusCode::BAD_REQUEST, "token=TOKEN is required\n".into()));
    }
    Ok((reg, q))
}

/// `/Install/kickstart?token=T`: the kickstart of a pending install, for
/// the node's own address.
async fn install_kickstart(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(raw): RawQuery,
) -> Result<Reply, Reply> {
    let (reg, q) = token_query(&st, &INSTALL_KICKSTART, raw.as_deref())?;
    let ks = reg.kickstart(q.get(TOKEN).unwrap_or_default(), peer.ip()).await.map_err(|e| pxe_error(&e, peer.ip()))?;
    Ok(Reply::Text(StatusCode::OK, ks))
}

/// `/Install/done?token=T&host_key=K`: the installed machine, from its own
/// address, reports success with its SSH host key (once; the token is then
/// spent). A missing (unless not required) or invalid key fails the
/// install.
async fn install_done(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(raw): RawQuery,
) -> Result<Reply, Reply> {
    let (reg, q) = token_query(&st, &INSTALL_DONE, raw.as_deref())?;
    reg.complete(q.get(TOKEN).unwrap_or_default(), peer.ip(), q.get("host_key"))
        .await
        .map_err(|e| pxe_error(&e, peer.ip()))?;
    Ok(Reply::Text(StatusCode::OK, "OK\n".into()))
}

/// `/Install/failed?token=T&reason=R`: the machine, from its own address,
/// reports a failed install; the reason goes into the node's history.
async fn install_failed(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(raw): RawQuery,
) -> Result<Reply, Reply> {
    let (reg, q) = token_query(&st, &INSTALL_FAILED, raw.as_deref())?;
    reg.fail(q.get(TOKEN).unwrap_or_default(), peer.ip(), q.get("reason").unwrap_or("no reason given"))
        .await
        .map_err(|e| pxe_error(&e, peer.ip()))?;
    Ok(Reply::Text(StatusCode::OK, "OK\n".into()))
}

#[cfg(test)]
mod tests {
    use super::super::legacy::NODE_GET;
    use super::*;

    #[test]
    fn template_errors_are_not_shown_to_machines() {
        let e = PxeError::Io {
            path: "/etc/duffy/templates/ks.tmpl".into(),
            source: std::io::Error::other("permission denied"),
        };
        let r = pxe_error(&e, IpAddr::from([10, 0, 0, 11]));
        assert_eq!(r.status_code(), StatusCode::INTERNAL_SERVER_ERROR);
        let b = body(r);
        assert!(!b.contains("/etc/duffy") && !b.contains("permission"), "{b}");
    }

    /// What a machine's first-boot script reads: 2xx and 4xx end its
    /// retries, anything else (5xx) makes it try again.
    #[test]
    fn each_refusal_has_its_status() {
        let host = || "n1.example.org".to_string();
        let key_error = duffy_installers::PublicKey::parse_host_key("ssh-ed25519 AAAA").expect_err("too short");
        for (e, status) in [
            (PxeError::UnknownToken, StatusCode::NOT_FOUND),
            (PxeError::NoPendingInstall { hostname: host() }, StatusCode::NOT_FOUND),
            (PxeError::Expired { hostname: host() }, StatusCode::GONE),
            (PxeError::MissingHostKey { hostname: host() }, StatusCode::BAD_REQUEST),
            (PxeError::InvalidHostKey { hostname: host(), source: key_error }, StatusCode::BAD_REQUEST),
            (PxeError::Config("x".into()), StatusCode::INTERNAL_SERVER_ERROR),
            (PxeError::InvalidNode { hostname: host(), reason: "x".into() }, StatusCode::INTERNAL_SERVER_ERROR),
            (
                PxeError::Store { what: "x".into(), source: duffy_core::StoreError::Closed },
                StatusCode::SERVICE_UNAVAILABLE,
            ),
        ] {
            assert_eq!(pxe_error(&e, IpAddr::from([10, 0, 0, 11])).status_code(), status, "{e}");
        }
    }

    /// The registry renders the routes this module serves.
    #[test]
    fn the_registry_gets_the_routes_served_here() {
        let e = install_endpoints();
        assert_eq!(
            [e.kickstart.as_str(), e.done.as_str(), e.failed.as_str()],
            ["/Install/kickstart?token=", "/Install/done?token=", "/Install/failed?token="]
        );
    }

    #[test]
    fn parameter_limits_are_per_parameter() {
        let key = "A".repeat(MAX_HOST_KEY);
        let token = "0".repeat(64);
        let raw = format!("token={token}&host_key={}", "%2B".repeat(MAX_HOST_KEY));
        let q = Query::parse(Some(&raw), &INSTALL_DONE).unwrap_or_else(|r| panic!("{}", body(r)));
        assert_eq!(q.get("host_key").map(str::len), Some(MAX_HOST_KEY));
        let too_long = format!("token={token}&host_key={key}A");
        let r = Query::parse(Some(&too_long), &INSTALL_DONE).err().expect("refused");
        assert!(body(r).contains("host_key is too long (at most 8192 bytes)"));
        // The others as before: 256.
        let r = Query::parse(Some(&format!("token={}", "0".repeat(257))), &INSTALL_DONE).err().expect("refused");
        assert!(body(r).contains("token is too long (at most 256 bytes)"));
        let r = Query::parse(Some(&format!("key={}", "k".repeat(257))), &NODE_GET).err().expect("refused");
        assert!(body(r).contains("key is too long (at most 256 bytes)"));
        let reason = format!("token={token}&reason={}", "r".repeat(MAX_REASON));
        assert!(Query::parse(Some(&reason), &INSTALL_FAILED).is_ok());
        assert!(Query::parse(Some(&format!("{reason}r")), &INSTALL_FAILED).is_err());
        // Legacy endpoints keep their overall cap.
        let r = Query::parse(Some(&format!("key=k&_={}", "x".repeat(MAX_LEGACY_QUERY))), &NODE_GET).err();
        assert!(body(r.expect("refused")).contains("at most 4096 bytes"));
    }
}
