//! What a setting's value must be beyond its type: URLs the clients accept,
//! sizes that make sense, sane timeouts. Each check returns the reason a
//! value is wrong; [`super::load_parsed`] adds which setting and where it came from.

use std::str::FromStr as _;

use super::catalog::{Check, Kind, Secret, Setting, UrlKind};
use super::render::{redact, REDACTED};

/// The longest wait or interval a millisecond setting may name: an hour.
const MAX_MILLIS: u64 = 3_600_000;

/// Checks the effective value(s) of `setting` (empty: not set).
pub(crate) fn check(setting: &Setting, values: &[String]) -> Result<(), String> {
    if setting.key.secret != Secret::No && values.iter().any(|v| v.contains(REDACTED)) {
        return Err(format!(
            "`{REDACTED}` is what `neurectomy config` prints in place of a secret; \
             give the real value (or set it with {})",
            setting.key.env
        ));
    }
    if setting.kind == Kind::List {
        return values
            .iter()
            .try_for_each(|value| check_one(setting.key.check, value));
    }
    match values.first() {
        Some(value) => check_one(setting.key.check, value)
            .map_err(|reason| format!("{} ({reason})", shown(setting, value))),
        None => Ok(()),
    }
}

/// How a value appears in a message: quoted, and redacted when secret.
fn shown(setting: &Setting, value: &str) -> String {
    match setting.key.secret {
        Secret::Whole => "the value is not valid".to_owned(),
        secret => format!("`{}` is not valid", redact(secret, value)),
    }
}

fn check_one(check: Check, value: &str) -> Result<(), String> {
    match check {
        Check::Any => Ok(()),
        Check::AtLeast(min) => match value.parse::<u64>() {
            Ok(n) if n < min => Err(format!("must be at least {min}")),
            _ => Ok(()),
        },
        Check::ZeroOrAtLeast(min) => match value.parse::<u64>() {
            Ok(n) if n != 0 && n < min => Err(format!("must be 0 (no limit) or at least {min}")),
            _ => Ok(()),
        },
        Check::Millis { min } => match value.parse::<u64>() {
            Ok(n) if n < min => Err(format!("must be at least {min} ms")),
            Ok(n) if n > MAX_MILLIS => Err(format!("must be at most {MAX_MILLIS} ms (an hour)")),
            _ => Ok(()),
        },
        Check::Url(kind) => url(kind, value),
        Check::NonEmpty if value.trim().is_empty() => Err("must not be empty".to_owned()),
        Check::NonEmpty => Ok(()),
        Check::HostPort => host_port(value),
        Check::JwtSecret if value.len() < 32 => Err(format!(
            "an HS256 secret must have at least 32 bytes, this one has {}",
            value.len()
        )),
        Check::JwtSecret => Ok(()),
        Check::File => match std::fs::metadata(value) {
            Ok(meta) if meta.is_file() => Ok(()),
            Ok(_) => Err("not a file".to_owned()),
            Err(error) => Err(format!("cannot read it: {error}")),
        },
        Check::Origins => origin(value).map_err(|reason| format!("`{value}`: {reason}")),
        Check::LogFilter => tracing_subscriber::EnvFilter::try_new(value)
            .map(drop)
            .map_err(|error| format!("not a tracing filter: {error}")),
        Check::StreamName => stream_name(value),
        Check::SubjectPrefix => subject_prefix(value),
        Check::SealKey if value.trim().is_empty() => Ok(()), // not sealed
        Check::SealKey => commands::seal::key::SealKey::from_secret(value)
            .map(drop)
            .map_err(|e| e.to_string()),
        Check::PublicKeys => value
            .split(',')
            .filter(|t| !t.trim().is_empty())
            .try_for_each(|t| {
                commands::seal::key::PublicKey::parse(t)
                    .map(drop)
                    .map_err(|e| format!("`{}`: {e}", t.trim()))
            }),
    }
}

/// A URL as the client of `kind` would take it.
fn url(kind: UrlKind, value: &str) -> Result<(), String> {
    match kind {
        UrlKind::Postgres => {
            let parsed = url::Url::parse(value).map_err(|e| e.to_string())?;
            if !matches!(parsed.scheme(), "postgres" | "postgresql") {
                return Err(format!(
                    "the scheme must be postgres:// or postgresql://, not {}://",
                    parsed.scheme()
                ));
            }
            sqlx::postgres::PgConnectOptions::from_str(value)
                .map(drop)
                .map_err(|e| e.to_string())
        }
        UrlKind::Nats => async_nats::ServerAddr::from_str(value)
            .map(drop)
            .map_err(|e| e.to_string()),
        // A Redis Cluster's seed nodes: a comma-separated list of URLs.
        UrlKind::Redis if value.contains(',') => value
            .split(',')
            .map(str::trim)
            .try_for_each(|one| url(UrlKind::Redis, one)),
        UrlKind::Redis => {
            let parsed = url::Url::parse(value).map_err(|e| e.to_string())?;
            if redis::parse_redis_url(value).is_none() {
                return Err(format!(
                    "the scheme must be redis://, rediss:// or unix://, not {}://",
                    parsed.scheme()
                ));
            }
            redis::IntoConnectionInfo::into_connection_info(value)
                .map(drop)
                .map_err(|e| e.to_string())
        }
        UrlKind::Bolt => {
            // As neo4rs reads it: a missing scheme means bolt://.
            let parsed = match url::Url::parse(value) {
                Ok(url) if url.has_host() => url,
                Ok(_) | Err(url::ParseError::RelativeUrlWithoutBase) => {
                    url::Url::parse(&format!("bolt://{value}")).map_err(|e| e.to_string())?
                }
                Err(error) => return Err(error.to_string()),
            };
            const SCHEMES: [&str; 6] = [
                "bolt",
                "bolt+s",
                "bolt+ssc",
                "neo4j",
                "neo4j+s",
                "neo4j+ssc",
            ];
            if !SCHEMES.contains(&parsed.scheme()) {
                return Err(format!(
                    "the scheme must be one of {}, not {}://",
                    SCHEMES.map(|s| format!("{s}://")).join(", "),
                    parsed.scheme()
                ));
            }
            match parsed.host_str() {
                Some(host) if !host.is_empty() => Ok(()),
                _ => Err("no host".to_owned()),
            }
        }
    }
}

/// `host:port` with a port number; the host is an IP address or a name
/// (resolved only when used).
fn host_port(value: &str) -> Result<(), String> {
    if value.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    let Some((host, port)) = value.rsplit_once(':') else {
        return Err("expected host:port".to_owned());
    };
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
        return Err("expected host:port".to_owned());
    }
    if host.starts_with('[') || host.contains(':') {
        return Err("not an IPv6 address in brackets, like [::1]:8080".to_owned());
    }
    port.parse::<u16>()
        .map(drop)
        .map_err(|_| format!("`{port}` is not a port number (0-65535)"))
}

/// A CORS origin: `*`, or `scheme://host[:port]` without a path.
fn origin(value: &str) -> Result<(), String> {
    let value = value.trim();
    if value.is_empty() || value == "*" {
        return Ok(());
    }
    let expected = "expected `*` or an origin like https://example.com:8443";
    let parsed = url::Url::parse(value).map_err(|e| format!("{e}; {expected}"))?;
    let bare = parsed.host_str().is_some()
        && matches!(parsed.scheme(), "http" | "https")
        && parsed.path() == "/"
        && !value.trim_end_matches('/').contains(['?', '#'])
        && parsed.username().is_empty()
        && !value.ends_with('/');
    if bare {
        Ok(())
    } else {
        Err(expected.to_owned())
    }
}

/// A JetStream stream name: no whitespace, `.`, `*`, `>` or path separators.
fn stream_name(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".to_owned());
    }
    match value
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || ".*>/\\".contains(*c))
    {
        Some(c) => Err(format!(
            "`{value}` is not a JetStream stream name (it must not contain {c:?}: no whitespace, `.`, `*`, `>`, `/` or `\\`)"
        )),
        None => Ok(()),
    }
}

/// A subject prefix: dot-separated non-empty tokens without wildcards.
fn subject_prefix(value: &str) -> Result<(), String> {
    let ok = value.split('.').all(|token| {
        !token.is_empty()
            && !token
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '*' || c == '>')
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{value}` is not a subject prefix (dot-separated tokens, none empty, without whitespace, `*` or `>`)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_as_their_clients_read_them() {
        assert!(url(UrlKind::Postgres, "postgres://u:p@localhost:5432/db").is_ok());
        assert!(url(UrlKind::Postgres, "postgresql:///db?host=/run/postgresql").is_ok());
        assert!(url(UrlKind::Postgres, "mysql://localhost/db").is_err());
        assert!(url(UrlKind::Postgres, "localhost:5432").is_err());
        assert!(url(UrlKind::Postgres, "postgres://localhost:99999/db").is_err());
        assert!(url(UrlKind::Nats, "nats://127.0.0.1:4222").is_ok());
        assert!(url(UrlKind::Nats, "127.0.0.1:4222").is_ok());
        assert!(url(UrlKind::Nats, "http://127.0.0.1:4222").is_err());
        assert!(url(UrlKind::Redis, "redis://:pw@127.0.0.1:6379/0").is_ok());
        assert!(url(UrlKind::Redis, "http://127.0.0.1:6379").is_err());
        assert!(url(UrlKind::Redis, "127.0.0.1:6379").is_err());
        assert!(url(UrlKind::Redis, "redis://a:7000,redis://b:7001").is_ok());
        assert!(url(UrlKind::Redis, "redis://a:7000,http://b:7001").is_err());
        assert!(url(UrlKind::Bolt, "bolt://127.0.0.1:7687").is_ok());
        assert!(url(UrlKind::Bolt, "neo4j+s://db.example.com").is_ok());
        assert!(url(UrlKind::Bolt, "127.0.0.1:7687").is_ok());
        assert!(url(UrlKind::Bolt, "http://127.0.0.1:7687").is_err());
    }

    #[test]
    fn host_port_needs_a_host_and_a_port() {
        for ok in [
            "127.0.0.1:8080",
            "127.0.0.1:0",
            "[::1]:8080",
            "localhost:2480",
        ] {
            assert_eq!(host_port(ok), Ok(()), "{ok}");
        }
        for bad in ["127.0.0.1", ":8080", "localhost:http", "::1:8080", "a b:1"] {
            assert!(host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn origins_streams_and_subjects() {
        for ok in ["*", "https://example.com", "http://localhost:3000", ""] {
            assert_eq!(origin(ok), Ok(()), "{ok}");
        }
        for bad in [
            "example.com",
            "https://example.com/app",
            "ftp://x",
            "https://a.b/?q",
        ] {
            assert!(origin(bad).is_err(), "{bad}");
        }
        assert!(stream_name("NEURECTOMY_EVENTS").is_ok());
        assert!(stream_name("a.b").is_err());
        assert!(stream_name("").is_err());
        assert!(subject_prefix("neurectomy.events").is_ok());
        assert!(subject_prefix("neurectomy..events").is_err());
        assert!(subject_prefix("neurectomy.*").is_err());
        assert!(subject_prefix("").is_err());
    }
}
