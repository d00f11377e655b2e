//! Where a request goes on a listener several routes share: its path, normalised, matched
//! against each route's `path_prefix` on whole segments, longest first.
//!
//! Why normalise: the proxy and the upstream must read a path the same way. A proxy that
//! matched `/items/../graph/x` as `/items` would send it with the items route's token to an
//! upstream that reads it as `/graph/x`; one that forwarded `/../` verbatim lets a client climb
//! above the route's base path. So, before matching, `%2E` is read as the `.` it stands for
//! (RFC 3986 §6.2.2.2) and dot segments are removed (§5.2.4, never above the root); the
//! normalised path is the one matched and forwarded. An encoded slash (`%2F`, `%5C`) or a
//! backslash is left as sent (APIs put `%2F` in identifiers), except where it would join a dot
//! segment (`..%2F`): an upstream that decodes it would climb, so that request is refused.
//!
//! A path that needs none of this (no `.`, `%` or `\` in it: nearly every request) is matched
//! as sent, without a copy.

use std::borrow::Cow;

/// Why a request path is refused before routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmbiguousPath;

impl std::fmt::Display for AmbiguousPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "the request path joins an encoded slash (%2F or %5C) or a backslash to a dot segment, which an upstream may read as climbing up the path",
        )
    }
}

/// The origin-form `target` (path and query) with its path normalised: as sent when it needs
/// nothing, else a new string.
pub fn normalise(target: &str) -> Result<Cow<'_, str>, AmbiguousPath> {
    let (path, query) = match target.find('?') {
        Some(i) => target.split_at(i),
        None => (target, ""),
    };
    if !path.bytes().any(|b| matches!(b, b'.' | b'%' | b'\\')) {
        return Ok(Cow::Borrowed(target));
    }
    let mut dotted = false;
    for segment in path.split('/') {
        if is_dot_segment(segment) {
            dotted = true;
        } else if hides_dot_segment(segment) {
            return Err(AmbiguousPath);
        }
    }
    if !dotted {
        return Ok(Cow::Borrowed(target));
    }
    // RFC 3986 §5.2.4 on whole segments: `.` goes, `..` takes the previous segment with it.
    let mut kept: Vec<&str> = Vec::new();
    let mut segments = path.split('/').skip(1).peekable();
    let mut trailing = false;
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        match dot_kind(segment) {
            Some(Dot::One) => trailing = last,
            Some(Dot::Two) => {
                kept.pop();
                trailing = last;
            }
            None => {
                kept.push(segment);
                trailing = false;
            }
        }
    }
    let mut out = String::with_capacity(target.len());
    for segment in &kept {
        out.push('/');
        out.push_str(segment);
    }
    if trailing || kept.is_empty() {
        out.push('/');
    }
    out.push_str(query);
    Ok(Cow::Owned(out))
}

enum Dot {
    One,
    Two,
}

/// `.` or `..`, with any of its dots written `%2E` or `%2e`.
fn dot_kind(segment: &str) -> Option<Dot> {
    let b = segment.as_bytes();
    let dot = |s: &[u8]| -> Option<usize> {
        if s.first() == Some(&b'.') {
            Some(1)
        } else if s.len() >= 3 && s[0] == b'%' && s[1] == b'2' && matches!(s[2], b'e' | b'E') {
            Some(3)
        } else {
            None
        }
    };
    let first = dot(b)?;
    if first == b.len() {
        return Some(Dot::One);
    }
    let second = dot(&b[first..])?;
    (first + second == b.len()).then_some(Dot::Two)
}

fn is_dot_segment(segment: &str) -> bool {
    dot_kind(segment).is_some()
}

/// Whether `segment`, split where an encoded slash or a backslash stands, holds a dot segment.
fn hides_dot_segment(segment: &str) -> bool {
    let b = segment.as_bytes();
    let (mut start, mut i, mut split) = (0, 0, false);
    while i < b.len() {
        let slash = if b[i] == b'\\' {
            1
        } else if b[i] == b'%'
            && i + 2 < b.len()
            && ((b[i + 1] == b'2' && matches!(b[i + 2], b'f' | b'F'))
                || (b[i + 1] == b'5' && matches!(b[i + 2], b'c' | b'C')))
        {
            3
        } else {
            i += 1;
            continue;
        };
        if is_dot_segment(&segment[start..i]) {
            return true;
        }
        split = true;
        i += slash;
        start = i;
    }
    split && is_dot_segment(&segment[start..])
}

/// Whether `path` (no query) lies under `prefix` on whole segments: `prefix` is `""` (the
/// route takes every path) or `/a/b` without a trailing slash, matching `/a/b` and `/a/b/…`
/// but not `/a/bc`.
pub fn under(path: &str, prefix: &str) -> bool {
    prefix.is_empty()
        || (path.starts_with(prefix)
            && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/')))
}

/// The path of an origin-form target, without its query.
pub fn path_of(target: &str) -> &str {
    target.split_once('?').map_or(target, |(p, _)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_path_is_matched_as_sent() {
        for t in [
            "/",
            "/v1/items?x=1",
            "/a%20b",
            "/items%2Fx",
            "/a\\b",
            "/file.json",
        ] {
            assert!(
                matches!(normalise(t), Ok(Cow::Borrowed(s)) if s == t),
                "{t}"
            );
        }
    }

    #[test]
    fn dot_segments_are_removed_never_above_the_root() {
        let cases = [
            ("/a/../b", "/b"),
            ("/a/./b", "/a/b"),
            ("/../x", "/x"),
            ("/../../x?q=/../", "/x?q=/../"),
            ("/%2e%2e/x", "/x"),
            ("/a/%2E/b", "/a/b"),
            ("/a/.%2e/b", "/b"),
            ("/items/../graph/x", "/graph/x"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/..", "/"),
            ("/.", "/"),
            ("/a/...", "/a/..."),
            ("/a/.b/c", "/a/.b/c"),
        ];
        for (sent, want) in cases {
            assert_eq!(normalise(sent).unwrap(), want, "{sent}");
        }
    }

    #[test]
    fn an_encoded_slash_joined_to_a_dot_segment_is_refused() {
        for t in [
            "/items/..%2Fgraph/x",
            "/items/..%2fgraph",
            "/items/%2e%2e%2Fgraph",
            "/items/..%5Cgraph",
            "/items/..\\graph",
            "/items/x%2F..%2F..",
            "/items/x%2F.",
        ] {
            assert_eq!(normalise(t), Err(AmbiguousPath), "{t}");
        }
        for t in ["/items/a%2Fb", "/items/a%2F.b", "/x%2", "/x%2F", "/x%5"] {
            assert!(normalise(t).is_ok(), "{t}");
        }
    }

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(under("/graph", "/graph"));
        assert!(under("/graph/", "/graph"));
        assert!(under("/graph/x", "/graph"));
        assert!(!under("/graphql", "/graph"));
        assert!(!under("/grap", "/graph"));
        assert!(!under("/", "/graph"));
        assert!(under("/anything", ""));
        assert!(under("/a/b/c", "/a/b"));
        assert!(!under("/a/bc", "/a/b"));
        assert_eq!(path_of("/a/b?x=/c"), "/a/b");
        assert_eq!(path_of("/a"), "/a");
    }
}
