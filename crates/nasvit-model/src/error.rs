//! Errors of the model crate. Each names the file, key or arch at fault.

use thiserror::Error;

use nasvit_space::{ArchError, SpaceError};

/// Everything that can go wrong building, configuring, loading or saving a NASViT model.
#[derive(Debug, Error)]
pub enum ModelError {
    #[error("invalid arch: {0}")]
    Arch(#[from] ArchError),
    #[error("invalid space: {0}")]
    Space(#[from] SpaceError),
    #[error("cannot read {path}: {reason}")]
    Io { path: String, reason: String },
    #[error("malformed safetensors file {path}: {reason}")]
    Safetensors { path: String, reason: String },
    #[error("{path} is not a nasvit checkpoint: {reason}")]
    NotACheckpoint { path: String, reason: String },
    /// One error for every key problem of a weight file, so a user sees them all at once.
    #[error("{path}: the weights do not match the supernet of space `{space}`:\n{}", .problems.join("\n"))]
    KeyMismatch {
        path: String,
        space: String,
        problems: Vec<String>,
    },
    #[error("BN statistics override: {0}")]
    BnStats(String),
    #[error("tensors do not fit the supernet: {0}")]
    Tensors(String),
    #[error("BN re-calibration: {0}")]
    Calibration(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("input has {got} channels, the space needs {expected}")]
    InputChannels { got: usize, expected: usize },
    #[error("input must be square, got {h}x{w}")]
    InputNotSquare { h: usize, w: usize },
    #[error("a dense input's height and width must be multiples of {multiple}, got {h}x{w}")]
    InputSize { h: usize, w: usize, multiple: usize },
}
