//! Cache invalidation against real Redis: a single server and a 3-primary
//! Redis Cluster (Debian's redis-server). What went and what stayed is read
//! with `redis-cli`, not taken from reentry's word.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::common::pg::{Cluster, Version};
use crate::common::redis::{cli, cluster_nodes, keys, OwnCluster, OwnRedis};
use crate::common::services::redis_addr;
use crate::common::{assert_exit, kill_at_pause, reentry_bin, stderr, stdout, unique};
use crate::reconcile::ts;

const MIN: i64 = 60_000;

/// Two databases around T: 50 cases as of T; on current, cases 1-10
/// written after T (legitimate writes a cache holds) and cases 20-22
/// damaged by a bad job that left `updated_at` alone, which the repair's
/// `where` scopes. The caches' keys are this test's own (`prefix`).
pub(crate) struct CacheWorld {
    pub(crate) cluster: Cluster,
    pub(crate) dir: PathBuf,
    pub(crate) t: i64,
    pub(crate) prefix: String,
}

impl CacheWorld {
    pub(crate) fn new(test: &str) -> CacheWorld {
        let mut cluster = Cluster::init(Version::V18);
        cluster.start();
        let dir = cluster.dir("work");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let t = (now - 30 * MIN) / 1000 * 1000;
        let mut admin = cluster.client();
        for db in ["cur", "res"] {
            admin
                .batch_execute(&format!("CREATE DATABASE {db}"))
                .unwrap();
            let mut c = cluster.db_client(db);
            c.batch_execute(include_str!("../../sql/system_gate.sql"))
                .unwrap();
            c.batch_execute(include_str!("../../sql/case-management.sql"))
                .unwrap();
            c.batch_execute(&format!(
                "INSERT INTO system_gate VALUES ('api-writes', true, now());
                 INSERT INTO cases (id, title, owner_id, updated_at)
                 SELECT g, 'case ' || g, 1, '{}'::timestamptz FROM generate_series(1, 50) g;",
                ts(t - 60 * MIN)
            ))
            .unwrap();
        }
        cluster
            .db_client("cur")
            .batch_execute(&format!(
                "UPDATE cases SET title = title || ' (after T)', updated_at = '{}' WHERE id <= 10;
                 UPDATE cases SET status = 'closed' WHERE id BETWEEN 20 AND 22;",
                ts(t + 5 * MIN)
            ))
            .unwrap();
        CacheWorld {
            cluster,
            dir,
            t,
            prefix: format!("{}:", unique(test)),
        }
    }

    pub(crate) fn conninfo(&self, db: &str) -> String {
        self.cluster.db_conninfo(db)
    }

    /// The playbook: a selective repair of cases 20-22, and `caches`.
    pub(crate) fn playbook(&self, caches: &str) -> PathBuf {
        let text = format!(
            r#"[playbook]
name = "caches"
way-back = "selective-repair"

[databases.current]
conninfo = "{cur}"

[databases.restored]
conninfo = "{res}"

[recovery-target]
time = "{t}"

[gates]
reopen-order = ["api-writes"]

[[gates.system-gate]]
name = "api-writes"
databases = ["current", "restored"]

[[repair]]
table = "cases"
where = "id BETWEEN 20 AND 22"

{caches}
"#,
            cur = self.conninfo("cur"),
            res = self.conninfo("res"),
            t = ts(self.t),
        );
        let pb = self.dir.join(format!("{}.toml", unique("caches")));
        std::fs::write(&pb, text).unwrap();
        pb
    }

    /// Every case's two keys, another entity's keys, 300 query-cache keys
    /// (the pattern), 20 keys of another namespace, and the version key.
    pub(crate) fn seed(&self, addr: &str, cluster: bool) {
        let p = &self.prefix;
        let mut cmds = String::new();
        for id in 1..=50 {
            cmds.push_str(&format!(
                "SET {p}case:{id} v\nSET {p}case:{id}:summary v\nSET {p}user:{id} v\n"
            ));
        }
        for n in 0..300 {
            cmds.push_str(&format!("SET {p}search:q{n} v\n"));
        }
        for n in 0..20 {
            cmds.push_str(&format!("SET {p}report:{n} v\n"));
        }
        cmds.push_str(&format!("SET {p}case:ns 7\n"));
        cli(addr, cluster, &cmds);
    }

    pub(crate) fn cache_toml(&self, url: &str, cluster: bool, batch: usize) -> String {
        let p = &self.prefix;
        format!(
            r#"[[caches]]
name = "cases"
url = "{url}"
cluster = {cluster}
table = "cases"
updated-at = "updated_at"
keys = ["{p}case:{{id}}", "{p}case:{{id}}:summary"]
patterns = ["{p}search:*"]
generation = "{p}case:ns"
scan-count = 50
batch-size = {batch}
"#
        )
    }

    /// What must remain after the invalidation: cases 11-19 and 23-50
    /// (both keys), every user, every report, and the version key.
    pub(crate) fn expected_left(&self) -> Vec<String> {
        let p = &self.prefix;
        let mut left = Vec::new();
        for id in (11..=19).chain(23..=50) {
            left.push(format!("{p}case:{id}"));
            left.push(format!("{p}case:{id}:summary"));
        }
        for id in 1..=50 {
            left.push(format!("{p}user:{id}"));
        }
        for n in 0..20 {
            left.push(format!("{p}report:{n}"));
        }
        left.push(format!("{p}case:ns"));
        left.sort();
        left
    }
}

pub(crate) fn reentry(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut cmd = Command::new(reentry_bin());
    for a in args {
        cmd.arg(a);
    }
    cmd.output().unwrap()
}

/// `reentry --json cache invalidate --url URL --pattern P --apply`, which
/// must succeed: its JSON.
fn invalidate_pattern(url: &str, pattern: &str) -> Value {
    let out = reentry(&[
        &"--json",
        &"cache",
        &"invalidate",
        &"--url",
        &url,
        &"--pattern",
        &pattern,
        &"--apply",
    ]);
    assert_exit(&out, 0);
    serde_json::from_str(&stdout(&out)).unwrap()
}

pub(crate) fn apply_cmd(pb: &Path, run: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(reentry_bin());
    cmd.arg("apply")
        .arg(pb)
        .arg("--run-dir")
        .arg(run)
        .arg("--apply")
        .args(extra);
    cmd
}

pub(crate) fn plan_steps(pb: &Path) -> Value {
    let out = reentry(&[&"plan", &pb, &"--json"]);
    assert_exit(&out, 1);
    serde_json::from_str(&stdout(&out)).unwrap()
}

pub(crate) fn step<'a>(plan: &'a Value, id: &str) -> &'a Value {
    plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no step {id} in {plan:#}"))
}

/// The effect a finished run journaled for `step`.
pub(crate) fn done_effect(run: &Path, step: &str) -> Value {
    let text = std::fs::read_to_string(run.join("journal.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["event"] == "done" && r["step"] == step)
        .map(|r| r["data"]["effect"].clone())
        .next_back()
        .unwrap_or_else(|| panic!("{step} is not done in {text}"))
}

fn get(addr: &str, cluster: bool, key: &str) -> String {
    // redis-cli -c says where it was redirected first: the answer is last.
    cli(addr, cluster, &format!("GET {key}\n"))
        .lines()
        .last()
        .unwrap_or("")
        .to_owned()
}

/// The whole story on one Redis: plan counts, apply removes exactly the
/// changed entities' keys and the pattern's, bumps the version once, and a
/// second run finds nothing to remove.
fn invalidates_only_what_changed(addr: &str, nodes: &[String], cluster: bool) {
    let w = CacheWorld::new("caches");
    w.seed(addr, cluster);
    let pb = w.playbook(&w.cache_toml(&format!("redis://{addr}"), cluster, 5));

    let plan = plan_steps(&pb);
    // Without a run, only `updated-at` finds entities: cases 1-10.
    let keys_step = step(&plan, "cache-keys:cases");
    assert_eq!(keys_step["preview"]["count"], 20, "{keys_step:#}");
    assert_eq!(step(&plan, "cache-patterns:cases")["preview"]["count"], 300);
    assert!(step(&plan, "cache-generation:cases")["preview"]["summary"]
        .as_str()
        .unwrap()
        .contains("from 7 to 8"));
    // The plan changed nothing.
    assert_eq!(keys(nodes, &w.prefix).len(), 50 * 3 + 300 + 20 + 1);

    let run = w.dir.join("run");
    let out = apply_cmd(&pb, &run, &[]).output().unwrap();
    assert_exit(&out, 0);
    assert_eq!(
        keys(nodes, &w.prefix),
        w.expected_left(),
        "{}",
        stdout(&out)
    );
    assert_eq!(get(addr, cluster, &format!("{}case:ns", w.prefix)), "8");
    // Cases 1-10 (after T) and 20-22 (the rows step's): 13 entities.
    let e = done_effect(&run, "cache-keys:cases");
    assert_eq!(e["count"], 26, "{e:#}");
    assert_eq!(e["detail"]["entities"], 13, "{e:#}");
    let e = done_effect(&run, "cache-patterns:cases");
    assert_eq!(e["count"], 300, "{e:#}");
    if cluster {
        let per: Vec<u64> = e["detail"]["per-node"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[1].as_u64().unwrap())
            .collect();
        assert_eq!(per.len(), 3, "{e:#}");
        assert!(
            per.iter().all(|&n| n > 0),
            "every primary held some: {per:?}"
        );
    }

    // A second run finds nothing more to remove.
    let again = w.dir.join("again");
    let out = apply_cmd(&pb, &again, &[]).output().unwrap();
    assert_exit(&out, 0);
    assert_eq!(done_effect(&again, "cache-keys:cases")["count"], 0);
    assert_eq!(done_effect(&again, "cache-patterns:cases")["count"], 0);
    assert_eq!(keys(nodes, &w.prefix), w.expected_left());
}

#[test]
fn caches_on_one_redis_lose_exactly_the_keys_of_entities_changed_around_t() {
    let addr = redis_addr();
    invalidates_only_what_changed(&addr, std::slice::from_ref(&addr), false);
}

#[test]
fn caches_on_a_3_primary_redis_cluster_lose_exactly_those_keys_on_every_primary() {
    let nodes = cluster_nodes();
    invalidates_only_what_changed(&nodes[0], &nodes, true);
}

#[test]
fn redis_killed_mid_step_names_the_server_and_a_resume_deletes_nothing_twice() {
    let w = CacheWorld::new("caches-killed");
    let mut redis = OwnRedis::start(&w.dir.join("redis"), &["--requirepass", "s3cret-redis"]);
    let addr = redis.addr();
    let auth = |cmds: &str| cli(&addr, false, &format!("AUTH s3cret-redis\n{cmds}"));
    let p = w.prefix.clone();
    let mut seed = String::new();
    for id in 1..=50 {
        seed.push_str(&format!(
            "SET {p}case:{id} v\nSET {p}case:{id}:summary v\nSET {p}user:{id} v\n"
        ));
    }
    auth(&seed);
    // The password comes from the environment, and is never shown.
    let pb = w.playbook(&format!(
        r#"[[caches]]
name = "cases"
url = "redis://:${{CACHE_PW}}@{addr}"
table = "cases"
updated-at = "updated_at"
keys = ["{p}case:{{id}}", "{p}case:{{id}}:summary"]
batch-size = 4
"#
    ));
    let run = w.dir.join("run");
    let env = [("CACHE_PW", "s3cret-redis")];
    let mut cmd = apply_cmd(&pb, &run, &[]);
    cmd.envs(env);
    kill_at_pause(cmd, "cache-keys:cases:batch");
    // The first batch (4 keys, in hash-slot order) is gone.
    let first: Vec<String> = {
        let mut ks: Vec<String> = (1..=10)
            .chain(20..=22)
            .flat_map(|id| [format!("{p}case:{id}"), format!("{p}case:{id}:summary")])
            .collect();
        ks.sort_by_cached_key(|k| (reentry::cache::slot(k.as_bytes()), k.clone()));
        ks.truncate(4);
        ks
    };
    let exists = |k: &str| auth(&format!("EXISTS {k}\n")).lines().last() == Some("1");
    assert!(first.iter().all(|k| !exists(k)), "{first:?}");

    redis.kill();
    let out = apply_cmd(&pb, &run, &["--resume"])
        .envs(env)
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("Redis at redis://:***@{addr}")),
        "{err}"
    );
    assert!(!err.contains("s3cret-redis"), "{err}");

    redis.restart();
    // The application filled a key of the first batch again, from the
    // repaired database: the resumed run must not delete it a second time.
    auth(&format!("SET {} fresh\n", first[0]));
    let out = apply_cmd(&pb, &run, &["--resume"])
        .envs(env)
        .output()
        .unwrap();
    assert_exit(&out, 0);
    assert_eq!(
        auth(&format!("GET {}\n", first[0])).lines().last(),
        Some("fresh")
    );
    let left = auth(&format!("KEYS {p}case:*\n"));
    let left: Vec<&str> = left.lines().filter(|l| l.starts_with(&p)).collect();
    // 37 untouched cases' two keys, and the one filled again.
    assert_eq!(left.len(), 37 * 2 + 1, "{left:?}");
    // Each key counted once: 26 in all, over both attempts.
    assert_eq!(done_effect(&run, "cache-keys:cases")["count"], 26);

    for f in ["plan.json", "journal.jsonl"] {
        let text = std::fs::read_to_string(run.join(f)).unwrap();
        assert!(!text.contains("s3cret-redis"), "{f} holds the password");
    }
    let report = reentry(&[&"report", &run]);
    assert!(!stdout(&report).contains("s3cret-redis"));
}

#[test]
fn a_cluster_node_that_refuses_connections_fails_the_step_and_is_named() {
    let w = CacheWorld::new("caches-node-down");
    let mut c = OwnCluster::start(&w.dir.join("cluster"));
    let addrs = c.addrs();
    w.seed(&addrs[0], true);
    let pb = w.playbook(&format!(
        r#"[[caches]]
name = "queries"
url = "redis://{}"
cluster = true
patterns = ["{}search:*"]
"#,
        addrs[0], w.prefix
    ));
    // The third primary goes away; the others still list it in the slot
    // map (the cluster has not noticed yet).
    let down = addrs[2].clone();
    let reached = |c: &OwnCluster| keys(&c.addrs()[..2], &format!("{}search:", w.prefix));
    let before = reached(&c);
    assert!(!before.is_empty());
    c.nodes[2].kill();
    let run = w.dir.join("run");
    let out = apply_cmd(&pb, &run, &[]).output().unwrap();
    assert_ne!(out.status.code(), Some(0), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("Redis at {down} (cluster redis://{})", addrs[0])),
        "{err}"
    );
    // Not done, and nothing removed from the primaries it reached either.
    let journal = std::fs::read_to_string(run.join("journal.jsonl")).unwrap_or_default();
    assert!(
        !journal
            .lines()
            .any(|l| l.contains("\"done\"") && l.contains("cache-patterns:queries")),
        "the step is not done: {journal}"
    );
    assert_eq!(reached(&c), before);
}

#[test]
fn rediss_urls_speak_tls_to_a_tls_only_redis() {
    let dir = tempfile::tempdir().unwrap();
    let (r, ca) = OwnRedis::start_tls(dir.path());
    let port = r.port.to_string();
    let tls_cli = |cmds: &str| {
        let mut child = Command::new("redis-cli")
            .args([
                "--tls",
                "--cacert",
                ca.to_str().unwrap(),
                "-h",
                "127.0.0.1",
                "-p",
                &port,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(cmds.as_bytes())
            .unwrap();
        String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
    };
    tls_cli("SET q:1 v\nSET q:2 v\nSET keep v\n");
    // A self-signed certificate: `#insecure` skips verification.
    let url = format!("rediss://127.0.0.1:{port}/#insecure");
    let v = invalidate_pattern(&url, "q:*");
    assert_eq!(v["keys"], 2, "{v}");
    assert_eq!(tls_cli("DBSIZE\n").trim(), "1");
    // Plain text to a TLS-only port is refused, naming the server.
    let out = reentry(&[
        &"cache",
        &"invalidate",
        &"--url",
        &format!("redis://127.0.0.1:{port}"),
        &"--pattern",
        &"q:*",
        &"--apply",
    ]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains(&format!("Redis at redis://127.0.0.1:{port}")),
        "{}",
        stderr(&out)
    );
}

/// A primary of a cluster: its id, host:port, and slot ranges.
type Primary = (String, String, Vec<(u16, u16)>);

fn cluster_nodes_of(addr: &str) -> Vec<Primary> {
    cli(addr, false, "CLUSTER NODES\n")
        .lines()
        .filter(|l| l.contains("master"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let hostport = f[1].split('@').next().unwrap().to_owned();
            let ranges = f[8..]
                .iter()
                .filter(|r| !r.starts_with('['))
                .map(|r| match r.split_once('-') {
                    Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
                    None => (r.parse().unwrap(), r.parse().unwrap()),
                })
                .collect();
            (f[0].to_owned(), hostport, ranges)
        })
        .collect()
}

/// Starts moving `key`'s slot from its owner to another primary, and
/// migrates the key: the slot is MIGRATING on the owner, IMPORTING on the
/// other. With `finish`, the slot then belongs to the other on every node.
fn migrate(addrs: &[String], key: &str, finish: bool) -> (String, String) {
    let slot: u16 = cli(&addrs[0], false, &format!("CLUSTER KEYSLOT {key}\n"))
        .trim()
        .parse()
        .unwrap();
    let nodes = cluster_nodes_of(&addrs[0]);
    let owner = nodes
        .iter()
        .find(|n| n.2.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
        .unwrap()
        .clone();
    let other = nodes.iter().find(|n| n.0 != owner.0).unwrap().clone();
    cli(
        &other.1,
        false,
        &format!("CLUSTER SETSLOT {slot} IMPORTING {}\n", owner.0),
    );
    cli(
        &owner.1,
        false,
        &format!("CLUSTER SETSLOT {slot} MIGRATING {}\n", other.0),
    );
    let (host, port) = other.1.rsplit_once(':').unwrap();
    let out = cli(
        &owner.1,
        false,
        &format!("MIGRATE {host} {port} \"\" 0 5000 KEYS {key}\n"),
    );
    assert!(out.contains("OK"), "MIGRATE: {out}");
    if finish {
        for n in &nodes {
            cli(
                &n.1,
                false,
                &format!("CLUSTER SETSLOT {slot} NODE {}\n", other.0),
            );
        }
    }
    (owner.1, other.1)
}

#[test]
fn a_slot_that_moved_or_is_migrating_under_a_connected_client_is_followed() {
    let dir = tempfile::tempdir().unwrap();
    let c = OwnCluster::start(dir.path());
    let addrs = c.addrs();
    cli(
        &addrs[0],
        true,
        "SET moved-key v\nSET asked-key v\nSET stays v\n",
    );
    let url = format!("redis://{}", addrs[0]);
    let mut r = reentry::cache::Redis::connect(&url, &url, true, &Default::default()).unwrap();

    // The slot map reentry read is stale now: MOVED, a new map, and the
    // key unlinked where it lives.
    let (from, to) = migrate(&addrs, "moved-key", true);
    assert_ne!(from, to);
    assert_eq!(r.unlink(&["moved-key".to_owned()]).unwrap(), 1);

    // A slot halfway through migrating: ASK, then ASKING on the target.
    migrate(&addrs, "asked-key", false);
    assert_eq!(r.unlink(&["asked-key".to_owned()]).unwrap(), 1);
    assert_eq!(keys(&addrs, ""), vec!["stays".to_owned()]);
}

/// The SCAN tuner reads the server's own time per call. A server that has
/// never run SCAN has no `cmdstat_scan` line when a run starts: the tuner
/// must find it once there is one, not fall back to round trips for good
/// (they hold the unlinks and the network, and kept COUNT near 10). Counted
/// in the server's own record.
#[test]
fn a_pattern_scan_on_a_fresh_server_tunes_count_from_the_servers_own_stats() {
    let dir = tempfile::tempdir().unwrap();
    let redis = OwnRedis::start(&dir.path().join("redis"), &[]);
    let addr = redis.addr();
    // MSET lines of 200 pairs: `cli` reads the answers only at the end.
    let mut seed = String::new();
    for chunk in (0..20_000).collect::<Vec<_>>().chunks(100) {
        seed.push_str("MSET");
        for i in chunk {
            seed.push_str(&format!(" m:{i} v o:{i} v"));
        }
        seed.push('\n');
    }
    cli(&addr, false, &seed);
    let stat = |name: &str| -> u64 {
        cli(&addr, false, "INFO commandstats\n")
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("cmdstat_{name}:calls=")))
            .and_then(|v| v.split(',').next()?.parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(stat("scan"), 0, "the server has run no SCAN yet");
    let url = format!("redis://{addr}");
    let v = invalidate_pattern(&url, "m:*");
    assert_eq!(v["keys"], 20_000, "{v}");
    // The peer's own count: all m:* gone, every o:* left.
    assert_eq!(cli(&addr, false, "DBSIZE\n").trim(), "20000");
    assert!(cli(&addr, false, "EXISTS m:0 m:19999\n").trim() == "0");
    // 40,000 keys at COUNT 100 or more is at most 400 calls (and a few
    // while COUNT settles); at COUNT 10 it would be 4,000.
    let scans = stat("scan");
    assert!(scans < 1_000, "{scans} SCAN calls for 40,000 keys");
}

/// `--help` shows which variable feeds each option but never its value: a
/// Redis URL carries its password, a Kafka user or a key path is not for
/// whoever reads a pasted help text.
#[test]
fn help_never_shows_the_values_of_environment_variables() {
    for (cmd, var, value) in [
        (
            &["cache", "invalidate", "--help"][..],
            "REENTRY_REDIS_URL",
            "redis://:s3cr3t@h:1",
        ),
        (
            &["cache", "invalidate", "--help"][..],
            "REENTRY_REDIS_TLS_KEY",
            "/s3cr3t/key.pem",
        ),
        (
            &["kafka", "group", "--help"][..],
            "REENTRY_KAFKA_SASL_USERNAME",
            "s3cr3t-user",
        ),
        (
            &["backup", "--help"][..],
            "REENTRY_AGE_IDENTITY_FILE",
            "/s3cr3t/id",
        ),
    ] {
        let out = Command::new(reentry_bin())
            .args(cmd)
            .env(var, value)
            .output()
            .unwrap();
        assert_exit(&out, 0);
        let text = stdout(&out);
        assert!(text.contains(var), "{cmd:?} names {var}:\n{text}");
        assert!(
            !text.contains("s3cr3t"),
            "{cmd:?} shows {var}'s value:\n{text}"
        );
    }
}

#[test]
fn cache_invalidate_without_apply_counts_and_unlinks_nothing() {
    let addr = redis_addr();
    let url = format!("redis://{addr}");
    let prefix = format!("{}:", unique("invalidate_dry"));
    let mut seed = String::new();
    for i in 0..30 {
        seed.push_str(&format!("SET {prefix}{i} v\n"));
    }
    cli(&addr, false, &seed);
    let nodes = [addr.clone()];
    let pattern = format!("{prefix}*");
    let ids = std::env::temp_dir().join(format!("{}ids", unique("invalidate_dry")));
    std::fs::write(&ids, "1\n2\n3\n").unwrap();
    let template = format!("{prefix}{{id}}");
    for by in [
        vec!["--pattern", pattern.as_str()],
        vec![
            "--template",
            template.as_str(),
            "--ids",
            ids.to_str().unwrap(),
        ],
    ] {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
            vec![&"--json", &"cache", &"invalidate", &"--url", &url];
        for a in &by {
            args.push(a);
        }
        let out = reentry(&args);
        // A dry run with keys to unlink is a plan with changes.
        assert_exit(&out, 1);
        assert!(stderr(&out).contains("pass --apply"), "{}", stderr(&out));
        let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert_eq!(v["dry-run"], true, "{v}");
        assert_eq!(
            keys(&nodes, &prefix).len(),
            30,
            "{by:?} unlinked keys without --apply"
        );
    }
    let v = invalidate_pattern(&url, &pattern);
    assert_eq!(v["keys"], 30, "{v}");
    assert!(keys(&nodes, &prefix).is_empty());
    let _ = std::fs::remove_file(&ids);
}
