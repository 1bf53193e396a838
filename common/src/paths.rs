//! Confining user-given paths (datasets, artifacts) to a root directory.

use std::path::{Component, Path, PathBuf};

/// Why a path was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    /// Absolute paths are not allowed.
    #[error("path {0:?} is absolute; give a path relative to the data root")]
    Absolute(String),
    /// `..` or other escaping components.
    #[error("path {0:?} leaves its root (`..` is not allowed)")]
    Escapes(String),
    /// Empty.
    #[error("path is empty")]
    Empty,
    /// Resolves (through a symlink) outside the root.
    #[error("path {0:?} resolves outside its root")]
    SymlinkEscape(String),
}

/// Resolves `rel` (a relative path, or a `file:` URI without host) under `root`.
///
/// Refuses absolute paths, `..`, and anything that, once symlinks are
/// followed, lies outside `root`. The target need not exist.
pub fn resolve_under(root: &Path, rel: &str) -> Result<PathBuf, PathError> {
    let rel = rel.strip_prefix("file:").map(|r| r.trim_start_matches("//")).unwrap_or(rel);
    if rel.is_empty() {
        return Err(PathError::Empty);
    }
    let p = Path::new(rel);
    if p.is_absolute() || rel.starts_with('\\') || rel.contains(':') {
        return Err(PathError::Absolute(rel.into()));
    }
    for c in p.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            _ => return Err(PathError::Escapes(rel.into())),
        }
    }
    let joined = root.join(p);
    let Ok(real_root) = root.canonicalize() else { return Ok(joined) };
    // Follow the symlinks of the deepest part that exists (the target need not)
    // and check it stays inside: `link/new.json` with `link -> /etc` is refused too.
    let mut probe = joined.clone();
    loop {
        match probe.canonicalize() {
            Ok(real) if real.starts_with(&real_root) => break,
            Ok(_) => return Err(PathError::SymlinkEscape(rel.into())),
            // A dangling symlink: whatever creates its target writes outside the root.
            Err(_) if probe.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink()) => {
                return Err(PathError::SymlinkEscape(rel.into()));
            }
            Err(_) => {
                if !probe.pop() || !probe.starts_with(root) {
                    break;
                }
            }
        }
    }
    Ok(joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("ok.json"), "{}").unwrap();
        assert_eq!(resolve_under(root, "ok.json").unwrap(), root.join("ok.json"));
        assert_eq!(resolve_under(root, "file:ok.json").unwrap(), root.join("ok.json"));
        assert!(matches!(resolve_under(root, "/etc/passwd"), Err(PathError::Absolute(_))));
        assert!(matches!(resolve_under(root, "file:///etc/passwd"), Err(PathError::Absolute(_))));
        assert!(matches!(resolve_under(root, "a/../../x"), Err(PathError::Escapes(_))));
        assert!(matches!(resolve_under(root, ""), Err(PathError::Empty)));
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink("/etc", root.join("etc")).unwrap();
            assert!(matches!(resolve_under(root, "etc/passwd"), Err(PathError::SymlinkEscape(_))));
            // Through a symlink to a file that does not exist yet, and a dangling symlink.
            assert!(matches!(resolve_under(root, "etc/no-such-file"), Err(PathError::SymlinkEscape(_))));
            std::os::unix::fs::symlink("/nonexistent-trainyard/x", root.join("dangling")).unwrap();
            assert!(matches!(resolve_under(root, "dangling"), Err(PathError::SymlinkEscape(_))));
            assert_eq!(resolve_under(root, "new/file.json").unwrap(), root.join("new/file.json"));
        }
    }
}
