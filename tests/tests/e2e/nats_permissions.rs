//! `deploy/nats.conf` on a real `nats-server` (a private one per test, on
//! its own port and store directory): the relay publishes with the `relay`
//! user and a projector consumes with the `projector` user (so their
//! permission sets are enough), while publishes on the event subjects by
//! every other user are refused by the server and never reach the stream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use commands::testkit::{eventually, TestDatabase};
use commands::{CommandHandler, EventStore, HandlerConfig, Relay, RelayConfig};
use neurectomy_e2e::pipeline::Pipeline;
use projections::testkit::TestRedis;
use projections::verify::{verify_redis_at, Compared};
use projections::{Projector, ProjectorConfig, ProjectorState, ReadModel};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);
/// The users of `deploy/nats.conf`, with the variables holding their passwords.
const USERS: [(&str, &str); 4] = [
    ("relay", "NEURECTOMY_NATS_RELAY_PASSWORD"),
    ("projector", "NEURECTOMY_NATS_PROJECTOR_PASSWORD"),
    ("api", "NEURECTOMY_NATS_API_PASSWORD"),
    ("admin", "NEURECTOMY_NATS_ADMIN_PASSWORD"),
];

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `nats-server -c deploy/nats.conf` on free ports and a store directory of
/// its own, with a random password per user; killed (and its directory
/// removed) on drop.
struct Server {
    child: Child,
    port: u16,
    dir: PathBuf,
    passwords: Vec<(String, String)>,
}

impl Server {
    async fn start() -> Self {
        let binary = std::env::var_os("NEURECTOMY_NATS_SERVER")
            .map_or_else(|| PathBuf::from("/usr/sbin/nats-server"), PathBuf::from);
        let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/nats.conf");
        let (port, http) = (free_port(), free_port());
        let dir = std::env::temp_dir().join(format!("neurectomy-nats-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let passwords: Vec<(String, String)> = USERS
            .iter()
            .map(|(user, _)| {
                (
                    (*user).to_owned(),
                    // nats-server reads a variable's value as a config
                    // value: one starting with a digit is taken for a
                    // number (and refused). deploy/nats.conf says so.
                    format!("p{}", uuid::Uuid::new_v4().simple()),
                )
            })
            .collect();
        let mut command = Command::new(&binary);
        command
            .args(["-c", config, "-a", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .arg("-m")
            .arg(http.to_string())
            .arg("-sd")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr")).unwrap());
        for ((_, variable), (_, password)) in USERS.iter().zip(&passwords) {
            command.env(variable, password);
        }
        let mut child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {} ({e}); install it with: apt-get install nats-server",
                binary.display()
            )
        });
        let exited = &mut child;
        let stderr = dir.join("stderr");
        let stderr = &stderr;
        eventually("the private nats-server to listen", WAIT, || {
            if let Ok(Some(status)) = exited.try_wait() {
                panic!(
                    "nats-server -c deploy/nats.conf exited ({status}): {}",
                    std::fs::read_to_string(stderr).unwrap_or_default()
                );
            }
            async move {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(|_| ())
            }
        })
        .await;
        Self {
            child,
            port,
            dir,
            passwords,
        }
    }

    /// A client connected as `user`, and every error the server sent it.
    async fn connect(&self, user: &str) -> (async_nats::Client, Arc<Mutex<Vec<String>>>) {
        let password = &self.passwords.iter().find(|(u, _)| u == user).unwrap().1;
        let errors = Arc::new(Mutex::new(Vec::new()));
        let client = async_nats::ConnectOptions::with_user_and_password(
            user.to_owned(),
            password.to_owned(),
        )
        .event_callback({
            let errors = errors.clone();
            move |event| {
                let errors = errors.clone();
                async move {
                    if let async_nats::Event::ServerError(error) = event {
                        errors.lock().unwrap().push(error.to_string());
                    }
                }
            }
        })
        .connect(format!("nats://127.0.0.1:{}", self.port))
        .await
        .unwrap_or_else(|e| panic!("connecting as {user}: {e}"));
        (client, errors)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_relays_user_may_publish_on_the_event_subjects() {
    relay_and_projectors_through_the_deployed_permissions(1).await;
}

/// The same on a stream of four partitions: the projector user creates,
/// reads and acknowledges a filtered consumer per partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_projectors_consume_under_the_projectors_permissions() {
    relay_and_projectors_through_the_deployed_permissions(4).await;
}

/// The relay (user `relay`) and the Redis projection in `partitions`
/// partitions (user `projector`) through a server running
/// `deploy/nats.conf`, while the other users' publishes are refused.
async fn relay_and_projectors_through_the_deployed_permissions(partitions: u32) {
    // Declared first: dropped last.
    let server = Server::start().await;
    let db = TestDatabase::create(8)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let redis = TestRedis::create().await.unwrap_or_else(|e| panic!("{e}"));
    let store = EventStore::new(db.pool.clone());
    let stop = CancellationToken::new();

    // No credentials, no connection.
    assert!(
        async_nats::connect(format!("nats://127.0.0.1:{}", server.port))
            .await
            .is_err(),
        "an anonymous client was let in"
    );

    // The defaults the file names: the stream and prefix of production.
    let relay_config = RelayConfig {
        idle_poll: Duration::from_millis(50),
        partitions,
        ..RelayConfig::default()
    };
    let (relay_client, relay_errors) = server.connect("relay").await;
    // It seals the log too, copying the seals to their own stream.
    let key = commands::seal::key::SealKey::generate();
    let sealing = commands::seal::sealer::SealerConfig {
        block_time: Duration::from_millis(100),
        ..commands::seal::sealer::SealerConfig::for_relay(&relay_config)
    };
    let relay = Relay::new(store.clone(), relay_client.clone(), relay_config.clone()).with_sealer(
        commands::seal::sealer::Sealer::new(
            store.clone(),
            relay_client,
            key.clone(),
            sealing.clone(),
        ),
    );
    relay.ensure_stream().await.unwrap();
    let progress = relay.progress();
    let relay = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    let (projector_client, projector_errors) = server.connect("projector").await;
    let projectors: Vec<_> = (0..partitions)
        .map(|partition| {
            let model = if partitions > 1 {
                redis.model.for_partition(partition)
            } else {
                redis.model.clone()
            };
            Arc::new(Projector::new(
                model,
                store.clone(),
                projector_client.clone(),
                ProjectorConfig {
                    stream_name: relay_config.stream_name.clone(),
                    batch_size: 200,
                    partitions,
                    partition,
                    ..ProjectorConfig::default()
                },
            ))
        })
        .collect();
    let projections: Vec<_> = projectors
        .iter()
        .map(|projector| {
            let (projector, stop) = (projector.clone(), stop.clone());
            tokio::spawn(async move { projector.run(stop).await })
        })
        .collect();

    // A workload, while every other user tries to publish on the event
    // subjects (as the projector, the API and an operator might by mistake).
    let handler = CommandHandler::new(store.clone(), HandlerConfig::default());
    let workload = tokio::spawn(api::simulate::drive(
        handler,
        Pipeline::workload(2, 200, 7),
        stop.child_token(),
    ));
    let (api_client, api_errors) = server.connect("api").await;
    let (admin_client, admin_errors) = server.connect("admin").await;
    for (user, client, errors) in [
        ("projector", &projector_client, &projector_errors),
        ("api", &api_client, &api_errors),
        ("admin", &admin_client, &admin_errors),
    ] {
        client
            .publish(
                format!("{}.task.TaskCreated", relay_config.subject_prefix),
                "not from the relay".into(),
            )
            .await
            .unwrap();
        client.flush().await.unwrap();
        eventually(
            &format!("the server to refuse {user}'s publish"),
            WAIT,
            || async move {
                errors
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|e| e.contains("Permissions Violation for Publish"))
                    .then_some(())
            },
        )
        .await;
    }
    // The API may not even read the stream.
    let api_js = async_nats::jetstream::new(api_client);
    assert!(
        api_js.get_stream(&relay_config.stream_name).await.is_err(),
        "the api user read the stream"
    );
    workload.await.unwrap().unwrap();

    // The projector caught up through JetStream and holds what the events
    // say; the stream holds the relay's messages only, one per event.
    let head = neurectomy_e2e::readable_head(&store).await;
    eventually("the relay to publish every event", WAIT, || {
        let position = progress.borrow().position;
        async move { (position >= head).then_some(()) }
    })
    .await;
    for (partition, projector) in (0..partitions).zip(&projectors) {
        let last = if partitions > 1 {
            store
                .last_in_partition(head, partitions, partition)
                .await
                .unwrap()
        } else {
            head
        };
        eventually("the projection to catch up", WAIT, || {
            let model = projector.model().clone();
            async move { (model.checkpoint().await.ok()? >= last).then_some(()) }
        })
        .await;
    }
    let compared = if partitions > 1 {
        let each = (0..partitions).map(|k| store.last_in_partition(head, partitions, k));
        Compared::partitions(futures::future::try_join_all(each).await.unwrap())
    } else {
        Compared::whole(head)
    };
    let differences = verify_redis_at(&store, &redis.model, &compared)
        .await
        .unwrap();
    assert!(differences.differences.is_empty(), "{differences:?}");
    let events = store.count_after(0, i64::MAX).await.unwrap() as u64;
    let (admin_client, _) = server.connect("admin").await;
    let js = async_nats::jetstream::new(admin_client);
    let stream = js.get_stream(&relay_config.stream_name).await.unwrap();
    let state = stream.get_info().await.unwrap().state;
    assert_eq!(
        (state.messages, state.last_sequence),
        (events, events),
        "the stream must hold exactly one message per event"
    );
    for sequence in 1..=state.last_sequence {
        let message = stream.get_raw_message(sequence).await.unwrap();
        assert!(
            commands::relay::stamp(&message.headers).is_some(),
            "message {sequence} is not the relay's"
        );
    }
    // The log is sealed and its seals copied; an operator with the
    // projector's rights verifies it against the copies.
    let projector_js = async_nats::jetstream::new(projector_client.clone());
    let options = commands::seal::verify::VerifyOptions {
        log: sealing.log.clone(),
        trusted: vec![key.public().clone()],
        copies: Some(sealing.stream.clone()),
        ..Default::default()
    };
    eventually("every event sealed and every seal copied", WAIT, || {
        let (pool, js, options) = (&db.pool, &projector_js, &options);
        async move {
            let report = commands::seal::verify::verify(pool, Some(js), options, |_| {})
                .await
                .unwrap();
            assert_eq!(report.problem, None, "{report:?}");
            (report.sealed_to >= head && report.copies_missing == 0).then_some(())
        }
    })
    .await;
    for projector in &projectors {
        let status = projector.status().borrow().clone();
        assert_eq!((status.foreign, status.gaps), (0, 0), "{status:?}");
        // Live: what it applied came through its consumer.
        assert_eq!(status.state, ProjectorState::Live, "{status:?}");
    }
    for (user, errors) in [("relay", &relay_errors), ("projector", &projector_errors)] {
        let errors = errors.lock().unwrap();
        assert!(
            errors
                .iter()
                .all(|e| e.contains("neurectomy.events.task.TaskCreated")),
            "{user} was refused something it needs: {errors:?}"
        );
    }

    stop.cancel();
    relay.await.unwrap();
    for projection in projections {
        projection.await.unwrap().unwrap();
    }
}
