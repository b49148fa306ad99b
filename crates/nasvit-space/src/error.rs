//! Errors of spaces and architectures. Each names the file, field or gene at fault.

use std::path::Path;

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum SpaceError {
    #[error("unknown space `{name}`: not a built-in space (official, paper, tiny, tiny-cnn) and no such file")]
    UnknownBuiltin { name: String },
    #[error("cannot read space file {path}: {reason}")]
    Io { path: String, reason: String },
    #[error("malformed space: {reason}")]
    Parse { reason: String },
    #[error("invalid space: `{field}`: {reason}")]
    Invalid { field: String, reason: String },
    #[error("space file {path}: {inner}")]
    InFile { path: String, inner: Box<SpaceError> },
}

impl SpaceError {
    pub(crate) fn in_file(self, path: &Path) -> Self {
        SpaceError::InFile {
            path: path.display().to_string(),
            inner: Box::new(self),
        }
    }
}

#[derive(Debug, Error, Clone, PartialEq)]
pub enum ArchError {
    #[error("cannot read arch file {path}: {reason}")]
    Io { path: String, reason: String },
    #[error("malformed arch: {reason}")]
    Parse { reason: String },
    #[error("arch gene `{gene}` has {got} entries, the space `{space}` needs {expected}")]
    Length {
        gene: String,
        got: usize,
        expected: usize,
        space: String,
    },
    #[error("arch gene `{gene}` = {value} is not allowed; allowed values: {allowed}")]
    Gene {
        gene: String,
        value: String,
        allowed: String,
    },
    #[error("arch gene `{gene}` is set but the space `{space}` has no paper genes")]
    NoPaperGenes { gene: String, space: String },
    #[error("arch file {path}: {inner}")]
    InFile { path: String, inner: Box<ArchError> },
}

impl ArchError {
    pub(crate) fn in_file(self, path: &Path) -> Self {
        ArchError::InFile {
            path: path.display().to_string(),
            inner: Box::new(self),
        }
    }
}
