//! Redis, a single server or a cluster, through the `redis` crate: what a
//! cache invalidation needs and nothing more. Keys are routed by hash slot
//! here rather than by the crate's cluster connection, so that every
//! command goes to a primary this module knows by name, and every error
//! names the node that failed: a step that reached two primaries of three
//! must not look like a success.
//!
//! - `exists` and `unlink` take keys, group them by slot (one multi-key
//!   command per slot: never CROSSSLOT), and pipeline them per primary.
//!   A MOVED answer refreshes the slot map and sends the batch again; an
//!   ASK answer sends that command to the named node after `ASKING`.
//! - `scan` is one `SCAN cursor MATCH p COUNT n` on one primary, so that a
//!   caller can journal the cursor and resume from it.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::tls_files::TlsFiles;
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Value};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Keys per round trip (one command, or a pipeline of one command per
/// slot) of what a scan found. The server runs what one read brings back
/// to back while other clients wait, so a reader's p99 moves with the
/// longest such run, not with how many there are: short ones, one at a
/// time. On a cluster each slot's keys are a command of their own, and a
/// command costs more than a key: 64 keys were measured worse than 32
/// there. A scan paces itself: each round trip also waits for a `SCAN`.
const CALL_KEYS: usize = 32;

/// Keys per round trip of keys named in a list (`unlink`, `exists`).
/// Nothing paces those: they go as fast as the answers come back, so the
/// server spends a large share of its time on them, and readers queue
/// behind each call. Readers' p99 against the script's one key a call
/// (`bench/cache`, 100,000 keys, 2 GET clients): with 32 keys a call
/// (about 20 us of the server's time) half as high again; with 8 (6.5 us)
/// 0.111 against 0.087 ms over 6 rounds; with 4, 0.071 against 0.071 ms,
/// at 4.6 times its speed.
const LISTED_CALL_KEYS: usize = 4;

/// `calls` and `usec` of the `cmdstat_scan` line of `INFO commandstats`.
fn parse_scan_stats(info: &str) -> Option<(u64, u64)> {
    let line = info.lines().find_map(|l| l.strip_prefix("cmdstat_scan:"))?;
    let field = |name: &str| {
        line.split(',')
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
    };
    Some((field("calls")?, field("usec")?))
}

/// Redis Cluster's number of hash slots.
pub const SLOTS: u16 = 16384;

/// The redis crate's error is shown in the message, not chained: its
/// Display already holds what its source would add.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("Redis at {server}: {what}: {error}")]
    Server {
        server: String,
        what: String,
        error: redis::RedisError,
    },
    #[error("Redis at {server}: {what}")]
    Other { server: String, what: String },
}

impl CacheError {
    /// A server gone or not answering: another try on a new connection
    /// may succeed (every caller is idempotent).
    pub fn is_transient(&self) -> bool {
        match self {
            CacheError::Server { error, .. } => {
                error.is_io_error() || error.is_connection_refusal() || error.is_timeout()
            }
            CacheError::Other { .. } => false,
        }
    }
}

/// A URL as it may be shown: a password in it replaced by `***`, and the
/// value of any query parameter whose name looks like a credential too.
pub fn redact_url(url: &str) -> String {
    let (head, rest) = match split_at_userinfo(url) {
        Some((scheme, userinfo, rest)) => {
            let shown = match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                None => userinfo.to_owned(),
            };
            (format!("{scheme}{shown}@"), rest)
        }
        None => (String::new(), url),
    };
    format!("{head}{}", redact_query(rest))
}

/// `url` as (`scheme://`, userinfo, the rest after its `@`), when it has
/// userinfo. The userinfo ends at the *last* `@`: a password should
/// percent-encode `/`, `?`, `#` and `@`, but one that does not must not
/// be cut at the first of them and shown in part; an `@` after the host
/// is rare in a server's URL, and misreading one hides too much, never
/// too little.
pub(crate) fn split_at_userinfo(url: &str) -> Option<(&str, &str, &str)> {
    let start = url.find("://")? + 3;
    let at = start + url[start..].rfind('@')?;
    Some((&url[..start], &url[start..at], &url[at + 1..]))
}

/// `%XX` escapes decoded (a URL's user and password are percent-encoded);
/// a malformed escape is kept as written.
pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).and_then(|c| hex(*c)),
            b.get(i + 2).and_then(|c| hex(*c)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The query's credential-looking values (`password=`, `token=`, ...)
/// replaced by `***`.
fn redact_query(rest: &str) -> String {
    let Some((before, query)) = rest.split_once('?') else {
        return rest.to_owned();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _))
                if [
                    "pass",
                    "secret",
                    "token",
                    "key",
                    "sig",
                    "auth",
                    "credential",
                ]
                .iter()
                .any(|m| k.to_ascii_lowercase().contains(m)) =>
            {
                format!("{k}=***")
            }
            _ => pair.to_owned(),
        })
        .collect();
    let mut out = format!("{before}?{}", pairs.join("&"));
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

/// A rediss:// connection's certificates, from its TLS files: the CA that
/// signs the servers' certificates (else the system's trust store), and a
/// client certificate and key for servers that require one
/// (`tls-auth-clients yes`). The servers' names are checked against their
/// certificates.
fn redis_certificates(tls: &TlsFiles, url: &str) -> Result<Option<redis::TlsCertificates>, String> {
    if tls.is_empty() {
        return Ok(None);
    }
    if !url.starts_with("rediss://") {
        return Err("tls-ca, tls-certificate and tls-key need a rediss:// URL".into());
    }
    let client_tls = tls
        .client_pair()?
        .map(|(client_cert, client_key)| redis::ClientTlsConfig {
            client_cert,
            client_key,
        });
    Ok(Some(redis::TlsCertificates {
        client_tls,
        root_cert: tls.ca_bytes()?,
    }))
}

struct Node {
    /// `host:port`, as the cluster names it.
    addr: String,
    conn: Option<redis::Connection>,
}

/// A connected Redis: one server, or every primary of a cluster.
pub struct Redis {
    /// The URL as it may be shown.
    shown: String,
    info: ConnectionInfo,
    cluster: bool,
    nodes: Vec<Node>,
    /// For a cluster, the primary (index into `nodes`) of each slot.
    slots: Vec<usize>,
    tls: Option<redis::TlsCertificates>,
}

fn addr_of(info: &ConnectionInfo) -> String {
    match info.addr() {
        ConnectionAddr::Tcp(h, p)
        | ConnectionAddr::TcpTls {
            host: h, port: p, ..
        } => {
            format!("{h}:{p}")
        }
        ConnectionAddr::Unix(p) => p.display().to_string(),
        other => format!("{other:?}"),
    }
}

fn with_addr(info: &ConnectionInfo, host: &str, port: u16) -> ConnectionInfo {
    let addr = match info.addr() {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host.to_owned(), port),
    };
    info.clone().set_addr(addr)
}

/// The hash slot of `key`, as Redis Cluster computes it: CRC16 (XMODEM)
/// of the key, or of its `{hash tag}` when it has a non-empty one.
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let close = key[open + 1..].iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &key[open + 1..open + 1 + close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &b in tagged {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % SLOTS
}

impl Redis {
    /// Connects to `url` (a `redis://` or `rediss://` URL, expanded);
    /// `shown` is how errors name it. A cluster is found from that one
    /// node: its slot map names every primary, and each is connected to
    /// now, so that one refusing fails here, named.
    pub fn connect(
        url: &str,
        shown: &str,
        cluster: bool,
        tls: &TlsFiles,
    ) -> Result<Redis, CacheError> {
        let shown = redact_url(shown);
        let tls = redis_certificates(tls, url).map_err(|what| CacheError::Other {
            server: shown.clone(),
            what,
        })?;
        let info = url
            .into_connection_info()
            .map_err(|error| CacheError::Server {
                server: shown.clone(),
                what: "the URL does not read".into(),
                error,
            })?;
        let mut r = Redis {
            nodes: vec![Node {
                addr: addr_of(&info),
                conn: None,
            }],
            shown,
            info,
            cluster,
            slots: Vec::new(),
            tls,
        };
        r.conn(0)?;
        if cluster {
            r.refresh_slots()?;
            for i in 0..r.nodes.len() {
                r.conn(i)?;
            }
        }
        Ok(r)
    }

    /// How errors and reports name this Redis.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// The primaries, as `host:port`: one for a single server.
    pub fn primaries(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    fn server(&self, node: usize) -> String {
        if self.cluster {
            format!("{} (cluster {})", self.nodes[node].addr, self.shown)
        } else {
            self.shown.clone()
        }
    }

    fn err(&self, node: usize, what: &str, error: redis::RedisError) -> CacheError {
        CacheError::Server {
            server: self.server(node),
            what: what.to_owned(),
            error,
        }
    }

    fn conn(&mut self, node: usize) -> Result<&mut redis::Connection, CacheError> {
        if self.nodes[node].conn.is_none() {
            let info = match self.nodes[node].addr.rsplit_once(':') {
                Some((h, p)) if self.cluster => with_addr(&self.info, h, p.parse().unwrap_or(6379)),
                _ => self.info.clone(),
            };
            let client = match &self.tls {
                Some(certs) => redis::Client::build_with_tls(info, certs.clone()),
                None => redis::Client::open(info),
            };
            let c = client
                .and_then(|c| c.get_connection_with_timeout(CONNECT_TIMEOUT))
                .and_then(|c| {
                    c.set_read_timeout(Some(READ_TIMEOUT))?;
                    // A server that stops reading (a full socket buffer on
                    // a hung node) must not block a write forever either.
                    c.set_write_timeout(Some(READ_TIMEOUT))?;
                    Ok(c)
                })
                .map_err(|e| self.err(node, "cannot connect", e))?;
            self.nodes[node].conn = Some(c);
        }
        Ok(self.nodes[node].conn.as_mut().expect("just connected"))
    }

    /// Runs `f` on the node's connection; an I/O error drops the
    /// connection so that the next call opens a new one.
    fn on<T>(
        &mut self,
        node: usize,
        what: &str,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, CacheError> {
        let c = self.conn(node)?;
        match f(c) {
            Ok(v) => Ok(v),
            Err(e) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                    self.nodes[node].conn = None;
                }
                Err(self.err(node, what, e))
            }
        }
    }

    /// Reads the cluster's slot map (`CLUSTER SLOTS`) from any node that
    /// answers, keeping the connections of primaries still in it.
    fn refresh_slots(&mut self) -> Result<(), CacheError> {
        let mut last = None;
        for i in 0..self.nodes.len() {
            match self.on(i, "CLUSTER SLOTS", |c| {
                redis::cmd("CLUSTER").arg("SLOTS").query::<Value>(c)
            }) {
                Ok(v) => return self.install_slots(i, v),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one node"))
    }

    fn install_slots(&mut self, from: usize, v: Value) -> Result<(), CacheError> {
        let server = self.server(from);
        let bad = |what: &str| CacheError::Other {
            server: server.clone(),
            what: format!("CLUSTER SLOTS answered {what}"),
        };
        let Value::Array(ranges) = v else {
            return Err(bad("something other than a list"));
        };
        let seed_host = match self.nodes[from].addr.rsplit_once(':') {
            Some((h, _)) => h.to_owned(),
            None => String::new(),
        };
        let mut old: BTreeMap<String, Option<redis::Connection>> =
            self.nodes.drain(..).map(|n| (n.addr, n.conn)).collect();
        let mut slots = vec![usize::MAX; usize::from(SLOTS)];
        for r in ranges {
            let Value::Array(parts) = r else {
                return Err(bad("a range that is not a list"));
            };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(primary))) =
                (parts.first(), parts.get(1), parts.get(2))
            else {
                return Err(bad("a range without its primary"));
            };
            let host = match primary.first() {
                Some(Value::BulkString(h)) if !h.is_empty() => {
                    String::from_utf8_lossy(h).into_owned()
                }
                _ => seed_host.clone(),
            };
            let Some(Value::Int(port)) = primary.get(1) else {
                return Err(bad("a primary without a port"));
            };
            let addr = format!("{host}:{port}");
            let i = match self.nodes.iter().position(|n| n.addr == addr) {
                Some(i) => i,
                None => {
                    let conn = old.remove(&addr).flatten();
                    self.nodes.push(Node { addr, conn });
                    self.nodes.len() - 1
                }
            };
            for s in *start..=*end {
                if let Some(x) = slots.get_mut(s as usize) {
                    *x = i;
                }
            }
        }
        if let Some(s) = slots.iter().position(|&n| n == usize::MAX) {
            return Err(CacheError::Other {
                server: self.shown.clone(),
                what: format!("hash slot {s} has no primary: the cluster is not whole"),
            });
        }
        self.slots = slots;
        Ok(())
    }

    fn node_of(&self, key: &[u8]) -> usize {
        if self.cluster {
            self.slots[usize::from(slot(key))]
        } else {
            0
        }
    }

    /// How many of `keys` exist (`EXISTS`, per slot, pipelined).
    pub fn exists(&mut self, keys: &[String]) -> Result<u64, CacheError> {
        self.per_slot("EXISTS", keys, LISTED_CALL_KEYS)
    }

    /// Unlinks `keys` (`UNLINK`, per slot, pipelined): how many existed.
    pub fn unlink(&mut self, keys: &[String]) -> Result<u64, CacheError> {
        self.per_slot("UNLINK", keys, LISTED_CALL_KEYS)
    }

    /// `command` over keys grouped by slot, one command per slot, in
    /// pipelines of at most `per_call` keys per primary; the sum of their
    /// integer answers.
    fn per_slot(
        &mut self,
        command: &str,
        keys: &[String],
        per_call: usize,
    ) -> Result<u64, CacheError> {
        let mut groups: BTreeMap<u16, Vec<&str>> = BTreeMap::new();
        for k in keys {
            let s = if self.cluster { slot(k.as_bytes()) } else { 0 };
            groups.entry(s).or_default().push(k);
        }
        // A command holds per_call keys at most, like a pipeline.
        let groups: Vec<(u16, Vec<&str>)> = groups
            .into_iter()
            .flat_map(|(s, ks)| {
                ks.chunks(per_call)
                    .map(|c| (s, c.to_vec()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut total = 0u64;
        // A MOVED answer means the map is stale: refresh it and send what
        // was refused again (the commands are idempotent). A few rounds
        // at most: slots move one by one.
        let mut pending: Vec<(u16, Vec<&str>)> = groups;
        for round in 0..5 {
            let mut by_node: BTreeMap<usize, Vec<(u16, Vec<&str>)>> = BTreeMap::new();
            for (s, ks) in pending.drain(..) {
                let n = if self.cluster {
                    self.slots[usize::from(s)]
                } else {
                    0
                };
                by_node.entry(n).or_default().push((s, ks));
            }
            let mut moved = false;
            for (node, batch) in by_node {
                // Pipelines of at most per_call keys: the server runs a
                // pipeline's commands back to back, and other clients wait.
                let mut rest = batch;
                while !rest.is_empty() {
                    let mut keys = 0;
                    let cut = rest
                        .iter()
                        .position(|(_, ks)| {
                            keys += ks.len();
                            keys > per_call
                        })
                        .map_or(rest.len(), |p| p.max(1));
                    let tail = rest.split_off(cut);
                    let part = std::mem::replace(&mut rest, tail);
                    let mut pipe = redis::pipe();
                    pipe.ignore_errors();
                    for (_, ks) in &part {
                        pipe.cmd(command).arg(ks);
                    }
                    let answers: Vec<redis::RedisResult<u64>> =
                        self.on(node, command, |c| pipe.query(c))?;
                    for ((s, ks), a) in part.into_iter().zip(answers) {
                        match a {
                            Ok(n) => total += n,
                            Err(e)
                                if e.kind()
                                    == redis::ErrorKind::Server(redis::ServerErrorKind::Moved) =>
                            {
                                moved = true;
                                pending.push((s, ks));
                            }
                            Err(e)
                                if e.kind()
                                    == redis::ErrorKind::Server(redis::ServerErrorKind::Ask) =>
                            {
                                total += self.asking(node, command, &ks, &e)?;
                            }
                            Err(e) => return Err(self.err(node, command, e)),
                        }
                    }
                }
            }
            if !moved {
                return Ok(total);
            }
            if round == 4 {
                break;
            }
            self.refresh_slots()?;
        }
        Err(CacheError::Other {
            server: self.shown.clone(),
            what: format!("{command}: slots kept moving (MOVED after 5 slot-map refreshes)"),
        })
    }

    /// A slot being migrated: `ASKING`, then the command, on the node the
    /// ASK answer names.
    fn asking(
        &mut self,
        from: usize,
        command: &str,
        keys: &[&str],
        e: &redis::RedisError,
    ) -> Result<u64, CacheError> {
        let Some((addr, _)) = e.redirect_node() else {
            return Err(self.err(from, command, e.clone()));
        };
        let addr = addr.to_owned();
        let node = match self.nodes.iter().position(|n| n.addr == addr) {
            Some(i) => i,
            None => {
                self.nodes.push(Node { addr, conn: None });
                self.nodes.len() - 1
            }
        };
        self.on(node, command, |c| {
            let mut pipe = redis::pipe();
            pipe.cmd("ASKING").ignore().cmd(command).arg(keys);
            let (n,): (u64,) = pipe.query(c)?;
            Ok(n)
        })
    }

    /// One `SCAN cursor MATCH pattern COUNT count` on primary `node`: the
    /// next cursor (0 when the scan is over) and the keys found.
    pub fn scan(
        &mut self,
        node: usize,
        cursor: u64,
        pattern: &str,
        count: usize,
    ) -> Result<(u64, Vec<String>), CacheError> {
        self.on(node, "SCAN", |c| {
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(count)
                .query(c)
        })
    }

    /// Whether it is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// One round trip to a single server: `UNLINK` of `keys` (what the
    /// previous scan found), then the next `SCAN`. How many of the keys
    /// existed, the next cursor and the keys found.
    pub fn unlink_then_scan(
        &mut self,
        keys: &[String],
        cursor: u64,
        pattern: &str,
        count: usize,
    ) -> Result<(u64, u64, Vec<String>), CacheError> {
        let mut pipe = redis::pipe();
        for part in keys.chunks(CALL_KEYS) {
            pipe.cmd("UNLINK").arg(part);
        }
        pipe.cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(count);
        let mut answers: Vec<redis::Value> = self.on(0, "UNLINK and SCAN", |c| pipe.query(c))?;
        let scan = answers.pop().unwrap_or(redis::Value::Nil);
        let mut unlinked = 0;
        for a in answers {
            unlinked +=
                redis::from_redis_value::<u64>(a).map_err(|e| self.err(0, "UNLINK", e.into()))?;
        }
        let (next, found): (u64, Vec<String>) =
            redis::from_redis_value(scan).map_err(|e| self.err(0, "SCAN", e.into()))?;
        Ok((unlinked, next, found))
    }

    /// The server's own count of `SCAN` calls on primary `node` and the
    /// microseconds it spent in them (`INFO commandstats`): what a scan's
    /// `COUNT` costs the server, without the time spent queued behind
    /// other clients. None where `INFO` is refused or lacks the line.
    pub fn scan_stats(&mut self, node: usize) -> Result<Option<(u64, u64)>, CacheError> {
        let info: String = match self.on(node, "INFO", |c| {
            redis::cmd("INFO").arg("commandstats").query(c)
        }) {
            Ok(i) => i,
            Err(e) if !e.is_transient() => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(parse_scan_stats(&info))
    }

    /// Unlinks keys a scan of primary `node` found there.
    pub fn unlink_on(&mut self, node: usize, keys: &[String]) -> Result<u64, CacheError> {
        if !self.cluster {
            let mut n = 0;
            for part in keys.chunks(CALL_KEYS) {
                n += self.on(node, "UNLINK", |c| {
                    redis::cmd("UNLINK").arg(part).query::<u64>(c)
                })?;
            }
            return Ok(n);
        }
        // Keys of one node may be of many slots: per slot, and a key whose
        // slot moved away since the scan is routed where it is now.
        self.per_slot("UNLINK", keys, CALL_KEYS)
    }

    /// `GET key` as an integer (absent: none).
    pub fn get_int(&mut self, key: &str) -> Result<Option<i64>, CacheError> {
        let node = self.node_of(key.as_bytes());
        self.on(node, "GET", |c| redis::cmd("GET").arg(key).query(c))
    }

    /// `INCR key`, only while it still holds `expected` (absent: none):
    /// the new value, or none when it holds something else (a resumed
    /// run that already bumped it).
    pub fn incr_if(&mut self, key: &str, expected: Option<i64>) -> Result<Option<i64>, CacheError> {
        let node = self.node_of(key.as_bytes());
        let script = redis::Script::new(
            r"local v = redis.call('GET', KEYS[1])
              if (v or '') == ARGV[1] then return redis.call('INCR', KEYS[1]) end
              return false",
        );
        let want = expected.map(|e| e.to_string()).unwrap_or_default();
        self.on(node, "INCR", |c| script.key(key).arg(want).invoke(c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_clusters() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        // An empty tag is no tag: the whole key is hashed.
        assert_eq!(slot(b"foo{}{bar}"), 8363);
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
    }

    #[test]
    fn a_password_in_a_url_is_never_shown() {
        assert_eq!(
            redact_url("redis://:s3cret@cache:6379/0"),
            "redis://:***@cache:6379/0"
        );
        assert_eq!(
            redact_url("rediss://app:s3cret@cache:6380"),
            "rediss://app:***@cache:6380"
        );
        assert_eq!(redact_url("redis://cache:6379"), "redis://cache:6379");
        assert_eq!(
            redact_url("redis://:${REDIS_PASSWORD}@cache"),
            "redis://:***@cache"
        );
        // Characters a password should percent-encode and did not: no part
        // of it is shown.
        for (url, shown) in [
            ("redis://:pa/ss@cache:6379/0", "redis://:***@cache:6379/0"),
            ("redis://app:p?w#d@cache", "redis://app:***@cache"),
            (
                "rediss://app:a@b/c@cache:6380",
                "rediss://app:***@cache:6380",
            ),
            ("redis://:p%2Fw%40d@cache", "redis://:***@cache"),
            (
                "https://u:se/cr#et@search:9200/x",
                "https://u:***@search:9200/x",
            ),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
        assert_eq!(
            redact_url("redis://cache:6379/0?Password=x&db=1"),
            "redis://cache:6379/0?Password=***&db=1"
        );
        assert_eq!(percent_decode("p%2Fw%40d%zz%4"), "p/w@d%zz%4");
    }

    #[test]
    fn scan_stats_come_from_the_commandstats_line() {
        let info = "# Commandstats\r\ncmdstat_get:calls=9,usec=20,usec_per_call=2.22\r\n\
                    cmdstat_scan:calls=120,usec=4800,usec_per_call=40.00,rejected_calls=0\r\n";
        assert_eq!(parse_scan_stats(info), Some((120, 4800)));
        assert_eq!(parse_scan_stats("# Commandstats\r\n"), None);
    }
}
