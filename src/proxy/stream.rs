//! The byte stream under a lean upstream connection (`raw.rs`): TCP, or TLS over TCP.
//!
//! Why one type for both: the lean exchange and its codec are the same whatever carries the
//! bytes, so an `https` upstream takes the same fast path, and the same rules, as a plain one.
//! TLS connections for the front door's requests offer `h2` and `http/1.1` by ALPN, and
//! carry whichever the upstream chooses (`h2/` or `raw.rs`); those for the requests hyper's
//! server read offer `http/1.1` only. Requests with bodies keep going through hyper's client,
//! which offers `h2` too.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// An upstream connection's stream.
#[derive(Debug)]
pub enum UpstreamStream {
    /// A plain `http` upstream.
    Tcp(TcpStream),
    /// An `https` upstream (boxed: a TLS session is large, and most routes never make one).
    Tls(Box<TlsStream<TcpStream>>),
}

impl From<TcpStream> for UpstreamStream {
    fn from(s: TcpStream) -> Self {
        UpstreamStream::Tcp(s)
    }
}

impl From<TlsStream<TcpStream>> for UpstreamStream {
    fn from(s: TlsStream<TcpStream>) -> Self {
        UpstreamStream::Tls(Box::new(s))
    }
}

/// What an idle connection holds when looked at.
#[derive(Debug)]
pub enum Idle {
    /// Nothing: it can carry a request.
    Quiet,
    /// The upstream closed it.
    Closed,
    /// Bytes no request asked for.
    Stray,
    /// It failed.
    Failed(io::Error),
}

impl UpstreamStream {
    /// The protocol chosen by ALPN, over TLS.
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            UpstreamStream::Tcp(_) => None,
            UpstreamStream::Tls(s) => s.get_ref().1.alpn_protocol(),
        }
    }

    /// Looks, without waiting, for anything that arrived on an idle connection. Over TCP this
    /// makes no system call while tokio knows the socket has nothing to read. Over TLS the
    /// records that did arrive are processed: a session ticket is taken in silently, a
    /// `close_notify` reads as closed, application data as stray bytes.
    pub fn idle_state(&mut self) -> Idle {
        let mut probe = [0u8; 1];
        let read = match self {
            UpstreamStream::Tcp(s) => match s.try_read(&mut probe) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Idle::Quiet,
                r => r,
            },
            UpstreamStream::Tls(s) => {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let mut buf = ReadBuf::new(&mut probe);
                match Pin::new(&mut **s).poll_read(&mut cx, &mut buf) {
                    Poll::Pending => return Idle::Quiet,
                    Poll::Ready(r) => r.map(|()| buf.filled().len()),
                }
            }
        };
        match read {
            Ok(0) => Idle::Closed,
            Ok(_) => Idle::Stray,
            Err(e) => Idle::Failed(e),
        }
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A TLS server on loopback that reads one byte, then writes `answer` and, with `close`,
    /// sends `close_notify`; and a client connection to it that trusts its certificate.
    async fn tls_pair(answer: &'static [u8], close: bool) -> UpstreamStream {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = CertificateDer::from(cert.der().to_vec());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![der.clone()],
                PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            let mut one = [0u8; 1];
            tls.read_exact(&mut one).await.unwrap();
            tls.write_all(answer).await.unwrap();
            if close {
                tls.shutdown().await.unwrap();
            }
            // Hold the connection open until the client is done.
            let _ = tls.read(&mut one).await;
        });
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        UpstreamStream::from(tls)
    }

    /// The first state other than quiet within 2 s, or quiet.
    async fn settled(stream: &mut UpstreamStream) -> Idle {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            match stream.idle_state() {
                Idle::Quiet if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                state => return state,
            }
        }
    }

    /// Sends a byte and reads the four-byte answer.
    async fn exchange(stream: &mut UpstreamStream) {
        stream.write_all(b"?").await.unwrap();
        stream.flush().await.unwrap();
        let mut answer = [0u8; 4];
        stream.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"resp");
    }

    #[tokio::test]
    async fn over_tls_an_idle_connection_tells_quiet_stray_and_closed_apart() {
        // A session ticket after the handshake is no stray byte.
        let mut quiet = tls_pair(b"resp", false).await;
        exchange(&mut quiet).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(matches!(quiet.idle_state(), Idle::Quiet));

        let mut stray = tls_pair(b"resp!", false).await;
        exchange(&mut stray).await;
        assert!(matches!(settled(&mut stray).await, Idle::Stray));

        let mut closed = tls_pair(b"resp", true).await;
        exchange(&mut closed).await;
        assert!(matches!(settled(&mut closed).await, Idle::Closed));
    }
}
