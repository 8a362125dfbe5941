//! Subscriptions (fed by the projections' change feed).

use async_graphql::Subscription as SubscriptionDerive;
use commands::EventStore;
use futures::Stream;
use projections::LiveModel;
use tokio_util::sync::CancellationToken;

/// The change feed shared by the subscribers of one process.
#[derive(Debug, Clone, Default)]
pub struct Feed;

impl Feed {
    /// Starts the shared upstream reader.
    pub fn start(
        _store: EventStore,
        _live: LiveModel,
        _buffer: usize,
        _shutdown: CancellationToken,
    ) -> Self {
        Feed
    }
}

/// All subscriptions.
#[derive(Default)]
pub struct Subscription;

#[SubscriptionDerive]
impl Subscription {
    /// Placeholder until the change-feed fan-out lands.
    async fn ticks(&self) -> impl Stream<Item = i32> {
        futures::stream::iter(0..1)
    }
}
