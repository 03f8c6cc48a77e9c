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
use crate::reentry::steps::{Effect, Phase};

pub const JOURNAL: &str = "journal.jsonl";

/// What a record says happened: its `event` on disk.
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RunStarted {
    pub run_id: String,
    /// `apply` or `dry-run`.
    pub mode: String,
    pub playbook: crate::reentry::plan::PlaybookRef,
    pub pid: u32,
    /// sha256 of the plan.json this run wrote: a resume walks no other.
    /// Absent in journals written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Resumed {
    pub pid: u32,
    /// Going on after `apply --until`: the same attempt, not a new one.
    #[serde(default)]
    pub after_pause: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Started {
    pub title: String,
    /// The step's inputs, for people reading the journal; a resumed run
    /// walks the plan, not this.
    pub action: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Done {
    pub effect: Effect,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Skipped {
    pub would: Effect,
    pub why: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Failed {
    pub error: String,
    #[serde(default)]
    pub findings: Vec<String>,
    #[serde(default)]
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Interrupted {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub during: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Paused {
    pub after: Phase,
    pub before: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RunFinished {
    #[serde(default)]
    pub would_fail: usize,
}

/// A record's content, one type per event. On disk it is the record's
/// `data`, as every build has written it: journals an older build started
/// read the same (see the tests).
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    RunStarted(RunStarted),
    Resumed(Resumed),
    Started(Started),
    /// The state a step's side effect is about to change, as the step's own
    /// type serializes it; read back with `Recorder::prior` into that type.
    Prior(Value),
    Done(Done),
    Skipped(Skipped),
    Failed(Failed),
    Interrupted(Interrupted),
    Paused(Paused),
    RunFinished(RunFinished),
}

impl Entry {
    pub fn event(&self) -> Event {
        match self {
            Entry::RunStarted(_) => Event::RunStarted,
            Entry::Resumed(_) => Event::Resumed,
            Entry::Started(_) => Event::Started,
            Entry::Prior(_) => Event::Prior,
            Entry::Done(_) => Event::Done,
            Entry::Skipped(_) => Event::Skipped,
            Entry::Failed(_) => Event::Failed,
            Entry::Interrupted(_) => Event::Interrupted,
            Entry::Paused(_) => Event::Paused,
            Entry::RunFinished(_) => Event::RunFinished,
        }
    }

    fn data(&self) -> Value {
        let v = match self {
            Entry::RunStarted(x) => serde_json::to_value(x),
            Entry::Resumed(x) => serde_json::to_value(x),
            Entry::Started(x) => serde_json::to_value(x),
            Entry::Prior(x) => Ok(x.clone()),
            Entry::Done(x) => serde_json::to_value(x),
            Entry::Skipped(x) => serde_json::to_value(x),
            Entry::Failed(x) => serde_json::to_value(x),
            Entry::Interrupted(x) => serde_json::to_value(x),
            Entry::Paused(x) => serde_json::to_value(x),
            Entry::RunFinished(x) => serde_json::to_value(x),
        };
        v.expect("journal entries serialize")
    }

    fn from_data(event: Event, data: Value) -> Result<Entry, serde_json::Error> {
        use serde_json::from_value as de;
        Ok(match event {
            Event::RunStarted => Entry::RunStarted(de(data)?),
            Event::Resumed => Entry::Resumed(de(data)?),
            Event::Started => Entry::Started(de(data)?),
            Event::Prior => Entry::Prior(data),
            Event::Done => Entry::Done(de(data)?),
            Event::Skipped => Entry::Skipped(de(data)?),
            Event::Failed => Entry::Failed(de(data)?),
            Event::Interrupted => Entry::Interrupted(de(data)?),
            Event::Paused => Entry::Paused(de(data)?),
            Event::RunFinished => Entry::RunFinished(if data.is_null() {
                RunFinished { would_fail: 0 }
            } else {
                de(data)?
            }),
        })
    }
}

/// One line of the journal as it is on disk.
#[derive(Serialize, Deserialize)]
struct Line {
    seq: u64,
    at: String,
    event: Event,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    step: Option<String>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    data: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub seq: u64,
    /// RFC 3339, microseconds, UTC.
    pub at: String,
    pub step: Option<String>,
    pub entry: Entry,
}

impl Serialize for Record {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Line {
            seq: self.seq,
            at: self.at.clone(),
            event: self.entry.event(),
            step: self.step.clone(),
            data: self.entry.data(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Record {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let l = Line::deserialize(d)?;
        let entry = Entry::from_data(l.event, l.data).map_err(serde::de::Error::custom)?;
        Ok(Record {
            seq: l.seq,
            at: l.at,
            step: l.step,
            entry,
        })
    }
}

impl Record {
    pub fn event(&self) -> Event {
        self.entry.event()
    }

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
        let file = fsutil::private_options()
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
    pub fn append(&mut self, step: Option<&str>, entry: Entry) -> io::Result<Record> {
        let record = Record {
            seq: self.next_seq,
            at: now(),
            step: step.map(str::to_owned),
            entry,
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
                // Only a line without its newline is torn (cut above). A
                // whole line that does not read, even the last, was written
                // so: by a newer build, or damaged afterwards. Cutting it
                // would forget a side effect it records.
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}:{}: record {} is complete but does not read ({e}); the journal cannot be trusted: was it written by a newer reentry? Resume with that build, or start a new run",
                        path.display(),
                        records.len() + 1,
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
        match &r.entry {
            Entry::Done(_) => {
                self.done.insert(step.clone(), r.clone());
            }
            Entry::Prior(v) => {
                self.prior.entry(step.clone()).or_insert_with(|| v.clone());
            }
            Entry::Started(_) => {
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
    let f = fsutil::private_options()
        .create(true)
        .truncate(false)
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

    fn started(title: &str) -> Entry {
        Entry::Started(Started {
            title: title.into(),
            action: serde_json::json!({"x": 1}),
        })
    }

    #[test]
    fn a_torn_last_line_is_cut_and_the_journal_continues() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::create(dir.path()).unwrap();
        j.append(Some("a"), started("a")).unwrap();
        j.append(
            Some("a"),
            Entry::Prior(serde_json::json!({"enabled": true})),
        )
        .unwrap();
        drop(j);
        let path = dir.path().join(JOURNAL);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":3,\"at\":\"2026").unwrap();
        drop(f);

        let (mut j, records) = Journal::resume(dir.path()).unwrap();
        assert_eq!(records.len(), 2);
        let r = j
            .append(
                Some("a"),
                Entry::Done(Done {
                    effect: Effect::said("closed"),
                    seconds: 0.1,
                }),
            )
            .unwrap();
        assert_eq!(r.seq, 3);
        let (records, _) = read_records(&path).unwrap();
        assert_eq!(records.len(), 3);
        let state = State::from_records(&records);
        assert!(state.done.contains_key("a"));
        assert_eq!(state.prior["a"]["enabled"], true);
    }

    #[test]
    fn damage_before_the_last_line_is_an_error_not_a_guess() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL);
        fs::write(
            &path,
            "{\"seq\":1,\"at\":\"x\",\"event\":\"resumed\",\"data\":{\"pid\":1}}\ngarbage\n{\"seq\":3,\"at\":\"x\",\"event\":\"run-finished\"}\n",
        )
        .unwrap();
        let e = Journal::resume(dir.path()).err().unwrap();
        assert!(
            e.to_string()
                .contains("record 2 is complete but does not read"),
            "{e}"
        );
    }

    #[test]
    fn a_complete_last_record_that_does_not_read_is_an_error_and_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::create(dir.path()).unwrap();
        j.append(Some("a"), started("a")).unwrap();
        drop(j);
        let path = dir.path().join(JOURNAL);
        // A whole record of an event this build does not know.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":2,\"at\":\"2026-11-28T18:40:01Z\",\"event\":\"from-a-newer-build\",\"step\":\"a\"}\n")
            .unwrap();
        drop(f);
        let before = fs::read(&path).unwrap();
        let e = Journal::resume(dir.path()).err().unwrap();
        assert!(
            e.to_string().contains(&format!(
                "{}:2: record 2 is complete but does not read",
                path.display()
            )),
            "{e}"
        );
        assert_eq!(fs::read(&path).unwrap(), before, "nothing was cut");
    }

    #[test]
    fn the_first_prior_wins() {
        let prior = |seq, v: &str| Record {
            seq,
            at: now(),
            step: Some("s".into()),
            entry: Entry::Prior(serde_json::json!(v)),
        };
        let records = vec![prior(1, "before"), prior(2, "after a crash")];
        assert_eq!(State::from_records(&records).prior["s"], "before");
    }

    /// A journal as the build before typed records wrote it (every event,
    /// a prior of `null` left out, no `after-pause`): this build reads it
    /// whole, and resumes from it.
    const OLDER_BUILD: &str = r#"{"seq":1,"at":"2026-11-28T18:40:01.000001Z","event":"run-started","data":{"run-id":"20261128T184001Z-77","mode":"apply","playbook":{"name":"bank","way-back":"cutover","file":"bank.toml","sha256":"ab"},"pid":77}}
{"seq":2,"at":"2026-11-28T18:40:01.100000Z","event":"started","step":"close:api-writes@restored","data":{"title":"close system-gate `api-writes` on restored","action":{"kind":"close-gate","gate":{"type":"system-gate","name":"api-writes","table":"system_gate"},"database":"restored"}}}
{"seq":3,"at":"2026-11-28T18:40:01.110000Z","event":"prior","step":"close:api-writes@restored"}
{"seq":4,"at":"2026-11-28T18:40:01.120000Z","event":"done","step":"close:api-writes@restored","data":{"effect":{"summary":"closed system-gate `api-writes` on restored: 1 row(s) changed","count":1,"items":["api-writes"],"detail":{"gate":"api-writes"}},"seconds":0.01}}
{"seq":5,"at":"2026-11-28T18:40:01.200000Z","event":"started","step":"wait:gate-cache","data":{"title":"wait","action":{"kind":"wait-gate-cache","ttl-seconds":2.0,"after":[]}}}
{"seq":6,"at":"2026-11-28T18:40:02.000000Z","event":"interrupted","step":"wait:gate-cache","data":{"during":"wait:gate-cache"}}
{"seq":7,"at":"2026-11-28T18:41:00.000000Z","event":"resumed","data":{"pid":78}}
{"seq":8,"at":"2026-11-28T18:41:00.100000Z","event":"failed","step":"invariant:x","data":{"error":"1 row","findings":["7"],"seconds":0.2}}
{"seq":9,"at":"2026-11-28T18:41:01.000000Z","event":"skipped","step":"reopen:x","data":{"would":{"summary":"re-open","count":0},"why":"dry"}}
{"seq":10,"at":"2026-11-28T18:41:02.000000Z","event":"run-finished","data":{"would-fail":0}}
"#;

    #[test]
    fn a_journal_an_older_build_started_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(JOURNAL), OLDER_BUILD).unwrap();
        let (_, records) = Journal::resume(dir.path()).unwrap();
        assert_eq!(records.len(), 10);
        let Entry::RunStarted(first) = &records[0].entry else {
            panic!("{:?}", records[0]);
        };
        assert_eq!(first.run_id, "20261128T184001Z-77");
        assert_eq!(first.mode, "apply");
        let state = State::from_records(&records);
        // The close's prior state was "no row": null, left out on disk.
        assert_eq!(state.prior["close:api-writes@restored"], Value::Null);
        assert!(state.done.contains_key("close:api-writes@restored"));
        assert!(matches!(&records[6].entry, Entry::Resumed(r) if !r.after_pause));
        // Written back, each line is what the older build wrote.
        for (line, r) in OLDER_BUILD.lines().zip(&records) {
            let again: Value = serde_json::to_value(r).unwrap();
            let old: Value = serde_json::from_str(line).unwrap();
            assert_eq!(again["event"], old["event"]);
            assert_eq!(again["step"], old["step"]);
        }
    }
}
