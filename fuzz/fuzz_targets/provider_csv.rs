//! A provider's CSV export of the idempotency keys it saw
//! (`[idempotency.from-csv]`): `idempotency::parse_csv`, with and without
//! a time column. Every key it returns is non-empty and trimmed, and none
//! is from before T (less the straddle).
#![no_main]
use libfuzzer_sys::fuzz_target;
use reentry::reentry::steps::idempotency::{parse_csv, CsvFrom};
use reentry::reentry::steps::STRADDLE_MS;

// 2026-11-25T12:00:00Z
const T_MS: i64 = 1_795_608_000_000;

#[global_allocator]
static ALLOC: reentry_fuzz::Capped = reentry_fuzz::Capped;

fuzz_target!(|data: &[u8]| {
    for time_column in [None, Some("sent_at".to_owned())] {
        let timed = time_column.is_some();
        let c = CsvFrom {
            path: "export.csv".into(),
            key_column: "request_id".into(),
            time_column,
            pinned: None,
        };
        let Ok(rows) = parse_csv("export.csv", data, &c, T_MS) else {
            continue;
        };
        for (key, ts) in rows {
            assert!(!key.is_empty() && key.trim() == key, "{key:?}");
            assert_eq!(ts.is_some(), timed);
            if let Some(ts) = ts {
                assert!(ts >= T_MS - STRADDLE_MS, "{ts} is before T");
            }
        }
    }
});
