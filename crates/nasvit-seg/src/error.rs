//! Errors of the segmentation crate. Each names the file (or the input) at fault and why, so a bad file in a
//! folder of thousands can be found from the message alone.

use thiserror::Error;

use crate::metric::MetricError;

#[derive(Debug, Error)]
pub enum SegError {
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    #[error("image {path}: {reason}")]
    Image { path: String, reason: String },
    #[error("label file {path}: {reason}")]
    Label { path: String, reason: String },
    #[error("dataset {path}: {reason}")]
    Layout { path: String, reason: String },
    // Not named `source`: thiserror would make it the error's cause and `{:#}` would print it twice.
    #[error("{path}: {error}")]
    Metric { path: String, error: MetricError },
    #[error("bad input: {0}")]
    Input(String),
    /// A training run's usage or state problem, already phrased for the user.
    #[error("{0}")]
    Usage(String),
}

impl From<nasvit_train::fsio::FsError> for SegError {
    fn from(e: nasvit_train::fsio::FsError) -> Self {
        SegError::Usage(e.to_string())
    }
}

impl SegError {
    pub(crate) fn io(path: &std::path::Path, e: impl std::fmt::Display) -> Self {
        SegError::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        }
    }

    pub(crate) fn image(path: &std::path::Path, reason: impl std::fmt::Display) -> Self {
        SegError::Image {
            path: path.display().to_string(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn label(path: &std::path::Path, reason: impl std::fmt::Display) -> Self {
        SegError::Label {
            path: path.display().to_string(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn layout(path: &std::path::Path, reason: impl std::fmt::Display) -> Self {
        SegError::Layout {
            path: path.display().to_string(),
            reason: reason.to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, SegError>;
