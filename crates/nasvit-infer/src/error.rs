//! Errors of export, loading, inference and image input. Each names the file, key or input at fault.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum InferError {
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    #[error("{path}: not a readable safetensors file: {reason}")]
    Safetensors { path: String, reason: String },
    #[error("missing tensor `{key}`{context}")]
    MissingKey { key: String, context: String },
    #[error("tensor `{key}` has shape {got:?}, expected {expected}{context}")]
    Shape {
        key: String,
        got: Vec<usize>,
        expected: String,
        context: String,
    },
    #[error("tensor `{key}`: unsupported dtype {dtype}")]
    Dtype { key: String, dtype: String },
    #[error("{path}: bad model description: {reason}")]
    Meta { path: String, reason: String },
    #[error("architecture does not fit the space: {0}")]
    Arch(String),
    #[error("bad input: {0}")]
    Input(String),
    #[error("image {path}: {reason}")]
    Image { path: String, reason: String },
}

impl InferError {
    pub(crate) fn io(path: &std::path::Path, e: impl std::fmt::Display) -> Self {
        InferError::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        }
    }

    /// Adds "in FILE" to key errors, so a bad export folder names both the key and the file.
    pub(crate) fn in_file(self, path: &std::path::Path) -> Self {
        let ctx = format!(" in {}", path.display());
        match self {
            InferError::MissingKey { key, .. } => InferError::MissingKey { key, context: ctx },
            InferError::Shape { key, got, expected, .. } => InferError::Shape {
                key,
                got,
                expected,
                context: ctx,
            },
            e => e,
        }
    }
}

pub type Result<T> = std::result::Result<T, InferError>;
