#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::time::Duration;

use domain::{AgentCommand, AgentId, AgentKind, Command};
use neurectomy_commands::testkit::{eventually, TestDatabase, TestNats};
use neurectomy_commands::{CommandContext, CommandHandler, EventStore, HandlerConfig, Relay};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[tokio::test]
async fn smoke() {
    let db = TestDatabase::create(5).await.unwrap();
    let nats = TestNats::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let handler = CommandHandler::new(store.clone(), HandlerConfig::default());
    let id = AgentId::from_uuid(Uuid::new_v4());
    let ctx = CommandContext::new(Uuid::new_v4(), "me", "t1");
    let out = handler
        .execute(
            Command::Agent(AgentCommand::RegisterAgent {
                agent_id: id,
                name: "a".into(),
                kind: AgentKind::Llm,
                model: None,
                capabilities: vec!["x".into()],
                parent_agent_id: None,
            }),
            &ctx,
        )
        .await
        .unwrap();
    println!("{out:?}");
    let again = handler
        .execute(
            Command::Agent(AgentCommand::PauseAgent {
                agent_id: id,
                reason: None,
            }),
            &CommandContext::new(Uuid::new_v4(), "me", "t1"),
        )
        .await
        .unwrap();
    assert_eq!(again.version, 2);
    let all = store.read_all(0, 10).await.unwrap();
    assert_eq!(all.len(), 2);
    let relay = Relay::new(store.clone(), nats.client.clone(), nats.relay.clone());
    let mut progress = relay.progress();
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    eventually("relay publishes", Duration::from_secs(10), || {
        let p = *progress.borrow_and_update();
        async move { (p.published == 2).then_some(()) }
    })
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
}
