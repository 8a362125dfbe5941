//! The graph read model against a real graph server (ArcadeDB's Bolt server
//! in development and CI: `scripts/graph.sh up`), one database per test.

// Helpers outside #[test] functions unwrap too: a failure is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use commands::{EventMetadata, RecordedEvent};
use domain::{
    AgentEvent, AgentId, AgentKind, DomainEvent, TaskEvent, TaskId, WorkflowEvent, WorkflowId,
};
use neo4rs::query;
use neurectomy_projections::graph::{
    AgentTask, BlockedTask, DagEdge, DagTask, Delegation, LineageTask,
};
use neurectomy_projections::graph_testkit::TestGraph;
use neurectomy_projections::{ApplyError, Projected, ReadModel};
use serde_json::json;
use time::OffsetDateTime;
use uuid::Uuid;

const TENANT: &str = "acme";

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

// Fixed ids, so that orderings by id are known.
const W: u128 = 0x100;
const W2: u128 = 0x200;
const P: u128 = 0x01;
const X: u128 = 0x02;
const Y: u128 = 0x03;
const Z: u128 = 0x04;
const A: u128 = 0x0a;
const B: u128 = 0x0b;
const C: u128 = 0x0c;
const D: u128 = 0x0d;
const E: u128 = 0x0e;

fn s(n: u128) -> String {
    id(n).to_string()
}

fn wf(n: u128) -> WorkflowId {
    WorkflowId::from_uuid(id(n))
}

fn ag(n: u128) -> AgentId {
    AgentId::from_uuid(id(n))
}

fn tk(n: u128) -> TaskId {
    TaskId::from_uuid(id(n))
}

/// The event at `position`, as the projector hands it over.
fn at(position: i64, event: DomainEvent) -> Projected {
    let occurred_at = OffsetDateTime::from_unix_timestamp(1_700_000_000 + position).unwrap();
    let recorded = RecordedEvent {
        position,
        stream_id: format!("{}-{position}", event.kind()),
        stream_version: 1,
        event_id: Uuid::new_v4(),
        event_type: event.event_type().to_owned(),
        schema_version: event.schema_version(),
        data: event.to_data(),
        metadata: EventMetadata {
            event_id: Uuid::new_v4(),
            command_id: Uuid::new_v4(),
            command_type: "Test".to_owned(),
            command_hash: String::new(),
            correlation_id: Uuid::new_v4(),
            causation_id: Uuid::new_v4(),
            actor: "test".to_owned(),
            tenant: TENANT.to_owned(),
            occurred_at,
            traceparent: None,
        },
        recorded_at: occurred_at,
    };
    Projected::new(recorded, event)
}

fn workflow(n: u128, name: &str) -> DomainEvent {
    DomainEvent::Workflow(WorkflowEvent::WorkflowStarted {
        workflow_id: wf(n),
        name: name.to_owned(),
        metadata: json!({}),
    })
}

fn agent(n: u128, name: &str, parent: Option<u128>) -> DomainEvent {
    DomainEvent::Agent(AgentEvent::AgentRegistered {
        agent_id: ag(n),
        name: name.to_owned(),
        kind: AgentKind::Llm,
        model: Some("gpt-4o".to_owned()),
        capabilities: vec!["code".to_owned(), "review".to_owned()],
        parent_agent_id: parent.map(ag),
    })
}

fn task(n: u128, workflow: u128, title: &str, deps: &[u128]) -> DomainEvent {
    DomainEvent::Task(TaskEvent::TaskCreated {
        task_id: tk(n),
        workflow_id: wf(workflow),
        title: title.to_owned(),
        input: json!({}),
        required_capabilities: vec!["code".to_owned()],
        depends_on: deps.iter().copied().map(tk).collect(),
        priority: 50,
        max_attempts: 3,
    })
}

fn t(e: TaskEvent) -> DomainEvent {
    DomainEvent::Task(e)
}

fn assigned(n: u128, a: u128) -> DomainEvent {
    t(TaskEvent::TaskAssigned {
        task_id: tk(n),
        agent_id: ag(a),
    })
}

fn started(n: u128, a: u128) -> DomainEvent {
    t(TaskEvent::TaskStarted {
        task_id: tk(n),
        agent_id: ag(a),
    })
}

fn delegated(n: u128, from: u128, to: u128) -> DomainEvent {
    t(TaskEvent::TaskDelegated {
        task_id: tk(n),
        from_agent_id: ag(from),
        to_agent_id: ag(to),
    })
}

/// Workflow W: A ← B ← C, D depends on A and B; agents P with children X
/// and Y; workflow W2 with task E done by Z. Three batches.
fn scenario() -> Vec<Vec<Projected>> {
    let batch1 = vec![
        at(1, workflow(W, "build")),
        at(2, agent(P, "planner", None)),
        at(3, agent(X, "coder-x", Some(P))),
        at(4, agent(Y, "coder-y", Some(P))),
        at(5, task(A, W, "design", &[])),
        at(6, task(B, W, "implement", &[A])),
        at(7, task(C, W, "test", &[B])),
        at(8, task(D, W, "document", &[A, B])),
        at(9, assigned(A, X)),
        at(10, started(A, X)),
        at(11, delegated(A, X, Y)),
        at(12, assigned(B, Y)),
        at(13, workflow(W2, "other")),
        at(14, agent(Z, "loner", None)),
        at(15, task(E, W2, "elsewhere", &[])),
        at(16, assigned(E, Z)),
    ];
    let batch2 = vec![
        at(
            17,
            t(TaskEvent::TaskCompleted {
                task_id: tk(A),
                output: json!({"ok": true}),
            }),
        ),
        at(18, delegated(B, Y, X)),
        at(19, delegated(B, X, Y)),
        at(20, assigned(C, X)),
        at(21, started(C, X)),
        at(
            22,
            t(TaskEvent::TaskFailed {
                task_id: tk(C),
                error: "flaky".to_owned(),
                retryable: true,
            }),
        ),
    ];
    let batch3 = vec![
        at(
            23,
            t(TaskEvent::TaskRetried {
                task_id: tk(C),
                attempt: 2,
            }),
        ),
        at(24, assigned(C, X)),
        at(25, started(C, X)),
        at(
            26,
            t(TaskEvent::TaskProgressReported {
                task_id: tk(C),
                percent: 40,
                note: None,
            }),
        ),
    ];
    vec![batch1, batch2, batch3]
}

fn dag_task(n: u128, title: &str, state: &str, assignee: Option<u128>) -> DagTask {
    DagTask {
        id: s(n),
        title: title.to_owned(),
        state: state.to_owned(),
        assignee: assignee.map(s),
    }
}

fn blocked(n: u128, title: &str, state: &str, by: &[u128]) -> BlockedTask {
    BlockedTask {
        id: s(n),
        title: title.to_owned(),
        state: state.to_owned(),
        blocked_by: by.iter().copied().map(s).collect(),
    }
}

fn edge(from: u128, to: u128) -> DagEdge {
    DagEdge {
        from: s(from),
        to: s(to),
    }
}

fn hop(from: u128, to: u128, position: i64) -> Delegation {
    Delegation {
        from: s(from),
        to: s(to),
        position,
        at: (1_700_000_000 + position) * 1000,
    }
}

/// `(to, position)` of every `ASSIGNED_TO` edge of a task.
async fn assigned_edges(g: &TestGraph, task: u128) -> Vec<(String, i64)> {
    let mut rows = g
        .model
        .graph()
        .execute(
            query("MATCH (:Task {id: $id})-[r:ASSIGNED_TO]->(a:Agent) RETURN a.id AS agent, r.position AS position")
                .param("id", s(task)),
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Some(row) = rows.next().await.unwrap() {
        out.push((
            row.get::<String>("agent").unwrap(),
            row.get::<i64>("position").unwrap(),
        ));
    }
    out.sort();
    out
}

async fn current_task(g: &TestGraph, agent: u128) -> Option<String> {
    let mut rows = g
        .model
        .graph()
        .execute(
            query("MATCH (a:Agent {id: $id}) RETURN a.current_task AS t").param("id", s(agent)),
        )
        .await
        .unwrap();
    let row = rows.next().await.unwrap().unwrap();
    row.get::<Option<String>>("t").unwrap()
}

#[tokio::test]
async fn queries_answer_the_scenario_exactly() {
    let g = TestGraph::create().await.unwrap();
    let [batch1, batch2, batch3] = <[Vec<Projected>; 3]>::try_from(scenario()).unwrap();
    let started_at = std::time::Instant::now();
    g.model.apply(&batch1).await.unwrap();
    eprintln!(
        "batch of {} applied in {:?}",
        batch1.len(),
        started_at.elapsed()
    );

    // Before A completes: everything downstream of A is blocked.
    let dag = g.model.workflow_dag(TENANT, &s(W)).await.unwrap().unwrap();
    assert_eq!(
        (dag.name.as_str(), dag.status.as_str()),
        ("build", "running")
    );
    assert_eq!(
        dag.tasks,
        vec![
            dag_task(A, "design", "running", Some(Y)),
            dag_task(B, "implement", "assigned", Some(Y)),
            dag_task(C, "test", "pending", None),
            dag_task(D, "document", "pending", None),
        ]
    );
    assert_eq!(
        dag.edges,
        vec![edge(B, A), edge(C, B), edge(D, A), edge(D, B)]
    );
    assert_eq!(
        g.model.blocked_tasks(TENANT, &s(W)).await.unwrap().unwrap(),
        vec![
            blocked(B, "implement", "assigned", &[A]),
            blocked(C, "test", "pending", &[B]),
            blocked(D, "document", "pending", &[A, B]),
        ]
    );
    // Delegated while running: the task moved from X to Y.
    assert_eq!(current_task(&g, X).await, None);
    assert_eq!(current_task(&g, Y).await, Some(s(A)));
    assert_eq!(assigned_edges(&g, A).await, vec![(s(Y), 11)]);

    g.model.apply(&batch2).await.unwrap();
    assert_eq!(
        g.model.blocked_tasks(TENANT, &s(W)).await.unwrap().unwrap(),
        vec![
            blocked(C, "test", "failed", &[B]),
            blocked(D, "document", "pending", &[B])
        ]
    );
    // Completion and failure keep the assignee edge (history), release the agent.
    assert_eq!(assigned_edges(&g, A).await, vec![(s(Y), 11)]);
    assert_eq!(assigned_edges(&g, C).await, vec![(s(X), 20)]);
    assert_eq!(current_task(&g, Y).await, None);
    assert_eq!(current_task(&g, X).await, None);

    g.model.apply(&batch3).await.unwrap();
    // A retry removes the edge; the new assignment makes exactly one again.
    assert_eq!(assigned_edges(&g, C).await, vec![(s(X), 24)]);
    assert_eq!(current_task(&g, X).await, Some(s(C)));

    let dag = g.model.workflow_dag(TENANT, &s(W)).await.unwrap().unwrap();
    assert_eq!(
        dag.tasks,
        vec![
            dag_task(A, "design", "completed", Some(Y)),
            dag_task(B, "implement", "assigned", Some(Y)),
            dag_task(C, "test", "running", Some(X)),
            dag_task(D, "document", "pending", None),
        ]
    );

    assert_eq!(
        g.model
            .delegation_chain(TENANT, &s(A))
            .await
            .unwrap()
            .unwrap(),
        vec![hop(X, Y, 11)]
    );
    assert_eq!(
        g.model
            .delegation_chain(TENANT, &s(B))
            .await
            .unwrap()
            .unwrap(),
        vec![hop(Y, X, 18), hop(X, Y, 19)]
    );
    assert_eq!(
        g.model
            .delegation_chain(TENANT, &s(D))
            .await
            .unwrap()
            .unwrap(),
        vec![]
    );

    let x = g
        .model
        .agent_neighbourhood(TENANT, &s(X))
        .await
        .unwrap()
        .unwrap();
    let task_of = |n: u128, title: &str, state: &str, current: bool| AgentTask {
        id: s(n),
        title: title.to_owned(),
        state: state.to_owned(),
        workflow: s(W),
        current,
    };
    assert_eq!(
        x.tasks,
        vec![
            task_of(A, "design", "completed", false),
            task_of(B, "implement", "assigned", false),
            task_of(C, "test", "running", true),
        ]
    );
    assert_eq!(x.collaborators, vec![s(Y)]);
    assert_eq!(x.parent, Some(s(P)));
    assert_eq!(x.children, Vec::<String>::new());
    let y = g
        .model
        .agent_neighbourhood(TENANT, &s(Y))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        y.tasks.iter().map(|t| t.id.clone()).collect::<Vec<_>>(),
        vec![s(A), s(B)]
    );
    assert!(
        y.tasks.iter().all(|t| t.current == (t.id == s(B))),
        "{:?}",
        y.tasks
    );
    assert_eq!(y.collaborators, vec![s(X)]);
    let p = g
        .model
        .agent_neighbourhood(TENANT, &s(P))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (p.tasks.len(), p.collaborators.len(), p.parent),
        (0, 0, None)
    );
    assert_eq!(p.children, vec![s(X), s(Y)]);
    let z = g
        .model
        .agent_neighbourhood(TENANT, &s(Z))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(z.tasks.len(), 1);
    assert_eq!(z.collaborators, Vec::<String>::new());

    let lineage = |n: u128, title: &str, state: &str, depth: i64| LineageTask {
        id: s(n),
        title: title.to_owned(),
        state: state.to_owned(),
        depth,
    };
    assert_eq!(
        g.model.task_lineage(TENANT, &s(C)).await.unwrap().unwrap(),
        vec![
            lineage(B, "implement", "assigned", 1),
            lineage(A, "design", "completed", 2)
        ]
    );
    assert_eq!(
        g.model.task_lineage(TENANT, &s(D)).await.unwrap().unwrap(),
        vec![
            lineage(A, "design", "completed", 1),
            lineage(B, "implement", "assigned", 1)
        ]
    );
    assert_eq!(
        g.model.task_lineage(TENANT, &s(A)).await.unwrap().unwrap(),
        vec![]
    );

    // Everything is scoped by tenant.
    assert_eq!(g.model.workflow_dag("other", &s(W)).await.unwrap(), None);
    assert_eq!(g.model.blocked_tasks("other", &s(W)).await.unwrap(), None);
    assert_eq!(
        g.model.delegation_chain("other", &s(A)).await.unwrap(),
        None
    );
    assert_eq!(
        g.model.agent_neighbourhood("other", &s(X)).await.unwrap(),
        None
    );
    assert_eq!(g.model.task_lineage("other", &s(C)).await.unwrap(), None);
    assert_eq!(
        g.model.workflow_dag(TENANT, &s(0xdead)).await.unwrap(),
        None
    );
}

#[tokio::test]
async fn reapplying_changes_nothing_and_batch_boundaries_do_not_matter() {
    let g = TestGraph::create().await.unwrap();
    let batches = scenario();
    for batch in &batches {
        g.model.apply(batch).await.unwrap();
    }
    let before = g.dump().await.unwrap();
    assert!(before.len() > 20, "{before:#?}");
    for batch in &batches {
        g.model.apply(batch).await.unwrap();
    }
    let all: Vec<Projected> = batches.concat();
    g.model.apply(&all).await.unwrap();
    assert_eq!(g.dump().await.unwrap(), before);

    // The same events in one batch, or one event per batch, build the same graph.
    let one = TestGraph::create().await.unwrap();
    one.model.apply(&all).await.unwrap();
    assert_eq!(one.dump().await.unwrap(), before);
    let each = TestGraph::create().await.unwrap();
    for p in &all {
        each.model.apply(std::slice::from_ref(p)).await.unwrap();
    }
    assert_eq!(each.dump().await.unwrap(), before);
}

#[tokio::test]
async fn checkpoint_moves_with_the_batch_and_old_events_are_skipped() {
    let g = TestGraph::create().await.unwrap();
    assert_eq!(g.model.name(), "graph");
    assert_eq!(g.model.checkpoint().await.unwrap(), 0);
    let batches = scenario();
    g.model.apply(&batches[0]).await.unwrap();
    assert_eq!(g.model.checkpoint().await.unwrap(), 16);
    let before = g.dump().await.unwrap();

    // Entirely at or below the checkpoint: nothing happens, even for events
    // that would change the graph if they were new.
    let stale = vec![at(
        9,
        t(TaskEvent::TaskCancelled {
            task_id: tk(A),
            reason: "stale".to_owned(),
        }),
    )];
    g.model.apply(&stale).await.unwrap();
    g.model.apply(&[]).await.unwrap();
    assert_eq!(g.dump().await.unwrap(), before);
    assert_eq!(g.model.checkpoint().await.unwrap(), 16);

    // Straddling the checkpoint: only the new part is applied.
    let mut straddling = batches[0][10..].to_vec();
    straddling.push(at(
        30,
        t(TaskEvent::TaskCompleted {
            task_id: tk(A),
            output: json!({}),
        }),
    ));
    g.model.apply(&straddling).await.unwrap();
    assert_eq!(g.model.checkpoint().await.unwrap(), 30);
    let dag = g.model.workflow_dag(TENANT, &s(W)).await.unwrap().unwrap();
    assert_eq!(dag.tasks[0], dag_task(A, "design", "completed", Some(Y)));
    let after = g.dump().await.unwrap();

    // An event the model cannot apply rejects the whole batch at its
    // position; nothing of the batch is written.
    let bad = vec![
        at(
            31,
            t(TaskEvent::TaskProgressReported {
                task_id: tk(B),
                percent: 10,
                note: None,
            }),
        ),
        at(32, assigned(0xbad, X)),
    ];
    let err = g.model.apply(&bad).await.unwrap_err();
    match err {
        ApplyError::Rejected {
            position,
            event_type,
            ..
        } => assert_eq!((position, event_type.as_str()), (32, "TaskAssigned")),
        other => panic!("expected a rejection, got {other}"),
    }
    assert_eq!(g.model.checkpoint().await.unwrap(), 30);
    assert_eq!(g.dump().await.unwrap(), after);
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable_not_rejected() {
    let config = neurectomy_projections::GraphConfig {
        uri: "bolt://127.0.0.1:1".to_owned(),
        user: "root".to_owned(),
        password: "x".to_owned(),
        database: "nothing".to_owned(),
        timeout: std::time::Duration::from_secs(5),
        partitions: 1,
    };
    let err = neurectomy_projections::GraphModel::connect(config)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ApplyError::Unavailable {
                store: "the graph",
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_long_history_applies_in_batches() {
    let g = TestGraph::create().await.unwrap();
    const TASKS: u128 = 300;
    let mut events = vec![at(1, workflow(W, "long"))];
    let mut position = 1;
    let mut next = |e: DomainEvent| {
        position += 1;
        at(position, e)
    };
    for a in 0..10 {
        events.push(next(agent(0x1000 + a, "worker", None)));
    }
    for n in 0..TASKS {
        let deps: Vec<u128> = if n == 0 {
            vec![]
        } else {
            vec![0x10_000 + n - 1]
        };
        events.push(next(task(0x10_000 + n, W, "step", &deps)));
        events.push(next(assigned(0x10_000 + n, 0x1000 + n % 10)));
        events.push(next(started(0x10_000 + n, 0x1000 + n % 10)));
        if n < 100 {
            events.push(next(t(TaskEvent::TaskCompleted {
                task_id: tk(0x10_000 + n),
                output: json!({}),
            })));
        }
    }
    let started_at = std::time::Instant::now();
    for batch in events.chunks(500) {
        g.model.apply(batch).await.unwrap();
    }
    let elapsed = started_at.elapsed();
    eprintln!(
        "{} events in batches of 500 applied in {elapsed:?} ({:.0} events/s)",
        events.len(),
        events.len() as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(
        g.model.checkpoint().await.unwrap(),
        events.last().unwrap().recorded.position
    );
    let last = s(0x10_000 + TASKS - 1);
    let started_at = std::time::Instant::now();
    let lineage = g.model.task_lineage(TENANT, &last).await.unwrap().unwrap();
    eprintln!(
        "lineage over a {TASKS}-long chain in {:?}",
        started_at.elapsed()
    );
    assert_eq!(lineage.len() as u128, TASKS - 1);
    assert_eq!(lineage.last().unwrap().depth as u128, TASKS - 1);
    let blocked = g.model.blocked_tasks(TENANT, &s(W)).await.unwrap().unwrap();
    // The first 100 are completed, the rest running: from the 102nd on, each
    // waits for a running one.
    assert_eq!(blocked.len() as u128, TASKS - 101);
    assert_eq!(blocked[0].blocked_by, vec![s(0x10_000 + 100)]);
}
