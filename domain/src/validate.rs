//! Payload limits. Commands arrive from the network; every string, list and
//! JSON document has a bound so that one request cannot bloat a stream.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::error::DomainError;

/// Longest agent, task or workflow name/title, in characters.
pub const MAX_NAME_CHARS: usize = 200;
/// Longest free-text reason, note or error message, in characters.
pub const MAX_TEXT_CHARS: usize = 2_000;
/// Most capabilities an agent may declare or a task may require.
pub const MAX_CAPABILITIES: usize = 64;
/// Longest capability name, in bytes.
pub const MAX_CAPABILITY_LEN: usize = 64;
/// Most dependencies one task may have.
pub const MAX_DEPENDENCIES: usize = 256;
/// Largest JSON document (task input/output, workflow metadata), serialized.
pub const MAX_JSON_BYTES: usize = 64 * 1024;
/// Most attempts a task may be configured for.
pub const MAX_ATTEMPTS: u32 = 100;

/// A required, trimmed, bounded, non-empty name.
pub fn name(field: &'static str, value: &str) -> Result<(), DomainError> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(DomainError::validation(field, "must not be empty"));
    }
    if trimmed.len() != value.len() {
        return Err(DomainError::validation(
            field,
            "must not start or end with whitespace",
        ));
    }
    bounded_text(field, value, MAX_NAME_CHARS)
}

/// Optional free text within [`MAX_TEXT_CHARS`].
pub fn text(field: &'static str, value: &str) -> Result<(), DomainError> {
    bounded_text(field, value, MAX_TEXT_CHARS)
}

fn bounded_text(field: &'static str, value: &str, max: usize) -> Result<(), DomainError> {
    let chars = value.chars().count();
    if chars > max {
        return Err(DomainError::validation(
            field,
            format!("is {chars} characters long; the limit is {max}"),
        ));
    }
    if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(DomainError::validation(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// Capability names: 1–64 bytes of `a-z 0-9 . _ : -`, starting alphanumeric,
/// at most [`MAX_CAPABILITIES`] of them. Returns them sorted and deduplicated.
pub fn capabilities(field: &'static str, values: &[String]) -> Result<Vec<String>, DomainError> {
    if values.len() > MAX_CAPABILITIES {
        return Err(DomainError::validation(
            field,
            format!(
                "lists {} capabilities; the limit is {MAX_CAPABILITIES}",
                values.len()
            ),
        ));
    }
    let mut set = BTreeSet::new();
    for value in values {
        let ok_len = !value.is_empty() && value.len() <= MAX_CAPABILITY_LEN;
        let ok_first = value
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let ok_chars = value.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b':' | b'-')
        });
        if !(ok_len && ok_first && ok_chars) {
            return Err(DomainError::validation(
                field,
                format!(
                    "`{value}` is not a capability name: use 1-{MAX_CAPABILITY_LEN} characters of a-z, 0-9, '.', '_', ':' or '-', starting with a letter or digit"
                ),
            ));
        }
        set.insert(value.clone());
    }
    Ok(set.into_iter().collect())
}

/// A JSON document within [`MAX_JSON_BYTES`] when serialized, without the
/// NUL character in any string or key (JSON allows `\u0000`; the event
/// store's `jsonb` does not, so such a document could never be stored).
pub fn json(field: &'static str, value: &Value) -> Result<(), DomainError> {
    let size = serde_json::to_vec(value)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > MAX_JSON_BYTES {
        return Err(DomainError::validation(
            field,
            format!("is {size} bytes of JSON; the limit is {MAX_JSON_BYTES}"),
        ));
    }
    if let Some(path) = nul_at(value, &mut String::new()) {
        return Err(DomainError::validation(
            field,
            format!(
                "contains the NUL character (\\u0000) at {path}, which cannot be stored; remove it"
            ),
        ));
    }
    Ok(())
}

/// Where a string or key containing NUL is (`$`, `$.key`, `$[3]`), if any.
fn nul_at(value: &Value, path: &mut String) -> Option<String> {
    match value {
        Value::String(s) if s.contains('\0') => Some(format!("${path}")),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            let len = path.len();
            path.push_str(&format!("[{i}]"));
            let found = nul_at(item, path);
            path.truncate(len);
            found
        }),
        Value::Object(map) => map.iter().find_map(|(key, item)| {
            let len = path.len();
            path.push('.');
            path.push_str(&key.replace('\0', "\\u0000"));
            let found = if key.contains('\0') {
                Some(format!("${path} (the key)"))
            } else {
                nul_at(item, path)
            };
            path.truncate(len);
            found
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_sorted_deduplicated_and_checked() {
        let caps = capabilities("c", &["b".into(), "a".into(), "b".into()]).unwrap();
        assert_eq!(caps, vec!["a".to_string(), "b".to_string()]);
        let err = capabilities("c", &["Bad Cap".into()]).unwrap_err();
        assert_eq!(err.code(), "VALIDATION");
        assert!(err
            .to_string()
            .contains("`Bad Cap` is not a capability name"));
    }

    #[test]
    fn names_and_json_are_bounded() {
        assert!(name("n", "").is_err());
        assert!(name("n", " padded").is_err());
        assert!(name("n", &"x".repeat(MAX_NAME_CHARS + 1)).is_err());
        assert!(name("n", "ok name").is_ok());
        let big = Value::String("x".repeat(MAX_JSON_BYTES));
        assert!(json("input", &big).is_err());
        assert!(json("input", &serde_json::json!({"k": 1})).is_ok());
    }

    #[test]
    fn json_with_nul_is_refused_with_where_it_is() {
        for (value, at) in [
            (serde_json::json!("a\u{0}b"), "at $,"),
            (serde_json::json!({"k": ["x", "a\u{0}"]}), "at $.k[1],"),
            (serde_json::json!({"a\u{0}": 1}), "(the key)"),
        ] {
            let err = json("metadata", &value).unwrap_err();
            assert_eq!(err.code(), "VALIDATION");
            assert!(err.to_string().contains(at), "{err}");
        }
        assert!(json("metadata", &serde_json::json!({"k": "a\\u0000"})).is_ok());
    }
}
