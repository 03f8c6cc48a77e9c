//! The index of a packed backup (`backup/<id>/files.json`), as a restore
//! reads it from a repository that anyone who can write there may have
//! planted: `packed::parse_index`, then `Index::check_layout`. An index
//! that checks out never names a place outside the target, holds no link
//! (nothing can be written through one), and every part lies in its piece.
#![no_main]
use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use reentry::backup::packed::{self, Entry, PIECE};

/// `p` with `.` and `..` resolved, none when `..` climbs above the root.
fn resolve(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            c => out.push(c),
        }
    }
    Some(out)
}

#[global_allocator]
static ALLOC: reentry_fuzz::Capped = reentry_fuzz::Capped;

fuzz_target!(|data: &[u8]| {
    let Ok(index) = packed::parse_index("fuzz/files.json", data) else {
        return;
    };
    if index.check_layout().is_err() {
        return;
    }
    let to = Path::new("/var/lib/restore/target");
    let mut seen = HashSet::new();
    for e in &index.entries {
        let path = e.path();
        assert!(seen.insert(path), "{path:?} twice");
        let at = resolve(&to.join(path)).expect("inside");
        assert!(
            at.starts_with(to) && at != to,
            "{path:?} is outside the target"
        );
        match e {
            Entry::Link { target, .. } => panic!("link {path:?} -> {target:?} checks out"),
            Entry::File { size, parts, .. } => {
                let mut sum = 0u64;
                for part in parts {
                    let piece = &index.pieces[part.piece];
                    assert!(piece.raw_len <= PIECE);
                    // What materialise slices out of the piece's content.
                    let end = part.offset.checked_add(part.len).expect("no overflow");
                    assert!(end <= piece.raw_len);
                    sum += part.len;
                }
                assert_eq!(sum, *size);
            }
            Entry::Dir { .. } => {}
        }
    }
    let _ = (index.bytes(), index.stored_bytes());
});
