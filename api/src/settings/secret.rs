//! Secrets in settings, and the one URL redactor.
//!
//! A [`Secret`] holds a value that must never reach a log, an error message
//! or `Debug` output: it has no `Display`, its `Debug` prints
//! [`REDACTED`], and the value is read with [`Secret::expose`] only where it
//! is handed to the client library that needs it. URLs may carry a password
//! in their userinfo or query; [`redact_url`] is the one function that hides
//! it, for `neurectomy config`, configuration errors and log lines alike.

use std::fmt::Write as _;

/// What a hidden value prints as.
pub const REDACTED: &str = "<redacted>";

/// A value that is never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value, for the one call that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REDACTED)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret(value.to_owned())
    }
}

/// `url` with its password hidden, for messages and logs.
pub fn redact(url: &str) -> String {
    redact_url(url, false)
}

/// Redacts the password of a URL's userinfo (the whole userinfo when it is
/// a lone `token`) and `password`-like query parameters; of each URL of a
/// comma-separated list (a Redis Cluster's seed nodes).
pub fn redact_url(url: &str, token: bool) -> String {
    if url.matches("://").count() > 1 {
        return url
            .split(',')
            .map(|one| redact_one(one, token))
            .collect::<Vec<_>>()
            .join(",");
    }
    redact_one(url, token)
}

/// [`redact_url`] of one URL.
fn redact_one(url: &str, token: bool) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let (head, rest) = url.split_at(scheme_end + 3);
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let mut out = head.to_owned();
    match authority.rfind('@') {
        Some(at) => {
            let (userinfo, host) = authority.split_at(at);
            match userinfo.split_once(':') {
                Some((user, _)) => {
                    let _ = write!(out, "{user}:{REDACTED}");
                }
                None if token && !userinfo.is_empty() => out.push_str(REDACTED),
                None => out.push_str(userinfo),
            }
            out.push_str(host);
        }
        None => out.push_str(authority),
    }
    match tail.split_once('?') {
        Some((path, query)) => {
            let (query, fragment) = match query.split_once('#') {
                Some((q, f)) => (q, Some(f)),
                None => (query, None),
            };
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) if name.to_ascii_lowercase().contains("password") => {
                        format!("{name}={REDACTED}")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            let _ = write!(out, "{path}?{}", query.join("&"));
            if let Some(fragment) = fragment {
                let _ = write!(out, "#{fragment}");
            }
        }
        None => out.push_str(tail),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_does_not_debug_print() {
        let secret = Secret::from("hunter2-hunter2");
        assert_eq!(format!("{secret:?}"), REDACTED);
        assert_eq!(format!("{:?}", Some(&secret)), format!("Some({REDACTED})"));
        assert_eq!(secret.expose(), "hunter2-hunter2");
    }

    #[test]
    fn urls_lose_their_password_only() {
        assert_eq!(
            redact("postgres://app:s3cret@db:5432/x"),
            format!("postgres://app:{REDACTED}@db:5432/x")
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
