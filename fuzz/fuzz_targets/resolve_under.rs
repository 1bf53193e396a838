//! Fuzzes path confinement (dataset and artifact paths given in job params):
//! whatever string a job carries, an accepted path is the root joined with a
//! relative path of plain components — never absolute, never `..`.
#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use trainyard_common::paths::resolve_under;

fuzz_target!(|data: &[u8]| {
    let Ok(rel) = std::str::from_utf8(data) else { return };
    // A root that does not exist: no symlinks to follow, only the lexical rules.
    let root = Path::new("/nonexistent-trainyard-fuzz-root");
    if let Ok(p) = resolve_under(root, rel) {
        let inside = p.strip_prefix(root).expect("an accepted path lies under the root");
        assert!(inside.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)), "accepted {rel:?} as {}", p.display());
    }
});
