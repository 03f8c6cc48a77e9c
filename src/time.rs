//! Points in time, as people and PostgreSQL write them. One type
//! (`jiff::Timestamp`) and one parser for every time reentry reads: CLI
//! targets, playbooks, provider CSV exports. It takes what PostgreSQL takes
//! for `recovery_target_time`: a `T` or a space between date and time,
//! fractional seconds, and an offset written `Z`, `±HH`, `±HHMM` or
//! `±HH:MM`. A time without an offset is refused: PostgreSQL would read it
//! in the server's `TimeZone`, which the person typing it may not know.
//! Times are printed in UTC.

use std::time::SystemTime;

pub use jiff::Timestamp;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    #[error("\"{0}\" has no UTC offset: add one, like 2026-07-01 14:36:00+00 or 2026-07-01T14:36:00Z (without it PostgreSQL reads the server's TimeZone)")]
    NoOffset(String),
    #[error("\"{value}\" is not a time ({why}); write it like 2026-07-01 14:36:00+00, 2026-07-01T14:36:00.5+07:00 or 2026-07-01T14:36:00Z")]
    Invalid { value: String, why: String },
}

/// Parses a time with its offset, in any of PostgreSQL's forms.
pub fn parse(text: &str) -> Result<Timestamp, TimeError> {
    let s = text.trim();
    let invalid = |why: String| TimeError::Invalid {
        value: s.to_owned(),
        why,
    };
    let normal = normalize(s);
    match normal.parse::<Timestamp>() {
        Ok(t) => Ok(t),
        Err(e) => {
            if normal.parse::<jiff::civil::DateTime>().is_ok() {
                Err(TimeError::NoOffset(s.to_owned()))
            } else {
                Err(invalid(e.to_string()))
            }
        }
    }
}

/// `2026-07-01 14:36:00+0700` → `2026-07-01T14:36:00+07:00`: the forms
/// PostgreSQL takes, in the one jiff parses.
fn normalize(s: &str) -> String {
    let mut out = s.to_owned();
    // A space between the date and the time.
    if out.len() > 10 && out.as_bytes()[10] == b' ' {
        out.replace_range(10..11, "T");
    }
    // A lower-case z.
    if out.ends_with('z') {
        out.pop();
        out.push('Z');
    }
    // An offset of four digits with no colon: ±HHMM.
    // Bytes, not a slice of the text: the last five may cut a character.
    let b = out.as_bytes();
    let offset = b.len() > 16 && {
        let tail = &b[b.len() - 5..];
        matches!(tail[0], b'+' | b'-') && tail[1..].iter().all(u8::is_ascii_digit)
    };
    if offset {
        let at = out.len() - 2;
        out.insert(at, ':');
    }
    out
}

/// A time that a PostgreSQL tool printed in UTC without an offset
/// (`pg_waldump` under `TZ=UTC`).
pub fn parse_utc(text: &str) -> Result<Timestamp, TimeError> {
    parse(&format!("{}Z", text.trim()))
}

pub fn to_system(t: Timestamp) -> SystemTime {
    SystemTime::from(t)
}

pub fn from_system(t: SystemTime) -> Timestamp {
    Timestamp::try_from(t).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// Milliseconds since the epoch.
pub fn millis(t: Timestamp) -> i64 {
    t.as_millisecond()
}

/// RFC 3339 in UTC with milliseconds, as reentry prints times.
pub fn utc_millis(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// `2026-11-25 13:23:44.123456+00`: the form `recovery_target_time` and
/// every PostgreSQL version take.
pub fn postgres(t: Timestamp) -> String {
    t.strftime("%Y-%m-%d %H:%M:%S%.6f+00").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_character_of_several_bytes_near_the_end_is_an_error_not_a_panic() {
        // Seen writing the fuzz target `provider_csv` (a provider's times):
        // the check for a `+HHMM` offset sliced the last five bytes,
        // cutting a character in two.
        for s in [
            "2026-11-25T12:00:00\u{1F600}12",
            "2026-11-25T12:00:00\u{e9}\u{e9}\u{e9}",
            "2026-11-25 12:00:00\u{e9}\u{e9}\u{e9}",
        ] {
            assert!(parse(s).is_err(), "{s:?}");
            assert!(parse_utc(s).is_err(), "{s:?}");
        }
    }

    fn utc(s: &str) -> String {
        utc_millis(parse(s).unwrap_or_else(|e| panic!("{s}: {e}")))
    }

    #[test]
    fn postgres_forms_of_one_instant_agree() {
        let want = "2026-07-01T14:36:00.000Z";
        for s in [
            "2026-07-01 14:36:00+00",
            "2026-07-01T14:36:00+00",
            "2026-07-01 14:36:00Z",
            "2026-07-01T14:36:00z",
            "2026-07-01T14:36:00+00:00",
            "2026-07-01 14:36:00+0000",
            "2026-07-01T21:36:00+07:00",
            "2026-07-01 21:36:00+07",
            "2026-07-01 21:36:00+0700",
            "2026-07-01T09:06:00-05:30",
            "2026-07-01 09:06:00-0530",
            "  2026-07-01T14:36:00Z ",
            "2026-07-01T14:36Z",
        ] {
            assert_eq!(utc(s), want, "{s}");
        }
    }

    #[test]
    fn fractional_seconds_are_kept() {
        assert_eq!(utc("2026-07-01 14:36:00.5+00"), "2026-07-01T14:36:00.500Z");
        let t = parse("2026-07-01T14:36:00.123456+00:00").unwrap();
        assert_eq!(postgres(t), "2026-07-01 14:36:00.123456+00");
        assert_eq!(millis(t), 1_782_916_560_123);
    }

    #[test]
    fn a_time_without_an_offset_or_malformed_is_refused_and_says_how_to_write_it() {
        let e = parse("2026-07-01 14:36:00").unwrap_err();
        assert!(matches!(e, TimeError::NoOffset(_)), "{e}");
        assert!(e.to_string().contains("add one"), "{e}");
        for bad in [
            "2026-13-01T00:00:00Z",
            "yesterday",
            "2026-07-01T25:00:00Z",
            "",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(matches!(e, TimeError::Invalid { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("write it like"), "{e}");
        }
    }

    #[test]
    fn utc_output_of_a_tool_is_read_as_utc() {
        assert_eq!(
            utc_millis(parse_utc("2026-11-25 13:23:44.123456").unwrap()),
            "2026-11-25T13:23:44.123Z"
        );
    }
}
