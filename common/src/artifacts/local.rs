//! Local-directory fast paths. A `stat` on a local disk costs microseconds: it runs on
//! the calling thread instead of a hop to tokio's blocking pool and back, which costs more
//! than the call itself. A create-once record waits for the disk; on Linux the records of
//! concurrent jobs share their flushes ([`super::commit`]), elsewhere each record is synced
//! on its own on the blocking pool ([`create`]); neither goes through `object_store`'s extra calls.

use std::{
    fs::OpenOptions,
    io::{ErrorKind, Write},
    path::{Path, PathBuf},
};

use crate::error::CommonError;

/// Largest payload the fast path writes; bigger ones go through `object_store`.
pub(super) const SMALL: usize = 64 * 1024;

/// Creates `path` with `bytes` unless it exists (`false` then). Atomic as
/// `object_store`'s own create: a staged file (`<name>#<n>`, which its
/// listings skip) is hard-linked into place, so a reader never sees half a file.
/// Durable before it returns `true`: the staged file's data is synced before the
/// link, the directory after it (the new name), and a directory it created in its
/// parent, so a machine crash cannot take back an outcome the broker was told of.
#[cfg_attr(target_os = "linux", allow(dead_code))]
pub(super) fn create(path: &Path, bytes: &[u8]) -> std::io::Result<bool> {
    let (mut file, staged) = staged_file(path)?;
    let linked = file.write_all(bytes).and_then(|()| file.sync_data()).and_then(|()| std::fs::hard_link(&staged, path));
    let _ = std::fs::remove_file(&staged);
    match linked {
        Ok(()) => sync_dir(parent(path)).map(|()| true),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Opens a new staged file beside `path` (`<name>#<n>`), creating the directories it lacks.
pub(super) fn staged_file(path: &Path) -> std::io::Result<(std::fs::File, PathBuf)> {
    let (mut n, mut made_dirs) = (1u32, false);
    loop {
        let mut staged = path.as_os_str().to_owned();
        staged.push(format!("#{n}"));
        let staged = PathBuf::from(staged);
        match OpenOptions::new().write(true).create_new(true).open(&staged) {
            Ok(f) => return Ok((f, staged)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists && n < 1000 => n += 1,
            Err(e) if e.kind() == ErrorKind::NotFound && !made_dirs => {
                create_dirs(parent(path))?;
                made_dirs = true;
            }
            Err(e) => return Err(e),
        }
    }
}

pub(super) fn parent(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("."))
}

/// Creates `dir` and the ancestors it lacks, syncing the parent of each one it
/// created (a new directory is durable only once its parent is).
pub(super) fn create_dirs(dir: &Path) -> std::io::Result<()> {
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            create_dirs(parent(dir))?;
            match std::fs::create_dir(dir) {
                Ok(()) => {}
                // Created meanwhile by another writer, which syncs it too.
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    }
    sync_dir(parent(dir))
}

/// `fsync` of a directory: makes the names created or removed in it durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

pub(super) fn error(what: &'static str, key: &str, e: std::io::Error) -> CommonError {
    CommonError::Artifacts {
        what,
        path: key.into(),
        source: object_store::Error::Generic { store: "LocalFileSystem", source: Box::new(e) },
    }
}
