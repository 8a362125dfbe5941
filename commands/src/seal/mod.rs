//! The sealed audit log (issue 16): the canonical JSON every hash is taken
//! over ([`jcs`], RFC 8785), Merkle trees and inclusion proofs ([`merkle`],
//! RFC 9162 hashing), a block as a tree of tenants' trees with proofs a
//! tenant checks alone ([`block`]), an event's leaf ([`leaf`]), signed seals
//! chained block to block ([`record`], [`key`]), the relay leader's sealer
//! ([`sealer`]) and the verifier ([`verify`]).

pub mod block;
pub mod jcs;
pub mod key;
pub mod leaf;
pub mod merkle;
pub mod record;
pub mod sealer;
pub mod store;
pub mod verify;

/// Why sealing or reading seals failed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// PostgreSQL failed or is unreachable.
    #[error("PostgreSQL failed while {doing}")]
    Database {
        /// What was being done.
        doing: String,
        /// The cause.
        #[source]
        source: sqlx::Error,
    },
    /// Reading the log failed.
    #[error(transparent)]
    Read(#[from] crate::error::ReadError),
    /// JetStream failed or is unreachable.
    #[error("JetStream failed while {doing}: {message}")]
    JetStream {
        /// What was being done.
        doing: String,
        /// The cause.
        message: String,
    },
    /// Another sealer stored a seal of this number first.
    #[error("seal {seq} was stored by another sealer")]
    Raced {
        /// The seal's number.
        seq: i64,
    },
    /// A stored seal row cannot be read.
    #[error("the stored seal {seq} is malformed: {what}")]
    Stored {
        /// The seal's number.
        seq: i64,
        /// What is wrong.
        what: String,
    },
}
