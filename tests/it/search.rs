//! Search index steps against the SEARCH DOUBLE (tests/it/common/
//! search_double.rs): no Elasticsearch or OpenSearch can be installed
//! here. Every test here says so in its name (`double`). The double keeps
//! the documented semantics of the endpoints used; what went and what
//! stayed is read from the double's own state, not from reentry's word.

use serde_json::{json, Value};

use crate::caches::{apply_cmd, done_effect, plan_steps, reentry, step, CacheWorld};
use crate::common::search_double::SearchDouble;
use crate::common::{assert_exit, stderr, stdout};

const MIN: i64 = 60_000;

/// The SQL that makes a case's document, on either database.
const DOCUMENTS: &str = "SELECT id::text AS id, (extract(epoch FROM updated_at) * 1000)::int8 AS version, jsonb_build_object('title', title, 'status', status) AS doc FROM cases";

/// The index as the application left it, projected from current: every
/// case's document at its row's version, cases 20-22 closed by the bad
/// job. Behind alias `cases`.
fn project(w: &CacheWorld, d: &SearchDouble, index: &str, alias: &str) {
    d.create(index, Some(alias));
    let mut c = w.cluster.db_client("cur");
    let sql = format!("SELECT id, version, doc::text FROM ({DOCUMENTS}) d");
    for r in c.query(&sql, &[]).unwrap() {
        let doc: Value = serde_json::from_str(r.get(2)).unwrap();
        d.put(index, r.get::<_, &str>(0), r.get(1), doc);
    }
}

fn search_toml(d: &SearchDouble, name: &str, index: &str, rest: &str) -> String {
    format!(
        r#"[[search]]
name = "{name}"
url = "{url}"
index = "{index}"
{rest}
"#,
        url = d.url
    )
}

#[test]
fn double_targeted_reindex_puts_repaired_rows_back_and_a_late_writer_cannot_undo_it() {
    let w = CacheWorld::new("search-targeted");
    let d = SearchDouble::start();
    project(&w, &d, "cases-v1", "cases");
    let pb = w.playbook(&search_toml(
        &d,
        "cases-index",
        "cases",
        &format!("strategy = \"targeted\"\ntable = \"cases\"\nupdated-at = \"updated_at\"\ndocuments = \"{DOCUMENTS}\"\nbatch-size = 4"),
    ));
    let plan = plan_steps(&pb);
    // Without a run only updated-at names entities: cases 1-10.
    assert_eq!(
        step(&plan, "search-targeted:cases-index")["preview"]["count"],
        10
    );
    let stale = d.docs("cases")["20"].clone();
    assert_eq!(stale.1["status"], "closed");

    // The server refuses three requests and two bulk items with 429: the
    // step retries and succeeds.
    d.fail_next(3);
    d.reject_items(2);
    let run = w.dir.join("run");
    let out = apply_cmd(&pb, &run, &[]).output().unwrap();
    assert_exit(&out, 0);
    let docs = d.docs("cases");
    for id in ["20", "21", "22"] {
        assert_eq!(docs[id].1["status"], "open", "document {id} repaired");
    }
    assert_eq!(docs.len(), 50);
    let e = done_effect(&run, "search-targeted:cases-index");
    assert_eq!(e["detail"]["after"], 13, "{e:#}");

    // A replay of the bad job's event, at its version: refused.
    let late = d.write_as_app(
        "cases",
        "20",
        stale.0,
        json!({"title": "case 20", "status": "closed"}),
    );
    assert_eq!(late["status"], 409, "{late}");
    assert_eq!(d.docs("cases")["20"].1["status"], "open");
    // A genuinely newer write still wins.
    let newer = d.write_as_app(
        "cases",
        "20",
        stale.0 + 1,
        json!({"title": "case 20", "status": "escalated"}),
    );
    assert_eq!(newer["status"], 200, "{newer}");
}

#[test]
fn double_delete_by_query_is_one_task_polled_again_after_a_kill() {
    let w = CacheWorld::new("search-dbq");
    let d = SearchDouble::start();
    d.create("events", None);
    for i in 0..30 {
        d.put(
            "events",
            &format!("b{i}"),
            1,
            json!({ "at": w.t - 10 * MIN + i }),
        );
    }
    for i in 0..12 {
        d.put(
            "events",
            &format!("a{i}"),
            1,
            json!({ "at": crate::reconcile::ts(w.t + MIN + i) }),
        );
    }
    let pb = w.playbook(&search_toml(
        &d,
        "events",
        "events",
        "strategy = \"delete-by-query\"\ntimestamp-field = \"at\"",
    ));
    assert_eq!(
        step(&plan_steps(&pb), "search-delete-by-query:events")["preview"]["count"],
        12
    );

    let run = w.dir.join("run");
    crate::common::kill_at_pause(
        apply_cmd(&pb, &run, &[]),
        "search-delete-by-query:events:task",
    );
    assert_eq!(d.tasks(), 1);
    let out = apply_cmd(&pb, &run, &["--resume"]).output().unwrap();
    assert_exit(&out, 0);
    // The resumed run polled the task it had started: no second one.
    assert_eq!(d.tasks(), 1);
    let left = d.docs("events");
    assert_eq!(left.len(), 30);
    assert!(left.keys().all(|k| k.starts_with('b')), "{left:?}");
    let e = done_effect(&run, "search-delete-by-query:events");
    assert_eq!(e["count"], 12, "{e:#}");
    assert_eq!(e["detail"]["task"], "double-node:1");
}

#[test]
fn double_rebuild_builds_a_new_index_moves_the_alias_at_once_and_keeps_the_old_one() {
    let w = CacheWorld::new("search-rebuild");
    let d = SearchDouble::start();
    project(&w, &d, "cases-v1", "cases");
    // A document for a case the database does not have: gone after.
    d.put(
        "cases-v1",
        "999",
        1,
        json!({"title": "ghost", "status": "open"}),
    );
    let pb = w.playbook(&search_toml(
        &d,
        "cases-index",
        "cases",
        &format!("strategy = \"rebuild\"\ndocuments = \"{DOCUMENTS}\"\nbatch-size = 7"),
    ));
    let run = w.dir.join("run");
    let out = apply_cmd(&pb, &run, &[]).output().unwrap();
    assert_exit(&out, 0);
    let now = d.alias("cases");
    assert_eq!(now.len(), 1);
    assert_ne!(now[0], "cases-v1");
    assert!(
        d.indices().contains(&"cases-v1".to_owned()),
        "the old index is kept"
    );
    let docs = d.docs("cases");
    assert_eq!(docs.len(), 50, "built from the repaired database");
    assert!(!docs.contains_key("999"));
    assert_eq!(docs["21"].1["status"], "open");
    // One _aliases request moved it: remove and add together.
    assert_eq!(
        d.log()
            .iter()
            .filter(|l| l.starts_with("POST /_aliases"))
            .count(),
        1
    );
    let report = reentry(&[&"report", &run]);
    assert!(
        stdout(&report).contains("the old index cases-v1 is kept"),
        "{}",
        stdout(&report)
    );
}

#[test]
fn double_a_rebuild_hook_is_journaled_with_its_exit_code_and_output() {
    let w = CacheWorld::new("search-hook");
    let d = SearchDouble::start();
    let pb = w.playbook(&search_toml(
        &d,
        "hooked",
        "cases",
        "strategy = \"rebuild-hook\"\nrebuild-hook = \"echo rebuilding $REENTRY_SEARCH_INDEX after $REENTRY_T\"",
    ));
    let run = w.dir.join("run");
    let out = apply_cmd(&pb, &run, &[]).output().unwrap();
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
        &d,
        "hooked",
        "cases",
        "strategy = \"rebuild-hook\"\nrebuild-hook = \"echo no space left >&2; exit 3\"",
    ));
    let out = apply_cmd(&pb, &w.dir.join("failing"), &[])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(said.contains("exited 3: no space left"), "{said}");
}

#[test]
fn double_targeted_delete_with_an_api_key_never_shows_it_and_a_4xx_names_the_index() {
    let w = CacheWorld::new("search-auth");
    let d = SearchDouble::start();
    project(&w, &d, "cases-v1", "cases");
    d.require_auth("ApiKey s3cret-search-key");
    let pb = w.playbook(&search_toml(
        &d,
        "cases-index",
        "cases",
        "strategy = \"targeted\"\ntable = \"cases\"\nupdated-at = \"updated_at\"\napi-key = \"${SEARCH_KEY}\"",
    ));
    let run = w.dir.join("run");
    let out = apply_cmd(&pb, &run, &[])
        .env("SEARCH_KEY", "s3cret-search-key")
        .output()
        .unwrap();
    assert_exit(&out, 0);
    let docs = d.docs("cases");
    // Cases 1-10 (after T) and 20-22 (repaired) deleted: the application
    // projects them again from the survivor.
    assert_eq!(docs.len(), 50 - 13);
    for f in ["plan.json", "journal.jsonl"] {
        assert!(!std::fs::read_to_string(run.join(f))
            .unwrap()
            .contains("s3cret-search-key"));
    }
    assert!(
        !stdout(&out).contains("s3cret-search-key") && !stderr(&out).contains("s3cret-search-key")
    );

    // An index that does not exist: a clear error naming it.
    let pb = w.playbook(&search_toml(&d, "nope", "no-such-index", "strategy = \"targeted\"\ntable = \"cases\"\nupdated-at = \"updated_at\"\napi-key = \"${SEARCH_KEY}\""));
    let out = std::process::Command::new(crate::common::reentry_bin())
        .args(["plan"])
        .arg(&pb)
        .env("SEARCH_KEY", "s3cret-search-key")
        .output()
        .unwrap();
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        said.contains("index no-such-index") && said.contains("HTTP 404"),
        "{said}"
    );
}
