//! `neurectomy config`: the effective configuration as a TOML file of the
//! shape `--config` reads, every setting with its help, its flag and
//! environment variable, and its source; secrets redacted.

use std::fmt::Write as _;

use super::catalog::{Kind, Secret};
use super::{Effective, Source};

/// What a redacted secret reads as.
pub(crate) use crate::settings::secret::REDACTED;

/// Width of the help comments.
const WIDTH: usize = 90;

/// Whether secrets are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Secrets {
    /// As [`REDACTED`] (unless they are the built-in default, which is no
    /// secret: `--help` shows it).
    Redact,
    /// In full (tests only).
    #[cfg_attr(not(test), allow(dead_code))]
    Show,
}

const HEADER: &str = "\
# Neurectomy configuration, as `neurectomy config` prints it.
#
# Use it with `neurectomy --config <file>` (or NEURECTOMY_CONFIG=<file>). Precedence:
# command-line flag > environment variable > this file > built-in default. Every key is
# optional; an unknown key or a value of the wrong type stops start-up. The comment after
# a value says where it came from; secrets read \"<redacted>\" (put the real one back, or
# set its environment variable, before using such a file).
";

/// The effective configuration as TOML.
pub(crate) fn render(effective: &Effective, secrets: Secrets) -> String {
    let mut out = String::from(HEADER);
    let mut table = "";
    for (setting, resolved) in effective.catalog.settings.iter().zip(&effective.values) {
        let (this_table, name) = setting.table_and_name();
        if this_table != table {
            table = this_table;
            let _ = write!(out, "\n[{table}]\n");
        }
        for line in wrap(&sentence(&setting.help)) {
            let _ = writeln!(out, "# {line}");
        }
        let flag = match setting.commands.as_slice() {
            [] => setting.flag.clone(),
            commands => format!("`{}` {}", commands.join("`/`"), setting.flag),
        };
        let _ = writeln!(out, "# {flag}, {}", setting.key.env);
        let source = comment(&resolved.source);
        if setting.kind != Kind::List && resolved.values.is_empty() {
            let _ = writeln!(out, "# {name} = \"\"  # not set ({source})");
            continue;
        }
        let redact_it = secrets == Secrets::Redact && resolved.source != Source::Default;
        let shown = |value: &String| {
            let value = if redact_it {
                redact(setting.key.secret, value)
            } else {
                value.clone()
            };
            toml::Value::String(value).to_string()
        };
        let value = match setting.kind {
            Kind::Int | Kind::Bool => resolved.values.join(""),
            Kind::Str => resolved.values.first().map(shown).unwrap_or_default(),
            Kind::List => format!(
                "[{}]",
                resolved
                    .values
                    .iter()
                    .map(shown)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let _ = writeln!(out, "{name} = {value}  # {source}");
    }
    out
}

/// The source comment of a value.
fn comment(source: &Source) -> String {
    match source {
        Source::Default => "default".to_owned(),
        Source::File(_) => "file".to_owned(),
        Source::Env(name) => format!("env {name}"),
        Source::Flag(flag) => format!("flag {flag}"),
    }
}

/// `value` with what `secret` names replaced by [`REDACTED`].
pub(crate) fn redact(secret: Secret, value: &str) -> String {
    match secret {
        Secret::No => value.to_owned(),
        Secret::Whole => REDACTED.to_owned(),
        Secret::UrlPassword { token } => crate::settings::secret::redact_url(value, token),
    }
}

/// Help text as a sentence (clap drops the final full stop).
fn sentence(help: &str) -> String {
    let help = help.trim_end();
    if help.is_empty() || help.ends_with(['.', '!', '?']) {
        help.to_owned()
    } else {
        format!("{help}.")
    }
}

/// Help text cut into comment lines.
fn wrap(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    for paragraph in text.split("\n\n") {
        let mut line = String::new();
        for word in paragraph.split_whitespace() {
            if !line.is_empty() && line.len() + 1 + word.len() > WIDTH - 2 {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        if !line.is_empty() {
            lines.push(line);
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_are_redacted() {
        let pg = Secret::UrlPassword { token: false };
        let nats = Secret::UrlPassword { token: true };
        assert_eq!(
            redact(pg, "postgres://app:s3cr:et@db:5432/x?sslmode=require"),
            "postgres://app:<redacted>@db:5432/x?sslmode=require"
        );
        assert_eq!(
            redact(pg, "postgres://app@db/x?password=s3cret&sslmode=require"),
            "postgres://app@db/x?password=<redacted>&sslmode=require"
        );
        assert_eq!(
            redact(pg, "redis://:pw@127.0.0.1:6379/0"),
            "redis://:<redacted>@127.0.0.1:6379/0"
        );
        assert_eq!(
            redact(pg, "postgres://postgres@127.0.0.1/db"),
            "postgres://postgres@127.0.0.1/db"
        );
        assert_eq!(
            redact(pg, "redis://:a@n1:7000,redis://:b@n2:7001"),
            "redis://:<redacted>@n1:7000,redis://:<redacted>@n2:7001"
        );
        assert_eq!(
            redact(nats, "nats://t0ken@127.0.0.1:4222"),
            "nats://<redacted>@127.0.0.1:4222"
        );
        assert_eq!(
            redact(nats, "nats://127.0.0.1:4222"),
            "nats://127.0.0.1:4222"
        );
        assert_eq!(redact(Secret::Whole, "anything"), REDACTED);
        assert_eq!(redact(Secret::No, "anything"), "anything");
    }

    #[test]
    fn help_wraps_at_the_comment_width() {
        let text = "word ".repeat(60);
        let lines = wrap(&text);
        assert!(lines.len() > 1);
        assert!(lines.iter().all(|l| l.len() <= WIDTH - 2));
    }
}
