//! A string that must never be printed: client secrets and access tokens.
//!
//! [`Secret`] has a redacting `Debug` and no `Display`, so neither `{:?}` in a log line nor a
//! derived `Debug` on a struct that holds one can leak the value. The only way out is
//! [`Secret::expose`], which is easy to grep for. The memory is zeroed when the value is
//! dropped, and [`zeroizing_bytes`] gives the same guarantee to bytes handed to the HTTP stack.

use std::fmt;

use bytes::Bytes;
use zeroize::{Zeroize, Zeroizing};

/// A secret value (client secret, access token) whose `Debug` prints `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value that must not be printed. The `String` is kept as is (no reallocation
    /// that would leave a copy behind).
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The raw value, for the one place that must send it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the value is empty (an empty secret is a configuration error).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// `Bytes` whose memory is zeroed when the last reference is dropped, for secret material that
/// must travel through `http` and `hyper` types (the stamped header, the token request body).
pub fn zeroizing_bytes(data: Vec<u8>) -> Bytes {
    Bytes::from_owner(Zeroizing::new(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::new("hunter2-very-secret");
        let printed = format!("{s:?} {:?}", Some(&s));
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("<redacted>"));
        assert_eq!(s.expose(), "hunter2-very-secret");
    }

    #[test]
    fn zeroizing_bytes_keep_their_content() {
        let b = zeroizing_bytes(b"Bearer abc".to_vec());
        assert_eq!(&b[..], b"Bearer abc");
        assert_eq!(b.clone(), b);
    }
}
