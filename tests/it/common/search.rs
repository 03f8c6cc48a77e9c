//! The OpenSearch 2.19 node that `scripts/services` starts, asked directly
//! over its REST API (blocking reqwest): what a test counts comes from the
//! node's own record (`_count`, `_search`, `_cat/aliases`, `_tasks` and the
//! `.tasks` index), not from reentry's word. Each test works in indexes of
//! its own, named by `Indexes::new` and deleted when it drops.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use super::services::address;
use super::unique;

pub fn search_url() -> String {
    address("REENTRY_TEST_SEARCH", "OpenSearch")
}

/// A node, by URL: the shared one, or one a test started itself.
#[derive(Clone)]
pub struct Node {
    pub url: String,
    http: reqwest::blocking::Client,
}

impl Node {
    pub fn shared() -> Node {
        Node::at(&search_url())
    }

    pub fn at(url: &str) -> Node {
        Node {
            url: url.trim_end_matches('/').to_owned(),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap(),
        }
    }

    /// One request: the status and the JSON answer (`Null` when none).
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .unwrap_or_else(|e| panic!("OpenSearch at {}: {path}: {e}", self.url));
        let status = resp.status().as_u16();
        let text = resp.text().unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// A request that must succeed: its answer.
    pub fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(method, path, body);
        assert!(status < 300, "{method} {path}: HTTP {status}: {v}");
        v
    }

    /// A bulk request (NDJSON lines) that must succeed item by item.
    pub fn bulk(&self, lines: &str) {
        let resp = self
            .http
            .post(format!("{}/_bulk", self.url))
            .header("Content-Type", "application/x-ndjson")
            .body(lines.to_owned())
            .send()
            .unwrap();
        let status = resp.status().as_u16();
        let v: Value = resp.json().unwrap();
        assert!(
            status < 300 && v["errors"] == false,
            "_bulk: HTTP {status}: {v}"
        );
    }

    /// An index with one shard and no replica (one node: a replica would
    /// never be assigned) and no periodic refresh, so that a search sees
    /// only what was refreshed on purpose; behind `alias` when given.
    /// `properties` are its mappings.
    pub fn create(&self, index: &str, alias: Option<&str>, properties: Value) {
        let mut body = json!({
            "settings": { "number_of_shards": 1, "number_of_replicas": 0, "refresh_interval": "-1" },
            "mappings": { "properties": properties },
        });
        if let Some(a) = alias {
            body["aliases"] = json!({ a: {} });
        }
        self.ok("PUT", &format!("/{index}"), Some(body));
    }

    /// Documents at external versions, then a refresh: as an application
    /// that projects rows with their version would have left them.
    pub fn put_all(&self, index: &str, docs: &[(String, i64, Value)]) {
        for chunk in docs.chunks(2000) {
            let mut lines = String::new();
            for (id, version, doc) in chunk {
                lines.push_str(
                    &json!({ "index": { "_index": index, "_id": id, "version": version, "version_type": "external" } })
                        .to_string(),
                );
                lines.push('\n');
                lines.push_str(&doc.to_string());
                lines.push('\n');
            }
            self.bulk(&lines);
        }
        self.refresh(index);
    }

    pub fn refresh(&self, index: &str) {
        self.ok("POST", &format!("/{index}/_refresh"), None);
    }

    /// An application's write at an external version: the item's status
    /// and answer, 409 when the stored version wins.
    pub fn write_as_app(&self, index: &str, id: &str, version: i64, doc: Value) -> (u16, Value) {
        self.call(
            "PUT",
            &format!("/{index}/_doc/{id}?version={version}&version_type=external"),
            Some(doc),
        )
    }

    /// `_count` of `query`, as a search sees it now (no refresh).
    pub fn count(&self, index: &str, query: Value) -> u64 {
        self.ok(
            "POST",
            &format!("/{index}/_count"),
            Some(json!({ "query": query })),
        )["count"]
            .as_u64()
            .unwrap()
    }

    pub fn count_all(&self, index: &str) -> u64 {
        self.count(index, json!({ "match_all": {} }))
    }

    /// Every document a search of `index` (or an alias) finds now, with its
    /// version: id → (version, source). No refresh.
    pub fn docs(&self, index: &str) -> BTreeMap<String, (i64, Value)> {
        let v = self.ok(
            "POST",
            &format!("/{index}/_search"),
            Some(json!({ "size": 10_000, "version": true, "query": { "match_all": {} } })),
        );
        assert!(
            v["hits"]["total"]["value"].as_u64().unwrap() <= 10_000,
            "more documents than one search returns"
        );
        v["hits"]["hits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                (
                    h["_id"].as_str().unwrap().to_owned(),
                    (h["_version"].as_i64().unwrap(), h["_source"].clone()),
                )
            })
            .collect()
    }

    /// The indexes `alias` points to, from `_cat/aliases`.
    pub fn alias(&self, alias: &str) -> Vec<String> {
        let v = self.ok("GET", &format!("/_cat/aliases/{alias}?format=json"), None);
        let mut out: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["alias"] == alias)
            .map(|a| a["index"].as_str().unwrap().to_owned())
            .collect();
        out.sort();
        out
    }

    /// The indexes whose names start with `prefix`, open or closed.
    pub fn indices(&self, prefix: &str) -> Vec<String> {
        let v = self.ok(
            "GET",
            &format!("/_cat/indices/{prefix}*?format=json&h=index&expand_wildcards=all"),
            None,
        );
        let mut out: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["index"].as_str().unwrap().to_owned())
            .collect();
        out.sort();
        out
    }

    /// The delete-by-query tasks running now on `index` (their ids; the
    /// parents only, not a sliced task's children), from `_tasks`.
    pub fn running_delete_by_query(&self, index: &str) -> Vec<String> {
        let v = self.ok("GET", "/_tasks?actions=*delete/byquery&detailed=true", None);
        let mut out = Vec::new();
        for n in v["nodes"].as_object().into_iter().flat_map(|o| o.values()) {
            for (id, t) in n["tasks"].as_object().into_iter().flatten() {
                if t.get("parent_task_id").is_none() && describes(t, index) {
                    out.push(id.clone());
                }
            }
        }
        out
    }

    /// The delete-by-query tasks on `index` that completed and stored
    /// their result (`wait_for_completion=false` does): their ids, from
    /// the node's `.tasks` index.
    pub fn finished_delete_by_query(&self, index: &str) -> Vec<String> {
        let (status, _) = self.call("POST", "/.tasks/_refresh", None);
        if status == 404 {
            return Vec::new();
        }
        let v = self.ok(
            "POST",
            "/.tasks/_search",
            Some(json!({ "size": 10_000, "query": { "term": { "task.action": "indices:data/write/delete/byquery" } } })),
        );
        v["hits"]["hits"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| describes(&h["_source"]["task"], index))
            .map(|h| h["_id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Thread pool rejections on the node since it started, by pool.
    pub fn rejected(&self) -> BTreeMap<String, u64> {
        let v = self.ok("GET", "/_nodes/stats/thread_pool", None);
        let mut out = BTreeMap::new();
        for n in v["nodes"].as_object().unwrap().values() {
            for (pool, s) in n["thread_pool"].as_object().unwrap() {
                *out.entry(pool.clone()).or_default() += s["rejected"].as_u64().unwrap_or(0);
            }
        }
        out
    }
}

/// A task's description names the indexes it works on: `delete-by-query [a, b]`.
fn describes(task: &Value, index: &str) -> bool {
    task["description"]
        .as_str()
        .is_some_and(|d| d.contains(&format!("[{index}]")))
}

/// Index names of a test's own (all under `prefix`, which is unique to the
/// run and the test), deleted, every one the node holds under the prefix,
/// when this drops, even after a failed assertion.
pub struct Indexes {
    pub node: Node,
    pub prefix: String,
}

impl Indexes {
    pub fn new(test: &str) -> Indexes {
        Indexes::on(Node::shared(), test)
    }

    pub fn on(node: Node, test: &str) -> Indexes {
        Indexes {
            node,
            prefix: index_prefix(test),
        }
    }

    /// `prefix-name`: an index or alias name of this test's.
    pub fn name(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// Every index of this test's the node holds.
    pub fn all(&self) -> Vec<String> {
        self.node.indices(&format!("{}-", self.prefix))
    }
}

/// Index names must be lowercase, without `:`; a test's are its own.
pub fn index_prefix(test: &str) -> String {
    unique(test).to_lowercase().replace(['_', ':'], "-")
}

impl Drop for Indexes {
    fn drop(&mut self) {
        // Named one by one: a wildcard delete is refused where
        // action.destructive_requires_name is on (Elasticsearch 8's default).
        // `prefix-*`, not `prefix*`: test-1 must not take test-10's.
        let (status, v) = self.node.call(
            "GET",
            &format!(
                "/_cat/indices/{}-*?format=json&h=index&expand_wildcards=all",
                self.prefix
            ),
            None,
        );
        if status != 200 {
            return;
        }
        let names: Vec<&str> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["index"].as_str())
            .collect();
        if !names.is_empty() {
            self.node
                .call("DELETE", &format!("/{}", names.join(",")), None);
        }
    }
}

/// A TCP relay in front of a node that keeps a copy of every byte the
/// client sent, to show what went over the wire (a header, the number of
/// `_aliases` calls); the node itself answers every request.
pub struct Wiretap {
    pub url: String,
    sent: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Wiretap {
    pub fn on(node: &Node) -> Wiretap {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        let upstream = node
            .url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = sent.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (mut s_in, mut c_out) = (server, client);
                let log = log.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(n) = c_in.read(&mut buf) {
                        if n == 0 || s_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        log.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                    let _ = s_out.shutdown(std::net::Shutdown::Write);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s_in, &mut c_out);
                    let _ = c_out.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Wiretap { url, sent }
    }

    /// Everything clients sent so far, as text.
    pub fn sent(&self) -> String {
        String::from_utf8_lossy(&self.sent.lock().unwrap()).into_owned()
    }

    /// How many requests began with `line` (`POST /_aliases`).
    pub fn requests(&self, line: &str) -> usize {
        self.sent()
            .match_indices(&format!("{line} HTTP/1.1\r\n"))
            .count()
    }
}

/// A node of a test's own, started with `settings` (`key=value` node
/// settings) through servers/opensearch/start, and stopped when this drops.
pub struct OwnNode {
    pub node: Node,
    dir: tempfile::TempDir,
}

impl OwnNode {
    pub fn start(settings: &[&str]) -> OwnNode {
        let home = address("REENTRY_OPENSEARCH_HOME", "the OpenSearch install");
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/servers/opensearch/start"
        ))
        .arg(&home)
        .arg(dir.path())
        .args(settings)
        .output()
        .expect("run servers/opensearch/start");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let url = stdout
            .lines()
            .find_map(|l| l.strip_prefix("OPENSEARCH="))
            .unwrap_or_else(|| {
                panic!(
                    "servers/opensearch/start did not start a node: {}{}",
                    stdout,
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        OwnNode {
            node: Node::at(url),
            dir,
        }
    }
}

impl Drop for OwnNode {
    fn drop(&mut self) {
        let _ = std::process::Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/servers/opensearch/stop"
        ))
        .arg(self.dir.path())
        .status();
    }
}
