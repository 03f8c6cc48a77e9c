//! `reentry kafka …` against Apache Kafka 4, with Kafka's own Java clients
//! on the other side: the console producer and consumer write and consume,
//! and `kafka-consumer-groups` and `GetOffsetShell` are the record of what
//! the broker holds. Nothing here trusts reentry's word for an effect.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{PipeReader, Read, Write};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::services::{create_topic, kafka_bootstrap, kafka_tool, topic};
use crate::common::{assert_exit, reentry_bin, run_reentry, stderr, stdout, unique, write_secret};
use crate::kafka_tls::scram;
use crate::reconcile::{now_ms, ts as rfc3339};

/// Keyed records through Kafka's Java console producer, compressed with
/// `codec`, as one batch per partition.
fn produce_java(topic: &str, records: &[(String, String)], codec: &str) {
    let mut child = kafka_tool("org.apache.kafka.tools.ConsoleProducer")
        .args(["--bootstrap-server", &kafka_bootstrap(), "--topic", topic])
        .args(["--compression-codec", codec])
        .args(["--reader-property", "parse.key=true"])
        .args(["--reader-property", "key.separator=|"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the console producer");
    let mut stdin = child.stdin.take().unwrap();
    for (k, v) in records {
        writeln!(stdin, "{k}|{v}").unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "console producer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn records(prefix: &str, n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| (format!("{prefix}-key-{i}"), format!("{{\"n\":{i}}}")))
        .collect()
}

/// Kafka's own `GetOffsetShell`: per partition, the offset at `time`
/// (`-1` latest, `-2` earliest, else ms since the epoch).
pub(crate) fn offset_shell(topic: &str, time: i64) -> BTreeMap<i32, i64> {
    let out = kafka_tool("org.apache.kafka.tools.GetOffsetShell")
        .args(["--bootstrap-server", &kafka_bootstrap()])
        .args(["--topic", topic, "--time", &time.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.rsplitn(3, ':');
            let offset = f.next()?.parse().ok()?;
            let partition = f.next()?.parse().ok()?;
            Some((partition, offset))
        })
        .collect()
}

/// One row of `kafka-consumer-groups --describe`, per partition.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GroupRow {
    pub(crate) current: Option<i64>,
    pub(crate) end: i64,
    consumer: String,
}

/// Kafka's own `kafka-consumer-groups --describe --group G`.
pub(crate) fn group_tool(group: &str) -> (String, BTreeMap<i32, GroupRow>) {
    let out = kafka_tool("org.apache.kafka.tools.consumer.group.ConsumerGroupCommand")
        .args(["--bootstrap-server", &kafka_bootstrap()])
        .args(["--describe", "--group", group])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rows = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 7 || f[0] != group {
                return None;
            }
            let row = GroupRow {
                current: f[3].parse().ok(),
                end: f[4].parse().ok()?,
                consumer: f[6].to_owned(),
            };
            Some((f[2].parse().ok()?, row))
        })
        .collect();
    (text, rows)
}

/// A live member of a group: Kafka's Java console consumer, on the given
/// group protocol. Stopped (SIGTERM: it leaves the group as a service
/// shutting down does) when dropped.
struct JavaConsumer(Child);

impl JavaConsumer {
    fn start(topic: &str, group: &str, protocol: &str) -> JavaConsumer {
        let child = kafka_tool("org.apache.kafka.tools.consumer.ConsoleConsumer")
            .args(["--bootstrap-server", &kafka_bootstrap(), "--topic", topic])
            .args(["--group", group, "--from-beginning"])
            .args(["--command-property", &format!("group.protocol={protocol}")])
            .args(["--command-property", "auto.commit.interval.ms=200"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run the console consumer");
        JavaConsumer(child)
    }

    fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.0.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for JavaConsumer {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            self.terminate();
        }
    }
}

fn wait_for(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s: {what}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `reentry kafka ARGS… --bootstrap BROKER`.
fn kafka(args: &[&str]) -> std::process::Output {
    let bootstrap = kafka_bootstrap();
    let mut all: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"kafka"];
    all.extend(args.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
    all.extend([&"--bootstrap" as &dyn AsRef<std::ffi::OsStr>, &bootstrap]);
    run_reentry(&all)
}

/// `reentry kafka ARGS… --json`: its exit code and what it printed.
fn json(args: &[&str]) -> (i32, serde_json::Value) {
    let mut args = args.to_vec();
    args.push("--json");
    let out = kafka(&args);
    let code = out.status.code().unwrap_or(-1);
    let v = serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| {
        panic!(
            "exit {code}, not JSON ({e}): {}{}",
            stdout(&out),
            stderr(&out)
        )
    });
    (code, v)
}

/// One group on one protocol: seen live while its Java member runs, a
/// rewind refused then and applied once it has stopped, the offsets read
/// back with Kafka's own tool.
fn a_group_is_seen_live_refused_and_rewound_once_stopped(protocol: &str) {
    let topic = topic(&format!("groups-{protocol}"));
    let group = unique(&format!("group-{protocol}"));
    create_topic(&topic, 3);
    produce_java(&topic, &records("before", 30), "none");
    std::thread::sleep(Duration::from_millis(1500));
    let t = now_ms();
    std::thread::sleep(Duration::from_millis(1500));
    produce_java(&topic, &records("after", 21), "none");
    let at_t = offset_shell(&topic, t);
    let ends = offset_shell(&topic, -1);
    assert_eq!(ends.values().sum::<i64>(), 51);
    assert_eq!(ends.values().sum::<i64>() - at_t.values().sum::<i64>(), 21);

    let member = JavaConsumer::start(&topic, &group, protocol);
    // Live and caught up, in Kafka's own words.
    wait_for("the Java consumer to join and commit the ends", 60, || {
        let (_, rows) = group_tool(&group);
        rows.len() == 3
            && rows
                .iter()
                .all(|(p, r)| r.current == Some(ends[p]) && r.consumer != "-")
    });

    let (code, g) = json(&["group", &group, "--topic", &topic]);
    assert_eq!(code, 0, "{g}");
    let members = g["members"].as_array().unwrap();
    assert_eq!(members.len(), 1, "a live {protocol} member is seen: {g:#}");
    assert_eq!(members[0]["client-id"], "console-consumer", "{g:#}");
    let (text, rows) = group_tool(&group);
    assert_eq!(members[0]["id"], rows[&0].consumer.as_str(), "{text}");

    // The dry run names the member and says an apply would be refused.
    let to = rfc3339(t);
    let (code, dry) = json(&["rewind", &group, "--topic", &topic, "--to", &to]);
    assert_eq!(code, 1, "{dry:#}");
    assert_eq!(dry["live-members"].as_array().unwrap().len(), 1, "{dry:#}");
    assert_eq!(dry["messages-again"], 21, "{dry:#}");

    let refused = kafka(&["rewind", &group, "--topic", &topic, "--to", &to, "--apply"]);
    assert_exit(&refused, 3);
    assert!(
        stderr(&refused).contains("live member"),
        "{}",
        stderr(&refused)
    );
    let (text, rows) = group_tool(&group);
    for (p, r) in &rows {
        assert_eq!(
            r.current,
            Some(ends[p]),
            "a refused rewind moved nothing:\n{text}"
        );
    }

    member.stop();
    wait_for("the group to have no member", 30, || {
        let (code, g) = json(&["group", &group, "--topic", &topic]);
        code == 0 && g["members"].as_array().unwrap().is_empty()
    });
    let run = std::env::temp_dir().join(unique("rewind-run"));
    let run = run.to_str().unwrap();
    let applied = kafka(&[
        "rewind",
        &group,
        "--topic",
        &topic,
        "--to",
        &to,
        "--apply",
        "--run-dir",
        run,
    ]);
    assert_exit(&applied, 0);
    let _ = std::fs::remove_dir_all(run);
    let (text, rows) = group_tool(&group);
    assert_eq!(rows.len(), 3, "{text}");
    for (p, r) in &rows {
        assert_eq!(
            r.current,
            Some(at_t[p]),
            "partition {p} rewound to T:\n{text}"
        );
        assert_eq!(r.end, ends[p], "{text}");
    }
}

/// Kafka's own `kafka-consumer-groups --describe`: committed offset per
/// topic and partition.
fn committed_by_tool(group: &str) -> (String, Committed) {
    let (text, _) = group_tool(group);
    let rows = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 7 || f[0] != group {
                return None;
            }
            Some(((f[1].to_owned(), f[2].parse().ok()?), f[3].parse().ok()))
        })
        .collect();
    (text, rows)
}

/// Committed offsets per topic and partition, as Kafka's tool shows them.
type Committed = BTreeMap<(String, i32), Option<i64>>;

/// Two topics of two partitions, each with 10 records before T and 7
/// after, and a group whose offsets Kafka's own tool committed at their
/// ends: its topics, group, T, the group's offsets (`before`) and each
/// partition's offset at T (`at_t`), both in Kafka's own record.
struct TwoTopics {
    a: String,
    b: String,
    group: String,
    t: i64,
    before: Committed,
    at_t: Committed,
}

fn two_topics_committed_at_their_ends(name: &str) -> TwoTopics {
    let (a, b) = (topic(&format!("{name}-a")), topic(&format!("{name}-b")));
    let group = unique(name);
    for t in [&a, &b] {
        create_topic(t, 2);
        produce_java(t, &records("before", 10), "none");
    }
    std::thread::sleep(Duration::from_millis(1500));
    let t = now_ms();
    std::thread::sleep(Duration::from_millis(1500));
    for t in [&a, &b] {
        produce_java(t, &records("after", 7), "none");
    }
    // The group stands at the ends, committed by Kafka's own tool.
    let reset = kafka_tool("org.apache.kafka.tools.consumer.group.ConsumerGroupCommand")
        .args(["--bootstrap-server", &kafka_bootstrap(), "--group", &group])
        .args(["--reset-offsets", "--to-latest", "--execute"])
        .args(["--topic", &a, "--topic", &b])
        .output()
        .unwrap();
    assert!(
        reset.status.success(),
        "{}",
        String::from_utf8_lossy(&reset.stderr)
    );
    let (text, before) = committed_by_tool(&group);
    assert_eq!(before.len(), 4, "{text}");
    let mut at_t = BTreeMap::new();
    for tp in [&a, &b] {
        for (p, o) in offset_shell(tp, t) {
            at_t.insert((tp.clone(), p), Some(o));
        }
    }
    // Every partition moves: none has its offset at T at its end.
    for (k, o) in &at_t {
        assert_ne!(before[k], *o, "{k:?} moves:\n{text}");
    }
    TwoTopics {
        a,
        b,
        group,
        t,
        before,
        at_t,
    }
}

#[test]
fn a_rewind_records_its_moves_before_committing_and_its_printed_undo_puts_them_back() {
    let TwoTopics {
        a,
        b,
        group,
        t,
        before,
        at_t,
    } = two_topics_committed_at_their_ends("rewind-rec");

    let run = std::env::temp_dir().join(unique("rewind-rec-run"));
    let run_s = run.to_str().unwrap().to_owned();
    let to = rfc3339(t);
    let args = [
        "rewind",
        &group,
        "--topic",
        &a,
        "--topic",
        &b,
        "--to",
        &to,
        "--apply",
        "--run-dir",
        &run_s,
    ];
    let applied = kafka(&args);
    assert_exit(&applied, 0);
    let (text, now) = committed_by_tool(&group);
    assert_eq!(now, at_t, "rewound to T:\n{text}");

    // The record holds every old offset, written before the commit.
    let journal = std::fs::read_to_string(run.join("kafka-rewind.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = journal
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{journal}");
    assert_eq!(lines[0]["state"], "moving", "{journal}");
    assert_eq!(lines[1]["state"], "moved", "{journal}");
    for ((tp, p), old) in &before {
        assert_eq!(
            lines[0]["moves"][tp][p.to_string()][0].as_i64(),
            *old,
            "{journal}"
        );
    }

    // Again: nothing to move, nothing recorded, nothing committed.
    let again = kafka(&args);
    assert_exit(&again, 0);
    assert!(
        stdout(&again).contains("nothing to move"),
        "{}",
        stdout(&again)
    );
    assert_eq!(
        std::fs::read_to_string(run.join("kafka-rewind.jsonl")).unwrap(),
        journal
    );
    assert_eq!(committed_by_tool(&group).1, at_t);

    // The printed undo, run with Kafka's own tool, puts the old offsets back.
    let err = stderr(&applied);
    let undo = err
        .lines()
        .find_map(|l| {
            l.split_once("kafka-consumer-groups.sh ")
                .map(|(_, r)| r.to_owned())
        })
        .unwrap_or_else(|| panic!("no undo command printed:\n{err}"));
    assert_eq!(
        lines[0]["undo-command"].as_str().unwrap(),
        format!("kafka-consumer-groups.sh {undo}")
    );
    let out = kafka_tool("org.apache.kafka.tools.consumer.group.ConsumerGroupCommand")
        .args(undo.split_whitespace())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (text, undone) = committed_by_tool(&group);
    assert_eq!(undone, before, "the undo put the old offsets back:\n{text}");
    let _ = std::fs::remove_dir_all(&run);
}

/// Kafka's own `kafka-acls` (`AclCommand`) over the PLAINTEXT listener,
/// whose User:ANONYMOUS is a super user (servers/kafka/start).
fn acl_tool(args: &[&str]) -> std::io::Result<Output> {
    kafka_tool("org.apache.kafka.tools.AclCommand")
        .args(["--bootstrap-server", &kafka_bootstrap()])
        .args(args)
        .output()
}

/// The ACLs a test puts on a topic of its own, all removed when dropped
/// (when the test fails too), so that the broker's other tests meet none:
/// a resource without ACLs is open to everyone (servers/kafka/start).
struct TopicAcls(String);

impl TopicAcls {
    /// Denies `principal` the `operation` on `topic`, and waits until the
    /// broker's authorizer holds it: an ACL reaches it through the metadata
    /// log, after `kafka-acls --add` has returned.
    fn deny(topic: &str, principal: &str, operation: &str) -> TopicAcls {
        let acls = TopicAcls(topic.to_owned());
        let out = acl_tool(&[
            "--add",
            "--topic",
            topic,
            "--deny-principal",
            principal,
            "--operation",
            operation,
        ])
        .unwrap();
        assert!(
            out.status.success(),
            "kafka-acls --add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let held = format!(
            "principal={principal}, host=*, operation={}, permissionType=DENY",
            operation.to_uppercase()
        );
        wait_for("the broker's authorizer to hold the ACL", 30, || {
            acls.list().is_some_and(|l| l.contains(&held))
        });
        acls
    }

    /// What the broker's authorizer holds for the topic.
    fn list(&self) -> Option<String> {
        let out = acl_tool(&["--list", "--topic", &self.0]).ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for TopicAcls {
    fn drop(&mut self) {
        let removed = acl_tool(&["--remove", "--force", "--topic", &self.0])
            .is_ok_and(|o| o.status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut gone = false;
        while removed && !gone && Instant::now() < deadline {
            gone = self.list().is_some_and(|l| !l.contains("principal="));
            if !gone {
                std::thread::sleep(Duration::from_millis(300));
            }
        }
        if !gone {
            let msg = format!(
                "the ACLs on topic {t} are still there: kafka-acls --remove --force --topic {t}",
                t = self.0
            );
            if std::thread::panicking() {
                eprintln!("{msg}");
            } else {
                panic!("{msg}");
            }
        }
    }
}

/// Starts `cmd` with a full pipe for its stderr: its first write there
/// blocks until the returned reader is read past the filler (the `usize`
/// bytes). `kafka rewind --apply` first writes to stderr when it prints
/// the moves it has just recorded, before it commits them, so this holds
/// it between its record and its commit, for as long as the test needs.
fn spawn_held_at_first_stderr_write(mut cmd: Command) -> (Child, PipeReader, usize) {
    let (reader, mut writer) = std::io::pipe().unwrap();
    // SAFETY: F_GETPIPE_SZ reads the capacity of a pipe this process owns.
    let size = unsafe { libc::fcntl(writer.as_raw_fd(), libc::F_GETPIPE_SZ) };
    let filler = usize::try_from(size)
        .unwrap_or_else(|_| panic!("F_GETPIPE_SZ: {}", std::io::Error::last_os_error()));
    // Exactly the capacity: this write fits, and the child's first blocks.
    writer.write_all(&vec![b'.'; filler]).unwrap();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(writer)
        .spawn()
        .expect("run reentry");
    // `cmd` goes here, and with it this process's copy of the write end:
    // the reader sees the end of the child's stderr when the child exits.
    (child, reader, filler)
}

/// Lets a held child go on (reading its stderr) and waits for it, killed
/// after 60 s: its exit and what it printed, less the filler.
fn release(mut child: Child, mut reader: PipeReader, filler: usize) -> Output {
    let drain = std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = reader.read_to_end(&mut all);
        all
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = child.wait().unwrap();
    let mut stdout = Vec::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut stdout)
        .unwrap();
    let all = drain.join().unwrap();
    Output {
        status,
        stdout,
        stderr: all.get(filler..).unwrap_or_default().to_vec(),
    }
}

/// The finding (M10): a rewind whose commit fails on one topic must not
/// lose the old offsets. The broker itself refuses: reentry, over SASL_SSL
/// as the SCRAM user, is held between its record and its commit (an ACL
/// on b from the start would stop it at planning, as it reads b's records
/// to count those consumed again), and Kafka's own authorizer is then told
/// to deny that user READ on b, which an OffsetCommit needs. Effects are
/// counted in Kafka's own record (`kafka-consumer-groups`).
#[test]
fn a_rewind_whose_commit_is_refused_on_one_topic_leaves_the_undo_on_disk_and_fails() {
    let TwoTopics {
        a,
        b,
        group,
        t,
        before,
        at_t,
    } = two_topics_committed_at_their_ends("rewind-refused");
    let s = scram();
    let run = std::env::temp_dir().join(unique("rewind-refused-run"));
    let run_s = run.to_str().unwrap().to_owned();
    let to = rfc3339(t);
    let mut cmd = Command::new(reentry_bin());
    cmd.args(["kafka", "rewind", &group, "--topic", &a, "--topic", &b])
        .args(["--to", &to, "--apply", "--run-dir", &run_s])
        .args([
            "--bootstrap",
            &s.bootstrap,
            "--security-protocol",
            "SASL_SSL",
        ])
        .args([
            "--sasl-mechanism",
            "SCRAM-SHA-512",
            "--sasl-username",
            &s.user,
        ])
        .args(["--ssl-ca", &s.ca])
        .env("REENTRY_KAFKA_SASL_PASSWORD", &s.password);
    let (mut child, reader, filler) = spawn_held_at_first_stderr_write(cmd);

    // Held once its journal has a line: the moves are on disk, and the
    // broker has committed none of them.
    let journal = run.join("kafka-rewind.jsonl");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&journal).is_ok_and(|j| j.ends_with('\n')) {
        if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
            let _ = child.kill();
            let out = release(child, reader, filler);
            panic!(
                "reentry recorded no move in {} ({}):\n{}{}",
                journal.display(),
                out.status,
                stderr(&out),
                stdout(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (text, now) = committed_by_tool(&group);
    assert_eq!(
        now, before,
        "the moves were on disk before anything was committed:\n{text}"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "reentry is held before its commit"
    );

    let acls = TopicAcls::deny(&b, &format!("User:{}", s.user), "Read");
    let out = release(child, reader, filler);

    // It fails, and says why: b's authorization error.
    assert_exit(&out, 2);
    let err = stderr(&out);
    assert!(
        err.contains(&format!("commit offsets for group {group}"))
            && err.contains("Topic authorization failed"),
        "{err}"
    );
    // Kafka's record: the broker committed a's partitions and refused b's
    // (it authorizes an OffsetCommit topic by topic); b has not moved.
    let (text, now) = committed_by_tool(&group);
    let mut expected = before.clone();
    for (k, o) in &at_t {
        if k.0 == a {
            expected.insert(k.clone(), *o);
        }
    }
    for (k, o) in &before {
        if k.0 == b {
            assert_eq!(now.get(k), Some(o), "{b} did not move:\n{text}");
        }
    }
    assert_eq!(now, expected, "{a} moved to T, {b} stayed:\n{text}");

    // The journal: every old offset, of both topics, then the failure.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&journal)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert_eq!(lines[0]["state"], "moving", "{lines:#?}");
    assert_eq!(lines[1]["state"], "partly-moved", "{lines:#?}");
    // What moved, as reentry read it back, is what Kafka's tool shows.
    let listed = |key: &str| -> BTreeSet<String> {
        lines[1][key]
            .as_array()
            .unwrap_or_else(|| panic!("no {key}: {lines:#?}"))
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    let moved_by_tool: BTreeSet<String> = now
        .iter()
        .filter(|(k, o)| before.get(*k) != Some(*o))
        .map(|((tp, p), _)| format!("{tp}/{p}"))
        .collect();
    assert_eq!(listed("moved"), moved_by_tool, "{lines:#?}");
    assert!(
        listed("not-moved")
            .iter()
            .all(|n| n.starts_with(&format!("{b}/"))),
        "{lines:#?}"
    );
    assert!(err.contains("the commit failed; moved: "), "{err}");
    assert!(
        lines[1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("Topic authorization failed")),
        "{lines:#?}"
    );
    for ((tp, p), old) in &before {
        assert_eq!(
            lines[0]["moves"][tp][p.to_string()],
            serde_json::json!([old, at_t[&(tp.clone(), *p)]]),
            "{lines:#?}"
        );
        // And on stderr, for the operator watching.
        let new = at_t[&(tp.clone(), *p)].unwrap();
        assert!(
            err.contains(&format!("{tp}/{p}: {} → {new}", old.unwrap())),
            "{err}"
        );
    }
    // The undo file, in the form Kafka's own tool reads: every old offset.
    let undo_file = lines[0]["undo-file"].as_str().unwrap();
    let csv: BTreeSet<String> = std::fs::read_to_string(undo_file)
        .unwrap_or_else(|e| panic!("the undo file {undo_file}: {e}"))
        .lines()
        .map(str::to_owned)
        .collect();
    let olds: BTreeSet<String> = before
        .iter()
        .map(|((tp, p), o)| format!("{tp},{p},{}", o.unwrap()))
        .collect();
    assert_eq!(csv, olds, "{undo_file}");
    let undo = err
        .lines()
        .find_map(|l| {
            l.split_once("kafka-consumer-groups.sh ")
                .map(|(_, r)| r.to_owned())
        })
        .unwrap_or_else(|| panic!("no undo command printed:\n{err}"));
    assert_eq!(
        lines[0]["undo-command"].as_str().unwrap(),
        format!("kafka-consumer-groups.sh {undo}")
    );

    // Once b's ACL is gone, the printed undo, run as printed (the SASL_SSL
    // listener, the same user) with Kafka's own tool, puts back what moved.
    drop(acls);
    let config = run.join("client.properties");
    write_secret(
        &config,
        &format!(
            "security.protocol=SASL_SSL\nsasl.mechanism=SCRAM-SHA-512\n\
             sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username=\"{}\" password=\"{}\";\n\
             ssl.truststore.type=PEM\nssl.truststore.location={}\n",
            s.user, s.password, s.ca
        ),
    );
    let out = kafka_tool("org.apache.kafka.tools.consumer.group.ConsumerGroupCommand")
        .args(undo.split_whitespace())
        .arg("--command-config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (text, undone) = committed_by_tool(&group);
    assert_eq!(undone, before, "the undo put the old offsets back:\n{text}");
    let _ = std::fs::remove_dir_all(&run);
}

#[test]
fn a_classic_protocol_group_is_seen_live_refused_a_rewind_and_rewound_once_stopped() {
    a_group_is_seen_live_refused_and_rewound_once_stopped("classic");
}

#[test]
fn a_consumer_protocol_group_kip_848_is_seen_live_refused_a_rewind_and_rewound_once_stopped() {
    a_group_is_seen_live_refused_and_rewound_once_stopped("consumer");
}

/// `kafka offsets-at` on a topic that grew a partition after T: the new
/// partition starts at 0, the others where Kafka's own tool says.
#[test]
fn offsets_at_t_on_a_topic_that_grew_a_partition_after_t_match_kafkas_own_tool() {
    let topic = topic("grown");
    let bootstrap = kafka_bootstrap();
    create_topic(&topic, 2);
    produce_java(&topic, &records("before", 20), "none");
    std::thread::sleep(Duration::from_millis(1500));
    let t = now_ms();
    std::thread::sleep(Duration::from_millis(1500));
    let out = kafka_tool("org.apache.kafka.tools.TopicCommand")
        .args([
            "--bootstrap-server",
            &bootstrap,
            "--alter",
            "--topic",
            &topic,
        ])
        .args(["--partitions", "3"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    produce_java(&topic, &records("after", 30), "none");

    let at_t = offset_shell(&topic, t);
    let ends = offset_shell(&topic, -1);
    assert_eq!(at_t.len(), 3);
    assert_eq!(at_t[&2], 0, "the new partition holds only messages after T");
    assert!(
        ends[&2] > 0,
        "some of the later messages went to the new partition"
    );

    let (code, v) = json(&["offsets-at", &topic, &rfc3339(t)]);
    assert_eq!(code, 0, "{v}");
    let got: BTreeMap<i32, (i64, i64)> = v["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["partition"].as_i64().unwrap() as i32,
                (p["offset"].as_i64().unwrap(), p["end"].as_i64().unwrap()),
            )
        })
        .collect();
    let want: BTreeMap<i32, (i64, i64)> = at_t.iter().map(|(p, o)| (*p, (*o, ends[p]))).collect();
    assert_eq!(got, want, "{v:#}");
}

/// Records a Java producer compressed with zstd or lz4 are read: offsets at
/// a time need the messages themselves, not only the broker's index.
fn compressed_records_are_read(codec: &str) {
    let topic = topic(&format!("codec-{codec}"));
    create_topic(&topic, 3);
    produce_java(&topic, &records("before", 40), codec);
    std::thread::sleep(Duration::from_millis(1500));
    let t = now_ms();
    std::thread::sleep(Duration::from_millis(1500));
    produce_java(&topic, &records("after", 25), codec);
    let at_t = offset_shell(&topic, t);
    let ends = offset_shell(&topic, -1);

    let (code, v) = json(&["offsets-at", &topic, &rfc3339(t)]);
    assert_eq!(code, 0, "{v}");
    for p in v["partitions"].as_array().unwrap() {
        let n = p["partition"].as_i64().unwrap() as i32;
        assert_eq!(p["offset"], at_t[&n], "{codec}, partition {n}: {v:#}");
        assert_eq!(p["end"], ends[&n], "{codec}, partition {n}: {v:#}");
    }
}

#[test]
fn records_a_java_producer_compressed_with_zstd_are_read() {
    compressed_records_are_read("zstd");
}

#[test]
fn records_a_java_producer_compressed_with_lz4_are_read() {
    compressed_records_are_read("lz4");
}
