//! The front door's HTTP/2 side: a client that opens with the HTTP/2 preface (h2c, "prior
//! knowledge") is served here, stream by stream, on the connection's own task (`h2::serve`).
//!
//! Why not hyper's server, as before: through it an h2c GET cost about 39,400 instructions
//! (callgrind), of which hyper's server side was about 27,800: its per-stream task, its body
//! channel, the header maps built from and back into HPACK. Here a stream the lean path can
//! take (a bodiless `GET`, `HEAD`, `DELETE` or `OPTIONS` with a plain target, on a route with
//! the lean path) is served as the HTTP/1.1 front door serves one: the upstream's request
//! head is written from the decoded fields ([`FrontRequest`]), and the upstream's response
//! head straight into an HPACK block for the client (`raw::ClientHead` with `http2`), no
//! header map on the way. Every other stream (a body, another method, a target the lean path
//! does not forward byte for byte) becomes a `Request` for the service's general path, as
//! hyper's server would have given it, and its `Response` goes back as hyper's server would
//! have sent it (`content-length` from an exact body size, a `date` where none came).
//!
//! The rules of the protocol live in `h2::server` (frames, streams, flow control, floods) and
//! `h2::request` (what a request head may hold); this module only joins them to the service.
//! A stream the client resets, or whose connection ends, has its work dropped at once, the
//! upstream exchange included, as hyper's server does (`h2::serve`).

use std::future::poll_fn;
use std::pin::Pin;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, DATE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::codec;
use super::deadline::Deadline;
use super::front::plain_target;
use super::h2::request::RequestHead;
use super::h2::serve::{self as h2serve, RequestBody, Stream};
use super::h2::server::Arrived;
use super::raw::{ClientFraming, ClientHead};
use super::service::{FrontAnswer, FrontPick, FrontRequest, ProxyService};
use super::spare;
use super::upload::ClientBody;
use super::{ProxyBody, ProxyError};
use crate::config::ClientLimits;

/// Serves the HTTP/2 connection `io`, whose first bytes (the preface, perhaps more) the
/// front door read into `first`, until the client closes it or `stop` fires (then the
/// streams open finish first).
pub async fn serve<T>(
    io: T,
    first: Bytes,
    service: &ProxyService,
    limits: &ClientLimits,
    stop: &CancellationToken,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    h2serve::serve(
        io,
        first,
        limits.max_header_bytes,
        stop,
        |key, id, arrived| respond(service, limits, Stream { key, id }, arrived),
    )
    .await
}

/// Serves one stream.
///
/// Its future is moved into its place among the connection's streams once per stream, so it
/// is kept small: what only the general path and the proxy's own answers need is boxed (the
/// general path's state, hyper's client and the header maps, would make every stream's
/// future many kilobytes), and what it holds is borrowed rather than moved from one future
/// into the next (each move would hold it twice).
async fn respond(service: &ProxyService, limits: &ClientLimits, stream: Stream, arrived: Arrived) {
    let Arrived::Request { head, body } = &arrived else {
        let e = ProxyError::HeadersTooLarge(format!(
            "the request's header fields are over this listener's limit of {} bytes (max_header_bytes)",
            limits.max_header_bytes
        ));
        let response = service.refusal(&Method::GET, e);
        return Box::pin(send_response(stream, response, false)).await;
    };
    let method = head.method().cloned().unwrap_or_default();
    if !*body && takes_lean_path(service, head, &method) {
        let mut answer = respond_lean(service, limits, stream, head, &method).await;
        match answer {
            // Borrowed, not moved out: the body stays where the answer is.
            Some(FrontAnswer::Streaming { ref mut body, .. }) => {
                return send_body(stream, body).await
            }
            Some(FrontAnswer::Response(response)) => {
                let head_only = method == Method::HEAD;
                return Box::pin(send_response(stream, *response, head_only)).await;
            }
            // The upstream refused `http/1.1` before anything was sent: the general path
            // takes the stream (and the route's later ones).
            Some(FrontAnswer::ToHyper) => {}
            // The head went out, with the end of the stream.
            None => return,
        }
    }
    Box::pin(respond_general(service, stream, head, *body, method)).await
}

/// Serves a stream through the general path.
async fn respond_general(
    service: &ProxyService,
    stream: Stream,
    head: &RequestHead,
    body: bool,
    method: Method,
) {
    let response = match request(head, stream, body, &method) {
        Ok(req) => service.handle_body(req).await,
        Err(e) => service.refusal(&method, e),
    };
    send_response(stream, response, method == Method::HEAD).await
}

/// Whether the lean path can take a bodiless stream with this head: as the HTTP/1.1 front
/// door's (`front::judge`), one of the bodiless methods to a target it forwards byte for
/// byte; and with a `host` (from `:authority`), which the lean path's checks want.
fn takes_lean_path(service: &ProxyService, head: &RequestHead, method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS
    ) && head.path().is_some_and(plain_target)
        && head.authority().is_some()
        && service.has_lean_path()
}

/// The lean exchange for a bodiless stream. Its response head is sent from here: `None` when
/// that was all (no body follows), else the answer whose body (or whole response) is left to
/// send.
async fn respond_lean(
    service: &ProxyService,
    limits: &ClientLimits,
    stream: Stream,
    head: &RequestHead,
    method: &Method,
) -> Option<FrontAnswer> {
    let path = head.path().unwrap_or_default();
    let mut view = FrontRequest::new(method, path, head.bytes(), head.fields(), head.te_trailers);
    // Borrowed for the exchange only, as the HTTP/1.1 side's (`spare.rs`): given back before
    // the body is sent, however long that takes.
    let mut b = spare::Scratch::take();
    let timer = b
        .timer
        .get_or_insert_with(|| Deadline::new(limits.header_read_timeout));
    let mut client = ClientHead {
        out: &mut b.out,
        close: false,
        // Trailers go to an HTTP/2 client whatever it sent, as hyper's server sends them.
        te: false,
        trailers: Vec::new(),
        relocate: None,
        http2: true,
    };
    let answer = match service.pick_front(&view, &mut client) {
        FrontPick::Refused(response) => FrontAnswer::Response(response),
        FrontPick::ToHyper => FrontAnswer::ToHyper,
        FrontPick::Route(route, cut) => {
            view.rest = &view.target[cut..];
            route
                .serve_front(&view, &mut b.up, &mut client, timer)
                .await
        }
        FrontPick::Normalised(normalised) => {
            let (view, up, client) = (&view, &mut b.up, &mut client);
            Box::pin(async move {
                let (route, target, cut) = *normalised;
                let view = view.with_rest(&target.as_bytes()[cut..]);
                route.serve_front(&view, up, client, timer).await
            })
            .await
        }
    };
    let answer = match answer {
        FrontAnswer::Streaming { body, framing } => {
            let end = framing == ClientFraming::None || body.is_end_stream();
            let sent = h2serve::with(stream.key, |s| s.send_block(stream.id, &b.out, end));
            if end || !matches!(sent, Some(Ok(()))) {
                None
            } else {
                Some(FrontAnswer::Streaming { body, framing })
            }
        }
        other => Some(other),
    };
    b.give_back();
    answer
}

/// The stream's request as the service's general path takes it, made as hyper's server
/// makes one: the URI from `:scheme`, `:authority` and `:path`, the fields the client sent
/// (no `host` unless it sent one), its body read from the stream.
fn request(
    head: &RequestHead,
    stream: Stream,
    body: bool,
    method: &Method,
) -> Result<Request<ClientBody>, ProxyError> {
    let mut uri = Uri::builder();
    if let Some(scheme) = head.scheme() {
        uri = uri.scheme(scheme);
    }
    if let Some(authority) = head.authority() {
        uri = uri.authority(authority);
    }
    if let Some(path) = head.path() {
        uri = uri.path_and_query(path);
    }
    let uri = uri.build().map_err(|_| {
        ProxyError::BadRequest(
            "the request's :scheme, :authority and :path do not make a valid URI".into(),
        )
    })?;
    let mut headers = HeaderMap::with_capacity(head.fields().len());
    for (name, value) in head.pairs() {
        if head.host_from_authority && name == b"host" {
            continue;
        }
        match (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            (Ok(name), Ok(value)) => {
                headers.append(name, value);
            }
            _ => {
                return Err(ProxyError::BadRequest(
                    "a request header field that is not valid".into(),
                ))
            }
        }
    }
    let length = if body { head.length } else { Some(0) };
    let mut req = Request::new(ClientBody::H2(RequestBody::new(stream, length)));
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_2;
    *req.headers_mut() = headers;
    Ok(req)
}

/// Sends a response of the general path (or one of the proxy's own), as hyper's server
/// would: its fields (connection-specific ones left out), `content-length` where the body's
/// size is known and none was given, a `date` where none was given, then the body.
async fn send_response(stream: Stream, response: Response<ProxyBody>, head_only: bool) {
    let (parts, mut body) = response.into_parts();
    let status = parts.status;
    let end = head_only || body.is_end_stream() || !codec::response_has_body(&Method::GET, status);
    let mut length = Vec::new();
    if let (Some(n), false) = (
        body.size_hint().exact(),
        parts.headers.contains_key(CONTENT_LENGTH),
    ) {
        if codec::response_has_body(&Method::GET, status) {
            length = n.to_string().into_bytes();
        }
    }
    let mut date = Vec::new();
    if !parts.headers.contains_key(DATE) {
        codec::date(&mut date);
    }
    let fields = parts
        .headers
        .iter()
        .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()))
        .chain((!length.is_empty()).then_some((&b"content-length"[..], &length[..])))
        .chain((!date.is_empty()).then_some((&b"date"[..], &date[..])));
    if stream.head(status, fields, end).is_err() || end {
        return;
    }
    send_body(stream, &mut body).await
}

/// Sends `body` on `stream`, then ends it: with the body's trailers if it has some. A body
/// that breaks off leaves the stream unfinished, and the stream is reset (`h2::serve`), so
/// the client sees it was cut.
async fn send_body<B>(stream: Stream, body: &mut B)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    loop {
        let frame = poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await;
        match frame {
            None => {
                let _ = stream.send(Bytes::new(), true).await;
                return;
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "the response body broke off");
                return;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let end = body.is_end_stream();
                    if stream.send(data, end).await.is_err() || end {
                        return;
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = stream.trailers(&trailers);
                    } else {
                        let _ = stream.send(Bytes::new(), true).await;
                    }
                    return;
                }
            },
        }
    }
}
