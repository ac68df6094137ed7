//! Route: matches a request to its service's OpenAPI operation, and so to what it costs.
//!
//! A table is compiled once per `Service` version into a segment trie; matching is a
//! pure function of (table, method, path) that allocates nothing. Precedence: literal
//! segments beat templated ones at the first place they differ (then the template with
//! more literal text, e.g. `{sid}.json` before `{sid}`), then the exact method, then a
//! method-less route. It must not look at anything but the method and the path.

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use neutrino_proto as pb;

use crate::telemetry::stats::RouteStats;

/// What a request costs, in the units of the capacity vector.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cost {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub gpu: u64,
}

impl Cost {
    pub fn as_array(&self) -> [u64; 3] {
        [self.cpu_millis, self.memory_bytes, self.gpu]
    }

    /// The cost as the `x-neutrino-cost` header value ("cpu,memory,gpu"), which the
    /// endpoint's proxy parses back.
    pub fn header_value(&self) -> http::HeaderValue {
        let [c, m, g] = self.as_array();
        http::HeaderValue::try_from(format!("{c},{m},{g}")).unwrap_or(http::HeaderValue::from_static("0,0,0"))
    }
}

impl From<pb::ResourceVector> for Cost {
    fn from(v: pb::ResourceVector) -> Self {
        Cost { cpu_millis: v.cpu_millis, memory_bytes: v.memory_bytes, gpu: v.gpu }
    }
}

/// One operation, ready for the data path.
#[derive(Debug, Clone)]
pub struct Operation {
    pub operation_id: Arc<str>,
    pub path_template: Arc<str>,
    pub cost: Cost,
    /// `cost` formatted once, as every request sent upstream carries it.
    pub cost_header: http::HeaderValue,
    /// None: the proxy's default request timeout.
    pub timeout: Option<Duration>,
    pub retryable: bool,
    /// Its counters, shared by every route with this operation id and kept across
    /// config snapshots (see `RouteTable::attach_stats`).
    pub stats: Arc<RouteStats>,
}

/// Operations are equal when they route alike; their counters do not matter.
impl PartialEq for Operation {
    fn eq(&self, other: &Self) -> bool {
        self.operation_id == other.operation_id
            && self.path_template == other.path_template
            && self.cost == other.cost
            && self.timeout == other.timeout
            && self.retryable == other.retryable
    }
}

/// A segment of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(Box<str>),
    /// `{param}` with literal text around it: `{sid}.json`, `v{n}`. Several parameters
    /// in one segment keep only the outer literals (a superset match).
    Affix {
        prefix: Box<str>,
        suffix: Box<str>,
    },
    Param,
}

impl Segment {
    fn parse(s: &str) -> Segment {
        match (s.find('{'), s.rfind('}')) {
            (Some(open), Some(close)) if open < close => {
                let (prefix, suffix) = (&s[..open], &s[close + 1..]);
                if prefix.is_empty() && suffix.is_empty() {
                    Segment::Param
                } else {
                    Segment::Affix { prefix: prefix.into(), suffix: suffix.into() }
                }
            }
            _ => Segment::Literal(s.into()),
        }
    }
}

#[derive(Debug, Default)]
struct Node {
    /// Sorted by text, for binary search.
    literals: Vec<(Box<str>, u32)>,
    /// Most literal text first.
    affixes: Vec<(Box<str>, Box<str>, u32)>,
    param: Option<u32>,
    /// Operations ending here, by method (`None`: any method).
    ops: Vec<(Option<Method>, u32)>,
}

/// The compiled routes of one service.
#[derive(Debug)]
pub struct RouteTable {
    nodes: Vec<Node>,
    ops: Vec<Operation>,
    default: Operation,
}

impl Default for RouteTable {
    fn default() -> Self {
        RouteTable::compile(&[], Cost::default())
    }
}

/// Splits a request target into its path segments: query dropped, empty segments
/// (`//`, a trailing `/`) skipped.
fn segments(path: &str) -> impl Iterator<Item = &str> + Clone {
    let path = path.split_once('?').map(|(p, _)| p).unwrap_or(path);
    path.split('/').filter(|s| !s.is_empty())
}

impl RouteTable {
    /// Compiles `routes`; requests matching none cost `default_cost`.
    pub fn compile(routes: &[pb::Route], default_cost: Cost) -> RouteTable {
        let default = Operation {
            operation_id: Arc::from(""),
            path_template: Arc::from(""),
            cost: default_cost,
            cost_header: default_cost.header_value(),
            timeout: None,
            retryable: false,
            stats: Arc::default(),
        };
        let mut t = RouteTable { nodes: vec![Node::default()], ops: Vec::new(), default };
        for r in routes {
            let op = t.ops.len() as u32;
            let cost = r.cost.map(Cost::from).unwrap_or(default_cost);
            t.ops.push(Operation {
                operation_id: Arc::from(r.operation_id.as_str()),
                path_template: Arc::from(r.path_template.as_str()),
                cost,
                cost_header: cost.header_value(),
                timeout: (r.timeout_ms > 0).then(|| Duration::from_millis(r.timeout_ms)),
                retryable: r.retryable,
                stats: Arc::default(),
            });
            let mut node = 0usize;
            for seg in segments(&r.path_template) {
                node = t.child(node, Segment::parse(seg)) as usize;
            }
            let method = if r.method.is_empty() { None } else { Method::from_bytes(r.method.as_bytes()).ok() };
            // The first route for a (path, method) wins, as the document lists them.
            if !t.nodes[node].ops.iter().any(|(m, _)| *m == method) {
                t.nodes[node].ops.push((method, op));
            }
        }
        for n in &mut t.nodes {
            n.literals.sort_by(|a, b| a.0.cmp(&b.0));
            n.affixes.sort_by_key(|(p, s, _)| std::cmp::Reverse(p.len() + s.len()));
        }
        t
    }

    fn child(&mut self, node: usize, seg: Segment) -> u32 {
        let existing = match &seg {
            Segment::Literal(l) => self.nodes[node].literals.iter().find(|(x, _)| x == l).map(|c| c.1),
            Segment::Affix { prefix, suffix } => {
                self.nodes[node].affixes.iter().find(|(p, s, _)| p == prefix && s == suffix).map(|c| c.2)
            }
            Segment::Param => self.nodes[node].param,
        };
        if let Some(id) = existing {
            return id;
        }
        let id = self.nodes.len() as u32;
        self.nodes.push(Node::default());
        let n = &mut self.nodes[node];
        match seg {
            Segment::Literal(l) => n.literals.push((l, id)),
            Segment::Affix { prefix, suffix } => n.affixes.push((prefix, suffix, id)),
            Segment::Param => n.param = Some(id),
        }
        id
    }

    /// The operation a request matches, or the service's default route.
    pub fn lookup(&self, method: &Method, path: &str) -> &Operation {
        self.find(method, path).unwrap_or(&self.default)
    }

    /// The operation a request matches, if any.
    pub fn find(&self, method: &Method, path: &str) -> Option<&Operation> {
        self.walk(0, segments(path), method).map(|i| &self.ops[i as usize])
    }

    pub fn default_op(&self) -> &Operation {
        &self.default
    }

    /// Gives every operation its counters: `stats_for(operation id)` (the default
    /// route's id is ""). Routes sharing an id share counters.
    pub fn attach_stats(&mut self, mut stats_for: impl FnMut(&str) -> Arc<RouteStats>) {
        let mut given: Vec<(Arc<str>, Arc<RouteStats>)> = Vec::new();
        for op in self.ops.iter_mut().chain(std::iter::once(&mut self.default)) {
            let stats = match given.iter().find(|(id, _)| *id == op.operation_id) {
                Some((_, s)) => Arc::clone(s),
                None => {
                    let s = stats_for(&op.operation_id);
                    given.push((Arc::clone(&op.operation_id), Arc::clone(&s)));
                    s
                }
            };
            op.stats = stats;
        }
    }

    /// Every operation, the default route last.
    pub fn operations(&self) -> impl Iterator<Item = &Operation> {
        self.ops.iter().chain(std::iter::once(&self.default))
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    fn walk<'p>(&self, node: u32, mut rest: impl Iterator<Item = &'p str> + Clone, method: &Method) -> Option<u32> {
        let n = self.nodes.get(node as usize)?;
        let Some(seg) = rest.next() else { return self.pick_method(n, method) };
        if let Ok(i) = n.literals.binary_search_by(|(l, _)| l.as_ref().cmp(seg))
            && let Some(found) = self.walk(n.literals[i].1, rest.clone(), method)
        {
            return Some(found);
        }
        for (prefix, suffix, child) in &n.affixes {
            if seg.len() > prefix.len() + suffix.len()
                && seg.starts_with(&**prefix)
                && seg.ends_with(&**suffix)
                && let Some(found) = self.walk(*child, rest.clone(), method)
            {
                return Some(found);
            }
        }
        n.param.and_then(|child| self.walk(child, rest, method))
    }

    fn pick_method(&self, n: &Node, method: &Method) -> Option<u32> {
        let exact = |m: &Method| n.ops.iter().find(|(x, _)| x.as_ref() == Some(m)).map(|o| o.1);
        exact(method)
            .or_else(|| if method == Method::HEAD { exact(&Method::GET) } else { None })
            .or_else(|| n.ops.iter().find(|(x, _)| x.is_none()).map(|o| o.1))
    }
}

/// A concrete path for `template`, every parameter replaced by `value` (for tests and
/// benchmarks that need a request for each operation).
pub fn example_path(template: &str, value: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let mut in_param = false;
    for c in template.chars() {
        match c {
            '{' => in_param = true,
            '}' => {
                in_param = false;
                out.push_str(value);
            }
            c if !in_param => out.push(c),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(path: &str, method: &str, op: &str) -> pb::Route {
        pb::Route { path_template: path.into(), method: method.into(), operation_id: op.into(), ..Default::default() }
    }

    fn table(routes: &[(&str, &str, &str)]) -> RouteTable {
        let rs: Vec<pb::Route> = routes.iter().map(|(p, m, o)| route(p, m, o)).collect();
        RouteTable::compile(&rs, Cost { cpu_millis: 100, ..Default::default() })
    }

    fn op(t: &RouteTable, method: Method, path: &str) -> String {
        t.lookup(&method, path).operation_id.to_string()
    }

    #[test]
    fn literal_segments_beat_templates() {
        let t = table(&[
            ("/pets/{petId}", "GET", "showPet"),
            ("/pets/mine", "GET", "myPets"),
            ("/pets", "GET", "listPets"),
            ("/pets", "POST", "createPet"),
        ]);
        assert_eq!(op(&t, Method::GET, "/pets/mine"), "myPets");
        assert_eq!(op(&t, Method::GET, "/pets/42"), "showPet");
        assert_eq!(op(&t, Method::GET, "/pets"), "listPets");
        assert_eq!(op(&t, Method::POST, "/pets"), "createPet");
        assert_eq!(op(&t, Method::GET, "/pets/?limit=3"), "listPets", "query and trailing slash ignored");
    }

    #[test]
    fn backtracks_when_the_literal_branch_dead_ends() {
        let t = table(&[("/a/b/c", "GET", "literal"), ("/a/{x}/d", "GET", "templated")]);
        assert_eq!(op(&t, Method::GET, "/a/b/d"), "templated");
        assert_eq!(op(&t, Method::GET, "/a/b/c"), "literal");
    }

    #[test]
    fn templates_with_literal_text_in_a_segment() {
        let t = table(&[
            ("/Accounts/{AccountSid}/Calls/{Sid}.json", "GET", "fetchCall"),
            ("/Accounts/{AccountSid}/Calls/{Sid}", "GET", "bare"),
            ("/v{version}/ping", "GET", "ping"),
        ]);
        assert_eq!(op(&t, Method::GET, "/Accounts/AC1/Calls/CA2.json"), "fetchCall");
        assert_eq!(op(&t, Method::GET, "/Accounts/AC1/Calls/CA2"), "bare");
        assert_eq!(op(&t, Method::GET, "/v2/ping"), "ping");
        assert_eq!(op(&t, Method::GET, "/Accounts/AC1/Calls/.json"), "bare", "a parameter is never empty");
    }

    #[test]
    fn method_precedence_head_and_any() {
        let t = table(&[("/x", "GET", "get"), ("/x", "", "any"), ("/y", "GET", "onlyGet")]);
        assert_eq!(op(&t, Method::GET, "/x"), "get");
        assert_eq!(op(&t, Method::DELETE, "/x"), "any");
        assert_eq!(op(&t, Method::HEAD, "/y"), "onlyGet");
        assert_eq!(op(&t, Method::POST, "/y"), "", "path matched, method did not: default route");
    }

    #[test]
    fn unmatched_requests_take_the_default_route_and_cost() {
        let t = table(&[("/pets", "GET", "listPets")]);
        let d = t.lookup(&Method::GET, "/nothing/here");
        assert_eq!(&*d.operation_id, "");
        assert_eq!(d.cost.cpu_millis, 100);
        assert!(t.find(&Method::GET, "/").is_none());
    }

    #[test]
    fn costs_timeouts_and_retryable_come_from_the_route() {
        let mut r = route("/render/{id}", "POST", "render");
        r.cost = Some(pb::ResourceVector { cpu_millis: 2000, memory_bytes: 1 << 30, gpu: 1 });
        r.timeout_ms = 1500;
        r.retryable = true;
        let t =
            RouteTable::compile(&[r, route("/cheap", "GET", "cheap")], Cost { cpu_millis: 7, ..Default::default() });
        let o = t.lookup(&Method::POST, "/render/9");
        assert_eq!(o.cost, Cost { cpu_millis: 2000, memory_bytes: 1 << 30, gpu: 1 });
        assert_eq!((o.timeout, o.retryable), (Some(Duration::from_millis(1500)), true));
        assert_eq!(t.lookup(&Method::GET, "/cheap").cost.cpu_millis, 7, "no cost of its own: the default");
    }

    fn shared_routes(file: &str) -> Vec<pb::Route> {
        let path = format!("{}/../../shared/testdata/openapi/{file}", env!("CARGO_MANIFEST_DIR"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        neutrino_control_plane::translate::openapi::routes(&bytes).expect("parses").routes
    }

    #[test]
    fn every_operation_of_real_documents_matches_itself() {
        for file in ["kubernetes-v1.35-api__v1_openapi.json", "twilio_api_v2010.json", "ory-kratos-v26.2.0.json"] {
            let routes = shared_routes(file);
            let t = RouteTable::compile(&routes, Cost::default());
            for r in &routes {
                let m = Method::from_bytes(r.method.as_bytes()).expect("method");
                let got = t.lookup(&m, &example_path(&r.path_template, "zz9"));
                // Several operations may share a template and method only if the
                // document repeats itself; then the first one listed wins.
                assert_eq!(&*got.path_template, r.path_template.as_str(), "{file}: {} {}", r.method, r.path_template);
            }
        }
    }
}
