//! The wire: reply shapes of the legacy contract, the query-string
//! rules every endpoint parses its parameters by, and the errors callers
//! may be told.

use std::collections::HashMap;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use duffy_core::{Arch, EngineError, Node, NodeRequest, validate_hostname, validate_token};
use serde_json::{Value, json};
use tracing::{debug, error};

use super::{AppState, Group, Route};

/// A reply: a status and a body in one of the contract's shapes.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// A JSON value, sent as `application/json` followed by a newline.
    Json(StatusCode, Value),
    /// Plain text, sent as is.
    Text(StatusCode, String),
    /// JSON already serialized (large replies, streamed from the rows
    /// without building a value tree), sent with a trailing newline.
    JsonBytes(StatusCode, Vec<u8>),
}

impl Reply {
    /// A JSON string: how a human-readable error reaches `cico`'s output.
    pub fn message(status: StatusCode, msg: impl Into<String>) -> Reply {
        Reply::Json(status, Value::String(msg.into()))
    }

    /// `{"msg": ...}`, the legacy error object.
    pub fn msg(status: StatusCode, msg: &str) -> Reply {
        Reply::Json(status, json!({ "msg": msg }))
    }

    fn status(&self) -> StatusCode {
        match self {
            Reply::Json(s, _) | Reply::Text(s, _) | Reply::JsonBytes(s, _) => *s,
        }
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let (status, ctype, body) = match self {
            Reply::Json(s, v) => {
                let mut b = serde_json::to_vec(&v).unwrap_or_else(|_| b"null".to_vec());
                b.push(b'\n');
                (s, "application/json", b)
            }
            Reply::Text(s, t) => (s, "text/plain; charset=utf-8", t.into_bytes()),
            Reply::JsonBytes(s, mut b) => {
                b.push(b'\n');
                (s, "application/json", b)
            }
        };
        let mut r = Response::new(Body::from(body));
        *r.status_mut() = status;
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
        r
    }
}

pub(super) const INVALID_KEY: &str = "Invalid duffy key";
/// The answer, with 429, when a client's address is over its budget of
/// failed key lookups (see `auth_guard`): in the shape of the endpoint's
/// invalid-key answer, except on `/Inventory`, where that shape (`[]`)
/// would tell a job it holds nothing, so it is a JSON string.
pub(super) const LOOKUPS_LIMITED: &str = "Too many invalid duffy keys from your address; try again in a minute";
pub(super) const INVALID_SESSION: &str = "Invalid session ID";

/// A query parameter an endpoint knows, with the longest value (decoded,
/// in bytes) it accepts.
#[derive(Debug, Clone, Copy)]
pub(super) struct Param {
    pub(super) name: &'static str,
    pub(super) max: usize,
}

/// The usual limit on a parameter's value.
pub(super) const MAX_VALUE: usize = 256;

pub(super) const fn param(name: &'static str) -> Param {
    Param { name, max: MAX_VALUE }
}

/// The whole raw query string of a legacy endpoint is at most this long:
/// enough for every known parameter and a few cache-busters.
pub(super) const MAX_LEGACY_QUERY: usize = 4096;

impl Route {
    /// The longest raw query accepted: for the legacy endpoints
    /// [`MAX_LEGACY_QUERY`]; for the others, every known parameter at its
    /// longest, fully percent-encoded (3 bytes per byte), whichever is
    /// more.
    fn max_query(&self) -> usize {
        let known: usize = self.params.iter().map(|p| p.name.len() + 2 + 3 * p.max).sum();
        if self.ignores_unknown_parameters() { MAX_LEGACY_QUERY } else { known.max(MAX_LEGACY_QUERY) }
    }

    fn param(&self, name: &str) -> Option<&Param> {
        self.params.iter().find(|p| p.name == name)
    }

    /// A legacy job endpoint (see [`Group::Legacy`]).
    pub(super) const fn legacy(
        path: &'static str,
        params: &'static [Param],
        handler: fn() -> MethodRouter<AppState>,
    ) -> Route {
        Route::new(path, Group::Legacy, params, handler)
    }

    /// A legacy admin endpoint (see [`Group::Admin`]).
    pub(super) const fn admin(path: &'static str, handler: fn() -> MethodRouter<AppState>) -> Route {
        Route::new(path, Group::Admin, KEY_ONLY, handler)
    }
}

pub(super) const KEY_ONLY: &[Param] = &[param("key")];

/// The query string, parsed and checked against the endpoint's [`Route`]:
/// each known parameter at most once and within its length; unknown ones
/// ignored or refused as the endpoint says; no absurd total length.
pub(super) struct Query {
    values: HashMap<String, String>,
    /// Names of the parameters that were ignored (legacy endpoints only).
    ignored: Vec<String>,
}

impl Query {
    pub(super) fn parse(raw: Option<&str>, route: &Route) -> Result<Query, Reply> {
        let mut values = HashMap::new();
        let mut ignored = Vec::new();
        let raw = raw.unwrap_or("");
        let max_query = route.max_query();
        if raw.len() > max_query {
            return Err(Reply::message(
                StatusCode::BAD_REQUEST,
                format!("query string too long (at most {max_query} bytes)"),
            ));
        }
        for (k, v) in form_urlencoded::parse(raw.as_bytes()) {
            if k.is_empty() && v.is_empty() {
                continue;
            }
            let Some(param) = route.param(&k) else {
                let shown: String = k.chars().take(40).collect();
                if route.ignores_unknown_parameters() {
                    ignored.push(shown);
                    continue;
                }
                let allowed = route.params.iter().map(|p| p.name).collect::<Vec<_>>().join(", ");
                return Err(Reply::message(
                    StatusCode::BAD_REQUEST,
                    format!("unknown parameter {shown:?}; allowed parameters: {allowed}"),
                ));
            };
            if v.len() > param.max {
                return Err(Reply::message(
                    StatusCode::BAD_REQUEST,
                    format!("parameter {k} is too long (at most {} bytes)", param.max),
                ));
            }
            if values.insert(k.to_string(), v.to_string()).is_some() {
                return Err(Reply::message(StatusCode::BAD_REQUEST, format!("parameter {k} given more than once")));
            }
        }
        Ok(Query { values, ignored })
    }

    pub(super) fn get(&self, k: &str) -> Option<&str> {
        self.values.get(k).map(String::as_str)
    }

    /// The key, or the legacy 403 object when it is missing or empty.
    pub(super) fn key(&self) -> Result<&str, Reply> {
        match self.get("key") {
            Some(k) if !k.is_empty() => Ok(k),
            _ => Err(Reply::msg(StatusCode::FORBIDDEN, INVALID_KEY)),
        }
    }
}

/// Parses `raw` for `route`, counting and logging the parameters it
/// ignores.
pub(super) fn query(st: &AppState, route: &Route, raw: Option<&str>) -> Result<Query, Reply> {
    let q = Query::parse(raw, route)?;
    if !q.ignored.is_empty() {
        st.metrics.ignored_parameters(route.label(), q.ignored.len());
        debug!(endpoint = route.label(), ignored = ?q.ignored, "ignoring unknown query parameters");
    }
    Ok(q)
}

/// An error no caller can do anything about but retry: the details go to
/// the log, the reply says what failed and never carries a store's own
/// words (SQL, file names, the database's messages).
pub(super) fn unexpected(what: &str, e: &EngineError) -> Reply {
    error!(error = %e, "{what} failed");
    Reply::message(StatusCode::SERVICE_UNAVAILABLE, format!("{what} failed: {}; try again", public_reason(e)))
}

/// What a caller may be told about an unexpected error.
pub(super) fn public_reason(e: &EngineError) -> String {
    match e {
        // The storage's condition (disk full, read-only) is the operator's
        // to fix and safe to name; anything else stays in the log.
        EngineError::Store(duffy_core::StoreError::Unavailable { fault, .. }) => {
            format!("{STORE_UNAVAILABLE}: {fault}")
        }
        EngineError::Store(_) => STORE_UNAVAILABLE.to_string(),
        EngineError::Contention(_) => "too much contention".to_string(),
        // The engine's own refusals are worded for callers; anything else
        // reaching here is an internal matter.
        EngineError::PreparationFailed { .. } => "preparing the nodes failed".to_string(),
        other => other.to_string(),
    }
}

/// What any caller is told when the store fails.
pub(super) const STORE_UNAVAILABLE: &str = "store unavailable";

/// A request for nodes from its parts as a caller wrote them (legacy
/// `ver`, `arch`, `flavor`; `/api/v1`'s `release`, `arch`, `flavor`),
/// each checked by the core's rules; the error says what was wrong.
pub(super) fn node_request(
    release: Option<&str>,
    arch: Option<&str>,
    flavor: Option<&str>,
    count: Option<u32>,
) -> Result<NodeRequest, String> {
    let release =
        release.map(|v| validate_token("ver", v, 64).map(|()| v.to_string())).transpose().map_err(|e| e.to_string())?;
    let arch = arch.map(str::parse::<Arch>).transpose().map_err(|e| format!("invalid arch: {e}"))?;
    let flavor = flavor
        .map(|v| validate_token("flavor", v, 64).map(|()| v.to_string()))
        .transpose()
        .map_err(|e| e.to_string())?;
    Ok(NodeRequest { release, arch, count, flavor })
}

/// Checks a node name from a request by the core's one rule
/// ([`validate_hostname`]), before anything is read.
pub(super) fn check_hostname(node: &str) -> Result<(), Reply> {
    validate_hostname(node).map_err(|e| {
        let shown: String = node.chars().take(60).collect();
        Reply::message(StatusCode::BAD_REQUEST, format!("invalid node name {shown:?}: {}", e.rule))
    })
}

/// One legacy inventory row: `[id, hostname, ip, chassis, used_count,
/// state, comment, distro, rel, ver, arch, pool, console_port, flavor]`,
/// serialized straight from the node.
pub struct InventoryRow<'a>(pub &'a Node);

impl serde::Serialize for InventoryRow<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let n = self.0;
        let in_rotation = u8::from(n.state != duffy_core::NodeState::Reserved);
        let arch = n.image.as_ref().map(|i| i.arch).unwrap_or(n.hardware_arch);
        let mut seq = s.serialize_seq(Some(14))?;
        seq.serialize_element(&n.id.0)?;
        seq.serialize_element(&n.hostname)?;
        seq.serialize_element(&n.ip)?;
        seq.serialize_element(&n.chassis)?;
        seq.serialize_element(&n.used_count)?;
        seq.serialize_element(n.state.as_str())?;
        seq.serialize_element(&n.session.as_ref().map(|s| s.0.as_str()))?;
        seq.serialize_element(&None::<&str>)?; // distro
        seq.serialize_element(&None::<&str>)?; // rel
        seq.serialize_element(&n.image.as_ref().map(|i| i.release.as_str()))?;
        seq.serialize_element(arch.as_str())?;
        seq.serialize_element(&in_rotation)?;
        seq.serialize_element(&n.console_port)?;
        seq.serialize_element(&n.flavor)?;
        seq.end()
    }
}

impl Reply {
    /// The status code (for tests).
    pub fn status_code(&self) -> StatusCode {
        self.status()
    }
}

/// A reply's body as text (for the unit tests' assertions).
#[cfg(test)]
pub(super) fn body(r: Reply) -> String {
    match r {
        Reply::Json(_, v) => v.to_string(),
        Reply::Text(_, t) => t,
        Reply::JsonBytes(_, b) => String::from_utf8_lossy(&b).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The API checks node names by the same rule the core stores them
    /// by: a name no node can have is refused as invalid.
    #[test]
    fn node_names_follow_the_core_rule() {
        for ok in ["n1", "n1.sim.duffy", "a-b.example.org", "1host"] {
            assert!(check_hostname(ok).is_ok(), "{ok}");
            assert!(validate_hostname(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-n1", ".n1", "n1/x", "n 1", "n1_x", &"a".repeat(254)] {
            let r = check_hostname(bad).expect_err(bad);
            assert_eq!(r.status_code(), StatusCode::BAD_REQUEST);
            assert!(validate_hostname(bad).is_err(), "{bad}");
        }
        let Reply::Json(_, v) = check_hostname("-n1").expect_err("refused") else { panic!("a JSON string") };
        assert_eq!(
            v,
            json!(
                "invalid node name \"-n1\": 1 to 253 characters of letters, digits, '.' and '-', not starting with '.' or '-'"
            )
        );
    }
}
