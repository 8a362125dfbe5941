//! The indexes that let a reader of one partition read only its own rows.
//!
//! A partition's reader (a projector partition catching up, a rebuild)
//! asks the log for the events of one partition in position order. Without
//! help PostgreSQL walks the primary key and tests every row it passes, so
//! P readers of P partitions pass over every row P times: in a parallel
//! rebuild PostgreSQL did three times the work of one unpartitioned reader.
//! A partial index per partition — `(position) WHERE <partition of the row>
//! = k` — turns each read into a range scan of exactly the partition's rows
//! (ordered like the log, so the planner prefers it to the primary key; an
//! index on `(partition, position)` is not: its first column's order has
//! nothing to do with the table's, and at the default `random_page_cost` the
//! planner keeps walking the primary key).
//!
//! The partition count is a setting of the deployment, not of the schema,
//! so the indexes are made for the count in use (`events_partition_<k>_of_<P>`,
//! P of them, as big together as one index of the log; those of a count no
//! longer used can be dropped by hand) by
//! [`EventStore::ensure_partition_index`]: `neurectomy migrate` and every
//! partitioned `project` process call it. They are built `CONCURRENTLY`
//! (appends go on meanwhile) under an advisory lock, so processes starting
//! together build them once (the others poll the lock, then find them
//! built); one left invalid by an interrupted build is dropped and built
//! again. Reads are correct without them, only slower: the partition queries
//! spell the predicate exactly as the indexes do ([`in_partition`]), with the
//! partition as a literal, which is how PostgreSQL matches a partial index
//! (generic plans included). Every append of a partitioned deployment
//! costs one more index entry.

use std::time::{Duration, Instant};

use sqlx::{Connection as _, PgConnection};

use super::read::db;
use super::EventStore;
use crate::error::ReadError;

/// Advisory-lock key under which the partition index is built (one builder
/// per database at a time). Distinct from the relays' keys, which are
/// derived from stream names.
const BUILD_LOCK: i64 = 0x6e65_7572_7069_6478; // "neurpidx"

/// How often a process waiting for another's build tries the lock again.
const LOCK_POLL: Duration = Duration::from_millis(100);

/// What [`EventStore::ensure_partition_index`] found or did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartitionIndex {
    /// One partition: the primary key serves the whole log.
    Unneeded,
    /// Every partition's index was there and valid.
    Present,
    /// This many of the partitions' indexes were built (or rebuilt after an
    /// interrupted build), taking this long.
    Built(u32, Duration),
}

/// The partition of a row of `events` among `partitions`, as SQL. Queries
/// and the index must spell it identically for the planner to use the
/// index; `partitions` is an integer, so it is safe to splice.
pub fn row_partition(partitions: u32) -> String {
    format!("(coalesce(tenant_hash, neurectomy_tenant_hash(tenant)) % {partitions})")
}

/// Whether a row of `events` is in `partition` of `partitions`, as SQL:
/// the predicate of that partition's index, spelled identically by the
/// queries so the planner matches it.
pub fn in_partition(partitions: u32, partition: u32) -> String {
    format!("{} = {partition}", row_partition(partitions))
}

/// `sql` with its `{in_partition}` placeholder spelled for `partition` of
/// `partitions`.
pub(crate) fn with_partition(sql: &str, partitions: u32, partition: u32) -> String {
    sql.replace("{in_partition}", &in_partition(partitions, partition))
}

/// The name of the index of `partition` of `partitions`.
pub fn partition_index_name(partitions: u32, partition: u32) -> String {
    format!("events_partition_{partition}_of_{partitions}")
}

impl EventStore {
    /// Makes sure the index of each of `partitions` partitions exists and
    /// is valid, building what is missing (see the module). Waits for
    /// another process building them; on a large log each build takes as
    /// long as an index build of the table (appends continue meanwhile).
    pub async fn ensure_partition_index(
        &self,
        partitions: u32,
    ) -> Result<PartitionIndex, ReadError> {
        if partitions <= 1 {
            return Ok(PartitionIndex::Unneeded);
        }
        let options = self.pool().connect_options();
        let timeout = self.pool().options().get_acquire_timeout();
        let mut conn = tokio::time::timeout(timeout, PgConnection::connect_with(&options))
            .await
            .unwrap_or(Err(sqlx::Error::PoolTimedOut))
            .map_err(db("connecting to build the partition index"))?;
        let outcome = ensure_on(&mut conn, partitions).await;
        // Closing the connection releases the advisory lock.
        let _ = conn.close().await;
        outcome
    }
}

async fn ensure_on(conn: &mut PgConnection, partitions: u32) -> Result<PartitionIndex, ReadError> {
    // An index build may take longer than the deployment's statement
    // timeout (which this connection inherits).
    sqlx::query("SET statement_timeout = 0")
        .execute(&mut *conn)
        .await
        .map_err(db(
            "clearing the statement timeout to build the partition indexes",
        ))?;
    // Polled, not waited for: a session blocked in `pg_advisory_lock` is a
    // transaction the holder's `CREATE INDEX CONCURRENTLY` waits for in
    // turn (a deadlock PostgreSQL breaks by failing one of them).
    loop {
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(BUILD_LOCK)
            .fetch_one(&mut *conn)
            .await
            .map_err(db("taking the lock to build the partition indexes"))?;
        if locked {
            break;
        }
        tokio::time::sleep(LOCK_POLL).await;
    }
    let started = Instant::now();
    let mut built = 0;
    for partition in 0..partitions {
        let name = partition_index_name(partitions, partition);
        let valid: Option<bool> = sqlx::query_scalar(
            "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass($1)",
        )
        .bind(&name)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db(format!("looking up index {name}")))?;
        match valid {
            Some(true) => continue,
            Some(false) => {
                tracing::warn!(
                    index = name,
                    "partition index left invalid by an interrupted build; rebuilding it"
                );
                sqlx::query(&format!("DROP INDEX CONCURRENTLY IF EXISTS {name}"))
                    .execute(&mut *conn)
                    .await
                    .map_err(db(format!("dropping the invalid index {name}")))?;
            }
            None => {}
        }
        if built == 0 {
            tracing::info!(partitions, "building the partition indexes");
        }
        let create = format!(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON events (position) WHERE {}",
            in_partition(partitions, partition)
        );
        sqlx::query(&create)
            .execute(&mut *conn)
            .await
            .map_err(db(format!("building index {name}")))?;
        built += 1;
    }
    if built == 0 {
        return Ok(PartitionIndex::Present);
    }
    let took = started.elapsed();
    tracing::info!(
        partitions,
        built,
        took_ms = took.as_millis() as u64,
        "partition indexes built"
    );
    Ok(PartitionIndex::Built(built, took))
}
