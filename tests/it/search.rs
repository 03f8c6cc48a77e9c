//! Search index steps against a real OpenSearch 2.19 node (the one
//! `scripts/services` starts, or one a test starts for itself). What went
//! and what stayed is read from the node's own record (`_count`,
//! `_search`, `_cat/aliases`, `_tasks`, the `.tasks` index), never from
//! reentry's word. Every index is created with no replica and no periodic
//! refresh: a search sees only what was refreshed on purpose, so a step
//! that forgot to refresh shows.

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::caches::{apply_cmd, done_effect, plan_steps, reentry, step, CacheWorld};
use crate::common::search::{Indexes, Node, OwnNode, Wiretap};
use crate::common::{assert_exit, stderr, stdout};
use crate::reconcile::ts;

const MIN: i64 = 60_000;

/// The SQL that makes a case's document, on either database.
const DOCUMENTS: &str = "SELECT id::text AS id, (extract(epoch FROM updated_at) * 1000)::int8 AS version, jsonb_build_object('title', title, 'status', status) AS doc FROM cases";

fn case_mappings() -> Value {
    json!({ "title": { "type": "text" }, "status": { "type": "keyword" } })
}

/// The index as the application left it, projected from current: every
/// case's document at its row's version, cases 20-22 closed by the bad
/// job. Behind `alias`.
fn project(w: &CacheWorld, node: &Node, index: &str, alias: &str) {
    node.create(index, Some(alias), case_mappings());
    let mut c = w.cluster.db_client("cur");
    let sql = format!("SELECT id, version, doc::text FROM ({DOCUMENTS}) d");
    let docs: Vec<(String, i64, Value)> = c
        .query(&sql, &[])
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                r.get(1),
                serde_json::from_str(r.get(2)).unwrap(),
            )
        })
        .collect();
    node.put_all(index, &docs);
}

fn search_toml(url: &str, name: &str, index: &str, rest: &str) -> String {
    format!(
        r#"[[search]]
name = "{name}"
url = "{url}"
index = "{index}"
{rest}
"#
    )
}

/// Event documents: `before` with `at` before T, `after` after it, ids
/// `b…` and `a…`, in a date field of the node's default format.
fn events(node: &Node, index: &str, t: i64, before: usize, after: usize, shards: u32) {
    node.ok(
        "PUT",
        &format!("/{index}"),
        Some(json!({
            "settings": { "number_of_shards": shards, "number_of_replicas": 0, "refresh_interval": "-1" },
            "mappings": { "properties": { "at": { "type": "date" } } },
        })),
    );
    let mut docs = Vec::new();
    for i in 0..before {
        docs.push((
            format!("b{i}"),
            1,
            json!({ "at": ts(t - 10 * MIN - i as i64) }),
        ));
    }
    for i in 0..after {
        docs.push((format!("a{i}"), 1, json!({ "at": ts(t + MIN + i as i64) })));
    }
    node.put_all(index, &docs);
}

fn after_t(t: i64) -> Value {
    json!({ "range": { "at": { "gt": t, "format": "epoch_millis" } } })
}

/// An apply hung at `point` (a test hook): the step before it has done
/// all it does. The caller looks, then kills it.
fn paused_at(mut cmd: Command, point: &str) -> Child {
    use std::io::{BufRead, BufReader};
    let mut child = cmd
        .env("REENTRY_PAUSE_AT", point)
        .env("REENTRY_TEST_HOOKS", "hang-at-pause-points")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = String::new();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    while let Some(line) = lines.next() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("paused at") {
            // Keep draining stderr so the paused process never blocks on it.
            std::thread::spawn(move || lines.for_each(drop));
            return child;
        }
    }
    panic!("apply never reached {point} ({:?}): {seen}", child.wait());
}

/// The task id a delete-by-query step journaled.
fn journaled_task(run: &Path, step: &str) -> String {
    let text = std::fs::read_to_string(run.join("journal.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["event"] == "prior" && r["step"] == format!("{step}#task"))
        .find_map(|r| r["data"]["task"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("{step} journaled no task: {text}"))
}

#[test]
fn a_late_writer_with_an_older_version_cannot_undo_a_targeted_reindex() {
    let w = CacheWorld::new("search-targeted");
    let ix = Indexes::new("search-targeted");
    let node = &ix.node;
    let (index, alias) = (ix.name("cases-v1"), ix.name("cases"));
    project(&w, node, &index, &alias);
    // The bad job's events were projected with their own time as the
    // version, after T: newer than the row the repair puts back.
    let stale = w.t + 2 * MIN;
    let closed: Vec<(String, i64, Value)> = (20..=22)
        .map(|id| {
            (
                id.to_string(),
                stale,
                json!({ "title": format!("case {id}"), "status": "closed" }),
            )
        })
        .collect();
    node.put_all(&index, &closed);
    let pb = w.playbook(&search_toml(
        &node.url,
        "cases-index",
        &alias,
        &format!("strategy = \"targeted\"\ntable = \"cases\"\nupdated-at = \"updated_at\"\ndocuments = \"{DOCUMENTS}\"\nbatch-size = 4"),
    ));
    let plan = plan_steps(&pb);
    // Without a run only updated-at names entities: cases 1-10.
    assert_eq!(
        step(&plan, "search-targeted:cases-index")["preview"]["count"],
        10
    );

    let run = w.dir.join("run");
    let out = apply_cmd(&pb, &run, &[]).output().unwrap();
    assert_exit(&out, 0);
    let docs = node.docs(&alias);
    assert_eq!(docs.len(), 50);
    for id in ["20", "21", "22"] {
        assert_eq!(docs[id].1["status"], "open", "document {id} repaired");
        // Written at the stored version (external_gte): the row's own
        // version, older, would have been refused.
        assert_eq!(docs[id].0, stale, "document {id}'s version");
    }
    let e = done_effect(&run, "search-targeted:cases-index");
    assert_eq!(e["detail"]["after"], 13, "{e:#}");

    // A replay of the bad job's event, at its version or an older one:
    // refused by the node.
    for version in [stale, stale - MIN] {
        let (status, answer) = node.write_as_app(
            &alias,
            "20",
            version,
            json!({"title": "case 20", "status": "closed"}),
        );
        assert_eq!(status, 409, "{answer}");
        assert_eq!(answer["error"]["type"], "version_conflict_engine_exception");
    }
    node.refresh(&alias);
    assert_eq!(node.docs(&alias)["20"].1["status"], "open");
    // A genuinely newer write still wins.
    let (status, answer) = node.write_as_app(
        &alias,
        "20",
        stale + 1,
        json!({"title": "case 20", "status": "escalated"}),
    );
    assert_eq!(status, 200, "{answer}");
}

#[test]
fn delete_by_query_killed_mid_task_is_resumed_on_the_same_task_and_never_started_twice() {
    let w = CacheWorld::new("search-dbq");
    let ix = Indexes::new("search-dbq");
    let node = ix.node.clone();
    let index = ix.name("events");
    // Two shards: slices=auto runs a slice on each, as child tasks.
    events(&node, &index, w.t, 30, 3000, 2);
    // Throttled to 500 documents a second in batches of 500 (the throttle
    // waits between batches), the task takes seconds: long enough to be
    // killed under and found running again.
    let pb = w.playbook(&search_toml(
        &node.url,
        "events",
        &index,
        "strategy = \"delete-by-query\"\ntimestamp-field = \"at\"\nrequests-per-second = 500\nbatch-size = 500",
    ));
    assert_eq!(
        step(&plan_steps(&pb), "search-delete-by-query:events")["preview"]["count"],
        3000
    );

    // Every delete-by-query task the node runs on the index, sampled from
    // _tasks for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (node, index, stop) = (node.clone(), index.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seen = BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                seen.extend(node.running_delete_by_query(&index));
                std::thread::sleep(Duration::from_millis(50));
            }
            seen
        })
    };

    let run = w.dir.join("run");
    crate::common::kill_at_pause(
        apply_cmd(&pb, &run, &[]),
        "search-delete-by-query:events:task",
    );
    let task = journaled_task(&run, "search-delete-by-query:events");
    // reentry is dead; its task runs on, throttled as asked.
    assert_eq!(
        node.running_delete_by_query(&index),
        std::slice::from_ref(&task)
    );
    let status = node.ok("GET", &format!("/_tasks/{task}"), None);
    assert_eq!(status["completed"], false, "{status}");
    // Its slices, one per shard, share the throttle.
    let mut waited = 0;
    let slices = loop {
        let v = node.ok(
            "GET",
            &format!("/_tasks?parent_task_id={task}&detailed=true"),
            None,
        );
        let rps: Vec<f64> = v["nodes"]
            .as_object()
            .into_iter()
            .flat_map(|o| o.values())
            .flat_map(|n| n["tasks"].as_object().unwrap().values())
            .map(|t| t["status"]["requests_per_second"].as_f64().unwrap())
            .collect();
        if rps.len() == 2 || waited > 50 {
            break rps;
        }
        waited += 1;
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(slices, [250.0, 250.0]);

    let out = apply_cmd(&pb, &run, &["--resume"]).output().unwrap();
    assert_exit(&out, 0);
    stop.store(true, Ordering::Relaxed);
    let mut seen = sampler.join().unwrap();
    // The resumed run polled the task it had started: the node ran one,
    // and stored one result.
    let finished = node.finished_delete_by_query(&index);
    assert_eq!(finished, std::slice::from_ref(&task));
    seen.extend(finished);
    assert_eq!(seen, BTreeSet::from([task.clone()]));
    // What a search sees right after the run, without a refresh of ours.
    assert_eq!(node.count(&index, after_t(w.t)), 0);
    assert_eq!(node.count_all(&index), 30);
    let e = done_effect(&run, "search-delete-by-query:events");
    assert_eq!(e["count"], 3000, "{e:#}");
    assert_eq!(e["detail"]["task"], task.as_str());
    let done = node.ok("GET", &format!("/_tasks/{task}"), None);
    assert_eq!(done["response"]["requests_per_second"], 500.0, "{done}");
    assert_eq!(done["response"]["deleted"], 3000, "{done}");
}

/// Each index's own `refresh_interval`, as the node keeps it (none: unset).
fn refresh_interval(node: &Node, index: &str) -> Option<String> {
    let v = node.ok("GET", &format!("/{index}/_settings"), None);
    v[index]["settings"]["index"]["refresh_interval"]
        .as_str()
        .map(str::to_owned)
}

#[test]
fn delete_by_query_pauses_refresh_and_puts_each_indexs_own_interval_back_after_a_crash() {
    let w = CacheWorld::new("search-dbq-refresh");
    let ix = Indexes::new("search-dbq-refresh");
    let node = ix.node.clone();
    // Behind one alias: an index refreshing every 7s, and one with no
    // interval of its own (the server's default).
    let (set, unset, alias) = (ix.name("events-a"), ix.name("events-b"), ix.name("events"));
    events(&node, &set, w.t, 30, 1500, 1);
    events(&node, &unset, w.t, 30, 1500, 1);
    let settings = |index: &str, value: Value| {
        node.ok(
            "PUT",
            &format!("/{index}/_settings"),
            Some(json!({ "index": { "refresh_interval": value } })),
        );
    };
    settings(&set, json!("7s"));
    settings(&unset, Value::Null);
    node.ok(
        "POST",
        "/_aliases",
        Some(json!({ "actions": [
            { "add": { "index": set, "alias": alias } },
            { "add": { "index": unset, "alias": alias } },
        ] })),
    );
    assert_eq!(refresh_interval(&node, &set).as_deref(), Some("7s"));
    assert_eq!(refresh_interval(&node, &unset), None);
    let toml = |rest: &str| {
        search_toml(
            &node.url,
            "events",
            &alias,
            &format!("strategy = \"delete-by-query\"\ntimestamp-field = \"at\"\nrequests-per-second = 500\nbatch-size = 500\n{rest}"),
        )
    };
    let pb = w.playbook(&toml(""));
    let plan = plan_steps(&pb);
    let preview = &step(&plan, "search-delete-by-query:events")["preview"];
    assert!(
        preview["summary"].as_str().unwrap().contains("refresh off"),
        "{preview}"
    );

    // Killed while its task runs: both indexes have refresh off.
    let run = w.dir.join("run");
    crate::common::kill_at_pause(
        apply_cmd(&pb, &run, &[]),
        "search-delete-by-query:events:task",
    );
    assert_eq!(refresh_interval(&node, &set).as_deref(), Some("-1"));
    assert_eq!(refresh_interval(&node, &unset).as_deref(), Some("-1"));
    // What it will put back, journaled before the first change.
    let text = std::fs::read_to_string(run.join("journal.jsonl")).unwrap();
    let journaled = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|r| r["event"] == "prior" && r["step"] == "search-delete-by-query:events")
        .unwrap_or_else(|| panic!("no prior: {text}"));
    assert_eq!(
        journaled["data"]["refresh"],
        json!({ set.clone(): "7s", unset.clone(): null }),
        "{journaled}"
    );
    // Resumed: the intervals journaled before the change come back, not
    // the -1 the resumed run found.
    let out = apply_cmd(&pb, &run, &["--resume"]).output().unwrap();
    assert_exit(&out, 0);
    assert_eq!(refresh_interval(&node, &set).as_deref(), Some("7s"));
    assert_eq!(refresh_interval(&node, &unset), None);
    assert_eq!(node.count(&alias, after_t(w.t)), 0);
    assert_eq!(node.count_all(&alias), 60);

    // pause-refresh = false: refresh stays as it was during the task.
    for index in [&set, &unset] {
        node.ok("DELETE", &format!("/{index}"), None);
    }
    events(&node, &set, w.t, 30, 1500, 1);
    settings(&set, json!("7s"));
    node.ok(
        "POST",
        "/_aliases",
        Some(json!({ "actions": [{ "add": { "index": set, "alias": alias } }] })),
    );
    let kept = w.dir.join("kept.toml");
    std::fs::write(
        &kept,
        std::fs::read_to_string(&pb).unwrap().replace(
            "batch-size = 500\n",
            "batch-size = 500\npause-refresh = false\n",
        ),
    )
    .unwrap();
    let run = w.dir.join("run-kept");
    crate::common::kill_at_pause(
        apply_cmd(&kept, &run, &[]),
        "search-delete-by-query:events:task",
    );
    assert_eq!(refresh_interval(&node, &set).as_deref(), Some("7s"));
    let out = apply_cmd(&kept, &run, &["--resume"]).output().unwrap();
    assert_exit(&out, 0);
    assert_eq!(refresh_interval(&node, &set).as_deref(), Some("7s"));
    assert_eq!(node.count(&alias, after_t(w.t)), 0);

    // Refresh already off (the user's choice, or an abandoned run's): left
    // off, and said so, not taken for the interval to put back.
    node.ok("DELETE", &format!("/{set}"), None);
    events(&node, &set, w.t, 30, 1500, 1);
    node.ok(
        "POST",
        "/_aliases",
        Some(json!({ "actions": [{ "add": { "index": set, "alias": alias } }] })),
    );
    let run = w.dir.join("run-off");
    let out = apply_cmd(&pb, &run, &[]).output().unwrap();
    assert_exit(&out, 0);
    assert_eq!(refresh_interval(&node, &set).as_deref(), Some("-1"));
    let e = done_effect(&run, "search-delete-by-query:events");
    assert!(
        e["summary"]
            .as_str()
            .unwrap()
            .contains(&format!("refresh_interval was already -1 on {set}")),
        "{e:#}"
    );
    assert_eq!(node.count(&alias, after_t(w.t)), 0);
}

#[test]
fn delete_by_query_killed_before_its_task_id_is_journaled_finds_its_task_and_starts_no_second() {
    let w = CacheWorld::new("search-dbq-unjournaled");
    let ix = Indexes::new("search-dbq-unjournaled");
    let node = ix.node.clone();
    let index = ix.name("events");
    events(&node, &index, w.t, 30, 3000, 2);
    let pb = w.playbook(&search_toml(
        &node.url,
        "events",
        &index,
        "strategy = \"delete-by-query\"\ntimestamp-field = \"at\"\nrequests-per-second = 500\nbatch-size = 500",
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (node, index, stop) = (node.clone(), index.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seen = BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                seen.extend(node.running_delete_by_query(&index));
                std::thread::sleep(Duration::from_millis(50));
            }
            seen
        })
    };
    let run = w.dir.join("run");
    // Killed after the task started and before its id reached the journal:
    // the journal holds the count before, and no task.
    crate::common::kill_at_pause(
        apply_cmd(&pb, &run, &[]),
        "search-delete-by-query:events:task-started",
    );
    let journal = std::fs::read_to_string(run.join("journal.jsonl")).unwrap();
    assert!(!journal.contains("#task"), "{journal}");
    let running = node.running_delete_by_query(&index);
    assert_eq!(running.len(), 1, "{running:?}");

    let out = apply_cmd(&pb, &run, &["--resume"]).output().unwrap();
    assert_exit(&out, 0);
    stop.store(true, Ordering::Relaxed);
    let mut seen = sampler.join().unwrap();
    // The node ran one task, the one killed run started, and the resumed
    // run journaled and polled that one.
    let finished = node.finished_delete_by_query(&index);
    assert_eq!(finished, running);
    seen.extend(finished);
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), running);
    assert_eq!(
        journaled_task(&run, "search-delete-by-query:events"),
        running[0]
    );
    assert_eq!(node.count(&index, after_t(w.t)), 0);
    assert_eq!(node.count_all(&index), 30);
    let e = done_effect(&run, "search-delete-by-query:events");
    // Counted before the task started, not after its partial deletion.
    assert_eq!(e["detail"]["before"], 3000, "{e:#}");
    assert_eq!(e["count"], 3000, "{e:#}");
}

#[test]
fn a_document_written_during_the_delete_by_query_is_a_version_conflict_kept_and_reported() {
    let w = CacheWorld::new("search-dbq-conflict");
    let ix = Indexes::new("search-dbq-conflict");
    let node = &ix.node;
    let index = ix.name("events");
    events(node, &index, w.t, 30, 3000, 1);
    let pb = w.playbook(&search_toml(
        &node.url,
        "events",
        &index,
        "strategy = \"delete-by-query\"\ntimestamp-field = \"at\"\nrequests-per-second = 500\nbatch-size = 500",
    ));
    let run = w.dir.join("run");
    crate::common::kill_at_pause(
        apply_cmd(&pb, &run, &[]),
        "search-delete-by-query:events:task",
    );
    let task = journaled_task(&run, "search-delete-by-query:events");
    // A writer the gates did not stop rewrites the documents after T while
    // the throttled task works through its snapshot of them.
    let mut lines = String::new();
    for i in 0..3000 {
        lines.push_str(&format!(
            "{}\n{}\n",
            json!({ "index": { "_index": index, "_id": format!("a{i}") } }),
            json!({ "at": ts(w.t + MIN + i), "rewritten": true })
        ));
    }
    node.bulk(&lines);
    let done = loop {
        let v = node.ok("GET", &format!("/_tasks/{task}"), None);
        if v["completed"] == true {
            break v["response"].clone();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // conflicts=proceed: the task went through its whole snapshot; each
    // document rewritten before its turn is a conflict, not a failure.
    assert_eq!(done["failures"], json!([]), "{done}");
    let conflicts = done["version_conflicts"].as_u64().unwrap();
    assert!(conflicts > 0, "{done}");
    assert_eq!(
        done["deleted"].as_u64().unwrap() + conflicts,
        3000,
        "{done}"
    );

    // The resumed run polls that task, finds the writes kept, and says so.
    let out = apply_cmd(&pb, &run, &["--resume"]).output().unwrap();
    assert_exit(&out, 2);
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        said.contains("remain after task")
            && said.contains(&format!("{conflicts} version conflict(s)")),
        "{said}"
    );
    assert_eq!(node.finished_delete_by_query(&index), [task]);
}

#[test]
fn delete_by_query_compares_t_with_a_date_of_any_format_and_with_epoch_millis() {
    let w = CacheWorld::new("search-dbq-formats");
    let ix = Indexes::new("search-dbq-formats");
    let node = &ix.node;
    // The same events three ways: a date with the default format, a date
    // with a format of its own, and epoch milliseconds in a long.
    let kinds = [
        ("iso", json!({ "type": "date" })),
        (
            "local",
            json!({ "type": "date", "format": "yyyy-MM-dd HH:mm:ss.SSS" }),
        ),
        ("millis", json!({ "type": "long" })),
    ];
    let mut toml = String::new();
    for (name, mapping) in &kinds {
        let index = ix.name(name);
        node.create(&index, None, json!({ "at": mapping }));
        let at = |ms: i64| match *name {
            "iso" => json!(ts(ms)),
            "local" => json!(ts(ms).replace('T', " ").trim_end_matches('Z').to_owned()),
            _ => json!(ms),
        };
        let docs: Vec<(String, i64, Value)> = (0..5)
            .map(|i| (format!("b{i}"), 1, json!({ "at": at(w.t - MIN - i) })))
            .chain((0..7).map(|i| (format!("a{i}"), 1, json!({ "at": at(w.t + MIN + i) }))))
            .collect();
        node.put_all(&index, &docs);
        toml.push_str(&search_toml(
            &node.url,
            name,
            &index,
            "strategy = \"delete-by-query\"\ntimestamp-field = \"at\"",
        ));
    }
    let pb = w.playbook(&toml);
    let plan = plan_steps(&pb);
    for (name, _) in &kinds {
        assert_eq!(
            step(&plan, &format!("search-delete-by-query:{name}"))["preview"]["count"],
            7,
            "{name}"
        );
    }
    let out = apply_cmd(&pb, &w.dir.join("run"), &[]).output().unwrap();
    assert_exit(&out, 0);
    for (name, _) in &kinds {
        let left = node.docs(&ix.name(name));
        assert_eq!(left.len(), 5, "{name}: {left:?}");
        assert!(left.keys().all(|k| k.starts_with('b')), "{name}: {left:?}");
    }
}

#[test]
fn a_timestamp_field_the_index_does_not_map_as_a_date_is_a_configuration_error() {
    let w = CacheWorld::new("search-dbq-field");
    let ix = Indexes::new("search-dbq-field");
    let node = &ix.node;
    let index = ix.name("events");
    node.create(
        &index,
        None,
        json!({ "at": { "type": "date" }, "kind": { "type": "keyword" } }),
    );
    node.put_all(
        &index,
        &[("a0".into(), 1, json!({ "at": ts(w.t + MIN), "kind": "x" }))],
    );
    for (field, says) in [
        ("occurred_at", "does not map `occurred_at`"),
        ("kind", "`kind` (timestamp-field) is mapped as keyword"),
    ] {
        let pb = w.playbook(&search_toml(
            &node.url,
            "events",
            &index,
            &format!("strategy = \"delete-by-query\"\ntimestamp-field = \"{field}\""),
        ));
        let out = reentry(&[&"plan", &pb]);
        assert_exit(&out, 78);
        let said = format!("{}{}", stdout(&out), stderr(&out));
        assert!(
            said.contains(&format!("index {index}")) && said.contains(says),
            "{said}"
        );
    }
    node.refresh(&index);
    assert_eq!(node.count_all(&index), 1, "nothing deleted");
}

#[test]
fn each_step_leaves_what_it_did_visible_to_the_next_search() {
    let w = CacheWorld::new("search-refresh");
    let ix = Indexes::new("search-refresh");
    let node = &ix.node;
    let events_index = ix.name("events");
    events(node, &events_index, w.t, 4, 6, 1);
    let (cases, rebuilt) = (ix.name("cases"), ix.name("rebuilt"));
    project(&w, node, &format!("{cases}-v1"), &cases);
    project(&w, node, &format!("{rebuilt}-v1"), &rebuilt);
    let ghost = [(
        "999".to_owned(),
        1,
        json!({ "title": "ghost", "status": "open" }),
    )];
    node.put_all(&format!("{rebuilt}-v1"), &ghost);
    let mut toml = search_toml(
        &node.url,
        "events",
        &events_index,
        "strategy = \"delete-by-query\"\ntimestamp-field = \"at\"",
    );
    toml.push_str(&search_toml(&node.url, "cases", &cases, &format!("strategy = \"targeted\"\ntable = \"cases\"\nupdated-at = \"updated_at\"\ndocuments = \"{DOCUMENTS}\"")));
    toml.push_str(&search_toml(
        &node.url,
        "rebuilt",
        &rebuilt,
        &format!("strategy = \"rebuild\"\ndocuments = \"{DOCUMENTS}\""),
    ));
    let pb = w.playbook(&toml);
    let run = w.dir.join("run");
    // Each step is looked at as it finishes, the run hung right after it;
    // the next one is then resumed. The indexes never refresh on their
    // own, and the test never refreshes them.
    let mut child = paused_at(
        apply_cmd(&pb, &run, &[]),
        "search-delete-by-query:events:done",
    );
    assert_eq!(node.count(&events_index, after_t(w.t)), 0);
    assert_eq!(node.count_all(&events_index), 4);
    child.kill().unwrap();
    child.wait().unwrap();

    let mut child = paused_at(
        apply_cmd(&pb, &run, &["--resume"]),
        "search-targeted:cases:done",
    );
    let docs = node.docs(&cases);
    for id in ["20", "21", "22"] {
        assert_eq!(docs[id].1["status"], "open", "document {id}");
    }
    assert!(docs["1"].1["title"]
        .as_str()
        .unwrap()
        .ends_with("(after T)"));
    child.kill().unwrap();
    child.wait().unwrap();

    let mut child = paused_at(
        apply_cmd(&pb, &run, &["--resume"]),
        "search-rebuild:rebuilt:done",
    );
    let docs = node.docs(&rebuilt);
    assert_eq!(docs.len(), 50);
    assert!(!docs.contains_key("999"));
    child.kill().unwrap();
    child.wait().unwrap();

    let out = apply_cmd(&pb, &run, &["--resume"]).output().unwrap();
    assert_exit(&out, 0);
}

#[test]
fn a_rebuild_moves_the_alias_in_one_call_keeps_the_old_index_and_no_reader_sees_it_empty_or_doubled(
) {
    let w = CacheWorld::new("search-rebuild");
    let ix = Indexes::new("search-rebuild");
    let node = ix.node.clone();
    let (old, alias) = (ix.name("cases-v1"), ix.name("cases"));
    project(&w, &node, &old, &alias);
    // A document for a case the database does not have: 51 in the old
    // index, 50 in the new one.
    node.put_all(
        &old,
        &[("999".into(), 1, json!({"title": "ghost", "status": "open"}))],
    );
    // reentry talks to the node through a wiretap, which counts its calls.
    let tap = Wiretap::on(&node);
    let pb = w.playbook(&search_toml(
        &tap.url,
        "cases-index",
        &alias,
        &format!("strategy = \"rebuild\"\ndocuments = \"{DOCUMENTS}\"\nbatch-size = 7"),
    ));

    // A reader searches the alias in a loop for the whole run.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (node, alias, stop) = (node.clone(), alias.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut counts = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let (status, v) = node.call(
                    "POST",
                    &format!("/{alias}/_search"),
                    Some(json!({ "size": 0, "track_total_hits": true })),
                );
                counts.push(if status == 200 {
                    v["hits"]["total"]["value"].as_i64().unwrap()
                } else {
                    -(status as i64)
                });
            }
            counts
        })
    };
    let run = w.dir.join("run");
    let out = apply_cmd(&pb, &run, &[]).output().unwrap();
    // A few searches after the swap too.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let counts = reader.join().unwrap();
    assert_exit(&out, 0);
    let distinct: BTreeSet<i64> = counts.iter().copied().collect();
    // Never none (0, or an error for a missing alias), never both (101).
    assert_eq!(
        distinct,
        BTreeSet::from([50, 51]),
        "{} searches",
        counts.len()
    );
    assert_eq!(counts.first(), Some(&51));
    assert_eq!(counts.last(), Some(&50));
    assert_eq!(tap.requests("POST /_aliases"), 1);

    let now = node.alias(&alias);
    assert_eq!(now.len(), 1);
    assert_ne!(now[0], old);
    assert!(ix.all().contains(&old), "the old index is kept");
    // The new index has the old one's settings: no replica, hence green
    // on one node, where the server's default (one replica) stays yellow.
    let health = node.ok("GET", &format!("/_cluster/health/{}", now[0]), None);
    assert_eq!(health["status"], "green", "{health}");
    let docs = node.docs(&alias);
    assert_eq!(docs.len(), 50, "built from the repaired database");
    assert!(!docs.contains_key("999"));
    assert_eq!(docs["21"].1["status"], "open");
    let report = reentry(&[&"report", &run]);
    assert!(
        stdout(&report).contains(&format!("the old index {old} is kept")),
        "{}",
        stdout(&report)
    );
}

#[test]
fn a_rebuild_hook_is_journaled_with_its_exit_code_and_output() {
    let w = CacheWorld::new("search-hook");
    let url = crate::common::search::search_url();
    let pb = w.playbook(&search_toml(
        &url,
        "hooked",
        "cases",
        "strategy = \"rebuild-hook\"\nrebuild-hook = \"echo rebuilding $REENTRY_SEARCH_INDEX after $REENTRY_T\"",
    ));
    let run = w.dir.join("run");
    // A shell command, run as the operator: named by the plan, and run by
    // --apply only with --allow-hooks.
    let plan = reentry(&[&"plan", &pb]);
    assert!(
        stdout(&plan).contains(
            "runs a shell command from the playbook, as you, with --apply --allow-hooks only: \
             search[1].rebuild-hook (hooked): `echo rebuilding"
        ),
        "{}",
        stdout(&plan)
    );
    let refused = apply_cmd(&pb, &run, &[]).output().unwrap();
    assert_exit(&refused, 64);
    assert!(
        stderr(&refused)
            .contains("runs 1 shell command(s) as you; read them, then add --allow-hooks")
            && stderr(&refused).contains("search[1].rebuild-hook (hooked): echo rebuilding"),
        "{}",
        stderr(&refused)
    );
    assert!(!run.exists(), "a refused apply made its run directory");
    let refused = apply_cmd(&pb, &run, &["--json"]).output().unwrap();
    assert_exit(&refused, 64);
    let v: serde_json::Value = serde_json::from_slice(&refused.stdout).unwrap();
    assert_eq!(
        v["hooks"][0]["at"], "search[1].rebuild-hook (hooked)",
        "{v}"
    );

    let out = apply_cmd(&pb, &run, &["--allow-hooks"]).output().unwrap();
    assert_exit(&out, 0);
    let e = done_effect(&run, "search-hook:hooked");
    assert_eq!(e["detail"]["exit-code"], 0);
    assert!(
        e["detail"]["output"]
            .as_str()
            .unwrap()
            .starts_with("rebuilding cases after 20"),
        "{e:#}"
    );

    let pb = w.playbook(&search_toml(
        &url,
        "hooked",
        "cases",
        "strategy = \"rebuild-hook\"\nrebuild-hook = \"echo no space left >&2; exit 3\"",
    ));
    let out = apply_cmd(&pb, &w.dir.join("failing"), &["--allow-hooks"])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(said.contains("exited 3: no space left"), "{said}");
}

#[test]
fn an_api_key_is_sent_to_the_server_and_never_shown() {
    let w = CacheWorld::new("search-auth");
    let ix = Indexes::new("search-auth");
    let node = &ix.node;
    let (index, alias) = (ix.name("cases-v1"), ix.name("cases"));
    project(&w, node, &index, &alias);
    // OpenSearch without its security plugin takes any credentials: the
    // wiretap shows the key went out on every request.
    let tap = Wiretap::on(node);
    let pb = w.playbook(&search_toml(
        &tap.url,
        "cases-index",
        &alias,
        "strategy = \"targeted\"\ntable = \"cases\"\nupdated-at = \"updated_at\"\napi-key = \"${SEARCH_KEY}\"",
    ));
    let run = w.dir.join("run");
    let out = apply_cmd(&pb, &run, &[])
        .env("SEARCH_KEY", "s3cret-search-key")
        .output()
        .unwrap();
    assert_exit(&out, 0);
    // Cases 1-10 (after T) and 20-22 (repaired) deleted: the application
    // projects them again from the survivor.
    assert_eq!(node.count_all(&alias), 50 - 13);
    let sent = tap.sent();
    let requests = sent.matches(" HTTP/1.1\r\n").count();
    assert!(requests > 0);
    assert_eq!(
        sent.to_ascii_lowercase()
            .matches("\r\nauthorization: apikey s3cret-search-key\r\n")
            .count(),
        requests,
        "every request carries the key"
    );
    for f in ["plan.json", "journal.jsonl"] {
        assert!(!std::fs::read_to_string(run.join(f))
            .unwrap()
            .contains("s3cret-search-key"));
    }
    assert!(
        !stdout(&out).contains("s3cret-search-key") && !stderr(&out).contains("s3cret-search-key")
    );
}

#[test]
fn a_missing_or_closed_index_is_a_configuration_error_naming_it_and_nothing_changes() {
    let w = CacheWorld::new("search-state");
    let ix = Indexes::new("search-state");
    let node = &ix.node;
    let closed = ix.name("closed");
    node.create(&closed, None, case_mappings());
    node.ok("POST", &format!("/{closed}/_close"), None);
    let missing = ix.name("missing");
    for (index, says) in [
        (&missing, "index_not_found_exception"),
        (&closed, "the index is closed: open it with POST"),
    ] {
        for strategy in [
            "strategy = \"targeted\"\ntable = \"cases\"\nupdated-at = \"updated_at\"",
            "strategy = \"delete-by-query\"\ntimestamp-field = \"at\"",
            &format!("strategy = \"rebuild\"\ndocuments = \"{DOCUMENTS}\""),
        ] {
            let pb = w.playbook(&search_toml(&node.url, "cases-index", index, strategy));
            let out = reentry(&[&"plan", &pb]);
            assert_exit(&out, 78);
            let said = format!("{}{}", stdout(&out), stderr(&out));
            assert!(
                said.contains(&format!("index {index}")) && said.contains(says),
                "{strategy}: {said}"
            );
            // apply checks the plan before its first change: the gates
            // stay open, the cases unrepaired.
            let run = w.dir.join(crate::common::unique("run"));
            let out = apply_cmd(&pb, &run, &[]).output().unwrap();
            assert_exit(&out, 78);
            let mut c = w.cluster.db_client("cur");
            let open: bool = c
                .query_one(
                    "SELECT enabled FROM system_gate WHERE gate_name = 'api-writes'",
                    &[],
                )
                .unwrap()
                .get(0);
            assert!(open, "{strategy}: the gate was closed");
            let status: String = c
                .query_one("SELECT status FROM cases WHERE id = 20", &[])
                .unwrap()
                .get(0);
            assert_eq!(status, "closed", "{strategy}: a row was repaired");
        }
    }
}

#[test]
fn rejections_with_429_are_retried_until_the_step_completes_with_the_right_counts() {
    // A node of this test's own with one write and one search thread and a
    // queue of one each, kept busy by other clients: the requests reentry
    // sends meet real rejections (HTTP 429, rejected_execution_exception on
    // OpenSearch, es_rejected_execution_exception on Elasticsearch), whole
    // searches and bulk items.
    let own = OwnNode::start(&[
        "thread_pool.write.size=1",
        "thread_pool.write.queue_size=1",
        "thread_pool.search.size=1",
        "thread_pool.search.queue_size=1",
    ]);
    let node = own.node.clone();
    let w = CacheWorld::new("search-429");
    let ix = Indexes::on(node.clone(), "search-429");
    let (index, alias) = (ix.name("cases-v1"), ix.name("cases"));
    project(&w, &node, &index, &alias);
    let load = ix.name("load");
    node.create(&load, None, json!({ "n": { "type": "long" } }));
    let pb = w.playbook(&search_toml(
        &node.url,
        "cases-index",
        &alias,
        &format!("strategy = \"targeted\"\ntable = \"cases\"\nupdated-at = \"updated_at\"\ndocuments = \"{DOCUMENTS}\"\nbatch-size = 1"),
    ));
    let before = node.rejected();

    let stop = Arc::new(AtomicBool::new(false));
    let mut loaders = Vec::new();
    for k in 0..6 {
        let (node, load, stop) = (node.clone(), load.clone(), stop.clone());
        loaders.push(std::thread::spawn(move || {
            let mut body = String::new();
            for i in 0..300 {
                body.push_str(&format!(
                    "{}\n{}\n",
                    json!({ "index": { "_index": load, "_id": format!("{k}-{i}") } }),
                    json!({ "n": i })
                ));
            }
            while !stop.load(Ordering::Relaxed) {
                if k % 2 == 0 {
                    let _ = node.call(
                        "POST",
                        &format!("/{load}/_search"),
                        Some(json!({ "query": { "range": { "n": { "gte": 10 } } } })),
                    );
                } else {
                    let _ = reqwest::blocking::Client::new()
                        .post(format!("{}/_bulk", node.url))
                        .header("Content-Type", "application/x-ndjson")
                        .body(body.clone())
                        .send();
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(500));
    let run = w.dir.join("run");
    let out = apply_cmd(&pb, &run, &[]).output().unwrap();
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        l.join().unwrap();
    }
    assert_exit(&out, 0);
    // reentry met 429s and retried them.
    let said = stderr(&out);
    let retried: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("HTTP 429") || l.contains("refused with 429"))
        .collect();
    assert!(!retried.is_empty(), "no 429 reached reentry: {said}");
    eprintln!(
        "reentry retried after a 429 {} times, e.g. {}",
        retried.len(),
        retried[0]
    );
    let after = node.rejected();
    for pool in ["write", "search"] {
        eprintln!(
            "{pool}: {} rejections during the run",
            after[pool] - before[pool]
        );
    }
    // Right counts: the 13 changed entities indexed again, the repaired
    // ones open, all 50 there.
    let e = done_effect(&run, "search-targeted:cases-index");
    assert_eq!(e["detail"]["after"], 13, "{e:#}");
    let docs = node.docs(&alias);
    assert_eq!(docs.len(), 50);
    for id in ["20", "21", "22"] {
        assert_eq!(docs[id].1["status"], "open", "document {id}");
    }
    assert!(docs["1"].1["title"]
        .as_str()
        .unwrap()
        .ends_with("(after T)"));
}

/// A hook gets PATH, HOME, LANG and what reentry gives it, not reentry's
/// credentials; a secret the playbook uses that it is handed on purpose
/// (`hook-env`) and prints is `<redacted>` in the journal and the report.
#[test]
fn a_rebuild_hook_gets_no_credentials_and_its_output_is_redacted() {
    let w = CacheWorld::new("search-hook-env");
    let url = crate::common::search::search_url();
    let pb = w.playbook(&search_toml(
        &url,
        "hooked",
        "cases",
        "strategy = \"rebuild-hook\"\napi-key = \"${HOOK_SEARCH_KEY}\"\nhook-env = [\"HOOK_SEARCH_KEY\"]\nrebuild-hook = \"env; echo key=$HOOK_SEARCH_KEY\"",
    ));
    let run = w.dir.join("run");
    // What it is handed is named where it is allowed.
    let refused = apply_cmd(&pb, &run, &[])
        .env("HOOK_SEARCH_KEY", "search-s3cr3t-hook-test")
        .output()
        .unwrap();
    assert_exit(&refused, 64);
    assert!(
        stderr(&refused).contains("echo key=$HOOK_SEARCH_KEY (with HOOK_SEARCH_KEY)"),
        "{}",
        stderr(&refused)
    );
    let out = apply_cmd(&pb, &run, &["--allow-hooks"])
        .env("AWS_SECRET_ACCESS_KEY", "aws-s3cr3t-hook-test")
        .env("HOOK_SEARCH_KEY", "search-s3cr3t-hook-test")
        .output()
        .unwrap();
    assert_exit(&out, 0);
    let e = done_effect(&run, "search-hook:hooked");
    let output = e["detail"]["output"].as_str().unwrap();
    assert!(output.contains("REENTRY_SEARCH_INDEX=cases"), "{output}");
    assert!(output.contains("key=<redacted>"), "{output}");
    assert!(!output.contains("AWS_SECRET_ACCESS_KEY"), "{output}");
    let report = reentry(&[&"report", &run]);
    let mut shown = format!("{}{}{}", stdout(&out), stderr(&out), stdout(&report));
    for f in std::fs::read_dir(&run).unwrap().flatten() {
        if f.path().is_file() {
            shown.push_str(&String::from_utf8_lossy(&std::fs::read(f.path()).unwrap()));
        }
    }
    for secret in ["aws-s3cr3t-hook-test", "search-s3cr3t-hook-test"] {
        assert!(!shown.contains(secret), "{secret} leaked");
    }
}

/// A hook that outlives `hook-timeout` fails the step, and goes with every
/// process it started.
#[test]
fn a_rebuild_hook_past_its_timeout_is_killed_with_its_children() {
    let w = CacheWorld::new("search-hook-timeout");
    let url = crate::common::search::search_url();
    let pb = w.playbook(&search_toml(
        &url,
        "hooked",
        "cases",
        "strategy = \"rebuild-hook\"\nhook-timeout = \"2s\"\nrebuild-hook = \"sleep 4711.5; echo woke\"",
    ));
    let started = std::time::Instant::now();
    let out = apply_cmd(&pb, &w.dir.join("run"), &["--allow-hooks"])
        .output()
        .unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    assert_ne!(out.status.code(), Some(0));
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        said.contains("the rebuild hook of hooked ran longer than 2s and was killed"),
        "{said}"
    );
    assert!(!running("sleep 4711.5"), "the hook's sleep still runs");
}

/// Whether a process whose command line holds `pattern` runs (pgrep).
fn running(pattern: &str) -> bool {
    let out = std::process::Command::new("pgrep")
        .args(["-f", pattern])
        .output()
        .unwrap();
    !out.stdout.is_empty()
}

/// Starts an apply whose hook is `hook` (it runs `sleep SECS`), waits
/// until that sleep runs, then sends reentry SIGINT `times` times (as a
/// terminal's Ctrl-C would: to reentry's process group, not the hook's)
/// and returns how the apply ended and what it said.
fn interrupt_hook(name: &str, hook: &str, sleep: &str, times: usize) -> (Output, Duration) {
    let w = CacheWorld::new(name);
    let url = crate::common::search::search_url();
    let pb = w.playbook(&search_toml(
        &url,
        "hooked",
        "cases",
        &format!("strategy = \"rebuild-hook\"\nrebuild-hook = \"{hook}\""),
    ));
    let child = apply_cmd(&pb, &w.dir.join("run"), &["--allow-hooks"])
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let since = Instant::now();
    while !running(sleep) {
        assert!(
            since.elapsed() < Duration::from_secs(120),
            "the hook never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let interrupted = Instant::now();
    for _ in 0..times {
        // SAFETY: signals reentry's own process group.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGINT) };
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = child.wait_with_output().unwrap();
    (out, interrupted.elapsed())
}

/// Reviewer's item 7: the hook runs in a process group of its own, which a
/// terminal's Ctrl-C does not reach. Ctrl-C stops it with reentry.
#[test]
fn ctrl_c_stops_a_running_rebuild_hook_with_its_children() {
    let (out, took) = interrupt_hook(
        "search-hook-int",
        "sleep 4713.5; echo woke",
        "sleep 4713.5",
        1,
    );
    assert_exit(&out, 2);
    assert!(
        stdout(&out).contains("interrupted") || stderr(&out).contains("interrupted"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(!running("sleep 4713.5"), "the hook outlived reentry");
    eprintln!("stopped {took:?} after Ctrl-C");
}

/// A hook that ignores SIGTERM holds the first Ctrl-C for its grace; a
/// second stops reentry at once, and the hook with it.
#[test]
fn a_second_ctrl_c_leaves_no_rebuild_hook_behind() {
    let (out, _) = interrupt_hook(
        "search-hook-int2",
        "trap '' TERM; sleep 4714.5; echo woke",
        "sleep 4714.5",
        2,
    );
    assert!(stderr(&out).contains("stopping now"), "{}", stderr(&out));
    assert!(!running("sleep 4714.5"), "the hook outlived reentry");
}

/// A hook runs in a process group of its own, so a reentry killed outright
/// (SIGKILL, the OOM killer) leaves it running. The resumed run stops it
/// before it starts the hook again: two rebuilds never race.
#[test]
fn a_resumed_run_stops_the_hook_a_killed_run_left_running() {
    let w = CacheWorld::new("search-hook-kill");
    let url = crate::common::search::search_url();
    let pb = w.playbook(&search_toml(
        &url,
        "hooked",
        "cases",
        "strategy = \"rebuild-hook\"\nrebuild-hook = \"if [ -e hook-ran ]; then echo second; else touch hook-ran; sleep 4716.5; fi\"",
    ));
    let run = w.dir.join("run");
    let mut child = apply_cmd(&pb, &run, &["--allow-hooks"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let since = Instant::now();
    while !running("sleep 4716.5") {
        assert!(
            since.elapsed() < Duration::from_secs(120),
            "the hook never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(running("sleep 4716.5"), "the killed run's hook runs on");

    let out = apply_cmd(&pb, &run, &["--allow-hooks", "--resume"])
        .output()
        .unwrap();
    let left = running("sleep 4716.5");
    let _ = Command::new("pkill")
        .args(["-9", "-f", "sleep 4716.5"])
        .status();
    assert_exit(&out, 0);
    assert!(!left, "the first hook still runs beside the second");
    let e = done_effect(&run, "search-hook:hooked");
    let output = e["detail"]["output"].as_str().unwrap();
    assert!(
        output.starts_with("[stopped what an earlier attempt's hook left running: process group ")
            && output.contains("second"),
        "{output}"
    );
}

/// A hook that leaves a process in the background holding its output
/// (`nohup … &`) does not hold the step once it has exited.
#[test]
fn a_rebuild_hook_that_leaves_a_background_process_is_not_waited_for() {
    let w = CacheWorld::new("search-hook-bg");
    let url = crate::common::search::search_url();
    let pb = w.playbook(&search_toml(
        &url,
        "hooked",
        "cases",
        "strategy = \"rebuild-hook\"\nrebuild-hook = \"nohup sleep 4715.5 & echo started\"",
    ));
    let run = w.dir.join("run");
    // Before: the step read the hook's output to its end, held open
    // for the sleep's 78 minutes.
    let out = apply_cmd(&pb, &run, &["--allow-hooks"]).output().unwrap();
    let _ = std::process::Command::new("pkill")
        .args(["-f", "sleep 4715.5"])
        .status();
    assert_exit(&out, 0);
    let e = done_effect(&run, "search-hook:hooked");
    let output = e["detail"]["output"].as_str().unwrap();
    assert!(
        output.starts_with("started") && output.contains("still holds its output"),
        "{output}"
    );
}

#[test]
fn an_index_name_that_is_a_pattern_or_a_list_is_refused_at_check_and_no_index_changes() {
    let w = CacheWorld::new("search-names");
    let ix = Indexes::new("search-names");
    let node = &ix.node;
    let (one, other) = (ix.name("one"), ix.name("other"));
    events(node, &one, w.t, 2, 3, 1);
    events(node, &other, w.t, 2, 3, 1);
    node.refresh(&one);
    node.refresh(&other);
    for index in [
        "*".to_owned(),
        format!("{one},{other}"),
        "_all".to_owned(),
        format!("{one}/_doc"),
    ] {
        let pb = w.playbook(&search_toml(
            &node.url,
            "events",
            &index,
            "strategy = \"delete-by-query\"\ntimestamp-field = \"at\"",
        ));
        let line = std::fs::read_to_string(&pb)
            .unwrap()
            .lines()
            .position(|l| l.starts_with("index = "))
            .unwrap()
            + 1;
        let out = reentry(&[&"playbook", &"check", &pb]);
        assert_exit(&out, 78);
        let said = stderr(&out);
        assert!(
            said.contains(&format!("{}:{line}:", pb.display())) && said.contains("an index name"),
            "{index}: {said}"
        );
        let run = w.dir.join(crate::common::unique("run"));
        let out = apply_cmd(&pb, &run, &[]).output().unwrap();
        assert_exit(&out, 78);
    }
    // The node's own count: every document of both indices is still there.
    assert_eq!(node.count_all(&one), 5);
    assert_eq!(node.count_all(&other), 5);
}

#[test]
fn a_delete_by_query_task_that_outlasts_task_timeout_fails_the_step_naming_it_and_runs_on() {
    let w = CacheWorld::new("search-dbq-timeout");
    let ix = Indexes::new("search-dbq-timeout");
    let node = ix.node.clone();
    let index = ix.name("events");
    events(&node, &index, w.t, 30, 3000, 1);
    node.ok(
        "PUT",
        &format!("/{index}/_settings"),
        Some(json!({ "index": { "refresh_interval": "7s" } })),
    );
    // 3000 documents at 100 a second: half a minute, against a 1 s wait.
    let pb = w.playbook(&search_toml(
        &node.url,
        "events",
        &index,
        "strategy = \"delete-by-query\"\ntimestamp-field = \"at\"\nrequests-per-second = 100\nbatch-size = 100\ntask-timeout = \"1s\"",
    ));
    let run = w.dir.join("run");
    let out = apply_cmd(&pb, &run, &[]).output().unwrap();
    assert_exit(&out, 2);
    let said = format!("{}{}", stdout(&out), stderr(&out));
    let task = journaled_task(&run, "search-delete-by-query:events");
    assert!(
        said.contains(&format!("task {task} still runs after 1s"))
            && said.contains(&format!("POST /_tasks/{task}/_cancel")),
        "{said}"
    );
    // The node's own list: the task runs on, as the error says.
    assert_eq!(
        node.running_delete_by_query(&index),
        std::slice::from_ref(&task)
    );
    // and the index refreshes again as it did before the step.
    assert_eq!(refresh_interval(&node, &index).as_deref(), Some("7s"));
    node.ok("POST", &format!("/_tasks/{task}/_cancel"), None);
}

/// A password with the characters a URL must percent-encode, written raw
/// or escaped: sent decoded (as the node receives it), and found in no
/// output, plan, journal or report.
#[test]
fn a_password_with_url_delimiters_is_sent_decoded_and_shown_nowhere() {
    let w = CacheWorld::new("search-url-secret");
    let ix = Indexes::new("search-url-secret");
    let node = ix.node.clone();
    let index = ix.name("events");
    events(&node, &index, w.t, 2, 3, 1);
    let tap = Wiretap::on(&node);
    let host = tap.url.trim_start_matches("http://");
    let redis = crate::common::services::redis_addr();
    // Everything a run shows and writes.
    let shown = |out: &std::process::Output, run: &Path| {
        let mut said = format!("{}{}", stdout(out), stderr(out));
        for f in std::fs::read_dir(run).into_iter().flatten().flatten() {
            said.push_str(&std::fs::read_to_string(f.path()).unwrap_or_default());
        }
        said
    };
    // From the environment, as a playbook takes secrets.
    let env = [("SEARCH_PW", "Zq9/s?e#c%40rt"), ("CACHE_PW", "Rk4/p?a#s@w")];
    let search = w.playbook(&search_toml(
        &format!("http://elastic:${{SEARCH_PW}}@{host}"),
        "events",
        &index,
        "strategy = \"delete-by-query\"\ntimestamp-field = \"at\"",
    ));
    let run = w.dir.join("search-run");
    let out = apply_cmd(&search, &run, &[]).envs(env).output().unwrap();
    assert_exit(&out, 0);
    let said = shown(&out, &run);
    for fragment in ["Zq9", "s?e#c", "rt@"] {
        assert!(!said.contains(fragment), "{fragment} shown: {said}");
    }
    // The node was asked with the password decoded.
    let b64 = std::process::Command::new("sh")
        .args(["-c", "printf %s 'elastic:Zq9/s?e#c@rt' | base64 -w0"])
        .output()
        .unwrap();
    let basic = format!(
        "authorization: basic {}",
        String::from_utf8_lossy(&b64.stdout).to_ascii_lowercase()
    );
    assert!(
        tap.sent().to_ascii_lowercase().contains(&basic),
        "{}",
        tap.sent()
    );

    // Redis refuses a URL whose password is not escaped: the run fails,
    // naming the cache without its password.
    let caches = w.playbook(&format!(
        "[[caches]]\nname = \"c\"\nurl = \"redis://:${{CACHE_PW}}@{redis}\"\ntable = \"cases\"\nupdated-at = \"updated_at\"\nkeys = [\"x:{{id}}\"]\n"
    ));
    let run = w.dir.join("caches-run");
    let out = apply_cmd(&caches, &run, &[]).envs(env).output().unwrap();
    assert_ne!(out.status.code(), Some(0), "{}", stdout(&out));
    let said = shown(&out, &run);
    for fragment in ["Rk4", "p?a#s", "s@w"] {
        assert!(!said.contains(fragment), "{fragment} shown: {said}");
    }
}
