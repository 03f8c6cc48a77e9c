//! A playbook (TOML), as `plan`, `apply` and `playbook check` read it:
//! `Playbook::parse_offline_as` (TOML, schema, meaning), for the file's
//! own way back and for each `--way-back`; its errors rendered with their
//! places as a person sees them; what every plan says of an accepted one.
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use reentry::reentry::plan;
use reentry::reentry::playbook::{Playbook, WayBack};

#[global_allocator]
static ALLOC: reentry_fuzz::Capped = reentry_fuzz::Capped;

fuzz_target!(|data: &[u8]| {
    // Playbooks are read as UTF-8 text (`read_to_string`).
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for way in [None, Some(WayBack::Cutover), Some(WayBack::SelectiveRepair)] {
        match Playbook::parse_offline_as(Path::new("fuzz.toml"), text, way) {
            Ok((p, unset)) => {
                let _ = unset.to_string();
                let _ = unset.notes();
                let _ = p.gate_names();
                let _ = plan::notes(&p);
            }
            Err(d) => {
                let _ = d.to_string();
                for i in &d.items {
                    if let Some(s) = &i.span {
                        let _ = d.line_col(s.start);
                    }
                }
            }
        }
    }
});
