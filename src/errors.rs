//! Walking an error's chain of causes, shared by the token client and the upstream client, whose
//! top-level errors ("error sending request", "client error") say little on their own.

use std::error::Error;

/// The causes of `e`, outermost first (not `e` itself).
pub fn causes<'a>(e: &'a (dyn Error + 'static)) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(e.source(), |c| Error::source(*c))
}

/// The causes of `e` joined with `": "`, or `e` itself when it has none.
pub fn cause_text(e: &(dyn Error + 'static)) -> String {
    let text = causes(e)
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ");
    if text.is_empty() {
        e.to_string()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn causes_are_joined_outermost_first() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(cause_text(&e), "inner");
        assert_eq!(cause_text(&std::io::Error::other("alone")), "alone");
    }
}
