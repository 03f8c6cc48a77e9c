//! Connections with libpq's rules (a conninfo string or URL, the PG*
//! environment variables for what it leaves out), a blocking client over
//! tokio-postgres for the command line, and errors formatted from the
//! server's own report.

use std::time::Duration;

use tokio_postgres::config::Host;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, Row};

use super::tls::{self, Tls};

pub use tokio_postgres::error::SqlState;

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("invalid connection string: {0}")]
    BadConninfo(String),
    #[error("cannot connect to PostgreSQL at {target}: {detail}")]
    Connect { target: String, detail: String },
    #[error("{context} on {target}: {detail}")]
    Query {
        target: String,
        context: String,
        detail: String,
        code: Option<SqlState>,
    },
}

impl PgError {
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            PgError::Query { code, .. } => code.as_ref(),
            _ => None,
        }
    }
}

/// SQLSTATE, message, detail and hint when the server said something;
/// the client's error chain otherwise.
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} [{}]", db.message(), db.code().code());
        if let Some(d) = db.detail() {
            s.push_str(&format!("; detail: {d}"));
        }
        if let Some(h) = db.hint() {
            s.push_str(&format!("; hint: {h}"));
        }
        return s;
    }
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        // OpenSSL's errors repeat their stack in each cause.
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(&format!(": {c}"));
        }
        src = cause.source();
    }
    s
}

/// A failed verification of the server's certificate, said as libpq's
/// settings name it rather than as OpenSSL's error stack.
fn verify_failure(detail: &str, tls: &Tls, host: &str) -> Option<String> {
    if !detail.contains("certificate verify failed") {
        return None;
    }
    let reason = detail
        .split(": ")
        .map(str::trim)
        .find(|p| !p.is_empty() && !p.starts_with("error") && !p.contains("ssl/"))
        .unwrap_or("certificate verify failed");
    let root = match &tls.root {
        Some(tls::Root::File(p)) => format!("sslrootcert={}", p.display()),
        Some(tls::Root::System) => "the system's trusted roots (sslrootcert=system)".into(),
        None => "no root certificate".into(),
    };
    Some(if reason.contains("mismatch") {
        format!(
            "the server's certificate does not name \"{host}\" ({reason}; sslmode=verify-full compares the host with the certificate's subjectAltName)"
        )
    } else {
        format!(
            "the server's certificate does not verify against {root} ({reason}; sslmode={})",
            tls.mode.name()
        )
    })
}

const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;
/// Data unacknowledged this long closes the connection.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(60);

/// Builds the connection settings: `conninfo` when given, with the PG*
/// variables filling what it does not say, as libpq does; and its TLS
/// settings (see `tls`).
pub fn config(conninfo: Option<&str>) -> Result<(Config, Tls), PgError> {
    let (rest, ssl) = match conninfo {
        Some(s) => split_keys(s, tls::KEYS),
        None => (String::new(), Vec::new()),
    };
    let tls = Tls::resolve(&ssl).map_err(PgError::BadConninfo)?;
    let mut c = match conninfo {
        Some(_) => rest.parse::<Config>().map_err(|e| {
            let cause = std::error::Error::source(&e).map(|c| c.to_string());
            PgError::BadConninfo(parse_failure(&cause.unwrap_or_default()))
        })?,
        None => Config::new(),
    };
    c.ssl_mode(tls.wire());
    if tls.direct {
        c.ssl_negotiation(tokio_postgres::config::SslNegotiation::Direct);
    }
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if c.get_hosts().is_empty() {
        match env("PGHOST") {
            Some(h) if h.starts_with('/') => c.host_path(h),
            Some(h) => c.host(&h),
            None => c.host_path("/var/run/postgresql"),
        };
    }
    if c.get_ports().is_empty() {
        if let Some(p) = env("PGPORT") {
            c.port(
                p.parse()
                    .map_err(|_| PgError::BadConninfo(format!("PGPORT={p} is not a port")))?,
            );
        }
    }
    if c.get_user().is_none() {
        if let Some(u) = env("PGUSER").or_else(|| env("USER")) {
            c.user(&u);
        }
    }
    if c.get_password().is_none() {
        if let Some(p) = env("PGPASSWORD") {
            c.password(p);
        }
    }
    if c.get_dbname().is_none() {
        if let Some(d) = env("PGDATABASE") {
            c.dbname(&d);
        }
    }
    if c.get_password().is_none() {
        if let Some(p) = passfile_password(&c) {
            c.password(p);
        }
    }
    if c.get_application_name().is_none() {
        c.application_name("reentry");
    }
    c.connect_timeout(Duration::from_secs(10));
    // A half-open connection (a peer gone without a FIN: a failover, a
    // dropped NAT entry) is found within about a minute instead of the
    // system's two hours, so no step hangs while the gates stay closed. A
    // conninfo that sets these keeps its own. (Not the server's
    // tcp_keepalives_* through `options`: PgBouncer refuses that
    // startup parameter.)
    let given = |key: &str| conninfo.is_some_and(|s| s.contains(key));
    if !given("keepalives_idle") {
        c.keepalives_idle(KEEPALIVE_IDLE);
    }
    if !given("keepalives_interval") {
        c.keepalives_interval(KEEPALIVE_INTERVAL);
    }
    if !given("keepalives_retries") {
        c.keepalives_retries(KEEPALIVE_RETRIES);
    }
    if !given("tcp_user_timeout") {
        c.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    Ok((c, tls))
}

/// Whether `sql` is a query by its first word (after comments and
/// opening parentheses): SELECT, VALUES, TABLE or WITH. Statements that
/// a READ ONLY transaction still lets act (`COPY … TO PROGRAM`, `CALL`,
/// `DO`, `SET`, `LOAD`) start otherwise; a WITH that writes is stopped by
/// the transaction. Checked before the server parses anything.
pub fn is_query(sql: &str) -> bool {
    // As PostgreSQL's lexer (scan.l) reads it: its whitespace, `--` to the
    // end of the line (`\n` or `\r`), and block comments, which nest.
    let b = sql.as_bytes();
    let mut i = 0;
    loop {
        while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c | b'(') {
            i += 1;
        }
        if b[i..].starts_with(b"--") {
            while i < b.len() && !matches!(b[i], b'\n' | b'\r') {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0usize;
            loop {
                if i >= b.len() {
                    // Unterminated: the server would refuse it anyway.
                    return false;
                } else if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else {
            break;
        }
    }
    let rest = &sql[i..];
    let word: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_lowercase();
    matches!(word.as_str(), "select" | "values" | "table" | "with")
}

/// The password libpq's password file gives this connection, so that
/// none need be on a command line: `PGPASSFILE`, else `~/.pgpass`; lines
/// `host:port:database:user:password`, `*` for any, `\` escaping `:`
/// and `\`, the first match winning. As libpq does, a file others can
/// read is ignored, with a warning.
fn passfile_password(c: &Config) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let path = match std::env::var_os("PGPASSFILE").filter(|v| !v.is_empty()) {
        Some(p) => std::path::PathBuf::from(p),
        None => std::path::PathBuf::from(std::env::var_os("HOME")?).join(".pgpass"),
    };
    let meta = std::fs::metadata(&path).ok()?;
    if !meta.is_file() {
        return None;
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            "password file {} has group or world access and is ignored; permissions should be u=rw (0600) or less",
            path.display()
        );
        return None;
    }
    let text = std::fs::read_to_string(&path).ok()?;
    let host = match c.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        // libpq matches a socket connection as localhost.
        _ => "localhost".to_owned(),
    };
    let port = c.get_ports().first().copied().unwrap_or(5432).to_string();
    let user = c.get_user()?;
    let db = c.get_dbname().unwrap_or(user);
    passfile_match(&text, [&host, &port, db, user])
}

/// The password of the first line of a password file that matches `want`
/// (host, port, database, user).
fn passfile_match(text: &str, want: [&str; 4]) -> Option<String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let mut fields = Vec::with_capacity(5);
            let mut cur = String::new();
            let mut chars = line.chars();
            while let Some(ch) = chars.next() {
                match ch {
                    '\\' => cur.extend(chars.next()),
                    ':' if fields.len() < 4 => fields.push(std::mem::take(&mut cur)),
                    // As libpq: the password ends at an unescaped `:` too.
                    ':' => break,
                    _ => cur.push(ch),
                }
            }
            fields.push(cur);
            let matches = fields.len() == 5
                && fields[..4]
                    .iter()
                    .zip(want)
                    .all(|(f, w)| f == "*" || f == w);
            matches.then(|| fields.pop().unwrap_or_default())
        })
}

/// Keys tokio-postgres knows, which an error may name: anything else it
/// quotes may be a fragment of a value (`password=x y=z` gives "unknown
/// option `y`").
const KNOWN_KEYS: &[&str] = &[
    "user",
    "password",
    "dbname",
    "options",
    "application_name",
    "sslmode",
    "sslnegotiation",
    "host",
    "hostaddr",
    "port",
    "connect_timeout",
    "tcp_user_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "target_session_attrs",
    "channel_binding",
    "load_balance_hosts",
    "replication",
];

/// The parser's complaint without the conninfo's text: its errors quote
/// what they could not read, which can be part of a password.
fn parse_failure(error: &str) -> String {
    let named = error.split('`').nth(1).filter(|k| KNOWN_KEYS.contains(k));
    let hint = "check its keys and quote values with spaces ('…', with \\ and ' escaped); \
                the text is not shown as it may hold a password";
    match named {
        Some(k) => format!("the value of `{k}` is not valid; {hint}"),
        None => format!("it cannot be parsed; {hint}"),
    }
}

/// Splits the password out of a libpq connection string (key/value or
/// URL), so that a child process gets it through `PGPASSWORD` rather
/// than its command line, which every local user can read.
pub fn split_password(conninfo: &str) -> (String, Option<String>) {
    let s = conninfo.trim();
    if let Some(rest) = s
        .strip_prefix("postgresql://")
        .or_else(|| s.strip_prefix("postgres://"))
    {
        let scheme = &s[..s.len() - rest.len()];
        let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
        let (url, mut password) = match authority.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, pw)) => (
                    format!("{scheme}{user}@{host}{tail}"),
                    Some(crate::cache::percent_decode(pw)),
                ),
                None => (s.to_owned(), None),
            },
            None => (s.to_owned(), None),
        };
        // libpq reads the query after the userinfo: its password wins.
        let (url, mut found) = split_keys(&url, &["password"]);
        if let Some((_, p)) = found.pop() {
            password = Some(p);
        }
        return (url, password);
    }
    let (kept, mut found) = split_keys(s, &["password"]);
    (kept, found.pop().map(|(_, v)| v))
}

/// How a PostgreSQL program (pg_basebackup) is given a connection: the
/// conninfo for its command line, which every local user can read, with
/// no secret in it; the password in `PGPASSWORD`; a client key's
/// `sslpassword`, which has no variable, in a service file only this user
/// can read (`PGSERVICEFILE`, `service=reentry`), removed when this is
/// dropped.
pub struct ToolConn {
    pub conninfo: String,
    pub env: Vec<(&'static str, String)>,
    _service: Option<crate::fsutil::ScratchDir>,
}

impl ToolConn {
    pub fn new(conninfo: &str) -> std::io::Result<ToolConn> {
        let (rest, password) = split_password(conninfo);
        let (mut rest, mut found) = split_keys(&rest, &["sslpassword"]);
        let mut env = Vec::new();
        if let Some(p) = password {
            env.push(("PGPASSWORD", p));
        }
        let mut service = None;
        if let Some((_, key_password)) = found.pop() {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let dir = crate::fsutil::ScratchDir::new("reentry-pgservice")?;
            let file = dir.path().join("pg_service.conf");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&file)?;
            // A service file's value runs to the end of its line.
            writeln!(
                f,
                "[reentry]\nsslpassword={}",
                key_password.replace('\n', "")
            )?;
            env.push(("PGSERVICEFILE", file.display().to_string()));
            rest = if rest.starts_with("postgresql://") || rest.starts_with("postgres://") {
                let sep = if rest.contains('?') { '&' } else { '?' };
                format!("{rest}{sep}service=reentry")
            } else {
                format!("{rest} service=reentry")
            };
            service = Some(dir);
        }
        Ok(ToolConn {
            conninfo: rest,
            env,
            _service: service,
        })
    }
}

/// Takes the `keys` out of a libpq connection string: from key = value
/// pairs (values may be single-quoted with \ escapes), or from a URL's
/// query (percent-decoded). Returns the rest, and the pairs taken.
pub fn split_keys(conninfo: &str, keys: &[&str]) -> (String, Vec<(String, String)>) {
    let s = conninfo.trim();
    let mut found = Vec::new();
    if s.starts_with("postgresql://") || s.starts_with("postgres://") {
        let Some((base, query)) = s.split_once('?') else {
            return (s.to_owned(), found);
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let k = crate::cache::percent_decode(k);
            if keys.contains(&k.as_str()) {
                found.push((k, crate::cache::percent_decode(v)));
            } else {
                kept.push(pair);
            }
        }
        return match kept.is_empty() {
            true => (base.to_owned(), found),
            false => (format!("{base}?{}", kept.join("&")), found),
        };
    }
    let mut kept = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let key: String =
            std::iter::from_fn(|| chars.next_if(|c| *c != '=' && !c.is_whitespace())).collect();
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == '=') {
            chars.next();
        }
        let mut raw = String::new();
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            raw.push(chars.next().unwrap());
            while let Some(c) = chars.next() {
                raw.push(c);
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            raw.push(n);
                            value.push(n);
                        }
                    }
                    '\'' => break,
                    c => value.push(c),
                }
            }
        } else {
            // Unquoted, `\x` is `x` (an escaped space does not end it).
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                raw.push(c);
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        raw.push(n);
                        value.push(n);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        if keys.contains(&key.as_str()) {
            found.push((key, value));
        } else {
            kept.push(format!("{key}={raw}"));
        }
    }
    (kept.join(" "), found)
}

/// `v` as one single-quoted value of a key/value conninfo: `\\` and `'`
/// escaped, so that a path with a quote, a backslash or a space in it
/// (`$TMPDIR` is the operator's) stays one value.
pub fn quote_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('\'');
    for c in v.chars() {
        if c == '\\' || c == '\'' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// Where a config points, for messages: never the password.
pub fn target(c: &Config) -> String {
    let host = match c.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = c.get_ports().first().copied().unwrap_or(5432);
    let db = c.get_dbname().or(c.get_user()).unwrap_or("postgres");
    format!("{host}:{port}/{db}")
}

/// A blocking client: the command line runs one thing at a time.
pub struct Db {
    rt: tokio::runtime::Runtime,
    client: Client,
    target: String,
    /// Once `pin_search_path` ran: the path the session had before it, as
    /// the role's and database's settings gave it, and the schemas it
    /// named that exist.
    app_path: Option<(String, Vec<String>)>,
    /// Playbook table names as `table` resolved them.
    tables: std::collections::HashMap<String, String>,
}

/// Which side of a `copy_into` failed.
#[derive(Debug)]
pub enum CopyFailed {
    Read(PgError),
    Write(PgError),
}

/// The search path of a pinned session: the catalog, and temporary
/// objects last, where no relation reentry names can come from them.
pub const PINNED_SEARCH_PATH: &str = "pg_catalog, pg_temp";

/// `name`, each of its dot-separated parts quoted as an identifier.
fn quote_parts(name: &str) -> String {
    name.split('.')
        .map(|p| format!("\"{}\"", p.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(".")
}

impl Db {
    pub fn connect(conninfo: Option<&str>) -> Result<Db, PgError> {
        let (mut config, tls) = config(conninfo)?;
        let target = target(&config);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| PgError::Connect {
                target: target.clone(),
                detail: e.to_string(),
            })?;
        let connector = tls.connector().map_err(|detail| PgError::Connect {
            target: target.clone(),
            detail,
        })?;
        let mut connected = rt.block_on(config.connect(connector.clone()));
        // allow: without TLS first, then with it, as libpq tries them.
        if connected.is_err() && tls.mode == tls::Mode::Allow {
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
            connected = rt.block_on(config.connect(connector));
        }
        let (client, connection) = connected.map_err(|e| {
            let detail = describe(&e);
            let host = target.rsplit_once(':').map_or(target.as_str(), |(h, _)| h);
            PgError::Connect {
                detail: verify_failure(&detail, &tls, host).unwrap_or(detail),
                target: target.clone(),
            }
        })?;
        rt.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection closed");
            }
        });
        Ok(Db {
            rt,
            client,
            target,
            app_path: None,
            tables: std::collections::HashMap::new(),
        })
    }

    /// Pins the session's `search_path` to `pg_catalog, pg_temp`: no
    /// function, operator or table that another role put in a schema on
    /// the role's or database's path can stand in for one reentry calls.
    /// The path as it was is kept: playbook table names resolve against
    /// it (`table`), and playbook SQL runs under it (`as_application`).
    pub fn pin_search_path(&mut self) -> Result<(), PgError> {
        let row = self.query_one(
            "read the search path",
            "SELECT pg_catalog.current_setting('search_path'), pg_catalog.current_schemas(false)::text[]",
            &[],
        )?;
        let path: String = row.get(0);
        let schemas: Vec<String> = row.get(1);
        self.batch(
            "pin the search path",
            &format!("SET search_path = {PINNED_SEARCH_PATH}"),
        )?;
        self.app_path = Some((path, schemas));
        Ok(())
    }

    /// Runs `f` under the application's search path (the session's
    /// before `pin_search_path`): for SQL a playbook wrote, which names
    /// the application's tables as the application does. The pinned path
    /// is set again after, or (when `f` left a failed transaction) by the
    /// caller's rollback, which undoes this change with it.
    pub fn as_application<T, E: From<PgError>>(
        &mut self,
        f: impl FnOnce(&mut Db) -> Result<T, E>,
    ) -> Result<T, E> {
        let Some((path, _)) = self.app_path.clone() else {
            return f(self);
        };
        self.execute(
            "set the application's search path",
            "SELECT pg_catalog.set_config('search_path', $1, false)",
            &[&path],
        )?;
        let r = f(self);
        let back = self.batch(
            "pin the search path",
            &format!("SET search_path = {PINNED_SEARCH_PATH}"),
        );
        match (r, back) {
            (Ok(v), Ok(())) => Ok(v),
            (Ok(_), Err(e)) => Err(e.into()),
            (Err(e), _) => Err(e),
        }
    }

    /// A table a playbook names, as SQL: `schema.table` as written, each
    /// part quoted; an unqualified name in the first schema of the
    /// application's search path that holds a relation of that name, as
    /// the application's own statements would find it. A name no schema
    /// holds stays unqualified: it then resolves to nothing, and the
    /// caller's lookup says the table does not exist.
    pub fn table(&mut self, name: &str) -> Result<String, PgError> {
        if name.contains('.') {
            return Ok(quote_parts(name));
        }
        if let Some(t) = self.tables.get(name) {
            return Ok(t.clone());
        }
        let Some((_, schemas)) = self.app_path.clone() else {
            return Ok(quote_parts(name));
        };
        let found = self.query(
            "resolve a table on the search path",
            "SELECT p.s FROM pg_catalog.unnest($1::text[]) WITH ORDINALITY AS p(s, i)
              WHERE EXISTS (SELECT FROM pg_catalog.pg_class c
                              JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                             WHERE n.nspname OPERATOR(pg_catalog.=) p.s
                               AND c.relname OPERATOR(pg_catalog.=) $2::text)
              ORDER BY p.i LIMIT 1",
            &[&schemas, &name],
        )?;
        let Some(r) = found.first() else {
            return Ok(quote_parts(name));
        };
        let schema: String = r.get(0);
        let q = format!(
            "\"{}\".\"{}\"",
            schema.replace('"', "\"\""),
            name.replace('"', "\"\"")
        );
        self.tables.insert(name.to_owned(), q.clone());
        Ok(q)
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    pub fn query(
        &mut self,
        context: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, PgError> {
        self.rt
            .block_on(self.client.query(sql, params))
            .map_err(|e| self.error(context, &e))
    }

    pub fn query_one(
        &mut self,
        context: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, PgError> {
        self.rt
            .block_on(self.client.query_one(sql, params))
            .map_err(|e| self.error(context, &e))
    }

    /// Runs a statement; the number of rows it touched.
    pub fn execute(
        &mut self,
        context: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, PgError> {
        self.rt
            .block_on(self.client.execute(sql, params))
            .map_err(|e| self.error(context, &e))
    }

    /// Parses `sql` as one query (see `is_query`), without running it.
    pub fn prepare_query(&mut self, context: &str, sql: &str) -> Result<(), PgError> {
        if !is_query(sql) {
            return Err(self.not_a_query(context));
        }
        let stmt = self.rt.block_on(self.client.prepare(sql));
        stmt.map(|_| ()).map_err(|e| self.error(context, &e))
    }

    fn not_a_query(&self, context: &str) -> PgError {
        PgError::Query {
            target: self.target.clone(),
            context: context.to_owned(),
            detail: "not a query: playbook SQL is one statement that starts SELECT, VALUES, TABLE or WITH".into(),
            code: None,
        }
    }

    pub fn batch(&mut self, context: &str, sql: &str) -> Result<(), PgError> {
        self.rt
            .block_on(self.client.batch_execute(sql))
            .map_err(|e| self.error(context, &e))
    }

    /// Runs `f` in a transaction: committed when it returns `Ok`, rolled
    /// back otherwise.
    pub fn transaction<T, E: From<PgError>>(
        &mut self,
        begin: &str,
        f: impl FnOnce(&mut Db) -> Result<T, E>,
    ) -> Result<T, E> {
        self.batch("begin a transaction", begin)?;
        match f(self) {
            Ok(v) => {
                self.batch("commit", "COMMIT")?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.batch("roll back", "ROLLBACK");
                Err(e)
            }
        }
    }

    /// Streams a query's rows in batches of `batch` through a portal, in a
    /// transaction of its own: memory stays bounded however many rows match.
    pub fn stream_rows<E: From<PgError>>(
        &mut self,
        context: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        batch: i32,
        mut f: impl FnMut(&[Row]) -> Result<(), E>,
    ) -> Result<(), E> {
        let target = self.target.clone();
        let wrap = |e: tokio_postgres::Error| PgError::Query {
            target: target.clone(),
            context: context.to_owned(),
            detail: describe(&e),
            code: e.code().cloned(),
        };
        let client = &mut self.client;
        self.rt.block_on(async {
            let tx = client.transaction().await.map_err(wrap)?;
            let portal = tx.bind(sql, params).await.map_err(wrap)?;
            loop {
                let rows = tx.query_portal(&portal, batch).await.map_err(wrap)?;
                if rows.is_empty() {
                    break;
                }
                f(&rows)?;
            }
            tx.commit().await.map_err(wrap)?;
            Ok(())
        })
    }

    /// `COPY … TO STDOUT`: the bytes it sends, whole (callers bound its
    /// size by what they ask for).
    pub fn copy_out(&mut self, context: &str, sql: &str) -> Result<Vec<u8>, PgError> {
        let mut out = Vec::new();
        self.copy_out_each(context, sql, |chunk| -> Result<(), PgError> {
            out.extend_from_slice(chunk);
            Ok(())
        })?;
        Ok(out)
    }

    /// `COPY … TO STDOUT`, each message handed to `f` as it arrives
    /// (PostgreSQL sends one a row).
    pub fn copy_out_each<E: From<PgError>>(
        &mut self,
        context: &str,
        sql: &str,
        mut f: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        use futures_util::StreamExt;
        let target = self.target.clone();
        let wrap = |e: tokio_postgres::Error| PgError::Query {
            target: target.clone(),
            context: context.to_owned(),
            detail: describe(&e),
            code: e.code().cloned(),
        };
        let client = &self.client;
        self.rt.block_on(async {
            let stream = client.copy_out(sql).await.map_err(wrap)?;
            futures_util::pin_mut!(stream);
            while let Some(chunk) = stream.next().await {
                f(&chunk.map_err(wrap)?)?;
            }
            Ok(())
        })
    }

    /// `COPY … TO STDOUT` here, into `COPY … FROM STDIN` on `dst`, a
    /// message at a time: memory holds about one row, however wide the
    /// rows and however many (PostgreSQL sends a message per row). A
    /// failed read drops the sink, which aborts `dst`'s COPY. The rows
    /// loaded, or which side failed.
    pub fn copy_into(
        &mut self,
        context: &str,
        out_sql: &str,
        dst: &mut Db,
        in_context: &str,
        in_sql: &str,
    ) -> Result<u64, CopyFailed> {
        use futures_util::{SinkExt, StreamExt};
        let stream = self
            .rt
            .block_on(self.client.copy_out(out_sql))
            .map_err(|e| CopyFailed::Read(self.error(context, &e)))?;
        let mut stream = Box::pin(stream);
        let sink = dst
            .rt
            .block_on(dst.client.copy_in::<_, bytes::Bytes>(in_sql))
            .map_err(|e| CopyFailed::Write(dst.error(in_context, &e)))?;
        let mut sink = Box::pin(sink);
        loop {
            match self.rt.block_on(stream.next()) {
                None => break,
                Some(Ok(chunk)) => dst
                    .rt
                    .block_on(sink.feed(chunk))
                    .map_err(|e| CopyFailed::Write(dst.error(in_context, &e)))?,
                Some(Err(e)) => return Err(CopyFailed::Read(self.error(context, &e))),
            }
        }
        dst.rt
            .block_on(sink.as_mut().finish())
            .map_err(|e| CopyFailed::Write(dst.error(in_context, &e)))
    }

    /// `COPY … FROM STDIN` with `data`; the rows it loaded.
    pub fn copy_in(&mut self, context: &str, sql: &str, data: Vec<u8>) -> Result<u64, PgError> {
        use futures_util::SinkExt;
        let target = self.target.clone();
        let wrap = |e: tokio_postgres::Error| PgError::Query {
            target: target.clone(),
            context: context.to_owned(),
            detail: describe(&e),
            code: e.code().cloned(),
        };
        let client = &self.client;
        self.rt.block_on(async {
            let sink = client.copy_in(sql).await.map_err(wrap)?;
            futures_util::pin_mut!(sink);
            sink.send(bytes::Bytes::from(data)).await.map_err(wrap)?;
            sink.finish().await.map_err(wrap)
        })
    }

    /// Whether the connection is gone (server restarted, network cut): the
    /// kind of failure worth a retry with a new connection.
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Runs one query, `sql`, and returns each row's columns as the
    /// server prints them, joined; for user-written checks of any shape.
    ///
    /// The statement is parsed first through the extended protocol, which
    /// takes exactly one: several (`…; COMMIT; BEGIN READ WRITE; …`) could
    /// end the transaction the caller runs it in. It must be a query (see
    /// `is_query`): a statement such as `COPY … TO PROGRAM` acts even in a
    /// read-only transaction, and is refused unrun. Only then is the same
    /// text run through the simple protocol, whose rows come as text
    /// whatever their types: one query, printed as psql would.
    pub fn text_rows(&mut self, context: &str, sql: &str) -> Result<Vec<String>, PgError> {
        if !is_query(sql) {
            return Err(self.not_a_query(context));
        }
        self.own_text_rows(context, sql)
    }

    /// `text_rows` for reentry's own statements (`EXPLAIN`), which are no
    /// query by their first word: one statement, unchecked.
    pub fn own_text_rows(&mut self, context: &str, sql: &str) -> Result<Vec<String>, PgError> {
        let stmt = self.rt.block_on(self.client.prepare(sql));
        stmt.map_err(|e| self.error(context, &e))?;
        let messages = self.rt.block_on(self.client.simple_query(sql));
        let messages = messages.map_err(|e| self.error(context, &e))?;
        Ok(messages
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                    (0..r.len())
                        .map(|i| r.get(i).unwrap_or("NULL"))
                        .collect::<Vec<_>>()
                        .join(", "),
                ),
                _ => None,
            })
            .collect())
    }

    fn error(&self, context: &str, e: &tokio_postgres::Error) -> PgError {
        let mut detail = describe(e);
        if self.app_path.is_some() {
            if let Some(why) = e.as_db_error().and_then(unpinned_function) {
                detail.push_str(&why);
            }
        }
        PgError::Query {
            target: self.target.clone(),
            context: context.to_owned(),
            detail,
            code: e.code().cloned(),
        }
    }
}

/// When a name was not found inside a function (an application's
/// trigger, rule or default that fired on reentry's write): which one,
/// and what to do. Such a function runs under the session's pinned search
/// path, and finds nothing it names without a schema.
fn unpinned_function(db: &tokio_postgres::error::DbError) -> Option<String> {
    let not_found = [
        SqlState::UNDEFINED_TABLE,
        SqlState::UNDEFINED_FUNCTION,
        SqlState::UNDEFINED_OBJECT,
        SqlState::INVALID_SCHEMA_NAME,
    ];
    let place = db.where_().filter(|_| not_found.contains(db.code()))?;
    let place = place.lines().last().unwrap_or(place);
    Some(format!(
        "; in {place}, which ran under reentry's search path ({PINNED_SEARCH_PATH}): a function of the application that names tables or functions without their schema needs a path of its own (ALTER FUNCTION … SET search_path = …)"
    ))
}

/// The tuples of a `COPY … (FORMAT binary)` stream, fed the stream's bytes
/// in whatever pieces they come: each tuple's fields (`None` for NULL).
#[derive(Default)]
pub struct BinaryCopy {
    buf: Vec<u8>,
    at: usize,
    header: bool,
    ended: bool,
}

impl BinaryCopy {
    const SIGNATURE: &'static [u8] = b"PGCOPY\n\xff\r\n\0";

    pub fn feed(
        &mut self,
        bytes: &[u8],
        mut tuple: impl FnMut(&[Option<&[u8]>]) -> Result<(), String>,
    ) -> Result<(), String> {
        // What was read goes; a partial tuple left at the end stays.
        self.buf.drain(..self.at);
        self.at = 0;
        self.buf.extend_from_slice(bytes);
        const MAX: usize = 8;
        loop {
            let b = &self.buf[self.at..];
            if !self.header {
                // Signature, flags, then the header extension's length.
                let seen = b.len().min(Self::SIGNATURE.len());
                if b[..seen] != Self::SIGNATURE[..seen] {
                    return Err("not a binary COPY stream".into());
                }
                let Some(ext) = b.get(15..19) else {
                    break;
                };
                // Bit 16: each tuple carries an OID; 17-31: critical, unknown.
                let flags = u32::from_be_bytes(b[11..15].try_into().expect("4 bytes"));
                if flags >> 16 != 0 {
                    return Err(format!(
                        "a binary COPY with flags {flags:#x}, not read here"
                    ));
                }
                let skip = 19 + u32::from_be_bytes(ext.try_into().expect("4 bytes")) as usize;
                if b.len() < skip {
                    break;
                }
                self.at += skip;
                self.header = true;
                continue;
            }
            let Some(n) = b.get(..2) else {
                break;
            };
            let n = i16::from_be_bytes(n.try_into().expect("2 bytes"));
            if n == -1 {
                self.ended = true;
                self.at = self.buf.len();
                break;
            }
            if self.ended {
                return Err("data after the end of a binary COPY".into());
            }
            let n = usize::try_from(n).map_err(|_| format!("a tuple of {n} fields"))?;
            if n > MAX {
                return Err(format!(
                    "a tuple of {n} fields, where at most {MAX} are read"
                ));
            }
            let mut fields: [Option<&[u8]>; MAX] = [None; MAX];
            let mut p = 2usize;
            let mut whole = true;
            for field in fields.iter_mut().take(n) {
                let Some(len) = b.get(p..p + 4) else {
                    whole = false;
                    break;
                };
                let len = i32::from_be_bytes(len.try_into().expect("4 bytes"));
                p += 4;
                if len < 0 {
                    continue;
                }
                let end = p + len as usize;
                if b.len() < end {
                    whole = false;
                    break;
                }
                *field = Some(&b[p..end]);
                p = end;
            }
            if !whole {
                break;
            }
            tuple(&fields[..n])?;
            self.at += p;
        }
        Ok(())
    }

    /// Whether the stream's trailer came: a stream cut short has none.
    pub fn ended(&self) -> bool {
        self.ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binary COPY of `tuples`, as PostgreSQL writes one.
    fn copy_bytes(tuples: &[Vec<Option<&[u8]>>]) -> Vec<u8> {
        let mut b = b"PGCOPY\n\xff\r\n\0".to_vec();
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&3u32.to_be_bytes());
        b.extend_from_slice(b"ext");
        for t in tuples {
            b.extend_from_slice(&(t.len() as i16).to_be_bytes());
            for f in t {
                match f {
                    None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                    Some(v) => {
                        b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                        b.extend_from_slice(v);
                    }
                }
            }
        }
        b.extend_from_slice(&(-1i16).to_be_bytes());
        b
    }

    #[test]
    fn a_binary_copy_reads_the_same_tuples_however_its_bytes_are_cut() {
        let tuples: Vec<Vec<Option<&[u8]>>> = vec![
            vec![Some(b"a"), None, Some(b"")],
            vec![Some(b"bcd"), Some(&[1, 2, 3, 4, 5, 6, 7, 8]), None],
            vec![None, None, Some(b"last")],
        ];
        let bytes = copy_bytes(&tuples);
        let want: Vec<Vec<Option<Vec<u8>>>> = tuples
            .iter()
            .map(|t| t.iter().map(|f| f.map(<[u8]>::to_vec)).collect())
            .collect();
        for piece in 1..=bytes.len() {
            let mut c = BinaryCopy::default();
            let mut got = Vec::new();
            for chunk in bytes.chunks(piece) {
                c.feed(chunk, |f| {
                    got.push(f.iter().map(|f| f.map(<[u8]>::to_vec)).collect::<Vec<_>>());
                    Ok(())
                })
                .unwrap();
            }
            assert_eq!(got, want, "in pieces of {piece}");
            assert!(c.ended(), "in pieces of {piece}");
        }
    }

    #[test]
    fn a_binary_copy_cut_short_or_not_binary_is_told() {
        let bytes = copy_bytes(&[vec![Some(b"x")]]);
        let mut c = BinaryCopy::default();
        c.feed(&bytes[..bytes.len() - 2], |_| Ok(())).unwrap();
        assert!(!c.ended(), "no trailer yet");
        let mut text = BinaryCopy::default();
        let err = text
            .feed(b"1\tabc\n2\tdef\n3\tghi\n", |_| Ok(()))
            .unwrap_err();
        assert!(err.contains("not a binary COPY"), "{err}");
    }

    #[test]
    fn a_query_is_known_by_its_first_word() {
        for q in [
            "SELECT 1",
            "select from t where x",
            "  (SELECT 1) UNION (SELECT 2)",
            "-- why\n/* what */ WITH a AS (SELECT 1) SELECT * FROM a",
            "VALUES (1)",
            "TABLE t",
            "/* a /* nested */ comment */ SELECT 1",
            "/**/SELECT 1",
            "--\rSELECT 1",
        ] {
            assert!(is_query(q), "{q}");
        }
        for q in [
            "COPY (SELECT 1) TO PROGRAM 'id'",
            "/* SELECT */ CALL p()",
            "DO $$ BEGIN END $$",
            "SET ROLE x",
            "selection",
            "",
            // Block comments nest: the SELECT is inside one.
            "/* /* */ SELECT */ COPY (SELECT 1) TO PROGRAM 'id'",
            // A `--` comment ends at a carriage return too.
            "--\rCOPY (\nSELECT 1) TO PROGRAM 'id'",
            "/* unterminated SELECT 1",
        ] {
            assert!(!is_query(q), "{q}");
        }
    }

    #[test]
    fn a_password_file_is_read_as_libpq_reads_it() {
        let file = "# comment\n\
                    db1:5432:app:alice:first\n\
                    *:5433:*:alice:any\\:colon\n\
                    db\\:2:*:*:bob:escaped\n\
                    *:*:*:*:fallback\n";
        let m = |w: [&str; 4]| passfile_match(file, w);
        assert_eq!(m(["db1", "5432", "app", "alice"]).as_deref(), Some("first"));
        assert_eq!(
            m(["db9", "5433", "x", "alice"]).as_deref(),
            Some("any:colon")
        );
        assert_eq!(m(["db:2", "1", "y", "bob"]).as_deref(), Some("escaped"));
        assert_eq!(
            m(["db1", "5432", "app", "carol"]).as_deref(),
            Some("fallback")
        );
        assert_eq!(passfile_match("h:1:d:u\n", ["h", "1", "d", "u"]), None);
        // libpq ends the password at an unescaped `:`.
        assert_eq!(
            passfile_match("h:1:d:u:pw:trailing\n", ["h", "1", "d", "u"]).as_deref(),
            Some("pw")
        );
    }

    #[test]
    fn a_program_gets_no_secret_on_its_command_line() {
        let t = ToolConn::new(
            "host=db user=app password='pw 1' sslmode=verify-full sslkey=/k.pem sslpassword=s3cret",
        )
        .unwrap();
        assert_eq!(
            t.conninfo,
            "host=db user=app sslmode=verify-full sslkey=/k.pem service=reentry"
        );
        assert_eq!(t.env[0], ("PGPASSWORD", "pw 1".to_owned()));
        let (var, file) = &t.env[1];
        assert_eq!(*var, "PGSERVICEFILE");
        assert_eq!(
            std::fs::read_to_string(file).unwrap(),
            "[reentry]\nsslpassword=s3cret\n"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let u =
            ToolConn::new("postgresql://app:pw@db/x?sslpassword=s%20x&sslmode=require").unwrap();
        assert_eq!(
            u.conninfo,
            "postgresql://app@db/x?sslmode=require&service=reentry"
        );
        let q = ToolConn::new("postgresql://app@db/x?password=pw&sslpassword=kp").unwrap();
        assert_eq!(q.conninfo, "postgresql://app@db/x?service=reentry");
        assert_eq!(q.env[0], ("PGPASSWORD", "pw".to_owned()));
        let file = u.env[1].1.clone();
        drop(u);
        assert!(!std::path::Path::new(&file).exists(), "removed once done");
    }

    #[test]
    fn the_password_leaves_the_connection_string() {
        let cases = [
            (
                "host=db port=5432 user=app password=s3cret dbname=x",
                "host=db port=5432 user=app dbname=x",
                Some("s3cret"),
            ),
            (
                "host=db password = 'a b\\'c' user=a",
                "host=db user=a",
                Some("a b'c"),
            ),
            ("host=db user=a", "host=db user=a", None),
            (
                "postgresql://app:s3cret@db:5432/x?sslmode=require",
                "postgresql://app@db:5432/x?sslmode=require",
                Some("s3cret"),
            ),
            ("postgres://app@db/x", "postgres://app@db/x", None),
            (
                "postgresql://app@db/x?sslmode=require&password=s%203&application_name=a",
                "postgresql://app@db/x?sslmode=require&application_name=a",
                Some("s 3"),
            ),
            (
                "postgresql://app:p%40ss@db/x",
                "postgresql://app@db/x",
                Some("p@ss"),
            ),
            (
                "host=db password=a\\ b\\'c user=a",
                "host=db user=a",
                Some("a b'c"),
            ),
        ];
        for (input, kept, password) in cases {
            let (k, p) = split_password(input);
            assert_eq!((k.as_str(), p.as_deref()), (kept, password), "{input}");
        }
    }

    #[test]
    fn a_conninfo_that_does_not_parse_is_never_quoted_back() {
        for (conninfo, names) in [
            ("host=h password=x y=z", None),
            ("host=h port=s3cr3t", Some("port")),
            ("host=h password='s3cr3t", None),
        ] {
            let e = config(Some(conninfo)).unwrap_err().to_string();
            assert!(e.starts_with("invalid connection string: "), "{e}");
            for fragment in ["x", "y", "z", "s3cr3t"] {
                assert!(
                    !e.contains(&format!("`{fragment}`")) && !e.contains("s3cr3t"),
                    "{e}"
                );
            }
            if let Some(k) = names {
                assert!(e.contains(&format!("`{k}`")), "{e}");
            }
        }
    }

    #[test]
    fn a_quoted_value_is_one_value_whatever_it_holds() {
        for host in ["/tmp/it's here", r"/tmp/back\slash", "/tmp/a b=c port=1"] {
            let conninfo = format!("host={} port=5433", quote_value(host));
            let c: Config = conninfo.parse().unwrap();
            assert_eq!(
                c.get_hosts(),
                [tokio_postgres::config::Host::Unix(host.into())],
                "{conninfo}"
            );
            assert_eq!(c.get_ports(), [5433]);
            let (_, found) = split_keys(&conninfo, &["host"]);
            assert_eq!(found, [("host".to_owned(), host.to_owned())]);
        }
    }
}
