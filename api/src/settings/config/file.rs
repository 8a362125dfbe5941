//! The configuration file: TOML whose tables and keys are the settings'
//! file keys (`[api] max_depth = 12`). Unknown keys and values of the wrong
//! TOML type are errors naming the key and the file.

use std::path::Path;

use super::catalog::{Catalog, Kind, Secret, Setting};
use super::{ConfigError, Origin, Source};

/// The values a file sets: per setting of the catalogue (same index), the
/// raw values as a flag would take them, or `None`.
pub(crate) type FileValues = Vec<Option<Vec<String>>>;

/// Reads the settings `text` (the file at `path`) sets; problems with
/// single keys go to `errors`, and those keys count as not set.
pub(crate) fn parse(
    path: &Path,
    text: &str,
    catalog: &Catalog,
    errors: &mut Vec<ConfigError>,
) -> Result<FileValues, ConfigError> {
    let document: toml::Table = toml::from_str(text).map_err(|error| ConfigError::File {
        path: path.to_owned(),
        message: error.to_string().trim_end().to_owned(),
    })?;
    let mut values = vec![None; catalog.settings.len()];
    let tables = catalog.tables();
    for (table, content) in &document {
        if !tables.contains(&table.as_str()) {
            errors.push(ConfigError::UnknownKey {
                path: path.to_owned(),
                key: table.clone(),
                hint: format!("the tables are {}", list(&tables)),
            });
            continue;
        }
        let Some(content) = content.as_table() else {
            errors.push(ConfigError::WrongType {
                origin: Origin::file(table, path),
                expected: "a table",
                found: describe(content, Secret::No),
            });
            continue;
        };
        for (name, value) in content {
            let key = format!("{table}.{name}");
            let Some(index) = catalog.by_key(&key) else {
                let names: Vec<&str> = catalog
                    .settings
                    .iter()
                    .map(Setting::table_and_name)
                    .filter(|(t, _)| t == table)
                    .map(|(_, n)| n)
                    .collect();
                errors.push(ConfigError::UnknownKey {
                    path: path.to_owned(),
                    key,
                    hint: format!("[{table}] has {}", list(&names)),
                });
                continue;
            };
            let setting = &catalog.settings[index];
            match raw(setting, value) {
                Some(raw) => values[index] = Some(raw),
                None => errors.push(ConfigError::WrongType {
                    origin: Origin::file(&key, path),
                    expected: setting.kind.expected(),
                    found: describe(value, setting.key.secret),
                }),
            }
        }
    }
    Ok(values)
}

/// The value as a flag would take it, if it has the setting's type.
/// Negative integers pass: the setting's own parser rejects them with its
/// range in the message.
fn raw(setting: &Setting, value: &toml::Value) -> Option<Vec<String>> {
    match (setting.kind, value) {
        (Kind::Str, toml::Value::String(s)) => Some(vec![s.clone()]),
        (Kind::Int, toml::Value::Integer(i)) => Some(vec![i.to_string()]),
        (Kind::Bool, toml::Value::Boolean(b)) => Some(vec![b.to_string()]),
        (Kind::List, toml::Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_owned))
            .collect(),
        _ => None,
    }
}

/// A value's type (and the value itself when short and not secret).
fn describe(value: &toml::Value, secret: Secret) -> String {
    let shown = value.to_string();
    if secret != Secret::No || shown.len() > 40 || value.is_table() {
        value.type_str().to_owned()
    } else {
        format!("{} {shown}", value.type_str())
    }
}

fn list(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Origin {
    /// A key of the file at `path`.
    pub(crate) fn file(key: &str, path: &Path) -> Origin {
        Origin {
            key: key.to_owned(),
            source: Source::File(path.to_owned()),
        }
    }
}
