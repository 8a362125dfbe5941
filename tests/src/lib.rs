//! # End-to-end tests
//!
//! Tests in `tests/` start the real `neurectomy` binary (built in this
//! package as `neurectomy-e2e`) as child processes against the real
//! PostgreSQL and NATS JetStream, kill them, restart them, and check what
//! landed in the event store and on JetStream.
//!
//! This library holds the process helpers those tests share.

use std::process::Stdio;

use tokio::process::{Child, Command};

/// A child `neurectomy` process, killed when dropped.
#[derive(Debug)]
pub struct Process {
    /// The child.
    pub child: Child,
    /// Its role, for messages.
    pub role: String,
}

/// Environment pointing a process at a test's database and JetStream names.
#[derive(Debug, Clone)]
pub struct Target {
    /// Path of the binary.
    pub binary: String,
    /// `NEURECTOMY_DATABASE_URL`.
    pub database_url: String,
    /// `NEURECTOMY_NATS_URL`.
    pub nats_url: String,
    /// `NEURECTOMY_JETSTREAM_STREAM`.
    pub stream: String,
    /// `NEURECTOMY_SUBJECT_PREFIX`.
    pub subject_prefix: String,
}

impl Target {
    /// A command for `args` with the target's environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .args(args)
            .env("NEURECTOMY_DATABASE_URL", &self.database_url)
            .env("NEURECTOMY_NATS_URL", &self.nats_url)
            .env("NEURECTOMY_JETSTREAM_STREAM", &self.stream)
            .env("NEURECTOMY_SUBJECT_PREFIX", &self.subject_prefix)
            .env("NEURECTOMY_RELAY_IDLE_POLL_MS", "100")
            .env("NEURECTOMY_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// Spawns `args` in the background (output discarded).
    pub fn spawn(&self, role: &str, args: &[&str]) -> std::io::Result<Process> {
        let child = self
            .command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Process {
            child,
            role: role.to_owned(),
        })
    }
}

impl Process {
    /// Kills the process with SIGKILL (no chance to clean up) and reaps it.
    pub async fn kill(&mut self) -> std::io::Result<()> {
        self.child.kill().await
    }
}
