//! The shared Redis and Kafka servers that `scripts/test` starts, and names
//! that keep each test's keys and topics apart.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Once;

use super::unique;

thread_local! {
    /// The shared servers this thread's test asked for: (variable, what).
    static USED: RefCell<BTreeSet<(String, String)>> = const { RefCell::new(BTreeSet::new()) };
}

/// Notes that the running test uses a shared server. A test that then
/// fails prints the tail of that server's log (`{var}_LOG`, which
/// `scripts/services` writes): what the broker or the node said is often
/// the whole story.
fn used(var: &str, what: &str) {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let before = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            before(info);
            let _ = USED.try_with(|u| {
                for (var, what) in u.borrow().iter() {
                    print_log_tails(var, what);
                }
            });
        }));
    });
    USED.with(|u| u.borrow_mut().insert((var.to_owned(), what.to_owned())));
}

fn print_log_tails(var: &str, what: &str) {
    let Ok(paths) = std::env::var(format!("{var}_LOG")) else {
        return;
    };
    for path in paths.split(':').filter(|p| !p.is_empty()) {
        eprintln!("--- the end of {path} ({what}, which this test used):");
        eprintln!("{}", log_tail(Path::new(path), 30));
    }
}

/// The last `lines` lines of a log, reading at most its last 64 KiB.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)))?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes)?;
        Ok(super::pg::tail(&String::from_utf8_lossy(&bytes), lines))
    };
    read().unwrap_or_else(|e| format!("(cannot read it: {e})"))
}

pub fn address(var: &str, what: &str) -> String {
    used(var, what);
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: run the tests through scripts/test, which starts {what} and sets it"
        )
    })
}

pub fn redis_addr() -> String {
    address("REENTRY_TEST_REDIS", "Redis")
}

pub fn kafka_bootstrap() -> String {
    address("REENTRY_TEST_KAFKA", "Apache Kafka")
}

fn tool(var: &str) -> String {
    std::env::var(var)
        .unwrap_or_else(|_| panic!("{var} is not set: run the tests through scripts/test"))
}

/// kcat, an independent Kafka client, through the wrapper `scripts/setup`
/// installs (Debian's kcat with a librdkafka that speaks to current brokers).
pub fn kcat() -> Command {
    let mut cmd = Command::new(tool("REENTRY_KCAT"));
    cmd.args(["-b", &kafka_bootstrap()]);
    cmd
}

/// Creates `topic` with `partitions` partitions with Kafka's own
/// `kafka-topics` (the broker creates none on first use, as production
/// clusters are run).
pub fn create_topic(topic: &str, partitions: u32) {
    create_topic_with(topic, partitions, &[]);
}

/// A topic with topic-level configs (`retention.ms`, `segment.ms`, …).
pub fn create_topic_with(topic: &str, partitions: u32, configs: &[(&str, String)]) {
    let mut cmd = kafka_tool("org.apache.kafka.tools.TopicCommand");
    cmd.args(["--bootstrap-server", &kafka_bootstrap(), "--create"])
        .args(["--topic", topic, "--partitions", &partitions.to_string()])
        .args(["--replication-factor", "1"]);
    for (k, v) in configs {
        cmd.arg("--config").arg(format!("{k}={v}"));
    }
    let out = cmd.output().expect("run kafka-topics");
    assert!(
        out.status.success(),
        "create topic {topic}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One of Kafka's own command-line tools (`TopicCommand`,
/// `consumer.group.ConsumerGroupCommand`, `GetOffsetShell`), run from the
/// jars `scripts/setup` installs: an independent record of what the broker
/// holds.
pub fn kafka_tool(class: &str) -> Command {
    let mut cmd = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/servers/kafka/tool"));
    cmd.arg(tool("REENTRY_KAFKA_LIBS")).arg(class);
    cmd
}

/// A key prefix of this test's own.
pub fn redis_prefix(test: &str) -> String {
    format!("{}:", unique(test))
}

/// A topic name of this test's own.
pub fn topic(test: &str) -> String {
    unique(test).replace(['_', ':'], "-")
}

/// A minimal RESP client, enough to set up and inspect test data.
pub struct Redis {
    reader: BufReader<TcpStream>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Bulk(Option<Vec<u8>>),
    Integer(i64),
    Array(Vec<Reply>),
}

impl Redis {
    pub fn connect() -> Redis {
        let addr = redis_addr();
        let stream =
            TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connect to Redis at {addr}: {e}"));
        Redis {
            reader: BufReader::new(stream),
        }
    }

    pub fn cmd(&mut self, args: &[&[u8]]) -> Reply {
        let mut req = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a);
            req.extend_from_slice(b"\r\n");
        }
        self.reader.get_mut().write_all(&req).unwrap();
        self.reply()
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.reader.read_line(&mut l).unwrap();
        l.trim_end_matches("\r\n").to_owned()
    }

    fn reply(&mut self) -> Reply {
        let line = self.line();
        let (kind, rest) = line.split_at(1);
        match kind {
            "+" => Reply::Simple(rest.to_owned()),
            "-" => panic!("Redis error: {rest}"),
            ":" => Reply::Integer(rest.parse().unwrap()),
            "$" => {
                let n: i64 = rest.parse().unwrap();
                if n < 0 {
                    return Reply::Bulk(None);
                }
                let mut buf = vec![0u8; n as usize + 2];
                std::io::Read::read_exact(&mut self.reader, &mut buf).unwrap();
                buf.truncate(n as usize);
                Reply::Bulk(Some(buf))
            }
            "*" => {
                let n: i64 = rest.parse().unwrap();
                Reply::Array((0..n.max(0)).map(|_| self.reply()).collect())
            }
            _ => panic!("unexpected Redis reply {line:?}"),
        }
    }
}
