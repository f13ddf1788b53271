//! Validated inputs of workloads (pods today): names, container image references and
//! environment variable names.

use std::fmt;

use serde::Serialize;

use crate::InputError;

/// A workload's name: a lowercase DNS label (RFC 1123), 1–63 characters of `a-z`, `0-9` and
/// `-`, starting and ending with a letter or digit — usable as a container or host name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct WorkloadName(String);

impl WorkloadName {
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, InputError> {
        let s = raw.trim();
        let bad = |m: &str| Err(InputError::new(field, m));
        if s.is_empty() {
            return bad("is required");
        }
        if s.len() > 63 {
            return bad("must be at most 63 characters");
        }
        let label_chars = s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !label_chars || s.starts_with('-') || s.ends_with('-') {
            return bad(
                "must be a lowercase DNS label: a-z, 0-9 and '-', starting and ending with a \
                 letter or digit (e.g. `llama-server`)",
            );
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkloadName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A container image reference as Docker reads it: `[registry[:port]/]path[:tag][@sha256:<64
/// hex>]`, at most 255 characters. Path components are lowercase letters and digits joined by
/// `.`, `_`, `__` or dashes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct ImageRef(String);

impl ImageRef {
    pub const MAX_LEN: usize = 255;

    pub fn parse(field: &'static str, raw: &str) -> Result<Self, InputError> {
        let s = raw.trim();
        let bad = |m: &str| Err(InputError::new(field, m));
        if s.is_empty() {
            return bad("is required");
        }
        if s.len() > Self::MAX_LEN {
            return bad("must be at most 255 characters");
        }
        let hint = "must be an image reference like `nginx`, `nginx:1.27`, \
                    `ghcr.io/org/app:v2` or `app@sha256:<64 hex digits>`";
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(d)),
            None => (s, None),
        };
        if let Some(d) = digest {
            let ok = d.strip_prefix("sha256:").is_some_and(|h| {
                h.len() == 64
                    && h.bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            });
            if !ok {
                return bad(
                    "has a malformed digest: expected `@sha256:` and 64 lowercase hex digits",
                );
            }
        }
        // A tag is what follows the last ':' after the last '/' (a ':' before it is a port).
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag
            && !valid_tag(t)
        {
            return bad(
                "has a malformed tag: 1-128 of A-Z, a-z, 0-9, '_', '.' and '-', not starting \
                 with '.' or '-'",
            );
        }
        let mut parts: Vec<&str> = name.split('/').collect();
        if parts.len() > 1 {
            let first = parts[0];
            if first.contains('.') || first.contains(':') || first == "localhost" {
                if !valid_domain(first) {
                    return bad(hint);
                }
                parts.remove(0);
            }
        }
        if parts.is_empty() || !parts.iter().all(|p| valid_path_component(p)) {
            return bad(hint);
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn valid_tag(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
        && !t.starts_with(['.', '-'])
}

/// `host[:port]`, host being dot-separated alphanumeric components with inner dashes.
fn valid_domain(d: &str) -> bool {
    let (host, port) = match d.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (d, None),
    };
    if let Some(p) = port
        && (p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return false;
    }
    !host.is_empty()
        && host.split('.').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !c.starts_with('-')
                && !c.ends_with('-')
        })
}

/// Lowercase alphanumeric runs separated by `.`, `_`, `__` or one or more `-`.
fn valid_path_component(p: &str) -> bool {
    let b = p.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &p[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// An environment variable name: `[A-Za-z_][A-Za-z0-9_]*`, at most 128 characters. Why a name
/// is invalid, or `None` when it is fine.
pub fn env_key_problem(key: &str) -> Option<&'static str> {
    if key.is_empty() {
        return Some("names must not be empty");
    }
    if key.len() > 128 {
        return Some("names must be at most 128 characters");
    }
    let mut bytes = key.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    if !first_ok || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Some("names must match [A-Za-z_][A-Za-z0-9_]*");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels() {
        for ok in ["a", "web", "llama-3-server", "0abc", &"a".repeat(63)] {
            assert!(WorkloadName::parse("name", ok).is_ok(), "{ok}");
        }
        for bad in ["", "Web", "-a", "a-", "a_b", "a.b", "é", &"a".repeat(64)] {
            assert!(WorkloadName::parse("name", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn image_references_follow_dockers_grammar() {
        let digest = format!("sha256:{}", "a".repeat(64));
        for ok in [
            "nginx".to_owned(),
            "nginx:1.27".to_owned(),
            "library/nginx:latest".to_owned(),
            "ghcr.io/org/app:v2".to_owned(),
            "localhost:5000/app".to_owned(),
            "registry.example.com:443/team/my_app__x/sub-part:1.0-rc.1".to_owned(),
            format!("app@{digest}"),
            format!("ghcr.io/org/app:v2@{digest}"),
            "vllm/vllm-openai:v0.6.3".to_owned(),
        ] {
            assert!(ImageRef::parse("image", &ok).is_ok(), "{ok}");
        }
        for bad in [
            "".to_owned(),
            "Nginx".to_owned(),
            "nginx:".to_owned(),
            "nginx:-x".to_owned(),
            "nginx::1".to_owned(),
            "a//b".to_owned(),
            "/nginx".to_owned(),
            "nginx/".to_owned(),
            "app@sha256:abc".to_owned(),
            format!("app@md5:{}", "a".repeat(64)),
            "has space".to_owned(),
            "bad_.name".to_owned(),
            "-x.io/app".to_owned(),
            format!("{}:1", "a".repeat(255)),
        ] {
            assert!(ImageRef::parse("image", &bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn env_keys() {
        assert_eq!(env_key_problem("PATH"), None);
        assert_eq!(env_key_problem("_x9"), None);
        assert!(env_key_problem("9X").is_some());
        assert!(env_key_problem("A-B").is_some());
        assert!(env_key_problem("").is_some());
        assert!(env_key_problem(&"A".repeat(129)).is_some());
    }
}
