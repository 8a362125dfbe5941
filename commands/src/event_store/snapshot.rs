//! Snapshots: the latest folded state of a stream, to load long streams fast.

use serde_json::Value;

use super::EventStore;

const SAVE_SNAPSHOT: &str = include_str!("sql/save_snapshot.sql");

impl EventStore {
    /// Stores `state` as the snapshot of `stream_id` at `stream_version`,
    /// unless a newer snapshot of the same `snapshot_version` exists.
    pub async fn save_snapshot(
        &self,
        stream_id: &str,
        stream_version: i64,
        snapshot_version: i32,
        tenant: &str,
        state: Value,
    ) -> Result<(), sqlx::Error> {
        self.fetch_all(
            sqlx::query(SAVE_SNAPSHOT)
                .bind(stream_id)
                .bind(stream_version)
                .bind(snapshot_version)
                .bind(tenant)
                .bind(state),
        )
        .await?;
        Ok(())
    }
}
