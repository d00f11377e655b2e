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

/// The origin-form `target` (path and query), its path normalised.
#[derive(Debug, PartialEq, Eq)]
pub enum Normalised {
    /// The target needs nothing: it goes as sent. Its path ends at `path_end`.
    AsSent { path_end: usize },
    /// The target with its dot segments removed.
    Changed(Vec<u8>),
}

impl Normalised {
    /// The path (without the query) of the target as it goes, `sent` being the target as sent.
    pub fn path<'a>(&'a self, sent: &'a [u8]) -> &'a [u8] {
        match self {
            Normalised::AsSent { path_end } => &sent[..*path_end],
            Normalised::Changed(t) => path_of(t),
        }
    }
}

/// `target` normalised: one pass over its bytes decides, and only a path with a dot segment
/// in it is copied. Bytes, not `str`: the front door's targets are checked ASCII already, and
/// a UTF-8 check or a `char` search would cost more than the rest of the routing.
pub fn normalise(target: &[u8]) -> Result<Normalised, AmbiguousPath> {
    let mut path_end = target.len();
    let mut special = false;
    for (i, &b) in target.iter().enumerate() {
        match b {
            b'?' => {
                path_end = i;
                break;
            }
            b'.' | b'%' | b'\\' => special = true,
            _ => {}
        }
    }
    if !special {
        return Ok(Normalised::AsSent { path_end });
    }
    let (path, query) = target.split_at(path_end);
    let mut dotted = false;
    for segment in path.split(|&b| b == b'/') {
        if is_dot_segment(segment) {
            dotted = true;
        } else if hides_dot_segment(segment) {
            return Err(AmbiguousPath);
        }
    }
    if !dotted {
        return Ok(Normalised::AsSent { path_end });
    }
    // RFC 3986 §5.2.4 on whole segments: `.` goes, `..` takes the previous segment with it.
    let mut kept: Vec<&[u8]> = Vec::new();
    let mut segments = path.split(|&b| b == b'/').skip(1).peekable();
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
    let mut out = Vec::with_capacity(target.len());
    for segment in &kept {
        out.push(b'/');
        out.extend_from_slice(segment);
    }
    if trailing || kept.is_empty() {
        out.push(b'/');
    }
    out.extend_from_slice(query);
    Ok(Normalised::Changed(out))
}

enum Dot {
    One,
    Two,
}

/// `.` or `..`, with any of its dots written `%2E` or `%2e`.
fn dot_kind(segment: &[u8]) -> Option<Dot> {
    let dot = |s: &[u8]| -> Option<usize> {
        if s.first() == Some(&b'.') {
            Some(1)
        } else if s.len() >= 3 && s[0] == b'%' && s[1] == b'2' && matches!(s[2], b'e' | b'E') {
            Some(3)
        } else {
            None
        }
    };
    let first = dot(segment)?;
    if first == segment.len() {
        return Some(Dot::One);
    }
    let second = dot(&segment[first..])?;
    (first + second == segment.len()).then_some(Dot::Two)
}

fn is_dot_segment(segment: &[u8]) -> bool {
    dot_kind(segment).is_some()
}

/// Whether `segment`, split where an encoded slash or a backslash stands, holds a dot segment.
fn hides_dot_segment(b: &[u8]) -> bool {
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
        if is_dot_segment(&b[start..i]) {
            return true;
        }
        split = true;
        i += slash;
        start = i;
    }
    split && is_dot_segment(&b[start..])
}

/// Whether `path` (no query) lies under `prefix` on whole segments: `prefix` is empty (the
/// route takes every path) or `/a/b` without a trailing slash, matching `/a/b` and `/a/b/…`
/// but not `/a/bc`.
pub fn under(path: &[u8], prefix: &[u8]) -> bool {
    prefix.is_empty()
        || (path.starts_with(prefix) && matches!(path.get(prefix.len()), None | Some(b'/')))
}

/// The path of an origin-form target, without its query.
pub fn path_of(target: &[u8]) -> &[u8] {
    target
        .iter()
        .position(|&b| b == b'?')
        .map_or(target, |i| &target[..i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(t: &str) -> Result<String, AmbiguousPath> {
        Ok(match normalise(t.as_bytes())? {
            Normalised::AsSent { path_end } => {
                assert_eq!(
                    &t[..path_end],
                    std::str::from_utf8(path_of(t.as_bytes())).unwrap()
                );
                t.to_owned()
            }
            Normalised::Changed(v) => String::from_utf8(v).unwrap(),
        })
    }

    #[test]
    fn a_plain_path_is_matched_as_sent() {
        for t in [
            "/",
            "/v1/items?x=1",
            "/a%20b",
            "/items%2Fx",
            "/a\\b",
            "/file.json",
            "/x?a/../b",
        ] {
            assert!(
                matches!(normalise(t.as_bytes()), Ok(Normalised::AsSent { .. })),
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
            assert_eq!(norm(sent).unwrap(), want, "{sent}");
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
            assert_eq!(normalise(t.as_bytes()), Err(AmbiguousPath), "{t}");
        }
        for t in ["/items/a%2Fb", "/items/a%2F.b", "/x%2", "/x%2F", "/x%5"] {
            assert!(normalise(t.as_bytes()).is_ok(), "{t}");
        }
    }

    #[test]
    fn prefixes_match_whole_segments() {
        let under = |p: &str, pre: &str| under(p.as_bytes(), pre.as_bytes());
        assert!(under("/graph", "/graph"));
        assert!(under("/graph/", "/graph"));
        assert!(under("/graph/x", "/graph"));
        assert!(!under("/graphql", "/graph"));
        assert!(!under("/grap", "/graph"));
        assert!(!under("/", "/graph"));
        assert!(under("/anything", ""));
        assert!(under("/a/b/c", "/a/b"));
        assert!(!under("/a/bc", "/a/b"));
        assert_eq!(path_of(b"/a/b?x=/c"), b"/a/b");
        assert_eq!(path_of(b"/a"), b"/a");
    }
}
