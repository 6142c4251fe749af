//! Path normalisation before matching, so that no route can be bypassed by
//! spelling a path differently (`/a/../b`, `//b`, `/%62`).
//!
//! Like nginx's `$uri`, which APISIX matches on: percent-escapes are decoded,
//! `.` and `..` segments resolved and repeated slashes merged. A path that
//! climbs above the root, decodes to a NUL byte or to invalid UTF-8, or has a
//! broken escape is refused (the proxy answers 400).

use std::borrow::Cow;

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    NotAbsolute,
    BadEscape,
    NulByte,
    NotUtf8,
    AboveRoot,
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PathError::NotAbsolute => "the path must start with /",
            PathError::BadEscape => "the path has an invalid percent-escape",
            PathError::NulByte => "the path decodes to a NUL byte",
            PathError::NotUtf8 => "the path does not decode to UTF-8",
            PathError::AboveRoot => "the path climbs above the root",
        })
    }
}

/// Normalises a request path (without its query). Borrows when the path is
/// already normal, which is the common case and costs one scan.
pub fn normalize(raw: &str) -> Result<Cow<'_, str>, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if is_normal(raw.as_bytes()) {
        return Ok(Cow::Borrowed(raw));
    }
    let decoded = decode(raw.as_bytes())?;
    let text = String::from_utf8(decoded).map_err(|_| PathError::NotUtf8)?;
    resolve(&text).map(Cow::Owned)
}

/// True when the path has no escape, no empty segment and no dot segment.
fn is_normal(path: &[u8]) -> bool {
    let mut prev = 0u8;
    for (i, &b) in path.iter().enumerate() {
        match b {
            b'%' => return false,
            b'/' if prev == b'/' => return false,
            b'.' if prev == b'/' && is_dot_segment(&path[i..]) => return false,
            _ => {}
        }
        prev = b;
    }
    true
}

/// `rest` starts at a `.` right after a slash: is it `.` or `..` as a whole segment?
fn is_dot_segment(rest: &[u8]) -> bool {
    let seg_end = rest.iter().position(|&b| b == b'/').unwrap_or(rest.len());
    matches!(&rest[..seg_end], b"." | b"..")
}

fn decode(raw: &[u8]) -> Result<Vec<u8>, PathError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b == b'%' {
            let hex = raw.get(i + 1..i + 3).ok_or(PathError::BadEscape)?;
            let v = hex_val(hex[0])
                .zip(hex_val(hex[1]))
                .ok_or(PathError::BadEscape)?;
            let byte = v.0 << 4 | v.1;
            if byte == 0 {
                return Err(PathError::NulByte);
            }
            out.push(byte);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    Ok(out)
}

fn hex_val(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Resolves dot segments and merges slashes; keeps a trailing slash.
fn resolve(path: &str) -> Result<String, PathError> {
    let mut segments: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop().ok_or(PathError::AboveRoot)?;
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for seg in &segments {
        out.push('/');
        out.push_str(seg);
    }
    let ends_open = path.ends_with('/') || path.ends_with("/.") || path.ends_with("/..");
    if out.is_empty() || ends_open {
        out.push('/');
    }
    Ok(out)
}

/// Re-encodes a normalised path for the upstream request line: bytes outside
/// RFC 3986's `pchar` set and `/` are percent-encoded. Borrows when nothing
/// needs encoding.
pub fn encode(path: &str) -> Cow<'_, str> {
    if path.bytes().all(is_path_safe) {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len() + 8);
    for b in path.bytes() {
        if is_path_safe(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    Cow::Owned(out)
}

fn is_path_safe(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, PathError> {
        normalize(p).map(|c| c.into_owned())
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in ["/", "/a/b", "/a/b/", "/a.b/c..d/.e", "/x/..y"] {
            assert!(matches!(normalize(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    #[test]
    fn dot_segments_and_slashes_are_resolved() {
        assert_eq!(norm("/a/../b").unwrap(), "/b");
        assert_eq!(norm("/a/./b").unwrap(), "/a/b");
        assert_eq!(norm("//a///b").unwrap(), "/a/b");
        assert_eq!(norm("/a/b/..").unwrap(), "/a/");
        assert_eq!(norm("/a/.").unwrap(), "/a/");
        assert_eq!(norm("/a/b/").unwrap(), "/a/b/");
        assert_eq!(norm("/.").unwrap(), "/");
    }

    #[test]
    fn escapes_are_decoded_before_dots_are_resolved() {
        assert_eq!(norm("/%61dmin").unwrap(), "/admin");
        assert_eq!(norm("/public/%2e%2e/admin").unwrap(), "/admin");
        assert_eq!(norm("/public%2F..%2Fadmin").unwrap(), "/admin");
        assert_eq!(norm("/a%20b").unwrap(), "/a b");
    }

    #[test]
    fn bad_paths_are_refused() {
        assert_eq!(norm("/../etc"), Err(PathError::AboveRoot));
        assert_eq!(norm("/a/%2e%2e/%2e%2e/b"), Err(PathError::AboveRoot));
        assert_eq!(norm("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(norm("/a%4"), Err(PathError::BadEscape));
        assert_eq!(norm("/a%00b"), Err(PathError::NulByte));
        assert_eq!(norm("/%ff"), Err(PathError::NotUtf8));
        assert_eq!(norm("a/b"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn encoding_restores_a_valid_request_line() {
        assert!(matches!(encode("/a/b:c@d"), Cow::Borrowed(_)));
        assert_eq!(encode("/a b?c%d#é"), "/a%20b%3Fc%25d%23%C3%A9");
    }
}
