/// Why a job failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// User code panicked in a subtask.
    #[error("subtask {subtask} of stage '{stage}' failed: {message}")]
    SubtaskFailed {
        stage: String,
        subtask: usize,
        message: String,
    },
    /// A subtask's consumers are gone (they failed): it stops.
    #[error("the consumers of a subtask of stage '{stage}' are gone")]
    DownstreamGone { stage: String },
    /// Another subtask failed: this one stopped.
    #[error("subtask {subtask} of stage '{stage}' stopped: the job failed elsewhere")]
    Cancelled { stage: String, subtask: usize },
    /// A subtask's inputs closed before they ended (their subtasks failed).
    #[error("the inputs of subtask {subtask} of stage '{stage}' closed before they ended")]
    UpstreamGone { stage: String, subtask: usize },
    /// A record without an event time reached an event-time operator
    /// (give records times with `assign_timestamps` or the source).
    #[error("a record without an event time reached stage '{stage}'")]
    NoEventTime { stage: String },
    /// The job cannot be run as built.
    #[error("invalid job: {0}")]
    InvalidJob(String),
    /// Reading or writing a checkpoint or a sink's files failed.
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    /// State could not be written to or restored from a checkpoint.
    #[error("state: {0}")]
    State(String),
    /// A topic source or sink failed (the cluster refused, or did not answer).
    #[error("kafka: {0}")]
    Kafka(String),
    /// The job was cancelled through the node it reports to (`sluice job
    /// cancel`).
    #[error("the job was cancelled on request")]
    CancelledByRequest,
    /// A subtask's thread could not be started.
    #[error("could not start a thread for stage '{stage}': {message}")]
    Spawn { stage: String, message: String },
}

impl StreamError {
    /// Whether this error is only the echo of another subtask's failure.
    pub(crate) fn is_consequence(&self) -> bool {
        matches!(
            self,
            StreamError::DownstreamGone { .. }
                | StreamError::UpstreamGone { .. }
                | StreamError::Cancelled { .. }
        )
    }
}
