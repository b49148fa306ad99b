//! Errors of the search crate. Each names the file, key, arch or setting at fault.

use thiserror::Error;

use nasvit_infer::InferError;
use nasvit_model::ModelError;
use nasvit_space::NoArchInRange;

/// Everything that can go wrong calibrating, evaluating, searching or timing subnets.
#[derive(Debug, Error)]
pub enum SearchError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("inference engine: {0}")]
    Infer(#[from] InferError),
    #[error(transparent)]
    NoArch(#[from] NoArchInRange),
    #[error("invalid arch: {0}")]
    Arch(#[from] nasvit_space::ArchError),
    #[error("cannot {action} {path}: {reason}")]
    Io {
        action: &'static str,
        path: String,
        reason: String,
    },
    #[error("malformed {what} {path}: {reason}")]
    Parse {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("invalid search config: `{field}`: {reason}")]
    Config { field: String, reason: String },
    #[error("{0}")]
    Data(String),
    #[error("BN re-calibration: {0}")]
    Calibration(String),
    #[error("the latency table has no entry for {key} (built for space `{lut_space}`); rebuild it for this space")]
    MissingLatency { key: String, lut_space: String },
    #[error("search state {path} was written for space `{state_space}`, not `{space}`")]
    StateSpace {
        path: String,
        state_space: String,
        space: String,
    },
    #[error("evaluator: {0}")]
    Evaluator(String),
}

pub type Result<T, E = SearchError> = std::result::Result<T, E>;

pub(crate) fn io_err(action: &'static str, path: &std::path::Path, e: impl std::fmt::Display) -> SearchError {
    SearchError::Io {
        action,
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a crash never leaves half a file.
pub(crate) fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|e| io_err("create folder", dir, e))?;
        }
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(|e| io_err("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err("write", path, e))
}
