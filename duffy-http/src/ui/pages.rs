//! The dashboard's pages: what each reads from the store (every read
//! bounded, whatever the size of the farm) and how it is rendered.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use duffy_core::{CauseKind, Event, Node, NodeCount, NodeId, NodeState, PoolKey, Session, SessionState, Timestamp};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::Ctx;
use super::chart::{self, Series};

/// Most machines drawn as cells on one page of the farm map; past it the
/// map pages (the counts above it always cover the whole farm).
pub const MAP_CELLS: usize = 2_000;
/// Most node rows one page of the map reads while filtering (in chunks of
/// `SCAN_CHUNK`); a filter matching few machines in a large farm pages
/// rather than reads the farm.
pub const MAP_SCAN: usize = 20_000;
const SCAN_CHUNK: usize = 1_000;
/// Sessions on one page of the sessions list (each reads its nodes).
pub const SESSIONS_PAGE: usize = 100;
/// The newest events of a node its page shows.
pub const NODE_EVENTS: usize = 200;
/// The newest events the charts and the pools' time estimate read.
pub const CHART_EVENTS: usize = 20_000;
/// Minutes the charts cover.
pub const CHART_MINUTES: usize = 60;
/// Most nodes whose current image the Ready chart looks up, for events
/// older than the node's last install in the window.
const CHART_NODE_LOOKUPS: usize = 500;

/// Every state, in the order the map's legend lists them.
pub const STATES: [NodeState; 7] = [
    NodeState::Ready,
    NodeState::Deployed,
    NodeState::Contextualizing,
    NodeState::Provisioning,
    NodeState::Active,
    NodeState::Failed,
    NodeState::Reserved,
];

/// The letter a cell shows (colour is never the only signal).
pub fn letter(s: NodeState) -> &'static str {
    match s {
        NodeState::Active => "A",
        NodeState::Provisioning => "P",
        NodeState::Ready => "R",
        NodeState::Contextualizing => "C",
        NodeState::Deployed => "D",
        NodeState::Failed => "F",
        NodeState::Reserved => "X",
    }
}

fn class(s: NodeState) -> String {
    format!("s-{}", s.as_str().to_ascii_lowercase())
}

/// The map's group of a machine: its image, or the kind of machine for
/// one that carries none.
pub fn pool_label(image: Option<&PoolKey>, arch: duffy_core::Arch, flavor: Option<&str>) -> String {
    match image {
        Some(p) => p.to_string(),
        None => match flavor {
            Some(f) => format!("unassigned {arch}/{f}"),
            None => format!("unassigned {arch}"),
        },
    }
}

fn node_label(n: &Node) -> String {
    pool_label(n.image.as_ref(), n.hardware_arch, n.flavor.as_deref())
}

fn count_label(c: &NodeCount) -> String {
    pool_label(c.group.image.as_ref(), c.group.hardware.arch, c.group.hardware.flavor.as_deref())
}

/// "3h 12m", "4m 5s", "12s".
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// The page around `body`: navigation, the admin box, and `#live`, the
/// part the event stream refreshes.
pub fn layout(ctx: &Ctx, title: &str, current: &str, before_live: Markup, live: Markup) -> Markup {
    page(ctx, title, current, before_live, live, true)
}

/// [`layout`], with or without the live script: a page answering a POST
/// (a refusal) must not refresh itself, since that would GET its URL.
fn page(ctx: &Ctx, title: &str, current: &str, before_live: Markup, live: Markup, refresh: bool) -> Markup {
    let nav = [("/ui", "Farm map"), ("/ui/pools", "Pools"), ("/ui/sessions", "Sessions"), ("/ui/charts", "Charts")];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " — Duffy" }
                // No favicon request (it would be a 404 on every page).
                link rel="icon" href="data:,";
                link rel="stylesheet" href="/ui/style.css";
                @if refresh { script src="/ui/app.js" defer {} }
            }
            body data-seq=(ctx.seq) data-paused=(ctx.paused) {
                a.skip href="#live" { "Skip to content" }
                header {
                    span.brand { "Duffy" }
                    nav aria-label="Dashboard" {
                        @for (href, name) in nav {
                            @if href == current { a href=(href) aria-current="page" { (name) } } @else { a href=(href) { (name) } }
                        }
                    }
                    div.admin {
                        @match &ctx.admin {
                            Some(p) => {
                                span #admin-status { "Admin (" (if p.project.is_empty() { "operator" } else { p.project.as_str() }) ")" }
                                form method="post" action="/ui/logout" {
                                    input type="hidden" name="csrf" value=(ctx.csrf);
                                    button type="submit" { "Log out" }
                                }
                            }
                            None => {
                                form #login method="post" action="/ui/login" {
                                    input type="hidden" name="csrf" value=(ctx.csrf);
                                    input type="hidden" name="back" value=(ctx.path);
                                    label for="admin-key" { "Admin key" }
                                    input #admin-key type="password" name="key" autocomplete="off" required;
                                    button type="submit" { "Enter" }
                                }
                            }
                        }
                    }
                }
                (before_live)
                main #live tabindex="-1" {
                    (status_bar(ctx))
                    (live)
                }
            }
        }
    }
}

fn status_bar(ctx: &Ctx) -> Markup {
    html! {
        div.status role="status" {
            @if ctx.paused {
                strong #paused-flag.paused { "Paused: no new allocations" }
            } @else {
                span #paused-flag { "Serving allocations" }
            }
            @if ctx.admin.is_some() {
                (action_form(ctx, if ctx.paused { "resume" } else { "pause" }, None,
                    if ctx.paused { "Resume service" } else { "Pause service" }))
            }
        }
    }
}

/// A POST form for one admin action, with its CSRF token.
pub fn action_form(ctx: &Ctx, action: &str, host: Option<&str>, label: &str) -> Markup {
    html! {
        form.action method="post" action="/ui/action" {
            input type="hidden" name="csrf" value=(ctx.csrf);
            input type="hidden" name="action" value=(action);
            input type="hidden" name="back" value=(ctx.path);
            @if let Some(h) = host { input type="hidden" name="host" value=(h); }
            button type="submit" id={"do-" (action)} { (label) }
        }
    }
}

/// A page that only says something (an error, a refusal).
pub fn message(ctx: &Ctx, title: &str, text: &str) -> Markup {
    let body = html! { h1 { (title) } p #message { (text) } p { a href="/ui" { "Back to the farm map" } } };
    page(ctx, title, "", html! {}, body, false)
}

// ----- farm map -----

/// The farm map's filters (the query string).
#[derive(Debug, Default)]
pub struct MapFilter {
    /// Only this state.
    pub state: Option<NodeState>,
    /// Only this group ([`pool_label`]).
    pub pool: Option<String>,
    /// Only hostnames containing this.
    pub host: Option<String>,
    /// Continue after this node id (the next page).
    pub after: NodeId,
}

impl MapFilter {
    fn matches(&self, n: &Node) -> bool {
        self.state.is_none_or(|s| n.state == s)
            && self.pool.as_ref().is_none_or(|p| node_label(n) == *p)
            && self.host.as_ref().is_none_or(|h| n.hostname.contains(h.as_str()))
    }

    fn query(&self, after: NodeId) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        if let Some(s) = self.state {
            q.append_pair("state", s.as_str());
        }
        if let Some(p) = &self.pool {
            q.append_pair("pool", p);
        }
        if let Some(h) = &self.host {
            q.append_pair("host", h);
        }
        q.append_pair("after", &after.0.to_string());
        q.finish()
    }
}

/// What the map shows: the counts of the whole farm and one page of cells.
pub struct MapData {
    counts: Vec<NodeCount>,
    cells: Vec<Node>,
    /// Where the next page starts, when there is more to read.
    next: Option<NodeId>,
}

/// Reads the map: the grouped counts (a few rows, whatever the farm's
/// size) and at most [`MAP_CELLS`] machines, reading at most
/// [`MAP_SCAN`] rows.
pub async fn read_map(store: &dyn duffy_core::Store, f: &MapFilter) -> Result<MapData, duffy_core::StoreError> {
    let counts = store.node_counts().await?;
    let matching: u64 = counts
        .iter()
        .filter(|c| f.state.is_none_or(|s| c.group.state == s) && f.pool.as_ref().is_none_or(|p| count_label(c) == *p))
        .map(|c| u64::from(c.count))
        .sum();
    let mut cells = Vec::new();
    let mut next = None;
    if let Some(state) = f.state.filter(|_| matching <= MAP_CELLS as u64) {
        // Few machines in that state: the state index reads just them.
        cells = store.nodes_in_states(&[state]).await?;
        cells.retain(|n| n.id > f.after && f.matches(n));
    } else {
        let mut cursor = f.after;
        let mut scanned = 0;
        loop {
            let chunk = store.nodes_after(cursor, SCAN_CHUNK).await?;
            let Some(last) = chunk.last() else { break };
            scanned += chunk.len();
            for n in &chunk {
                if f.matches(n) {
                    cells.push(n.clone());
                    if cells.len() == MAP_CELLS {
                        next = Some(n.id);
                        break;
                    }
                }
            }
            if next.is_some() {
                break;
            }
            cursor = last.id;
            if chunk.len() < SCAN_CHUNK {
                break;
            }
            if scanned >= MAP_SCAN {
                next = Some(cursor);
                break;
            }
        }
    }
    Ok(MapData { counts, cells, next })
}

/// The farm map's filter form (outside `#live`, so a live update never
/// takes the focus or a half-typed filter away).
pub fn map_filters(f: &MapFilter, pools: &[String]) -> Markup {
    html! {
        form.filters method="get" action="/ui" aria-label="Filter the map" {
            label for="f-state" { "State" }
            select #f-state name="state" {
                option value="" { "any" }
                @for s in STATES { option value=(s.as_str()) selected[f.state == Some(s)] { (s.as_str()) } }
            }
            label for="f-pool" { "Pool" }
            select #f-pool name="pool" {
                option value="" { "any" }
                @for p in pools { option value=(p) selected[f.pool.as_deref() == Some(p.as_str())] { (p) } }
            }
            label for="f-host" { "Hostname" }
            input #f-host type="search" name="host" value=(f.host.as_deref().unwrap_or(""));
            button type="submit" { "Filter" }
        }
    }
}

/// The pool groups the map knows, for the filter.
pub fn map_pools(d: &MapData) -> Vec<String> {
    let set: std::collections::BTreeSet<String> = d.counts.iter().map(count_label).collect();
    set.into_iter().collect()
}

/// The farm map's live part.
pub fn map(f: &MapFilter, d: &MapData) -> Markup {
    let mut per_state: BTreeMap<NodeState, u64> = BTreeMap::new();
    let mut per_pool: BTreeMap<String, BTreeMap<NodeState, u64>> = BTreeMap::new();
    for c in &d.counts {
        *per_state.entry(c.group.state).or_default() += u64::from(c.count);
        *per_pool.entry(count_label(c)).or_default().entry(c.group.state).or_default() += u64::from(c.count);
    }
    let total: u64 = per_state.values().sum();
    // Cells grouped by pool, then chassis, in id order within a group.
    let mut groups: BTreeMap<(String, String), Vec<&Node>> = BTreeMap::new();
    for n in &d.cells {
        groups.entry((node_label(n), n.chassis.clone().unwrap_or_else(|| "no chassis".into()))).or_default().push(n);
    }
    html! {
        h1 { "Farm map" }
        p #farm-total { (total) " machines" }
        ul.legend aria-label="States" {
            @for s in STATES {
                li { span class={"cell " (class(s))} aria-hidden="true" { (letter(s)) } " " (s.as_str()) ": "
                     span id={"count-" (s.as_str())} { (per_state.get(&s).copied().unwrap_or(0)) } }
            }
        }
        table.counts {
            caption { "Machines per pool and state (the whole farm)" }
            thead { tr { th scope="col" { "Pool" } @for s in STATES { th scope="col" { abbr title=(s.as_str()) { (letter(s)) } } } th scope="col" { "All" } } }
            tbody {
                @for (pool, states) in &per_pool {
                    tr {
                        th scope="row" { a href={"/ui?" (MapFilter { pool: Some(pool.clone()), ..MapFilter::default() }.query(NodeId(0)))} { (pool) } }
                        @for s in STATES { td { (states.get(&s).copied().unwrap_or(0)) } }
                        td { (states.values().sum::<u64>()) }
                    }
                }
            }
        }
        section #map aria-label="Machines" {
            @if d.cells.is_empty() { p { "No machine matches." } }
            @for ((pool, chassis), nodes) in &groups {
                div.group {
                    h2 { (pool) " · " (chassis) " " span.muted { "(" (nodes.len()) ")" } }
                    div.cells {
                        @for n in nodes {
                            a class={"cell " (class(n.state))} href={"/ui/node/" (n.hostname)}
                                title={(n.hostname) " — " (n.state.as_str()) ", used " (n.used_count) " times"}
                                aria-label={(n.hostname) ", " (n.state.as_str()) ", used " (n.used_count) " times"}
                                data-state=(n.state.as_str()) { (letter(n.state)) }
                        }
                    }
                }
            }
            @if let Some(next) = d.next {
                p { "Showing " (d.cells.len()) " machines of this page. " a #next-page href={"/ui?" (f.query(next))} { "Next page" } }
            }
        }
    }
}

// ----- pools -----

/// One pool's row.
pub struct PoolRow {
    pool: PoolKey,
    target: u32,
    ready: u32,
    installing: u32,
    failed: u32,
    cooling: u32,
    eta: Option<Duration>,
}

/// Median install duration among the newest events: from each
/// `InstallSucceeded` back to its node's `InstallStarted`.
pub fn median_install(events_newest_first: &[Event]) -> Option<Duration> {
    let mut succeeded_at: HashMap<NodeId, Timestamp> = HashMap::new();
    let mut durations = Vec::new();
    for e in events_newest_first {
        match e.cause {
            CauseKind::InstallSucceeded => {
                succeeded_at.insert(e.node, e.at);
            }
            CauseKind::InstallStarted | CauseKind::InstallRestarted => {
                if let Some(done) = succeeded_at.remove(&e.node) {
                    durations.push(done.since(e.at));
                }
            }
            _ => {}
        }
    }
    durations.sort();
    durations.get(durations.len() / 2).copied()
}

/// How long a node's latest finished install took, from its events
/// (newest first): its newest `InstallSucceeded` back to the start before
/// it.
pub fn last_install(events_newest_first: &[Event]) -> Option<Duration> {
    let done = events_newest_first.iter().position(|e| e.cause == CauseKind::InstallSucceeded)?;
    let started = events_newest_first[done..]
        .iter()
        .find(|e| matches!(e.cause, CauseKind::InstallStarted | CauseKind::InstallRestarted))?;
    Some(events_newest_first[done].at.since(started.at))
}

/// Reads the pools: targets, Ready counts (indexed), installs in flight
/// and Failed machines (the states' index), and the newest events for the
/// time estimate.
pub async fn read_pools(store: &dyn duffy_core::Store, now: Timestamp) -> Result<Vec<PoolRow>, duffy_core::StoreError> {
    let targets = store.pool_targets().await?;
    let ready: HashMap<PoolKey, u32> = store.ready_counts().await?.into_iter().collect();
    let busy = store.nodes_in_states(&[NodeState::Provisioning, NodeState::Failed]).await?;
    let events = store.latest_events(None, CHART_EVENTS).await?;
    let install = median_install(&events);
    let mut rows = Vec::new();
    for t in targets {
        let of_pool = |n: &&Node| n.image.as_ref() == Some(&t.pool);
        let installing = busy.iter().filter(of_pool).filter(|n| n.state == NodeState::Provisioning).count() as u32;
        let failed: Vec<&Node> = busy.iter().filter(of_pool).filter(|n| n.state == NodeState::Failed).collect();
        let cooling =
            failed.iter().filter(|n| n.session.is_none() && n.hold_until.is_some_and(|h| h > now)).count() as u32;
        let ready = ready.get(&t.pool).copied().unwrap_or(0);
        let deficit = t.standby.saturating_sub(ready);
        let eta = match (deficit, installing, install) {
            (0, _, _) => Some(Duration::ZERO),
            (d, i, Some(one)) if i > 0 => Some(one * d.div_ceil(i)),
            _ => None,
        };
        rows.push(PoolRow {
            pool: t.pool,
            target: t.standby,
            ready,
            installing,
            failed: failed.len() as u32,
            cooling,
            eta,
        });
    }
    Ok(rows)
}

/// The pools' live part.
pub fn pools(rows: &[PoolRow]) -> Markup {
    html! {
        h1 { "Pools" }
        table #pools {
            caption { "Ready machines against each pool's standby target" }
            thead { tr {
                th scope="col" { "Pool" } th scope="col" { "Ready / target" } th scope="col" { "Installing" }
                th scope="col" { "Failed" } th scope="col" { "Cooling down" } th scope="col" { "Full in" }
            } }
            tbody {
                @for r in rows {
                    tr class=(if r.ready < r.target { "short" } else { "" }) {
                        th scope="row" { a href={"/ui?pool=" (r.pool)} { (r.pool) } }
                        td {
                            meter min="0" max=(r.target.max(1)) value=(r.ready.min(r.target.max(1))) aria-hidden="true" {}
                            " " (r.ready) " / " (r.target)
                            @if r.ready < r.target { " " strong { "short " (r.target - r.ready) } }
                        }
                        td { (r.installing) }
                        td { (r.failed) }
                        td { (r.cooling) }
                        td { @match r.eta {
                            Some(d) if d.is_zero() => "full",
                            Some(d) => { "≈ " (human(d)) },
                            None => "not filling",
                        } }
                    }
                }
            }
        }
        p.muted { "“Full in” assumes the installs in flight finish in the median time of recent installs, then the next wave starts." }
    }
}

// ----- sessions -----

/// One page of live sessions with their hosts.
pub struct SessionsData {
    total: usize,
    page: usize,
    rows: Vec<(Session, Vec<String>)>,
}

/// Reads the live sessions, and the hostnames of one page of them.
pub async fn read_sessions(store: &dyn duffy_core::Store, page: usize) -> Result<SessionsData, duffy_core::StoreError> {
    let live = store.live_sessions().await?;
    let total = live.len();
    let mut rows = Vec::new();
    for s in live.into_iter().skip(page * SESSIONS_PAGE).take(SESSIONS_PAGE) {
        let mut hosts = Vec::with_capacity(s.nodes.len());
        for id in &s.nodes {
            if let Some(n) = store.node(*id).await? {
                hosts.push(n.hostname);
            }
        }
        rows.push((s, hosts));
    }
    Ok(SessionsData { total, page, rows })
}

/// The sessions' live part; overtime and Fail holds highlighted. "Lease
/// left" counts to the lease the session was created with (past it, the
/// session is overtime, as `/Overtime` lists it); "Expires in" counts to
/// when its nodes are reclaimed, which extensions move.
pub fn sessions(d: &SessionsData, now: Timestamp) -> Markup {
    html! {
        h1 { "Sessions" }
        p { (d.total) " live sessions" }
        table #sessions {
            caption { "Live sessions, oldest first" }
            thead { tr {
                th scope="col" { "Session" } th scope="col" { "Project" } th scope="col" { "State" } th scope="col" { "Pool" }
                th scope="col" { "Age" } th scope="col" { "Lease left" } th scope="col" { "Expires in" }
                th scope="col" { "Hosts" }
            } }
            tbody {
                @for (s, hosts) in &d.rows {
                    @let overtime = s.state == SessionState::Prod && s.lease_until.is_some_and(|l| l < now);
                    @let held = s.state == SessionState::Fail;
                    tr class=(if overtime { "overtime" } else if held { "held" } else { "" }) {
                        td { code { (s.id.0.get(..8).unwrap_or(&s.id.0)) } }
                        td { (s.project) }
                        td { (s.state.as_str()) @if held { " " strong { "held" } } }
                        td { (s.pool) }
                        td { (human(now.since(s.created_at))) }
                        td {
                            @if held {
                                @if let Some(h) = s.hold_until { "held until " (h) } @else { "held" }
                            } @else if let Some(l) = s.lease_until {
                                @if l < now { strong { "overtime " (human(now.since(l))) } } @else { (human(l.since(now))) }
                            } @else { "—" }
                        }
                        td {
                            @match s.expires_at.filter(|_| s.state == SessionState::Prod) {
                                Some(e) if e <= now => strong { "now (being reclaimed)" },
                                Some(e) => (human(e.since(now))),
                                None => "—",
                            }
                        }
                        td { @for h in hosts { a href={"/ui/node/" (h)} { (h) } " " } }
                    }
                }
            }
        }
        @if (d.page + 1) * SESSIONS_PAGE < d.total { p { a href={"/ui/sessions?page=" (d.page + 1)} { "Next page" } } }
    }
}

// ----- node -----

/// A node and its newest events, newest first.
pub struct NodeData {
    node: Node,
    events: Vec<Event>,
}

/// Reads a node and at most [`NODE_EVENTS`] of its newest events.
pub async fn read_node(store: &dyn duffy_core::Store, host: &str) -> Result<Option<NodeData>, duffy_core::StoreError> {
    let Some(node) = store.node_by_hostname(host).await? else { return Ok(None) };
    let events = store.latest_events(Some(node.id), NODE_EVENTS).await?;
    Ok(Some(NodeData { node, events }))
}

fn event_class(c: CauseKind) -> &'static str {
    match c {
        CauseKind::InstallAttemptFailed
        | CauseKind::InstallFailed
        | CauseKind::PrepareFailed
        | CauseKind::FailedByUser
        | CauseKind::AllocationAborted => "bad",
        CauseKind::PowerMismatch | CauseKind::PowerObserved | CauseKind::PoweredDown => "power",
        _ => "",
    }
}

/// The node page's live part: the row and its timeline.
pub fn node(ctx: &Ctx, d: &NodeData) -> Markup {
    let n = &d.node;
    let install = last_install(&d.events);
    html! {
        h1 { "Node " (n.hostname) }
        dl.node {
            dt { "State" } dd #node-state { span class={"cell " (class(n.state))} aria-hidden="true" { (letter(n.state)) } " " (n.state.as_str()) " since " (n.state_since) }
            dt { "Image" } dd { (n.image.as_ref().map(|p| p.to_string()).unwrap_or_else(|| "none".into())) }
            dt { "Hardware" } dd { (n.hardware_arch) @if let Some(f) = &n.flavor { "/" (f) } @if let Some(c) = &n.chassis { ", chassis " (c) } }
            dt { "Used" } dd { (n.used_count) " times" }
            dt { "Session" } dd { (n.session.as_ref().map(|s| s.0.as_str()).unwrap_or("none")) }
            dt { "Power" } dd { (format!("{:?}", n.power)) }
            @if let Some(r) = &n.fail_reason { dt { "Failed because" } dd.bad { (r) } }
            @if let Some(h) = n.hold_until { dt { "Held until" } dd { (h) } }
            dt { "Last install took" } dd #last-install { (install.map(human).unwrap_or_else(|| "not in its recent history".into())) }
        }
        @if ctx.admin.is_some() {
            div.actions {
                (action_form(ctx, "set-admin", Some(&n.hostname), "Set administrative downtime"))
                (action_form(ctx, "recover", Some(&n.hostname), "Recover"))
            }
        }
        h2 { "History" }
        p.muted { "Newest first; at most " (NODE_EVENTS) " events." }
        ol #timeline.timeline {
            @for e in &d.events {
                li class=(event_class(e.cause)) data-cause=(e.cause.as_str()) {
                    time datetime=(e.at) { (e.at) }
                    " " strong { (e.cause.as_str()) }
                    " " span.transition { (e.from.as_str()) " → " (e.to.as_str()) }
                    @if let Some(d) = &e.detail { " — " span.detail { (d) } }
                    " " span.muted { "by " (e.actor) @if let Some(s) = &e.session { ", session " code { (s.0.get(..8).unwrap_or(&s.0)) } } }
                }
            }
        }
    }
}

// ----- charts -----

/// What the charts draw, per minute of the last [`CHART_MINUTES`].
pub struct ChartData {
    ready: Vec<Series>,
    allocations: Series,
    failures: Series,
    events_read: usize,
}

/// Builds the charts from at most [`CHART_EVENTS`] of the newest events.
/// Ready per pool is walked back from today's counts: each event into
/// Ready added one to its pool, each out of it took one away. A node's
/// pool at an event is the image of its latest install before the event
/// (from the `InstallStarted` detail), or, for events before its first
/// install in the window, its current image (at most
/// `CHART_NODE_LOOKUPS` lookups; a node beyond that is left out, so the
/// far end of the chart is an estimate).
pub async fn read_charts(store: &dyn duffy_core::Store, now: Timestamp) -> Result<ChartData, duffy_core::StoreError> {
    let minute = Duration::from_secs(60);
    let start = now.minus(minute * CHART_MINUTES as u32);
    let mut events = store.latest_events(None, CHART_EVENTS).await?;
    events.retain(|e| e.at > start);
    events.reverse(); // oldest first
    let bucket = |at: Timestamp| ((at.since(start).as_millis() / 60_000) as usize).min(CHART_MINUTES - 1);

    let mut allocations = vec![0u32; CHART_MINUTES];
    let mut failures = vec![0u32; CHART_MINUTES];
    let mut sessions_seen = HashSet::new();
    for e in &events {
        match e.cause {
            CauseKind::Allocated | CauseKind::Delivered => {
                if let Some(s) = &e.session {
                    if sessions_seen.insert(s.clone()) {
                        allocations[bucket(e.at)] += 1;
                    }
                }
            }
            CauseKind::InstallAttemptFailed | CauseKind::InstallFailed => failures[bucket(e.at)] += 1,
            _ => {}
        }
    }

    // The pool of each Ready-changing event.
    let targets = store.pool_targets().await?;
    let current = store.ready_counts().await?;
    let mut known: HashMap<String, PoolKey> = HashMap::new();
    for p in targets.iter().map(|t| t.pool.clone()).chain(current.iter().map(|(p, _)| p.clone())) {
        known.insert(p.to_string(), p);
    }
    let mut image_now: HashMap<NodeId, Option<PoolKey>> = HashMap::new();
    let mut pool_at: Vec<Option<PoolKey>> = vec![None; events.len()];
    let mut lookups = 0;
    for (i, e) in events.iter().enumerate() {
        if e.cause == CauseKind::InstallStarted {
            let img = e.detail.as_deref().and_then(|d| d.split(' ').next()).and_then(|s| known.get(s)).cloned();
            image_now.insert(e.node, img);
        }
        if e.from == NodeState::Ready || e.to == NodeState::Ready {
            if !image_now.contains_key(&e.node) && lookups < CHART_NODE_LOOKUPS {
                lookups += 1;
                let img = store.node(e.node).await?.and_then(|n| n.image);
                image_now.insert(e.node, img);
            }
            // A stale reinstall leaves Ready with the old image: the one
            // before this event's own InstallStarted.
            pool_at[i] = if e.cause == CauseKind::InstallStarted && e.from == NodeState::Ready {
                None
            } else {
                image_now.get(&e.node).cloned().flatten()
            };
        }
    }
    let mut counts: BTreeMap<PoolKey, i64> = current.iter().map(|(p, c)| (p.clone(), i64::from(*c))).collect();
    for t in &targets {
        counts.entry(t.pool.clone()).or_default();
    }
    let mut series: BTreeMap<PoolKey, Vec<u32>> = counts.keys().map(|p| (p.clone(), vec![0; CHART_MINUTES])).collect();
    let mut idx = events.len();
    for b in (0..CHART_MINUTES).rev() {
        for (p, c) in &counts {
            if let Some(v) = series.get_mut(p) {
                v[b] = u32::try_from((*c).max(0)).unwrap_or(u32::MAX);
            }
        }
        // Undo this bucket's events, newest first, to get the count at
        // the end of the bucket before.
        while idx > 0 && bucket(events[idx - 1].at) == b {
            idx -= 1;
            let e = &events[idx];
            if let Some(p) = &pool_at[idx] {
                let c = counts.entry(p.clone()).or_default();
                if e.to == NodeState::Ready && e.from != NodeState::Ready {
                    *c -= 1;
                } else if e.from == NodeState::Ready && e.to != NodeState::Ready {
                    *c += 1;
                }
            }
        }
    }
    Ok(ChartData {
        ready: series.into_iter().map(|(p, values)| Series { name: p.to_string(), values }).collect(),
        allocations: Series { name: "sessions started".into(), values: allocations },
        failures: Series { name: "failed install attempts".into(), values: failures },
        events_read: events.len(),
    })
}

/// The charts' live part.
pub fn charts(d: &ChartData) -> Markup {
    let x = format!("last {CHART_MINUTES} minutes, one point per minute");
    html! {
        h1 { "Charts" }
        p.muted { "From the newest " (d.events_read) " events of the log." }
        section #chart-ready { h2 { "Ready per pool" } (chart::lines("Ready machines per pool", &x, &d.ready)) }
        section #chart-allocations { h2 { "Allocations per minute" } (chart::bars("Allocations per minute", &x, &d.allocations)) }
        section #chart-failures { h2 { "Install failures per minute" } (chart::bars("Install failures per minute", &x, &d.failures)) }
    }
}

/// The style sheet (served as a file: the pages carry no inline style, so
/// the content security policy can forbid it).
pub const STYLE: &str = r#"
body { font-family: system-ui, sans-serif; margin: 0; color: #1d1d1d; background: #fafafa; }
header { display: flex; gap: 1.5em; align-items: center; padding: .5em 1em; background: #22313f; color: #fff; flex-wrap: wrap; }
header a { color: #fff; margin-right: 1em; }
header a[aria-current] { font-weight: bold; text-decoration: underline; }
.brand { font-weight: bold; font-size: 1.2em; }
.admin { margin-left: auto; display: flex; gap: .5em; align-items: center; }
.admin form { display: inline-flex; gap: .4em; align-items: center; }
main, form.filters { padding: .5em 1em; }
a:focus, button:focus, input:focus, select:focus, main:focus { outline: 3px solid #f5a623; outline-offset: 1px; }
.skip { position: absolute; left: -9999px; } .skip:focus { left: 1em; top: 1em; background: #fff; color: #000; padding: .3em; z-index: 2; }
.status { padding: .4em 0; display: flex; gap: 1em; align-items: center; }
.paused { color: #b00020; }
.legend { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: 1em; }
.cells { display: flex; flex-wrap: wrap; gap: 2px; }
.cell { display: inline-block; width: 1.3em; height: 1.3em; line-height: 1.3em; text-align: center; font-size: .8em; font-weight: bold; color: #fff; text-decoration: none; border-radius: 2px; }
.s-ready { background: #2e7d32; } .s-deployed { background: #1565c0; } .s-contextualizing { background: #00838f; }
.s-provisioning { background: #ef8f00; color: #000; } .s-active { background: #9e9e9e; color: #000; }
.s-failed { background: #c62828; } .s-reserved { background: #6a1b9a; }
#map { display: flex; flex-wrap: wrap; gap: .4em 1.6em; align-items: flex-start; }
#map > p { flex-basis: 100%; }
.group { max-width: 30em; }
.group h2 { font-size: .9em; margin: .6em 0 .3em; }
.muted { color: #666; font-weight: normal; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ddd; padding: .25em .5em; text-align: left; }
caption { text-align: left; font-weight: bold; padding: .3em 0; }
tr.short td, tr.overtime td { background: #fff3e0; } tr.held td { background: #ffebee; }
.timeline li { margin: .2em 0; } .timeline li.bad { color: #b00020; } .timeline li.power { color: #6a1b9a; }
dd.bad { color: #b00020; }
.chart svg { width: 100%; max-width: 640px; background: #fff; border: 1px solid #ddd; }
.swatch { width: .8em; height: .8em; margin: 0 .2em 0 .6em; }
form.action { display: inline; }
form.filters label { margin: 0 .3em 0 .9em; } form.filters label:first-child { margin-left: 0; }
dl.node { display: grid; grid-template-columns: max-content 1fr; gap: .25em 1em; } dl.node dt { font-weight: bold; } dl.node dd { margin: 0; }
"#;

/// The event stream's client: on each change, fetch the page again and
/// swap in its `#live` part (no reload, the filters and focus outside it
/// stay). `data-updates` on the body counts the swaps, for the tests.
pub const APP_JS: PreEscaped<&str> = PreEscaped(
    r#""use strict";
(function () {
  if (!window.EventSource) return;
  var body = document.body, busy = false, again = false;
  function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    fetch(location.href, { credentials: "same-origin", headers: { "X-Duffy-Live": "1" } })
      .then(function (r) { return r.text(); })
      .then(function (text) {
        var doc = new DOMParser().parseFromString(text, "text/html");
        var fresh = doc.getElementById("live"), old = document.getElementById("live");
        if (fresh && old) { old.replaceWith(fresh); }
        body.dataset.seq = doc.body.dataset.seq; body.dataset.paused = doc.body.dataset.paused;
        body.dataset.updates = String(Number(body.dataset.updates || 0) + 1);
      })
      .catch(function () {})
      .then(function () { busy = false; if (again) { again = false; refresh(); } });
  }
  var source = new EventSource("/ui/events?since=" + encodeURIComponent(body.dataset.seq) + "&paused=" + body.dataset.paused);
  source.addEventListener("change", refresh);
})();
"#,
);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

    use std::sync::{Arc, Mutex};

    use duffy_core::mem::MemStore;
    use duffy_core::testkit::InterceptStore;
    use duffy_core::{Actor, Arch, NewNode, Store};

    use super::*;

    /// A store of `n` idle machines, 40 to a chassis, that records which
    /// reads it was asked for.
    async fn farm(n: usize) -> (InterceptStore, Arc<Mutex<Vec<&'static str>>>) {
        let inner = MemStore::new();
        let nodes = (1..=n)
            .map(|i| {
                let mut m = NewNode::new(format!("m{i}.farm"), Arch::X86_64);
                m.chassis = Some(format!("rack{}", i / 40));
                m
            })
            .collect();
        inner.add_nodes(nodes, Actor::Operator, Timestamp(0)).await.unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        let store = InterceptStore::failing(Arc::new(inner), move |m| {
            seen.lock().unwrap().push(m);
            None
        });
        (store, calls)
    }

    /// The map never reads the whole farm: counts come grouped, cells a
    /// page at a time, and a filter that matches little reads at most
    /// `MAP_SCAN` rows per page, then offers the next page; paging covers
    /// every machine exactly once.
    #[tokio::test]
    async fn the_map_reads_a_bounded_page_and_pages_through_the_farm() {
        let (store, calls) = farm(MAP_SCAN + 5_000).await;
        let mut f = MapFilter::default();
        let mut seen = Vec::new();
        loop {
            calls.lock().unwrap().clear();
            let d = read_map(&store, &f).await.unwrap();
            assert_eq!(d.counts.iter().map(|c| c.count as usize).sum::<usize>(), MAP_SCAN + 5_000);
            assert!(d.cells.len() <= MAP_CELLS);
            let calls = calls.lock().unwrap().clone();
            assert!(!calls.contains(&"nodes"), "never every row: {calls:?}");
            assert!(calls.iter().filter(|c| **c == "nodes_after").count() <= MAP_SCAN / SCAN_CHUNK + 1);
            seen.extend(d.cells.iter().map(|n| n.id));
            match d.next {
                Some(next) => f.after = next,
                None => break,
            }
        }
        let all: Vec<NodeId> = store.nodes().await.unwrap().iter().map(|n| n.id).collect();
        assert_eq!(seen, all, "every machine once, in order");

        // One machine matches, at the far end: the first page reads
        // MAP_SCAN rows and stops, the next one finds it.
        let f = MapFilter { host: Some(format!("m{}.farm", MAP_SCAN + 4_999)), ..MapFilter::default() };
        calls.lock().unwrap().clear();
        let first = read_map(&store, &f).await.unwrap();
        assert!(first.cells.is_empty());
        assert_eq!(calls.lock().unwrap().iter().filter(|c| **c == "nodes_after").count(), MAP_SCAN / SCAN_CHUNK);
        let next = first.next.expect("a next page");
        let second = read_map(&store, &MapFilter { after: next, ..f }).await.unwrap();
        assert_eq!(second.cells.len(), 1);
        assert_eq!(second.next, None);
    }

    /// A state filter with few machines reads them through the state
    /// index, not by scanning.
    #[tokio::test]
    async fn a_rare_state_is_read_through_its_index() {
        let (store, calls) = farm(5_000).await;
        calls.lock().unwrap().clear();
        let d = read_map(&store, &MapFilter { state: Some(NodeState::Failed), ..MapFilter::default() }).await.unwrap();
        assert!(d.cells.is_empty() && d.next.is_none());
        let calls = calls.lock().unwrap().clone();
        assert_eq!(calls, vec!["node_counts", "nodes_in_states"]);
    }

    /// An extended session is overtime (past the lease it was created
    /// with) but does not expire until its extension runs out: the page
    /// shows both.
    #[test]
    fn the_sessions_page_shows_the_lease_and_the_expiry_an_extension_moved() {
        let now = Timestamp(10_000_000);
        let session = Session {
            id: duffy_core::SessionId("0193a1b2-aaaa-7000-8000-000000000001".into()),
            project: "ci".into(),
            key_id: duffy_core::KeyId(1),
            state: SessionState::Prod,
            pool: "9/x86_64".parse().unwrap(),
            nodes: vec![NodeId(1)],
            created_at: Timestamp(now.0 - 7_200_000),
            delivered_at: Some(Timestamp(now.0 - 7_200_000)),
            lease_until: Some(Timestamp(now.0 - 3_600_000)),
            hold_until: None,
            ended_at: None,
            end_reason: None,
            version: 3,
            expires_at: Some(Timestamp(now.0 + 5_400_000)),
        };
        let d = SessionsData { total: 1, page: 0, rows: vec![(session, vec!["n1.farm".into()])] };
        let page = sessions(&d, now).into_string();
        assert!(page.contains("Expires in"), "{page}");
        assert!(page.contains("overtime 1h 0m"), "{page}");
        assert!(page.contains("<td>1h 30m</td>"), "the expiry the extension moved: {page}");
    }

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(human(Duration::from_secs(12)), "12s");
        assert_eq!(human(Duration::from_secs(245)), "4m 5s");
        assert_eq!(human(Duration::from_secs(3 * 3600 + 12 * 60)), "3h 12m");
        assert_eq!(human(Duration::from_secs(2 * 86_400 + 3600)), "2d 1h");
    }
}
