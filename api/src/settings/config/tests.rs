//! Loading settings from flags, an explicit environment and in-memory
//! files: no process environment, no disk (but the example and the README).

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::CommandFactory as _;

use super::catalog::{collect, Catalog, Found, Secret, CONFIG_ENV, KEYS};
use super::render::{render, Secrets, REDACTED};
use super::*;
use crate::cli::{load_with, Cli, Command as Sub, Loaded};
use crate::settings::LogFormat;

/// A test's world: environment variables and files.
#[derive(Default)]
struct World {
    env: HashMap<String, String>,
    files: HashMap<PathBuf, String>,
}

impl World {
    fn env(mut self, name: &str, value: &str) -> Self {
        self.env.insert(name.to_owned(), value.to_owned());
        self
    }

    fn file(mut self, path: &str, text: &str) -> Self {
        self.files.insert(PathBuf::from(path), text.to_owned());
        self
    }

    fn load(&self, args: &[&str]) -> Result<Loaded, LoadError> {
        let env = |name: &str| self.env.get(name).map(OsString::from);
        let read = |path: &Path| {
            self.files
                .get(path)
                .cloned()
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"))
        };
        let args = std::iter::once("neurectomy").chain(args.iter().copied());
        load_with(args, &env, &read)
    }

    fn ok(&self, args: &[&str]) -> Loaded {
        match self.load(args) {
            Ok(loaded) => loaded,
            Err(error) => panic!("{error}"),
        }
    }

    fn error(&self, args: &[&str]) -> String {
        match self.load(args) {
            Ok(_) => panic!("{args:?} loaded"),
            Err(LoadError::Config(error)) => error.to_string(),
            Err(LoadError::Cli(error)) => panic!("a command-line error: {error}"),
        }
    }
}

fn value(loaded: &Loaded, key: &str) -> (Vec<String>, Source) {
    let (values, source) = loaded.effective.get(key).unwrap();
    (values.to_vec(), source.clone())
}

fn one(loaded: &Loaded, key: &str) -> (String, Source) {
    let (values, source) = value(loaded, key);
    (values.join(","), source)
}

#[test]
fn neurectomy_lists_no_benchmark() {
    // The benchmarks are the `neurectomy-bench` binary (benches/neurectomy-bench).
    let mut command = Cli::command();
    let names: Vec<String> = command
        .get_subcommands()
        .map(|sub| sub.get_name().to_owned())
        .collect();
    assert!(
        !names.iter().any(|name| name.contains("bench")),
        "{names:?}"
    );
    let help = command.render_long_help().to_string().to_lowercase();
    assert!(!help.contains("bench"), "{help}");
}

#[test]
fn the_catalogue_covers_every_setting_once() {
    let mut found: Vec<Found> = Vec::new();
    collect(&Cli::command(), None, &mut found);
    for found in &found {
        assert!(
            found.env == CONFIG_ENV || KEYS.iter().any(|k| k.env == found.env),
            "{} has no file key in config::catalog::KEYS",
            found.env
        );
    }
    let catalog = Catalog::of(&Cli::command());
    assert_eq!(
        catalog.settings.len(),
        KEYS.len(),
        "a key names no argument"
    );
    for (i, key) in KEYS.iter().enumerate() {
        assert!(key.key.split('.').count() == 2, "{}", key.key);
        assert!(
            KEYS[..i]
                .iter()
                .all(|k| k.key != key.key && k.env != key.env),
            "{} twice",
            key.key
        );
    }
}

#[test]
fn without_flags_environment_or_file_every_setting_is_its_default() {
    let loaded = World::default().ok(&["serve"]);
    let catalog = Catalog::of(&Cli::command());
    for setting in &catalog.settings {
        let (values, source) = value(&loaded, setting.key.key);
        assert_eq!(source, Source::Default, "{}", setting.key.key);
        assert_eq!(values, setting.defaults, "{}", setting.key.key);
    }
    assert_eq!(loaded.cli.settings.api.api_max_depth, 12);
    assert_eq!(loaded.cli.config, None);
}

#[test]
fn a_flag_beats_the_environment_which_beats_the_file_which_beats_the_default() {
    let world = World::default()
        .file(
            "n.toml",
            "[api]\nmax_depth = 20\nmax_page = 30\nmax_complexity = 4000\n",
        )
        .env("NEURECTOMY_API_MAX_DEPTH", "21")
        .env("NEURECTOMY_API_MAX_PAGE", "31");
    let loaded = world.ok(&["--config", "n.toml", "serve", "--api-max-depth", "22"]);
    let api = &loaded.cli.settings.api;
    assert_eq!(
        (api.api_max_depth, api.api_max_page, api.api_max_complexity),
        (22, 31, 4000)
    );
    assert_eq!(api.api_body_limit, 262_144);
    assert_eq!(
        one(&loaded, "api.max_depth"),
        ("22".into(), Source::Flag("--api-max-depth".into()))
    );
    assert_eq!(
        one(&loaded, "api.max_page"),
        ("31".into(), Source::Env("NEURECTOMY_API_MAX_PAGE".into()))
    );
    assert_eq!(
        one(&loaded, "api.max_complexity"),
        ("4000".into(), Source::File("n.toml".into()))
    );
    assert_eq!(
        one(&loaded, "api.body_limit"),
        ("262144".into(), Source::Default)
    );
}

#[test]
fn the_complexity_limit_must_allow_a_full_page() {
    let world = World::default().env("NEURECTOMY_API_MAX_COMPLEXITY", "100");
    let error = match world.load(&["serve"]) {
        Ok(_) => panic!("a complexity limit below one full page was accepted"),
        Err(error) => error.to_string(),
    };
    assert!(
        error.contains("NEURECTOMY_API_MAX_COMPLEXITY (api.max_complexity)")
            && error.contains("api.max_page = 500"),
        "{error}"
    );
    // With smaller pages, the same limit is enough.
    world.env("NEURECTOMY_API_MAX_PAGE", "4").ok(&["serve"]);
}

#[test]
fn the_simulator_settings_reach_simulate_and_all() {
    let world = World::default()
        .file("n.toml", "[simulate]\nrate = 7\ntenant = \"acme\"\n")
        .env("NEURECTOMY_SIM_TENANT", "other");
    let loaded = world.ok(&["--config", "n.toml", "simulate", "--agents", "3"]);
    let Sub::Simulate(sim) = &loaded.cli.command else {
        panic!("not simulate");
    };
    assert_eq!((sim.rate, sim.agents), (7, 3));
    assert_eq!(sim.tenant, "other");
    assert_eq!(
        one(&loaded, "simulate.agents"),
        ("3".into(), Source::Flag("--agents".into()))
    );
    let loaded = world.ok(&["--config", "n.toml", "all", "--simulate"]);
    let Sub::All(all) = &loaded.cli.command else {
        panic!("not all");
    };
    assert_eq!((all.simulation.rate, all.simulation.agents), (7, 24));
    // Other commands still show (and check) them.
    let loaded = world.ok(&["--config", "n.toml", "config"]);
    assert_eq!(
        one(&loaded, "simulate.rate"),
        ("7".into(), Source::File("n.toml".into()))
    );
}

#[test]
fn the_file_is_named_by_the_flag_or_the_environment_and_never_guessed() {
    let world = World::default()
        .file("a.toml", "[log]\nfilter = \"warn\"\n")
        .file("b.toml", "[log]\nfilter = \"debug\"\n")
        .file("neurectomy.toml", "[log]\nfilter = \"trace\"\n");
    assert_eq!(world.ok(&["serve"]).cli.settings.log.filter, "info");
    let world = world.env(CONFIG_ENV, "a.toml");
    let loaded = world.ok(&["serve"]);
    assert_eq!(loaded.cli.settings.log.filter, "warn");
    assert_eq!(loaded.cli.config, Some(PathBuf::from("a.toml")));
    let loaded = world.ok(&["serve", "--config", "b.toml"]);
    assert_eq!(loaded.cli.settings.log.filter, "debug");
    assert_eq!(one(&loaded, "log.filter").1, Source::File("b.toml".into()));
    // An empty variable names no file.
    let world = World::default().env(CONFIG_ENV, "");
    assert_eq!(world.ok(&["serve"]).cli.settings.log.filter, "info");
    let missing = World::default().error(&["--config", "nope.toml", "serve"]);
    assert!(
        missing.starts_with("config file nope.toml: cannot read it"),
        "{missing}"
    );
}

#[test]
fn every_kind_of_value_is_read_from_the_file_and_the_environment() {
    let file = r#"
        [api]
        introspection = false
        cors_origins = ["https://a.example", "http://localhost:3000"]
        jwt_secret = "0123456789abcdef0123456789abcdef"
        [log]
        format = "json"
        [graph]
        http = "127.0.0.1:2481"
    "#;
    let loaded = World::default()
        .file("n.toml", file)
        .ok(&["--config", "n.toml", "serve"]);
    let settings = &loaded.cli.settings;
    assert!(!settings.api.api_introspection);
    assert_eq!(
        settings.api.api_cors_origins,
        ["https://a.example", "http://localhost:3000"]
    );
    assert_eq!(
        settings
            .api
            .jwt_secret
            .as_ref()
            .map(crate::settings::secret::Secret::expose),
        Some("0123456789abcdef0123456789abcdef")
    );
    assert_eq!(settings.log.format, LogFormat::Json);
    assert_eq!(settings.graph_http.as_deref(), Some("127.0.0.1:2481"));

    let loaded = World::default()
        .env("NEURECTOMY_API_INTROSPECTION", "false")
        .env("NEURECTOMY_API_CORS_ORIGINS", "https://a.example,*")
        .env("NEURECTOMY_LOG_FORMAT", "json")
        .ok(&["serve"]);
    let settings = &loaded.cli.settings;
    assert!(!settings.api.api_introspection);
    assert_eq!(settings.api.api_cors_origins, ["https://a.example", "*"]);
    assert_eq!(settings.log.format, LogFormat::Json);
    // An empty array in the file clears the list.
    let loaded = World::default()
        .file("n.toml", "[api]\ncors_origins = []\n")
        .ok(&["--config", "n.toml", "serve"]);
    assert!(loaded.cli.settings.api.api_cors_origins.is_empty());
}

#[test]
fn an_unknown_key_is_named_with_the_file() {
    let world = World::default().file("neurectomy.toml", "[api]\nmax_dept = 3\n");
    let error = world.error(&["--config", "neurectomy.toml", "serve"]);
    assert!(
        error.starts_with("config file neurectomy.toml: unknown setting `api.max_dept`"),
        "{error}"
    );
    assert!(error.contains("`max_depth`"), "{error}");
    let world = World::default().file("neurectomy.toml", "listen = \"x\"\n[web]\nport = 1\n");
    let error = world.error(&["--config", "neurectomy.toml", "serve"]);
    assert!(error.contains("unknown setting `listen`"), "{error}");
    assert!(error.contains("unknown setting `web`"), "{error}");
}

#[test]
fn a_value_of_the_wrong_type_is_named_by_its_dotted_key() {
    let world = World::default().file("neurectomy.toml", "[api]\nmax_depth = \"x\"\n");
    assert_eq!(
        world.error(&["--config", "neurectomy.toml", "serve"]),
        "config file neurectomy.toml: api.max_depth: expected an integer, found string \"x\""
    );
    let world = World::default().file("n.toml", "api = 3\n");
    assert_eq!(
        world.error(&["--config", "n.toml", "serve"]),
        "config file n.toml: api: expected a table, found integer 3"
    );
    let world = World::default().file("n.toml", "[graph]\npassword = 12345678\n");
    assert_eq!(
        world.error(&["--config", "n.toml", "serve"]),
        "config file n.toml: graph.password: expected a string, found integer"
    );
    let world = World::default().file("n.toml", "[api\n");
    let error = world.error(&["--config", "n.toml", "serve"]);
    assert!(
        error.starts_with("config file n.toml: TOML parse error at line 1"),
        "{error}"
    );
}

#[test]
fn a_stream_age_under_the_duplicate_window_is_refused_and_zero_is_no_limit() {
    let world = World::default().file("short.toml", "[nats]\nstream_max_age_s = 10\n");
    let error = world.error(&["--config", "short.toml", "serve"]);
    assert!(
        error.contains("nats.stream_max_age_s")
            && error.contains("must be 0 (no limit) or at least 120"),
        "{error}"
    );
    let world = World::default().file("none.toml", "[nats]\nstream_max_age_s = 0\n");
    let loaded = world.ok(&["--config", "none.toml", "serve"]);
    assert_eq!(
        loaded.cli.settings.relay_config().max_age,
        std::time::Duration::ZERO
    );
}

#[test]
fn a_value_its_parser_rejects_is_named_with_its_source() {
    let world = World::default().file(
        "n.toml",
        "[database]\npool_size = -1\n[log]\nformat = \"xml\"\n",
    );
    let error = world.error(&["--config", "n.toml", "serve"]);
    assert!(error.starts_with("2 configuration errors:"), "{error}");
    assert!(
        error.contains("config file n.toml: database.pool_size: invalid value `-1`"),
        "{error}"
    );
    assert!(
        error.contains(
            "config file n.toml: log.format: invalid value `xml`: expected one of pretty, json"
        ),
        "{error}"
    );
    let error = World::default()
        .env("NEURECTOMY_API_MAX_DEPTH", "deep")
        .error(&["serve"]);
    assert_eq!(
        error,
        "NEURECTOMY_API_MAX_DEPTH (api.max_depth): invalid value `deep`: invalid digit found in string"
    );
}

#[test]
fn a_bad_url_is_named_by_setting_and_source() {
    let bad = "mysql://root:hunter2@db/x";
    let from_env = World::default()
        .env("NEURECTOMY_DATABASE_URL", bad)
        .error(&["migrate"]);
    assert!(
        from_env.starts_with("NEURECTOMY_DATABASE_URL (database.url): `mysql://root:<redacted>@db/x` is not valid (the scheme must be postgres://"),
        "{from_env}"
    );
    assert!(!from_env.contains("hunter2"), "{from_env}");
    let from_file = World::default()
        .file("n.toml", "[redis]\nurl = \"http://127.0.0.1:6379\"\n")
        .error(&["--config", "n.toml", "project"]);
    assert!(
        from_file
            .starts_with("config file n.toml: redis.url: `http://127.0.0.1:6379` is not valid"),
        "{from_file}"
    );
    let from_flag = World::default().error(&["--graph-uri", "http://x:7687", "project"]);
    assert!(
        from_flag.starts_with("--graph-uri (graph.uri): `http://x:7687` is not valid"),
        "{from_flag}"
    );
    let nats = World::default()
        .env("NEURECTOMY_NATS_URL", "redis://127.0.0.1")
        .error(&["relay"]);
    assert!(
        nats.starts_with("NEURECTOMY_NATS_URL (nats.url):"),
        "{nats}"
    );
}

#[test]
fn sizes_timeouts_addresses_and_secrets_are_checked() {
    let cases = [
        ("NEURECTOMY_DATABASE_POOL_SIZE", "0", "must be at least 1"),
        ("NEURECTOMY_RELAY_BATCH_SIZE", "0", "must be at least 1"),
        (
            "NEURECTOMY_RELAY_IDLE_POLL_MS",
            "0",
            "must be at least 1 ms",
        ),
        (
            "NEURECTOMY_API_WS_INIT_TIMEOUT_MS",
            "7200000",
            "at most 3600000 ms",
        ),
        (
            "NEURECTOMY_API_WS_MESSAGE_LIMIT",
            "10",
            "must be at least 64",
        ),
        ("NEURECTOMY_API_LISTEN", "8080", "expected host:port"),
        (
            "NEURECTOMY_GRAPH_HTTP",
            "localhost:http",
            "not a port number",
        ),
        (
            "NEURECTOMY_JETSTREAM_STREAM",
            "a.b",
            "not a JetStream stream name",
        ),
        ("NEURECTOMY_SUBJECT_PREFIX", "a.>", "not a subject prefix"),
        (
            "NEURECTOMY_API_CORS_ORIGINS",
            "https://ok.example,nope",
            "`nope`",
        ),
        ("NEURECTOMY_LOG", "info,[", "not a tracing filter"),
        (
            "NEURECTOMY_JWT_PUBLIC_KEY",
            "/nonexistent/key.pem",
            "cannot read it",
        ),
        ("NEURECTOMY_SIM_TENANT", " ", "must not be empty"),
    ];
    for (env, value, reason) in cases {
        let error = World::default().env(env, value).error(&["migrate"]);
        assert!(error.starts_with(&format!("{env} (")), "{env}: {error}");
        assert!(error.contains(reason), "{env}: {error}");
    }
    let secret = "too-short-secret";
    let error = World::default()
        .env("NEURECTOMY_JWT_SECRET", secret)
        .error(&["serve"]);
    assert!(
        error.starts_with("NEURECTOMY_JWT_SECRET (api.jwt_secret):")
            && error.contains("at least 32 bytes"),
        "{error}"
    );
    assert!(!error.contains(secret), "{error}");
    // Zero where zero means something.
    World::default()
        .env("NEURECTOMY_SNAPSHOT_EVERY", "0")
        .env("NEURECTOMY_STATE_CACHE", "0")
        .env("NEURECTOMY_PROJECTOR_LINGER_MS", "0")
        .env("NEURECTOMY_API_LISTEN", "127.0.0.1:0")
        .env("NEURECTOMY_SIM_RATE", "0")
        .ok(&["serve"]);
}

#[test]
fn every_problem_is_reported_at_once() {
    let error = World::default()
        .file("n.toml", "[api]\nmax_page = 0\nbogus = 1\n")
        .env("NEURECTOMY_API_MAX_DEPTH", "0")
        .error(&["--config", "n.toml", "--api-body-limit", "0", "serve"]);
    assert!(error.starts_with("4 configuration errors:"), "{error}");
    for part in [
        "unknown setting `api.bogus`",
        "config file n.toml: api.max_page:",
        "NEURECTOMY_API_MAX_DEPTH (api.max_depth):",
        "--api-body-limit (api.body_limit):",
    ] {
        assert!(error.contains(part), "{part}: {error}");
    }
}

#[test]
fn a_command_line_error_stays_clap_s() {
    match World::default().load(&["--api-max-depth", "x", "serve"]) {
        Err(LoadError::Cli(error)) => {
            assert_eq!(error.kind(), clap::error::ErrorKind::ValueValidation)
        }
        other => panic!("{other:?}"),
    }
    match World::default().load(&["--help"]) {
        Err(LoadError::Cli(error)) => {
            assert_eq!(error.kind(), clap::error::ErrorKind::DisplayHelp);
            let help = error.to_string();
            assert!(
                help.contains("[env: NEURECTOMY_API_MAX_DEPTH] [config: api.max_depth]"),
                "{help}"
            );
        }
        other => panic!("{other:?}"),
    }
}

/// Secret values given in the environment, and where they must not appear.
fn secret_world() -> World {
    World::default()
        .env(
            "NEURECTOMY_DATABASE_URL",
            "postgres://app:pg-pass-1@127.0.0.1:5432/n",
        )
        .env(
            "NEURECTOMY_REDIS_URL",
            "redis://:redis-pass-2@127.0.0.1:6379/0",
        )
        .env("NEURECTOMY_NATS_URL", "nats://nats-token-3@127.0.0.1:4222")
        .env("NEURECTOMY_GRAPH_PASSWORD", "graph-pass-4")
        .env(
            "NEURECTOMY_JWT_SECRET",
            "jwt-secret-5-0123456789abcdefghijklmnop",
        )
        // The public key must be a file: this crate's manifest will do.
        .env("NEURECTOMY_JWT_PUBLIC_KEY", MANIFEST)
}

const MANIFEST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");

#[test]
fn secrets_are_redacted_in_the_output() {
    let loaded = secret_world().ok(&["config"]);
    let out = loaded.effective.to_toml();
    for secret in [
        "pg-pass-1",
        "redis-pass-2",
        "nats-token-3",
        "graph-pass-4",
        "jwt-secret-5",
    ] {
        assert!(!out.contains(secret), "{secret} in\n{out}");
    }
    for line in [
        "url = \"postgres://app:<redacted>@127.0.0.1:5432/n\"  # env NEURECTOMY_DATABASE_URL",
        "url = \"redis://:<redacted>@127.0.0.1:6379/0\"  # env NEURECTOMY_REDIS_URL",
        "url = \"nats://<redacted>@127.0.0.1:4222\"  # env NEURECTOMY_NATS_URL",
        "password = \"<redacted>\"  # env NEURECTOMY_GRAPH_PASSWORD",
        "jwt_secret = \"<redacted>\"  # env NEURECTOMY_JWT_SECRET",
        &format!("jwt_public_key = \"{MANIFEST}\"  # env NEURECTOMY_JWT_PUBLIC_KEY"),
    ] {
        assert!(out.contains(line), "no `{line}` in\n{out}");
    }
    // Saved and reused as it is, the placeholders are refused, by name.
    let error =
        World::default()
            .file("saved.toml", &out)
            .error(&["--config", "saved.toml", "serve"]);
    for key in [
        "database.url",
        "redis.url",
        "nats.url",
        "graph.password",
        "api.jwt_secret",
    ] {
        assert!(
            error.contains(&format!(
                "config file saved.toml: {key}: `{REDACTED}` is what"
            )),
            "{key}: {error}"
        );
    }
}

#[test]
fn the_output_reads_back_as_the_same_configuration() {
    let world = secret_world()
        .env(
            "NEURECTOMY_API_CORS_ORIGINS",
            "https://a.example,http://b.example:81",
        )
        .env("NEURECTOMY_LOG", "info,neurectomy_commands=debug")
        .file(
            "n.toml",
            "[api]\nintrospection = false\nmax_page = 77\n[simulate]\ntenant = \"q\\\"uote\"\n",
        );
    let first = world.ok(&["--config", "n.toml", "--log-format", "json", "config"]);
    let catalog = &first.effective.catalog;
    let reread = |text: &str| {
        let mut errors = Vec::new();
        let values = file::parse(Path::new("saved.toml"), text, catalog, &mut errors).unwrap();
        assert_eq!(errors, []);
        values
    };
    let unset = |setting: &catalog::Setting, resolved: &Resolved| {
        resolved.values.is_empty() && setting.kind != catalog::Kind::List
    };

    // In full (as tests may print it), every value comes back...
    let full = render(&first.effective, Secrets::Show);
    let values = reread(&full);
    for ((setting, resolved), value) in catalog
        .settings
        .iter()
        .zip(&first.effective.values)
        .zip(&values)
    {
        let expected = (!unset(setting, resolved)).then(|| resolved.values.clone());
        assert_eq!(value, &expected, "{}", setting.key.key);
    }
    // ...and loads to the same effective values, all from the file.
    let again =
        World::default()
            .file("saved.toml", &full)
            .ok(&["--config", "saved.toml", "config"]);
    for ((setting, resolved), again) in catalog
        .settings
        .iter()
        .zip(&first.effective.values)
        .zip(&again.effective.values)
    {
        assert_eq!(again.values, resolved.values, "{}", setting.key.key);
        let source = if unset(setting, resolved) {
            Source::Default
        } else {
            Source::File("saved.toml".into())
        };
        assert_eq!(again.source, source, "{}", setting.key.key);
    }

    // Redacted (as `neurectomy config` prints it), everything but the
    // secrets given comes back.
    let values = reread(&first.effective.to_toml());
    for ((setting, resolved), value) in catalog
        .settings
        .iter()
        .zip(&first.effective.values)
        .zip(&values)
    {
        let secret = setting.key.secret != Secret::No && resolved.source != Source::Default;
        let expected = (!unset(setting, resolved)).then(|| resolved.values.clone());
        if secret {
            assert_ne!(value, &expected, "{}", setting.key.key);
        } else {
            assert_eq!(value, &expected, "{}", setting.key.key);
        }
    }
}

#[test]
fn the_example_file_is_the_output_with_nothing_set_and_loads() {
    let example = include_str!("../../../../deploy/neurectomy.example.toml");
    let defaults = World::default().ok(&["config"]).effective.to_toml();
    assert!(
        example == defaults,
        "deploy/neurectomy.example.toml is out of date; regenerate it with \
         `neurectomy config > deploy/neurectomy.example.toml` (no NEURECTOMY_* variables set)"
    );
    let loaded =
        World::default()
            .file("example.toml", example)
            .ok(&["--config", "example.toml", "serve"]);
    for setting in &Catalog::of(&Cli::command()).settings {
        let (values, _) = value(&loaded, setting.key.key);
        assert_eq!(values, setting.defaults, "{}", setting.key.key);
    }
}

#[test]
fn the_readme_documents_every_setting() {
    let readme = include_str!("../../../../README.md");
    for setting in &Catalog::of(&Cli::command()).settings {
        let default = match setting.defaults.as_slice() {
            [] => "none".to_owned(),
            values => format!("`{}`", values.join(",")),
        };
        let row = format!(
            "| `{}` | `{}` | `{}` | {default} |",
            setting.key.key, setting.flag, setting.key.env
        );
        assert!(
            readme.contains(&row),
            "README.md has no row starting `{row}`"
        );
    }
}

#[test]
fn otel_variables_come_from_the_same_environment_as_every_setting() {
    let loaded = World::default()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", " http://collector:4318 ")
        .env("OTEL_SERVICE_NAME", "neurectomy-api")
        .env("OTEL_UNRELATED", "x")
        .env("OTEL_BSP_MAX_QUEUE_SIZE", "")
        .ok(&["serve"]);
    let otel = &loaded.cli.settings.log.otel;
    assert_eq!(
        otel.get("OTEL_EXPORTER_OTLP_ENDPOINT").as_deref(),
        Some("http://collector:4318")
    );
    assert_eq!(
        otel.get("OTEL_SERVICE_NAME").as_deref(),
        Some("neurectomy-api")
    );
    assert_eq!(otel.get("OTEL_UNRELATED"), None, "not one of ours");
    assert_eq!(otel.get("OTEL_BSP_MAX_QUEUE_SIZE"), None, "empty is unset");
    let (config, warnings) = crate::telemetry::OtlpConfig::from_settings(otel);
    let config = config.expect("an endpoint is set");
    assert_eq!(config.service_name, "neurectomy-api");
    assert!(warnings.is_empty(), "{warnings:?}");
}
