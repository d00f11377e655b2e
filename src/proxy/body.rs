//! The upstream's response body on its way to the client, which hands its pooled connection
//! back once read to the end and finishes its request's access record. (The request body on
//! its way upstream is in `upload.rs`.)

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::access::Access;
use super::h2::conn::H2Body;
use super::pool::{Checkin, LeanBody};
use super::raw::RawBody;
use super::upload::drop_forbidden_trailers;

/// The upstream's response body on its way to the client. When it has been read to the end
/// its connection goes back to the pool; dropped before that, the connection closes. When
/// it is dropped, its request's [`Access`] record is finished.
#[derive(Debug)]
pub struct ResponseBody {
    inner: Source,
    checkin: Option<Checkin>,
    access: Option<(Access, http::StatusCode)>,
    bytes: u64,
    ended: bool,
}

/// Where the body's bytes come from.
#[derive(Debug)]
enum Source {
    /// hyper's client.
    Hyper(Incoming),
    /// The lean exchange of a bodiless request (`raw.rs`), which returns its own connection.
    Raw(RawBody),
    /// A stream of one of the thread's HTTP/2 connections (`h2/conn.rs`).
    H2(H2Body),
}

impl Source {
    fn is_end_stream(&self) -> bool {
        match self {
            Source::Hyper(b) => b.is_end_stream(),
            Source::Raw(b) => b.is_end_stream(),
            Source::H2(b) => b.is_end_stream(),
        }
    }
}

impl ResponseBody {
    /// From the lean exchange.
    pub fn raw(body: RawBody) -> Self {
        Self::with(Source::Raw(body), None)
    }

    /// From the lean exchange, over HTTP/1.1 or HTTP/2.
    pub fn lean(body: LeanBody) -> Self {
        match body {
            LeanBody::Http1(b) => Self::raw(b),
            LeanBody::H2(b) => Self::with(Source::H2(b), None),
        }
    }

    /// `inner`, returning `checkin` to its pool at the end.
    pub fn new(inner: Incoming, checkin: Option<Checkin>) -> Self {
        Self::with(Source::Hyper(inner), checkin)
    }

    fn with(inner: Source, checkin: Option<Checkin>) -> Self {
        ResponseBody {
            inner,
            checkin,
            access: None,
            bytes: 0,
            ended: false,
        }
    }

    /// Finishes `access` for a response of `status` when this body is done.
    pub fn finish_with(&mut self, access: Access, status: http::StatusCode) {
        self.access = Some((access, status));
    }

    fn finish(&mut self) {
        self.ended = true;
        if let Some(checkin) = self.checkin.take() {
            checkin.finish();
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Some((access, status)) = self.access.take() {
            access.finish(status, self.bytes, self.ended || self.inner.is_end_stream());
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = match &mut self.inner {
            Source::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Source::Raw(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Source::H2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        };
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.bytes += data.len() as u64;
            }
        }
        // Fields that must not be trailers (`Content-Length`, `Set-Cookie`, ...) never pass,
        // whichever path read them.
        let polled = polled.map(|frame| frame.map(|frame| frame.map(drop_forbidden_trailers)));
        match &polled {
            // hyper stops polling a body once it reports its end, so the end is seen as `None`,
            // as trailers, or as the last frame after which `is_end_stream` holds.
            Poll::Ready(None) => self.finish(),
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() || self.inner.is_end_stream() => {
                self.finish()
            }
            Poll::Ready(Some(Err(_))) => self.checkin = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Source::Hyper(b) => b.size_hint(),
            Source::Raw(b) => b.size_hint(),
            Source::H2(b) => b.size_hint(),
        }
    }
}
