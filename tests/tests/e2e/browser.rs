//! GraphiQL at `/`, served from the binary, in a real browser: Debian's
//! headless Chromium driven by playwright-core (`tests/js/graphiql.mjs`)
//! against the production API with both projectors (`TestApi`). It must
//! work with no network beyond the server: every request the page makes is
//! recorded and must go to the server's own host and port, and the page's
//! Content-Security-Policy allows nothing else.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use api::auth::Role;
use neurectomy_e2e::api::TestApi;
use neurectomy_e2e::js;
use serde_json::{json, Value};
use uuid::Uuid;

/// Longest wait for one thing the browser does (Chromium's start, one step).
const STEP: Duration = Duration::from_secs(120);

/// What the page loads, by name under `/graphiql/<version>/`.
const ASSETS: [(&str, &str); 6] = [
    ("react.production.min.js", "text/javascript; charset=utf-8"),
    (
        "react-dom.production.min.js",
        "text/javascript; charset=utf-8",
    ),
    ("graphiql.min.js", "text/javascript; charset=utf-8"),
    ("graphiql.min.css", "text/css; charset=utf-8"),
    ("init.js", "text/javascript; charset=utf-8"),
    ("page.css", "text/css; charset=utf-8"),
];

/// The nonce of a Content-Security-Policy's `style-src`.
fn style_nonce(policy: &str) -> &str {
    let start = policy.find("'nonce-").expect("no style nonce") + "'nonce-".len();
    let end = start + policy[start..].find('\'').expect("an unterminated nonce");
    &policy[start..end]
}

/// The version segment of the asset URLs on `page`.
fn asset_version(page: &str) -> String {
    let start = page.find("graphiql/").expect("no asset on the page") + "graphiql/".len();
    page[start..]
        .split('/')
        .next()
        .expect("an asset URL")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graphiql_serves_the_page_and_its_assets_from_the_binary() {
    let api = TestApi::start().await;
    let token = api.token("browser", &[Role::Viewer]);
    let response = api
        .http
        .get(api.url("/"))
        .query(&[("token", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let header = |r: &reqwest::Response, name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    assert_eq!(
        header(&response, "content-type"),
        "text/html; charset=utf-8"
    );
    let policy = header(&response, "content-security-policy");
    let nonce = style_nonce(&policy).to_owned();
    assert_eq!(policy, api::http::graphiql::content_security_policy(&nonce));
    assert_eq!(header(&response, "cache-control"), "no-store");
    assert_eq!(header(&response, "referrer-policy"), "no-referrer");
    let page = response.text().await.unwrap();
    assert!(
        page.contains(&format!(" data-style-nonce=\"{nonce}\"")),
        "{page}"
    );
    let again = api.http.get(api.url("/")).send().await.unwrap();
    assert_ne!(
        style_nonce(&header(&again, "content-security-policy")),
        nonce,
        "the style nonce is the same for two pages"
    );
    // No external host: every address on the page is relative to it.
    assert!(!page.contains("://"), "an absolute URL on the page: {page}");
    assert!(!page.contains("<script>"), "an inline script: {page}");
    let version = asset_version(&page);
    assert_eq!(version.len(), 16, "{page}");

    for (name, content_type) in ASSETS {
        let path = format!("/graphiql/{version}/{name}");
        assert!(
            page.contains(&path[1..]),
            "{name} is not on the page: {page}"
        );
        let response = api.http.get(api.url(&path)).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200, "{path}");
        assert_eq!(header(&response, "content-type"), content_type, "{path}");
        assert_eq!(
            header(&response, "cache-control"),
            "public, max-age=31536000, immutable",
            "{path}"
        );
        let etag = header(&response, "etag");
        assert_eq!(etag, format!("\"{version}\""), "{path}");
        let body = response.text().await.unwrap();
        assert!(!body.is_empty(), "{path}");
        // The upstream builds carry links in comments and error messages
        // (and GraphiQL's advice for CDN users), but no CDN's address, and
        // no source map to fetch; ours carry no address at all.
        for cdn in [
            "unpkg.com",
            "cdn.jsdelivr.net",
            "cdnjs.cloudflare.com",
            "fonts.googleapis.com",
            "fonts.gstatic.com",
            "esm.sh",
            "sourceMappingURL",
        ] {
            assert!(!body.contains(cdn), "{path} mentions {cdn}");
        }
        if matches!(name, "init.js" | "page.css") {
            assert!(!body.contains("://"), "an absolute URL in {path}");
        }
        let revalidated = api
            .http
            .get(api.url(&path))
            .header("if-none-match", &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(revalidated.status().as_u16(), 304, "{path}");
    }
    for path in [
        "/graphiql/0000000000000000/graphiql.min.js".to_owned(),
        format!("/graphiql/{version}/NOTICE.md"),
        format!("/graphiql/{version}/..%2Fgraphql"),
    ] {
        let response = api.http.get(api.url(&path)).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 404, "{path}");
    }
    api.shutdown().await;
}

/// Loads `/?token=…` in Chromium; checks that GraphiQL renders, its
/// Documentation Explorer lists the root types, its settings dialog opens
/// and closes, a query typed into the
/// editor returns data, and a subscription run in GraphiQL shows an agent
/// this test registers over HTTP meanwhile — all with no request off the
/// server.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graphiql_works_offline_in_chromium() {
    js::require(true);
    let api = TestApi::start().await;
    let viewer = api.token("browser", &[Role::Viewer]);
    let operator = api.token("browser", &[Role::Operator]);
    let base = api.url("");
    let mut script = js::Script::spawn("graphiql.mjs", &base, &viewer);

    // Once the subscription is on the socket, a change it must show.
    let agent = Uuid::new_v4();
    if script.until("subscribed", STEP).await.is_ok() {
        api.data(
            &operator,
            "mutation($id: ID!) { registerAgent(id: $id, name: \"seen-in-graphiql\", kind: LLM) { position } }",
            json!({ "id": agent }),
        )
        .await;
    }
    let (result, status) = script.result(STEP).await;
    let shown = serde_json::to_string_pretty(&result).unwrap();
    let steps = &result["steps"];

    // The network: the server only, every request answered.
    assert!(result["error"].is_null(), "the script failed: {shown}");
    assert_eq!(
        result["offHost"],
        json!([]),
        "requests off the server: {shown}"
    );
    assert_eq!(result["failed"], json!([]), "failed requests: {shown}");
    let requests = result["requests"].as_array().unwrap();
    assert!(
        requests
            .iter()
            .all(|r| r["url"].as_str().unwrap().starts_with(&format!("{base}/"))),
        "{shown}"
    );
    let version = requests
        .iter()
        .find_map(|r| {
            r["url"]
                .as_str()
                .unwrap()
                .strip_prefix(&format!("{base}/graphiql/"))
                .and_then(|rest| rest.split('/').next())
        })
        .unwrap_or_else(|| panic!("no asset was loaded: {shown}"));
    for (name, _) in ASSETS {
        let url = format!("{base}/graphiql/{version}/{name}");
        assert!(
            requests
                .iter()
                .any(|r| r["url"] == url.as_str() && r["authorization"] == "none"),
            "{url} was not loaded: {shown}"
        );
    }
    assert_eq!(
        result["sockets"],
        json!([format!("ws://{}/graphql/ws", api.addr)]),
        "{shown}"
    );
    assert_eq!(result["cspViolations"], json!([]), "{shown}");
    assert_eq!(result["pageErrors"], json!([]), "{shown}");

    // The page and the editor.
    let load = &steps["load"];
    assert_eq!(load["ok"], true, "{shown}");
    assert_eq!(load["status"], 200, "{shown}");
    let policy = load["contentSecurityPolicy"].as_str().unwrap_or_default();
    assert_eq!(
        policy,
        api::http::graphiql::content_security_policy(style_nonce(policy)),
        "{shown}"
    );
    assert_eq!(load["title"], "Neurectomy GraphQL", "{shown}");
    assert_eq!(load["executeButton"], true, "{shown}");

    // A dialog opens and closes (its scroll lock is the one inline style,
    // allowed by the page's nonce: no CSP violation above).
    let dialog = &steps["dialog"];
    assert_eq!(dialog["ok"], true, "{shown}");
    assert!(
        dialog["text"].as_str().unwrap().starts_with("Settings"),
        "{shown}"
    );

    // A query typed and run, with the page's token in its header.
    let query = &steps["query"];
    assert_eq!(query["ok"], true, "{shown}");
    assert!(query["response"]["errors"].is_null(), "{shown}");
    let mut names: Vec<&str> = query["response"]["data"]["projectionStatus"]
        .as_array()
        .unwrap_or_else(|| panic!("no projectionStatus: {shown}"))
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["graph", "redis"], "{shown}");
    assert_eq!(query["postedTo"], format!("{base}/graphql"), "{shown}");
    assert!(
        requests
            .iter()
            .filter(|r| r["method"] == "POST")
            .all(|r| r["authorization"] == "token"),
        "a GraphQL request without the page's token: {shown}"
    );

    // A subscription typed and run over graphql-transport-ws, with the
    // token in connection_init, shows the agent registered meanwhile.
    let subscription = &steps["subscription"];
    assert_eq!(subscription["ok"], true, "{shown}");
    assert_eq!(subscription["connectionInitAuthorized"], true, "{shown}");
    let update: &Value = &subscription["response"]["data"]["agentsUpdated"];
    assert_eq!(update["agent"]["id"], agent.to_string(), "{shown}");
    assert_eq!(update["agent"]["name"], "seen-in-graphiql", "{shown}");
    for sent in ["connection_init", "subscribe", "complete"] {
        assert!(
            subscription["sent"]
                .as_array()
                .unwrap()
                .contains(&json!(sent)),
            "{sent} was not sent: {shown}"
        );
    }
    for received in ["connection_ack", "next"] {
        assert!(
            subscription["received"]
                .as_array()
                .unwrap()
                .contains(&json!(received)),
            "{received} was not received: {shown}"
        );
    }

    // The Documentation Explorer lists the schema's root types (this needs
    // the standard introspection query to pass the API's limits).
    let docs = &steps["docs"];
    assert_eq!(docs["ok"], true, "the Documentation Explorer: {shown}");
    assert_eq!(
        docs["rootTypes"],
        json!([
            "query: Query",
            "mutation: Mutation",
            "subscription: Subscription"
        ]),
        "{shown}"
    );
    assert_eq!(result["consoleErrors"], json!([]), "{shown}");
    assert!(status.success(), "{shown}");
    api.shutdown().await;
}
