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
                for (topic, m) in &moves {
                    let offsets = m.iter().map(|(p, (_, new))| (*p, *new)).collect();
                    k.commit(&a.group, topic, &offsets)
                        .map_err(|e| step_err(e.into()))?;
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
