//! Output folders with one writer and files that appear whole: an exclusive OS lock on a run folder, and atomic
//! writes (temporary file in the same folder, fsync, rename), used by `nasvit train`, `search` and `export`.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Name of the lock file a writer holds in (or beside) its output folder.
pub const LOCK_FILE: &str = ".nasvit.lock";

/// Why an output could not be claimed or written.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error(
        "{path} is being written by another nasvit process ({what}); wait for it to finish or choose another folder"
    )]
    Busy { path: String, what: String },
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
}

fn io(path: &Path, e: impl std::fmt::Display) -> FsError {
    FsError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// An exclusive lock on a folder, held until the value is dropped (or the process ends: the OS releases it, so a
/// killed writer leaves no stale lock).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    pub path: PathBuf,
}

/// Locks `lock_path` (created if needed) for `what`; a second process asking for the same lock gets
/// [`FsError::Busy`] at once.
pub fn lock(lock_path: &Path, what: &str) -> Result<DirLock, FsError> {
    if let Some(dir) = lock_path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path)
        .map_err(|e| io(lock_path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(DirLock {
            _file: file,
            path: lock_path.to_path_buf(),
        }),
        Err(TryLockError::WouldBlock) => Err(FsError::Busy {
            path: lock_path.parent().unwrap_or(lock_path).display().to_string(),
            what: what.to_string(),
        }),
        Err(TryLockError::Error(e)) => Err(io(lock_path, e)),
    }
}

/// Locks the folder `dir` itself (its [`LOCK_FILE`]).
pub fn lock_dir(dir: &Path, what: &str) -> Result<DirLock, FsError> {
    lock(&dir.join(LOCK_FILE), what)
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, fsynced, then renamed over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp).map_err(|e| io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| io(&tmp, e))?;
        f.sync_all().map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes the temporary leftovers (`.NAME.tmp-PID` files or folders) of writers that were killed; call it with
/// the folder's lock held.
pub fn remove_stale_temps(dir: &Path) {
    remove_stale(dir, |_| true)
}

/// [`remove_stale_temps`] for the leftovers of one output `name` only (`.name.tmp-PID`, `.name.old.tmp-PID`):
/// for a folder shared with other outputs, whose writers hold locks of their own.
pub fn remove_stale_temps_of(dir: &Path, name: &str) {
    let prefix = format!(".{name}.");
    remove_stale(dir, |n| n.starts_with(&prefix))
}

fn remove_stale(dir: &Path, keep: impl Fn(&str) -> bool) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let own = format!(".tmp-{}", std::process::id());
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.contains(".tmp-") && !name.ends_with(&own) && keep(&name) {
            let p = e.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

/// Replaces the folder `dir` by a complete new one: `fill` writes into a temporary folder beside it, which is
/// renamed into place only when `fill` succeeded; the old folder is removed after the swap. A failure (or a kill)
/// at any point leaves the old folder intact. Hold the parent's lock (see [`lock`]) around it.
pub fn replace_dir<E: From<FsError>>(dir: &Path, fill: impl FnOnce(&Path) -> Result<(), E>) -> Result<(), E> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let pid = std::process::id();
    let tmp = parent.join(format!(".{name}.tmp-{pid}"));
    let old = parent.join(format!(".{name}.old.tmp-{pid}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| io(dir, e))?;
    }
    if let Err(e) = std::fs::rename(&tmp, dir) {
        // put the old folder back
        let _ = std::fs::rename(&old, dir);
        return Err(io(dir, e).into());
    }
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nasvit-fsio-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_second_writer_is_refused_until_the_first_is_gone() {
        let d = scratch("lock");
        let first = lock_dir(&d, "train").expect("first");
        // a second open file description in this process conflicts as another process's would
        let err = lock_dir(&d, "train").expect_err("second");
        assert!(matches!(err, FsError::Busy { .. }), "{err}");
        assert!(err.to_string().contains("another nasvit process"), "{err}");
        drop(first);
        lock_dir(&d, "train").expect("free again");
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn a_failed_replacement_keeps_the_old_folder_and_a_good_one_leaves_no_stale_file() {
        let d = scratch("replace");
        let model = d.join("model");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(model.join("model.onnx"), b"old").unwrap();
        std::fs::write(model.join("model.json"), b"old").unwrap();
        let r: Result<(), FsError> = replace_dir(&model, |tmp| {
            std::fs::write(tmp.join("model.json"), b"new").unwrap();
            Err(FsError::Io {
                path: "x".into(),
                reason: "disk full".into(),
            })
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read(model.join("model.json")).unwrap(), b"old");
        assert_eq!(std::fs::read(model.join("model.onnx")).unwrap(), b"old");
        let r: Result<(), FsError> = replace_dir(&model, |tmp| {
            std::fs::write(tmp.join("model.json"), b"new").unwrap();
            Ok(())
        });
        r.expect("replace");
        assert_eq!(std::fs::read(model.join("model.json")).unwrap(), b"new");
        assert!(!model.join("model.onnx").exists(), "no stale file of the old folder");
        let left: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 1, "{left:?}");
        write_atomic(&d.join("a.txt"), b"x").unwrap();
        assert_eq!(std::fs::read(d.join("a.txt")).unwrap(), b"x");
        std::fs::create_dir_all(d.join(".model.tmp-1")).unwrap();
        remove_stale_temps(&d);
        assert!(!d.join(".model.tmp-1").exists());
        std::fs::remove_dir_all(&d).ok();
    }
}
