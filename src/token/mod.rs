//! Tokens: what one is, how one is fetched, the slot that holds the current one, and the task
//! that keeps that slot fresh.
//!
//! Data flows one way: [`source::TokenSource`] fetches, [`refresh::run`] decides when (by the policy in [`schedule`]) and stores
//! into a [`slot::TokenSlot`], and the request path only ever reads the slot.

pub mod refresh;
pub mod schedule;
pub mod slot;
pub mod source;

use std::fmt;
use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;

use crate::secret::Secret;

/// A usable token: the ready-made `Authorization` header and when to stop using it.
///
/// The header is built once per token and marked sensitive (so HTTP/2 never indexes it and
/// `http`'s `Debug` hides it). The hyper path clones it, which only bumps a reference count;
/// the front door copies its bytes from the slot into the upstream's request head
/// ([`TokenSlot::with_header_at`](slot::TokenSlot::with_header_at)).
#[derive(Clone)]
pub struct Token {
    header: HeaderValue,
    expires_at: Instant,
    lifetime: Duration,
}

impl Token {
    /// Builds the token from a fetched one; `None` if the value cannot be an HTTP header.
    pub fn new(access_token: &Secret, expires_at: Instant, lifetime: Duration) -> Option<Token> {
        let mut value = Vec::with_capacity(7 + access_token.expose().len());
        value.extend_from_slice(b"Bearer ");
        value.extend_from_slice(access_token.expose().as_bytes());
        // Zeroed when the last request holding this header is done with it.
        let mut header =
            HeaderValue::from_maybe_shared(crate::secret::zeroizing_bytes(value)).ok()?;
        header.set_sensitive(true);
        Some(Token {
            header,
            expires_at,
            lifetime,
        })
    }

    /// A copy of `token` that expired at `now` (an upstream rejected it).
    pub fn retired(token: &Token, now: Instant) -> Token {
        Token {
            header: token.header.clone(),
            expires_at: now.min(token.expires_at),
            lifetime: token.lifetime,
        }
    }

    /// The `Authorization: Bearer …` value.
    pub fn header(&self) -> &HeaderValue {
        &self.header
    }

    /// The instant after which this token must not be sent (already early by the skew margin).
    pub fn expires_at(&self) -> Instant {
        self.expires_at
    }

    /// Whether the token may still be sent at `now`.
    pub fn is_valid_at(&self, now: Instant) -> bool {
        now < self.expires_at
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("header", &"Bearer <redacted>")
            .field("expires_at", &self.expires_at)
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_sensitive_and_debug_redacts() {
        let t = Token::new(
            &Secret::new("tok-abc"),
            Instant::now(),
            Duration::from_secs(1),
        )
        .unwrap();
        assert!(t.header().is_sensitive());
        assert_eq!(t.header().as_bytes(), b"Bearer tok-abc");
        let debug = format!("{t:?}");
        assert!(!debug.contains("tok-abc"), "{debug}");
        // Still useful when debugging: what it is and how long it lasts, without the token.
        assert!(
            debug.starts_with("Token {") && debug.contains("<redacted>") && debug.contains("1s"),
            "{debug}"
        );
        assert!(Token::new(&Secret::new("bad\nvalue"), Instant::now(), Duration::ZERO).is_none());
    }
}
