//! Seals in PostgreSQL (the `seals` table).

use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row as _};

use super::record::{
    decode_leaves, encode_leaves, summaries_from_json, summaries_json, SealRecord,
};
use super::SealError;

/// A seal as stored, with its number and range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredSeal {
    /// Its number.
    pub seq: i64,
    /// Its block's first position.
    pub first: i64,
    /// Its block's last position.
    pub last: i64,
    /// The seal and what is kept beside it.
    pub record: SealRecord,
}

const COLUMNS: &str = "seq, first_position, last_position, body, signature, tenants, leaves";

fn db(doing: impl Into<String>) -> impl FnOnce(sqlx::Error) -> SealError {
    let doing = doing.into();
    move |source| SealError::Database { doing, source }
}

fn stored(row: &PgRow) -> Result<StoredSeal, SealError> {
    let seq: i64 = row.try_get(0).map_err(db("decoding a seal row"))?;
    let malformed = |what: &str| SealError::Stored {
        seq,
        what: what.to_owned(),
    };
    let body: String = row.try_get(3).map_err(db("decoding a seal row"))?;
    let tenants: serde_json::Value = row.try_get(5).map_err(db("decoding a seal row"))?;
    let leaves: Vec<u8> = row.try_get(6).map_err(db("decoding a seal row"))?;
    Ok(StoredSeal {
        seq,
        first: row.try_get(1).map_err(db("decoding a seal row"))?,
        last: row.try_get(2).map_err(db("decoding a seal row"))?,
        record: SealRecord {
            body: body.into_bytes(),
            signature: row.try_get(4).map_err(db("decoding a seal row"))?,
            tenants: summaries_from_json(&tenants)
                .ok_or_else(|| malformed("its tenants are not a list of summaries"))?,
            leaves: decode_leaves(&leaves)
                .ok_or_else(|| malformed("its leaves are not whole records"))?,
        },
    })
}

/// The last seal of `log`.
pub async fn last(pool: &PgPool, log: &str) -> Result<Option<StoredSeal>, SealError> {
    let sql = format!("SELECT {COLUMNS} FROM seals WHERE log = $1 ORDER BY seq DESC LIMIT 1");
    let row = sqlx::query(&sql)
        .bind(log)
        .fetch_optional(pool)
        .await
        .map_err(db("reading the last seal"))?;
    row.as_ref().map(stored).transpose()
}

/// Stores seal `seq`; [`SealError::Raced`] when another sealer stored a
/// seal of that number first.
pub async fn insert(
    pool: &PgPool,
    log: &str,
    seq: i64,
    first: i64,
    last: i64,
    record: &SealRecord,
) -> Result<(), SealError> {
    let result = sqlx::query(
        "INSERT INTO seals (log, seq, first_position, last_position, body, signature, tenants, leaves) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(log)
    .bind(seq)
    .bind(first)
    .bind(last)
    .bind(String::from_utf8_lossy(&record.body).into_owned())
    .bind(&record.signature)
    .bind(summaries_json(&record.tenants))
    .bind(encode_leaves(&record.leaves))
    .execute(pool)
    .await;
    match result {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(SealError::Raced { seq }),
        Err(e) => Err(db(format!("storing seal {seq}"))(e)),
    }
}

/// Up to `limit` seals of `log` from number `from` on, in order.
pub async fn from_seq(
    pool: &PgPool,
    log: &str,
    from: i64,
    limit: i64,
) -> Result<Vec<StoredSeal>, SealError> {
    let sql =
        format!("SELECT {COLUMNS} FROM seals WHERE log = $1 AND seq >= $2 ORDER BY seq LIMIT $3");
    let rows = sqlx::query(&sql)
        .bind(log)
        .bind(from)
        .bind(limit)
        .fetch_all(pool)
        .await
        .map_err(db(format!("reading the seals from {from}")))?;
    rows.iter().map(stored).collect()
}

/// The first seal of `log` whose block ends at or after `position`.
pub async fn covering(
    pool: &PgPool,
    log: &str,
    position: i64,
) -> Result<Option<StoredSeal>, SealError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM seals WHERE log = $1 AND last_position >= $2 \
         ORDER BY last_position LIMIT 1"
    );
    let row = sqlx::query(&sql)
        .bind(log)
        .bind(position)
        .fetch_optional(pool)
        .await
        .map_err(db(format!("finding the seal of position {position}")))?;
    row.as_ref().map(stored).transpose()
}

/// The number of the last seal of `log` (`None`: no seal yet) and how
/// many seals it has.
pub async fn extent(pool: &PgPool, log: &str) -> Result<(Option<i64>, i64), SealError> {
    sqlx::query_as("SELECT max(seq), count(*) FROM seals WHERE log = $1")
        .bind(log)
        .fetch_one(pool)
        .await
        .map_err(db("counting the seals"))
}
