//! # Configuration: flags, environment variables, a TOML file, defaults
//!
//! Every setting is a clap argument of [`crate::settings`] with a flag, an
//! environment variable and (mostly) a built-in default; [`catalog::KEYS`]
//! gives each a key in the configuration file. [`load_parsed`] resolves
//! each setting with the precedence
//!
//! **command-line flag > environment variable > config file > built-in default**
//!
//! in one code path: the file is read only when `--config <file>` or
//! `NEURECTOMY_CONFIG` names one; the environment is passed in (so tests need
//! no process environment); the values of the environment and of the file
//! become the clap arguments' defaults, so clap parses them with the same
//! value parsers as flags and a flag still wins. Then every effective value
//! is checked ([`check`]): URLs the clients accept, sizes that make sense,
//! sane timeouts, a long enough JWT secret — and then a [`CrossCheck`] the
//! caller passes for what only several settings together can be wrong about
//! (the command line's module gives the GraphQL limits' check; this module
//! knows nothing of the server).
//!
//! Any problem is a [`ConfigError`] that names the setting and where its
//! value came from (`--api-max-depth`, `NEURECTOMY_API_MAX_DEPTH`, or the
//! file and key `api.max_depth`). Every value given is parsed, even one a
//! higher layer overrides: a broken file or variable is reported, not
//! hidden.
//!
//! [`Effective::to_toml`] prints the result as a file of the same shape,
//! each value's source in a comment and secrets redacted
//! (`neurectomy config`). [`load_as`] loads any command line over the
//! same settings (the `neurectomy-bench` binary's).

mod catalog;
mod check;
mod file;
mod render;
#[cfg(test)]
mod tests;

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command, CommandFactory, FromArgMatches};

use crate::settings::Settings;
use catalog::{Catalog, Kind, Secret, Setting, CONFIG_ENV};

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The built-in default.
    Default,
    /// The configuration file at this path.
    File(PathBuf),
    /// This environment variable.
    Env(String),
    /// This command-line flag.
    Flag(String),
}

/// A setting (its file key) and where the value in question came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The setting's key in the configuration file, e.g. `api.max_depth`.
    pub key: String,
    /// Where the value came from.
    pub source: Source,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key = &self.key;
        match &self.source {
            Source::Default => write!(f, "{key} (built-in default)"),
            Source::File(path) => write!(f, "config file {}: {key}", path.display()),
            Source::Env(name) => write!(f, "{name} ({key})"),
            Source::Flag(flag) => write!(f, "{flag} ({key})"),
        }
    }
}

/// A configuration that cannot be used. Each names the setting (or the
/// file) and where the value came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file cannot be read or is not TOML.
    #[error("config file {}: {message}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The file has a key that is no setting.
    #[error("config file {}: unknown setting `{key}` ({hint})", path.display())]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The dotted key.
        key: String,
        /// The keys that exist there.
        hint: String,
    },
    /// A file value of the wrong TOML type.
    #[error("{origin}: expected {expected}, found {found}")]
    WrongType {
        /// The setting and file.
        origin: Origin,
        /// The type the setting takes.
        expected: &'static str,
        /// What the file has.
        found: String,
    },
    /// A value the setting cannot take.
    #[error("{origin}: {reason}")]
    Invalid {
        /// The setting and where the value came from.
        origin: Origin,
        /// Why it cannot.
        reason: String,
    },
    /// More than one of the above.
    #[error("{} configuration errors:\n  {}", .0.len(), .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Several(Vec<ConfigError>),
}

impl ConfigError {
    fn from_list(mut errors: Vec<ConfigError>) -> Option<ConfigError> {
        match errors.len() {
            0 => None,
            1 => errors.pop(),
            _ => Some(ConfigError::Several(errors)),
        }
    }
}

/// Why the command line and configuration give nothing to run.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A usage error, or `--help` / `--version`: clap prints it and sets the
    /// exit code ([`clap::Error::exit`]).
    #[error(transparent)]
    Cli(#[from] clap::Error),
    /// An invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Every setting's effective value and where it came from.
#[derive(Debug, Clone)]
pub struct Effective {
    catalog: Catalog,
    values: Vec<Resolved>,
}

/// One setting's value(s) (empty: not set) and source.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Resolved {
    source: Source,
    values: Vec<String>,
}

impl Effective {
    /// The configuration as a TOML file of the shape `--config` reads, each
    /// value's source in a comment, secrets redacted.
    pub fn to_toml(&self) -> String {
        render::render(self, render::Secrets::Redact)
    }

    /// The value(s) of the setting with file key `key` (empty: not set) and
    /// their source.
    pub fn get(&self, key: &str) -> Option<(&[String], &Source)> {
        let index = self.catalog.by_key(key)?;
        let resolved = self.values.get(index)?;
        Some((&resolved.values, &resolved.source))
    }
}

/// Reads the environment of this process (for the loaders in `main`).
pub fn process_env(name: &str) -> Option<OsString> {
    std::env::var_os(name)
}

/// Loads the command line `C` — any command line that flattens
/// [`Settings`] and has a `--config` argument (`neurectomy`'s, or the
/// `neurectomy-bench` binary's) — with the process's environment and files.
/// Returns the parsed command line.
pub fn load_as<C, I, T>(args: I, env: &dyn Fn(&str) -> Option<OsString>) -> Result<C, LoadError>
where
    C: CommandFactory + FromArgMatches,
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let (cli, _) =
        load_parsed::<C, _, _>(args, env, &|path| std::fs::read_to_string(path), &|_| {
            Vec::new()
        })?;
    Ok(cli)
}

/// A check across settings that a single value's check cannot make: each
/// problem as the key of the setting to change and why.
pub type CrossCheck<'a> = &'a dyn Fn(&Settings) -> Vec<(&'static str, String)>;

/// Parses the command line `C` (program name first) with the environment
/// `env` and the configuration file they name (read with `read`), resolves
/// every setting, checks each and then `cross_check` across them.
pub fn load_parsed<C, I, T>(
    args: I,
    env: &dyn Fn(&str) -> Option<OsString>,
    read: &dyn Fn(&Path) -> std::io::Result<String>,
    cross_check: CrossCheck<'_>,
) -> Result<(C, Effective), LoadError>
where
    C: CommandFactory + FromArgMatches,
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let base = C::command();
    let catalog = Catalog::of(&base);
    let mut errors = Vec::new();

    // The file: named by the flag (found by a lenient first parse) or the
    // environment; never guessed.
    let config_env = env(CONFIG_ENV).filter(|v| !v.is_empty());
    let config = layered_command(base.clone(), &catalog, &[], config_env.as_deref())
        .ignore_errors(true)
        .try_get_matches_from(&args)
        .ok()
        .and_then(|matches| from_command_line(&matches, "config"))
        .and_then(|values| values.into_iter().next())
        .or(config_env.clone())
        .map(PathBuf::from);
    let file_values = match &config {
        Some(path) => match read(path) {
            Ok(text) => file::parse(path, &text, &catalog, &mut errors).unwrap_or_else(|error| {
                errors.push(error);
                Vec::new()
            }),
            Err(error) => {
                errors.push(ConfigError::File {
                    path: path.clone(),
                    message: format!("cannot read it: {error}"),
                });
                Vec::new()
            }
        },
        None => Vec::new(),
    };

    // Below the command line: environment, then file, then default. Every
    // value given is parsed, used or not.
    let layered: Vec<Resolved> = catalog
        .settings
        .iter()
        .enumerate()
        .map(|(index, setting)| {
            let from_env = env(setting.key.env).and_then(|raw| {
                let source = Source::Env(setting.key.env.to_owned());
                match raw.into_string() {
                    Ok(raw) => Some(Resolved {
                        source,
                        values: split_env(setting.kind, raw),
                    }),
                    Err(_) => {
                        errors.push(invalid(setting, source, "not valid UTF-8".to_owned()));
                        None
                    }
                }
            });
            let from_file = file_values
                .get(index)
                .cloned()
                .flatten()
                .zip(config.clone())
                .map(|(values, path)| Resolved {
                    source: Source::File(path),
                    values,
                });
            let mut parses = |resolved: &Resolved| match parse_values(setting, &resolved.values) {
                Ok(()) => true,
                Err(reason) => {
                    errors.push(invalid(setting, resolved.source.clone(), reason));
                    false
                }
            };
            let from_env = from_env.filter(&mut parses);
            let from_file = from_file.filter(&mut parses);
            from_env.or(from_file).unwrap_or_else(|| Resolved {
                source: Source::Default,
                values: setting.defaults.clone(),
            })
        })
        .collect();

    // The command line, with those values as its defaults.
    let command = layered_command(base, &catalog, &layered, config_env.as_deref());
    let matches = command.try_get_matches_from(&args)?;
    let cli = C::from_arg_matches(&matches)?;
    let settings = Settings::from_arg_matches(&matches)?;
    let values: Vec<Resolved> = catalog
        .settings
        .iter()
        .zip(layered)
        .map(
            |(setting, layered)| match from_command_line(&matches, &setting.id) {
                Some(values) => Resolved {
                    source: Source::Flag(setting.flag.clone()),
                    values: values
                        .into_iter()
                        .map(|v| v.to_string_lossy().into_owned())
                        .collect(),
                },
                None => layered,
            },
        )
        .collect();

    for (setting, resolved) in catalog.settings.iter().zip(&values) {
        if let Err(reason) = check::check(setting, &resolved.values) {
            errors.push(invalid(setting, resolved.source.clone(), reason));
        }
    }
    for (key, reason) in cross_check(&settings) {
        if let Some((setting, resolved)) = catalog
            .settings
            .iter()
            .zip(&values)
            .find(|(setting, _)| setting.key.key == key)
        {
            errors.push(invalid(setting, resolved.source.clone(), reason));
        }
    }
    match ConfigError::from_list(errors) {
        Some(error) => Err(error.into()),
        None => Ok((cli, Effective { catalog, values })),
    }
}

fn invalid(setting: &Setting, source: Source, reason: String) -> ConfigError {
    ConfigError::Invalid {
        origin: Origin {
            key: setting.key.key.to_owned(),
            source,
        },
        reason,
    }
}

/// An environment variable's values: a list is comma-separated, as clap
/// reads it.
fn split_env(kind: Kind, raw: String) -> Vec<String> {
    match kind {
        Kind::List => raw.split(',').map(str::to_owned).collect(),
        _ => vec![raw],
    }
}

/// Parses `values` with the setting's own clap value parser, so a value from
/// the file or the environment is read exactly as the flag would be.
fn parse_values(setting: &Setting, values: &[String]) -> Result<(), String> {
    let action = match setting.kind {
        Kind::List => ArgAction::Append,
        _ => ArgAction::Set,
    };
    let arg = Arg::new("value")
        .long("value")
        .value_parser(setting.arg.get_value_parser().clone())
        .action(action);
    let shown = |value: &str| match setting.key.secret {
        Secret::Whole => String::new(),
        secret => format!(" `{}`", render::redact(secret, value)),
    };
    for value in values {
        Command::new("neurectomy")
            .no_binary_name(true)
            .arg(arg.clone())
            .try_get_matches_from([format!("--value={value}")])
            .map_err(|error| format!("invalid value{}: {}", shown(value), reason(&error)))?;
    }
    Ok(())
}

/// What a value parser said, without clap's framing (which names a flag
/// the value may not have come from).
fn reason(error: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    match (error.kind(), error.get(ContextKind::ValidValue)) {
        (ErrorKind::InvalidValue, Some(ContextValue::Strings(valid))) => {
            format!("expected one of {}", valid.join(", "))
        }
        _ => match std::error::Error::source(error) {
            Some(source) => source.to_string(),
            None => error.kind().to_string(),
        },
    }
}

/// The raw values of argument `id` if they were given on the command line
/// (at any sub-command level).
fn from_command_line(matches: &ArgMatches, id: &str) -> Option<Vec<OsString>> {
    let here = if matches.ids().any(|i| i.as_str() == id)
        && matches.value_source(id) == Some(ValueSource::CommandLine)
    {
        matches
            .get_raw(id)
            .map(|values| values.map(OsStr::to_os_string).collect())
    } else {
        None
    };
    here.or_else(|| {
        let (_, sub) = matches.subcommand()?;
        from_command_line(sub, id)
    })
}

/// `command` with clap's own environment look-up replaced by `layers`
/// (per catalogue setting; none: built-in defaults) as defaults, and each
/// setting's help naming its variable and file key.
fn layered_command(
    command: Command,
    catalog: &Catalog,
    layers: &[Resolved],
    config_env: Option<&OsStr>,
) -> Command {
    rewrite(command, &mut |arg: Arg| {
        let Some(env) = arg.get_env().and_then(OsStr::to_str).map(str::to_owned) else {
            return arg;
        };
        let index = catalog.by_env(&env);
        let note = match index {
            Some(i) => format!("[env: {env}] [config: {}]", catalog.settings[i].key.key),
            None => format!("[env: {env}]"),
        };
        let help = arg.get_help().map(|h| format!("{h} {note}"));
        let long_help = arg.get_long_help().map(|h| format!("{h}\n\n{note}"));
        let mut arg = arg.env(None);
        if let Some(help) = help {
            arg = arg.help(help);
        }
        if let Some(long_help) = long_help {
            arg = arg.long_help(long_help);
        }
        if env == CONFIG_ENV {
            if let Some(path) = config_env {
                arg = arg.default_value(path.to_string_lossy().into_owned());
            }
            return arg;
        }
        let layer = index.and_then(|i| Some((&catalog.settings[i], layers.get(i)?)));
        match layer {
            Some((setting, layer)) if layer.source != Source::Default => {
                let arg = arg.default_values(layer.values.clone());
                // `--help` shows defaults; not secrets from the environment or a file.
                arg.hide_default_value(setting.key.secret != Secret::No)
            }
            _ => arg,
        }
    })
}

/// Applies `f` to every argument of `command` and its sub-commands.
fn rewrite(command: Command, f: &mut dyn FnMut(Arg) -> Arg) -> Command {
    command
        .mut_args(&mut *f)
        .mut_subcommands(|sub| rewrite(sub, f))
}
