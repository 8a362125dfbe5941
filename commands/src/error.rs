//! Error enums, one per operation. Each exposes what a caller can act on and
//! folds infrastructure failures into one variant with the source attached.

use domain::{DomainError, EventDecodeError};
use uuid::Uuid;

use crate::envelope::ExpectedVersion;

/// Appending to a stream failed.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The stream is not at the expected version.
    #[error("stream {stream_id} is at version {actual}, but the append expected {expected}")]
    Conflict {
        /// The stream.
        stream_id: String,
        /// What the writer expected.
        expected: ExpectedVersion,
        /// What the stream is at.
        actual: u64,
    },
    /// An event with one of these ids already exists (the command ran before).
    #[error("an event of command {command_id} already exists")]
    DuplicateEvent {
        /// The command whose events collided.
        command_id: Uuid,
    },
    /// The append is empty or too large for one transaction.
    #[error("an append must hold 1 to {max} events, got {count}")]
    BadBatch {
        /// Events given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// PostgreSQL refused the data itself (a value it cannot store, such
    /// as a NUL character in JSON, or one over its limits): retrying cannot
    /// help; the input must change.
    #[error("PostgreSQL refused the events for {stream_id}: {reason}")]
    Refused {
        /// The stream.
        stream_id: String,
        /// PostgreSQL's words, with its SQLSTATE.
        reason: String,
    },
    /// The database failed or is unreachable.
    #[error("PostgreSQL failed while appending to {stream_id}")]
    Database {
        /// The stream.
        stream_id: String,
        /// The cause.
        #[source]
        source: sqlx::Error,
    },
}

/// Reading events or snapshots failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The database failed or is unreachable.
    #[error("PostgreSQL failed while {doing}")]
    Database {
        /// What was being read.
        doing: String,
        /// The cause.
        #[source]
        source: sqlx::Error,
    },
    /// A stored row cannot be interpreted (corrupt or from a newer build).
    #[error("event at position {position} in {stream_id} cannot be decoded")]
    Decode {
        /// Its position.
        position: i64,
        /// Its stream.
        stream_id: String,
        /// Why.
        #[source]
        source: EventDecodeError,
    },
    /// Stored metadata does not parse.
    #[error("metadata of the event at position {position} is malformed")]
    Metadata {
        /// Its position.
        position: i64,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// Handling a command failed. Nothing was appended.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The domain refused the command.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// The stream moved on: the caller's expected version is stale, or
    /// concurrent writers kept winning for every retry.
    #[error("stream {stream_id} is at version {actual}, expected {expected} (after {attempts} attempt(s)); reload and retry")]
    Conflict {
        /// The stream.
        stream_id: String,
        /// What was expected.
        expected: ExpectedVersion,
        /// What the stream is at.
        actual: u64,
        /// Attempts made.
        attempts: u32,
    },
    /// The command id was used before for a different command.
    #[error("command id {command_id} was already used for a different {previous_type} command on {stream_id}; use a new command id")]
    CommandIdReused {
        /// The reused id.
        command_id: Uuid,
        /// The stream the first command wrote.
        stream_id: String,
        /// The first command's type.
        previous_type: String,
    },
    /// The command or a payload is malformed before it reaches the domain.
    #[error("invalid command: {reason}")]
    Malformed {
        /// What is wrong.
        reason: String,
    },
    /// Stored history could not be read back; an operator must look.
    #[error("stored event history cannot be read")]
    Corrupt {
        /// Why.
        #[source]
        source: ReadError,
    },
    /// PostgreSQL is failing or unreachable; retrying later may succeed.
    #[error("the event store is unavailable")]
    Unavailable {
        /// The cause.
        #[source]
        source: sqlx::Error,
    },
}

impl CommandError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            CommandError::Domain(e) => e.code(),
            CommandError::Conflict { .. } | CommandError::CommandIdReused { .. } => "CONFLICT",
            CommandError::Malformed { .. } => "VALIDATION",
            CommandError::Corrupt { .. } => "INTERNAL",
            CommandError::Unavailable { .. } => "UNAVAILABLE",
        }
    }
}

impl From<ReadError> for CommandError {
    fn from(error: ReadError) -> Self {
        match error {
            ReadError::Database { source, .. } => CommandError::Unavailable { source },
            other => CommandError::Corrupt { source: other },
        }
    }
}

/// Setting up the relay's JetStream stream failed. (Running the relay
/// cannot fail: it retries every outage until shutdown.)
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Could not create or inspect the JetStream stream.
    #[error("relay {relay}: JetStream failed while {doing}: {message}")]
    JetStream {
        /// Relay name.
        relay: String,
        /// What it was doing.
        doing: String,
        /// The client's error text.
        message: String,
    },
}
