//! Stand-alone Kafka and outbox commands, for ad-hoc use in an incident:
//! the same code the engine's steps run, without a run directory.

use std::path::PathBuf;

use serde::Serialize;

use crate::cli::Context;
use crate::exit::Exit;
use crate::kafka::Kafka;
use crate::reentry::plan::{self, PlanError};
use crate::reentry::playbook::Playbook;
use crate::reentry::steps::consumers::{Moves, Rewind};
use crate::reentry::steps::outbox;
use crate::reentry::steps::{Action, Env, StepError};
use crate::Error;

/// How to reach the cluster: each flag, else its variable, else `[kafka]`
/// in the config file. Passwords come from the environment only: a
/// command line is readable by every local user.
#[derive(Debug, clap::Args)]
pub struct KafkaOpts {
    /// Bootstrap servers, host:port[,host:port…].
    #[arg(
        long,
        env = "REENTRY_KAFKA_BOOTSTRAP",
        hide_env_values = true,
        value_name = "SERVERS"
    )]
    pub bootstrap: Option<String>,
    /// PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.
    #[arg(
        long,
        env = "REENTRY_KAFKA_SECURITY_PROTOCOL",
        hide_env_values = true,
        value_name = "PROTOCOL"
    )]
    pub security_protocol: Option<String>,
    /// PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER.
    #[arg(
        long,
        env = "REENTRY_KAFKA_SASL_MECHANISM",
        hide_env_values = true,
        value_name = "MECHANISM"
    )]
    pub sasl_mechanism: Option<String>,
    /// The SASL user; its password is read from REENTRY_KAFKA_SASL_PASSWORD.
    #[arg(
        long,
        env = "REENTRY_KAFKA_SASL_USERNAME",
        hide_env_values = true,
        value_name = "USER"
    )]
    pub sasl_username: Option<String>,
    /// The CA certificate(s) that sign the brokers' certificates (PEM).
    #[arg(
        long,
        env = "REENTRY_KAFKA_SSL_CA",
        hide_env_values = true,
        value_name = "FILE"
    )]
    pub ssl_ca: Option<String>,
    /// A client certificate (PEM); its key's password is read from
    /// REENTRY_KAFKA_SSL_KEY_PASSWORD.
    #[arg(
        long,
        env = "REENTRY_KAFKA_SSL_CERTIFICATE",
        hide_env_values = true,
        value_name = "FILE"
    )]
    pub ssl_certificate: Option<String>,
    /// The client certificate's private key (PEM).
    #[arg(
        long,
        env = "REENTRY_KAFKA_SSL_KEY",
        hide_env_values = true,
        value_name = "FILE"
    )]
    pub ssl_key: Option<String>,
    /// Any other librdkafka property, KEY=VALUE (repeat it).
    #[arg(long = "kafka-property", value_name = "KEY=VALUE")]
    pub properties: Vec<String>,
}

impl KafkaOpts {
    /// The cluster these options, the environment and the config file name.
    pub fn kafka(&self, config: &crate::config::KafkaConfig) -> Result<Kafka, Error> {
        let bad = |m: String| Error::Config(crate::config::ConfigError::Keys(m));
        let bootstrap = self.bootstrap.clone().or_else(|| config.bootstrap.clone()).ok_or_else(|| {
            bad("no Kafka given: pass --bootstrap, set REENTRY_KAFKA_BOOTSTRAP, or set [kafka] bootstrap in the config file".into())
        })?;
        let env = |v: &str| std::env::var(v).ok().filter(|s| !s.is_empty());
        let mut properties = config.properties.clone();
        for p in &self.properties {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| bad(format!("--kafka-property {p}: write KEY=VALUE")))?;
            properties.insert(k.trim().to_owned(), v.to_owned());
        }
        let settings = crate::kafka::security::Settings {
            security_protocol: self
                .security_protocol
                .clone()
                .or_else(|| config.security_protocol.clone()),
            sasl_mechanism: self
                .sasl_mechanism
                .clone()
                .or_else(|| config.sasl_mechanism.clone()),
            sasl_username: self
                .sasl_username
                .clone()
                .or_else(|| config.sasl_username.clone()),
            sasl_password: env("REENTRY_KAFKA_SASL_PASSWORD"),
            ssl_ca: self.ssl_ca.clone().or_else(|| config.ssl_ca.clone()),
            ssl_certificate: self
                .ssl_certificate
                .clone()
                .or_else(|| config.ssl_certificate.clone()),
            ssl_key: self.ssl_key.clone().or_else(|| config.ssl_key.clone()),
            ssl_key_password: env("REENTRY_KAFKA_SSL_KEY_PASSWORD"),
            properties,
        };
        let security = crate::kafka::security::Security::from_settings(&settings).map_err(bad)?;
        Ok(Kafka::new(&bootstrap).with_security(security))
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum KafkaCommand {
    /// Per partition: the first offset at or after TIME, and the end.
    OffsetsAt(OffsetsAtArgs),
    /// A consumer group's committed offsets and live members.
    Group(GroupArgs),
    /// Rewind a consumer group to TIME (dry run unless --apply); refused while it has live members.
    Rewind(RewindArgs),
}

#[derive(Debug, clap::Args)]
pub struct OffsetsAtArgs {
    pub topic: String,
    /// RFC 3339, or `YYYY-MM-DD HH:MM:SS` in UTC.
    pub time: String,
    #[command(flatten)]
    pub kafka: KafkaOpts,
}

#[derive(Debug, clap::Args)]
pub struct GroupArgs {
    pub group: String,
    #[arg(long = "topic", required = true, value_name = "TOPIC")]
    pub topics: Vec<String>,
    #[command(flatten)]
    pub kafka: KafkaOpts,
}

#[derive(Debug, clap::Args)]
pub struct RewindArgs {
    pub group: String,
    #[arg(long = "topic", required = true, value_name = "TOPIC")]
    pub topics: Vec<String>,
    /// The time to rewind to.
    #[arg(long, value_name = "TIME")]
    pub to: String,
    /// Commit the new offsets. Without it: show them.
    #[arg(long)]
    pub apply: bool,
    /// Where an apply records its moves (`kafka-rewind.jsonl`) and the undo
    /// file, before it commits [default: $XDG_STATE_HOME/reentry/kafka-rewind,
    /// else ~/.local/state/reentry/kafka-rewind].
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    #[command(flatten)]
    pub kafka: KafkaOpts,
}

#[derive(Debug, clap::Subcommand)]
pub enum OutboxCommand {
    /// Classify an outbox against its topic around T, changing nothing.
    Diff(DiffArgs),
}

#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    pub playbook: PathBuf,
    /// Only this outbox [default: every one].
    #[arg(long, value_name = "NAME")]
    pub outbox: Option<String>,
}

fn ms(time: &str) -> Result<i64, Error> {
    let t = crate::backup::restore::Target::parse_time(time)?;
    match t {
        crate::backup::restore::Target::Time(t) => Ok(t
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)),
        _ => unreachable!("parse_time returns a time"),
    }
}

fn step_err(e: StepError) -> Error {
    Error::Plan(Box::new(PlanError::Step {
        step: "kafka".into(),
        source: Box::new(e),
    }))
}

#[derive(Serialize)]
struct Offsets {
    topic: String,
    at: String,
    partitions: Vec<PartitionAt>,
}

#[derive(Serialize)]
struct PartitionAt {
    partition: i32,
    offset: i64,
    end: i64,
    /// Committed messages from `offset` to `end`, read: on a transactional
    /// topic fewer than `end - offset`.
    messages: u64,
}

#[derive(Serialize)]
struct GroupState {
    group: String,
    /// As the coordinator says: `Stable`, `Empty`, `Dead`, …
    state: &'static str,
    /// `consumer` (KIP-848), `classic`, or `unknown` (a broker before 3.7).
    protocol: &'static str,
    members: Vec<crate::kafka::Member>,
    committed: std::collections::BTreeMap<String, std::collections::BTreeMap<i32, Option<i64>>>,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Rewound {
    group: String,
    applied: bool,
    /// Per topic and partition: [committed before, new].
    moves: Moves,
    messages_again: u64,
    /// A rewind is refused while any are live.
    live_members: Vec<crate::kafka::Member>,
}

pub fn kafka(ctx: &Context, cmd: KafkaCommand) -> Result<Exit, Error> {
    match cmd {
        KafkaCommand::OffsetsAt(a) => {
            let k = a.kafka.kafka(&ctx.config.kafka)?;
            let at = k
                .offsets_for_time(&a.topic, ms(&a.time)?)
                .map_err(|e| step_err(e.into()))?;
            let parts: Vec<i32> = at.keys().copied().collect();
            let ends = k.ends(&a.topic, &parts).map_err(|e| step_err(e.into()))?;
            let mut partitions = Vec::new();
            for (p, o) in &at {
                let end = ends.get(p).copied().unwrap_or(*o);
                let messages = k
                    .count(&a.topic, *p, *o, end)
                    .map_err(|e| step_err(e.into()))?;
                partitions.push(PartitionAt {
                    partition: *p,
                    offset: *o,
                    end,
                    messages,
                });
            }
            let r = Offsets {
                topic: a.topic.clone(),
                at: a.time.clone(),
                partitions,
            };
            ctx.emit(&r, || {
                Some(
                    r.partitions
                        .iter()
                        .map(|p| {
                            format!(
                                "{}/{}: offset {} at {} ({} message(s) from there to the end {})",
                                r.topic, p.partition, p.offset, r.at, p.messages, p.end
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n"),
                )
            })?;
            Ok(Exit::Ok)
        }
        KafkaCommand::Group(a) => {
            let k = a.kafka.kafka(&ctx.config.kafka)?;
            let described = k.describe_group(&a.group).map_err(|e| step_err(e.into()))?;
            let mut committed = std::collections::BTreeMap::new();
            for t in &a.topics {
                let parts = k.partitions(t).map_err(|e| step_err(e.into()))?;
                committed.insert(
                    t.clone(),
                    k.committed(&a.group, t, &parts)
                        .map_err(|e| step_err(e.into()))?,
                );
            }
            let r = GroupState {
                group: a.group.clone(),
                state: described.state,
                protocol: described.protocol,
                members: described.members,
                committed,
            };
            ctx.emit(&r, || {
                let mut s = format!(
                    "group {} ({}, {} protocol): {} live member(s)",
                    r.group,
                    r.state,
                    r.protocol,
                    r.members.len()
                );
                for m in &r.members {
                    s.push_str(&format!("\n  member {}", m.describe()));
                }
                for (t, parts) in &r.committed {
                    for (p, o) in parts {
                        s.push_str(&format!(
                            "\n  {t}/{p}: committed {}",
                            o.map_or("nothing".to_owned(), |o| o.to_string())
                        ));
                    }
                }
                Some(s)
            })?;
            Ok(Exit::Ok)
        }
        KafkaCommand::Rewind(a) => {
            let k = a.kafka.kafka(&ctx.config.kafka)?;
            let r = Rewind {
                group: a.group.clone(),
                topics: a.topics.clone(),
                t_ms: ms(&a.to)?,
                // By hand the operator names the time: exactly there, not
                // the playbook's straddle before it for idempotent groups.
                idempotent: false,
            };
            let moves = r.moves(&k).map_err(step_err)?;
            let (_, again, items) = r.describe(&k, &moves).map_err(step_err)?;
            let members = k.members(&a.group).map_err(|e| step_err(e.into()))?;
            let live = members
                .iter()
                .map(|m| m.describe())
                .collect::<Vec<_>>()
                .join(", ");
            if a.apply {
                if !members.is_empty() {
                    eprintln!(
                        "reentry: group {} has {} live member(s): stop them first: {live}",
                        a.group,
                        members.len(),
                    );
                    return Ok(Exit::Refused);
                }
                if !items.is_empty() {
                    let dir = match &a.run_dir {
                        Some(d) => d.clone(),
                        None => default_rewind_dir()?,
                    };
                    commit_recorded(&k, &a.group, &a.to, &moves, &dir)?;
                }
            }
            let out = Rewound {
                group: a.group.clone(),
                applied: a.apply,
                moves,
                messages_again: again,
                live_members: members,
            };
            ctx.emit(&out, || {
                if items.is_empty() {
                    return Some(format!(
                        "nothing to move: group {} is already at {} on every partition",
                        out.group, a.to
                    ));
                }
                let verb = if a.apply { "rewound" } else { "would rewind" };
                let mut s = format!(
                    "{verb} group {}: {again} message(s) to consume again; the old offsets, to undo:",
                    out.group
                );
                for i in &items {
                    s.push_str(&format!("\n  {i}"));
                }
                if !a.apply && !out.live_members.is_empty() {
                    s.push_str(&format!(
                        "\nan apply would be refused now: the group has {} live member(s): {live}; stop them first",
                        out.live_members.len()
                    ));
                }
                Some(s)
            })?;
            Ok(if a.apply || items.is_empty() {
                Exit::Ok
            } else {
                Exit::Negative
            })
        }
    }
}

/// One record of `kafka-rewind.jsonl`: the moves, journaled before the
/// commit (`moving`) and after it (`moved`, or `failed` with the error).
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct RewindRecord<'a> {
    state: &'static str,
    at_ms: u128,
    bootstrap: &'a str,
    group: &'a str,
    to: &'a str,
    /// Per topic and partition: [committed before, new].
    moves: &'a Moves,
    undo_file: &'a std::path::Path,
    undo_command: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// After a failed commit: the partitions (`topic/partition`) whose
    /// committed offset, read back, is the new one. A commit succeeds or
    /// fails partition by partition.
    #[serde(skip_serializing_if = "Option::is_none")]
    moved: Option<Vec<String>>,
    /// After a failed commit: those that still hold another offset.
    #[serde(skip_serializing_if = "Option::is_none")]
    not_moved: Option<Vec<String>>,
}

fn default_rewind_dir() -> Result<PathBuf, Error> {
    let env = |v: &str| std::env::var_os(v).filter(|s| !s.is_empty());
    let base = env("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .ok_or_else(|| {
            Error::Config(crate::config::ConfigError::Keys(
                "kafka rewind --apply records its moves before committing: pass --run-dir DIR (neither XDG_STATE_HOME nor HOME is set)".into(),
            ))
        })?;
    Ok(base.join("reentry").join("kafka-rewind"))
}

/// Writes the moves to stderr, the journal and an undo file that Kafka's
/// own tool reads, then commits every topic in one request: whatever
/// happens to the commit, the old offsets are on disk first.
fn commit_recorded(
    k: &Kafka,
    group: &str,
    to: &str,
    moves: &Moves,
    dir: &std::path::Path,
) -> Result<(), Error> {
    use std::io::Write;
    let io = |what: String| {
        move |e: std::io::Error| {
            step_err(StepError::Input {
                message: format!("{what}: {e}; nothing was committed"),
            })
        }
    };
    crate::fsutil::create_private_dir_all(dir).map_err(io(format!(
        "cannot create the run directory {}",
        dir.display()
    )))?;
    let at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let undo_file = dir.join(format!("kafka-rewind-{at_ms}.undo.csv"));
    let mut csv = String::new();
    let mut offsets: std::collections::BTreeMap<String, std::collections::BTreeMap<i32, i64>> =
        Default::default();
    let mut uncommitted = Vec::new();
    for (topic, m) in moves {
        for (p, (old, new)) in m {
            if *old == Some(*new) {
                continue;
            }
            offsets.entry(topic.clone()).or_default().insert(*p, *new);
            match old {
                Some(o) => csv.push_str(&format!("{topic},{p},{o}\n")),
                None => uncommitted.push(format!("{topic}/{p}")),
            }
        }
    }
    crate::fsutil::write_private_new(&undo_file, csv.as_bytes())
        .map_err(io(format!("cannot write {}", undo_file.display())))?;
    let undo_command = format!(
        "kafka-consumer-groups.sh --bootstrap-server {} --group {group} --reset-offsets --from-file {} --execute",
        k.shown(),
        undo_file.display()
    );
    let journal = dir.join("kafka-rewind.jsonl");
    let mut record = RewindRecord {
        state: "moving",
        at_ms,
        bootstrap: k.shown(),
        group,
        to,
        moves,
        undo_file: &undo_file,
        undo_command: &undo_command,
        error: None,
        moved: None,
        not_moved: None,
    };
    let append = |r: &RewindRecord| -> std::io::Result<()> {
        let mut f = crate::fsutil::open_private_append(&journal)?;
        let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
        line.push(b'\n');
        f.write_all(&line)?;
        f.sync_all()
    };
    append(&record).map_err(io(format!("cannot write {}", journal.display())))?;
    eprintln!(
        "reentry: group {group}: moving, old → new (recorded in {}):",
        journal.display()
    );
    for (topic, m) in moves {
        for (p, (old, new)) in m {
            if *old != Some(*new) {
                eprintln!(
                    "  {topic}/{p}: {} → {new}",
                    old.map_or("none".to_owned(), |o| o.to_string())
                );
            }
        }
    }
    eprintln!("reentry: to put the old offsets back (group stopped): {undo_command}");
    if !uncommitted.is_empty() {
        eprintln!(
            "reentry: {} had no committed offset before; to undo those, delete the group's offsets there (kafka-consumer-groups.sh --delete-offsets)",
            uncommitted.join(", ")
        );
    }
    let committed = k.commit_all(group, &offsets);
    record.state = if committed.is_ok() { "moved" } else { "failed" };
    record.error = committed.as_ref().err().map(|e| e.to_string());
    if committed.is_err() {
        // Which moved, by the group's offsets read back: the broker
        // commits partition by partition.
        let (mut moved, mut not_moved) = (Vec::new(), Vec::new());
        for (topic, parts) in &offsets {
            let ids: Vec<i32> = parts.keys().copied().collect();
            let now = k.committed(group, topic, &ids);
            for (p, new) in parts {
                let name = format!("{topic}/{p}");
                match &now {
                    Ok(now) if now.get(p) == Some(&Some(*new)) => moved.push(name),
                    Ok(_) => not_moved.push(name),
                    Err(e) => {
                        eprintln!("reentry: cannot read back the offsets of {topic}: {e}");
                        not_moved.push(format!("{name} (unknown)"));
                    }
                }
            }
        }
        eprintln!(
            "reentry: the commit failed; moved: {}; not moved: {}",
            if moved.is_empty() {
                "none".into()
            } else {
                moved.join(", ")
            },
            if not_moved.is_empty() {
                "none".into()
            } else {
                not_moved.join(", ")
            },
        );
        if !moved.is_empty() {
            record.state = "partly-moved";
        }
        record.moved = Some(moved);
        record.not_moved = Some(not_moved);
    }
    if let Err(e) = append(&record) {
        eprintln!(
            "reentry: cannot record the outcome in {}: {e}",
            journal.display()
        );
    }
    committed.map_err(|e| Error::Step {
        what: "kafka rewind: committing the new offsets failed (the old ones are recorded above)",
        source: Box::new(e.into()),
    })
}

pub fn outbox(ctx: &Context, cmd: OutboxCommand) -> Result<Exit, Error> {
    let OutboxCommand::Diff(a) = cmd;
    let p = match Playbook::load(&a.playbook) {
        Ok(p) => p,
        Err(d) => {
            eprintln!("{d}");
            return Ok(Exit::Config);
        }
    };
    let target = plan::target(&p)?;
    let t_ms = target.time_ms().ok_or(PlanError::NoTime {
        kinds: "outbox".into(),
    })?;
    let mut env = Env::new(&p, "diff".into(), true);
    let mut results = Vec::new();
    let mut changes = 0;
    for s in plan::steps(&p, Some(t_ms)) {
        let Action::Outbox(r) = &s.action else {
            continue;
        };
        if a.outbox.as_ref().is_some_and(|n| n != &r.outbox) {
            continue;
        }
        let c = outbox::classify(&mut env, r, ctx.reporter()).map_err(step_err)?;
        changes += c.changes();
        results.push(serde_json::json!({"outbox": r.outbox, "topic": r.topic, "summary": c.summary(r), "classes": c.detail()}));
    }
    if results.is_empty() {
        let what = match &a.outbox {
            Some(n) => format!("has no [[outbox]] named `{n}`"),
            None => "has no [[outbox]]: `outbox diff` compares an outbox with its topic".into(),
        };
        let d = crate::diag::Diagnostics::new(
            &p.file,
            &p.text,
            vec![crate::diag::Diagnostic::at(Some(0..0), what)],
        );
        eprintln!("{d}");
        return Ok(Exit::Config);
    }
    ctx.emit(&results, || {
        Some(
            results
                .iter()
                .map(|r| r["summary"].as_str().unwrap_or_default().to_owned())
                .collect::<Vec<_>>()
                .join("\n"),
        )
    })?;
    Ok(if changes > 0 {
        Exit::Negative
    } else {
        Exit::Ok
    })
}
