//! Elasticsearch 7/8 and OpenSearch 1/2 over their REST API (reqwest):
//! the endpoints a search invalidation uses and nothing more: `_count`,
//! `_delete_by_query` as a task, `_tasks`, `_mget`, `_bulk`, `_refresh`,
//! `_mapping/field`, `_settings`, index creation, `_alias` and `_aliases`.
//! They are tested against OpenSearch 2.19; where Elasticsearch 7/8 is
//! known to differ, the call says so.
//!
//! 429 and 5xx answers (and a connection refused) are retried with
//! backoff; any other 4xx is an error naming the index and the server's
//! reason. Credentials (basic auth, an API key, or a password in the URL)
//! are sent, never shown.

use std::time::Duration;

use serde_json::{json, Value};

use crate::tls_files::TlsFiles;

const TRIES: u32 = 8;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error(
        "search at {server}: index {index}: {what}: HTTP {status}: {kind}: {reason}{}",
        hint(kind, index)
    )]
    Http {
        server: String,
        index: String,
        what: &'static str,
        status: u16,
        /// The server's error type (`index_not_found_exception`, ...): the
        /// root cause's when there is one, since a search that failed on
        /// every shard says only `search_phase_execution_exception`.
        kind: String,
        reason: String,
    },
    /// reqwest's error is shown in the message (with its cause), not chained.
    #[error(
        "search at {server}: index {index}: {what}: {}",
        crate::diag::chain(error)
    )]
    Transport {
        server: String,
        index: String,
        what: String,
        error: reqwest::Error,
    },
    #[error("search at {server}: index {index}: {what}")]
    Other {
        server: String,
        index: String,
        what: String,
    },
}

/// What to do about the errors an operator can fix on the server.
fn hint(kind: &str, index: &str) -> String {
    match kind {
        "index_not_found_exception" => {
            format!(" (no index or alias `{index}` on this server: check the playbook's `index`)")
        }
        "index_closed_exception" => format!(
            " (the index is closed: open it with POST /{index}/_open, or name an open index)"
        ),
        _ => String::new(),
    }
}

impl SearchError {
    /// The index (or alias) is missing or closed: a fact about the server
    /// the playbook points at, not a fault that a retry could clear.
    pub fn is_unusable_index(&self) -> bool {
        matches!(self, SearchError::Http { kind, .. }
            if kind == "index_not_found_exception" || kind == "index_closed_exception")
    }

    pub fn is_transient(&self) -> bool {
        match self {
            SearchError::Http { status, .. } => *status == 429 || *status >= 500,
            SearchError::Transport { error, .. } => error.is_connect() || error.is_timeout(),
            SearchError::Other { .. } => false,
        }
    }
}

/// How to authenticate.
#[derive(Clone, Default)]
pub enum Auth {
    #[default]
    None,
    Basic {
        user: String,
        password: String,
    },
    ApiKey(String),
}

/// A document's version as the index holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub version: i64,
    pub seq_no: i64,
    pub primary_term: i64,
}

/// One item of a bulk request's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub id: String,
    pub status: u16,
    /// `created`, `updated`, `deleted`, `not_found`, or the error's type.
    pub result: String,
    pub reason: Option<String>,
}

pub struct Search {
    base: String,
    shown: String,
    auth: Auth,
    http: reqwest::blocking::Client,
}

/// `s` as one URL path segment: every byte but the unreserved ones
/// percent-encoded, so that no name can add a segment, a query or a
/// fragment to the request. Names are checked at playbook check time
/// too ([`index_name_problem`]); this is the second fence.
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Why `name` cannot be one index or alias, by Elasticsearch's and
/// OpenSearch's rules: a wildcard, a list, `_all` or a path would make a
/// delete-by-query reach other indices. None when it can.
pub fn index_name_problem(name: &str) -> Option<String> {
    const FORBIDDEN: &[char] = &['*', ',', '/', '?', '#', '\\', ' ', '"', '<', '>', '|', ':'];
    if name.is_empty() {
        return Some("an index name cannot be empty".into());
    }
    if name == "." || name == ".." {
        return Some(format!("`{name}` is not an index name"));
    }
    if let Some(c) = name.chars().find(|c| FORBIDDEN.contains(c)) {
        return Some(format!(
            "an index name cannot contain `{c}` (nor any of * , / ? # \\ space \" < > | :): it names one index or alias, never a pattern or a list"
        ));
    }
    if let Some(c) = name.chars().next().filter(|c| matches!(c, '_' | '-' | '+')) {
        return Some(format!("an index name cannot start with `{c}`"));
    }
    if name.chars().any(char::is_uppercase) {
        return Some("an index name must be lowercase".into());
    }
    if name.len() > 255 {
        return Some("an index name is at most 255 bytes".into());
    }
    None
}

/// `url` without its userinfo, and the user and password from it,
/// percent-decoded (see `cache::split_at_userinfo` for where it ends).
fn split_userinfo(url: &str) -> (String, Option<(String, String)>) {
    let Some((scheme, userinfo, rest)) = crate::cache::split_at_userinfo(url) else {
        return (url.to_owned(), None);
    };
    let (user, pass) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    (
        format!("{scheme}{rest}"),
        Some((
            crate::cache::percent_decode(user),
            crate::cache::percent_decode(pass),
        )),
    )
}

impl Search {
    /// `url` expanded; `shown` as the playbook writes it.
    /// With `tls`, the CA file is the only one trusted (as `curl --cacert`
    /// and libpq's `sslrootcert` do), and the client certificate is shown
    /// to servers that ask for one.
    pub fn new(url: &str, shown: &str, auth: Auth, tls: &TlsFiles) -> Result<Search, SearchError> {
        let (base, from_url) = split_userinfo(url.trim_end_matches('/'));
        let auth = match (auth, from_url) {
            (Auth::None, Some((user, password))) => Auth::Basic { user, password },
            (a, _) => a,
        };
        let setup = |what: String| SearchError::Other {
            server: crate::cache::redact_url(shown),
            index: "-".into(),
            what,
        };
        let mut builder = reqwest::blocking::Client::builder().timeout(TIMEOUT);
        if !tls.is_empty() && !base.starts_with("https://") {
            return Err(setup(
                "tls-ca, tls-certificate and tls-key need an https:// URL".into(),
            ));
        }
        if let Some(pem) = tls.ca_bytes().map_err(setup)? {
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                setup(format!(
                    "tls-ca: no PEM certificate in {:?}: {e}",
                    tls.ca
                        .as_deref()
                        .unwrap_or_else(|| std::path::Path::new(""))
                ))
            })?;
            builder = builder.tls_certs_only(certs);
        }
        if let Some((cert, key)) = tls.client_pair().map_err(setup)? {
            let id = reqwest::Identity::from_pkcs8_pem(&cert, &key).map_err(|e| {
                setup(format!(
                    "tls-certificate and tls-key: {e} (the key must be unencrypted PKCS#8 PEM, \
                     `BEGIN PRIVATE KEY`: `openssl pkcs8 -topk8 -nocrypt` converts one)"
                ))
            })?;
            builder = builder.identity(id);
        }
        let http = builder.build().map_err(|error| SearchError::Transport {
            server: crate::cache::redact_url(shown),
            index: "-".into(),
            what: "cannot set up the HTTP client".into(),
            error,
        })?;
        Ok(Search {
            base,
            shown: crate::cache::redact_url(shown),
            auth,
            http,
        })
    }

    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// One request, retried on 429, 5xx and refused connections. The
    /// status and the JSON answer (`Null` when there is none); 404 is
    /// returned, not an error, when `allow_404`.
    fn call(
        &self,
        index: &str,
        what: &'static str,
        method: reqwest::Method,
        path: &str,
        body: Option<Body>,
        allow_404: bool,
    ) -> Result<(u16, Value), SearchError> {
        self.call_tagged(index, what, method, path, body, allow_404, None)
    }

    /// [`Search::call`] with an `X-Opaque-Id`, which the server attaches to
    /// the task the request starts.
    #[allow(clippy::too_many_arguments)]
    fn call_tagged(
        &self,
        index: &str,
        what: &'static str,
        method: reqwest::Method,
        path: &str,
        body: Option<Body>,
        allow_404: bool,
        opaque_id: Option<&str>,
    ) -> Result<(u16, Value), SearchError> {
        let mut backoff = FIRST_BACKOFF;
        let mut tries = 0;
        loop {
            tries += 1;
            let mut req = self
                .http
                .request(method.clone(), format!("{}{path}", self.base));
            req = match &self.auth {
                Auth::None => req,
                Auth::Basic { user, password } => req.basic_auth(user, Some(password)),
                // Elasticsearch's API keys; OpenSearch 2's security plugin has
                // no such scheme (it takes basic auth, JWT, certificates), so
                // there `api-key` is refused or, without security, ignored.
                Auth::ApiKey(k) => req.header("Authorization", format!("ApiKey {k}")),
            };
            if let Some(tag) = opaque_id {
                req = req.header("X-Opaque-Id", tag);
            }
            req = match &body {
                Some(Body::Json(v)) => req.json(v),
                Some(Body::NdJson(s)) => req
                    .header("Content-Type", "application/x-ndjson")
                    .body(s.clone()),
                None => req,
            };
            let err = match req.send() {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let text = resp.text().unwrap_or_default();
                    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    if status < 300 || (status == 404 && allow_404) {
                        return Ok((status, v));
                    }
                    let (kind, reason) = error_of(&v, &text);
                    SearchError::Http {
                        server: self.shown.clone(),
                        index: index.to_owned(),
                        what,
                        status,
                        kind,
                        reason,
                    }
                }
                Err(error) => SearchError::Transport {
                    server: self.shown.clone(),
                    index: index.to_owned(),
                    what: what.to_owned(),
                    error,
                },
            };
            // A rejection is HTTP 429 on both products, but its type differs:
            // `rejected_execution_exception` on OpenSearch 2,
            // `es_rejected_execution_exception` on Elasticsearch: the status
            // decides, not the type.
            if !err.is_transient() || tries >= TRIES {
                return Err(err);
            }
            tracing::warn!(error = %err, "retrying in {} ms", backoff.as_millis());
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    fn other(&self, index: &str, what: String) -> SearchError {
        SearchError::Other {
            server: self.shown.clone(),
            index: index.to_owned(),
            what,
        }
    }

    /// Documents matching `query`, as a search sees them (refreshed).
    pub fn count(&self, index: &str, query: &Value) -> Result<u64, SearchError> {
        let (_, v) = self.call(
            index,
            "_count",
            reqwest::Method::POST,
            &format!("/{}/_count", seg(index)),
            Some(Body::Json(json!({ "query": query }))),
            false,
        )?;
        v["count"]
            .as_u64()
            .ok_or_else(|| self.other(index, format!("_count answered {v}")))
    }

    /// Starts a delete-by-query task: its id. `conflicts=proceed`: a
    /// document written since the task's snapshot is counted as a version
    /// conflict and kept, instead of aborting the task halfway.
    /// `slices=auto`: one slice per shard, run in parallel. `scroll_size`
    /// documents per batch (a scroll page, then one bulk of deletes).
    /// Throttled to `requests_per_second` documents a second when given.
    /// The task carries `tag` as its `X-Opaque-Id`, by which
    /// [`Search::find_delete_by_query`] finds it again.
    pub fn delete_by_query(
        &self,
        index: &str,
        query: &Value,
        scroll_size: u64,
        requests_per_second: Option<u64>,
        tag: &str,
    ) -> Result<String, SearchError> {
        let throttle = requests_per_second
            .map(|r| format!("&requests_per_second={r}"))
            .unwrap_or_default();
        let (_, v) = self.call_tagged(
            index,
            "_delete_by_query",
            reqwest::Method::POST,
            &format!(
                "/{}/_delete_by_query?conflicts=proceed&slices=auto&wait_for_completion=false&scroll_size={scroll_size}{throttle}",
                seg(index)
            ),
            Some(Body::Json(json!({ "query": query }))),
            false,
            Some(tag),
        )?;
        v["task"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| self.other(index, format!("_delete_by_query answered no task: {v}")))
    }

    /// A task: none when the cluster no longer knows it; else whether it
    /// completed, and its answer (`response` once complete, else `task`).
    /// A task started with `wait_for_completion=false` stores its result in
    /// the `.tasks` index when it completes, so it is found after it ends
    /// too, until someone deletes that record. Elasticsearch 8 still calls
    /// the task management API beta, with this same shape.
    pub fn task(&self, index: &str, id: &str) -> Result<Option<(bool, Value)>, SearchError> {
        let (status, v) = self.call(
            index,
            "_tasks",
            reqwest::Method::GET,
            &format!("/_tasks/{id}"),
            None,
            true,
        )?;
        if status == 404 {
            return Ok(None);
        }
        let done = v["completed"].as_bool().unwrap_or(false);
        let answer = if done {
            v["response"].clone()
        } else {
            v["task"]["status"].clone()
        };
        Ok(Some((done, answer)))
    }

    /// The delete-by-query task started with `tag` as its `X-Opaque-Id`
    /// no earlier than `since_ms` (epoch milliseconds), running or
    /// completed: a run that died between starting its task and
    /// journaling the task's id finds it here instead of starting another.
    /// A running task is in the task list; a completed one, started with
    /// `wait_for_completion=false`, in the `.tasks` index (whose `headers`
    /// are stored but not indexed: they are compared here). The list is
    /// read first: a task that completes in between is in `.tasks` by then.
    pub fn find_delete_by_query(
        &self,
        index: &str,
        tag: &str,
        since_ms: i64,
    ) -> Result<Option<String>, SearchError> {
        const ACTION: &str = "indices:data/write/delete/byquery";
        let ours = |t: &Value| {
            t["headers"]["X-Opaque-Id"].as_str() == Some(tag) && t["parent_task_id"].is_null()
        };
        let (_, v) = self.call(
            index,
            "_tasks",
            reqwest::Method::GET,
            &format!("/_tasks?actions={ACTION}&detailed=true"),
            None,
            false,
        )?;
        for node in v["nodes"].as_object().into_iter().flat_map(|n| n.values()) {
            for (id, t) in node["tasks"].as_object().into_iter().flatten() {
                if ours(t) {
                    return Ok(Some(id.clone()));
                }
            }
        }
        let (status, _) = self.call(
            index,
            "_refresh",
            reqwest::Method::POST,
            "/.tasks/_refresh",
            None,
            true,
        )?;
        if status == 404 {
            return Ok(None);
        }
        let (status, v) = self.call(
            index,
            "_search",
            reqwest::Method::POST,
            "/.tasks/_search",
            Some(Body::Json(json!({
                "size": 10000,
                "_source": ["task.node", "task.id", "task.headers", "task.parent_task_id"],
                "query": { "bool": { "filter": [
                    { "term": { "task.action": ACTION } },
                    { "range": { "task.start_time_in_millis": { "gte": since_ms } } }
                ] } }
            }))),
            true,
        )?;
        if status == 404 {
            return Ok(None);
        }
        Ok(v["hits"]["hits"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|h| &h["_source"]["task"])
            .find(|t| ours(t))
            .and_then(|t| Some(format!("{}:{}", t["node"].as_str()?, t["id"].as_u64()?))))
    }

    /// The stored versions of `ids` (realtime, refreshed or not).
    pub fn mget(&self, index: &str, ids: &[String]) -> Result<Vec<Option<Stored>>, SearchError> {
        let (_, v) = self.call(
            index,
            "_mget",
            reqwest::Method::POST,
            &format!("/{}/_mget?_source=false", seg(index)),
            Some(Body::Json(json!({ "ids": ids }))),
            false,
        )?;
        let docs = v["docs"]
            .as_array()
            .ok_or_else(|| self.other(index, format!("_mget answered {v}")))?;
        docs.iter()
            .map(|d| {
                // _mget answers 200 even for a closed index: the error is
                // per document, and is not "not found".
                if d["error"].is_object() {
                    let (kind, reason) = error_of(d, "");
                    return Err(SearchError::Http {
                        server: self.shown.clone(),
                        index: index.to_owned(),
                        what: "_mget",
                        status: 200,
                        kind,
                        reason: format!("document {}: {reason}", d["_id"]),
                    });
                }
                Ok((d["found"] == true).then(|| Stored {
                    version: d["_version"].as_i64().unwrap_or(0),
                    seq_no: d["_seq_no"].as_i64().unwrap_or(0),
                    primary_term: d["_primary_term"].as_i64().unwrap_or(1),
                }))
            })
            .collect()
    }

    /// A bulk request (`lines`, NDJSON): every item's outcome. Items
    /// refused with 429 are sent again, alone, with backoff.
    pub fn bulk(
        &self,
        index: &str,
        actions: &[(Value, Option<Value>)],
    ) -> Result<Vec<Item>, SearchError> {
        // The server refuses a bulk request without actions (400).
        if actions.is_empty() {
            return Ok(Vec::new());
        }
        let mut out: Vec<Option<Item>> = vec![None; actions.len()];
        let mut pending: Vec<usize> = (0..actions.len()).collect();
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=TRIES {
            let mut body = String::new();
            for &i in &pending {
                let (a, doc) = &actions[i];
                body.push_str(&a.to_string());
                body.push('\n');
                if let Some(d) = doc {
                    body.push_str(&d.to_string());
                    body.push('\n');
                }
            }
            let (_, v) = self.call(
                index,
                "_bulk",
                reqwest::Method::POST,
                "/_bulk",
                Some(Body::NdJson(body)),
                false,
            )?;
            let items = v["items"]
                .as_array()
                .filter(|a| a.len() == pending.len())
                .ok_or_else(|| self.other(index, format!("_bulk answered {v}")))?;
            let mut again = Vec::new();
            for (&i, item) in pending.iter().zip(items) {
                let (_, r) = item
                    .as_object()
                    .and_then(|o| o.iter().next())
                    .ok_or_else(|| self.other(index, format!("_bulk item {item}")))?;
                let status = r["status"].as_u64().unwrap_or(0) as u16;
                if status == 429 && attempt < TRIES {
                    again.push(i);
                    continue;
                }
                out[i] = Some(Item {
                    id: r["_id"].as_str().unwrap_or_default().to_owned(),
                    status,
                    result: r["result"]
                        .as_str()
                        .or_else(|| r["error"]["type"].as_str())
                        .unwrap_or("?")
                        .to_owned(),
                    reason: r["error"]["reason"].as_str().map(str::to_owned),
                });
            }
            if again.is_empty() {
                break;
            }
            tracing::warn!(
                index,
                items = again.len(),
                "bulk items refused with 429; retrying in {} ms",
                backoff.as_millis()
            );
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(5));
            pending = again;
        }
        Ok(out
            .into_iter()
            .map(|i| i.expect("every item answered"))
            .collect())
    }

    pub fn refresh(&self, index: &str) -> Result<(), SearchError> {
        self.call(
            index,
            "_refresh",
            reqwest::Method::POST,
            &format!("/{}/_refresh", seg(index)),
            None,
            false,
        )
        .map(|_| ())
    }

    /// The refresh interval each index behind `index` sets for itself
    /// (index → value); none where it is unset and the server's default
    /// (`cluster.default.index.refresh_interval`, 1s unless changed; none
    /// for a shard no search has touched lately) applies.
    pub fn refresh_intervals(
        &self,
        index: &str,
    ) -> Result<std::collections::BTreeMap<String, Option<String>>, SearchError> {
        Ok(per_index(&self.settings(index)?, |i| {
            i["settings"]["index"]["refresh_interval"]
                .as_str()
                .map(str::to_owned)
        }))
    }

    /// The settings of each index behind `index`, keyed by index name.
    /// Unfiltered: asked for one setting, the server leaves out every
    /// index that does not set it.
    fn settings(&self, index: &str) -> Result<Value, SearchError> {
        self.call(
            index,
            "_settings",
            reqwest::Method::GET,
            &format!("/{}/_settings", seg(index)),
            None,
            false,
        )
        .map(|(_, v)| v)
    }

    /// Sets one index's refresh interval; none: unset, back to the
    /// server's default. False when there is no such index (any more).
    pub fn set_refresh_interval(
        &self,
        index: &str,
        value: Option<&str>,
    ) -> Result<bool, SearchError> {
        self.call(
            index,
            "_settings",
            reqwest::Method::PUT,
            &format!("/{}/_settings", seg(index)),
            Some(Body::Json(
                json!({ "index": { "refresh_interval": value } }),
            )),
            true,
        )
        .map(|(status, _)| status != 404)
    }

    /// The indices `alias` points to; none when it is no alias.
    pub fn alias(&self, alias: &str) -> Result<Vec<String>, SearchError> {
        let (status, v) = self.call(
            alias,
            "_alias",
            reqwest::Method::GET,
            &format!("/_alias/{}", seg(alias)),
            None,
            true,
        )?;
        if status == 404 {
            return Ok(Vec::new());
        }
        Ok(v.as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default())
    }

    /// An index's mappings; none when there is no such index.
    pub fn mappings(&self, index: &str) -> Result<Option<Value>, SearchError> {
        let (status, v) = self.call(
            index,
            "get the index",
            reqwest::Method::GET,
            &format!("/{}", seg(index)),
            None,
            true,
        )?;
        if status == 404 {
            return Ok(None);
        }
        Ok(v.as_object()
            .and_then(|o| o.values().next())
            .map(|i| i["mappings"].clone()))
    }

    /// The settings of `index` that a copy of it must share: shards,
    /// replicas, refresh interval, analysis. Not those the server sets
    /// itself (uuid, creation date, version), which a new index refuses.
    pub fn copied_settings(&self, index: &str) -> Result<Value, SearchError> {
        let all = self
            .settings(index)?
            .as_object()
            .and_then(|o| o.values().next())
            .map(|i| i["settings"]["index"].clone())
            .unwrap_or(Value::Null);
        let mut out = serde_json::Map::new();
        for key in [
            "number_of_shards",
            "number_of_replicas",
            "auto_expand_replicas",
            "refresh_interval",
            "analysis",
        ] {
            if let Some(v) = all.get(key) {
                out.insert(key.to_owned(), v.clone());
            }
        }
        Ok(Value::Object(out))
    }

    /// How each index behind `index` maps `field`: index → type (`date`,
    /// `long`, ...); an index that does not map it is absent.
    pub fn field_types(
        &self,
        index: &str,
        field: &str,
    ) -> Result<std::collections::BTreeMap<String, Option<String>>, SearchError> {
        let (_, v) = self.call(
            index,
            "_mapping/field",
            reqwest::Method::GET,
            &format!("/{}/_mapping/field/{}", seg(index), seg(field)),
            None,
            false,
        )?;
        let leaf = field.rsplit('.').next().unwrap_or(field);
        Ok(per_index(&v, |m| {
            m["mappings"][field]["mapping"][leaf]["type"]
                .as_str()
                .map(str::to_owned)
        }))
    }

    /// A new index with `settings` (see `copied_settings`) and `mappings`.
    pub fn create_index(
        &self,
        index: &str,
        settings: &Value,
        mappings: &Value,
    ) -> Result<(), SearchError> {
        self.call(
            index,
            "create the index",
            reqwest::Method::PUT,
            &format!("/{}", seg(index)),
            Some(Body::Json(
                json!({ "settings": { "index": settings }, "mappings": mappings }),
            )),
            false,
        )
        .map(|_| ())
    }

    /// Moves `alias` from `old` to `new` in one `_aliases` request: no
    /// reader sees the alias on neither or on both.
    pub fn swap_alias(&self, alias: &str, old: &[String], new: &str) -> Result<(), SearchError> {
        let mut actions: Vec<Value> = old
            .iter()
            .map(|o| json!({ "remove": { "index": o, "alias": alias } }))
            .collect();
        actions.push(json!({ "add": { "index": new, "alias": alias } }));
        self.call(
            alias,
            "_aliases",
            reqwest::Method::POST,
            "/_aliases",
            Some(Body::Json(json!({ "actions": actions }))),
            false,
        )
        .map(|_| ())
    }
}

/// An answer keyed by index name (`_settings`, `_mapping`, ...), one value
/// read from each index's part.
fn per_index<T>(
    answer: &Value,
    read: impl Fn(&Value) -> T,
) -> std::collections::BTreeMap<String, T> {
    answer
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, part)| (name.clone(), read(part)))
        .collect()
}

enum Body {
    Json(Value),
    NdJson(String),
}

/// The error type and reason of an answer: the first root cause's when
/// there is one (a search rejected on every shard says only
/// `search_phase_execution_exception: all shards failed` at the top), else
/// the cause's (one rejected in its fetch phase has no root cause, and an
/// empty reason, on OpenSearch 2.19).
fn error_of(v: &Value, text: &str) -> (String, String) {
    let e = &v["error"];
    let cause = e["root_cause"]
        .as_array()
        .and_then(|c| c.first())
        .or_else(|| e.get("caused_by"))
        .unwrap_or(e);
    let kind = cause["type"]
        .as_str()
        .or_else(|| e["type"].as_str())
        .unwrap_or("error")
        .to_owned();
    let reason = cause["reason"]
        .as_str()
        .or_else(|| e["reason"].as_str())
        .or_else(|| e.as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| text.chars().take(200).collect());
    (kind, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_is_named_by_its_cause_not_by_the_search_that_wrapped_it() {
        // As OpenSearch 2.19 answered a search rejected in its query phase,
        // and one rejected in its fetch phase (no root cause at all).
        let query = json!({ "error": { "root_cause": [{ "type": "rejected_execution_exception", "reason": "rejected execution of TimedRunnable" }],
            "type": "search_phase_execution_exception", "reason": "all shards failed" }, "status": 429 });
        let fetch = json!({ "error": { "root_cause": [], "type": "search_phase_execution_exception", "reason": "",
            "caused_by": { "type": "rejected_execution_exception", "reason": "rejected execution of TimedRunnable" } }, "status": 429 });
        for v in [query, fetch] {
            assert_eq!(
                error_of(&v, ""),
                (
                    "rejected_execution_exception".to_owned(),
                    "rejected execution of TimedRunnable".to_owned()
                )
            );
        }
        let alias = json!({ "error": "alias [cases] missing", "status": 404 });
        assert_eq!(error_of(&alias, "").1, "alias [cases] missing");
    }

    #[test]
    fn credentials_in_a_url_are_taken_out_of_it() {
        let (base, auth) = split_userinfo("https://elastic:pw@search:9200");
        assert_eq!(base, "https://search:9200");
        assert_eq!(auth, Some(("elastic".into(), "pw".into())));
        assert_eq!(split_userinfo("http://search:9200").1, None);
        // Percent-escapes are decoded; raw `/`, `?`, `#`, `@` stay in the
        // password instead of becoming the host or the path.
        let (base, auth) = split_userinfo("https://elastic:p%40ss%2F1@search:9200");
        assert_eq!(base, "https://search:9200");
        assert_eq!(auth, Some(("elastic".into(), "p@ss/1".into())));
        let (base, auth) = split_userinfo("https://elastic:se/cr?e#t@x@search:9200/es");
        assert_eq!(base, "https://search:9200/es");
        assert_eq!(auth, Some(("elastic".into(), "se/cr?e#t@x".into())));
    }
}
