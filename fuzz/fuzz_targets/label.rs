//! A backup label (`backup/<id>/backup.json`), as `Repo::label` and
//! `Repo::survey` judge one that anyone who can write into the repository
//! may have planted: `label::parse` (the JSON, its id against its key,
//! the id's shape and letter, the parent) and `label::vet` (the cluster,
//! the dates). Input: the key, a newline, the label's bytes. A label that
//! checks out is what it says it is, and what reentry then does with it
//! (the WAL it needs) neither panics nor runs away with memory.
#![no_main]
use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use reentry::backup::label::{self, is_backup_id, BackupType};

#[global_allocator]
static ALLOC: reentry_fuzz::Capped = reentry_fuzz::Capped;

fuzz_target!(|data: &[u8]| {
    let (key, text) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&data[..0], data),
    };
    let key = String::from_utf8_lossy(key);
    let Ok(l) = label::parse(&key, text) else {
        return;
    };
    assert_eq!(l.id, key, "an accepted label's id is its key");
    assert!(is_backup_id(&l.id));
    let letter = if l.kind == BackupType::Full { 'F' } else { 'I' };
    assert!(l.id.ends_with(letter));
    assert!(l.parent.as_deref().is_none_or(is_backup_id));
    // 2027-01-01T00:00:00Z
    let now = UNIX_EPOCH + Duration::from_secs(1_798_761_600);
    assert!(
        label::vet(&l, Some("7000000000000000001"), now).is_err()
            || l.system_identifier == "7000000000000000001"
    );
    if label::vet(&l, Some(&l.system_identifier.clone()), now).is_err() {
        return;
    }
    let start = humantime::parse_rfc3339(&l.start_time).expect("vetted");
    assert!(start <= now + reentry::backup::repo::CLOCK_SKEW);
    // What status, verify and restore do with a label that checks out.
    let _ = l.sort_key();
    let _ = l.required_segments();
});
