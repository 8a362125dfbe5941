//! Audit queries on the event store (history, time travel, the event log).

use async_graphql::Object;

/// Audit queries.
#[derive(Default)]
pub struct AuditQuery;

#[Object]
impl AuditQuery {
    /// Placeholder until the audit queries land.
    async fn audit_version(&self) -> i32 {
        1
    }
}
