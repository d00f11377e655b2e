//! The request path: a client request becomes an upstream request with the token stamped on,
//! and the upstream's response (or the proxy's own JSON error) goes back.
//!
//! Data flows one way through the modules, each using only those after it:
//!
//! - [`front`] (the front door) and [`gate`] (the codec in front of hyper's HTTP/1.1 server):
//!   what the listener hands a connection to;
//! - [`service`]: client checks, request -> upstream request -> response, the `401` replay;
//! - [`body`]: the response body on its way to the client;
//! - [`pool`]: upstream connections; [`raw`]: the lean HTTP/1.1 exchange on them, over
//!   [`stream`] (TCP, or TLS over TCP); [`h2`]: the lean exchange over HTTP/2, to an `https`
//!   upstream that chooses it, the thread's requests sharing a connection;
//! - [`upload`]: the request body on its way upstream;
//! - [`headers`]: header hygiene as pure functions; [`codec`]: HTTP/1.1 syntax and framing,
//!   the rules both paths follow;
//! - [`access`] and [`deadline`]: the record a request leaves, and a connection's timers;
//!   [`spare`]: the buffers a client connection borrows only while it serves a request.

pub mod access;
pub mod body;
pub mod codec;
pub mod deadline;
pub mod front;
pub mod front_h2;
pub mod gate;
pub mod h2;
pub mod headers;
pub mod mount;
pub mod pool;
pub mod raw;
pub mod service;
pub mod spare;
pub mod stream;
pub mod upload;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};

/// Body of a proxied response: the upstream's, streamed, or a small one of the proxy's own.
pub type ProxyBody = Either<body::ResponseBody, Full<Bytes>>;

/// An error the proxy answers itself. Each maps to one status and one stable `error` code.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    /// No valid token could be had in time.
    #[error("{0}")]
    TokenUnavailable(String),
    /// The upstream could not be reached or broke the connection.
    #[error("{0}")]
    UpstreamUnavailable(String),
    /// The upstream did not answer in time.
    #[error("{0}")]
    UpstreamTimeout(String),
    /// The request is not one the proxy forwards.
    #[error("{0}")]
    BadRequest(String),
    /// The client's address is not in the route's `allowed_clients`.
    #[error("{0}")]
    Forbidden(String),
    /// The client did not send the route's inbound token.
    #[error("{0}")]
    ProxyAuthenticationRequired(String),
    /// The request body is over the route's `max_body_bytes`.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The request already passed through this proxy.
    #[error("{0}")]
    LoopDetected(String),
    /// The request head is over the listener's `max_headers` or `max_header_bytes`.
    #[error("{0}")]
    HeadersTooLarge(String),
    /// The request uses a transfer coding the proxy does not forward.
    #[error("{0}")]
    NotImplemented(String),
    /// No route of the listener takes the request's path (`path_prefix`).
    #[error("{0}")]
    NoRoute(String),
}

impl From<codec::Refusal> for ProxyError {
    fn from(refusal: codec::Refusal) -> ProxyError {
        match refusal {
            codec::Refusal::Malformed(m) => ProxyError::BadRequest(m),
            codec::Refusal::TooLarge(m) => ProxyError::HeadersTooLarge(m),
            codec::Refusal::Unsupported(m) => ProxyError::NotImplemented(m),
        }
    }
}

impl ProxyError {
    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::TokenUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamUnavailable(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::Forbidden(_) => StatusCode::FORBIDDEN,
            ProxyError::ProxyAuthenticationRequired(_) => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            ProxyError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::LoopDetected(_) => StatusCode::LOOP_DETECTED,
            ProxyError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::NoRoute(_) => StatusCode::NOT_FOUND,
        }
    }

    /// The stable `error` code in the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::TokenUnavailable(_) => "token_unavailable",
            ProxyError::UpstreamUnavailable(_) => "upstream_unavailable",
            ProxyError::UpstreamTimeout(_) => "upstream_timeout",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::Forbidden(_) => "forbidden",
            ProxyError::ProxyAuthenticationRequired(_) => "proxy_authentication_required",
            ProxyError::PayloadTooLarge(_) => "payload_too_large",
            ProxyError::LoopDetected(_) => "loop_detected",
            ProxyError::HeadersTooLarge(_) => "headers_too_large",
            ProxyError::NotImplemented(_) => "not_implemented",
            ProxyError::NoRoute(_) => "no_route",
        }
    }

    /// The JSON response for this error.
    pub fn to_response(&self) -> Response<ProxyBody> {
        self.whole_response().map(Either::Right)
    }

    /// The JSON response, its body whole.
    fn whole_response(&self) -> Response<Full<Bytes>> {
        let mut response = json_response(
            self.status(),
            &serde_json::json!({ "error": self.code(), "message": self.to_string() }),
        );
        if let ProxyError::ProxyAuthenticationRequired(_) = self {
            response.headers_mut().insert(
                http::header::PROXY_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"token-proxy\""),
            );
        }
        response
    }

    /// This error's response as HTTP/1.1 bytes that end the connection (`connection: close`):
    /// the answer to a request whose end cannot be known, written before the connection closes.
    pub fn to_http1_closing(&self) -> Bytes {
        let (parts, body) = self.whole_response().into_parts();
        let mut out = Vec::with_capacity(512);
        codec::write_status_line(&mut out, parts.status);
        for (name, value) in &parts.headers {
            codec::write_field(&mut out, name.as_str().as_bytes(), value.as_bytes());
        }
        // `Full` holds one frame, ready at once.
        let mut body = std::pin::pin!(body);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let data = match http_body::Body::poll_frame(body.as_mut(), &mut cx) {
            std::task::Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
            _ => Bytes::new(),
        };
        codec::write_length(&mut out, data.len() as u64);
        out.extend_from_slice(b"date: ");
        codec::date(&mut out);
        out.extend_from_slice(b"\r\nconnection: close\r\n\r\n");
        out.extend_from_slice(&data);
        Bytes::from(out)
    }
}

/// A JSON response that no cache keeps.
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut bytes = serde_json::to_vec(body).unwrap_or_default();
    bytes.push(b'\n');
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::ProxyError;

    /// Every error code and its status is in README's table: a code added without its row, or
    /// a status changed without the docs, fails here.
    #[test]
    fn every_error_code_is_documented_with_its_status() {
        let readme = include_str!("../../README.md");
        let m = String::new;
        let all = [
            ProxyError::TokenUnavailable(m()),
            ProxyError::UpstreamUnavailable(m()),
            ProxyError::UpstreamTimeout(m()),
            ProxyError::BadRequest(m()),
            ProxyError::Forbidden(m()),
            ProxyError::ProxyAuthenticationRequired(m()),
            ProxyError::PayloadTooLarge(m()),
            ProxyError::LoopDetected(m()),
            ProxyError::HeadersTooLarge(m()),
            ProxyError::NotImplemented(m()),
            ProxyError::NoRoute(m()),
        ];
        // A new variant must join the list above: this match stops compiling without it.
        for e in &all {
            match e {
                ProxyError::TokenUnavailable(_)
                | ProxyError::UpstreamUnavailable(_)
                | ProxyError::UpstreamTimeout(_)
                | ProxyError::BadRequest(_)
                | ProxyError::Forbidden(_)
                | ProxyError::ProxyAuthenticationRequired(_)
                | ProxyError::PayloadTooLarge(_)
                | ProxyError::LoopDetected(_)
                | ProxyError::HeadersTooLarge(_)
                | ProxyError::NotImplemented(_)
                | ProxyError::NoRoute(_) => {}
            }
            let row = format!("| `{}` | {} |", e.code(), e.status().as_u16());
            assert!(readme.contains(&row), "README's error codes lack {row:?}");
            assert!(
                crate::metrics::ERROR_CODES.contains(&e.code()),
                "token_proxy_errors_total cannot count {}",
                e.code()
            );
        }
    }
}
