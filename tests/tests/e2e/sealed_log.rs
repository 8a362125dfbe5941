//! The sealed audit log (README, "Sealed audit log"): the relay leader seals
//! a simulated workload of several tenants block by block; `audit verify`
//! finds it clean, for the whole log and for one tenant; an event's
//! inclusion proof checks against its signed seal with the public key
//! alone; and every tampering of the store or of the seals — any column of
//! any row, deletions, insertions, a swap, a seal edited, re-signed with
//! another key, deleted from PostgreSQL while its copy is on JetStream, or
//! its stored leaves rewritten to match an edited event — is found at the
//! right position or seal. The log is restored after each one and found
//! clean again at the end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use api::simulate::SimulateArgs;
use commands::seal::block::EventProof;
use commands::seal::key::SealKey;
use commands::seal::leaf::leaf;
use commands::seal::record::{encode_leaves, SealBody};
use commands::seal::store;
use commands::seal::verify::{verify, Problem, Report, VerifyOptions};
use commands::testkit::eventually;
use neurectomy_e2e::pipeline::Pipeline;
use neurectomy_e2e::read_side;
use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};
use sqlx::PgPool;

/// Verifies the pipeline's log with `key` trusted (and one's `tenant` only).
async fn check(pipe: &Pipeline, key: &SealKey, tenant: Option<&str>) -> Report {
    let options = VerifyOptions {
        log: pipe.nats.relay.stream_name.clone(),
        tenant: tenant.map(str::to_owned),
        trusted: vec![key.public().clone()],
        copies: Some(format!("{}_SEALS", pipe.nats.relay.stream_name)),
        ..VerifyOptions::default()
    };
    let js = pipe.nats.jetstream();
    verify(&pipe.db.pool, Some(&js), &options, |_| {})
        .await
        .unwrap()
}

async fn exec(pool: &PgPool, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Puts the events and seals back as they were sealed.
async fn restore(pool: &PgPool) {
    exec(
        pool,
        "BEGIN; DELETE FROM events; INSERT INTO events SELECT * FROM events_sealed; \
         DELETE FROM seals; INSERT INTO seals SELECT * FROM seals_sealed; COMMIT",
    )
    .await;
}

/// A sealed event: position, stream, type, tenant.
#[derive(Clone, Debug)]
struct Row {
    position: i64,
    stream: String,
    event_type: String,
    tenant: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_workload_verifies_clean_and_every_tampering_is_found_where_it_is() {
    let seed = read_side::seed("sealed_log_tampering");
    let mut rng = StdRng::seed_from_u64(seed);
    let key = SealKey::generate();
    // Blocks of at most 20 events: more than one page of seals (verify
    // reads 50 at a time, and its reads ahead cross from page to page).
    let pipe = Pipeline::start_sealed(key.clone(), 20, Duration::from_millis(100)).await;
    let pool = pipe.db.pool.clone();
    let log = pipe.nats.relay.stream_name.clone();
    pipe.simulate_until(
        SimulateArgs {
            tenants: 4,
            agents: 24,
            ..Pipeline::workload(0, 400, seed)
        },
        1_200,
        &["TaskCreated", "TaskCompleted", "AgentPaused"],
    )
    .await;
    let head = pipe.head().await;
    // Every event sealed, and every seal copied to the seal stream.
    eventually(
        "the log to be sealed and copied",
        Duration::from_secs(60),
        || async {
            let report = check(&pipe, &key, None).await;
            (report.sealed_to >= head && report.copies_missing == 0).then_some(())
        },
    )
    .await;

    // Clean, whole and per tenant.
    let clean = check(&pipe, &key, None).await;
    assert_eq!(clean.problem, None, "{clean:?}");
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(clean.events as i64, total);
    assert_eq!(clean.unsealed, 0);
    assert!(clean.seals > 50, "blocks of at most 20: {clean:?}");
    let rows: Vec<Row> = sqlx::query_as::<_, (i64, String, String, String)>(
        "SELECT position, stream_id, event_type, tenant FROM events ORDER BY position",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(position, stream, event_type, tenant)| Row {
        position,
        stream,
        event_type,
        tenant,
    })
    .collect();
    let tenants: std::collections::BTreeSet<&str> =
        rows.iter().map(|r| r.tenant.as_str()).collect();
    assert_eq!(tenants.len(), 4, "{tenants:?}");
    let small = *tenants.iter().last().unwrap();
    let mine = check(&pipe, &key, Some(small)).await;
    assert_eq!(mine.problem, None, "{mine:?}");
    assert_eq!(
        mine.events as usize,
        rows.iter().filter(|r| r.tenant == small).count()
    );

    // An auditor of one tenant checks an event of its own with the public
    // key, the event and its proof: nothing of another tenant's.
    let own = rows
        .iter()
        .filter(|r| r.tenant == small)
        .collect::<Vec<_>>();
    let chosen = own.choose(&mut rng).unwrap();
    let seal = store::covering(&pool, &log, chosen.position)
        .await
        .unwrap()
        .unwrap();
    let tenant_index = seal
        .record
        .tenants
        .iter()
        .position(|t| t.tenant == small)
        .unwrap() as u32;
    let leaves: Vec<_> = seal
        .record
        .leaves
        .iter()
        .filter(|l| l.tenant == tenant_index)
        .collect();
    let index = leaves
        .iter()
        .position(|l| l.position == chosen.position)
        .unwrap();
    let hashes: Vec<_> = leaves.iter().map(|l| l.hash).collect();
    let proof = EventProof::new(&seal.record.tenants, small, &hashes, index).unwrap();
    let event = pipe
        .store
        .read_all(chosen.position - 1, 1)
        .await
        .unwrap()
        .pop()
        .unwrap();
    let body = SealBody::parse(&seal.record.body).unwrap();
    assert!(key
        .public()
        .verifies(&seal.record.body, &seal.record.signature));
    assert_eq!(proof.block_root(&leaf(&event, &[])), Some(body.root));
    let mut edited = event.clone();
    edited.data["tampered"] = serde_json::json!(true);
    assert_ne!(proof.block_root(&leaf(&edited, &[])), Some(body.root));

    // The tamper suite. The sealed state is kept aside and put back after
    // each tampering.
    exec(
        &pool,
        "CREATE TABLE events_sealed AS TABLE events; CREATE TABLE seals_sealed AS TABLE seals",
    )
    .await;
    let last_sealed = clean.sealed_to;
    let (seals, _) = store::extent(&pool, &log).await.unwrap();
    let last_seq = seals.unwrap();
    let pick = |rng: &mut StdRng, filter: &dyn Fn(&Row) -> bool| -> Row {
        let candidates: Vec<&Row> = rows.iter().filter(|r| filter(r)).collect();
        (*candidates.choose(rng).unwrap()).clone()
    };
    let free = |p: i64| !rows.iter().any(|r| r.position == p);
    let mut tampered = 0;
    for round in 0..3 {
        let mut cases: Vec<&str> = vec![
            "data",
            "personal",
            "actor",
            "type",
            "schema",
            "version",
            "recorded_at",
            "stream",
            "tenant",
            "metadata_key",
            "moved",
            "deleted",
            "inserted",
            "swapped",
            "seal_body",
            "seal_other_key",
            "seal_other_key_same_id",
            "seal_deleted",
            "last_seal_deleted",
            "leaves_rewritten",
            "tenants_edited",
        ];
        if round > 0 {
            cases.shuffle(&mut rng);
            cases.truncate(7);
        }
        for case in cases {
            let any = pick(&mut rng, &|_| true);
            let p = any.position;
            let expect: Problem = match case {
                "data" => {
                    exec(&pool, &format!("UPDATE events SET data = data || '{{\"tampered\": true}}' WHERE position = {p}")).await;
                    Problem::Edited {
                        position: p,
                        stream: any.stream.clone(),
                        what: "does not match its sealed leaf".into(),
                    }
                }
                "personal" => {
                    let r = pick(&mut rng, &|r| r.event_type == "TaskCreated");
                    exec(&pool, &format!("UPDATE events SET data = jsonb_set(data, '{{title}}', '\"another title\"') WHERE position = {}", r.position)).await;
                    Problem::Edited {
                        position: r.position,
                        stream: r.stream.clone(),
                        what: "does not match its sealed leaf".into(),
                    }
                }
                "actor" => {
                    exec(&pool, &format!("UPDATE events SET metadata = jsonb_set(metadata, '{{actor}}', '\"mallory\"') WHERE position = {p}")).await;
                    Problem::Edited {
                        position: p,
                        stream: any.stream.clone(),
                        what: "does not match its sealed leaf".into(),
                    }
                }
                "type" => {
                    let other = if any.event_type == "TaskFailed" {
                        "TaskCompleted"
                    } else {
                        "TaskFailed"
                    };
                    exec(
                        &pool,
                        &format!("UPDATE events SET event_type = '{other}' WHERE position = {p}"),
                    )
                    .await;
                    Problem::Edited {
                        position: p,
                        stream: any.stream.clone(),
                        what: "does not match its sealed leaf".into(),
                    }
                }
                "schema" => {
                    exec(&pool, &format!("UPDATE events SET schema_version = schema_version + 1 WHERE position = {p}")).await;
                    Problem::Edited {
                        position: p,
                        stream: any.stream.clone(),
                        what: "does not match its sealed leaf".into(),
                    }
                }
                "version" => {
                    exec(&pool, &format!("UPDATE events SET stream_version = stream_version + 100000 WHERE position = {p}")).await;
                    Problem::Edited {
                        position: p,
                        stream: any.stream.clone(),
                        what: "does not match its sealed leaf".into(),
                    }
                }
                "recorded_at" => {
                    exec(&pool, &format!("UPDATE events SET recorded_at = recorded_at + interval '1 microsecond' WHERE position = {p}")).await;
                    Problem::Edited {
                        position: p,
                        stream: any.stream.clone(),
                        what: "does not match its sealed leaf".into(),
                    }
                }
                "stream" => {
                    exec(
                        &pool,
                        &format!(
                            "UPDATE events SET stream_id = stream_id || 'x' WHERE position = {p}"
                        ),
                    )
                    .await;
                    Problem::Edited {
                        position: p,
                        stream: format!("{}x", any.stream),
                        what: "does not match its sealed leaf".into(),
                    }
                }
                "tenant" => {
                    exec(&pool, &format!("UPDATE events SET tenant = 'intruder', tenant_hash = NULL WHERE position = {p}")).await;
                    Problem::Edited {
                        position: p,
                        stream: any.stream.clone(),
                        what: format!(
                            "has tenant `intruder` in its column and `{}` in its metadata",
                            any.tenant
                        ),
                    }
                }
                "metadata_key" => {
                    exec(&pool, &format!("UPDATE events SET metadata = metadata || '{{\"approved_by\": \"mallory\"}}' WHERE position = {p}")).await;
                    Problem::Edited {
                        position: p,
                        stream: any.stream.clone(),
                        what: "has a metadata field the format lacks (`approved_by`)".into(),
                    }
                }
                "moved" => {
                    let r = pick(&mut rng, &|r| free(r.position | 0xFFFF));
                    let to = r.position | 0xFFFF;
                    exec(
                        &pool,
                        &format!(
                            "UPDATE events SET position = {to} WHERE position = {}",
                            r.position
                        ),
                    )
                    .await;
                    Problem::Missing {
                        position: r.position,
                    }
                }
                "deleted" => {
                    exec(&pool, &format!("DELETE FROM events WHERE position = {p}")).await;
                    Problem::Missing { position: p }
                }
                "inserted" => {
                    let r = pick(&mut rng, &|r| {
                        free(r.position | 0xFFFF) && (r.position | 0xFFFF) < last_sealed
                    });
                    let at = r.position | 0xFFFF;
                    exec(&pool, &format!(
                        "INSERT INTO events SELECT {at}, transaction_id, stream_id, stream_version + 100000, gen_random_uuid(), \
                         command_id, correlation_id, tenant, event_type, schema_version, data, metadata, recorded_at, tenant_hash \
                         FROM events WHERE position = {}", r.position)).await;
                    Problem::Inserted {
                        position: at,
                        stream: r.stream.clone(),
                    }
                }
                "swapped" => {
                    // Two events of one stream trade their versions.
                    let r = pick(&mut rng, &|r| {
                        rows.iter().filter(|o| o.stream == r.stream).count() >= 2
                    });
                    let q = rows
                        .iter()
                        .filter(|o| o.stream == r.stream && o.position != r.position)
                        .collect::<Vec<_>>();
                    let q = q.choose(&mut rng).unwrap();
                    exec(&pool, &format!(
                        "BEGIN; \
                         UPDATE events SET stream_version = stream_version + 1000000 WHERE position IN ({a}, {b}); \
                         UPDATE events e SET stream_version = o.stream_version FROM events_sealed o \
                           WHERE (e.position, o.position) IN (({a}, {b}), ({b}, {a})); COMMIT",
                        a = r.position, b = q.position)).await;
                    let first = r.position.min(q.position);
                    Problem::Edited {
                        position: first,
                        stream: r.stream.clone(),
                        what: "does not match its sealed leaf".into(),
                    }
                }
                "seal_body" => {
                    let seq = rng.gen_range(0..=last_seq);
                    // One digit of the root changed: still a canonical body.
                    exec(&pool, &format!(
                        "UPDATE seals SET body = regexp_replace(body, '\"root\":\"(.)', '\"root\":\"' || \
                         CASE WHEN substring(body from '\"root\":\"(.)') = 'a' THEN 'b' ELSE 'a' END) \
                         WHERE log = '{log}' AND seq = {seq}")).await;
                    Problem::BadSignature {
                        seq,
                        key: key.id().to_owned(),
                    }
                }
                "seal_other_key" | "seal_other_key_same_id" => {
                    let seq = rng.gen_range(0..=last_seq);
                    let seal = store::from_seq(&pool, &log, seq, 1)
                        .await
                        .unwrap()
                        .pop()
                        .unwrap();
                    let other = SealKey::generate();
                    let mut body = SealBody::parse(&seal.record.body).unwrap();
                    if case == "seal_other_key" {
                        body.key = other.id().to_owned();
                    }
                    let bytes = body.canonical();
                    let signature = other.sign(&bytes);
                    sqlx::query(
                        "UPDATE seals SET body = $1, signature = $2 WHERE log = $3 AND seq = $4",
                    )
                    .bind(String::from_utf8(bytes).unwrap())
                    .bind(signature.to_vec())
                    .bind(&log)
                    .bind(seq)
                    .execute(&pool)
                    .await
                    .unwrap();
                    if case == "seal_other_key" {
                        Problem::UnknownKey {
                            seq,
                            key: other.id().to_owned(),
                        }
                    } else {
                        Problem::BadSignature {
                            seq,
                            key: key.id().to_owned(),
                        }
                    }
                }
                "seal_deleted" => {
                    let seq = rng.gen_range(1..last_seq);
                    exec(
                        &pool,
                        &format!("DELETE FROM seals WHERE log = '{log}' AND seq = {seq}"),
                    )
                    .await;
                    Problem::SealDeleted { seq }
                }
                "last_seal_deleted" => {
                    exec(
                        &pool,
                        &format!("DELETE FROM seals WHERE log = '{log}' AND seq = {last_seq}"),
                    )
                    .await;
                    Problem::SealDeleted { seq: last_seq }
                }
                "leaves_rewritten" => {
                    // The event edited and its stored leaf rewritten to match:
                    // the leaves no longer give the signed root.
                    exec(&pool, &format!("UPDATE events SET data = data || '{{\"tampered\": true}}' WHERE position = {p}")).await;
                    let event = pipe.store.read_all(p - 1, 1).await.unwrap().pop().unwrap();
                    let mut seal = store::covering(&pool, &log, p).await.unwrap().unwrap();
                    for l in seal.record.leaves.iter_mut().filter(|l| l.position == p) {
                        l.hash = leaf(&event, &[]);
                    }
                    sqlx::query("UPDATE seals SET leaves = $1 WHERE log = $2 AND seq = $3")
                        .bind(encode_leaves(&seal.record.leaves))
                        .bind(&log)
                        .bind(seal.seq)
                        .execute(&pool)
                        .await
                        .unwrap();
                    Problem::SealAltered {
                        seq: seal.seq,
                        what: format!("the events of tenant `{}` do not give the root it signs (its stored leaves were rewritten)", any.tenant),
                    }
                }
                "tenants_edited" => {
                    let seq = rng.gen_range(0..=last_seq);
                    exec(&pool, &format!(
                        "UPDATE seals SET tenants = jsonb_set(tenants, '{{0,count}}', to_jsonb((tenants->0->>'count')::int + 1)) \
                         WHERE log = '{log}' AND seq = {seq}")).await;
                    Problem::SealAltered {
                        seq,
                        what: "its tenants' summaries do not give its signed root".into(),
                    }
                }
                other => unreachable!("{other}"),
            };
            let found = check(&pipe, &key, None).await;
            assert_eq!(
                found.problem.as_ref(),
                Some(&expect),
                "{case} (seed {seed}): {found:?}"
            );
            // A tenant's own verification finds what touches its events,
            // and nothing of another tenant's.
            if let Some(position) = expect.position() {
                // The tenant the event was sealed under (an inserted one's
                // from the store).
                let owner = match rows.iter().find(|r| r.position == position) {
                    Some(r) => r.tenant.clone(),
                    None => sqlx::query_scalar("SELECT tenant FROM events WHERE position = $1")
                        .bind(position)
                        .fetch_one(&pool)
                        .await
                        .unwrap(),
                };
                let owner = owner.as_str();
                if case != "tenant" && case != "inserted" {
                    let theirs = check(&pipe, &key, Some(owner)).await;
                    assert_eq!(
                        theirs.problem.as_ref().and_then(Problem::position),
                        Some(position),
                        "{case}: {theirs:?}"
                    );
                }
                if let Some(bystander) = tenants.iter().find(|t| **t != owner && **t != "intruder")
                {
                    if case != "moved" && case != "swapped" {
                        let theirs = check(&pipe, &key, Some(bystander)).await;
                        assert_eq!(
                            theirs.problem, None,
                            "{case}, seen by {bystander}: {theirs:?}"
                        );
                    }
                }
            }
            restore(&pool).await;
            tampered += 1;
        }
    }
    assert!(tampered >= 21 + 14);
    let again = check(&pipe, &key, None).await;
    assert_eq!(again.problem, None, "{again:?}");
    assert_eq!(again.events as i64, total);
    pipe.shutdown().await;
}

/// An event's inclusion proof, all of it.
pub(crate) const PROOF: &str =
    "query($id: ID!) { auditProof(eventId: $id) { state position committed leaf leafHash \
    index count tenantPath tenantIndex tenants blockPath \
    seal { seq body signature keyId root first last } } }";

/// What the auditor's verifier reads of an event.
pub(crate) const EVENT_FIELDS: &str = "position streamId version type schemaVersion data \
    metadata { eventId commandId commandType correlationId causationId actor occurredAt recordedAt traceparent }";

/// Runs the auditor's verifier (`tests/js/audit_verifier.mjs`, Node's
/// built-ins only) on `input`; its verdict.
pub(crate) async fn auditor_verifies(input: &serde_json::Value) -> serde_json::Value {
    use tokio::io::AsyncWriteExt as _;
    let mut child = tokio::process::Command::new("node")
        .arg(neurectomy_e2e::js::dir().join("audit_verifier.mjs"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run node ({e}): install Node.js 20+ (scripts/js.sh does)")
        });
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.to_string().as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    let verdict: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "the verifier printed no verdict ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(out.status.success(), verdict["ok"] == true, "{verdict}");
    verdict
}

/// Through GraphQL (role `auditor`): the public key, an event's proof that
/// an independent verifier in JavaScript checks from the API's output and
/// the public key alone (and refuses once the event, the path or the seal
/// is changed), another tenant's event answered as a missing one, the open
/// block reported as unsealed, and `verifyLog` finding an edited row of the
/// caller's tenant, but not of another's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auditor_checks_proofs_from_the_api_with_the_public_key_alone() {
    use api::auth::Role;
    use neurectomy_e2e::api::TestApi;
    use serde_json::{json, Value};
    let seed = read_side::seed("sealed_log_api");
    let key = SealKey::generate();
    let api = TestApi::start_sealed(&key, Duration::from_secs(3)).await;
    let pipe = &api.pipe;
    pipe.simulate_until(
        SimulateArgs {
            tenants: 2,
            agents: 12,
            ..Pipeline::workload(0, 300, seed)
        },
        300,
        &["TaskCreated", "TaskCompleted"],
    )
    .await;
    let head = pipe.head().await;
    eventually("the log to be sealed", Duration::from_secs(60), || async {
        (check(pipe, &key, None).await.sealed_to >= head).then_some(())
    })
    .await;
    let tenants: Vec<String> =
        // The busier tenant first: the simulator's shares are skewed, and
        // the checks below want 100 of the auditor's events.
        sqlx::query_scalar(
            "SELECT tenant FROM events GROUP BY tenant ORDER BY count(*) DESC, tenant",
        )
            .fetch_all(&pipe.db.pool)
            .await
            .unwrap();
    assert_eq!(tenants.len(), 2);
    let (mine, theirs) = (&tenants[0], &tenants[1]);
    let auditor = api.token(mine, &[Role::Auditor]);
    let other = api.token(theirs, &[Role::Auditor]);

    let keys = api
        .data(
            &auditor,
            "{ sealKeys { id algorithm publicKey } }",
            json!({}),
        )
        .await["sealKeys"]
        .clone();
    assert_eq!(
        keys,
        json!([{"id": key.id(), "algorithm": "Ed25519", "publicKey": key.public().text()}])
    );

    let log = api
        .data(
            &auditor,
            &format!("{{ eventLog(first: 200) {{ events {{ {EVENT_FIELDS} }} }} }}"),
            json!({}),
        )
        .await;
    let events = log["eventLog"]["events"].as_array().unwrap().clone();
    assert!(events.len() >= 100, "{}", events.len());
    let mut checked = 0;
    for event in events.iter().step_by(9) {
        let id = event["metadata"]["eventId"].as_str().unwrap();
        let proof = api.data(&auditor, PROOF, json!({"id": id})).await["auditProof"].clone();
        assert_eq!(proof["state"], "SEALED", "{proof}");
        let verdict =
            auditor_verifies(&json!({"event": event, "proof": proof, "keys": keys})).await;
        assert_eq!(verdict["key"], key.id());
        checked += 1;
        if checked == 1 {
            // Falsified: the event's data, a sibling on the path, the seal's
            // signature, an untrusted key.
            let mut changed = event.clone();
            let field = changed["data"]
                .as_object()
                .unwrap()
                .keys()
                .next()
                .unwrap()
                .clone();
            changed["data"][&field] = json!("changed");
            let v =
                auditor_verifies(&json!({"event": changed, "proof": proof, "keys": keys})).await;
            assert!(v["why"].as_str().unwrap().contains("differs"), "{v}");
            let mut bent = proof.clone();
            match bent["blockPath"].as_array_mut().unwrap().first_mut() {
                Some(first) => *first = json!("00".repeat(32)),
                None => bent["tenantPath"][0] = json!("00".repeat(32)),
            }
            if bent != proof {
                let v =
                    auditor_verifies(&json!({"event": event, "proof": bent, "keys": keys})).await;
                assert_eq!(v["ok"], false, "{v}");
            }
            let mut forged = proof.clone();
            let body =
                forged["seal"]["body"]
                    .as_str()
                    .unwrap()
                    .replacen("\"count\":", "\"count\":1", 1);
            forged["seal"]["body"] = json!(body);
            let v = auditor_verifies(&json!({"event": event, "proof": forged, "keys": keys})).await;
            assert_eq!(v["ok"], false, "{v}");
            let stranger = SealKey::generate();
            let untrusted = json!([{"id": stranger.id(), "algorithm": "Ed25519", "publicKey": stranger.public().text()}]);
            let v =
                auditor_verifies(&json!({"event": event, "proof": proof, "keys": untrusted})).await;
            assert!(v["why"].as_str().unwrap().contains("not trusted"), "{v}");
        }
    }
    assert!(checked >= 10);

    // Another tenant's event: the same answer as an id nobody has.
    let id = events[0]["metadata"]["eventId"].as_str().unwrap();
    let (code, message) = api.error(Some(&other), PROOF, json!({"id": id})).await;
    assert_eq!(code, "NOT_FOUND");
    let nobody = uuid::Uuid::new_v4().to_string();
    let (code2, message2) = api.error(Some(&other), PROOF, json!({"id": nobody})).await;
    assert_eq!(code2, "NOT_FOUND");
    assert_eq!(
        message.replace(id, "<id>"),
        message2.replace(&nobody, "<id>")
    );
    let (code, _) = api
        .error(Some(&other), PROOF, json!({"id": "not-a-uuid"}))
        .await;
    assert_eq!(code, "VALIDATION");
    let viewer = api.token(mine, &[Role::Viewer]);
    let (code, _) = api.error(Some(&viewer), PROOF, json!({"id": id})).await;
    assert_eq!(code, "FORBIDDEN");

    // verifyLog: clean for both; an edited row of mine is found by mine only.
    const VERIFY: &str = "{ verifyLog { clean seals events verifiedTo hasMore unsealed problem { kind position seal message } } }";
    let clean = api.data(&auditor, VERIFY, json!({})).await["verifyLog"].clone();
    assert_eq!(clean["clean"], true, "{clean}");
    let my_count: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE tenant = $1")
        .bind(mine)
        .fetch_one(&pipe.db.pool)
        .await
        .unwrap();
    assert_eq!(clean["events"].as_i64(), Some(my_count), "{clean}");
    let target: &Value = &events[events.len() / 2];
    let position: i64 = target["position"]
        .to_string()
        .trim_matches('"')
        .parse()
        .unwrap();
    exec(
        &pipe.db.pool,
        &format!(
            "UPDATE events SET data = data || '{{\"tampered\": true}}' WHERE position = {position}"
        ),
    )
    .await;
    let found = api.data(&auditor, VERIFY, json!({})).await["verifyLog"].clone();
    assert_eq!(found["clean"], false, "{found}");
    assert_eq!(found["problem"]["kind"], "edited", "{found}");
    assert_eq!(
        found["problem"]["position"].to_string().trim_matches('"'),
        position.to_string(),
        "{found}"
    );
    let theirs_found = api.data(&other, VERIFY, json!({})).await["verifyLog"].clone();
    assert_eq!(theirs_found["clean"], true, "{theirs_found}");

    // A new event sits in the open block: unsealed, never "verified".
    let handler =
        commands::CommandHandler::new(pipe.store.clone(), commands::HandlerConfig::default());
    let agent = domain::AgentId::from_uuid(uuid::Uuid::new_v4());
    let outcome = handler
        .execute(
            domain::AgentCommand::RegisterAgent {
                agent_id: agent,
                name: "late".into(),
                kind: domain::AgentKind::Tool,
                model: None,
                capabilities: vec!["search".into()],
                parent_agent_id: None,
            }
            .into(),
            &commands::CommandContext::new(uuid::Uuid::new_v4(), "tester", mine.clone()),
        )
        .await
        .unwrap();
    let late = outcome.events[0].event_id.to_string();
    let proof = api.data(&auditor, PROOF, json!({"id": late})).await["auditProof"].clone();
    assert_eq!(proof["state"], "UNSEALED", "{proof}");
    assert!(proof["seal"].is_null());
    api.shutdown().await;
}
