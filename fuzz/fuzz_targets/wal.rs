//! WAL file names and the long page header, as `wal push`, `wal fetch` and
//! the archive's listing read them: `WalFileName::parse` (of a name from
//! PostgreSQL or from a listing of the repository), then for a segment
//! `archive::check_page_header` (the first bytes and the size of the file
//! pushed). Input: the name, a newline, the file's size as 8 bytes (little
//! endian), its first bytes. A name that parses is the one way to write
//! that file; a header that checks out is of exactly the segment named.
#![no_main]
use libfuzzer_sys::fuzz_target;
use reentry::backup::archive::check_page_header;
use reentry::pg::lsn::Lsn;
use reentry::pg::wal::WalFileName;

#[global_allocator]
static ALLOC: reentry_fuzz::Capped = reentry_fuzz::Capped;

fuzz_target!(|data: &[u8]| {
    let (name, rest) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &data[..0]),
    };
    let Ok(name) = std::str::from_utf8(name) else {
        return;
    };
    let Ok(wal) = WalFileName::parse(name) else {
        return;
    };
    assert_eq!(wal.to_string(), name, "one name per file");
    let _ = wal.timeline();
    let Some(seg) = wal.segment_with_header() else {
        return;
    };
    let Some((size, first)) = rest.split_first_chunk::<8>() else {
        return;
    };
    let size = u64::from_le_bytes(*size);
    let Ok(h) = check_page_header(&seg, first, size) else {
        return;
    };
    assert_eq!(size, u64::from(h.seg_size));
    assert_eq!(
        Lsn(h.page_addr).segment(h.timeline, h.seg_size),
        seg,
        "the header at {:X} (segments of {} bytes) is not of segment {seg}",
        h.page_addr,
        h.seg_size
    );
    assert_eq!(h.page_addr % u64::from(h.seg_size), 0);
});
