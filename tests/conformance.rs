//! The conformance corpus: published request-smuggling and framing cases sent over real sockets
//! through the proxy to a raw fake upstream, each with its verdict and the bytes the upstream
//! must (or must not) receive.
//!
//! The families come from the public corpora, rewritten here as data (none of their code):
//! - http-garden (narfindustries/http-garden, `TROPHIES.md`): the server and transducer bugs it
//!   found, each payload adapted to a case;
//! - defparam/smuggler (`configs/default.py`, `exhaustive.py`, `doubles.py`): its
//!   Transfer-Encoding mutations, the named ones and the byte-at-a-position ones;
//! - PortSwigger's HTTP desync research and Web Security Academy: CL.TE, TE.CL and the TE.TE
//!   obfuscations;
//! - T-Reqs (bahruzjabiyev/t-reqs, its request-line, header and body grammars): mutations of
//!   the request line's parts, of header names and values and of chunk syntax.
//!
//! Every request case runs twice (R10): as written, and with a bodiless `GET` turned into a
//! `POST` (with `Content-Length: 0` unless the case is about framing), which takes the proxy's
//! other (hyper) path; both must get the same verdict. Response cases have the fake upstream
//! answer badly to a `GET`. All cases of a kind run concurrently, each on its own route and its
//! own upstream, so one case cannot disturb another.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{credential, route, start_proxy, start_token_endpoint};
use token_proxy::app::Running;
use token_proxy::demo::{self, DemoServer, IdpState, IssuedTokens};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// How long a client waits for an answer.
const ANSWER: Duration = Duration::from_secs(3);
/// How long a client waits for the proxy to close after an answer that must close.
const CLOSE: Duration = Duration::from_millis(1500);
/// How long a client's write may take (the proxy may stop reading a refused request).
const WRITE: Duration = Duration::from_secs(1);
/// How long the fake upstream waits for more of a request before it gives up on it.
const UPSTREAM_IDLE: Duration = Duration::from_secs(10);
/// Cases run at once, each on its own route.
const BATCH: usize = 160;
/// Written on a connection that must stay open, after the case's answers.
const SENTINEL: &[u8] = b"GET /__end HTTP/1.1\r\nHost: h\r\n\r\n";
const SENTINEL_TARGET: &str = "/base/__end";

// ---------------------------------------------------------------------------------------------
// What a case expects
// ---------------------------------------------------------------------------------------------

/// How a request's body crossed the wire to the upstream.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    /// No body: neither `Transfer-Encoding` nor a `Content-Length` other than 0.
    Empty,
    /// Exactly one `content-length` of this value, no `transfer-encoding`.
    Length(u64),
    /// `transfer-encoding: chunked` (re-encoded: its chunk boundaries may differ).
    Chunked,
}

/// A check on a header field of a forwarded request.
#[derive(Debug, Clone)]
enum Field {
    /// Exactly one field of this name (lowercase), with exactly this value.
    Is(&'static str, Vec<u8>),
    /// These values in this order, one field each.
    All(&'static str, Vec<Vec<u8>>),
    /// No field of this name.
    Absent(&'static str),
}

/// One request the upstream must receive.
#[derive(Debug, Clone)]
struct Sent {
    method: &'static str,
    /// The target as the upstream must see it (under `/base`).
    target: String,
    body: Vec<u8>,
    framing: Framing,
    fields: Vec<Field>,
    /// A WebSocket upgrade: `upgrade: websocket` and `connection: upgrade` pass.
    upgrade: bool,
}

impl Sent {
    fn new(method: &'static str, target: &str) -> Sent {
        Sent {
            method,
            target: format!("/base{target}"),
            body: Vec::new(),
            framing: Framing::Empty,
            fields: Vec::new(),
            upgrade: false,
        }
    }
    fn length(mut self, body: &[u8]) -> Sent {
        self.framing = if body.is_empty() {
            Framing::Empty
        } else {
            Framing::Length(body.len() as u64)
        };
        self.body = body.to_vec();
        self
    }
    fn chunked(mut self, body: &[u8]) -> Sent {
        self.framing = Framing::Chunked;
        self.body = body.to_vec();
        self
    }
    fn field(mut self, check: Field) -> Sent {
        self.fields.push(check);
        self
    }
    fn upgrade(mut self) -> Sent {
        self.upgrade = true;
        self
    }
}

fn get(target: &str) -> Sent {
    Sent::new("GET", target)
}

/// What follows the forwarded requests' answers on the client's connection.
#[derive(Debug, Clone)]
enum Then {
    /// The connection stays open: a further request on it is answered.
    Open,
    /// The proxy closes the connection, with nothing more.
    Closed,
    /// An error of the proxy's own (a JSON body with this `error`, or any when `None`); with
    /// `close`, then the connection closes. A refusal of a head that parsed and framed (no
    /// Host, a target that is not origin-form) may keep the connection.
    Refused {
        status: u16,
        code: Option<&'static str>,
        close: bool,
    },
    /// Not looked at (an HTTP/1.0 exchange may close or not).
    Any,
}

#[derive(Debug, Clone)]
struct Expect {
    /// The requests the upstream receives, in order, each answered to the client in order.
    forwarded: Vec<Sent>,
    then: Then,
    /// The upstream may have seen the start of a request it never got whole (a chunked body
    /// found broken after it began to stream). Never a whole one.
    partial_ok: bool,
}

impl Expect {
    fn then(mut self, then: Then) -> Expect {
        self.then = then;
        self
    }
    fn partial_ok(mut self) -> Expect {
        self.partial_ok = true;
        self
    }
}

fn fwd(forwarded: Vec<Sent>) -> Expect {
    Expect {
        forwarded,
        then: Then::Open,
        partial_ok: false,
    }
}

fn refused(status: u16, code: Option<&'static str>) -> Expect {
    Expect {
        forwarded: Vec::new(),
        then: Then::Refused {
            status,
            code,
            close: true,
        },
        partial_ok: false,
    }
}

/// 400 `bad_request`, closed, nothing upstream.
fn bad() -> Expect {
    refused(400, Some("bad_request"))
}

/// As `Then` after forwarded requests: a 400 for a head that parsed (R6, R7).
const BAD_HEAD: Then = Then::Refused {
    status: 400,
    code: Some("bad_request"),
    close: false,
};

/// 400 `bad_request` and nothing upstream, for a head that parsed but is refused (R6, R7):
/// the connection may stay open.
fn bad_head() -> Expect {
    fwd(Vec::new()).then(BAD_HEAD)
}

/// 501 `not_implemented`, closed, nothing upstream.
fn not_implemented() -> Expect {
    refused(501, Some("not_implemented"))
}

/// 431 with a JSON body, closed, nothing upstream.
fn too_large() -> Expect {
    refused(431, None)
}

#[derive(Debug, Clone)]
struct Case {
    family: &'static str,
    name: String,
    request: Vec<u8>,
    expect: Expect,
    /// Bytes written after the forwarded answers were read.
    followup: Option<Vec<u8>>,
    /// Whether the second (hyper-path) form is made from this one.
    alt: bool,
}

fn case(family: &'static str, name: impl Into<String>, request: Vec<u8>, expect: Expect) -> Case {
    Case {
        family,
        name: name.into(),
        request,
        expect,
        followup: None,
        alt: true,
    }
}

impl Case {
    fn no_alt(mut self) -> Case {
        self.alt = false;
        self
    }
    fn followup(mut self, bytes: &[u8]) -> Case {
        self.followup = Some(bytes.to_vec());
        self
    }
}

/// One case in one form, as run.
#[derive(Debug, Clone)]
struct Run {
    family: &'static str,
    name: String,
    form: &'static str,
    request: Vec<u8>,
    expect: Expect,
    followup: Option<Vec<u8>>,
}

/// R10: a case whose first request is a `GET`, as a `POST` (plus `Content-Length: 0` where
/// the case carries no framing field), which the proxy serves on its hyper path.
fn second_form(case: &Case) -> Option<Run> {
    if !case.alt || !case.request.starts_with(b"GET ") {
        return None;
    }
    let lower = case.request.to_ascii_lowercase();
    let framed =
        find(&lower, b"content-length").is_some() || find(&lower, b"transfer-encoding").is_some();
    let mut request = b"POST ".to_vec();
    let rest = &case.request[4..];
    match (framed, rest.iter().position(|b| *b == b'\n')) {
        (false, Some(eol)) => {
            request.extend_from_slice(&rest[..=eol]);
            request.extend_from_slice(b"Content-Length: 0\r\n");
            request.extend_from_slice(&rest[eol + 1..]);
        }
        _ => request.extend_from_slice(rest),
    }
    let mut expect = case.expect.clone();
    if let Some(first) = expect.forwarded.first_mut() {
        first.method = "POST";
        // hyper's path cannot carry what the `http` crate refuses in a target: those bytes
        // go percent-encoded (the front door forwards bodiless requests byte for byte).
        first.target = hyper_target(&first.target);
    }
    Some(Run {
        family: case.family,
        name: case.name.clone(),
        form: if framed { "as POST" } else { "as POST, CL 0" },
        request,
        expect,
        followup: case.followup.clone(),
    })
}

/// `target` as the hyper path forwards it: `<`, `>` and a backtick in the path, and `"`, `<`,
/// `>` in the query, percent-encoded.
fn hyper_target(target: &str) -> String {
    let query = target.find('?').unwrap_or(target.len());
    target
        .char_indices()
        .map(|(i, c)| match c {
            '<' | '>' => format!("%{:02X}", c as u8),
            '`' if i < query => "%60".into(),
            '"' if i > query => "%22".into(),
            c => c.to_string(),
        })
        .collect()
}

fn runs(cases: &[Case]) -> Vec<Run> {
    let mut runs = Vec::new();
    for c in cases {
        runs.push(Run {
            family: c.family,
            name: c.name.clone(),
            form: "as sent",
            request: c.request.clone(),
            expect: c.expect.clone(),
            followup: c.followup.clone(),
        });
        runs.extend(second_form(c));
    }
    runs
}

// ---------------------------------------------------------------------------------------------
// The request corpus, by family
// ---------------------------------------------------------------------------------------------

/// A body that a Content-Length reader takes whole and a chunked reader takes as an empty
/// body followed by a second request (the classic CL.TE probe).
const SMUGGLE: &[u8] = b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n";
/// Pipelined after a request whose framing is under test: answered only if that request's
/// body ended where it should.
const NEXT: &[u8] = b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n";

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn hex(b: u8) -> String {
    format!("{b:02x}")
}

/// R1. PortSwigger CL.TE / TE.CL (both headers, either order) and T-Reqs'
/// `<entity-size-header>` orderings; http-garden transducer bugs 15, 18 and 23.
fn cl_te() -> Vec<Case> {
    const F: &str = "cl-te";
    let mut cases = Vec::new();
    let full = SMUGGLE.len().to_string();
    let te_values: [&[u8]; 6] = [
        b"chunked",
        b"CHUNKED",
        b"\tchunked ",
        b"gzip, chunked",
        b"identity",
        b"xchunked",
    ];
    for method in ["POST", "GET"] {
        for cl_first in [true, false] {
            for cl in ["0", "6", full.as_str()] {
                for te in te_values {
                    let cl_line = format!("Content-Length: {cl}\r\n").into_bytes();
                    let te_line = cat(&[b"Transfer-Encoding: ", te, b"\r\n"]);
                    let (a, b) = if cl_first {
                        (&cl_line, &te_line)
                    } else {
                        (&te_line, &cl_line)
                    };
                    let request = cat(&[
                        method.as_bytes(),
                        b" /clte HTTP/1.1\r\nHost: h\r\n",
                        a,
                        b,
                        b"\r\n",
                        SMUGGLE,
                    ]);
                    let order = if cl_first { "CL.TE" } else { "TE.CL" };
                    let name = format!(
                        "{method} {order} cl={cl} te={}",
                        String::from_utf8_lossy(te).escape_debug()
                    );
                    cases.push(case(F, name, request, bad()));
                }
            }
        }
    }
    for name in [
        "transfer-encoding",
        "TRANSFER-ENCODING",
        "TrAnSfEr-EnCoDiNg",
    ] {
        for cl_first in [true, false] {
            let te = format!("{name}: chunked\r\n");
            let cl = "Content-Length: 6\r\n".to_string();
            let lines = if cl_first { cl + &te } else { te + &cl };
            let request = format!("POST /clte HTTP/1.1\r\nHost: h\r\n{lines}\r\n0\r\n\r\nG");
            cases.push(case(
                F,
                format!("name {name} cl_first={cl_first}"),
                request.into_bytes(),
                bad(),
            ));
        }
    }
    let extra: [(&str, &[u8]); 6] = [
        (
            "garden transducer 23: CL 5 then TE chunked",
            b"POST /clte HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "garden transducer 18: TE ,chunked with CL",
            b"GET /clte HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: ,chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        ),
        (
            "garden transducer 15: TE ,chunked, CL, Connection: close",
            b"GET /clte HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: ,chunked\r\nContent-Length: 5\r\nConnection: close\r\n\r\n0\r\n\r\n",
        ),
        (
            "HTTP/1.0 with CL and TE",
            b"POST /clte HTTP/1.0\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "CL between two TE lines",
            b"POST /clte HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
        ),
        (
            "TE.CL: chunk holds a whole request, CL 4",
            b"POST /clte HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n5c\r\nGPOST / HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 15\r\n\r\nx=1\r\n0\r\n\r\n",
        ),
    ];
    for (name, request) in extra {
        cases.push(case(F, name, request.to_vec(), bad()));
    }
    cases
}

/// A byte's class, for the verdicts of smuggler's byte-at-a-position mutations.
#[derive(Clone, Copy, PartialEq)]
enum Class {
    /// SP or HTAB: optional whitespace in a value, invalid in a name.
    Ws,
    Lf,
    Cr,
    /// Other controls (and DEL): invalid everywhere.
    Ctl,
    /// 0x80 and up: obs-text, valid in a value, invalid in a name.
    Obs,
}

fn class(b: u8) -> Class {
    match b {
        b' ' | b'\t' => Class::Ws,
        b'\n' => Class::Lf,
        b'\r' => Class::Cr,
        0x80.. => Class::Obs,
        _ => Class::Ctl,
    }
}

/// A request in smuggler's template: the gadget line first, then the usual fields and a
/// `Content-Length` for the body.
fn smuggler_request(gadget: &[u8]) -> Vec<u8> {
    cat(&[
        b"GET /?cb=1 HTTP/1.1\r\n",
        gadget,
        b"\r\nHost: h\r\nUser-Agent: conformance\r\nContent-type: application/x-www-form-urlencoded; charset=UTF-8\r\n",
        format!("Content-Length: {}\r\n\r\n", SMUGGLE.len()).as_bytes(),
        SMUGGLE,
    ])
}

/// Whether an LF at smuggler's `position` makes an empty line, ending the head before Host.
fn ends_head(position: &str) -> bool {
    matches!(
        position,
        "prespace" | "endspace" | "xnprespace" | "endspacexn"
    )
}

/// The template's request forwarded as a Content-Length request (the gadget was no
/// Transfer-Encoding field), with `checks` on its fields.
fn smuggler_forwarded(checks: Vec<Field>) -> Expect {
    let mut sent = get("/?cb=1")
        .length(SMUGGLE)
        .field(Field::Absent("transfer-encoding"));
    sent.fields.extend(checks);
    fwd(vec![sent])
}

/// R1 and R5 on defparam/smuggler's Transfer-Encoding mutations (configs/exhaustive.py named
/// ones; default.py positions × bytes; doubles.py two-byte positions) and PortSwigger's TE.TE
/// obfuscations. Every one carries a Content-Length: a Transfer-Encoding field that parses is
/// R1's 400, one that does not parse is R5's 400, and only a gadget that is no
/// Transfer-Encoding field at all (an ordinary header) is forwarded, framed by its
/// Content-Length.
fn te_obfuscation() -> Vec<Case> {
    const F: &str = "te-obfuscation";
    let mut cases = Vec::new();
    let named: [(&str, &[u8], bool); 30] = [
        ("nameprefix1", b" Transfer-Encoding: chunked", false),
        ("tabprefix1", b"Transfer-Encoding:\tchunked", false),
        ("tabprefix2", b"Transfer-Encoding\t:\tchunked", false),
        ("spacejoin1", b"Transfer Encoding: chunked", false),
        ("underjoin1", b"Transfer_Encoding: chunked", true),
        ("smashed", b"Transfer Encoding:chunked", false),
        ("space1", b"Transfer-Encoding : chunked", false),
        ("valueprefix1", b"Transfer-Encoding:  chunked", false),
        ("vertprefix1", b"Transfer-Encoding:\x0bchunked", false),
        ("commaCow", b"Transfer-Encoding: chunked, cow", false),
        ("cowComma", b"Transfer-Encoding: cow, chunked", false),
        ("contentEnc", b"Content-Encoding: chunked", true),
        ("linewrapped1", b"Transfer-Encoding:\n chunked", false),
        ("quoted", b"Transfer-Encoding: \"chunked\"", false),
        ("aposed", b"Transfer-Encoding: 'chunked'", false),
        ("lazygrep", b"Transfer-Encoding: chunk", false),
        ("sarcasm", b"TrAnSFer-EnCODinG: cHuNkeD", false),
        ("yelling", b"TRANSFER-ENCODING: CHUNKED", false),
        ("0dsuffix", b"Transfer-Encoding: chunked\r", false),
        ("tabsuffix", b"Transfer-Encoding: chunked\t", false),
        (
            "revdualchunk",
            b"Transfer-Encoding: cow\r\nTransfer-Encoding: chunked",
            false,
        ),
        ("0dspam", b"Transfer\r-Encoding: chunked", false),
        ("nested", b"Transfer-Encoding: cow chunked bar", false),
        ("spaceFF", b"Transfer-Encoding:\xffchunked", false),
        ("accentCH", b"Transfer-Encoding: ch\x96nked", false),
        ("accentTE", b"Transf\x82r-Encoding: chunked", false),
        ("x-rout", b"X:X\rTransfer-Encoding: chunked", false),
        ("x-nout", b"X:X\nTransfer-Encoding: chunked", false),
        // PortSwigger TE.TE: a second, bogus value, and the leading-line trick.
        (
            "portswigger chunked then x",
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x",
            false,
        ),
        (
            "portswigger xchunked",
            b"Transfer-Encoding: xchunked",
            false,
        ),
    ];
    for (name, gadget, forwarded) in named {
        let expect = if forwarded {
            smuggler_forwarded(Vec::new())
        } else {
            bad()
        };
        cases.push(case(
            F,
            format!("smuggler {name}"),
            smuggler_request(gadget),
            expect,
        ));
    }

    // default.py's positions × bytes. Each position's verdict by the byte's class.
    type Position = (&'static str, fn(u8) -> Vec<u8>, fn(Class) -> bool);
    let positions: [Position; 10] = [
        (
            "midspace",
            |c| cat(&[b"Transfer-Encoding:", &[c], b"chunked"]),
            |_| false,
        ),
        (
            "postspace",
            |c| cat(&[b"Transfer-Encoding", &[c], b": chunked"]),
            |_| false,
        ),
        (
            "prespace",
            |c| cat(&[&[c], b"Transfer-Encoding: chunked"]),
            |_| false,
        ),
        (
            "endspace",
            |c| cat(&[b"Transfer-Encoding: chunked", &[c]]),
            |_| false,
        ),
        // `X: X<c>Transfer-Encoding: chunked` is one field X when <c> is valid in a value.
        (
            "xprespace",
            |c| cat(&[b"X: X", &[c], b"Transfer-Encoding: chunked"]),
            |k| matches!(k, Class::Ws | Class::Obs),
        ),
        (
            "endspacex",
            |c| cat(&[b"Transfer-Encoding: chunked", &[c], b"X: X"]),
            |_| false,
        ),
        (
            "rxprespace",
            |c| cat(&[b"X: X\r", &[c], b"Transfer-Encoding: chunked"]),
            |_| false,
        ),
        (
            "xnprespace",
            |c| cat(&[b"X: X", &[c], b"\nTransfer-Encoding: chunked"]),
            |_| false,
        ),
        (
            "endspacerx",
            |c| cat(&[b"Transfer-Encoding: chunked\r", &[c], b"X: X"]),
            |_| false,
        ),
        (
            "endspacexn",
            |c| cat(&[b"Transfer-Encoding: chunked", &[c], b"\nX: X"]),
            |_| false,
        ),
    ];
    let bytes = [
        0x00, 0x01, 0x04, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x1f, 0x20, 0x7f, 0x85, 0xa0, 0xff,
    ];
    for (position, gadget, forwarded) in positions {
        for b in bytes {
            let gadget = gadget(b);
            let expect = if forwarded(class(b)) {
                // The whole gadget is the value of X, byte for byte.
                smuggler_forwarded(vec![Field::Is("x", gadget[3..].to_vec())])
            } else if b == b'\n' && ends_head(position) {
                // The LF makes an empty line: a head without Host ends there (R7).
                bad_head()
            } else {
                bad()
            };
            cases.push(case(
                F,
                format!("smuggler {position}-{}", hex(b)),
                smuggler_request(&gadget),
                expect,
            ));
        }
    }

    // doubles.py: the same byte at two positions. A byte before the colon or before the name
    // never makes a valid field; around the value it makes R1's case or an invalid value.
    type Double = (&'static str, fn(u8) -> Vec<u8>);
    let doubles: [Double; 6] = [
        ("c-c-XX-XX", |c| {
            cat(&[&[c], b"Transfer-Encoding", &[c], b": chunked"])
        }),
        ("c-XX-c-XX", |c| {
            cat(&[&[c], b"Transfer-Encoding:", &[c], b"chunked"])
        }),
        ("c-XX-XX-c", |c| {
            cat(&[&[c], b"Transfer-Encoding: chunked", &[c]])
        }),
        ("XX-c-c-XX", |c| {
            cat(&[b"Transfer-Encoding", &[c], b":", &[c], b"chunked"])
        }),
        ("XX-c-XX-c", |c| {
            cat(&[b"Transfer-Encoding", &[c], b": chunked", &[c]])
        }),
        ("XX-XX-c-c", |c| {
            cat(&[b"Transfer-Encoding:", &[c], b"chunked", &[c]])
        }),
    ];
    for (position, gadget) in doubles {
        for b in [0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x20, 0x7f, 0x85, 0xa0, 0xff] {
            // A leading LF ends a Host-less head at once (R7).
            let expect = if b == b'\n' && position.starts_with('c') {
                bad_head()
            } else {
                bad()
            };
            cases.push(case(
                F,
                format!("smuggler doubles {}", position.replace('c', &hex(b))),
                smuggler_request(&gadget(b)),
                expect,
            ));
        }
    }
    cases
}

/// A chunked POST with `te` lines, body `1\r\nZ\r\n0\r\n\r\n`.
fn te_request(method: &str, version: &str, te_lines: &[&[u8]]) -> Vec<u8> {
    let mut request = format!("{method} /te HTTP/{version}\r\nHost: h\r\n").into_bytes();
    for te in te_lines {
        request.extend_from_slice(b"Transfer-Encoding: ");
        request.extend_from_slice(te);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"\r\n1\r\nZ\r\n0\r\n\r\n");
    request
}

/// R2. http-garden trophies 11, 12, 21, 25, 41, 44, 46 and transducer bugs 9, 18, 25;
/// PortSwigger TE.TE (`xchunked`, a second bogus line); smuggler's `commaCow`/`cowComma`.
fn te_values() -> Vec<Case> {
    const F: &str = "te-value";
    let mut cases = Vec::new();
    let valid: [&[u8]; 9] = [
        b"chunked",
        b"Chunked",
        b"CHUNKED",
        b"cHuNkEd",
        b" chunked",
        b"chunked ",
        b"\tchunked",
        b"chunked\t",
        b" \t chunked \t ",
    ];
    for te in valid {
        for method in ["POST", "GET"] {
            let sent = Sent::new(if method == "GET" { "GET" } else { "POST" }, "/te")
                .chunked(b"Z")
                .field(Field::Absent("content-length"));
            cases.push(case(
                F,
                format!("{method} valid {:?}", String::from_utf8_lossy(te)),
                te_request(method, "1.1", &[te]),
                fwd(vec![sent]),
            ));
        }
    }
    let refused_501: [&[u8]; 29] = [
        b"gzip, chunked",
        b"deflate, chunked",
        b"chunked, chunked",
        b"identity",
        b"identity, chunked",
        b"chunked, identity",
        b"xchunked",
        b"chunkedx",
        b"x-chunked",
        b"chunk",
        b"chunked;x",
        b"chunked; q=1",
        b"",
        b",chunked",
        b"chunked,",
        b", chunked ,",
        b"\"chunked\"",
        b"'chunked'",
        b"chunked chunked",
        b"cow",
        b"blegh",
        b"gzip",
        b"compress",
        b"\xa0chunked\xa0",
        b"\xffchunked\xff",
        b"\x85chunked",
        b"chunked\xa0",
        b"ch\x96nked",
        b"chunked, cow",
    ];
    for te in refused_501 {
        cases.push(case(
            F,
            format!("POST {:?}", String::from_utf8_lossy(te)),
            te_request("POST", "1.1", &[te]),
            not_implemented(),
        ));
    }
    for te in [&b"gzip, chunked"[..], b"identity", b"xchunked", b""] {
        cases.push(case(
            F,
            format!("GET {:?}", String::from_utf8_lossy(te)),
            te_request("GET", "1.1", &[te]),
            not_implemented(),
        ));
    }
    let two_lines: [(&[u8], &[u8]); 6] = [
        (b"chunked", b"chunked"),
        (b"chunked", b"identity"),
        (b"identity", b"chunked"),
        (b"gzip", b"chunked"),
        (b"chunked", b""),
        (b"chunked", b"x"),
    ];
    for (a, b) in two_lines {
        cases.push(case(
            F,
            format!(
                "two lines {:?} + {:?}",
                String::from_utf8_lossy(a),
                String::from_utf8_lossy(b)
            ),
            te_request("POST", "1.1", &[a, b]),
            not_implemented(),
        ));
    }
    // Controls in the value are no field value at all (R5).
    for te in [
        &b"\x0bchunked"[..],
        b"chunked\x0c",
        b"chunked\x00",
        b"\x7fchunked",
        b"chunked\x01",
    ] {
        cases.push(case(
            F,
            format!("control {:?}", String::from_utf8_lossy(te)),
            te_request("POST", "1.1", &[te]),
            bad(),
        ));
    }
    for (method, te) in [
        ("POST", &b"chunked"[..]),
        ("GET", b"chunked"),
        ("POST", b"identity"),
        ("POST", b"gzip, chunked"),
    ] {
        cases.push(case(
            F,
            format!("HTTP/1.0 {method} {:?}", String::from_utf8_lossy(te)),
            te_request(method, "1.0", &[te]),
            bad(),
        ));
    }
    cases
}

/// R3. http-garden trophies 3, 4, 10, 16, 20, 23, 26, 28, 29, 32, 33, 38, 42 and transducer
/// bugs 1, 5, 11, 21, 22; T-Reqs `<content-length>` mutations. Each request is followed by a
/// pipelined `GET /next`, answered only when the body ended where it should.
fn content_length() -> Vec<Case> {
    const F: &str = "content-length";
    let mut cases = Vec::new();
    // A list of equal values in one field is refused, as hyper reads a request's length
    // (RFC 9110 §8.6 lets a recipient either refuse it or take the one value); repeated
    // equal lines are one length.
    let valid: [(&str, &[&str], &[u8]); 8] = [
        ("single", &["5"], b"hello"),
        ("leading zero", &["05"], b"hello"),
        ("garden 32: 010", &["010"], b"0123456789"),
        ("zero", &["0"], b""),
        ("zeros", &["000"], b""),
        ("two equal lines", &["5", "5"], b"hello"),
        ("three equal lines", &["5", "5", "5"], b"hello"),
        ("surrounding whitespace", &[" \t5 \t"], b"hello"),
    ];
    let invalid: [(&str, &[&str]); 36] = [
        ("list 5, 5", &["5, 5"]),
        ("list 5,5", &["5,5"]),
        ("list 5, 5, 5", &["5, 5, 5"]),
        ("line and list", &["5", "5, 5"]),
        ("garden 23: two lines 1, 0", &["1", "0"]),
        ("garden 33: two lines 0, 1", &["0", "1"]),
        ("two lines 5, 6", &["5", "6"]),
        ("transducer 22: two lines 0, 31", &["0", "31"]),
        ("list 5, 6", &["5, 6"]),
        ("list 5,6", &["5,6"]),
        ("line and differing list", &["5", "5, 6"]),
        ("plus", &["+5"]),
        ("minus one", &["-1"]),
        ("garden 26: minus 48", &["-48"]),
        ("minus zero", &["-0"]),
        ("hex 0x5", &["0x5"]),
        ("transducer 1: 0x10", &["0x10"]),
        ("hex 0X5", &["0X5"]),
        ("decimal 5.0", &["5.0"]),
        ("exponent 5e0", &["5e0"]),
        ("garden 16: empty", &[""]),
        ("two numbers 1 2", &["1 2"]),
        ("two numbers 5 5", &["5 5"]),
        ("garden 10: underscore 1_0", &["1_0"]),
        ("garden 10: +1_0", &["+1_0"]),
        ("garden 29: 1Z", &["1Z"]),
        ("semicolon 5;", &["5;"]),
        ("trailing comma 5,", &["5,"]),
        ("leading comma ,5", &[",5"]),
        ("garden 42: empty then 5", &["", "5"]),
        ("5 then empty", &["5", ""]),
        ("u64 max + 1", &["18446744073709551616"]),
        ("overflow", &["99999999999999999999999"]),
        ("arabic-indic digit", &["\u{0665}"]),
        ("fullwidth digit", &["\u{ff15}"]),
        ("quoted", &["\"5\""]),
    ];
    let lines = |values: &[&str]| -> String {
        values
            .iter()
            .map(|v| format!("Content-Length: {v}\r\n"))
            .collect()
    };
    for method in ["POST", "GET"] {
        let m: &'static str = if method == "GET" { "GET" } else { "POST" };
        for (name, values, body) in valid {
            let request = cat(&[
                format!("{method} /cl HTTP/1.1\r\nHost: h\r\n{}\r\n", lines(values)).as_bytes(),
                body,
                NEXT,
            ]);
            let expect = fwd(vec![Sent::new(m, "/cl").length(body), get("/next")]);
            cases.push(case(F, format!("{method} {name}"), request, expect));
        }
        for (name, values) in invalid {
            let request = cat(&[
                format!("{method} /cl HTTP/1.1\r\nHost: h\r\n{}\r\n", lines(values)).as_bytes(),
                b"hello",
                NEXT,
            ]);
            cases.push(case(F, format!("{method} {name}"), request, bad()));
        }
        // The field name itself mangled (R5).
        let syntax: [(&str, &[u8]); 6] = [
            (
                "garden 3: space before colon",
                b"Host: h\r\nContent-Length : 5\r\n",
            ),
            ("tab before colon", b"Host: h\r\nContent-Length\t: 5\r\n"),
            (
                "garden 20: 0x85 before colon",
                b"Host: h\r\nContent-Length\x85: 5\r\n",
            ),
            ("garden 28: no colon", b"Host: h\r\nContent-Length 5\r\n"),
            (
                "garden 4: tab before first name",
                b"\tContent-Length: 5\r\nHost: h\r\n",
            ),
            (
                "garden 37: name across lines",
                b"Host: h\r\nContent-\r\nLength: 5\r\n",
            ),
        ];
        for (name, fields) in syntax {
            let request = cat(&[
                format!("{method} /cl HTTP/1.1\r\n").as_bytes(),
                fields,
                b"\r\nhello",
                NEXT,
            ]);
            cases.push(case(F, format!("{method} {name}"), request, bad()));
        }
    }
    cases.push(case(
        F,
        "HTTP/1.0 POST single",
        b"POST /cl HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
        fwd(vec![Sent::new("POST", "/cl").length(b"hello")]).then(Then::Any),
    ));
    cases
}

/// A chunk of `data`, size in lowercase hex.
fn chunk(data: &[u8]) -> Vec<u8> {
    cat(&[format!("{:x}\r\n", data.len()).as_bytes(), data, b"\r\n"])
}

/// R4. http-garden trophies 1, 17, 22, 25, 31, 36, 39, 47 and transducer bugs 2, 3, 4, 7, 13,
/// 17, 19, 24; T-Reqs' `<chunked-body>` grammar (chunk-size, chunk-extension, last-chunk,
/// trailer-part). Each body is followed by a pipelined `GET /next`.
fn chunked() -> Vec<Case> {
    const F: &str = "chunked";
    let mut cases = Vec::new();
    let head = b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n";
    let embedded = b"0\r\n\r\nGET /x";
    let valid: Vec<(&str, Vec<u8>, &[u8])> = vec![
        ("one chunk", b"5\r\nhello\r\n0\r\n\r\n".to_vec(), b"hello"),
        ("empty body", b"0\r\n\r\n".to_vec(), b""),
        (
            "two chunks",
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n".to_vec(),
            b"hello world",
        ),
        (
            "uppercase hex",
            b"A\r\n0123456789\r\n0\r\n\r\n".to_vec(),
            b"0123456789",
        ),
        (
            "lowercase hex",
            b"a\r\n0123456789\r\n0\r\n\r\n".to_vec(),
            b"0123456789",
        ),
        (
            "leading zeros",
            b"005\r\nhello\r\n0\r\n\r\n".to_vec(),
            b"hello",
        ),
        (
            "16 hex digits",
            b"0000000000000005\r\nhello\r\n0\r\n\r\n".to_vec(),
            b"hello",
        ),
        // Leading zeros do not overflow, whatever their number (hyper and nginx agree).
        (
            "17 hex digits, leading zeros",
            b"00000000000000005\r\nhello\r\n0\r\n\r\n".to_vec(),
            b"hello",
        ),
        (
            "extension",
            b"5;ext\r\nhello\r\n0\r\n\r\n".to_vec(),
            b"hello",
        ),
        (
            "extension with value",
            b"5;ext=val\r\nhello\r\n0\r\n\r\n".to_vec(),
            b"hello",
        ),
        (
            "extension with quoted value",
            b"5;a=\"b ; c\"\r\nhello\r\n0\r\n\r\n".to_vec(),
            b"hello",
        ),
        (
            "two extensions",
            b"5;a;b=c\r\nhello\r\n0\r\n\r\n".to_vec(),
            b"hello",
        ),
        (
            "space before extension",
            b"5 ;ext\r\nhello\r\n0\r\n\r\n".to_vec(),
            b"hello",
        ),
        (
            "tab before extension",
            b"5\t;ext\r\nhello\r\n0\r\n\r\n".to_vec(),
            b"hello",
        ),
        (
            "BWS around extension",
            b"5 ; a = b\r\nhello\r\n0\r\n\r\n".to_vec(),
            b"hello",
        ),
        (
            "trailing space after size",
            b"5 \r\nhello\r\n0\r\n\r\n".to_vec(),
            b"hello",
        ),
        (
            "trailing tab after size",
            b"5\t\r\nhello\r\n0\r\n\r\n".to_vec(),
            b"hello",
        ),
        (
            "extension on last chunk",
            b"5\r\nhello\r\n0;x=y\r\n\r\n".to_vec(),
            b"hello",
        ),
        (
            "last chunk 000",
            b"5\r\nhello\r\n000\r\n\r\n".to_vec(),
            b"hello",
        ),
        (
            "trailer field",
            b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n".to_vec(),
            b"hello",
        ),
        (
            "two trailer fields",
            b"5\r\nhello\r\n0\r\nA: 1\r\nB: 2\r\n\r\n".to_vec(),
            b"hello",
        ),
        (
            "garden 39: trailer that looks like a request line",
            b"0\r\nX:POST / HTTP/1.1\r\n\r\n".to_vec(),
            b"",
        ),
        (
            "data holding a last chunk",
            cat(&[&chunk(embedded), b"0\r\n\r\n"]),
            embedded,
        ),
        (
            "data holding bare LFs",
            b"4\r\na\n\nb\r\n0\r\n\r\n".to_vec(),
            b"a\n\nb",
        ),
        (
            "many one-byte chunks",
            b"1\r\nh\r\n1\r\ne\r\n1\r\nl\r\n1\r\nl\r\n1\r\no\r\n0\r\n\r\n".to_vec(),
            b"hello",
        ),
    ];
    for (name, body, decoded) in valid {
        let expect = fwd(vec![
            Sent::new("POST", "/c")
                .chunked(decoded)
                .field(Field::Absent("content-length")),
            get("/next"),
        ]);
        cases.push(case(F, name, cat(&[head, &body, NEXT]), expect));
    }
    let invalid: Vec<(&str, Vec<u8>)> = vec![
        ("plus sign", b"+5\r\nhello\r\n0\r\n\r\n".to_vec()),
        ("minus sign", b"-5\r\nhello\r\n0\r\n\r\n".to_vec()),
        ("leading space", b" 5\r\nhello\r\n0\r\n\r\n".to_vec()),
        ("leading tab", b"\t5\r\nhello\r\n0\r\n\r\n".to_vec()),
        (
            "transducer 24: many leading spaces",
            b"           0\r\n\r\n".to_vec(),
        ),
        ("0x prefix", b"0x5\r\nhello\r\n0\r\n\r\n".to_vec()),
        ("0X prefix", b"0X5\r\nhello\r\n0\r\n\r\n".to_vec()),
        ("transducer 19: -0x0", b"-0x0\r\n\r\n".to_vec()),
        ("garden 1/22: 0_2e", b"0_2e\r\n\r\n".to_vec()),
        ("transducer 2: not hex", b"Z\r\nZZ\r\nZZZ\r\n\r\n".to_vec()),
        (
            "transducer 7: size with junk after",
            b"1these-bytes-never-get-validated\r\nZ\r\n0\r\n\r\n".to_vec(),
        ),
        ("garden 17: empty size line", b"\r\n\r\n".to_vec()),
        ("bare LF after size", b"5\nhello\r\n0\r\n\r\n".to_vec()),
        ("transducer 13: bare LF after data", b"5\r\nhello\n0\r\n\r\n".to_vec()),
        ("bare LF after last chunk", b"5\r\nhello\r\n0\n\r\n".to_vec()),
        ("bare LF ending the body", b"5\r\nhello\r\n0\r\n\n".to_vec()),
        ("bare LF in extension", b"5;ext\nhello\r\n0\r\n\r\n".to_vec()),
        ("bare LF in last chunk's extension", b"5\r\nhello\r\n0;x\n\r\n".to_vec()),
        ("CR alone after size", b"5\rhello\r\n0\r\n\r\n".to_vec()),
        (
            "garden 31: CR CR before extension",
            b"5\r\r;ABCD\r\n34\r\nE\r\n0\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"
                .to_vec(),
        ),
        (
            "transducer 3: CR in extension whitespace",
            b"2\r\r;a\r\n02\r\n41\r\n0\r\n\r\n".to_vec(),
        ),
        (
            "garden 36: CR CR after extension",
            cat(&[b"41;a=b\r\r", &[b'X'; 65], b"\r\n0\r\n\r\n"]),
        ),
        ("transducer 4: CR then digit", b"1\r0\n".to_vec()),
        ("data not followed by CRLF", b"5\r\nhelloXX0\r\n\r\n".to_vec()),
        ("data longer than its size", b"3\r\nhello\r\n0\r\n\r\n".to_vec()),
        ("data shorter than its size", b"7\r\nhello\r\n0\r\n\r\n".to_vec()),
        ("17 hex digits, overflow", b"10000000000000000\r\nhello\r\n0\r\n\r\n".to_vec()),
        ("17 f", b"fffffffffffffffff\r\nhello\r\n0\r\n\r\n".to_vec()),
        ("trailer ending in bare LF", b"0\r\nX: y\n\r\n".to_vec()),
        ("bare LF ending the trailers", b"0\r\nX: y\r\n\n".to_vec()),
        ("trailer with space before colon", b"0\r\nX : y\r\n\r\n".to_vec()),
        ("trailer folded", b"0\r\nX: a\r\n b\r\n\r\n".to_vec()),
        ("trailer without colon", b"0\r\nX y\r\n\r\n".to_vec()),
        ("trailer with NUL", b"0\r\nX: a\x00b\r\n\r\n".to_vec()),
        // The pipelined request line becomes a trailer line without a colon.
        ("no final CRLF", b"5\r\nhello\r\n0\r\n".to_vec()),
        (
            "garden 47: invalid chunk then a request",
            b"INVALID!!!\r\n".to_vec(),
        ),
    ];
    for (name, body) in invalid {
        cases.push(case(F, name, cat(&[head, &body, NEXT]), bad().partial_ok()));
    }
    cases
}

/// `GET /h` with Host and `line` as one more field line.
fn with_field(line: &[u8]) -> Vec<u8> {
    cat(&[b"GET /h HTTP/1.1\r\nHost: h\r\n", line, b"\r\n\r\n"])
}

/// `GET /h` with Host and `n - 1` more fields (`n` in all).
fn with_fields(n: usize, extra: &str) -> Vec<u8> {
    let mut request = format!("GET /h HTTP/1.1\r\nHost: h\r\n{extra}");
    for i in 1..n {
        request.push_str(&format!("X-Field-{i}: {i}\r\n"));
    }
    request.push_str("\r\n");
    request.into_bytes()
}

/// R5 on header fields. http-garden trophies 2, 3, 8, 13, 14, 18, 19, 20, 27, 28, 30, 34, 35,
/// 43 and transducer bugs 6, 10, 12, 14, 16, 20; T-Reqs' char pool inserted into names and
/// values; smuggler's line-ending tricks; hyper's limits (100 fields, 64 KiB).
fn head_syntax() -> Vec<Case> {
    const F: &str = "head-syntax";
    let mut cases = Vec::new();
    let name_bytes = [
        0x00u8, 0x01, 0x09, b' ', b'"', b'(', b')', b',', b'/', b';', b'<', b'=', b'>', b'?', b'@',
        b'[', b'\\', b']', b'{', b'}', 0x7f, 0x80, 0x85, 0xa0, 0xff,
    ];
    for b in name_bytes {
        cases.push(case(
            F,
            format!("name byte {}", hex(b)),
            with_field(&cat(&[b"X", &[b], b"Y: v"])),
            bad(),
        ));
    }
    for b in [
        0x00u8, 0x01, 0x07, 0x08, 0x0b, 0x0c, 0x0e, 0x1b, 0x1f, 0x7f, b'\r', b'\n',
    ] {
        cases.push(case(
            F,
            format!("value byte {}", hex(b)),
            with_field(&cat(&[b"X: a", &[b], b"b"])),
            bad(),
        ));
    }
    let refused_lines: [(&str, &[u8]); 21] = [
        ("garden 43: NUL ending a value", b"Evil: evil\x00"),
        ("DEL ending a value", b"X: a\x7f"),
        ("garden 2: NUL CR in a value", b"Header: v\x00\ralue"),
        ("garden 34: CR in a value", b"Header: va\rlue"),
        (
            "transducer 10: CRs in a value",
            b"Invalid-Header: this\rvalue\ris\rinvalid",
        ),
        ("garden 13: CR as a line end", b"Visible: :/\rSmuggled: :)"),
        (
            "garden 35: NUL in a value",
            b"Test: test\x00THESE BYTES GET DROPPED",
        ),
        (
            "transducer 12: NUL in Host-like value",
            b"X-Host: google.com\x00.kallus.org",
        ),
        ("space before colon", b"X : v"),
        ("tab before colon", b"X\t: v"),
        ("two spaces before colon", b"X  : v"),
        ("obs-fold with space", b"X: a\r\n b"),
        ("obs-fold with tab", b"X: a\r\n\tb"),
        ("obs-fold after an empty value", b"X:\r\n b"),
        ("garden 18: empty name", b": ignored"),
        ("garden 27: empty name and value", b":"),
        ("no colon", b"Xv"),
        ("garden 28: name and value split by space", b"X v"),
        ("transducer 14: LF inside a name", b"Te\nst: test"),
        ("transducer 6: 0x85 ending a name", b"Header\x85: value"),
        ("transducer 20: NUL line after a field", b"a:b\r\nc\x00"),
    ];
    for (name, line) in refused_lines {
        cases.push(case(F, name, with_field(line), bad()));
    }
    let whole: [(&str, &[u8]); 5] = [
        (
            "space before the first name",
            b"GET /h HTTP/1.1\r\n Host: h\r\n\r\n",
        ),
        (
            "tab before the first name",
            b"GET /h HTTP/1.1\r\n\tHost: h\r\n\r\n",
        ),
        (
            "garden 30: CR then a byte ends the head",
            b"GET /h HTTP/1.1\r\nHost: a\r\n\rZGET /evil: HTTP/1.1\r\nHost: a\r\n\r\n",
        ),
        (
            "garden 8: 0xef leading a name",
            b"GET /h HTTP/1.1\r\nHost: h\r\n\xefoo: bar\r\n\r\n",
        ),
        (
            "garden 14: every separator in a name",
            b"GET /h HTTP/1.1\r\nHost: h\r\n\x00\x01\x02\x03\x04\x05\x06\x07\x08\t\x0b\x0c\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f \"(),/;<=>?@[/]{}: whatever\r\n\r\n",
        ),
    ];
    for (name, request) in whole {
        cases.push(case(F, name, request.to_vec(), bad()));
    }

    // Accepted, and forwarded byte for byte.
    let forwarded: [(&str, &[u8], Field); 10] = [
        (
            "tab inside a value",
            b"X: a\tb",
            Field::Is("x", b"a\tb".to_vec()),
        ),
        (
            "UTF-8 in a value",
            b"X: caf\xc3\xa9",
            Field::Is("x", b"caf\xc3\xa9".to_vec()),
        ),
        (
            "obs-text in a value",
            b"X: \xff\xfe\x80",
            Field::Is("x", b"\xff\xfe\x80".to_vec()),
        ),
        (
            "no space after colon",
            b"X:no-space",
            Field::Is("x", b"no-space".to_vec()),
        ),
        (
            "whitespace around a value",
            b"X: \t padded \t ",
            Field::Is("x", b"padded".to_vec()),
        ),
        ("empty value", b"X:", Field::Is("x", Vec::new())),
        (
            "a colon inside the value",
            b"X:Y: v",
            Field::Is("x", b"Y: v".to_vec()),
        ),
        (
            "every tchar in a name",
            b"X-!#$%&'*+.^_`|~09: v",
            Field::Is("x-!#$%&'*+.^_`|~09", b"v".to_vec()),
        ),
        (
            "repeated field",
            b"X: 1\r\nX: 2",
            Field::All("x", vec![b"1".to_vec(), b"2".to_vec()]),
        ),
        (
            "garden 41: 0x85 and 0xa0 around a value",
            b"User: \x85admin\xa0",
            Field::Is("user", b"\x85admin\xa0".to_vec()),
        ),
    ];
    for (name, line, check) in forwarded {
        cases.push(case(
            F,
            name,
            with_field(line),
            fwd(vec![get("/h").field(check)]),
        ));
    }
    // Bare LF line endings are accepted (as httparse and nginx do) and go on as CRLF.
    let lf: [(&str, &[u8]); 5] = [
        ("transducer 16: LF only", b"GET /h HTTP/1.1\nHost: h\n\n"),
        (
            "LF after the request line",
            b"GET /h HTTP/1.1\nHost: h\r\n\r\n",
        ),
        ("LF ending the head", b"GET /h HTTP/1.1\r\nHost: h\n\n"),
        (
            "LF ending a field",
            b"GET /h HTTP/1.1\r\nHost: h\r\nX: y\n\r\n",
        ),
        (
            "LF ending the last line",
            b"GET /h HTTP/1.1\r\nHost: h\r\n\n",
        ),
    ];
    for (name, request) in lf {
        cases.push(case(F, name, request.to_vec(), fwd(vec![get("/h")])));
    }
    cases.push(case(
        F,
        "garden 19: empty value ended by LF, then a Host-less request",
        b"GET /u HTTP/1.1\r\nHost: a\r\nUseless:\n\nGET / HTTP/1.1\r\n\r\n".to_vec(),
        fwd(vec![get("/u")]).then(BAD_HEAD),
    ));

    // Limits: 100 fields pass, 101 do not; 64 KiB of head.
    cases.push(case(F, "100 fields", with_fields(100, ""), fwd(vec![get("/h")])).no_alt());
    let mut post_100 = with_fields(99, "Content-Length: 0\r\n");
    post_100.splice(..3, b"POST".iter().copied());
    cases.push(
        case(
            F,
            "100 fields (POST, CL 0)",
            post_100,
            fwd(vec![Sent::new("POST", "/h")]),
        )
        .no_alt(),
    );
    for n in [101, 128, 129, 500] {
        cases.push(case(
            F,
            format!("{n} fields"),
            with_fields(n, ""),
            too_large(),
        ));
    }
    let big = |n: usize| format!("X-Big: {}\r\n", "a".repeat(n));
    cases.push(case(
        F,
        "head of 60 KiB",
        with_fields(1, &big(60 * 1024)),
        fwd(vec![
            get("/h").field(Field::Is("x-big", vec![b'a'; 60 * 1024]))
        ]),
    ));
    cases.push(case(
        F,
        "one field of 70 KiB",
        with_fields(1, &big(70 * 1024)),
        too_large(),
    ));
    let many: String = (0..40)
        .map(|i| format!("X-{i}: {}\r\n", "b".repeat(2000)))
        .collect();
    cases.push(case(
        F,
        "40 fields of 2 KB",
        with_fields(1, &many),
        too_large(),
    ));
    cases
}

/// R5 on the request line. T-Reqs' request-line grammar (`<method-name><space><uri><space>
/// <protocol><separator><version><newline>`, each part mutated); http-garden trophies 5, 6, 9,
/// 15, 24, 40.
fn request_line() -> Vec<Case> {
    const F: &str = "request-line";
    let mut cases = Vec::new();
    let lines: [(&str, &[u8]); 34] = [
        ("two spaces before the target", b"GET  /h HTTP/1.1"),
        ("two spaces before the version", b"GET /h  HTTP/1.1"),
        ("tab before the target", b"GET\t/h HTTP/1.1"),
        ("tab before the version", b"GET /h\tHTTP/1.1"),
        ("leading space", b" GET /h HTTP/1.1"),
        ("trailing space", b"GET /h HTTP/1.1 "),
        ("trailing tab", b"GET /h HTTP/1.1\t"),
        ("HTTP/1.2", b"GET /h HTTP/1.2"),
        ("HTTP/2.0", b"GET /h HTTP/2.0"),
        ("HTTP/3.0", b"GET /h HTTP/3.0"),
        ("HTTP/0.9", b"GET /h HTTP/0.9"),
        ("HTTP/1.10", b"GET /h HTTP/1.10"),
        ("garden 5: HTTP/1.32", b"GET /h HTTP/1.32"),
        ("HTTP/1", b"GET /h HTTP/1"),
        ("HTTP/1.", b"GET /h HTTP/1."),
        ("HTTP\\1.1", b"GET /h HTTP\\1.1"),
        ("HTTP/1,1", b"GET /h HTTP/1,1"),
        ("lowercase protocol", b"GET /h http/1.1"),
        ("HTTPS/1.1", b"GET /h HTTPS/1.1"),
        ("space in the version", b"GET /h HTTP/ 1.1"),
        ("garden 15: CRs in the version", b"GET /h HTTP/\r\r1.1"),
        (
            "garden 24: HTTP/4294967295.255",
            b"GET /h HTTP/4294967295.255",
        ),
        ("no version (HTTP/0.9)", b"GET /h"),
        ("garden 9: LF as the separator", b"GET /h\nHTTP/1.1"),
        ("CR CR LF ending the line", b"GET /h HTTP/1.1\r"),
        ("NUL in the method", b"G\x00T /h HTTP/1.1"),
        ("separator in the method", b"GE(T /h HTTP/1.1"),
        (
            "garden 6: method of separators",
            b"G=\":<>(e),[T];?\" /get HTTP/1.1",
        ),
        (
            "garden 40: NUL method, dotted version",
            b"\x00 / HTTP/............0596.7407.",
        ),
        ("NUL in the target", b"GET /a\x00b HTTP/1.1"),
        ("control in the target", b"GET /a\x01b HTTP/1.1"),
        ("ESC in the target", b"GET /a\x1bb HTTP/1.1"),
        ("DEL in the target", b"GET /a\x7fb HTTP/1.1"),
        ("invalid UTF-8 in the target", b"GET /a\xffb HTTP/1.1"),
    ];
    for (name, line) in lines {
        cases.push(case(F, name, cat(&[line, b"\r\nHost: h\r\n\r\n"]), bad()));
    }
    // RFC 9112 §2.2: empty lines before the request line are ignored (httparse does).
    cases.push(case(
        F,
        "CRLF before the request line",
        b"\r\nGET /h HTTP/1.1\r\nHost: h\r\n\r\n".to_vec(),
        fwd(vec![get("/h")]),
    ));
    cases.push(case(
        F,
        "LF before the request line",
        b"\nGET /h HTTP/1.1\r\nHost: h\r\n\r\n".to_vec(),
        fwd(vec![get("/h")]),
    ));
    cases
}

/// R6. Request-target forms (RFC 9112 §3.2): absolute, authority and asterisk forms are
/// refused (PortSwigger's routing-based SSRF via absolute URLs, http-garden trophy 7); an
/// origin-form target goes on byte for byte, characters the `http` crate is picky about
/// included.
fn targets() -> Vec<Case> {
    const F: &str = "target";
    let mut cases = Vec::new();
    let refused_lines: [(&str, &[u8]); 13] = [
        ("absolute-form http", b"GET http://x/ HTTP/1.1"),
        (
            "absolute-form to loopback",
            b"GET http://127.0.0.1:9/a HTTP/1.1",
        ),
        ("absolute-form https", b"GET https://x/a HTTP/1.1"),
        ("absolute-form uppercase scheme", b"GET HTTP://X/ HTTP/1.1"),
        ("asterisk-form GET", b"GET * HTTP/1.1"),
        ("asterisk-form OPTIONS", b"OPTIONS * HTTP/1.1"),
        ("CONNECT authority-form", b"CONNECT host:443 HTTP/1.1"),
        ("CONNECT loopback", b"CONNECT 127.0.0.1:80 HTTP/1.1"),
        ("CONNECT origin-form", b"CONNECT /x HTTP/1.1"),
        ("authority-form GET", b"GET h:80 HTTP/1.1"),
        ("no leading slash", b"GET x/y HTTP/1.1"),
        ("garden 7: bang", b"GET ! HTTP/1.1"),
        ("query only", b"GET ?a=1 HTTP/1.1"),
    ];
    for (name, line) in refused_lines {
        cases.push(case(
            F,
            name,
            cat(&[line, b"\r\nHost: h\r\n\r\n"]),
            bad_head(),
        ));
    }
    let forwarded = [
        "/a{b}",
        "/a}b",
        "/a\"b",
        "/a<b>",
        "/a|b",
        "/a^b",
        "/a`b",
        "/a\\b",
        "/?where={\"a\":1}",
        "/search?q={\"$gt\":\"\"}&x=[1,2]",
        "/p?x=<script>alert(1)</script>",
        "/%7B%22a%22%7D",
        "/a;b=c",
        "/?",
        "/a?b?c",
        "//evil.example/x",
        "/a%00b",
        "/~user/!$&'()*+,;=:@",
        "/caf%C3%A9",
    ];
    for target in forwarded {
        cases.push(case(
            F,
            format!("origin-form {target}"),
            format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n").into_bytes(),
            fwd(vec![get(target)]),
        ));
    }
    // Dot segments (`%2E` read as `.`) are removed before the target goes under the base
    // path, never climbing above it (see `proxy/mount.rs`); one joined to an encoded slash is
    // refused.
    for (target, normalised) in [
        ("/a/../b", "/b"),
        ("/%2e%2e/x", "/x"),
        ("/../../etc/passwd", "/etc/passwd"),
        ("/a/./b/%2E/c?q=/../", "/a/b/c?q=/../"),
    ] {
        cases.push(case(
            F,
            format!("dot segments {target}"),
            format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n").into_bytes(),
            fwd(vec![get(normalised)]),
        ));
    }
    for target in ["/a/..%2Fb", "/a/..%5cb", "/a/x%2F..%2F..", "/a/..\\b"] {
        cases.push(case(
            F,
            format!("dot segment behind an encoded slash {target}"),
            format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n").into_bytes(),
            bad_head(),
        ));
    }
    for method in ["HEAD", "DELETE", "OPTIONS"] {
        let m: &'static str = match method {
            "HEAD" => "HEAD",
            "DELETE" => "DELETE",
            _ => "OPTIONS",
        };
        cases.push(case(
            F,
            format!("{method} origin-form"),
            format!("{method} /t HTTP/1.1\r\nHost: h\r\n\r\n").into_bytes(),
            fwd(vec![Sent::new(m, "/t")]),
        ));
    }
    cases.push(case(
        F,
        "PUT with CL 0",
        b"PUT /t HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n".to_vec(),
        fwd(vec![Sent::new("PUT", "/t")]),
    ));
    cases.push(case(
        F,
        "PATCH with a body",
        b"PATCH /t HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
        fwd(vec![Sent::new("PATCH", "/t").length(b"hello")]),
    ));
    cases
}

/// R7. RFC 9112 §3.2 (exactly one Host in HTTP/1.1); PortSwigger's duplicate-Host attacks.
fn host() -> Vec<Case> {
    const F: &str = "host";
    let mut cases = Vec::new();
    let refused_heads: [(&str, &[u8]); 6] = [
        ("no Host", b""),
        ("two equal Host", b"Host: a\r\nHost: a\r\n"),
        ("two different Host", b"Host: a\r\nHost: b\r\n"),
        ("Host and host", b"Host: a\r\nhost: b\r\n"),
        ("HOST and host, equal", b"HOST: a\r\nhost: a\r\n"),
        (
            "Host far apart",
            b"Host: a\r\nX-1: 1\r\nX-2: 2\r\nX-3: 3\r\nHost: evil\r\n",
        ),
    ];
    for (name, fields) in refused_heads {
        cases.push(case(
            F,
            name,
            cat(&[b"GET /h HTTP/1.1\r\n", fields, b"\r\n"]),
            bad_head(),
        ));
    }
    let forwarded: [(&str, &[u8]); 4] = [
        ("lowercase host", b"host: h\r\n"),
        ("uppercase HOST", b"HOST: h\r\n"),
        ("empty Host", b"Host:\r\n"),
        ("Host with a port", b"Host: h:8080\r\n"),
    ];
    for (name, fields) in forwarded {
        cases.push(case(
            F,
            name,
            cat(&[b"GET /h HTTP/1.1\r\n", fields, b"\r\n"]),
            fwd(vec![get("/h")]),
        ));
    }
    cases.push(case(
        F,
        "HTTP/1.0 without Host",
        b"GET /h HTTP/1.0\r\n\r\n".to_vec(),
        fwd(vec![get("/h")]).then(Then::Any),
    ));
    cases
}

/// R8. h2c upgrade smuggling (Bishop Fox's h2csmuggler, a request that must reach the upstream
/// as plain HTTP/1.1 with no upgrade); WebSocket upgrades pass; T-Reqs' `<upgrade>` and
/// `<http2-settings>` headers.
fn upgrade() -> Vec<Case> {
    const F: &str = "upgrade";
    let mut cases = Vec::new();
    let settings = "HTTP2-Settings: AAMAAABkAAQAAP__\r\n";
    let h2c: [(&str, String); 9] = [
        (
            "h2c canonical",
            format!("Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n{settings}"),
        ),
        (
            "h2c tokens reversed",
            format!("Connection: HTTP2-Settings, Upgrade\r\nUpgrade: h2c\r\n{settings}"),
        ),
        (
            "h2c lowercase",
            format!("connection: upgrade, http2-settings\r\nupgrade: h2c\r\n{}", settings.to_lowercase()),
        ),
        (
            "h2c uppercase H2C",
            format!("Connection: Upgrade, HTTP2-Settings\r\nUpgrade: H2C\r\n{settings}"),
        ),
        (
            "h2c without HTTP2-Settings in Connection",
            format!("Connection: Upgrade\r\nUpgrade: h2c\r\n{settings}"),
        ),
        (
            "h2c without Connection",
            format!("Upgrade: h2c\r\n{settings}"),
        ),
        (
            "h2c with keep-alive",
            format!("Connection: keep-alive, Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n{settings}"),
        ),
        (
            "h2c on two Connection lines",
            format!("Connection: Upgrade\r\nConnection: HTTP2-Settings\r\nUpgrade: h2c\r\n{settings}"),
        ),
        (
            "h2c with the client's own Authorization",
            format!("Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n{settings}Authorization: Bearer client-token\r\n"),
        ),
    ];
    for (name, fields) in h2c {
        cases.push(case(
            F,
            name,
            format!("GET /u HTTP/1.1\r\nHost: h\r\n{fields}\r\n").into_bytes(),
            fwd(vec![get("/u")
                .field(Field::Absent("upgrade"))
                .field(Field::Absent("http2-settings"))]),
        ));
    }
    // HTTP2-Settings belongs to an h2c upgrade only: alone (a request the front door serves
    // itself, having no `Upgrade`) it goes all the same.
    cases.push(case(
        F,
        "HTTP2-Settings without Upgrade",
        format!("GET /u HTTP/1.1\r\nHost: h\r\n{settings}\r\n").into_bytes(),
        fwd(vec![get("/u").field(Field::Absent("http2-settings"))]),
    ));
    let ws = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";
    // RFC 9110 §7.8: `Upgrade` asks for a switch only with the `upgrade` connection option;
    // without it the request is a plain one (and `Upgrade`, hop-by-hop, goes).
    let not_asked: [(&str, String); 2] = [
        (
            "websocket without Connection",
            format!("Upgrade: websocket\r\n{ws}"),
        ),
        (
            "websocket with Connection: keep-alive only",
            format!("Connection: keep-alive\r\nUpgrade: websocket\r\n{ws}"),
        ),
    ];
    for (name, fields) in not_asked {
        cases.push(case(
            F,
            name,
            format!("GET /ws HTTP/1.1\r\nHost: h\r\n{fields}\r\n").into_bytes(),
            fwd(vec![get("/ws").field(Field::Absent("upgrade"))]),
        ));
    }
    let websocket: [(&str, String); 3] = [
        (
            "websocket",
            format!("Connection: Upgrade\r\nUpgrade: websocket\r\n{ws}"),
        ),
        (
            "websocket with keep-alive",
            format!("Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n{ws}"),
        ),
        (
            "websocket with the client's own Authorization",
            format!("Connection: Upgrade\r\nUpgrade: websocket\r\n{ws}Authorization: Bearer client-token\r\n"),
        ),
    ];
    for (name, fields) in websocket {
        cases.push(case(
            F,
            name,
            format!("GET /ws HTTP/1.1\r\nHost: h\r\n{fields}\r\n").into_bytes(),
            fwd(vec![get("/ws").upgrade().field(Field::Is(
                "sec-websocket-key",
                b"dGhlIHNhbXBsZSBub25jZQ==".to_vec(),
            ))]),
        ));
    }
    cases
}

/// R9. http-garden trophies 45, 47, 48; PortSwigger's pipelining-versus-smuggling checks; the
/// HTTP/2 preface after an HTTP/1.1 exchange.
fn pipelining() -> Vec<Case> {
    const F: &str = "pipelining";
    let mut cases = Vec::new();
    let g = |t: &str| format!("GET {t} HTTP/1.1\r\nHost: h\r\n\r\n");
    cases.push(case(
        F,
        "GET + GET",
        (g("/p1") + &g("/p2")).into_bytes(),
        fwd(vec![get("/p1"), get("/p2")]),
    ));
    let ten: String = (1..=10).map(|i| g(&format!("/p{i}"))).collect();
    cases.push(case(
        F,
        "ten GETs",
        ten.into_bytes(),
        fwd((1..=10).map(|i| get(&format!("/p{i}"))).collect()),
    ));
    cases.push(case(
        F,
        "GET + POST with a body + GET",
        format!(
            "{}POST /p2 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello{}",
            g("/p1"),
            g("/p3")
        )
        .into_bytes(),
        fwd(vec![
            get("/p1"),
            Sent::new("POST", "/p2").length(b"hello"),
            get("/p3"),
        ]),
    ));
    cases.push(case(
        F,
        "POST chunked + GET",
        format!(
            "POST /p1 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n{}",
            g("/p2")
        )
        .into_bytes(),
        fwd(vec![Sent::new("POST", "/p1").chunked(b"hello"), get("/p2")]),
    ));
    cases.push(case(
        F,
        "HEAD + GET",
        format!("HEAD /p1 HTTP/1.1\r\nHost: h\r\n\r\n{}", g("/p2")).into_bytes(),
        fwd(vec![Sent::new("HEAD", "/p1"), get("/p2")]),
    ));
    cases.push(case(
        F,
        "GET with CL 0 + GET",
        format!(
            "GET /p1 HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n{}",
            g("/p2")
        )
        .into_bytes(),
        fwd(vec![get("/p1"), get("/p2")]),
    ));
    let inner = g("/smuggled");
    cases.push(case(
        F,
        "POST whose body is a request + GET",
        format!(
            "POST /p1 HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\n{inner}{}",
            inner.len(),
            g("/p2")
        )
        .into_bytes(),
        fwd(vec![
            Sent::new("POST", "/p1").length(inner.as_bytes()),
            get("/p2"),
        ]),
    ));
    cases.push(case(
        F,
        "garden 48: POST CL 0 + POST whose body is a request + GET",
        format!(
            "POST /p1 HTTP/1.1\r\nContent-Length: 0\r\nConnection:keep-alive\r\nHost: a\r\nid: 0\r\n\r\nPOST /p2 HTTP/1.1\r\nHost: a\r\nid: 1\r\nContent-Length: {}\r\n\r\n{inner}GET /p3 HTTP/1.1\r\nHost: a\r\nid: 2\r\n\r\n",
            inner.len()
        )
        .into_bytes(),
        fwd(vec![
            Sent::new("POST", "/p1"),
            Sent::new("POST", "/p2").length(inner.as_bytes()),
            get("/p3"),
        ]),
    ));
    cases.push(case(
        F,
        "garden 45: Connection: close + invalid",
        b"GET /p1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\nInvalid\r\n\r\n".to_vec(),
        fwd(vec![get("/p1")]).then(Then::Closed),
    ));
    cases.push(case(
        F,
        "Connection: close + GET",
        format!(
            "GET /p1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n{}",
            g("/p2")
        )
        .into_bytes(),
        fwd(vec![get("/p1")]).then(Then::Closed),
    ));
    let bad_then = Then::Refused {
        status: 400,
        code: Some("bad_request"),
        close: true,
    };
    cases.push(case(
        F,
        "GET + invalid Content-Length",
        format!(
            "{}GET /p2 HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\nhello",
            g("/p1")
        )
        .into_bytes(),
        fwd(vec![get("/p1")]).then(bad_then.clone()),
    ));
    let preface: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    cases.push(case(
        F,
        "GET + HTTP/2 preface, one write",
        cat(&[g("/p1").as_bytes(), preface]),
        fwd(vec![get("/p1")]).then(bad_then.clone()),
    ));
    cases.push(
        case(
            F,
            "GET, then the HTTP/2 preface",
            g("/p1").into_bytes(),
            fwd(vec![get("/p1")]).then(bad_then.clone()),
        )
        .followup(preface),
    );
    cases.push(
        case(
            F,
            "GET, then the preface and a SETTINGS frame",
            g("/p1").into_bytes(),
            fwd(vec![get("/p1")]).then(bad_then),
        )
        .followup(&cat(&[preface, b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"])),
    );
    cases
}

fn request_cases() -> Vec<Case> {
    [
        cl_te(),
        te_obfuscation(),
        te_values(),
        content_length(),
        chunked(),
        head_syntax(),
        request_line(),
        targets(),
        host(),
        upgrade(),
        pipelining(),
    ]
    .concat()
}

// ---------------------------------------------------------------------------------------------
// The fake upstream
// ---------------------------------------------------------------------------------------------

/// A request the fake upstream received whole.
#[derive(Debug, Clone)]
struct Received {
    head: Vec<u8>,
    method: String,
    target: String,
    /// Names lowercase, values as sent.
    fields: Vec<(String, Vec<u8>)>,
    /// Decoded.
    body: Vec<u8>,
}

impl Received {
    fn values(&self, name: &str) -> Vec<&[u8]> {
        self.fields
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    fn summary(&self) -> String {
        let cl = self.values("content-length");
        let te = self.values("transfer-encoding");
        let framing = match (cl.first(), te.first()) {
            (_, Some(te)) => format!("te={}", escape(te)),
            (Some(cl), None) => format!("cl={}", escape(cl)),
            (None, None) => "no body".to_string(),
        };
        format!(
            "{} {} {framing} body={}",
            self.method,
            quoted(self.target.as_bytes()),
            escape(&self.body)
        )
    }
}

/// What the fake upstream did.
#[derive(Debug, Default)]
struct Log {
    requests: Vec<Received>,
    /// Bytes of requests that never came whole (the connection closed first).
    partial: Vec<Vec<u8>>,
    bytes: usize,
}

impl Log {
    fn summary(&self) -> String {
        let mut parts: Vec<String> = self.requests.iter().map(Received::summary).collect();
        parts.extend(
            self.partial
                .iter()
                .map(|p| format!("incomplete request {}", quoted(p))),
        );
        if parts.is_empty() {
            format!("nothing ({} bytes)", self.bytes)
        } else {
            parts.join("; ")
        }
    }
}

/// The upstream's answer to one request: each write on its own, then maybe a close.
struct Reply {
    writes: Vec<Vec<u8>>,
    close: bool,
}

type Responder = Arc<dyn Fn(&Received) -> Reply + Send + Sync>;

/// `200` with a body naming the request's target (none for `HEAD`).
fn answer_path(r: &Received) -> Vec<u8> {
    let body = format!("path={}", r.target);
    let mut out = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
    if r.method != "HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

fn default_responder() -> Responder {
    Arc::new(|r| Reply {
        writes: vec![answer_path(r)],
        close: false,
    })
}

/// A raw HTTP/1.1 server on `127.0.0.1:0` that records every request and answers as its
/// responder says. Its tasks end when it is dropped.
struct FakeUpstream {
    addr: SocketAddr,
    log: Arc<Mutex<Log>>,
    /// How many replies were written in full.
    replies: watch::Receiver<usize>,
    _tasks: JoinSet<()>,
}

impl FakeUpstream {
    async fn start(responder: Responder) -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let (replied, replies) = watch::channel(0);
        let mut tasks = JoinSet::new();
        let accept_log = log.clone();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                conns.spawn(serve_upstream(
                    stream,
                    accept_log.clone(),
                    responder.clone(),
                    replied.clone(),
                ));
                while conns.try_join_next().is_some() {}
            }
        });
        FakeUpstream {
            addr,
            log,
            replies,
            _tasks: tasks,
        }
    }
}

/// Reads requests on one connection (head, then the body by its framing) and answers each.
async fn serve_upstream(
    mut stream: TcpStream,
    log: Arc<Mutex<Log>>,
    responder: Responder,
    replied: watch::Sender<usize>,
) {
    let mut buf = Vec::new();
    loop {
        let request = loop {
            match parse_request(&buf) {
                Ok(Some((request, used))) => {
                    buf.drain(..used);
                    break request;
                }
                Ok(None) => {}
                Err(_) => {
                    log.lock().unwrap().partial.push(buf.clone());
                    return;
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            let read = tokio::time::timeout(UPSTREAM_IDLE, stream.read(&mut chunk)).await;
            match read {
                Ok(Ok(n)) if n > 0 => {
                    log.lock().unwrap().bytes += n;
                    buf.extend_from_slice(&chunk[..n]);
                }
                _ => {
                    if !buf.is_empty() {
                        log.lock().unwrap().partial.push(buf);
                    }
                    return;
                }
            }
        };
        let reply = responder(&request);
        log.lock().unwrap().requests.push(request);
        for write in &reply.writes {
            if stream.write_all(write).await.is_err() || stream.flush().await.is_err() {
                return;
            }
        }
        replied.send_modify(|n| *n += 1);
        if reply.close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// A whole request at the front of `buf` and its length; `None` while incomplete.
fn parse_request(buf: &[u8]) -> Result<Option<(Received, usize)>, String> {
    let mut storage = vec![httparse::EMPTY_HEADER; 512];
    let mut req = httparse::Request::new(&mut storage);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let fields = fields_of(req.headers);
    let mut received = Received {
        head: buf[..head_len].to_vec(),
        method: req.method.unwrap_or_default().to_string(),
        target: req.path.unwrap_or_default().to_string(),
        fields,
        body: Vec::new(),
    };
    let te = received.values("transfer-encoding");
    let cl = received.values("content-length");
    let rest = &buf[head_len..];
    if let Some(last) = te.last() {
        if !last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            return Err("not chunked".into());
        }
        let Some(body) = dechunk(rest)? else {
            return Ok(None);
        };
        received.body = body.data;
        return Ok(Some((received, head_len + body.len)));
    }
    let mut length = None;
    for v in cl {
        for part in v.split(|b| *b == b',') {
            let n: u64 = std::str::from_utf8(part.trim_ascii())
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or("bad content-length")?;
            if length.is_some_and(|l| l != n) {
                return Err("differing content-length".into());
            }
            length = Some(n);
        }
    }
    let n = usize::try_from(length.unwrap_or(0)).map_err(|e| e.to_string())?;
    if rest.len() < n {
        return Ok(None);
    }
    received.body = rest[..n].to_vec();
    Ok(Some((received, head_len + n)))
}

fn fields_of(headers: &[httparse::Header<'_>]) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
        .collect()
}

/// A decoded chunked body.
struct Dechunked {
    data: Vec<u8>,
    trailers: Vec<(String, Vec<u8>)>,
    /// Bytes it took on the wire.
    len: usize,
}

/// Decodes a chunked body at the front of `buf` (strictly: CRLF line ends, hex sizes);
/// `None` while incomplete.
fn dechunk(buf: &[u8]) -> Result<Option<Dechunked>, String> {
    let mut at = 0;
    let mut data = Vec::new();
    loop {
        let Some(eol) = find(&buf[at..], b"\r\n") else {
            return Ok(None);
        };
        let line = &buf[at..at + eol];
        let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        let rest = line[digits..].trim_ascii_start();
        if digits == 0
            || digits > 16
            || !(rest.is_empty() || rest[0] == b';')
            || line.contains(&b'\n')
        {
            return Err(format!("bad chunk-size line {}", quoted(line)));
        }
        let size = usize::from_str_radix(std::str::from_utf8(&line[..digits]).unwrap(), 16)
            .map_err(|e| e.to_string())?;
        at += eol + 2;
        if size == 0 {
            let mut trailers = Vec::new();
            loop {
                let Some(eol) = find(&buf[at..], b"\r\n") else {
                    return Ok(None);
                };
                let line = &buf[at..at + eol];
                at += eol + 2;
                if line.is_empty() {
                    return Ok(Some(Dechunked {
                        data,
                        trailers,
                        len: at,
                    }));
                }
                let colon = line
                    .iter()
                    .position(|b| *b == b':')
                    .filter(|_| !line.contains(&b'\n'))
                    .ok_or_else(|| format!("bad trailer line {}", quoted(line)))?;
                trailers.push((
                    String::from_utf8_lossy(&line[..colon]).to_ascii_lowercase(),
                    line[colon + 1..].trim_ascii().to_vec(),
                ));
            }
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        data.extend_from_slice(&buf[at..at + size]);
        at += size;
        if &buf[at..at + 2] != b"\r\n" {
            return Err("chunk data not followed by CRLF".into());
        }
        at += 2;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

/// An answer the client read.
#[derive(Debug)]
struct Answer {
    status: u16,
    fields: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    /// Came chunked.
    chunked: bool,
    trailers: Vec<(String, Vec<u8>)>,
}

impl Answer {
    fn values(&self, name: &str) -> Vec<&[u8]> {
        self.fields
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    fn summary(&self) -> String {
        format!("{} {}", self.status, quoted(&self.body))
    }

    /// Whether this answer closes the connection.
    fn closes(&self) -> bool {
        self.values("connection")
            .iter()
            .any(|v| v.eq_ignore_ascii_case(b"close"))
    }
}

/// A raw client connection to the proxy; every read has a deadline.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

enum Fill {
    Data,
    Eof,
    Reset,
    Timeout,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Result<Client, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        Ok(Client {
            stream,
            buf: Vec::new(),
        })
    }

    /// Writes `bytes`; a proxy that stops reading a refused request may leave some unwritten.
    async fn send(&mut self, bytes: &[u8]) {
        let _ = tokio::time::timeout(WRITE, self.stream.write_all(bytes)).await;
    }

    async fn fill(&mut self, deadline: Instant) -> Fill {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
            Err(_) => Fill::Timeout,
            Ok(Ok(0)) => Fill::Eof,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Fill::Data
            }
            Ok(Err(_)) => Fill::Reset,
        }
    }

    /// Reads more for `what`, or says why there is no more.
    async fn more(&mut self, deadline: Instant, what: &str) -> Result<(), String> {
        match self.fill(deadline).await {
            Fill::Data => Ok(()),
            Fill::Eof => Err(format!("closed before {what} (read {})", quoted(&self.buf))),
            Fill::Reset => Err(format!("reset before {what} (read {})", quoted(&self.buf))),
            Fill::Timeout => Err(format!(
                "timed out ({:?}) waiting for {what} (read {})",
                ANSWER,
                quoted(&self.buf)
            )),
        }
    }

    /// Reads one answer (skipping interim 1xx); `head_only` for the answer to a `HEAD`.
    async fn answer(&mut self, head_only: bool) -> Result<Answer, String> {
        self.answer_within(head_only, ANSWER).await
    }

    async fn answer_within(&mut self, head_only: bool, wait: Duration) -> Result<Answer, String> {
        let deadline = Instant::now() + wait;
        loop {
            let parsed = {
                let mut storage = vec![httparse::EMPTY_HEADER; 1024];
                let mut response = httparse::Response::new(&mut storage);
                match response.parse(&self.buf) {
                    Ok(httparse::Status::Complete(n)) => {
                        Some((n, response.code.unwrap_or(0), fields_of(response.headers)))
                    }
                    Ok(httparse::Status::Partial) => None,
                    Err(e) => return Err(format!("malformed answer ({e}): {}", quoted(&self.buf))),
                }
            };
            let Some((head_len, status, fields)) = parsed else {
                self.more(deadline, "the answer").await?;
                continue;
            };
            self.buf.drain(..head_len);
            if (100..200).contains(&status) && status != 101 {
                continue;
            }
            let mut answer = Answer {
                status,
                fields,
                body: Vec::new(),
                chunked: false,
                trailers: Vec::new(),
            };
            if head_only || status == 204 || status == 304 || (100..200).contains(&status) {
                return Ok(answer);
            }
            let chunked = answer
                .values("transfer-encoding")
                .last()
                .is_some_and(|v| v.eq_ignore_ascii_case(b"chunked"));
            if chunked {
                loop {
                    match dechunk(&self.buf) {
                        Ok(Some(body)) => {
                            self.buf.drain(..body.len);
                            answer.body = body.data;
                            answer.trailers = body.trailers;
                            answer.chunked = true;
                            return Ok(answer);
                        }
                        Ok(None) => self.more(deadline, "the rest of a chunked body").await?,
                        Err(e) => {
                            return Err(format!("malformed chunked body from the proxy: {e}"))
                        }
                    }
                }
            }
            if let Some(cl) = answer.values("content-length").first() {
                // A list of equal values (`5, 5`) reads as one, so that a check can say so.
                let values: Option<Vec<usize>> = std::str::from_utf8(cl)
                    .ok()
                    .map(|s| s.split(',').map(|v| v.trim().parse().ok()).collect())
                    .and_then(|v: Vec<Option<usize>>| v.into_iter().collect());
                let n = match values.as_deref() {
                    Some([first, rest @ ..]) if rest.iter().all(|v| v == first) => *first,
                    _ => return Err(format!("bad content-length from the proxy: {}", quoted(cl))),
                };
                while self.buf.len() < n {
                    self.more(deadline, "the rest of a sized body").await?;
                }
                answer.body = self.buf.drain(..n).collect();
                return Ok(answer);
            }
            // Close-delimited.
            loop {
                match self.fill(deadline).await {
                    Fill::Data => {}
                    Fill::Eof | Fill::Reset => {
                        answer.body = std::mem::take(&mut self.buf);
                        return Ok(answer);
                    }
                    Fill::Timeout => {
                        return Err(format!(
                            "a close-delimited body did not end within {wait:?}"
                        ))
                    }
                }
            }
        }
    }

    /// The connection closes with nothing more on it.
    async fn closes(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + CLOSE;
        loop {
            if !self.buf.is_empty() {
                return Err(format!(
                    "more bytes after the answer: {}",
                    quoted(&self.buf)
                ));
            }
            match self.fill(deadline).await {
                Fill::Data => {}
                Fill::Eof | Fill::Reset => return Ok(()),
                Fill::Timeout => {
                    return Err(format!(
                        "the connection stayed open {CLOSE:?} after the answer"
                    ))
                }
            }
        }
    }
}

/// An error answer of the proxy's own: `status`, a JSON body with `error` (`code` when given)
/// and `message`.
fn check_error(a: &Answer, status: u16, code: Option<&str>) -> Result<(), String> {
    if a.status != status {
        return Err(format!("got {}, expected {status}", a.summary()));
    }
    let json = a
        .values("content-type")
        .first()
        .is_some_and(|v| v.starts_with(b"application/json"));
    let body: Option<serde_json::Value> = serde_json::from_slice(&a.body).ok();
    let error = body.as_ref().and_then(|b| b["error"].as_str());
    let message = body.as_ref().and_then(|b| b["message"].as_str());
    if !json || error.is_none() || message.is_none() {
        return Err(format!(
            "got {} without the JSON error body (content-type {})",
            a.summary(),
            list(&a.values("content-type"))
        ));
    }
    if let Some(code) = code {
        if error != Some(code) {
            return Err(format!("got {}, expected error {code:?}", a.summary()));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Running request cases
// ---------------------------------------------------------------------------------------------

/// Runs one case on a route of its own; `Err` says what happened instead. A wrong answer
/// ends the run; past the answers, every mismatch is listed (a missing JSON body, a connection
/// left open, what reached the upstream).
async fn check_run(
    addr: SocketAddr,
    run: &Run,
    log: &Mutex<Log>,
    tokens: &IssuedTokens,
) -> Result<(), String> {
    let mut client = Client::connect(addr).await?;
    client.send(&run.request).await;
    let mut seen = Vec::new();
    let mut last_closes = false;
    for (i, sent) in run.expect.forwarded.iter().enumerate() {
        let a = client
            .answer(sent.method == "HEAD")
            .await
            .map_err(|e| format!("answer {}: {e}; before it: {seen:?}", i + 1))?;
        let body = format!("path={}", sent.target);
        if a.status != 200 || (sent.method != "HEAD" && a.body != body.as_bytes()) {
            return Err(format!(
                "answer {} was {}, expected 200 {body:?}; before it: {seen:?}",
                i + 1,
                a.summary()
            ));
        }
        last_closes = a.closes();
        seen.push(a.summary());
    }
    if let Some(followup) = &run.followup {
        client.send(followup).await;
    }
    let mut problems = Vec::new();
    match &run.expect.then {
        Then::Open if last_closes => problems.push(
            "the answer said connection: close; expected the connection to stay open".to_string(),
        ),
        Then::Open => {
            client.send(SENTINEL).await;
            match client.answer(false).await {
                Err(e) => problems.push(format!("a further request on the connection: {e}")),
                Ok(a)
                    if a.status != 200
                        || a.body != format!("path={SENTINEL_TARGET}").as_bytes() =>
                {
                    problems.push(format!(
                        "a further request on the connection got {} (a request was split wrong?)",
                        a.summary()
                    ))
                }
                Ok(_) => {}
            }
        }
        Then::Closed => problems.extend(client.closes().await.err()),
        Then::Refused {
            status,
            code,
            close,
        } => {
            let a = client.answer(false).await?;
            if a.status != *status {
                return Err(format!("got {}, expected {status}", a.summary()));
            }
            problems.extend(check_error(&a, *status, *code).err());
            if *close {
                problems.extend(client.closes().await.err());
            }
        }
        Then::Any => {}
    }
    let log = log.lock().unwrap();
    let got: Vec<&Received> = log
        .requests
        .iter()
        .filter(|r| r.target != SENTINEL_TARGET)
        .collect();
    if got.len() != run.expect.forwarded.len() {
        problems.push(format!(
            "the upstream got {} requests, expected {}",
            got.len(),
            run.expect.forwarded.len()
        ));
    } else {
        for (sent, r) in run.expect.forwarded.iter().zip(&got) {
            problems.extend(check_received(sent, r, tokens).err());
        }
    }
    if !run.expect.partial_ok && !log.partial.is_empty() {
        problems.push("the upstream got an incomplete request".into());
    }
    if run.expect.forwarded.is_empty() && !run.expect.partial_ok && log.bytes > 0 {
        problems.push(format!("{} bytes reached the upstream", log.bytes));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// The upstream got `sent`: method, target, framing, body, the token, one Host, CRLF line ends,
/// no upgrade unless a WebSocket one, and the case's own field checks.
fn check_received(sent: &Sent, r: &Received, tokens: &IssuedTokens) -> Result<(), String> {
    let what = format!("upstream request {}", r.summary());
    if r.method != sent.method || r.target != sent.target {
        return Err(format!(
            "{what}: expected {} {}",
            sent.method,
            escape(sent.target.as_bytes())
        ));
    }
    if r.head.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r') || r.head.first() == Some(&b'\n') {
        return Err(format!("{what}: its head has a bare LF"));
    }
    let cl = r.values("content-length");
    let te = r.values("transfer-encoding");
    let number = |v: &[u8]| -> Option<u64> {
        if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(v).ok()?.parse().ok()
    };
    let framed = match sent.framing {
        Framing::Empty => {
            te.is_empty() && (cl.is_empty() || cl.len() == 1 && number(cl[0]) == Some(0))
        }
        Framing::Length(n) => te.is_empty() && cl.len() == 1 && number(cl[0]) == Some(n),
        Framing::Chunked => {
            cl.is_empty() && te.len() == 1 && te[0].eq_ignore_ascii_case(b"chunked")
        }
    };
    if !framed {
        return Err(format!(
            "{what}: content-length {} / transfer-encoding {}, expected {:?}",
            list(&cl),
            list(&te),
            sent.framing
        ));
    }
    if r.body != sent.body {
        return Err(format!("{what}: expected body {}", quoted(&sent.body)));
    }
    let auth = r.values("authorization");
    let stamped = auth.len() == 1
        && auth[0]
            .strip_prefix(b"Bearer ")
            .and_then(|t| std::str::from_utf8(t).ok())
            .is_some_and(|t| tokens.is_current(t));
    if !stamped {
        return Err(format!(
            "{what}: authorization {}, expected exactly one with the current token",
            list(&auth)
        ));
    }
    if r.values("host").len() != 1 {
        return Err(format!("{what}: {} host fields", r.values("host").len()));
    }
    let connection_upgrade = r
        .values("connection")
        .iter()
        .flat_map(|v| v.split(|b| *b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"));
    let upgrade = r.values("upgrade");
    if sent.upgrade {
        if !(connection_upgrade
            && upgrade.len() == 1
            && upgrade[0].eq_ignore_ascii_case(b"websocket"))
        {
            return Err(format!(
                "{what}: expected upgrade: websocket and connection: upgrade, got upgrade {}",
                list(&upgrade)
            ));
        }
    } else if connection_upgrade || !upgrade.is_empty() || !r.values("http2-settings").is_empty() {
        return Err(format!(
            "{what}: an upgrade went on (upgrade {}, connection {}, http2-settings {})",
            list(&upgrade),
            list(&r.values("connection")),
            r.values("http2-settings").len()
        ));
    }
    for check in &sent.fields {
        let ok = match check {
            Field::Is(name, value) => r.values(name) == [value.as_slice()],
            Field::All(name, values) => {
                r.values(name) == values.iter().map(Vec::as_slice).collect::<Vec<_>>()
            }
            Field::Absent(name) => r.values(name).is_empty(),
        };
        if !ok {
            let name = match check {
                Field::Is(n, _) | Field::All(n, _) | Field::Absent(n) => n,
            };
            return Err(format!(
                "{what}: field {name} is {}, expected {check:?}",
                list(&r.values(name))
            ));
        }
    }
    Ok(())
}

/// The proxy, on one route per upstream, all with one credential from `idp`.
async fn proxy_for(idp: &DemoServer<IdpState>, upstreams: &[FakeUpstream]) -> Running {
    let mut text = format!(
        "shutdown_grace_secs = 0.2\n{}",
        credential("api", &demo::token_url(idp), "")
    );
    for up in upstreams {
        text.push_str(&route(&format!("http://{}/base", up.addr), "api", ""));
    }
    start_proxy(&text).await
}

fn render(run: &Run, why: &str, log: &str) -> String {
    format!(
        "[{}] {} ({})\n    sent:     {}\n    expected: {}\n    observed: {why}\n    upstream: {log}",
        run.family,
        run.name,
        run.form,
        quoted(&run.request),
        describe(&run.expect)
    )
}

fn describe(expect: &Expect) -> String {
    let mut parts: Vec<String> = expect
        .forwarded
        .iter()
        .map(|s| {
            format!(
                "forwarded {} {} {:?}",
                s.method,
                quoted(s.target.as_bytes()),
                s.framing
            )
        })
        .collect();
    parts.push(match &expect.then {
        Then::Open => "connection stays open".into(),
        Then::Closed => "connection closes".into(),
        Then::Refused {
            status,
            code,
            close,
        } => {
            let close = if *close { " and close" } else { "" };
            let what = if expect.forwarded.is_empty() {
                if expect.partial_ok {
                    "no whole request upstream"
                } else {
                    "nothing upstream"
                }
            } else {
                "nothing more upstream"
            };
            format!("{status} {}{close}, {what}", code.unwrap_or("(any error)"))
        }
        Then::Any => "then anything".into(),
    });
    parts.join("; ")
}

/// Field values as a list of quoted strings.
fn list(values: &[&[u8]]) -> String {
    let quoted: Vec<String> = values.iter().map(|v| quoted(v)).collect();
    format!("[{}]", quoted.join(", "))
}

/// Fields as `name: "value"` pairs.
fn field_list(fields: &[(String, Vec<u8>)]) -> String {
    let shown: Vec<String> = fields
        .iter()
        .map(|(n, v)| format!("{n}: {}", quoted(v)))
        .collect();
    format!("[{}]", shown.join(", "))
}

/// Bytes as an escaped string in quotes, long ones cut.
fn quoted(bytes: &[u8]) -> String {
    format!("\"{}\"", escape(bytes))
}

/// Bytes as an escaped string, long ones cut.
fn escape(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(300)];
    let mut text: String = shown
        .iter()
        .flat_map(|b| std::ascii::escape_default(*b))
        .map(char::from)
        .collect();
    if bytes.len() > shown.len() {
        text.push_str(&format!("...({} bytes)", bytes.len()));
    }
    text
}

/// Runs `runs` in batches, each case on its own route and upstream; the failures, rendered.
async fn run_requests(runs: Vec<Run>) -> Vec<String> {
    let idp = start_token_endpoint(Duration::from_secs(3600)).await;
    let tokens = idp.state().tokens.clone();
    let mut failures = Vec::new();
    for batch in runs.chunks(BATCH) {
        let mut upstreams = Vec::new();
        for _ in batch {
            upstreams.push(FakeUpstream::start(default_responder()).await);
        }
        let proxy = proxy_for(&idp, &upstreams).await;
        let mut set = JoinSet::new();
        for (i, (run, addr)) in batch.iter().zip(proxy.route_addrs()).enumerate() {
            let run = run.clone();
            let log = upstreams[i].log.clone();
            let tokens = tokens.clone();
            set.spawn(async move { (i, check_run(addr, &run, &log, &tokens).await) });
        }
        let mut results: Vec<Option<Result<(), String>>> = vec![None; batch.len()];
        while let Some(joined) = set.join_next().await {
            let (i, result) = joined.expect("a case task");
            results[i] = Some(result);
        }
        for (i, result) in results.into_iter().enumerate() {
            if let Some(Err(why)) = result {
                let log = upstreams[i].log.lock().unwrap().summary();
                failures.push(render(&batch[i], &why, &log));
            }
        }
        proxy.shutdown().await;
    }
    failures
}

/// `family: n` for each family, in order of first appearance.
fn per_family<'a>(families: impl Iterator<Item = &'a str>) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for f in families {
        match counts.iter_mut().find(|(name, _)| *name == f) {
            Some((_, n)) => *n += 1,
            None => counts.push((f, 1)),
        }
    }
    counts
        .iter()
        .map(|(f, n)| format!("{f} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::test]
async fn request_corpus() {
    let cases = request_cases();
    let runs = runs(&cases);
    let total = runs.len();
    let started = Instant::now();
    let failures = run_requests(runs).await;
    println!(
        "conformance requests: {} cases, {total} runs in {:?} ({}); {} failed",
        cases.len(),
        started.elapsed(),
        per_family(cases.iter().map(|c| c.family)),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {total} request runs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// The response corpus
// ---------------------------------------------------------------------------------------------

type AnswerCheck = Arc<dyn Fn(&Answer) -> Result<(), String> + Send + Sync>;

/// What a response case does through the proxy, and what it must see.
enum Script {
    /// One request; its answer must pass the check.
    Answer {
        request: Vec<u8>,
        check: AnswerCheck,
    },
    /// One request; the client must not get a whole 2xx answer, and must get a 5xx or see the
    /// connection close within a few seconds.
    Incomplete { request: Vec<u8> },
    /// A first client's request, answered with stray bytes after its framed end; then a second
    /// client, on a connection of its own, must get the answer to its own request.
    Pool { first: Vec<u8>, head_only: bool },
}

struct ResponseCase {
    family: &'static str,
    name: String,
    responder: Responder,
    script: Script,
}

const GET_R: &[u8] = b"GET /r HTTP/1.1\r\nHost: h\r\n\r\n";

/// A responder that writes `bytes` to every request.
fn canned(bytes: Vec<u8>, close: bool) -> Responder {
    Arc::new(move |_| Reply {
        writes: vec![bytes.clone()],
        close,
    })
}

fn answer_case(
    family: &'static str,
    name: impl Into<String>,
    responder: Responder,
    request: &[u8],
    check: impl Fn(&Answer) -> Result<(), String> + Send + Sync + 'static,
) -> ResponseCase {
    ResponseCase {
        family,
        name: name.into(),
        responder,
        script: Script::Answer {
            request: request.to_vec(),
            check: Arc::new(check),
        },
    }
}

/// The body is `body` and no `content-length` disagrees with it.
fn whole_body(a: &Answer, body: &[u8]) -> Result<(), String> {
    if a.status != 200 || a.body != body {
        return Err(format!(
            "got {}, expected 200 {}",
            a.summary(),
            quoted(body)
        ));
    }
    let cl = a.values("content-length");
    let agrees = match cl.as_slice() {
        [] => a.chunked,
        [one] => *one == body.len().to_string().as_bytes() && !a.chunked,
        _ => false,
    };
    if !agrees {
        return Err(format!(
            "content-length {} with chunked={} for a body of {}",
            list(&cl),
            a.chunked,
            body.len()
        ));
    }
    Ok(())
}

/// S1. Both framings in a response (RFC 9112 §6.3: chunked wins, and the message must not be
/// passed on with a disagreeing Content-Length).
fn resp_cl_te() -> Vec<ResponseCase> {
    const F: &str = "resp-cl-te";
    let body = b"b\r\nhello world\r\n0\r\n\r\n";
    let heads: [(&str, &str, bool); 5] = [
        (
            "CL then TE",
            "content-length: 5\r\ntransfer-encoding: chunked\r\n",
            false,
        ),
        (
            "TE then CL",
            "transfer-encoding: chunked\r\ncontent-length: 5\r\n",
            false,
        ),
        (
            "CL larger than the body",
            "content-length: 100\r\ntransfer-encoding: chunked\r\n",
            false,
        ),
        (
            "CL 0",
            "content-length: 0\r\ntransfer-encoding: chunked\r\n",
            false,
        ),
        (
            "TE then CL, closing",
            "transfer-encoding: chunked\r\ncontent-length: 5\r\n",
            true,
        ),
    ];
    heads
        .into_iter()
        .map(|(name, fields, close)| {
            let bytes = cat(&[format!("HTTP/1.1 200 OK\r\n{fields}\r\n").as_bytes(), body]);
            answer_case(F, name, canned(bytes, close), GET_R, |a| {
                whole_body(a, b"hello world")
            })
        })
        .collect()
}

/// S2. Malformed chunk syntax in a response (http-garden's chunk-size trophies 1, 22, 25 and
/// transducer 19, 13 on the response side).
fn resp_chunked() -> Vec<ResponseCase> {
    const F: &str = "resp-chunked";
    let bodies: [(&str, &[u8]); 9] = [
        ("plus sign", b"+5\r\nhello\r\n0\r\n\r\n"),
        ("minus sign", b"-5\r\nhello\r\n0\r\n\r\n"),
        ("spaces around the size", b" 5 \r\nhello\r\n0\r\n\r\n"),
        ("0x prefix", b"0x5\r\nhello\r\n0\r\n\r\n"),
        ("bare LF in an extension", b"5;a\nb\r\nhello\r\n0\r\n\r\n"),
        ("last chunk 0 LF LF", b"5\r\nhello\r\n0\n\n"),
        ("bare LF after the size", b"5\nhello\r\n0\r\n\r\n"),
        ("data not followed by CRLF", b"5\r\nhelloXX0\r\n\r\n"),
        (
            "bad second chunk",
            b"5\r\nhello\r\n+5\r\nworld\r\n0\r\n\r\n",
        ),
    ];
    bodies
        .into_iter()
        .map(|(name, body)| ResponseCase {
            family: F,
            name: name.into(),
            responder: canned(
                cat(&[
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                    body,
                ]),
                false,
            ),
            script: Script::Incomplete {
                request: GET_R.to_vec(),
            },
        })
        .collect()
}

/// S3. Trailer fields that must never reach the client (RFC 9110 §6.5.1: framing, routing,
/// authentication and cookie fields are not allowed as trailers); T-Reqs' `<trailer-part>`.
fn resp_trailers() -> Vec<ResponseCase> {
    const F: &str = "resp-trailers";
    let request = b"GET /t HTTP/1.1\r\nHost: h\r\nTE: trailers\r\n\r\n";
    let forbidden: [(&'static str, &str); 5] = [
        ("content-length", "5"),
        ("transfer-encoding", "chunked"),
        ("set-cookie", "session=stolen"),
        ("authorization", "Bearer leaked"),
        ("host", "evil.example"),
    ];
    let mut cases = Vec::new();
    for (name, value) in forbidden {
        let bytes = format!(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: X-Checksum, {name}\r\n\r\n5\r\nhello\r\n0\r\nX-Checksum: abc\r\n{name}: {value}\r\n\r\n"
        );
        cases.push(answer_case(
            F,
            format!("declared {name}"),
            canned(bytes.into_bytes(), false),
            request,
            move |a| {
                if a.status != 200 || a.body != b"hello" {
                    return Err(format!("got {}", a.summary()));
                }
                let leaked = a.trailers.iter().any(|(n, _)| n == name)
                    || (!matches!(name, "content-length" | "transfer-encoding")
                        && !a.values(name).is_empty())
                    || (name == "content-length" && !a.values(name).is_empty());
                if leaked {
                    return Err(format!(
                        "{name} reached the client (trailers {})",
                        field_list(&a.trailers)
                    ));
                }
                if !a
                    .trailers
                    .iter()
                    .any(|(n, v)| n == "x-checksum" && v == b"abc")
                {
                    return Err(format!(
                        "x-checksum did not arrive (trailers {})",
                        field_list(&a.trailers)
                    ));
                }
                Ok(())
            },
        ));
    }
    cases.push(answer_case(
        F,
        "declared X-Checksum only",
        canned(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: X-Checksum\r\n\r\n5\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n".to_vec(),
            false,
        ),
        request,
        |a| {
            if a.status == 200
                && a.body == b"hello"
                && a.trailers.iter().any(|(n, v)| n == "x-checksum" && v == b"abc")
            {
                Ok(())
            } else {
                Err(format!(
                    "got {} with trailers {}",
                    a.summary(),
                    field_list(&a.trailers)
                ))
            }
        },
    ));
    cases
}

/// S4. Repeated Content-Length in a response (http-garden trophies 23 and 33, response side).
fn resp_content_length() -> Vec<ResponseCase> {
    const F: &str = "resp-content-length";
    let mut cases = Vec::new();
    for (name, fields) in [
        (
            "two equal lines",
            "content-length: 5\r\ncontent-length: 5\r\n",
        ),
        ("list 5, 5", "content-length: 5, 5\r\n"),
    ] {
        let bytes = format!("HTTP/1.1 200 OK\r\n{fields}\r\nhello");
        cases.push(answer_case(
            F,
            name,
            canned(bytes.into_bytes(), false),
            GET_R,
            |a| {
                if a.status == 200 && a.body == b"hello" && a.values("content-length") == [b"5"] {
                    Ok(())
                } else {
                    Err(format!(
                        "got {} with content-length {}",
                        a.summary(),
                        list(&a.values("content-length"))
                    ))
                }
            },
        ));
    }
    for (name, fields) in [
        (
            "two differing lines",
            "content-length: 5\r\ncontent-length: 6\r\n",
        ),
        ("list 5, 6", "content-length: 5, 6\r\n"),
    ] {
        let bytes = format!("HTTP/1.1 200 OK\r\n{fields}\r\nhello!");
        cases.push(answer_case(
            F,
            name,
            canned(bytes.into_bytes(), false),
            GET_R,
            |a| check_error(a, 502, Some("upstream_unavailable")),
        ));
    }
    cases
}

/// S5. Response heads near the limits: many fields under 64 KiB pass whole, over 64 KiB is a
/// 502 that says so.
fn resp_head_size() -> Vec<ResponseCase> {
    const F: &str = "resp-head-size";
    let mut cases = Vec::new();
    for n in [129usize, 300] {
        let fields: String = (0..n).map(|i| format!("x-f-{i}: v{i}\r\n")).collect();
        let bytes = format!("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n{fields}\r\nhello");
        cases.push(answer_case(
            F,
            format!("{n} fields"),
            canned(bytes.into_bytes(), false),
            GET_R,
            move |a| {
                if a.status != 200 || a.body != b"hello" {
                    return Err(format!("got {}", a.summary()));
                }
                for i in 0..n {
                    let want = format!("v{i}");
                    if a.values(&format!("x-f-{i}")) != [want.as_bytes()] {
                        return Err(format!("field x-f-{i} did not arrive as {want}"));
                    }
                }
                Ok(())
            },
        ));
    }
    let too_large = |a: &Answer| {
        check_error(a, 502, Some("upstream_unavailable"))?;
        let body: serde_json::Value = serde_json::from_slice(&a.body).unwrap_or_default();
        if body["message"]
            .as_str()
            .is_some_and(|m| m.contains("response head too large"))
        {
            Ok(())
        } else {
            Err(format!(
                "the message does not say `response head too large`: {body}"
            ))
        }
    };
    let many: String = (0..70)
        .map(|i| format!("x-f-{i}: {}\r\n", "v".repeat(1000)))
        .collect();
    cases.push(answer_case(
        F,
        "70 fields of 1000 bytes",
        canned(
            format!("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n{many}\r\nhello").into_bytes(),
            false,
        ),
        GET_R,
        too_large,
    ));
    cases.push(answer_case(
        F,
        "one field of 70 KiB",
        canned(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-big: {}\r\n\r\nhello",
                "v".repeat(70 * 1024)
            )
            .into_bytes(),
            false,
        ),
        GET_R,
        too_large,
    ));
    cases
}

/// A full response that a confused pool would hand to the next request.
const STRAY: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\npath=/stray";

/// S6. Bytes after a response's framed end must not become the next client's answer
/// (http-garden's pipelining trophies, response side; RFC 9112 §9.3 on connection reuse).
fn pool_safety() -> Vec<ResponseCase> {
    const F: &str = "pool-safety";
    type Stray = fn(&Received) -> (Vec<Vec<u8>>, bool);
    let variants: [(&str, &[u8], bool, Stray); 11] = [
        (
            "HEAD, then a body in a second write",
            b"HEAD /a HTTP/1.1\r\nHost: h\r\n\r\n",
            true,
            |r| (vec![answer_path(r), STRAY.to_vec()], false),
        ),
        (
            "HEAD with a body in the same write",
            b"HEAD /a HTTP/1.1\r\nHost: h\r\n\r\n",
            true,
            |r| (vec![cat(&[&answer_path(r), STRAY])], false),
        ),
        ("204, then a body in a second write", GET_A, false, |_| {
            (
                vec![b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(), STRAY.to_vec()],
                false,
            )
        }),
        ("204 with a body in the same write", GET_A, false, |_| {
            (
                vec![cat(&[b"HTTP/1.1 204 No Content\r\n\r\n", STRAY])],
                false,
            )
        }),
        ("304, then a body in a second write", GET_A, false, |_| {
            (
                vec![
                    b"HTTP/1.1 304 Not Modified\r\netag: \"x\"\r\n\r\n".to_vec(),
                    STRAY.to_vec(),
                ],
                false,
            )
        }),
        (
            "more bytes than Content-Length, same write",
            GET_A,
            false,
            |r| (vec![cat(&[&answer_path(r), STRAY])], false),
        ),
        (
            "more bytes than Content-Length, second write",
            GET_A,
            false,
            |r| (vec![answer_path(r), STRAY.to_vec()], false),
        ),
        (
            "bytes after the last chunk, same write",
            GET_A,
            false,
            |r| (vec![cat(&[&chunked_path(r), STRAY])], false),
        ),
        (
            "bytes after the last chunk, second write",
            GET_A,
            false,
            |r| (vec![chunked_path(r), STRAY.to_vec()], false),
        ),
        (
            "unsolicited 408 on the idle connection",
            GET_A,
            false,
            |r| {
                (
                    vec![
                        answer_path(r),
                        b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n".to_vec(),
                    ],
                    false,
                )
            },
        ),
        ("unsolicited 408, then close", GET_A, false, |r| {
            (
                vec![
                    answer_path(r),
                    b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        .to_vec(),
                ],
                true,
            )
        }),
    ];
    variants
        .into_iter()
        .map(|(name, first, head_only, stray)| ResponseCase {
            family: F,
            name: name.into(),
            // Stray bytes after the first client's answer; plain answers to everything else.
            responder: Arc::new(move |r| {
                if r.target == "/base/a" {
                    let (writes, close) = stray(r);
                    Reply { writes, close }
                } else {
                    Reply {
                        writes: vec![answer_path(r)],
                        close: false,
                    }
                }
            }),
            script: Script::Pool {
                first: first.to_vec(),
                head_only,
            },
        })
        .collect()
}

const GET_A: &[u8] = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n";

/// `path=<target>`, chunked.
fn chunked_path(r: &Received) -> Vec<u8> {
    let body = format!("path={}", r.target);
    cat(&[
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
        &chunk(body.as_bytes()),
        b"0\r\n\r\n",
    ])
}

async fn check_response_case(
    addr: SocketAddr,
    case: &ResponseCase,
    mut replies: watch::Receiver<usize>,
) -> Result<(), String> {
    match &case.script {
        Script::Answer { request, check } => {
            let mut client = Client::connect(addr).await?;
            client.send(request).await;
            let a = client.answer(false).await?;
            check(&a)
        }
        Script::Incomplete { request } => {
            let mut client = Client::connect(addr).await?;
            client.send(request).await;
            match client.answer(false).await {
                Ok(a) if (500..600).contains(&a.status) => Ok(()),
                Ok(a) => Err(format!(
                    "got a whole answer: {} (chunked={})",
                    a.summary(),
                    a.chunked
                )),
                Err(e) if e.starts_with("closed") || e.starts_with("reset") => Ok(()),
                Err(e) if e.starts_with("malformed chunked body") => {
                    Err(format!("the proxy passed the bad chunk on: {e}"))
                }
                Err(e) => Err(e),
            }
        }
        Script::Pool { first, head_only } => {
            let mut a = Client::connect(addr).await?;
            a.send(first).await;
            let first_answer = a
                .answer(*head_only)
                .await
                .map_err(|e| format!("the first client: {e}"))?;
            if first_answer.status >= 500 {
                return Err(format!("the first client got {}", first_answer.summary()));
            }
            tokio::time::timeout(ANSWER, replies.wait_for(|n| *n >= 1))
                .await
                .map_err(|_| "the upstream did not finish its first reply".to_string())?
                .map_err(|e| e.to_string())?;
            let mut b = Client::connect(addr).await?;
            b.send(b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n").await;
            let answer = b
                .answer(false)
                .await
                .map_err(|e| format!("the second client: {e}"))?;
            if answer.status == 200 && answer.body == b"path=/base/b" {
                Ok(())
            } else {
                Err(format!(
                    "the second client got {}, expected 200 \"path=/base/b\"",
                    answer.summary()
                ))
            }
        }
    }
}

#[tokio::test]
async fn response_corpus() {
    let cases: Vec<ResponseCase> = [
        resp_cl_te(),
        resp_chunked(),
        resp_trailers(),
        resp_content_length(),
        resp_head_size(),
        pool_safety(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let started = Instant::now();
    let idp = start_token_endpoint(Duration::from_secs(3600)).await;
    let mut upstreams = Vec::new();
    for c in &cases {
        upstreams.push(FakeUpstream::start(c.responder.clone()).await);
    }
    let proxy = proxy_for(&idp, &upstreams).await;
    let cases = Arc::new(cases);
    let mut set = JoinSet::new();
    for (i, addr) in proxy.route_addrs().into_iter().enumerate() {
        let cases = cases.clone();
        let replies = upstreams[i].replies.clone();
        set.spawn(async move { (i, check_response_case(addr, &cases[i], replies).await) });
    }
    let mut failures = Vec::new();
    while let Some(joined) = set.join_next().await {
        let (i, result) = joined.expect("a case task");
        if let Err(why) = result {
            let c = &cases[i];
            let log = upstreams[i].log.lock().unwrap().summary();
            failures.push((
                i,
                format!(
                    "[{}] {}\n    observed: {why}\n    upstream: {log}",
                    c.family, c.name
                ),
            ));
        }
    }
    failures.sort();
    proxy.shutdown().await;
    println!(
        "conformance responses: {} cases in {:?} ({}); {} failed",
        cases.len(),
        started.elapsed(),
        per_family(cases.iter().map(|c| c.family)),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} response cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures
            .into_iter()
            .map(|(_, f)| f)
            .collect::<Vec<_>>()
            .join("\n")
    );
}
