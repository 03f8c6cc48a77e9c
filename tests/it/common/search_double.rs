//! A TEST DOUBLE of Elasticsearch/OpenSearch: neither can be installed
//! here. It serves exactly the endpoints reentry and the lab (lab/, which
//! runs it as a process for the demo) use, with their
//! documented semantics (Elasticsearch 8 reference, "Document APIs",
//! "Optimistic concurrency control", "Index versioning", "Delete by query
//! API", "Task management API", "Aliases API", "Refresh API"):
//!
//! - a search (`_count`, `_search`, `_delete_by_query`) sees only what was
//!   refreshed;
//!   `_mget` is realtime;
//! - versions: `internal` (stored + 1), `external` (only greater than the
//!   stored version), `external_gte` (greater or equal); a delete leaves a
//!   tombstone whose version counts; `if_seq_no`/`if_primary_term` guard a
//!   write; a refused write is item status 409,
//!   `version_conflict_engine_exception`;
//! - `_bulk` answers per item; a delete of a missing document is item
//!   status 404, `not_found`, and not an error;
//! - `_delete_by_query?wait_for_completion=false` answers a task id; the
//!   task runs after its first poll, over a snapshot of what the search
//!   saw, and with `conflicts=proceed` counts documents changed since as
//!   version conflicts instead of failing;
//! - `_aliases` applies all its actions or none.
//!
//! Faults: `fail_next(n)` answers 429 to the next n requests;
//! `reject_items(n)` refuses the next n bulk items with 429.
//! Every request is logged for the tests to count.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

#[derive(Clone, Debug)]
struct Doc {
    source: Value,
    version: i64,
    seq_no: i64,
    deleted: bool,
}

#[derive(Default)]
struct Index {
    /// Every document and tombstone, realtime.
    docs: BTreeMap<String, Doc>,
    /// What a search sees: the documents as of the last refresh.
    visible: BTreeMap<String, Doc>,
    mappings: Value,
}

struct Task {
    index: String,
    query: Value,
    /// The documents the search saw when the task was made: id → seq_no.
    snapshot: Vec<(String, i64)>,
    polls: u32,
    response: Option<Value>,
}

#[derive(Default)]
struct State {
    indices: BTreeMap<String, Index>,
    aliases: BTreeMap<String, BTreeSet<String>>,
    tasks: BTreeMap<String, Task>,
    seq: i64,
    fail_next: u32,
    reject_items: u32,
    auth: Option<String>,
    log: Vec<String>,
}

#[derive(Clone)]
pub struct SearchDouble {
    pub url: String,
    state: Arc<Mutex<State>>,
}

type Answer = (u16, Value);

fn error(status: u16, kind: &str, reason: String) -> Answer {
    (
        status,
        json!({ "error": { "type": kind, "reason": reason }, "status": status }),
    )
}

fn millis(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => humantime::parse_rfc3339_weak(s.trim_end_matches('Z'))
            .or_else(|_| humantime::parse_rfc3339(s))
            .ok()
            .map(|t| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64),
        _ => None,
    }
}

/// The queries reentry sends: match_all, ids, range, term, bool.
fn matches(q: &Value, id: &str, source: &Value) -> bool {
    let Some((kind, body)) = q.as_object().and_then(|o| o.iter().next()) else {
        return true;
    };
    match kind.as_str() {
        "match_all" => true,
        "ids" => body["values"]
            .as_array()
            .is_some_and(|v| v.iter().any(|x| x == id)),
        "term" => {
            let (f, v) = body.as_object().unwrap().iter().next().unwrap();
            let v = v.get("value").unwrap_or(v);
            &source[f] == v
        }
        "range" => {
            let (f, c) = body.as_object().unwrap().iter().next().unwrap();
            let Some(x) = millis(&source[f]) else {
                return false;
            };
            let cmp = |op: &str, ok: fn(i64, i64) -> bool| {
                c.get(op).and_then(millis).is_none_or(|b| ok(x, b))
            };
            cmp("gt", |a, b| a > b)
                && cmp("gte", |a, b| a >= b)
                && cmp("lt", |a, b| a < b)
                && cmp("lte", |a, b| a <= b)
        }
        "bool" => ["must", "filter"].iter().all(|k| match &body[*k] {
            Value::Array(qs) => qs.iter().all(|q| matches(q, id, source)),
            Value::Null => true,
            q => matches(q, id, source),
        }),
        _ => panic!("the search double does not implement the {kind} query"),
    }
}

impl State {
    /// An index or an alias, as the one index it names.
    fn resolve(&self, name: &str) -> Result<String, Answer> {
        if self.indices.contains_key(name) {
            return Ok(name.to_owned());
        }
        match self.aliases.get(name) {
            Some(set) if set.len() == 1 => Ok(set.iter().next().unwrap().clone()),
            Some(_) => Err(error(
                400,
                "illegal_argument_exception",
                format!("alias [{name}] has more than one index associated with it"),
            )),
            None => Err(error(
                404,
                "index_not_found_exception",
                format!("no such index [{name}]"),
            )),
        }
    }

    fn count(&self, index: &str, query: &Value) -> Result<u64, Answer> {
        let i = self.resolve(index)?;
        Ok(self.indices[&i]
            .visible
            .iter()
            .filter(|(id, d)| !d.deleted && matches(query, id, &d.source))
            .count() as u64)
    }

    /// One bulk item: its answer object.
    fn write(&mut self, op: &str, meta: &Value, source: Option<Value>) -> Value {
        let name = meta["_index"].as_str().unwrap_or_default().to_owned();
        let id = meta["_id"].as_str().unwrap_or_default().to_owned();
        let fail = |status: u16, kind: &str, reason: String| {
            json!({ "_index": name, "_id": id, "status": status,
                    "error": { "type": kind, "reason": reason } })
        };
        if self.reject_items > 0 {
            self.reject_items -= 1;
            return fail(
                429,
                "es_rejected_execution_exception",
                "rejected execution (queue capacity reached)".into(),
            );
        }
        let index = match self.resolve(&name) {
            Ok(i) => i,
            Err((s, e)) => {
                return fail(
                    s,
                    e["error"]["type"].as_str().unwrap(),
                    e["error"]["reason"].to_string(),
                )
            }
        };
        self.seq += 1;
        let seq = self.seq;
        let idx = self.indices.get_mut(&index).unwrap();
        let stored = idx.docs.get(&id).cloned();
        let live = stored.as_ref().filter(|d| !d.deleted);
        let conflict = |reason: String| {
            json!({ "_index": index, "_id": id, "status": 409,
                    "error": { "type": "version_conflict_engine_exception", "reason": reason } })
        };
        if let Some(want) = meta["if_seq_no"].as_i64() {
            match live {
                Some(d) if d.seq_no == want && meta["if_primary_term"].as_i64() == Some(1) => {}
                _ => {
                    return conflict(format!(
                        "[{id}]: version conflict, required seqNo [{want}], current document has seqNo [{}]",
                        live.map_or(-1, |d| d.seq_no)
                    ))
                }
            }
        }
        let version = match meta["version_type"].as_str() {
            Some(vt @ ("external" | "external_gte")) => {
                let v = meta["version"].as_i64().unwrap();
                if let Some(s) = &stored {
                    let refused = if vt == "external" {
                        s.version >= v
                    } else {
                        s.version > v
                    };
                    if refused {
                        return conflict(format!(
                            "[{id}]: version conflict, current version [{}] is higher or equal to the one provided [{v}]",
                            s.version
                        ));
                    }
                }
                v
            }
            _ => stored.as_ref().map_or(1, |s| s.version + 1),
        };
        match op {
            "delete" => {
                if live.is_none() {
                    return json!({ "_index": index, "_id": id, "status": 404, "result": "not_found",
                                   "_version": version });
                }
                idx.docs.insert(
                    id.clone(),
                    Doc {
                        source: Value::Null,
                        version,
                        seq_no: seq,
                        deleted: true,
                    },
                );
                json!({ "_index": index, "_id": id, "status": 200, "result": "deleted",
                        "_version": version, "_seq_no": seq, "_primary_term": 1 })
            }
            _ => {
                if op == "create" && live.is_some() {
                    return conflict(format!("[{id}]: version conflict, document already exists"));
                }
                let created = live.is_none();
                idx.docs.insert(
                    id.clone(),
                    Doc {
                        source: source.unwrap_or(Value::Null),
                        version,
                        seq_no: seq,
                        deleted: false,
                    },
                );
                json!({ "_index": index, "_id": id,
                        "status": if created { 201 } else { 200 },
                        "result": if created { "created" } else { "updated" },
                        "_version": version, "_seq_no": seq, "_primary_term": 1 })
            }
        }
    }

    fn run_task(&mut self, id: &str) {
        let t = self.tasks.get_mut(id).unwrap();
        t.polls += 1;
        if t.response.is_some() || t.polls < 2 {
            return;
        }
        let (index, snapshot) = (t.index.clone(), t.snapshot.clone());
        let _ = &t.query;
        let (mut deleted, mut conflicts) = (0u64, 0u64);
        for (doc, seq_no) in &snapshot {
            let live = self.indices[&index]
                .docs
                .get(doc)
                .filter(|d| !d.deleted)
                .map(|d| d.seq_no);
            if live != Some(*seq_no) {
                conflicts += 1;
                continue;
            }
            let meta =
                json!({ "_index": index, "_id": doc, "if_seq_no": seq_no, "if_primary_term": 1 });
            let item = self.write("delete", &meta, None);
            if item["status"] == 200 {
                deleted += 1;
            }
        }
        let t = self.tasks.get_mut(id).unwrap();
        t.response = Some(json!({
            "total": snapshot.len(), "deleted": deleted, "version_conflicts": conflicts,
            "failures": [], "timed_out": false
        }));
    }

    fn handle(&mut self, method: &str, target: &str, auth: Option<&str>, body: &str) -> Answer {
        self.log.push(format!("{method} {target}"));
        if let Some(want) = &self.auth {
            if auth != Some(want.as_str()) {
                return error(
                    401,
                    "security_exception",
                    "missing authentication credentials".into(),
                );
            }
        }
        if self.fail_next > 0 {
            self.fail_next -= 1;
            return error(
                429,
                "es_rejected_execution_exception",
                "rejected execution (too many requests)".into(),
            );
        }
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let json_body = || serde_json::from_str::<Value>(body).unwrap_or(Value::Null);
        let result = (|| -> Result<Answer, Answer> {
            Ok(match (method, parts.as_slice()) {
                ("POST", ["_bulk"]) => {
                    let mut items = Vec::new();
                    let mut lines = body.lines().filter(|l| !l.trim().is_empty());
                    while let Some(l) = lines.next() {
                        let action: Value = serde_json::from_str(l).unwrap();
                        let (op, meta) = action.as_object().unwrap().iter().next().unwrap();
                        let source = if op == "delete" {
                            None
                        } else {
                            Some(serde_json::from_str(lines.next().unwrap()).unwrap())
                        };
                        let r = self.write(op, meta, source);
                        let mut item = serde_json::Map::new();
                        item.insert(op.clone(), r);
                        items.push(Value::Object(item));
                    }
                    let errors = items.iter().any(|i| {
                        i.as_object()
                            .unwrap()
                            .values()
                            .next()
                            .unwrap()
                            .get("error")
                            .is_some()
                    });
                    (200, json!({ "took": 1, "errors": errors, "items": items }))
                }
                ("POST", ["_aliases"]) => {
                    let actions = json_body()["actions"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    let mut next = self.aliases.clone();
                    for a in &actions {
                        let (op, b) = a.as_object().unwrap().iter().next().unwrap();
                        let (index, alias) =
                            (b["index"].as_str().unwrap(), b["alias"].as_str().unwrap());
                        if !self.indices.contains_key(index) {
                            return Err(error(
                                404,
                                "index_not_found_exception",
                                format!("no such index [{index}]"),
                            ));
                        }
                        let set = next.entry(alias.to_owned()).or_default();
                        if op == "remove" && !set.remove(index) {
                            return Err(error(
                                404,
                                "aliases_not_found_exception",
                                format!("aliases [{alias}] missing"),
                            ));
                        }
                        if op == "add" {
                            set.insert(index.to_owned());
                        }
                    }
                    next.retain(|_, s| !s.is_empty());
                    self.aliases = next;
                    (200, json!({ "acknowledged": true }))
                }
                ("GET", ["_alias", alias]) => {
                    let set = self.aliases.get(*alias).ok_or_else(|| {
                        error(
                            404,
                            "aliases_not_found_exception",
                            format!("alias [{alias}] missing"),
                        )
                    })?;
                    let o: serde_json::Map<String, Value> = set
                        .iter()
                        .map(|i| (i.clone(), json!({ "aliases": { *alias: {} } })))
                        .collect();
                    (200, Value::Object(o))
                }
                ("GET", ["_tasks", id]) => {
                    if !self.tasks.contains_key(*id) {
                        return Err(error(
                            404,
                            "resource_not_found_exception",
                            format!("task [{id}] isn't running and hasn't stored its results"),
                        ));
                    }
                    self.run_task(id);
                    let t = &self.tasks[*id];
                    match &t.response {
                        Some(r) => (
                            200,
                            json!({ "completed": true, "task": { "status": r }, "response": r }),
                        ),
                        None => (
                            200,
                            json!({ "completed": false, "task": { "status": { "total": t.snapshot.len(), "deleted": 0 } } }),
                        ),
                    }
                }
                ("PUT", [index]) => {
                    if self.indices.contains_key(*index) || self.aliases.contains_key(*index) {
                        return Err(error(
                            400,
                            "resource_already_exists_exception",
                            format!("index [{index}] already exists"),
                        ));
                    }
                    let mappings = json_body()["mappings"].clone();
                    self.indices.insert(
                        (*index).to_owned(),
                        Index {
                            mappings,
                            ..Index::default()
                        },
                    );
                    (200, json!({ "acknowledged": true, "index": index }))
                }
                ("GET", [name]) => {
                    let names: Vec<String> = match self.aliases.get(*name) {
                        Some(set) => set.iter().cloned().collect(),
                        None => vec![self.resolve(name)?],
                    };
                    let o: serde_json::Map<String, Value> = names
                        .iter()
                        .map(|i| {
                            (
                                i.clone(),
                                json!({ "mappings": self.indices[i].mappings, "settings": {} }),
                            )
                        })
                        .collect();
                    (200, Value::Object(o))
                }
                ("POST" | "GET", [index, "_count"]) => {
                    let q = json_body()["query"].clone();
                    (200, json!({ "count": self.count(index, &q)? }))
                }
                ("POST", [index, "_refresh"]) => {
                    let names: Vec<String> = match self.aliases.get(*index) {
                        Some(set) => set.iter().cloned().collect(),
                        None => vec![self.resolve(index)?],
                    };
                    for n in names {
                        let i = self.indices.get_mut(&n).unwrap();
                        i.visible = i.docs.clone();
                    }
                    (
                        200,
                        json!({ "_shards": { "total": 1, "successful": 1, "failed": 0 } }),
                    )
                }
                ("POST" | "GET", [index, "_search"]) => {
                    // `size` (default 10) caps the hits, in id order.
                    let i = self.resolve(index)?;
                    let b = json_body();
                    let size = b["size"].as_u64().unwrap_or(10) as usize;
                    let q = b["query"].clone();
                    let all: Vec<(&String, &Doc)> = self.indices[&i]
                        .visible
                        .iter()
                        .filter(|(id, d)| !d.deleted && matches(&q, id, &d.source))
                        .collect();
                    let hits: Vec<Value> = all
                        .iter()
                        .take(size)
                        .map(|(id, d)| {
                            let mut h = json!({ "_index": i, "_id": id, "_source": d.source });
                            // `"version": true` asks for each hit's version.
                            if b["version"] == json!(true) {
                                h["_version"] = json!(d.version);
                            }
                            h
                        })
                        .collect();
                    (
                        200,
                        json!({ "hits": { "total": { "value": all.len(), "relation": "eq" }, "hits": hits } }),
                    )
                }
                ("POST", [index, "_mget"]) => {
                    let i = self.resolve(index)?;
                    let docs: Vec<Value> = json_body()["ids"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .iter()
                        .map(|id| {
                            let id = id.as_str().unwrap();
                            match self.indices[&i].docs.get(id).filter(|d| !d.deleted) {
                                Some(d) => json!({ "_index": i, "_id": id, "found": true, "_version": d.version,
                                                   "_seq_no": d.seq_no, "_primary_term": 1 }),
                                None => json!({ "_index": i, "_id": id, "found": false }),
                            }
                        })
                        .collect();
                    (200, json!({ "docs": docs }))
                }
                ("POST", [index, "_delete_by_query"]) => {
                    assert!(
                        query.contains("wait_for_completion=false"),
                        "reentry runs delete-by-query as a task: {query}"
                    );
                    assert!(query.contains("conflicts=proceed"), "{query}");
                    let i = self.resolve(index)?;
                    let q = json_body()["query"].clone();
                    let snapshot: Vec<(String, i64)> = self.indices[&i]
                        .visible
                        .iter()
                        .filter(|(id, d)| !d.deleted && matches(&q, id, &d.source))
                        .map(|(id, d)| (id.clone(), d.seq_no))
                        .collect();
                    let id = format!("double-node:{}", self.tasks.len() + 1);
                    self.tasks.insert(
                        id.clone(),
                        Task {
                            index: i,
                            query: q,
                            snapshot,
                            polls: 0,
                            response: None,
                        },
                    );
                    (200, json!({ "task": id }))
                }
                _ => panic!("the search double does not implement {method} {target}"),
            })
        })();
        result.unwrap_or_else(|e| e)
    }
}

fn serve(state: Arc<Mutex<State>>, stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut it = line.split_whitespace();
        let (method, target) = (
            it.next().unwrap_or("").to_owned(),
            it.next().unwrap_or("").to_owned(),
        );
        let (mut len, mut auth) = (0usize, None);
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap_or((h, ""));
            match k.to_ascii_lowercase().as_str() {
                "content-length" => len = v.trim().parse().unwrap_or(0),
                "authorization" => auth = Some(v.trim().to_owned()),
                _ => {}
            }
        }
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let body = String::from_utf8_lossy(&body).into_owned();
        let (status, v) = state
            .lock()
            .unwrap()
            .handle(&method, &target, auth.as_deref(), &body);
        let text = v.to_string();
        let head = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            text.len()
        );
        if out
            .write_all(head.as_bytes())
            .and_then(|_| out.write_all(text.as_bytes()))
            .is_err()
        {
            return;
        }
    }
}

impl SearchDouble {
    /// Listens on a free loopback port, for the life of the test process.
    pub fn start() -> SearchDouble {
        SearchDouble::start_on("127.0.0.1:0")
    }

    /// Listens on `addr`, for the life of the process.
    pub fn start_on(addr: &str) -> SearchDouble {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("listen on {addr}: {e}"));
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let s = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let s = s.clone();
                std::thread::spawn(move || serve(s, stream));
            }
        });
        SearchDouble { url, state }
    }

    /// Requires this `Authorization` header value on every request.
    pub fn require_auth(&self, header: &str) {
        self.state.lock().unwrap().auth = Some(header.to_owned());
    }

    pub fn fail_next(&self, n: u32) {
        self.state.lock().unwrap().fail_next = n;
    }

    pub fn reject_items(&self, n: u32) {
        self.state.lock().unwrap().reject_items = n;
    }

    /// Requests seen so far, as `METHOD target`.
    pub fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }

    /// Creates `index` behind `alias` (when given).
    pub fn create(&self, index: &str, alias: Option<&str>) {
        let mut s = self.state.lock().unwrap();
        s.indices.insert(index.to_owned(), Index::default());
        if let Some(a) = alias {
            s.aliases
                .entry(a.to_owned())
                .or_default()
                .insert(index.to_owned());
        }
    }

    /// Indexes a document as an application does (external version), and
    /// refreshes.
    pub fn put(&self, index: &str, id: &str, version: i64, source: Value) {
        let mut s = self.state.lock().unwrap();
        let meta =
            json!({ "_index": index, "_id": id, "version": version, "version_type": "external" });
        let r = s.write("index", &meta, Some(source));
        assert!(r.get("error").is_none(), "{r}");
        let i = s.resolve(index).unwrap();
        let idx = s.indices.get_mut(&i).unwrap();
        idx.visible = idx.docs.clone();
    }

    /// A write as an application's late writer makes it (external
    /// version): the bulk item's answer.
    pub fn write_as_app(&self, index: &str, id: &str, version: i64, source: Value) -> Value {
        let meta =
            json!({ "_index": index, "_id": id, "version": version, "version_type": "external" });
        self.state
            .lock()
            .unwrap()
            .write("index", &meta, Some(source))
    }

    /// The live documents of an index or alias: id → (version, source).
    pub fn docs(&self, index: &str) -> BTreeMap<String, (i64, Value)> {
        let s = self.state.lock().unwrap();
        let i = s.resolve(index).unwrap();
        s.indices[&i]
            .docs
            .iter()
            .filter(|(_, d)| !d.deleted)
            .map(|(id, d)| (id.clone(), (d.version, d.source.clone())))
            .collect()
    }

    pub fn indices(&self) -> Vec<String> {
        self.state.lock().unwrap().indices.keys().cloned().collect()
    }

    pub fn alias(&self, alias: &str) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .aliases
            .get(alias)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Tasks created so far.
    pub fn tasks(&self) -> usize {
        self.state.lock().unwrap().tasks.len()
    }
}

/// The shared double of this test process.
pub fn shared() -> SearchDouble {
    static D: std::sync::OnceLock<SearchDouble> = std::sync::OnceLock::new();
    D.get_or_init(SearchDouble::start).clone()
}
