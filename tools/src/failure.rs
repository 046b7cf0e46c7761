//! Why a command failed: the message printed after `snapshim: ` and the exit code, shared by
//! every command.

/// Why a command failed: the line(s) printed after `snapshim: `, and the exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    /// The operation failed (exit code 1).
    pub fn op(message: impl Into<String>) -> Failure {
        Failure {
            code: 1,
            message: message.into(),
        }
    }

    /// The input was unusable (exit code 2).
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: 2,
            message: message.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Failure>;
