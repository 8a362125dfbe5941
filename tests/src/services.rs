//! Private service processes for the fault tests: a `redis-server`, a
//! `nats-server -js`, an ArcadeDB server (Bolt) or a PostgreSQL server of
//! the test's own, on ports of its own, with its data in a temporary folder.
//! A test kills one with SIGKILL — the whole server, PostgreSQL's backends
//! too — and starts it again on the same ports and data, then waits until it
//! answers. Dropping the value kills whatever it started and removes its
//! folder.
//!
//! A server that cannot be started fails the test with a message naming the
//! program and how to install it, and the end of the server's own output;
//! nothing is skipped. Programs are found where Debian installs them, or
//! where these variables say:
//!
//! | server | default | variable |
//! |---|---|---|
//! | Redis | `/usr/bin/redis-server` | `NEURECTOMY_TEST_REDIS_SERVER` |
//! | NATS | `/usr/sbin/nats-server` | `NEURECTOMY_NATS_SERVER` |
//! | ArcadeDB | `.tools/arcadedb-venv/…/arcadedb_embedded` (`scripts/graph.sh install`) | `NEURECTOMY_TEST_ARCADEDB` (that folder) |
//! | PostgreSQL | the newest `/usr/lib/postgresql/<version>/bin` | `NEURECTOMY_TEST_PG_BIN` |
//!
//! Ports are picked below the kernel's ephemeral range, so that no outgoing
//! connection can hold a server's port while it is down.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use projections::graph_testkit::GraphServer;
use tokio::io::AsyncBufReadExt as _;
use uuid::Uuid;

/// Longest wait for a server to answer after it was started.
const START_WAIT: Duration = Duration::from_secs(90);

/// Longest wait for a killed server's processes to be gone.
const KILL_WAIT: Duration = Duration::from_secs(30);

/// One server process: how to start it, the running child, and the folder
/// holding its data and its output (`output.log`).
struct Daemon {
    /// The program's name, for messages.
    name: &'static str,
    program: PathBuf,
    args: Vec<OsString>,
    /// Runs as this user and group (PostgreSQL refuses to run as root).
    user: Option<(u32, u32)>,
    /// How to install the program, for messages.
    install: String,
    /// The temporary folder: data, and the output of every start.
    dir: PathBuf,
    /// How to tell it answers.
    probe: Probe,
    child: Option<Child>,
}

/// How to tell that a server answers.
enum Probe {
    /// `PING` answered.
    Redis(String),
    /// The `INFO` line, with JetStream enabled, on this port.
    Nats(u16),
    /// `/api/v1/ready` answers 204 on `http` and `bolt` accepts connections.
    Graph { http: u16, bolt: u16 },
    /// A connection to this URL.
    Postgres(String),
}

impl Probe {
    /// Whether the server answers now (each check within a second or two).
    async fn answers(&self) -> bool {
        let within = |seconds| Duration::from_secs(seconds);
        match self {
            Probe::Redis(url) => {
                let ping = async {
                    let client = redis::Client::open(url.as_str()).ok()?;
                    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                    redis::cmd("PING")
                        .query_async::<String>(&mut conn)
                        .await
                        .ok()
                };
                matches!(tokio::time::timeout(within(2), ping).await, Ok(Some(_)))
            }
            Probe::Nats(port) => {
                let info = async {
                    let stream = tokio::net::TcpStream::connect(("127.0.0.1", *port))
                        .await
                        .ok()?;
                    let mut line = String::new();
                    tokio::io::BufReader::new(stream)
                        .read_line(&mut line)
                        .await
                        .ok()?;
                    Some(line)
                };
                matches!(
                    tokio::time::timeout(within(2), info).await,
                    Ok(Some(line)) if line.starts_with("INFO") && line.contains("\"jetstream\":true")
                )
            }
            Probe::Graph { http, bolt } => {
                let ready = async {
                    let url = format!("http://127.0.0.1:{http}/api/v1/ready");
                    let status = reqwest::get(url).await.ok()?.status();
                    tokio::net::TcpStream::connect(("127.0.0.1", *bolt))
                        .await
                        .ok()?;
                    Some(status.as_u16())
                };
                matches!(tokio::time::timeout(within(2), ready).await, Ok(Some(204)))
            }
            Probe::Postgres(url) => {
                use sqlx::Connection as _;
                let connect = async {
                    let conn = sqlx::PgConnection::connect(url).await.ok()?;
                    conn.close().await.ok()
                };
                matches!(tokio::time::timeout(within(3), connect).await, Ok(Some(())))
            }
        }
    }
}

impl Daemon {
    /// A daemon whose folder is a fresh temporary one (owned by `user`);
    /// its arguments are set before it starts.
    fn new(
        name: &'static str,
        program: PathBuf,
        install: String,
        user: Option<(u32, u32)>,
        probe: Probe,
    ) -> Self {
        let dir = std::env::temp_dir().join(format!("neurectomy-{name}-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
        }
        Self {
            name,
            program,
            args: Vec::new(),
            user,
            install,
            dir,
            probe,
            child: None,
        }
    }

    fn output(&self) -> PathBuf {
        self.dir.join("output.log")
    }

    /// The last lines the server printed, for failure messages.
    fn output_tail(&self) -> String {
        let text = std::fs::read_to_string(self.output()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// A command for `program` with `args`, as the daemon's user, its output
    /// appended to `output.log`.
    fn command(&self, program: &Path, args: &[OsString]) -> Command {
        let output = File::options()
            .create(true)
            .append(true)
            .open(self.output())
            .unwrap();
        let mut command = Command::new(program);
        command
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(output.try_clone().unwrap())
            .stderr(output);
        if let Some((uid, gid)) = self.user {
            use std::os::unix::process::CommandExt as _;
            command.uid(uid).gid(gid);
        }
        command
    }

    /// Runs `program` with `args` to its end (a set-up step).
    fn run(&self, program: &Path, args: &[OsString]) {
        let status = self
            .command(program, args)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {} ({e}); {}", program.display(), self.install));
        assert!(
            status.success(),
            "{} exited with {status}; its output:\n{}",
            program.display(),
            self.output_tail()
        );
    }

    /// Starts the server and waits until it answers.
    async fn start(&mut self) {
        assert!(self.child.is_none(), "{} is running already", self.name);
        let started = Instant::now();
        let child = self
            .command(&self.program, &self.args)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}); {}",
                    self.program.display(),
                    self.install
                )
            });
        self.child = Some(child);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "{} exited with {status} while starting; its output:\n{}",
                    self.name,
                    self.output_tail()
                );
            }
            if self.probe.answers().await {
                return;
            }
            assert!(
                started.elapsed() < START_WAIT,
                "{} did not answer within {START_WAIT:?} of its start; its output:\n{}",
                self.name,
                self.output_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the server with SIGKILL — its process and every process it
    /// started (PostgreSQL's backends) — and waits until they are gone.
    fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let root = child.id();
        // Stopped, it starts nothing more while its processes are listed.
        signal("STOP", &[root]);
        let mut doomed = descendants(root);
        doomed.push(root);
        signal("KILL", &doomed);
        let _ = child.wait();
        let deadline = Instant::now() + KILL_WAIT;
        while doomed.iter().any(|pid| alive(*pid)) {
            assert!(
                Instant::now() < deadline,
                "processes {doomed:?} of {} outlived SIGKILL for {KILL_WAIT:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends `signal` to `pids` with kill(1).
fn signal(signal: &str, pids: &[u32]) {
    let _ = Command::new("kill")
        .arg("-s")
        .arg(signal)
        .args(pids.iter().map(u32::to_string))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The state letter and parent of every process, from `/proc`.
fn processes() -> HashMap<u32, (char, u32)> {
    let mut out = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let Some(parent) = fields.next().and_then(|s| s.parse().ok()) else {
            continue;
        };
        out.insert(pid, (state, parent));
    }
    out
}

/// Every process below `root`.
fn descendants(root: u32) -> Vec<u32> {
    let table = processes();
    let mut found = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for (pid, (_, ppid)) in &table {
            if *ppid == parent && !found.contains(pid) {
                found.push(*pid);
                frontier.push(*pid);
            }
        }
    }
    found
}

/// Whether `pid` runs (a zombie no longer holds anything).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, rest) = stat.rsplit_once(')')?;
            rest.split_whitespace().next().map(|s| s != "Z" && s != "X")
        })
        .unwrap_or(false)
}

/// A port nothing listens on, below the ephemeral range.
fn free_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let span = low.saturating_sub(10_000).max(1);
    for _ in 0..200 {
        let port = 10_000 + (Uuid::new_v4().as_u128() % u128::from(span)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port found between 10000 and {low}");
}

/// `variable`, or `default`.
fn program(variable: &str, default: &str) -> PathBuf {
    std::env::var_os(variable).map_or_else(|| PathBuf::from(default), PathBuf::from)
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// A private `redis-server` keeping nothing on disk (`--save ""
/// --appendonly no`), so that it comes back empty after a kill, as Redis
/// configured as a cache does.
pub struct PrivateRedis {
    daemon: Daemon,
    port: u16,
}

impl PrivateRedis {
    /// Starts one on a free port and waits until it answers.
    pub async fn start() -> Self {
        let port = free_port();
        let mut daemon = redis_daemon(port, &[]);
        daemon.start().await;
        Self { daemon, port }
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL; returns once the process is gone.
    pub fn kill(&mut self) {
        self.daemon.kill();
    }

    /// Starts it again on the same port (empty) and waits until it answers.
    pub async fn restart(&mut self) {
        self.daemon.start().await;
    }
}

/// A `redis-server` on 127.0.0.1:`port` keeping nothing on disk, its
/// folder its working directory, with `extra` arguments (not started).
fn redis_daemon(port: u16, extra: &[&str]) -> Daemon {
    let install = "install it with: apt-get install redis-server redis-tools \
                   (or set NEURECTOMY_TEST_REDIS_SERVER)";
    let mut daemon = Daemon::new(
        "redis-server",
        program("NEURECTOMY_TEST_REDIS_SERVER", "/usr/bin/redis-server"),
        install.to_owned(),
        None,
        Probe::Redis(format!("redis://127.0.0.1:{port}")),
    );
    let dir = daemon.dir.clone();
    daemon.args = os(&[
        "--bind",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
    ]);
    daemon.args.extend(os(extra));
    daemon.args.extend([OsString::from("--dir"), dir.into()]);
    daemon
}

/// A private Redis Cluster on loopback: `primaries` primaries with
/// `replicas` replicas each (`redis-server --cluster-enabled yes`, keeping
/// nothing on disk but the cluster's own `nodes.conf`), formed by
/// `redis-cli --cluster create`. A node lost for more than the node timeout
/// (1 s) is failed over: one of its replicas is promoted; a killed node
/// started again rejoins (as a replica of whoever took its slots).
pub struct RedisCluster {
    nodes: Vec<Daemon>,
    ports: Vec<u16>,
}

/// The cluster's node timeout, milliseconds: how long a primary may be
/// unreachable before its replicas fail it over.
pub const REDIS_NODE_TIMEOUT_MS: u64 = 1_000;

impl RedisCluster {
    /// Starts the nodes, forms the cluster and waits until every node
    /// reports `cluster_state:ok`.
    pub async fn start(primaries: usize, replicas: usize) -> Self {
        let count = primaries * (1 + replicas);
        let ports: Vec<u16> = (0..count).map(|_| free_port()).collect();
        let timeout = REDIS_NODE_TIMEOUT_MS.to_string();
        // The bus port is chosen like the client port: Redis's default
        // (port + 10000) can land in the ephemeral range or on a port
        // another test already holds.
        let mut nodes: Vec<Daemon> = ports
            .iter()
            .map(|port| {
                let bus = free_port().to_string();
                redis_daemon(
                    *port,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        &timeout,
                        "--cluster-port",
                        &bus,
                    ],
                )
            })
            .collect();
        for node in &mut nodes {
            node.start().await;
        }
        let mut create = vec!["--cluster".to_owned(), "create".to_owned()];
        create.extend(ports.iter().map(|p| format!("127.0.0.1:{p}")));
        create.extend([
            "--cluster-replicas".to_owned(),
            replicas.to_string(),
            "--cluster-yes".to_owned(),
        ]);
        let create: Vec<OsString> = create.into_iter().map(OsString::from).collect();
        nodes[0].run(
            &program("NEURECTOMY_TEST_REDIS_CLI", "/usr/bin/redis-cli"),
            &create,
        );
        let cluster = Self { nodes, ports };
        cluster.wait_ok().await;
        cluster.wait_replicated(replicas).await;
        cluster
    }

    /// Waits until every slot range lists `replicas` replicas with its
    /// primary, each replicating (a replica attaches a few seconds after
    /// the cluster is formed; until then a killed primary has nothing to
    /// fail over to).
    async fn wait_replicated(&self, replicas: usize) {
        let started = Instant::now();
        loop {
            let slots = self.ask(0, &["CLUSTER", "SLOTS"]).await;
            let ranges: Vec<Vec<redis::Value>> = slots
                .and_then(|v| redis::from_redis_value(&v).ok())
                .unwrap_or_default();
            let listed = !ranges.is_empty() && ranges.iter().all(|r| r.len() > 2 + replicas);
            let mut linked = listed;
            if listed {
                for i in 0..self.nodes.len() {
                    let info = self.ask(i, &["INFO", "replication"]).await;
                    let text = info
                        .and_then(|v| redis::from_redis_value::<String>(&v).ok())
                        .unwrap_or_default();
                    if text.contains("role:slave") {
                        linked &= text.contains("master_link_status:up");
                    }
                }
            }
            if linked {
                return;
            }
            assert!(
                started.elapsed() < START_WAIT,
                "the Redis Cluster's replicas did not attach within {START_WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `redis://127.0.0.1:<port>` of every node (seeds for a cluster
    /// client).
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// Node `i`'s URL.
    pub fn url(&self, i: usize) -> String {
        format!("redis://127.0.0.1:{}", self.ports[i])
    }

    /// What node `i` answers to `CLUSTER <what>` (e.g. `INFO`), if it
    /// answers within 2 s.
    async fn ask(&self, i: usize, command: &[&str]) -> Option<redis::Value> {
        let ask = async {
            let client = redis::Client::open(self.url(i)).ok()?;
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            redis::cmd(command[0])
                .arg(&command[1..])
                .query_async::<redis::Value>(&mut conn)
                .await
                .ok()
        };
        tokio::time::timeout(Duration::from_secs(2), ask)
            .await
            .ok()
            .flatten()
    }

    /// Waits until every running node reports `cluster_state:ok` and agrees
    /// on who serves every slot.
    pub async fn wait_ok(&self) {
        let started = Instant::now();
        loop {
            let mut ok = true;
            for i in 0..self.nodes.len() {
                if self.nodes[i].child.is_none() {
                    continue;
                }
                let info = self.ask(i, &["CLUSTER", "INFO"]).await;
                let text = match info {
                    Some(value) => redis::from_redis_value::<String>(&value).unwrap_or_default(),
                    None => String::new(),
                };
                ok &= text.contains("cluster_state:ok");
            }
            if ok {
                return;
            }
            assert!(
                started.elapsed() < START_WAIT,
                "the Redis Cluster did not reach cluster_state:ok within {START_WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The index of the node serving `key`'s slot as primary, as a running
    /// node sees it (`CLUSTER KEYSLOT`, `CLUSTER SHARDS`-free: `CLUSTER SLOTS`).
    pub async fn primary_of(&self, key: &str) -> Option<usize> {
        let asker = (0..self.nodes.len()).find(|i| self.nodes[*i].child.is_some())?;
        let slot: i64 =
            redis::from_redis_value(&self.ask(asker, &["CLUSTER", "KEYSLOT", key]).await?).ok()?;
        let slots: Vec<redis::Value> =
            redis::from_redis_value(&self.ask(asker, &["CLUSTER", "SLOTS"]).await?).ok()?;
        for range in slots {
            let range: Vec<redis::Value> = redis::from_redis_value(&range).ok()?;
            let (Some(from), Some(to), Some(primary)) = (range.first(), range.get(1), range.get(2))
            else {
                continue;
            };
            let (from, to): (i64, i64) = (
                redis::from_redis_value(from).ok()?,
                redis::from_redis_value(to).ok()?,
            );
            if (from..=to).contains(&slot) {
                let primary: Vec<redis::Value> = redis::from_redis_value(primary).ok()?;
                let port: i64 = redis::from_redis_value(primary.get(1)?).ok()?;
                return self.ports.iter().position(|p| i64::from(*p) == port);
            }
        }
        None
    }

    /// SIGKILL of node `i`; returns once its process is gone.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again on its port (empty, with its `nodes.conf`) and
    /// waits until it answers; it rejoins the cluster by itself.
    pub async fn restart(&mut self, i: usize) {
        self.nodes[i].start().await;
    }
}

/// A private `nats-server -js` with its store in its folder (kept across
/// restarts, as a server's disk is).
pub struct PrivateNats {
    daemon: Daemon,
    port: u16,
}

impl PrivateNats {
    /// Starts one on a free port and waits until it answers with JetStream.
    pub async fn start() -> Self {
        let install =
            "install it with: apt-get install nats-server (or set NEURECTOMY_NATS_SERVER)";
        let port = free_port();
        let mut daemon = Daemon::new(
            "nats-server",
            program("NEURECTOMY_NATS_SERVER", "/usr/sbin/nats-server"),
            install.to_owned(),
            None,
            Probe::Nats(port),
        );
        let store = daemon.dir.join("jetstream");
        daemon.args = os(&["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"]);
        daemon.args.push(store.into());
        daemon.start().await;
        Self { daemon, port }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGKILL; returns once the process is gone.
    pub fn kill(&mut self) {
        self.daemon.kill();
    }

    /// Starts it again on the same port and store and waits until it
    /// answers.
    pub async fn restart(&mut self) {
        self.daemon.start().await;
    }
}

/// A private JetStream cluster of `nats-server -js` nodes on loopback
/// (one route port each, every node routed to every other), each with its
/// store in its own folder, kept across restarts. Node `i` is named
/// `n<i>` (the names JetStream reports as stream leader and replicas).
pub struct NatsCluster {
    nodes: Vec<Daemon>,
    ports: Vec<u16>,
}

impl NatsCluster {
    /// Starts `size` nodes and waits until each answers with JetStream (the
    /// cluster then elects its meta leader within a few seconds: the first
    /// JetStream calls may have to be retried).
    pub async fn start(size: usize) -> Self {
        let install =
            "install it with: apt-get install nats-server (or set NEURECTOMY_NATS_SERVER)";
        let ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let routes: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let all_routes = routes
            .iter()
            .map(|port| format!("nats://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = Vec::new();
        for (i, (port, route)) in ports.iter().zip(&routes).enumerate() {
            let mut daemon = Daemon::new(
                "nats-server",
                program("NEURECTOMY_NATS_SERVER", "/usr/sbin/nats-server"),
                install.to_owned(),
                None,
                Probe::Nats(*port),
            );
            let store = daemon.dir.join("jetstream");
            let name = Self::name(i);
            let cluster = format!("nats://127.0.0.1:{route}");
            daemon.args = os(&[
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-n",
                &name,
                "--cluster_name",
                "neurectomy-test",
                "--cluster",
                &cluster,
                "--routes",
                &all_routes,
                "-sd",
            ]);
            daemon.args.push(store.into());
            nodes.push(daemon);
        }
        for node in &mut nodes {
            node.start().await;
        }
        Self { nodes, ports }
    }

    /// The name of node `i` in the cluster (`n<i>`).
    pub fn name(i: usize) -> String {
        format!("n{i}")
    }

    /// The index of the node named `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        (0..self.nodes.len()).find(|i| Self::name(*i) == name)
    }

    /// `nats://127.0.0.1:<port>` of node `i` (clients learn the others
    /// from it).
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.ports[i])
    }

    /// SIGKILL of node `i`; returns once its process is gone.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again on its ports and store and waits until it
    /// answers.
    pub async fn restart(&mut self, i: usize) {
        self.nodes[i].start().await;
    }
}

/// The `arcadedb_embedded` folder (jars and a Java runtime) that
/// `scripts/graph.sh install` puts under `.tools/`, or
/// `NEURECTOMY_TEST_ARCADEDB`.
fn arcadedb_home() -> PathBuf {
    if let Some(home) = std::env::var_os("NEURECTOMY_TEST_ARCADEDB") {
        return PathBuf::from(home);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/arcadedb-venv/lib");
    std::fs::read_dir(&venv)
        .into_iter()
        .flatten()
        .flatten()
        .map(|python| python.path().join("site-packages/arcadedb_embedded"))
        .find(|home| home.join("jre/bin/java").is_file())
        .unwrap_or_else(|| {
            panic!(
                "ArcadeDB is not installed under {}: run scripts/graph.sh install \
                 (scripts/test.sh does), or set NEURECTOMY_TEST_ARCADEDB to an \
                 arcadedb_embedded folder (with jars/ and jre/)",
                venv.display()
            )
        })
}

/// A private ArcadeDB server with its Bolt plugin (the graph server of
/// development and CI), its databases in its folder (kept across
/// restarts). It takes a few seconds to start.
pub struct PrivateGraph {
    daemon: Daemon,
    bolt: u16,
    http: u16,
}

/// The `root` password of private graph servers.
const GRAPH_PASSWORD: &str = "private-graph-password";

impl PrivateGraph {
    /// Starts one on free ports and waits until it is ready.
    pub async fn start() -> Self {
        let home = arcadedb_home();
        let (bolt, http) = (free_port(), free_port());
        let mut daemon = Daemon::new(
            "arcadedb",
            home.join("jre/bin/java"),
            "install it with: scripts/graph.sh install".to_owned(),
            None,
            Probe::Graph { http, bolt },
        );
        let dir = daemon.dir.display().to_string();
        let jars = home.join("jars/*").display().to_string();
        daemon.args = os(&[
            "-Xms64m",
            "-Xmx512m",
            "-cp",
            &jars,
            &format!("-Darcadedb.server.rootPath={dir}"),
            &format!("-Darcadedb.server.rootPassword={GRAPH_PASSWORD}"),
            "-Darcadedb.server.plugins=Bolt:com.arcadedb.bolt.BoltProtocolPlugin",
            "-Darcadedb.bolt.host=127.0.0.1",
            &format!("-Darcadedb.bolt.port={bolt}"),
            "-Darcadedb.server.httpIncomingHost=127.0.0.1",
            &format!("-Darcadedb.server.httpIncomingPort={http}"),
            "com.arcadedb.server.ArcadeDBServer",
        ]);
        daemon.start().await;
        Self { daemon, bolt, http }
    }

    /// Where it is, for the graph test kit and the process's settings.
    pub fn server(&self) -> GraphServer {
        GraphServer {
            uri: format!("bolt://127.0.0.1:{}", self.bolt),
            http: format!("127.0.0.1:{}", self.http),
            password: GRAPH_PASSWORD.to_owned(),
        }
    }

    /// SIGKILL; returns once the process is gone.
    pub fn kill(&mut self) {
        self.daemon.kill();
    }

    /// Starts it again on the same ports and data and waits until it is
    /// ready.
    pub async fn restart(&mut self) {
        self.daemon.start().await;
    }
}

/// The folder of PostgreSQL's server programs.
fn postgres_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("NEURECTOMY_TEST_PG_BIN") {
        return PathBuf::from(bin);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("postgres").is_file())
                .then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!(
            "PostgreSQL's server programs (initdb, postgres) are not in /usr/lib/postgresql/<version>/bin: \
             install them with: apt-get install postgresql (or set NEURECTOMY_TEST_PG_BIN)"
        )
    })
}

/// The user PostgreSQL runs as: the `postgres` user when the tests run as
/// root (initdb and the server refuse root), else the tests' own user.
fn postgres_user() -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt as _;
    let me = std::fs::metadata("/proc/self").map_or(0, |m| m.uid());
    if me != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let found = passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&"postgres") && fields.len() > 3)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))?
    });
    Some(found.unwrap_or_else(|| {
        panic!(
            "the tests run as root, and PostgreSQL refuses to: there is no `postgres` user to run it as \
             (apt-get install postgresql creates one)"
        )
    }))
}

/// A private PostgreSQL server: a cluster made by `initdb` in its folder
/// (kept across restarts), trusting local connections, as the `postgres`
/// user when the tests run as root.
pub struct PrivatePostgres {
    daemon: Daemon,
    port: u16,
}

impl PrivatePostgres {
    /// Creates the cluster, starts the server on a free port and waits
    /// until it accepts connections.
    pub async fn start() -> Self {
        let bin = postgres_bin();
        let install = format!(
            "{} is PostgreSQL's server; install it with: apt-get install postgresql (or set NEURECTOMY_TEST_PG_BIN)",
            bin.join("postgres").display()
        );
        let port = free_port();
        let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        let mut daemon = Daemon::new(
            "postgres",
            bin.join("postgres"),
            install,
            postgres_user(),
            Probe::Postgres(url),
        );
        let data = daemon.dir.join("data");
        let mut initdb = os(&[
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
            "-D",
        ]);
        initdb.push(data.clone().into());
        daemon.run(&bin.join("initdb"), &initdb);
        let dir = daemon.dir.display().to_string();
        daemon.args = os(&[
            "-p",
            &port.to_string(),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            &format!("unix_socket_directories={dir}"),
            // A SIGKILL of the server loses nothing the kernel holds;
            // fsync only matters when the machine itself fails.
            "-c",
            "fsync=off",
            "-D",
        ]);
        daemon.args.push(data.into());
        daemon.start().await;
        Self { daemon, port }
    }

    /// The admin URL (`postgres` database).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// SIGKILL to the server and every backend; returns once they are gone.
    pub fn kill(&mut self) {
        self.daemon.kill();
    }

    /// Starts it again on the same port and data (it recovers from its
    /// WAL) and waits until it accepts connections.
    pub async fn restart(&mut self) {
        self.daemon.start().await;
    }
}
