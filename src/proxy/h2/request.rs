//! A request head from an HTTP/2 client, decoded and judged: the first part of the front door's
//! HTTP/2 server (issue 15: h2c from clients through hyper's server costs about 39,400
//! instructions per GET, against 11,200 for an HTTP/1.1 client through the front door).
//!
//! The head comes out in the shape the front door's HTTP/1.1 side gives the service
//! (`service::FrontRequest`): names and values in one buffer, `codec::Field` ranges into it,
//! the target apart; so one service path serves both protocols. The pseudo-fields are kept
//! apart, and two things HTTP/1.1 needs are made here, as RFC 9113 §8.2.3 and §8.3.1 say an
//! intermediary to HTTP/1.1 must: the `cookie` crumbs joined into one field, and a `host`
//! field from `:authority` when the client sent none.
//!
//! Rules kept here (RFC 9113; a request that breaks one is malformed, §8.1.1, and its stream
//! is reset with `PROTOCOL_ERROR`, the connection serving on):
//! - names: lowercase tokens (§8.2, §8.2.1); values: no NUL, CR or LF, and no space or tab at
//!   either end (§8.2.1);
//! - no connection-specific field, and `te` only as `trailers` (§8.2.2);
//! - pseudo-fields: only `:method`, `:scheme`, `:authority` and `:path`, each at most once,
//!   all before the first regular field (§8.3); `:method`, `:scheme` and `:path` present,
//!   except for `CONNECT`, which has `:authority` and neither of the others (§8.3.1, §8.5);
//! - `:path`: an origin-form target without space, control or fragment, or `*` for
//!   `OPTIONS`; `:authority`: a host and port, without userinfo (§8.3.1);
//! - a `host` field, if sent, names the same authority as `:authority` (§8.3.1);
//! - `content-length`: digits, one value however often repeated (§8.1.1, as for HTTP/1.1);
//! - the whole list within the size we announce (`SETTINGS_MAX_HEADER_LIST_SIZE`, counted as
//!   §6.5.2 says: name, value and 32 bytes per field), else the request is refused as too
//!   large (`431`), the whole block decoded all the same.
//!
//! A block the decoder cannot read (HPACK, RFC 7541) breaks the connection's compression
//! state: that is a connection error (`COMPRESSION_ERROR`), returned apart.

use http::Method;

use super::hpack::{self, HpackError};
use crate::proxy::codec::{self, Field};

/// Why a request head is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// It breaks a rule of HTTP/2 (§8.1.1): the stream is reset.
    Malformed(&'static str),
    /// Its fields are over the announced list size: answered `431`.
    TooLarge,
}

/// A decoded request head. Its `Debug` shows neither names nor values: they hold the client's
/// credentials (`proxy-authorization`, `authorization`, cookies).
#[derive(Default)]
pub struct RequestHead {
    /// The fields' names and values, and the pseudo-fields' values, one after another.
    bytes: Vec<u8>,
    /// The regular fields, as the service reads them.
    fields: Vec<Field>,
    method: Option<Method>,
    path: Option<(usize, usize)>,
    authority: Option<(usize, usize)>,
    scheme: Option<(usize, usize)>,
    /// The valid `content-length`, if one was sent.
    pub length: Option<u64>,
    /// The client sent `te: trailers`.
    pub te_trailers: bool,
    /// The `host` among [`fields`](Self::fields) was made from `:authority`: the client sent
    /// none (a request built from the head, as hyper's server gives it, has none either).
    pub host_from_authority: bool,
    /// The cookie crumbs, joined; scratch space kept between heads.
    cookie: Vec<u8>,
}

/// A copy of exactly the head's size, without the scratch space.
impl Clone for RequestHead {
    fn clone(&self) -> RequestHead {
        RequestHead {
            bytes: self.bytes.clone(),
            fields: self.fields.clone(),
            method: self.method.clone(),
            path: self.path,
            authority: self.authority,
            scheme: self.scheme,
            length: self.length,
            te_trailers: self.te_trailers,
            host_from_authority: self.host_from_authority,
            cookie: Vec::new(),
        }
    }
}

impl std::fmt::Debug for RequestHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestHead")
            .field("method", &self.method)
            .field("fields", &self.fields.len())
            .field("length", &self.length)
            .finish_non_exhaustive()
    }
}

impl RequestHead {
    /// The method (present in every head [`decode`] accepts).
    pub fn method(&self) -> Option<&Method> {
        self.method.as_ref()
    }

    /// `:path`, the target as sent (absent for `CONNECT`).
    pub fn path(&self) -> Option<&[u8]> {
        self.path.map(|r| &self.bytes[r.0..r.1])
    }

    /// `:authority`, if sent.
    pub fn authority(&self) -> Option<&[u8]> {
        self.authority.map(|r| &self.bytes[r.0..r.1])
    }

    /// `:scheme` (absent for `CONNECT`).
    pub fn scheme(&self) -> Option<&[u8]> {
        self.scheme.map(|r| &self.bytes[r.0..r.1])
    }

    /// The buffer the [`fields`](Self::fields) ranges point into.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The regular fields, as ranges of [`bytes`](Self::bytes): the cookies joined into one,
    /// and `host` from `:authority` where the client sent none.
    pub fn fields(&self) -> &[Field] {
        &self.fields
    }

    /// The regular fields: name and value.
    pub fn pairs(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields.iter().map(|f| {
            (
                &self.bytes[f.name.0..f.name.1],
                &self.bytes[f.value.0..f.value.1],
            )
        })
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.fields.clear();
        self.method = None;
        self.path = None;
        self.authority = None;
        self.scheme = None;
        self.length = None;
        self.te_trailers = false;
        self.host_from_authority = false;
        self.cookie.clear();
    }

    fn push(&mut self, s: &[u8]) -> (usize, usize) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(s);
        (start, self.bytes.len())
    }

    fn push_field(&mut self, name: &[u8], value: &[u8]) {
        let name = self.push(name);
        let value = self.push(value);
        self.fields.push(Field { name, value });
    }
}

/// Decodes the whole header block `block` of a request into `head` (its buffers reused),
/// judging it by the rules above against a list size of `max_list` bytes. The outer error is
/// the connection's; the inner one the request's.
pub fn decode(
    decoder: &mut hpack::Decoder,
    block: &[u8],
    max_list: usize,
    head: &mut RequestHead,
) -> Result<Result<(), Refused>, HpackError> {
    head.clear();
    let mut check = Check {
        head,
        max_list,
        size: 0,
        regular: false,
        host: None,
        refused: None,
    };
    decoder.decode(block, |name, value| check.field(name, value))?;
    check.finish();
    Ok(match check.refused {
        Some(why) => Err(why),
        None => Ok(()),
    })
}

/// Decodes a request's trailer section (a header block that ends the stream): regular fields
/// only, by the same rules as a head's; a `te`, `host` or `content-length` among them is
/// refused too (RFC 9110 §6.5.1: fields that frame or route the message are not trailers).
pub fn decode_trailers(
    decoder: &mut hpack::Decoder,
    block: &[u8],
    max_list: usize,
) -> Result<Result<http::HeaderMap, Refused>, HpackError> {
    let mut fields = http::HeaderMap::new();
    let mut size = 0;
    let mut refused = None;
    decoder.decode(block, |name, value| {
        size += name.len() + value.len() + 32;
        if size > max_list {
            refused.get_or_insert(Refused::TooLarge);
        }
        if refused.is_some() {
            return;
        }
        let why = if name.starts_with(b":") {
            Some("a pseudo-field in trailers")
        } else if name.is_empty() || !name.iter().all(|b| is_lower_tchar(*b)) {
            Some("a field name that is not a lowercase token")
        } else if value.iter().any(|b| matches!(b, b'\0' | b'\r' | b'\n'))
            || matches!(value.first(), Some(b' ' | b'\t'))
            || matches!(value.last(), Some(b' ' | b'\t'))
        {
            Some("an invalid field value")
        } else if matches!(
            name,
            b"connection"
                | b"keep-alive"
                | b"proxy-connection"
                | b"transfer-encoding"
                | b"upgrade"
                | b"te"
                | b"host"
                | b"content-length"
        ) {
            Some("a field that may not be a trailer")
        } else {
            None
        };
        if let Some(why) = why {
            refused = Some(Refused::Malformed(why));
            return;
        }
        match (
            http::HeaderName::from_bytes(name),
            http::HeaderValue::from_bytes(value),
        ) {
            (Ok(n), Ok(v)) => {
                fields.append(n, v);
            }
            _ => refused = Some(Refused::Malformed("an invalid trailer field")),
        }
    })?;
    Ok(match refused {
        Some(why) => Err(why),
        None => Ok(fields),
    })
}

/// The judging of one head as its fields arrive.
struct Check<'h> {
    head: &'h mut RequestHead,
    max_list: usize,
    /// The list's size so far, counted as §6.5.2 does.
    size: usize,
    /// A regular field has come: no pseudo-field may follow.
    regular: bool,
    /// Where the `host` field's value is.
    host: Option<(usize, usize)>,
    /// The first reason to refuse the head.
    refused: Option<Refused>,
}

impl Check<'_> {
    fn field(&mut self, name: &[u8], value: &[u8]) {
        self.size += name.len() + value.len() + 32;
        if self.size > self.max_list {
            self.refused.get_or_insert(Refused::TooLarge);
        }
        if self.refused.is_some() {
            return;
        }
        if value.iter().any(|b| matches!(b, b'\0' | b'\r' | b'\n')) {
            return self.malformed("a field value holds NUL, CR or LF");
        }
        if matches!(value.first(), Some(b' ' | b'\t')) || matches!(value.last(), Some(b' ' | b'\t'))
        {
            return self.malformed("a field value starts or ends with a space or a tab");
        }
        if let Some(pseudo) = name.strip_prefix(b":") {
            return self.pseudo(pseudo, value);
        }
        self.regular = true;
        if name.is_empty() || !name.iter().all(|b| is_lower_tchar(*b)) {
            return self.malformed("a field name that is not a lowercase token");
        }
        match name {
            b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding"
            | b"upgrade" => self.malformed("a connection-specific field"),
            b"te" if !value.eq_ignore_ascii_case(b"trailers") => {
                self.malformed("te other than trailers")
            }
            b"te" => {
                self.head.te_trailers = true;
                self.head.push_field(name, value);
            }
            b"content-length" => match codec::content_length(value, self.head.length) {
                Ok(n) => {
                    self.head.length = n;
                    self.head.push_field(name, value);
                }
                Err(why) => self.malformed(why),
            },
            // Crumbs are joined into one field at the end (§8.2.3).
            b"cookie" => {
                if !self.head.cookie.is_empty() {
                    self.head.cookie.extend_from_slice(b"; ");
                }
                self.head.cookie.extend_from_slice(value);
            }
            b"host" if self.host.is_some() => self.malformed("more than one host field"),
            b"host" => {
                self.head.push_field(name, value);
                self.host = self.head.fields.last().map(|f| f.value);
            }
            _ => self.head.push_field(name, value),
        }
    }

    fn pseudo(&mut self, pseudo: &[u8], value: &[u8]) {
        if self.regular {
            return self.malformed("a pseudo-field after a regular field");
        }
        let head = &mut *self.head;
        let slot = match pseudo {
            b"method" => {
                if head.method.is_some() {
                    return self.malformed("a repeated pseudo-field");
                }
                match Method::from_bytes(value) {
                    Ok(m) => head.method = Some(m),
                    Err(_) => self.malformed("an invalid :method"),
                }
                return;
            }
            b"path" => &mut head.path,
            b"authority" => &mut head.authority,
            b"scheme" => &mut head.scheme,
            _ => return self.malformed("a pseudo-field a request does not have"),
        };
        if slot.is_some() {
            return self.malformed("a repeated pseudo-field");
        }
        let start = head.bytes.len();
        head.bytes.extend_from_slice(value);
        *slot = Some((start, head.bytes.len()));
        let valid = match pseudo {
            b"path" => value == b"*" || plain_path(value),
            b"authority" => authority(value),
            _ => !value.is_empty() && value.iter().all(|b| is_scheme_char(*b)),
        };
        if !valid {
            self.malformed(match pseudo {
                b"path" => "an invalid :path",
                b"authority" => "an invalid :authority",
                _ => "an invalid :scheme",
            });
        }
    }

    /// What can only be judged once every field is in.
    fn finish(&mut self) {
        if self.refused.is_some() {
            return;
        }
        let head = &mut *self.head;
        let connect = head.method.as_ref() == Some(&Method::CONNECT);
        let why = if head.method.is_none() {
            Some("no :method")
        } else if connect && head.authority.is_none() {
            Some("CONNECT without :authority")
        } else if connect && (head.scheme.is_some() || head.path.is_some()) {
            Some("CONNECT with :scheme or :path")
        } else if !connect && (head.scheme.is_none() || head.path.is_none()) {
            Some("no :scheme or no :path")
        } else if head.method.as_ref() != Some(&Method::OPTIONS) && head.path() == Some(b"*") {
            Some(":path * on a method other than OPTIONS")
        } else {
            None
        };
        if let Some(why) = why {
            return self.malformed(why);
        }
        match (self.host, head.authority) {
            (Some(host), Some(authority)) => {
                let (host, authority) = (
                    &head.bytes[host.0..host.1],
                    &head.bytes[authority.0..authority.1],
                );
                if !host.eq_ignore_ascii_case(authority) {
                    return self.malformed("a host field that differs from :authority");
                }
            }
            (None, Some(authority)) => {
                let name = head.push(b"host");
                let start = head.bytes.len();
                head.bytes.extend_from_within(authority.0..authority.1);
                let value = (start, head.bytes.len());
                head.fields.push(Field { name, value });
                head.host_from_authority = true;
            }
            _ => {}
        }
        if !head.cookie.is_empty() {
            let cookie = std::mem::take(&mut head.cookie);
            head.push_field(b"cookie", &cookie);
            head.cookie = cookie;
        }
    }

    fn malformed(&mut self, why: &'static str) {
        self.refused.get_or_insert(Refused::Malformed(why));
    }
}

fn is_lower_tchar(b: u8) -> bool {
    matches!(b,
        b'a'..=b'z' | b'0'..=b'9' | b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-'
        | b'.' | b'^' | b'_' | b'`' | b'|' | b'~')
}

/// `scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )` (RFC 3986 §3.1), loosely.
fn is_scheme_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')
}

/// An origin-form target the front door forwards byte for byte: a `/`, then no space,
/// control or fragment. Bytes above ASCII pass, as hyper's HTTP/2 server lets them (clients
/// that send UTF-8 unencoded reach the upstream today; refusing them would break them).
fn plain_path(path: &[u8]) -> bool {
    path.first() == Some(&b'/')
        && path
            .iter()
            .all(|b| *b >= 0x80 || ((0x21..=0x7e).contains(b) && *b != b'#'))
}

/// `host [ ":" port ]` of RFC 3986 §3.2.2: a reg-name, an IPv4 address or an IP literal in
/// brackets, no userinfo.
fn authority(value: &[u8]) -> bool {
    !value.is_empty()
        && value.iter().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'%'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                        | b':'
                        | b'['
                        | b']'
                )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::h2::hpack::encode;

    /// The block for `fields`, every one a literal without indexing.
    fn block(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, v) in fields {
            encode::field(&mut out, n.as_bytes(), v.as_bytes(), false);
        }
        out
    }

    fn judge(fields: &[(&str, &str)]) -> (Result<(), Refused>, RequestHead) {
        let mut head = RequestHead::default();
        let verdict = decode(
            &mut hpack::Decoder::default(),
            &block(fields),
            16 * 1024,
            &mut head,
        )
        .expect("a readable block");
        (verdict, head)
    }

    const GET: [(&str, &str); 4] = [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "localhost:8080"),
        (":path", "/v1/items?a=1"),
    ];

    fn with<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        GET.iter().chain(extra).copied().collect()
    }

    fn refused(fields: &[(&str, &str)]) -> &'static str {
        match judge(fields).0 {
            Err(Refused::Malformed(why)) => why,
            other => panic!("{fields:?} was not refused as malformed: {other:?}"),
        }
    }

    #[test]
    fn a_get_comes_out_as_the_http11_side_reads_it() {
        let (verdict, head) = judge(&with(&[("accept", "*/*"), ("x-a", "1")]));
        assert_eq!(verdict, Ok(()));
        assert_eq!(head.method(), Some(&Method::GET));
        assert_eq!(head.path(), Some(&b"/v1/items?a=1"[..]));
        assert_eq!(head.scheme(), Some(&b"http"[..]));
        let pairs: Vec<(&[u8], &[u8])> = head.pairs().collect();
        assert_eq!(
            pairs,
            [
                (&b"accept"[..], &b"*/*"[..]),
                (b"x-a", b"1"),
                // From :authority: the client sent no host.
                (b"host", b"localhost:8080"),
            ]
        );
        assert_eq!(head.length, None);
        assert!(!head.te_trailers);
    }

    #[test]
    fn cookie_crumbs_are_joined_into_one_field() {
        let (verdict, head) = judge(&with(&[("cookie", "a=1"), ("x", "y"), ("cookie", "b=2")]));
        assert_eq!(verdict, Ok(()));
        let cookies: Vec<&[u8]> = head
            .pairs()
            .filter(|(n, _)| *n == b"cookie")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(cookies, [&b"a=1; b=2"[..]]);
    }

    #[test]
    fn a_host_field_is_kept_when_it_names_the_authority() {
        let (verdict, head) = judge(&with(&[("host", "LOCALHOST:8080")]));
        assert_eq!(verdict, Ok(()));
        let hosts: Vec<&[u8]> = head
            .pairs()
            .filter(|(n, _)| *n == b"host")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(hosts, [&b"LOCALHOST:8080"[..]]);
        assert_eq!(
            refused(&with(&[("host", "other.example")])),
            "a host field that differs from :authority"
        );
        assert_eq!(
            refused(&with(&[
                ("host", "localhost:8080"),
                ("host", "localhost:8080")
            ])),
            "more than one host field"
        );
    }

    #[test]
    fn te_trailers_and_content_length_are_read() {
        let (verdict, head) = judge(&with(&[
            ("te", "trailers"),
            ("content-length", "5"),
            ("content-length", "5"),
        ]));
        assert_eq!(verdict, Ok(()));
        assert!(head.te_trailers);
        assert_eq!(head.length, Some(5));
        assert_eq!(refused(&with(&[("te", "gzip")])), "te other than trailers");
        assert_eq!(
            refused(&with(&[("content-length", "5"), ("content-length", "6")])),
            "Content-Length values conflict"
        );
        assert_eq!(
            refused(&with(&[("content-length", "-1")])),
            "Content-Length is not a number"
        );
    }

    #[test]
    fn names_and_values_break_no_rule() {
        for (fields, why) in [
            (
                with(&[("X-Upper", "1")]),
                "a field name that is not a lowercase token",
            ),
            (
                with(&[("x y", "1")]),
                "a field name that is not a lowercase token",
            ),
            (
                with(&[("", "1")]),
                "a field name that is not a lowercase token",
            ),
            (
                with(&[("x", "a\r\nb: c")]),
                "a field value holds NUL, CR or LF",
            ),
            (with(&[("x", "a\0b")]), "a field value holds NUL, CR or LF"),
            (
                with(&[("x", " a")]),
                "a field value starts or ends with a space or a tab",
            ),
            (
                with(&[("x", "a\t")]),
                "a field value starts or ends with a space or a tab",
            ),
            (
                with(&[("connection", "close")]),
                "a connection-specific field",
            ),
            (with(&[("keep-alive", "5")]), "a connection-specific field"),
            (
                with(&[("proxy-connection", "x")]),
                "a connection-specific field",
            ),
            (
                with(&[("transfer-encoding", "chunked")]),
                "a connection-specific field",
            ),
            (with(&[("upgrade", "h2c")]), "a connection-specific field"),
        ] {
            assert_eq!(refused(&fields), why, "{fields:?}");
        }
        // An empty value is a value.
        assert_eq!(judge(&with(&[("x", "")])).0, Ok(()));
    }

    #[test]
    fn pseudo_fields_break_no_rule() {
        let get =
            |path: &'static str| vec![(":method", "GET"), (":scheme", "https"), (":path", path)];
        for (fields, why) in [
            (
                with(&[(":status", "200")]),
                "a pseudo-field a request does not have",
            ),
            (
                vec![
                    (":method", "GET"),
                    (":status", "200"),
                    (":scheme", "https"),
                    (":path", "/"),
                ],
                "a pseudo-field a request does not have",
            ),
            (
                vec![
                    (":method", "GET"),
                    (":protocol", "websocket"),
                    (":scheme", "https"),
                    (":path", "/"),
                ],
                "a pseudo-field a request does not have",
            ),
            (
                vec![
                    (":method", "GET"),
                    ("x", "1"),
                    (":scheme", "https"),
                    (":path", "/"),
                ],
                "a pseudo-field after a regular field",
            ),
            (
                vec![
                    (":method", "GET"),
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":path", "/"),
                ],
                "a repeated pseudo-field",
            ),
            (
                vec![
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":path", "/"),
                    (":path", "/"),
                ],
                "a repeated pseudo-field",
            ),
            (vec![(":scheme", "https"), (":path", "/")], "no :method"),
            (
                vec![(":method", "GET"), (":path", "/")],
                "no :scheme or no :path",
            ),
            (
                vec![(":method", "GET"), (":scheme", "https")],
                "no :scheme or no :path",
            ),
            (
                vec![(":method", "G T"), (":scheme", "https"), (":path", "/")],
                "an invalid :method",
            ),
            (get(""), "an invalid :path"),
            (get("v1"), "an invalid :path"),
            (get("/a b"), "an invalid :path"),
            (get("/a#frag"), "an invalid :path"),
            (get("/a\x7fb"), "an invalid :path"),
            (get("*"), ":path * on a method other than OPTIONS"),
            (
                vec![(":method", "GET"), (":scheme", "ht tp"), (":path", "/")],
                "an invalid :scheme",
            ),
            (
                vec![
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":authority", "user@host"),
                    (":path", "/"),
                ],
                "an invalid :authority",
            ),
            (
                vec![
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":authority", ""),
                    (":path", "/"),
                ],
                "an invalid :authority",
            ),
            (vec![(":method", "CONNECT")], "CONNECT without :authority"),
            (
                vec![
                    (":method", "CONNECT"),
                    (":authority", "h:443"),
                    (":path", "/"),
                ],
                "CONNECT with :scheme or :path",
            ),
        ] {
            assert_eq!(refused(&fields), why, "{fields:?}");
        }
        // Bytes above ASCII pass, as through hyper.
        assert_eq!(judge(&get("/caf\u{e9}")).0, Ok(()));
        let options = [(":method", "OPTIONS"), (":scheme", "https"), (":path", "*")];
        assert_eq!(judge(&options).0, Ok(()));
        let connect = [(":method", "CONNECT"), (":authority", "[::1]:443")];
        let (verdict, head) = judge(&connect);
        assert_eq!(verdict, Ok(()));
        assert_eq!((head.path(), head.scheme()), (None, None));
        // No :authority and no host: valid, and no host is made up.
        let (verdict, head) = judge(&get("/"));
        assert_eq!(verdict, Ok(()));
        assert_eq!(head.pairs().count(), 0);
    }

    #[test]
    fn a_list_over_the_announced_size_is_too_large_and_decoded_whole() {
        let big = "v".repeat(1000);
        let fields = with(&[("x-big", big.as_str())]);
        let size: usize = fields.iter().map(|(n, v)| n.len() + v.len() + 32).sum();
        let mut decoder = hpack::Decoder::default();
        let mut head = RequestHead::default();
        // At the limit exactly: accepted; one byte under it: refused.
        let at = decode(&mut decoder, &block(&fields), size, &mut head).unwrap();
        assert_eq!(at, Ok(()));
        let under = decode(&mut decoder, &block(&fields), size - 1, &mut head).unwrap();
        assert_eq!(under, Err(Refused::TooLarge));
        // A refused head still updates the dynamic table: the next block can refer to it.
        let mut incremental = vec![0x40];
        incremental.push(5);
        incremental.extend_from_slice(b"x-tab");
        incremental.push(1);
        incremental.push(b'1');
        let mut first = block(&fields);
        first.extend_from_slice(&incremental);
        let refused = decode(&mut decoder, &first, 64, &mut head).unwrap();
        assert_eq!(refused, Err(Refused::TooLarge));
        assert_eq!(decoder.entries(), 1);
    }

    #[test]
    fn an_unreadable_block_is_the_connections_error() {
        let mut head = RequestHead::default();
        // Index 0 is never valid (RFC 7541 §6.1).
        let broken = decode(
            &mut hpack::Decoder::default(),
            &[0x80],
            16 * 1024,
            &mut head,
        );
        assert!(broken.is_err());
    }

    #[test]
    fn debug_shows_no_name_or_value() {
        let (_, head) = judge(&with(&[("proxy-authorization", "Bearer inbound-secret-1")]));
        let shown = format!("{head:?}");
        assert!(!shown.contains("inbound-secret-1"), "{shown}");
        assert!(
            shown.starts_with("RequestHead { method: Some(GET), fields: 2"),
            "{shown}"
        );
        assert!(!shown.contains("localhost"), "{shown}");
    }
}
