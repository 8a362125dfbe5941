//! The real binary's configuration handling: a bad file or variable stops
//! start-up with exit code 2 and a message naming the setting, before any
//! service is contacted; `neurectomy config` prints what it runs with.
//! Each test runs the binary with a cleared environment (so nothing of the
//! caller's `NEURECTOMY_*` leaks in) and its own files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

use uuid::Uuid;

const BINARY: &str = env!("CARGO_BIN_EXE_neurectomy-e2e");

/// A file of this test only, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(text: &str) -> Self {
        let path = std::env::temp_dir().join(format!("neurectomy-config-{}.toml", Uuid::new_v4()));
        std::fs::write(&path, text).unwrap();
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(BINARY)
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn a_bad_file_stops_start_up_naming_the_key_and_the_file() {
    let file = TempFile::new("[api]\nmax_depth = \"x\"\nmax_dept = 3\n");
    for args in [
        &["config", "--config", file.path()][..],
        &["--config", file.path(), "serve"][..],
    ] {
        let output = run(args, &[]);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "config file {}: api.max_depth: expected an integer, found string \"x\"",
                file.path()
            )),
            "{stderr}"
        );
        assert!(
            stderr.contains("unknown setting `api.max_dept`"),
            "{stderr}"
        );
        assert!(output.stdout.is_empty(), "{}", text(&output.stdout));
    }
}

#[test]
fn a_bad_variable_stops_start_up_before_any_connection() {
    // Port 1 would make `relay` wait for a connection; the check comes first.
    let output = run(
        &["relay"],
        &[
            (
                "NEURECTOMY_DATABASE_URL",
                "postgres://postgres:secret@127.0.0.1:1/x",
            ),
            ("NEURECTOMY_RELAY_BATCH_SIZE", "0"),
        ],
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "NEURECTOMY_RELAY_BATCH_SIZE (relay.batch_size): `0` is not valid (must be at least 1)"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("connecting"), "{stderr}");
}

#[test]
fn config_prints_the_effective_configuration_with_sources_and_no_secrets() {
    let file = TempFile::new("[api]\nmax_page = 77\n[graph]\npassword = \"graph-secret\"\n");
    let output = run(
        &["--config", file.path(), "--api-max-depth", "9", "config"],
        &[
            (
                "NEURECTOMY_REDIS_URL",
                "redis://:redis-secret@127.0.0.1:6379",
            ),
            (
                "NEURECTOMY_JWT_SECRET",
                "sEcReT-0123456789abcdefghijklmnopqrst",
            ),
        ],
    );
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{}", text(&output.stderr));
    for line in [
        "max_depth = 9  # flag --api-max-depth",
        "max_page = 77  # file",
        "max_complexity = 20000  # default",
        "url = \"redis://:<redacted>@127.0.0.1:6379\"  # env NEURECTOMY_REDIS_URL",
        "password = \"<redacted>\"  # file",
        "jwt_secret = \"<redacted>\"  # env NEURECTOMY_JWT_SECRET",
    ] {
        assert!(stdout.contains(line), "no `{line}` in\n{stdout}");
    }
    for secret in ["graph-secret", "redis-secret", "sEcReT"] {
        assert!(!stdout.contains(secret), "{secret} leaked:\n{stdout}");
    }
}

#[test]
fn the_example_file_is_valid() {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/neurectomy.example.toml"
    );
    let output = run(&["--config", example, "config", "--check"], &[]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(output.stdout.is_empty());
    let output = run(&["config", "--check"], &[("NEURECTOMY_CONFIG", example)]);
    assert!(output.status.success(), "{}", text(&output.stderr));
}
