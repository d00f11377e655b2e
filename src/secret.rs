//! A string that must never be printed: client secrets and access tokens.
//!
//! [`Secret`] has a redacting `Debug` and no `Display`, so neither `{:?}` in a log line nor a
//! derived `Debug` on a struct that holds one can leak the value. The only way out is
//! [`Secret::expose`], which is easy to grep for.

use std::fmt;

/// A secret value (client secret, access token) whose `Debug` prints `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<str>);

impl Secret {
    /// Wraps a value that must not be printed.
    pub fn new(value: impl Into<Box<str>>) -> Self {
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

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
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
}
