//! The run journal: one JSON record per line in `RUN_DIR/journal.jsonl`,
//! each fsynced before the call returns. A step's `started` record (with
//! its inputs) and its `prior` record (the state its side effect is about to
//! change) reach the disk before the side effect; `done` after it. A run
//! killed at any point leaves a journal that says exactly which steps
//! finished, and the prior state that resuming must restore to.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, Write};
use std::path::Path;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::fsutil;

pub const JOURNAL: &str = "journal.jsonl";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Event {
    RunStarted,
    Resumed,
    Started,
    Prior,
    Done,
    Skipped,
    Failed,
    Interrupted,
    /// Stopped on purpose after a phase (`apply --until`), to be resumed.
    Paused,
    RunFinished,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    /// RFC 3339, microseconds, UTC.
    pub at: String,
    pub event: Event,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub data: Value,
}

impl Record {
    pub fn time(&self) -> Option<SystemTime> {
        humantime::parse_rfc3339(&self.at).ok()
    }
}

pub fn now() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

/// An open journal, appending.
pub struct Journal {
    file: File,
    next_seq: u64,
}

impl Journal {
    /// Starts a new journal; refuses to replace one.
    pub fn create(dir: &Path) -> io::Result<Journal> {
        let path = dir.join(JOURNAL);
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        fsutil::sync_dir(dir)?;
        Ok(Journal { file, next_seq: 1 })
    }

    /// Opens an existing journal to continue it, with every record in it. A
    /// torn last line (the process died while writing it) is cut off: it was
    /// never acknowledged, so nothing that depended on it happened.
    pub fn resume(dir: &Path) -> io::Result<(Journal, Vec<Record>)> {
        let path = dir.join(JOURNAL);
        let (records, good_len) = read_records(&path)?;
        let mut file = OpenOptions::new().read(true).write(true).open(&path)?;
        if file.metadata()?.len() != good_len {
            file.set_len(good_len)?;
            file.sync_all()?;
        }
        file.seek(io::SeekFrom::End(0))?;
        let next_seq = records.last().map_or(1, |r| r.seq + 1);
        Ok((Journal { file, next_seq }, records))
    }

    /// Appends a record and waits until it is on disk.
    pub fn append(&mut self, event: Event, step: Option<&str>, data: Value) -> io::Result<Record> {
        let record = Record {
            seq: self.next_seq,
            at: now(),
            event,
            step: step.map(str::to_owned),
            data,
        };
        let mut line = serde_json::to_vec(&record).expect("records serialize");
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.file.sync_data()?;
        self.next_seq += 1;
        Ok(record)
    }
}

/// Every whole record, and the length of the file they fill.
pub fn read_records(path: &Path) -> io::Result<(Vec<Record>, u64)> {
    let mut reader = BufReader::new(File::open(path)?);
    let mut records = Vec::new();
    let mut good = 0u64;
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n == 0 {
            break;
        }
        if !line.ends_with('\n') {
            break; // torn write
        }
        match serde_json::from_str::<Record>(line.trim_end()) {
            Ok(r) => {
                records.push(r);
                good += n as u64;
            }
            Err(e) => {
                // Only the last line can be torn; damage before it is not ours to guess at.
                let rest = reader.fill_buf()?.is_empty();
                if rest {
                    break;
                }
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: record {} is damaged ({e}); the journal cannot be trusted",
                        path.display(),
                        records.len() + 1
                    ),
                ));
            }
        }
    }
    Ok((records, good))
}

/// What the journal says about each step.
#[derive(Debug, Default)]
pub struct State {
    pub done: BTreeMap<String, Record>,
    /// The first prior state recorded for each step: on a resume, the state
    /// before the run touched anything, not the state the crash left.
    pub prior: BTreeMap<String, Value>,
    pub started: BTreeMap<String, Record>,
}

impl State {
    pub fn from_records(records: &[Record]) -> State {
        let mut s = State::default();
        for r in records {
            s.record(r);
        }
        s
    }

    pub fn record(&mut self, r: &Record) {
        let Some(step) = &r.step else { return };
        match r.event {
            Event::Done => {
                self.done.insert(step.clone(), r.clone());
            }
            Event::Prior => {
                self.prior
                    .entry(step.clone())
                    .or_insert_with(|| r.data.clone());
            }
            Event::Started => {
                self.started
                    .entry(step.clone())
                    .or_insert_with(|| r.clone());
            }
            _ => {}
        }
    }
}

/// Takes the run directory's lock: two applies on one run would interleave
/// their side effects. Held until the returned file is dropped.
pub fn lock(dir: &Path) -> io::Result<Option<File>> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))?;
    match f.try_lock() {
        Ok(()) => Ok(Some(f)),
        Err(fs::TryLockError::WouldBlock) => Ok(None),
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_last_line_is_cut_and_the_journal_continues() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::create(dir.path()).unwrap();
        j.append(Event::RunStarted, None, Value::Null).unwrap();
        j.append(Event::Started, Some("a"), serde_json::json!({"x": 1}))
            .unwrap();
        drop(j);
        let path = dir.path().join(JOURNAL);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":3,\"at\":\"2026").unwrap();
        drop(f);

        let (mut j, records) = Journal::resume(dir.path()).unwrap();
        assert_eq!(records.len(), 2);
        let r = j.append(Event::Done, Some("a"), Value::Null).unwrap();
        assert_eq!(r.seq, 3);
        let (records, _) = read_records(&path).unwrap();
        assert_eq!(records.len(), 3);
        let state = State::from_records(&records);
        assert!(state.done.contains_key("a"));
    }

    #[test]
    fn damage_before_the_last_line_is_an_error_not_a_guess() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL);
        fs::write(
            &path,
            "{\"seq\":1,\"at\":\"x\",\"event\":\"run-started\"}\ngarbage\n{\"seq\":3,\"at\":\"x\",\"event\":\"run-finished\"}\n",
        )
        .unwrap();
        let e = Journal::resume(dir.path()).err().unwrap();
        assert!(e.to_string().contains("record 2 is damaged"), "{e}");
    }

    #[test]
    fn the_first_prior_wins() {
        let records = vec![
            Record {
                seq: 1,
                at: now(),
                event: Event::Prior,
                step: Some("s".into()),
                data: serde_json::json!("before"),
            },
            Record {
                seq: 2,
                at: now(),
                event: Event::Prior,
                step: Some("s".into()),
                data: serde_json::json!("after a crash"),
            },
        ];
        assert_eq!(State::from_records(&records).prior["s"], "before");
    }
}
