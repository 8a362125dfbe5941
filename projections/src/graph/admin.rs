//! The graph server's administration API, for what Bolt cannot do on
//! ArcadeDB: creating and dropping databases (per-test databases, scratch
//! databases of the benchmarks). Plain HTTP/1.1 over a TCP stream, so the
//! project needs no HTTP client crate for two requests.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends one ArcadeDB server command (`create database x`) to the HTTP API
/// at `http` (`host:port`); returns the status code and body.
pub async fn server_command(
    http: &str,
    user: &str,
    password: &str,
    command: &str,
) -> Result<(u16, String), String> {
    use base64::Engine;
    let body = serde_json::json!({ "command": command }).to_string();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let request = format!(
        "POST /api/v1/server HTTP/1.1\r\nHost: {http}\r\nAuthorization: Basic {auth}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(http).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .map_err(|_| {
            format!("the graph server's HTTP API at {http} did not answer `{command}` within 30 s")
        })?
        .map_err(|e| format!("the graph server's HTTP API at {http} is not reachable ({e})"))?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("the graph server at {http} sent a malformed HTTP response"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Creates database `name` on the graph server of `model`: Neo4j's
/// `CREATE DATABASE` on the `system` database (Enterprise), or else
/// ArcadeDB's HTTP API at `http`. The error names what both said.
pub async fn create_database(
    model: &super::GraphModel,
    http: &str,
    name: &str,
) -> Result<(), String> {
    administer(model, http, "create", name).await
}

/// Drops database `name`; see [`create_database`].
pub async fn drop_database(
    model: &super::GraphModel,
    http: &str,
    name: &str,
) -> Result<(), String> {
    administer(model, http, "drop", name).await
}

async fn administer(
    model: &super::GraphModel,
    http: &str,
    verb: &str,
    name: &str,
) -> Result<(), String> {
    let cypher = match verb {
        "create" => "CREATE DATABASE $name IF NOT EXISTS WAIT",
        _ => "DROP DATABASE $name IF EXISTS WAIT",
    };
    let neo4j = async {
        let mut txn = model.graph().start_txn_on("system").await?;
        txn.run(neo4rs::query(cypher).param("name", name)).await?;
        txn.commit().await
    };
    let neo4j = match tokio::time::timeout(Duration::from_secs(60), neo4j).await {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer within 60 s".to_owned(),
    };
    let config = model.config();
    match server_command(http, &config.user, &config.password, &format!("{verb} database {name}"))
        .await
    {
        Ok((200, _)) => Ok(()),
        Ok((status, body)) => Err(format!(
            "the graph server cannot {verb} database {name}: over Bolt (Neo4j `{cypher}` on `system`): \
             {neo4j}; over ArcadeDB's HTTP API at {http}: HTTP {status} {body}"
        )),
        Err(http_error) => Err(format!(
            "the graph server cannot {verb} database {name}: over Bolt (Neo4j `{cypher}` on `system`): \
             {neo4j}; {http_error}"
        )),
    }
}
