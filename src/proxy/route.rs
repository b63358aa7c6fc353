//! Routing: host, path prefix and headers pick an upstream (or a weighted
//! split of upstreams); first match wins, else the listener's default.

use http::request::Parts;
use http::{HeaderName, HeaderValue};

use crate::balance::SmoothTable;
use crate::config::{HostMatch, RouteConfig, RouteTarget};

/// A listener's routes, with upstream names resolved to snapshot indices.
pub struct Router {
    routes: Vec<Route>,
    default: Option<usize>,
}

struct Route {
    host: Option<HostMatch>,
    sni: Option<HostMatch>,
    path_prefix: Option<String>,
    headers: Vec<(HeaderName, HeaderValue)>,
    target: Target,
}

enum Target {
    Upstream(usize),
    /// Indices of upstreams, in the order of a smooth weighted sequence.
    Split {
        upstreams: Vec<usize>,
        table: SmoothTable,
    },
}

impl Router {
    /// Resolves `routes` and `default` with `index_of` (upstream name ->
    /// snapshot index). Names were checked by config validation; a name that
    /// still does not resolve makes its route never match.
    pub fn new(
        routes: &[RouteConfig],
        default: Option<&str>,
        index_of: &dyn Fn(&str) -> Option<usize>,
    ) -> Self {
        let routes = routes
            .iter()
            .filter_map(|r| {
                let target = match &r.target {
                    RouteTarget::Upstream(name) => Target::Upstream(index_of(name)?),
                    RouteTarget::Split(parts) => {
                        let upstreams = parts
                            .iter()
                            .map(|(name, _)| index_of(name))
                            .collect::<Option<Vec<_>>>()?;
                        let weights: Vec<u32> = parts.iter().map(|(_, w)| *w).collect();
                        Target::Split {
                            upstreams,
                            table: SmoothTable::new(&weights),
                        }
                    }
                };
                Some(Route {
                    host: r.host.clone(),
                    sni: r.sni.clone(),
                    path_prefix: r.path_prefix.clone(),
                    headers: r.headers.clone(),
                    target,
                })
            })
            .collect();
        Router {
            routes,
            default: default.and_then(index_of),
        }
    }

    /// The listener's default upstream.
    pub fn default_upstream(&self) -> Option<usize> {
        self.default
    }

    /// The upstream index for a TLS session by its ClientHello's server name
    /// (`None`: no SNI): the first route whose `sni` matches, else the
    /// default.
    pub fn route_sni(&self, sni: Option<&str>) -> Option<usize> {
        if let Some(name) = sni {
            for route in &self.routes {
                if route
                    .sni
                    .as_ref()
                    .is_some_and(|want| host_matches(want, name))
                {
                    return route.target.pick();
                }
            }
        }
        self.default
    }

    /// The upstream index for a request, or `None` when nothing matches and
    /// there is no default.
    pub fn route(&self, parts: &Parts) -> Option<usize> {
        // The host is found only for a route that asks for it: most
        // listeners have no routes, and finding it is a string search.
        let mut host = None;
        let path = parts.uri.path();
        for route in &self.routes {
            if route.matches(&mut host, path, parts) {
                return route.target.pick();
            }
        }
        self.default
    }
}

impl Target {
    fn pick(&self) -> Option<usize> {
        match self {
            Target::Upstream(i) => Some(*i),
            Target::Split { upstreams, table } => {
                table.next().and_then(|k| upstreams.get(k).copied())
            }
        }
    }
}

/// Whether `host` (no port) matches an exact or `*.` wildcard pattern:
/// `*.example.com` matches `a.example.com`, not `example.com`.
fn host_matches(want: &HostMatch, host: &str) -> bool {
    match want {
        HostMatch::Exact(name) => host.eq_ignore_ascii_case(name),
        HostMatch::Suffix(suffix) => {
            host.len() > suffix.len()
                && host.is_char_boundary(host.len() - suffix.len())
                && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        }
    }
}

impl Route {
    /// `host` caches the request's host across routes: `None` until found.
    fn matches<'p>(
        &self,
        host: &mut Option<Option<&'p str>>,
        path: &str,
        parts: &'p Parts,
    ) -> bool {
        if let Some(want) = &self.host {
            let host = *host.get_or_insert_with(|| request_host(parts));
            if !host.is_some_and(|h| host_matches(want, h)) {
                return false;
            }
        }
        if let Some(prefix) = &self.path_prefix {
            if !path.starts_with(prefix.as_str()) {
                return false;
            }
        }
        self.headers
            .iter()
            .all(|(name, value)| parts.headers.get_all(name).iter().any(|v| v == value))
    }
}

/// The request's host without port: the URI authority (HTTP/2, absolute
/// form) or else the Host header.
pub fn request_host(parts: &Parts) -> Option<&str> {
    let raw = match parts.uri.authority() {
        Some(a) => a.as_str(),
        None => parts.headers.get(http::header::HOST)?.to_str().ok()?,
    };
    Some(strip_port(raw))
}

fn strip_port(authority: &str) -> &str {
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port -> v6
        return rest.split_once(']').map_or(host, |(v6, _)| v6);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteConfig;

    fn parts(uri: &str, host: Option<&str>, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("valid request").into_parts().0
    }

    fn route(host: Option<HostMatch>, prefix: Option<&str>, upstream: &str) -> RouteConfig {
        RouteConfig {
            host,
            sni: None,
            path_prefix: prefix.map(str::to_owned),
            headers: vec![],
            target: RouteTarget::Upstream(upstream.to_owned()),
        }
    }

    fn index_of(name: &str) -> Option<usize> {
        ["default", "api", "wild", "canary", "a", "b"]
            .iter()
            .position(|n| *n == name)
    }

    #[test]
    fn first_matching_route_wins_else_default() {
        let mut canary = route(None, None, "canary");
        canary.headers = vec![(
            HeaderName::from_static("x-canary"),
            HeaderValue::from_static("1"),
        )];
        let routes = vec![
            canary,
            route(
                Some(HostMatch::Exact("api.example.com".into())),
                Some("/v1/"),
                "api",
            ),
            route(Some(HostMatch::Suffix(".example.com".into())), None, "wild"),
        ];
        let router = Router::new(&routes, Some("default"), &index_of);
        let r = |p: &Parts| router.route(p);
        assert_eq!(
            r(&parts("/v1/x", Some("API.example.com:8080"), &[])),
            Some(1)
        );
        assert_eq!(r(&parts("/v2/x", Some("api.example.com"), &[])), Some(2));
        assert_eq!(r(&parts("/", Some("b.example.com"), &[])), Some(2));
        assert_eq!(r(&parts("/", Some("example.com"), &[])), Some(0));
        assert_eq!(r(&parts("/", Some("other"), &[("x-canary", "1")])), Some(3));
        assert_eq!(r(&parts("/", Some("other"), &[("x-canary", "2")])), Some(0));
        assert_eq!(r(&parts("http://api.example.com/v1/", None, &[])), Some(1));
    }

    #[test]
    fn split_follows_its_weights() {
        let routes = vec![RouteConfig {
            host: None,
            sni: None,
            path_prefix: None,
            headers: vec![],
            target: RouteTarget::Split(vec![("a".into(), 3), ("b".into(), 1)]),
        }];
        let router = Router::new(&routes, None, &index_of);
        let p = parts("/", Some("x"), &[]);
        let picks: Vec<_> = (0..400).filter_map(|_| router.route(&p)).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 4).count(), 300);
        assert_eq!(picks.iter().filter(|&&i| i == 5).count(), 100);
    }

    #[test]
    fn no_default_and_no_match_is_none() {
        let routes = vec![route(None, Some("/only"), "api")];
        let router = Router::new(&routes, None, &index_of);
        assert_eq!(router.route(&parts("/else", Some("h"), &[])), None);
    }

    #[test]
    fn sni_routes_match_exact_and_wildcard_names_else_default() {
        let mut exact = route(None, None, "api");
        exact.sni = Some(HostMatch::Exact("db.example.com".into()));
        let mut wild = route(None, None, "wild");
        wild.sni = Some(HostMatch::Suffix(".example.com".into()));
        let router = Router::new(&[exact, wild], Some("default"), &index_of);
        assert_eq!(router.route_sni(Some("DB.example.com")), Some(1));
        assert_eq!(router.route_sni(Some("x.example.com")), Some(2));
        assert_eq!(router.route_sni(Some("example.com")), Some(0));
        assert_eq!(router.route_sni(None), Some(0));
    }

    #[test]
    fn ports_and_ipv6_are_stripped_from_hosts() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("a.b"), "a.b");
    }
}
