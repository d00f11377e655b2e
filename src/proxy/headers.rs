//! Header hygiene for both directions, as pure functions: hop-by-hop removal (including the
//! headers a `Connection` header names), `Authorization` replacement and `Host` rewriting.
//!
//! Two deliberate exceptions keep protocols working end to end: on an upgrade (WebSocket) the
//! `Upgrade` header and `Connection: upgrade` pass; and `Trailer`, which hyper needs to emit
//! trailer fields on HTTP/1.1, passes when the message body is streamed (no `Content-Length`),
//! the only case where trailers can follow. `TE: trailers` is re-sent as such, as gRPC needs.

use http::header::{
    HeaderName, HeaderValue, CONNECTION, HOST, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE,
    TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::HeaderMap;

use super::codec::has_token;

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The comma-separated tokens of a header value, trimmed.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|b| *b == b',').map(<[u8]>::trim_ascii)
}

/// The field names a `Connection` value lists besides its options `keep-alive` and `close`
/// (and `upgrade` when `upgrade`): fields that are hop-by-hop for this message.
pub fn connection_named(value: &[u8], upgrade: bool) -> impl Iterator<Item = &[u8]> {
    tokens(value).filter(move |t| {
        !(t.is_empty()
            || t.eq_ignore_ascii_case(b"keep-alive")
            || t.eq_ignore_ascii_case(b"close")
            || (upgrade && t.eq_ignore_ascii_case(b"upgrade")))
    })
}

/// The headers that are hop-by-hop by themselves (those named by `Connection` come on top),
/// each with the bit [`strip_hop_by_hop`] marks it present with.
const HOP_BY_HOP: [&HeaderName; 9] = [
    &CONNECTION,
    &TE,
    &TRAILER,
    &TRANSFER_ENCODING,
    &UPGRADE,
    &PROXY_AUTHORIZATION,
    &PROXY_AUTHENTICATE,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
];
const HAS_CONNECTION: u16 = 1;
const HAS_TE: u16 = 1 << 1;
const HAS_TRAILER: u16 = 1 << 2;
const HAS_UPGRADE: u16 = 1 << 4;

/// The bit of `name` in [`HOP_BY_HOP`], or 0.
fn hop_by_hop_bit(name: &HeaderName) -> u16 {
    HOP_BY_HOP
        .iter()
        .position(|h| *h == name)
        .map_or(0, |i| 1 << i)
}

/// Whether a field named `name` (as sent) is hop-by-hop by itself (one of `HOP_BY_HOP`).
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    // Cheap first: the lengths of most names rule them out.
    matches!(name.len(), 2 | 7 | 10 | 16 | 17 | 18 | 19)
        && HOP_BY_HOP
            .iter()
            .any(|h| h.as_str().as_bytes().eq_ignore_ascii_case(name))
}

/// The token of a token slot's `Bearer <token>` value (a value without the word as it is).
pub fn bare_token(value: &[u8]) -> &[u8] {
    value.strip_prefix(b"Bearer ").unwrap_or(value)
}

/// Whether an HTTP/1.1 request asks to switch protocols (`Connection: upgrade` + `Upgrade`).
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE)
        && headers
            .get_all(CONNECTION)
            .iter()
            .any(|v| has_token(v.as_bytes(), b"upgrade"))
}

/// Removes hop-by-hop headers. `upgrade` keeps `Upgrade` and `Connection: upgrade`;
/// `streamed` keeps `Trailer`. Returns whether the message's `TE` accepted trailers.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool, streamed: bool) -> bool {
    // One pass of cheap name comparisons finds which are present (most messages carry none,
    // or only `Connection: keep-alive`), so that only those are looked up and removed.
    let present = headers
        .keys()
        .fold(0, |acc, name| acc | hop_by_hop_bit(name));
    if present == 0 && !upgrade {
        return false;
    }
    let te_trailers = present & HAS_TE != 0
        && headers
            .get_all(TE)
            .iter()
            .any(|v| has_token(v.as_bytes(), b"trailers"));
    if present & HAS_CONNECTION != 0 {
        // `keep-alive` and `close` are connection options, not fields to look up (a
        // `Keep-Alive` field goes below anyway): the usual `Connection` value costs nothing.
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .flat_map(|v| connection_named(v.as_bytes(), upgrade))
            .filter_map(|t| HeaderName::from_bytes(t).ok())
            .collect();
        for name in named {
            headers.remove(&name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        let bit = 1 << i;
        let keep = bit == HAS_UPGRADE && upgrade || bit == HAS_TRAILER && streamed;
        if present & bit != 0 && !keep {
            headers.remove(*name);
        }
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
    te_trailers
}

/// Readies client request headers for the upstream: hop-by-hop removed, the token stamped
/// (replacing whatever `Authorization` the client sent), `Host` set to the upstream's (or,
/// with `None`, removed: hyper-util's client sets it from the URI on HTTP/1.1, and on HTTP/2
/// the URI's authority goes as `:authority`, where a `Host` beside it is refused by nginx
/// before 1.29 as a duplicate), and our `Via` entry added if `via`. `HTTP2-Settings` never
/// goes on: it belongs to an `h2c` upgrade, which is never tunnelled.
pub fn prepare_request(
    headers: &mut HeaderMap,
    (token_header, token): (HeaderName, HeaderValue),
    host: Option<&HeaderValue>,
    upgrade: bool,
    streamed: bool,
    via: bool,
) {
    let te_trailers = strip_hop_by_hop(headers, upgrade, streamed);
    if te_trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
    headers.remove(&HTTP2_SETTINGS);
    headers.insert(token_header, token);
    match host {
        Some(host) => headers.insert(HOST, host.clone()),
        None => headers.remove(HOST),
    };
    if via {
        headers.append(http::header::VIA, via_entry().clone());
    }
}

static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Whether `name` (as sent) is `HTTP2-Settings`.
pub fn is_http2_settings(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"http2-settings")
}

/// Keeps of the request's `Upgrade` offer only the protocols in `allowed` (lowercase names,
/// with or without a version). Returns whether any is left: then the request is forwarded as
/// an upgrade offering those; otherwise as a plain request (its `Upgrade` is hop-by-hop and
/// goes). So an `h2c` upgrade, which Java's `HttpClient` and `curl --http2` offer on plain
/// `http://`, never turns the connection into a tunnel that carries requests without the token.
pub fn offer_allowed_upgrades(headers: &mut HeaderMap, allowed: &[String]) -> bool {
    let offered: Vec<String> = headers
        .get_all(UPGRADE)
        .iter()
        .flat_map(|v| tokens(v.as_bytes()))
        .filter_map(|t| std::str::from_utf8(t).ok())
        .filter(|t| is_allowed_upgrade(t.as_bytes(), allowed))
        .map(str::to_owned)
        .collect();
    if offered.is_empty() {
        return false;
    }
    match HeaderValue::from_str(&offered.join(", ")) {
        Ok(value) => {
            headers.insert(UPGRADE, value);
            true
        }
        Err(_) => false,
    }
}

/// Whether the protocol `token` (`name` or `name/version`, as in `Upgrade`) is in `allowed`.
pub fn is_allowed_upgrade(token: &[u8], allowed: &[String]) -> bool {
    let name = token.split(|b| *b == b'/').next().unwrap_or_default();
    allowed.iter().any(|a| {
        a.as_bytes().eq_ignore_ascii_case(token) || a.as_bytes().eq_ignore_ascii_case(name)
    })
}

/// Where a redirect from the upstream goes back to: its own origin and base path, seen from
/// the client (`client_host`, the `Host` or `:authority` the client used; without it, the
/// rewritten value is a path alone).
#[derive(Debug, Clone, Copy)]
pub struct Relocation<'a> {
    /// The route's upstream.
    pub upstream: &'a crate::config::Upstream,
    /// The authority the client addressed.
    pub client_host: Option<&'a [u8]>,
    /// The path prefix the client's path had that the upstream did not see (the route's
    /// `path_prefix`, cut), or `""`.
    pub client_prefix: &'a str,
}

impl Relocation<'_> {
    /// `value` (a `Location` or `Content-Location`) rewritten to the client's address, if it is
    /// an absolute URL under the upstream's origin and base path; as nginx's default
    /// `proxy_redirect` does. A value that names any other place is left as it is.
    pub fn rewrite(&self, value: &[u8]) -> Option<Vec<u8>> {
        let up = self.upstream;
        let scheme = up.scheme.as_str().as_bytes();
        let rest = strip_prefix_ignore_case(value, scheme)?.strip_prefix(b"://")?;
        let end = rest
            .iter()
            .position(|b| matches!(b, b'/' | b'?' | b'#'))
            .unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        let default_port: &[u8] = if scheme == b"https" { b":443" } else { b":80" };
        let norm = |a: &[u8]| -> Vec<u8> {
            let a = a.strip_suffix(default_port).unwrap_or(a);
            a.to_ascii_lowercase()
        };
        if norm(authority) != norm(up.authority.as_str().as_bytes()) {
            return None;
        }
        let under = path.strip_prefix(up.base_path.as_bytes())?;
        if !(under.is_empty() || matches!(under[0], b'/' | b'?' | b'#')) {
            return None;
        }
        let mut out = Vec::with_capacity(under.len() + 32);
        if let Some(host) = self.client_host {
            out.extend_from_slice(b"http://");
            out.extend_from_slice(host);
        }
        out.extend_from_slice(self.client_prefix.as_bytes());
        if !under.starts_with(b"/") && self.client_prefix.is_empty() {
            out.push(b'/');
        }
        out.extend_from_slice(under);
        Some(out)
    }

    /// [`rewrite`](Self::rewrite) on the `Location` and `Content-Location` of `headers`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in [http::header::LOCATION, http::header::CONTENT_LOCATION] {
            if let http::header::Entry::Occupied(mut entry) = headers.entry(name) {
                let new = self
                    .rewrite(entry.get().as_bytes())
                    .and_then(|v| HeaderValue::from_bytes(&v).ok());
                if let Some(new) = new {
                    entry.insert(new);
                }
            }
        }
    }
}

/// Whether `name` (as sent) is `Location` or `Content-Location`.
pub fn is_location(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"location") || name.eq_ignore_ascii_case(b"content-location")
}

fn strip_prefix_ignore_case<'a>(value: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    (value.len() >= prefix.len() && value[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &value[prefix.len()..])
}

/// The `Via` entry this process adds: a pseudonym unique to the process, so that a request
/// that comes back to the same process (a loop) is recognised, while a chain of distinct
/// token-proxies is not mistaken for one.
pub fn via_entry() -> &'static HeaderValue {
    static VIA: std::sync::OnceLock<HeaderValue> = std::sync::OnceLock::new();
    VIA.get_or_init(|| {
        let id = format!("1.1 token-proxy-{:08x}", fastrand::u32(..));
        HeaderValue::from_str(&id).expect("ASCII")
    })
}

/// Whether the request already went through this process (its `Via` names our pseudonym).
pub fn is_loop(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::VIA)
        .iter()
        .any(|v| names_us(v.as_bytes()))
}

/// Whether a `Via` value names this process's pseudonym.
pub fn names_us(via: &[u8]) -> bool {
    let ours = &via_entry().as_bytes()[4..];
    via.windows(ours.len()).any(|w| w == ours)
}

/// Whether `value` is `Bearer <expected>`, compared in constant time for equal lengths.
pub fn bearer_matches(value: Option<&HeaderValue>, expected: &[u8]) -> bool {
    bearer_bytes_match(value.map(HeaderValue::as_bytes), expected)
}

/// [`bearer_matches`] for a value as sent.
pub fn bearer_bytes_match(value: Option<&[u8]>, expected: &[u8]) -> bool {
    let Some(token) = value.and_then(|v| v.strip_prefix(b"Bearer ")) else {
        return false;
    };
    token.len() == expected.len()
        && token
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Readies upstream response headers for the client: hop-by-hop removed; a `Content-Length`
/// that came with `Transfer-Encoding` removed (the body is de-chunked and sent framed anew, so
/// that length is stale: RFC 9112 §6.3), and repeated equal ones made one, as the lean path
/// does.
pub fn prepare_response(headers: &mut HeaderMap, upgrade: bool, streamed: bool) {
    if headers.contains_key(TRANSFER_ENCODING) {
        headers.remove(http::header::CONTENT_LENGTH);
    } else if headers
        .get_all(http::header::CONTENT_LENGTH)
        .iter()
        .nth(1)
        .is_some()
        || headers
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes().contains(&b','))
    {
        // hyper's client took the values as one length (they were equal), or refused them.
        let length = headers
            .get_all(http::header::CONTENT_LENGTH)
            .iter()
            .try_fold(None, |seen, v| {
                super::codec::content_length(v.as_bytes(), seen)
            });
        if let Ok(Some(n)) = length {
            headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
        }
    }
    strip_hop_by_hop(headers, upgrade, streamed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::AUTHORIZATION;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn removes_hop_by_hop_and_connection_named_headers() {
        let mut h = map(&[
            ("connection", "close, X-Foo"),
            ("connection", "x-bar"),
            ("x-foo", "1"),
            ("x-bar", "2"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic abc"),
            ("te", "gzip"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-keep", "yes"),
        ]);
        prepare_request(
            &mut h,
            (AUTHORIZATION, HeaderValue::from_static("Bearer t")),
            Some(&HeaderValue::from_static("up:1")),
            false,
            false,
            true,
        );
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), 4, "{names:?}");
        assert_eq!(h["x-keep"], "yes");
        assert_eq!(h[AUTHORIZATION], "Bearer t");
        assert_eq!(h[HOST], "up:1");
    }

    /// The options `keep-alive` and `close` (and `upgrade` on an upgrade) are not field names
    /// to look up; empty list members are skipped; everything else is, in any case.
    #[test]
    fn connection_names_fields_besides_its_options() {
        let named = |v: &str, upgrade| -> Vec<String> {
            connection_named(v.as_bytes(), upgrade)
                .map(|t| String::from_utf8(t.to_vec()).unwrap())
                .collect()
        };
        let value = "Keep-Alive, ,close, X-Foo ,, Upgrade,CLOSE";
        assert_eq!(named(value, false), ["X-Foo", "Upgrade"]);
        assert_eq!(named(value, true), ["X-Foo"]);
        assert!(named("keep-alive", false).is_empty());
        assert!(named("", false).is_empty());
    }

    /// Each hop-by-hop field is found on its own too, not only among others: `TE: trailers`
    /// alone is reported, a `Connection` alone still removes what it names, and an upgrade
    /// always carries `Connection: upgrade`.
    #[test]
    fn a_lone_hop_by_hop_field_is_handled_as_among_others() {
        let mut h = map(&[("te", "trailers"), ("x-keep", "1")]);
        assert!(strip_hop_by_hop(&mut h, false, false), "TE: trailers seen");
        assert!(h.get(TE).is_none());

        let mut h = map(&[("connection", "X-Foo"), ("x-foo", "1"), ("x-keep", "1")]);
        assert!(!strip_hop_by_hop(&mut h, false, false));
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-keep"]);

        let mut h = map(&[("x-keep", "1")]);
        strip_hop_by_hop(&mut h, true, false);
        assert_eq!(h[CONNECTION], "upgrade");
        assert_eq!(h["x-keep"], "1");
    }

    #[test]
    fn client_authorization_is_replaced_not_duplicated() {
        let mut h = map(&[
            ("authorization", "Bearer client"),
            ("authorization", "Basic x"),
            ("host", "me"),
        ]);
        prepare_request(
            &mut h,
            (AUTHORIZATION, HeaderValue::from_static("Bearer ours")),
            Some(&HeaderValue::from_static("up")),
            false,
            false,
            true,
        );
        let auth: Vec<_> = h.get_all(AUTHORIZATION).iter().collect();
        assert_eq!(auth, vec!["Bearer ours"]);
        assert_eq!(h.get_all(HOST).iter().count(), 1);
    }

    #[test]
    fn upgrade_keeps_upgrade_headers_and_te_trailers_survives() {
        let mut h = map(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("te", "trailers, deflate"),
        ]);
        assert!(is_upgrade_request(&h));
        prepare_request(
            &mut h,
            (AUTHORIZATION, HeaderValue::from_static("Bearer t")),
            Some(&HeaderValue::from_static("up")),
            true,
            false,
            true,
        );
        assert_eq!(h[UPGRADE], "websocket");
        assert_eq!(h[CONNECTION], "upgrade");
        assert_eq!(h[TE], "trailers");
    }

    #[test]
    fn via_marks_our_requests_and_detects_loops() {
        let mut h = map(&[("via", "1.0 other-proxy")]);
        assert!(!is_loop(&h));
        prepare_request(
            &mut h,
            (AUTHORIZATION, HeaderValue::from_static("Bearer t")),
            Some(&HeaderValue::from_static("up")),
            false,
            false,
            true,
        );
        assert_eq!(h.get_all("via").iter().count(), 2);
        assert!(is_loop(&h));
    }

    #[test]
    fn inbound_bearer_is_compared_exactly() {
        let v = HeaderValue::from_static("Bearer 0123456789abcdef");
        assert!(bearer_matches(Some(&v), b"0123456789abcdef"));
        assert!(!bearer_matches(Some(&v), b"0123456789abcdeX"));
        assert!(!bearer_matches(Some(&v), b"0123456789abcde"));
        // Differences that cancel out when combined carelessly (each byte xor'ed into one
        // accumulator): every differing byte must count.
        assert!(!bearer_matches(Some(&v), b"1023456789abcdef"));
        assert!(!bearer_matches(Some(&v), b"0123456789abcdfe"));
        assert!(!bearer_matches(None, b"0123456789abcdef"));
        assert!(!bearer_matches(
            Some(&HeaderValue::from_static("Basic 0123456789abcdef")),
            b"0123456789abcdef"
        ));
    }

    #[test]
    fn only_allowed_upgrades_are_offered() {
        let allowed = vec!["websocket".to_string()];
        let mut h = map(&[("upgrade", "h2c, WebSocket/13"), ("connection", "upgrade")]);
        assert!(offer_allowed_upgrades(&mut h, &allowed));
        assert_eq!(h[UPGRADE], "WebSocket/13");
        let mut h = map(&[("upgrade", "h2c"), ("http2-settings", "AAA")]);
        assert!(!offer_allowed_upgrades(&mut h, &allowed));
        prepare_request(
            &mut h,
            (AUTHORIZATION, HeaderValue::from_static("Bearer t")),
            Some(&HeaderValue::from_static("up")),
            false,
            false,
            false,
        );
        assert!(h.get(UPGRADE).is_none() && h.get("http2-settings").is_none());
        assert!(h.get("via").is_none(), "no Via when the route says so");
    }

    #[test]
    fn redirects_under_the_upstreams_base_are_rewritten() {
        let config = crate::config::Config::parse(
            "[credentials.c]\ntoken_url=\"https://t/\"\nclient_id=\"i\"\nclient_secret=\"s\"\n\
             [[routes]]\nlisten=\"127.0.0.1:1\"\nupstream=\"https://api.example.cn/base\"\ncredential=\"c\"\n",
            "t.toml",
            &|_| None,
        )
        .unwrap();
        let upstream = &config.routes[0].upstream;
        let r = Relocation {
            upstream,
            client_host: Some(b"127.0.0.1:8080"),
            client_prefix: "",
        };
        let rw = |v: &str| {
            r.rewrite(v.as_bytes())
                .map(|v| String::from_utf8(v).unwrap())
        };
        let to = |s: &str| Some(s.to_string());
        assert_eq!(
            rw("https://api.example.cn/base/a?b=1"),
            to("http://127.0.0.1:8080/a?b=1")
        );
        assert_eq!(
            rw("HTTPS://API.example.cn:443/base"),
            to("http://127.0.0.1:8080/")
        );
        assert_eq!(
            rw("https://api.example.cn/base?x"),
            to("http://127.0.0.1:8080/?x")
        );
        assert_eq!(
            rw("https://api.example.cn/base#f"),
            to("http://127.0.0.1:8080/#f")
        );
        for kept in [
            "https://api.example.cn/basement",
            "https://api.example.cn/other",
            "http://api.example.cn/base/a",
            "https://api.example.cn:8443/base/a",
            "https://evil.example/base/a",
            "/base/a",
            "https://api.example.cn.evil/base/a",
        ] {
            assert_eq!(rw(kept), None, "{kept}");
        }
        let relative = Relocation {
            upstream,
            client_host: None,
            client_prefix: "",
        };
        assert_eq!(
            relative.rewrite(b"https://api.example.cn/base/a").unwrap(),
            b"/a"
        );
        // Under the prefix a route cut from the client's path.
        let prefixed = Relocation {
            client_prefix: "/items",
            ..r
        };
        let rw = |v: &str| {
            prefixed
                .rewrite(v.as_bytes())
                .map(|v| String::from_utf8(v).unwrap())
        };
        assert_eq!(
            rw("https://api.example.cn/base/a?b=1"),
            to("http://127.0.0.1:8080/items/a?b=1")
        );
        assert_eq!(
            rw("https://api.example.cn/base"),
            to("http://127.0.0.1:8080/items")
        );
        assert_eq!(
            rw("https://api.example.cn/base?x"),
            to("http://127.0.0.1:8080/items?x")
        );
    }

    #[test]
    fn a_stale_or_repeated_content_length_is_not_passed_on() {
        let mut h = map(&[("content-length", "99"), ("transfer-encoding", "chunked")]);
        prepare_response(&mut h, false, true);
        assert!(h.get("content-length").is_none() && h.get("transfer-encoding").is_none());
        let mut h = map(&[("content-length", "5"), ("content-length", "5, 5")]);
        prepare_response(&mut h, false, false);
        let all: Vec<_> = h.get_all("content-length").iter().collect();
        assert_eq!(all, ["5"]);
    }

    #[test]
    fn trailer_passes_only_on_streamed_bodies() {
        let mut h = map(&[("trailer", "x-sum")]);
        prepare_response(&mut h, false, true);
        assert_eq!(h[TRAILER], "x-sum");
        prepare_response(&mut h, false, false);
        assert!(h.get(TRAILER).is_none());
    }
}
