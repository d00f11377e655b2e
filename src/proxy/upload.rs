//! The request body as sent upstream: streamed from the client with an optional size limit
//! or, for small bodies that may need a replay after a `401`, buffered. The client's body
//! comes from hyper's server, or from a stream of the front door's HTTP/2 connections.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::codec;
use super::h2::serve::RequestBody;

/// A client's request body, from either server.
#[derive(Debug)]
pub enum ClientBody {
    /// hyper's server read the request.
    Hyper(Incoming),
    /// A stream of one of the front door's HTTP/2 connections.
    H2(RequestBody),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ClientBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ClientBody::H2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Hyper(b) => b.is_end_stream(),
            ClientBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Hyper(b) => b.size_hint(),
            ClientBody::H2(b) => b.size_hint(),
        }
    }
}

/// The client sent more than the route's `max_body_bytes`.
#[derive(Debug, thiserror::Error)]
#[error("request body is larger than the route's limit of {0} bytes")]
pub struct BodyTooLarge(pub u64);

/// A request body on its way upstream.
#[derive(Debug)]
pub enum UpstreamBody {
    /// Streamed from the client frame by frame; fails once more than `limit` bytes passed.
    Streamed {
        /// The client's body.
        inner: ClientBody,
        /// The route's limit, if any.
        limit: Option<u64>,
        /// Bytes passed so far.
        seen: u64,
    },
    /// Held in memory (small bodies kept for a replay); `None` once sent.
    Buffered(Option<Bytes>),
}

impl UpstreamBody {
    /// Streams `inner`, failing past `limit`.
    pub fn streamed(inner: ClientBody, limit: Option<u64>) -> Self {
        UpstreamBody::Streamed {
            inner,
            limit,
            seen: 0,
        }
    }

    /// Sends `bytes` (possibly empty).
    pub fn buffered(bytes: Bytes) -> Self {
        UpstreamBody::Buffered((!bytes.is_empty()).then_some(bytes))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match &mut *self {
            UpstreamBody::Streamed { inner, limit, seen } => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let frame = drop_forbidden_trailers(frame);
                    if let Some(data) = frame.data_ref() {
                        *seen += data.len() as u64;
                        if let Some(limit) = *limit {
                            if *seen > limit {
                                return Poll::Ready(Some(Err(Box::new(BodyTooLarge(limit)))));
                            }
                        }
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
            UpstreamBody::Buffered(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Streamed { inner, .. } => inner.is_end_stream(),
            UpstreamBody::Buffered(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Streamed { inner, .. } => inner.size_hint(),
            UpstreamBody::Buffered(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

/// `frame` with the fields that must not be trailers taken out, if it is trailers.
pub fn drop_forbidden_trailers(frame: Frame<Bytes>) -> Frame<Bytes> {
    match frame.into_trailers() {
        Ok(mut fields) => {
            let forbidden: Vec<http::HeaderName> = fields
                .keys()
                .filter(|n| codec::is_forbidden_trailer(n.as_str().as_bytes()))
                .cloned()
                .collect();
            for name in forbidden {
                fields.remove(name);
            }
            Frame::trailers(fields)
        }
        Err(frame) => frame,
    }
}
