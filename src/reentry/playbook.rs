//! Playbooks: the declarative file an application team writes for the return
//! of its services after a restore. Parsed strictly and in stages (syntax,
//! schema, meaning), every error reported at once with file:line:column.
//! `${VAR}` reads secrets from the environment; a playbook shows the
//! template, never the value.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml_edit::{ImDocument, Item};

use crate::diag::{Diagnostic, Diagnostics};
use crate::reentry::schema::{self, opt, req, Field, Kind};
use crate::reentry::steps::KINDS;

pub const WAY_BACK: &[&str] = &["cutover", "selective-repair"];

/// Names a section may use for a database by its part in the way back:
/// `survivor` is the one that takes traffic afterwards (`current` after a
/// selective repair, `restored` after a cutover), `retired` the other. So
/// one playbook serves both ways back.
pub const ROLES: &[&str] = &["survivor", "retired"];

/// A playbook section: one typed model, from which both serde's parse and
/// the located checks (`schema::check_table`: unknown, missing and
/// ill-typed keys, all at once) come. Each field names its key once.
macro_rules! section {
    (
        $(#[$m:meta])*
        pub struct $name:ident {
            $(extra { $($(#[$em:meta])* pub $efield:ident : $ety:ty),* $(,)? })?
            $( $(#[$fm:meta])* pub $field:ident : $ty:ty => $req:ident($key:literal, $kind:expr) ),* $(,)?
        }
    ) => {
        $(#[$m])*
        #[derive(Debug, Clone, Serialize, Deserialize)]
        pub struct $name {
            $($( $(#[$em])* pub $efield: $ety, )*)?
            $( $(#[$fm])* #[serde(rename = $key)] pub $field: $ty, )*
        }

        impl $name {
            /// Its keys, for the located checks.
            pub const FIELDS: &'static [Field] = &[ $( $req($key, $kind) ),* ];
        }
    };
}
pub(crate) use section;

// Each kind owns its section; the playbook holds them.
pub use crate::reentry::steps::consumers::{
    ConsumerGroup, InboxSection as Inbox, KafkaSection as Kafka,
};
pub use crate::reentry::steps::gates::{Gates, Quartz, ShedLock, SystemGate};
pub use crate::reentry::steps::idempotency::IDEMPOTENCY_ACTIONS;
pub use crate::reentry::steps::idempotency::{CsvSource, Idempotency};
pub use crate::reentry::steps::outbox::OUTBOX_FLAVOURS;
pub use crate::reentry::steps::outbox::{EventId, Outbox, OutboxColumns};
pub use crate::reentry::steps::validate::{NamedQuery, Validation};

/// The whole file: the playbook's own sections, with the keys each kind
/// adds (a top-level section, or keys in a shared table such as
/// `[validation]`), so that a kind's keys live in its module.
pub fn schema() -> &'static [Field] {
    static SCHEMA: std::sync::OnceLock<Vec<Field>> = std::sync::OnceLock::new();
    SCHEMA.get_or_init(|| {
        let mut top: Vec<Field> = Playbook::FIELDS.to_vec();
        for k in KINDS {
            for (table, fields) in k.keys {
                match table {
                    None => top.extend_from_slice(fields),
                    Some(t) => {
                        let f = top.iter_mut().find(|f| f.key == *t).unwrap_or_else(|| {
                            panic!("a kind adds keys to [{t}], which the playbook does not have")
                        });
                        let Kind::Table(own) = f.kind else {
                            panic!("a kind adds keys to `{t}`, which is not a table");
                        };
                        let both: Vec<Field> = own.iter().chain(fields.iter()).copied().collect();
                        f.kind = Kind::Table(Box::leak(both.into_boxed_slice()));
                    }
                }
            }
        }
        top
    })
}

/// A string that may carry secrets from the environment: shown as written
/// (`password=${DB_PASSWORD}`), used expanded.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "String")]
pub struct Interpolated {
    pub template: String,
    value: Option<String>,
}

impl From<String> for Interpolated {
    fn from(template: String) -> Interpolated {
        let value = schema::interpolate(&template).ok();
        Interpolated { template, value }
    }
}

impl Interpolated {
    /// The expanded value: for connecting, never for printing.
    pub fn expose(&self) -> &str {
        self.value.as_deref().unwrap_or(&self.template)
    }
}

impl fmt::Debug for Interpolated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.template)
    }
}

impl fmt::Display for Interpolated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.template)
    }
}

impl Serialize for Interpolated {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.template)
    }
}

/// A database's conninfo: `${VAR}` values are quoted for where they land,
/// so that a password such as `x y=z` stays one value instead of becoming
/// more keys (and an error quoting a fragment of it). In a key/value
/// conninfo a value is single-quoted (`\` and `'` escaped), or
/// backslash-escaped inside a longer value; in a `postgres://` URL it is
/// percent-encoded. A variable that starts the conninfo is conninfo text
/// itself (`${DATABASE_URL}`) and is used as it is.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "String")]
pub struct Conninfo(Interpolated);

impl From<String> for Conninfo {
    fn from(template: String) -> Conninfo {
        let url = ["postgresql://", "postgres://"]
            .iter()
            .any(|p| template.trim_start().starts_with(p));
        let value = schema::interpolate_with(&template, |before, after, v| {
            if before.trim().is_empty() {
                v.to_owned()
            } else if url {
                percent_encode(v)
            } else {
                conninfo_quote(before, after, v)
            }
        })
        .ok();
        Conninfo(Interpolated { template, value })
    }
}

impl std::ops::Deref for Conninfo {
    type Target = Interpolated;
    fn deref(&self) -> &Interpolated {
        &self.0
    }
}

impl fmt::Debug for Conninfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Conninfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl Serialize for Conninfo {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// `v` written into a key/value conninfo after `before`, followed by
/// `after`: escaped within a quoted value, quoted when it is a whole value,
/// backslash-escaped when it is part of an unquoted one (libpq and
/// tokio-postgres both take `\x` as `x` there).
fn conninfo_quote(before: &str, after: &str, v: &str) -> String {
    let mut quoted = false;
    let mut chars = before.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '\'' => quoted = !quoted,
            _ => {}
        }
    }
    let escape = |extra: fn(char) -> bool| {
        let mut out = String::with_capacity(v.len() + 2);
        for c in v.chars() {
            if c == '\\' || c == '\'' || extra(c) {
                out.push('\\');
            }
            out.push(c);
        }
        out
    };
    let whole =
        before.trim_end().ends_with('=') && after.chars().next().is_none_or(char::is_whitespace);
    if quoted {
        escape(|_| false)
    } else if whole {
        format!("'{}'", escape(|_| false))
    } else {
        escape(char::is_whitespace)
    }
}

/// Percent-encodes all but RFC 3986's unreserved characters.
fn percent_encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum WayBack {
    Cutover,
    SelectiveRepair,
}

impl fmt::Display for WayBack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WayBack::Cutover => "cutover",
            WayBack::SelectiveRepair => "selective-repair",
        })
    }
}

section! {
    pub struct Meta {
        pub name: String => req("name", Kind::Str),
        pub way_back: WayBack => req("way-back", Kind::OneOf(WAY_BACK)),
        pub description: Option<String> => opt("description", Kind::Str),
    }
}

section! {
    pub struct Database {
        pub conninfo: Conninfo => req("conninfo", Kind::Interp),
    }
}

section! {
    pub struct RecoveryTarget {
        pub manifest: Option<PathBuf> => opt("manifest", Kind::Str),
        pub time: Option<String> => opt("time", Kind::Str),
        pub lsn: Option<String> => opt("lsn", Kind::Str),
    }
}

section! {
    pub struct Check {
        pub database: String => req("database", Kind::Str),
        pub sql: String => req("sql", Kind::Str),
    }
}

section! {
    pub struct Playbook {
        extra {
            /// The file it came from, to locate errors found later (online checks).
            #[serde(skip)]
            pub file: PathBuf,
            #[serde(skip)]
            pub text: String,
            /// The file as parsed, for the keys kinds own (`part`).
            #[serde(skip)]
            pub raw: toml::Table,
            /// `[playbook] way-back` as the file says it; `playbook.way_back`
            /// is the one this load took (`--way-back` may differ).
            #[serde(skip)]
            pub declared_way_back: Option<WayBack>,
        }
        pub playbook: Meta => req("playbook", Kind::Table(Meta::FIELDS)),
        pub databases: BTreeMap<String, Database> => req("databases", Kind::Map(Database::FIELDS)),
        pub recovery_target: RecoveryTarget => req("recovery-target", Kind::Table(RecoveryTarget::FIELDS)),
        pub gates: Gates => req("gates", Kind::Table(Gates::FIELDS)),
        #[serde(default)]
        pub validation: Validation => opt("validation", Kind::Table(Validation::FIELDS)),
        #[serde(default)]
        pub outbox: Vec<Outbox> => opt("outbox", Kind::Tables(Outbox::FIELDS)),
        pub kafka: Option<Kafka> => opt("kafka", Kind::Table(Kafka::FIELDS)),
        #[serde(default)]
        pub inbox: Vec<Inbox> => opt("inbox", Kind::Tables(Inbox::FIELDS)),
        #[serde(default)]
        pub idempotency: Vec<Idempotency> => opt("idempotency", Kind::Tables(Idempotency::FIELDS)),
    }
}

/// What a kind's meaning checks report into: errors located in the file.
pub struct Meaning<'a> {
    pub p: &'a Playbook,
    err: &'a mut dyn FnMut(&[Seg], String),
    known: &'a str,
}

impl Meaning<'_> {
    pub fn error(&mut self, at: &[Seg], message: String) {
        (self.err)(at, message);
    }

    /// `name`, at `at`, must be a database the playbook declares.
    pub fn database(&mut self, at: &[Seg], name: &str) {
        if !self.p.databases.contains_key(name) {
            let known = self.known.to_owned();
            self.error(
                at,
                format!("no database named `{name}` in [databases] (declared: {known})"),
            );
        }
    }
}

/// A step in a path into the document, to locate a semantic error.
pub enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

/// Where `path` points in the document; the deepest place found when the
/// path goes further than the file (a missing key is located at its table).
fn span_at(doc: &ImDocument<&str>, path: &[Seg]) -> Option<std::ops::Range<usize>> {
    let mut item = doc.as_item().clone();
    let mut span = None;
    for seg in path {
        let step = match seg {
            Seg::Key(k) => {
                item.as_table_like()
                    .and_then(|t| t.get_key_value(k))
                    .map(|(key, next)| {
                        let s = next.span().or_else(|| key.span());
                        (next.clone(), s)
                    })
            }
            Seg::Index(i) => match &item {
                Item::ArrayOfTables(a) => a.get(*i).map(|t| (Item::Table(t.clone()), t.span())),
                _ => item
                    .as_array()
                    .and_then(|a| a.get(*i))
                    .map(|v| (Item::Value(v.clone()), v.span())),
            },
        };
        let Some((next, s)) = step else { break };
        span = s.or(span);
        item = next;
    }
    span
}

/// Sets `[playbook] way-back` to `way` when given, and replaces the
/// roles `survivor` and `retired` wherever a section names a database
/// (`database`, `databases`, `*-database`) by the database they stand for
/// on that way back. The way back the file declares.
fn settle_way_back(raw: &mut toml::Table, way: Option<WayBack>) -> Option<WayBack> {
    let meta = raw.get_mut("playbook").and_then(toml::Value::as_table_mut);
    let declared = meta
        .as_ref()
        .and_then(|m| m.get("way-back"))
        .and_then(|v| v.clone().try_into::<WayBack>().ok());
    if let (Some(m), Some(w)) = (meta, way) {
        m.insert("way-back".into(), toml::Value::String(w.to_string()));
    }
    let Some(w) = way.or(declared) else {
        return declared;
    };
    let (survivor, retired) = crate::reentry::plan::survivor(w);
    fn walk(v: &mut toml::Value, key: &str, roles: (&str, &str)) {
        let names_database = key == "database" || key == "databases" || key.ends_with("-database");
        match v {
            toml::Value::String(s) if names_database => {
                if s == "survivor" {
                    *s = roles.0.into();
                } else if s == "retired" {
                    *s = roles.1.into();
                }
            }
            toml::Value::Array(a) => a.iter_mut().for_each(|x| walk(x, key, roles)),
            toml::Value::Table(t) => {
                for (k, x) in t.iter_mut() {
                    walk(x, k, roles);
                }
            }
            _ => {}
        }
    }
    for (k, v) in raw.iter_mut() {
        if k != "databases" {
            walk(v, k, (survivor, retired));
        }
    }
    declared
}

impl Playbook {
    /// A diagnostic at `path` in this playbook's file.
    pub fn at(&self, path: &[Seg], message: String) -> Diagnostic {
        let span = ImDocument::parse(self.text.as_str())
            .ok()
            .and_then(|doc| span_at(&doc, path));
        Diagnostic::at(span, message)
    }

    /// Reads, checks and returns a playbook, or every error in it. Every
    /// `${VAR}` it uses must be set: whoever loads it this way connects.
    pub fn load(path: &Path) -> Result<Playbook, Diagnostics> {
        Playbook::load_as(path, None)
    }

    /// `load`, taking the way back `way` instead of the file's own
    /// (`--way-back`): the sections that name one, and the database
    /// roles, follow it.
    pub fn load_as(path: &Path, way: Option<WayBack>) -> Result<Playbook, Diagnostics> {
        let (p, unset) = Playbook::load_offline_as(path, way)?;
        if unset.items.is_empty() {
            Ok(p)
        } else {
            Err(unset)
        }
    }

    /// For linting without the secrets (`playbook check --offline`, an
    /// application team's CI): the playbook, and a note for each `${VAR}`
    /// not set, which only connecting needs.
    pub fn load_offline(path: &Path) -> Result<(Playbook, Diagnostics), Diagnostics> {
        Playbook::load_offline_as(path, None)
    }

    pub fn load_offline_as(
        path: &Path,
        way: Option<WayBack>,
    ) -> Result<(Playbook, Diagnostics), Diagnostics> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Diagnostics::new(
                path,
                "",
                vec![Diagnostic::at(None, format!("cannot read it: {e}"))],
            )
        })?;
        Playbook::parse_offline_as(path, &text, way)
    }

    /// `parse_offline`, with an unset `${VAR}` an error.
    pub fn parse(path: &Path, text: &str) -> Result<Playbook, Diagnostics> {
        let (p, unset) = Playbook::parse_offline(path, text)?;
        if unset.items.is_empty() {
            Ok(p)
        } else {
            Err(unset)
        }
    }

    pub fn parse_offline(path: &Path, text: &str) -> Result<(Playbook, Diagnostics), Diagnostics> {
        Playbook::parse_offline_as(path, text, None)
    }

    pub fn parse_offline_as(
        path: &Path,
        text: &str,
        way: Option<WayBack>,
    ) -> Result<(Playbook, Diagnostics), Diagnostics> {
        let fail = |items: Vec<Diagnostic>| Diagnostics::new(path, text, items);
        let doc = ImDocument::parse(text).map_err(|e| {
            fail(vec![Diagnostic::at(
                e.span(),
                e.message().trim().to_owned(),
            )])
        })?;
        let mut found = Vec::new();
        schema::check_table(doc.as_table(), None, schema(), "the playbook", &mut found);
        let (unset, errors): (Vec<Diagnostic>, Vec<Diagnostic>) =
            found.into_iter().partition(|d| d.unset_var.is_some());
        if !errors.is_empty() {
            return Err(fail(errors));
        }
        // Parsed from the text first, for located errors; then again from
        // the table with the way back and the roles settled.
        toml::from_str::<Playbook>(text)
            .map_err(|e| fail(vec![Diagnostic::at(e.span(), e.message().to_owned())]))?;
        let mut raw: toml::Table = toml::from_str(text)
            .map_err(|e| fail(vec![Diagnostic::at(e.span(), e.message().to_owned())]))?;
        let declared = settle_way_back(&mut raw, way);
        let mut playbook: Playbook =
            toml::Value::Table(raw.clone())
                .try_into()
                .map_err(|e: toml::de::Error| {
                    fail(vec![Diagnostic::at(None, e.message().to_owned())])
                })?;
        playbook.file = path.to_owned();
        playbook.text = text.to_owned();
        playbook.raw = raw;
        playbook.declared_way_back = declared;
        let errors = playbook.meaning(&doc);
        if errors.is_empty() {
            Ok((playbook, fail(unset)))
        } else {
            Err(fail(errors))
        }
    }

    /// The keys a kind owns, typed: at the top level (`table` None), or
    /// within a shared table such as `[validation]`. `T` comes from the
    /// kind's `section!`, whose `FIELDS` the schema checked when the
    /// playbook was parsed: it reads.
    pub fn part<T: serde::de::DeserializeOwned>(&self, table: Option<&str>) -> T {
        let t = match table {
            None => self.raw.clone(),
            Some(name) => match self.raw.get(name) {
                Some(toml::Value::Table(t)) => t.clone(),
                _ => toml::Table::new(),
            },
        };
        toml::Value::Table(t)
            .try_into()
            .unwrap_or_else(|e: toml::de::Error| {
                panic!(
                    "{} does not read as the type its FIELDS describe: {}",
                    std::any::type_name::<T>(),
                    e.message()
                )
            })
    }

    /// Every gate, by kind, in declaration order.
    pub fn gate_names(&self) -> Vec<(&'static str, &str)> {
        let g = &self.gates;
        g.system_gate
            .iter()
            .map(|x| ("system-gate", x.name.as_str()))
            .chain(g.shedlock.iter().map(|x| ("shedlock", x.name.as_str())))
            .chain(g.quartz.iter().map(|x| ("quartz", x.name.as_str())))
            .collect()
    }

    /// Checks of meaning: references resolve, names are unique, the way back
    /// and the sections agree.
    /// A manifest named by the recovery target is read when a plan is made:
    /// a playbook is written before the incident, when it does not exist yet.
    fn meaning(&self, doc: &ImDocument<&str>) -> Vec<Diagnostic> {
        let mut errors = Vec::new();
        let mut err =
            |segs: &[Seg], msg: String| errors.push(Diagnostic::at(span_at(doc, segs), msg));
        for required in ["current", "restored"] {
            if !self.databases.contains_key(required) {
                err(&[Seg::Key("databases")], format!("[databases] needs `{required}`: re-entry compares the current database with the restored one"));
            }
        }
        for role in ROLES {
            if self.databases.contains_key(*role) {
                err(&[Seg::Key("databases"), Seg::Key(role)], format!("`{role}` names a database by its part in the way back (survivor: current after a selective repair, restored after a cutover); declare yours under another name"));
            }
        }
        let known = self
            .databases
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");

        let t = &self.recovery_target;
        let set = [t.manifest.is_some(), t.time.is_some(), t.lsn.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if set != 1 {
            err(&[Seg::Key("recovery-target")], "[recovery-target] needs exactly one of `manifest` (from reentry restore), `time` or `lsn`".into());
        }
        if let Some(l) = &t.lsn {
            if l.parse::<crate::pg::lsn::Lsn>().is_err() {
                err(
                    &[Seg::Key("recovery-target"), Seg::Key("lsn")],
                    format!("\"{l}\" is not an LSN (like 0/5000120)"),
                );
            }
        }
        if let Some(tm) = &t.time {
            if let Err(e) = crate::time::parse(tm) {
                err(
                    &[Seg::Key("recovery-target"), Seg::Key("time")],
                    e.to_string(),
                );
            }
        }
        // Each kind checks its own section.
        {
            let mut m = Meaning {
                p: self,
                err: &mut err,
                known: &known,
            };
            for k in KINDS {
                (k.meaning)(&mut m);
            }
        }
        errors
    }
}

/// Sets every variable the example playbooks read, to one value: tests
/// share the process's environment.
#[cfg(test)]
pub(crate) fn set_example_secrets() {
    for v in [
        "CASES_DB_PASSWORD",
        "LEDGER_DB_PASSWORD",
        "CACHE_PASSWORD",
        "SEARCH_PASSWORD",
        "KAFKA_PASSWORD",
    ] {
        std::env::set_var(v, "hunter2-reference");
    }
    // The case-management example takes its servers from the environment.
    for (v, value) in [
        ("CASES_DB_HOST", "cases-db-1"),
        ("CASES_DB_PORT", "5432"),
        ("CASES_RESTORE_HOST", "cases-restore"),
        ("CASES_RESTORE_PORT", "5432"),
        ("CASES_KAFKA", "kafka-1:9092"),
        ("CASES_REDIS", "redis://cases-cache:6379"),
        ("CASES_SEARCH", "http://search:9200"),
    ] {
        std::env::set_var(v, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Playbook, Diagnostics> {
        Playbook::parse(Path::new("t.toml"), text)
    }

    const REFERENCE_SECRET: &str = "hunter2-reference";

    #[test]
    fn no_key_is_owned_twice_once_the_kinds_add_theirs() {
        fn unique(fields: &[Field], at: &str) {
            let mut seen = std::collections::BTreeSet::new();
            for f in fields {
                assert!(seen.insert(f.key), "`{}` is owned twice in {at}", f.key);
                if let Kind::Table(inner) | Kind::Tables(inner) | Kind::Map(inner) = f.kind {
                    unique(inner, f.key);
                }
            }
        }
        unique(schema(), "the playbook");
    }

    const BASE: &str = r#"[playbook]
name = "t"
way-back = "cutover"

[databases.current]
conninfo = "host=a"

[databases.restored]
conninfo = "host=b"

[recovery-target]
lsn = "0/5000120"

[gates]
reopen-order = ["api"]

[[gates.system-gate]]
name = "api"
databases = ["current", "restored"]
"#;

    #[test]
    fn survivor_names_the_database_that_stays_on_either_way_back() {
        let text = format!(
            "{BASE}\n[[validation.invariant]]\nname = \"i\"\ndatabase = \"survivor\"\nsql = \"SELECT 1\"\n\
             \n[[repair]]\nway-back = \"selective-repair\"\ntable = \"t\"\nids = \"SELECT 1\"\n"
        );
        let path = Path::new("t.toml");
        let on = |way: Option<WayBack>| {
            let (p, _) = Playbook::parse_offline_as(path, &text, way).unwrap();
            (
                p.playbook.way_back,
                p.validation.invariant[0].database.clone(),
            )
        };
        // The file says cutover: the restored copy stays.
        assert_eq!(on(None), (WayBack::Cutover, "restored".to_owned()));
        assert_eq!(
            on(Some(WayBack::SelectiveRepair)),
            (WayBack::SelectiveRepair, "current".to_owned())
        );
        let (p, _) =
            Playbook::parse_offline_as(path, &text, Some(WayBack::SelectiveRepair)).unwrap();
        assert_eq!(p.declared_way_back, Some(WayBack::Cutover));
        // The raw table the kinds read agrees with the typed one.
        assert_eq!(
            p.raw["validation"]["invariant"][0]["database"].as_str(),
            Some("current")
        );
    }

    #[test]
    fn a_database_may_not_be_declared_under_a_role_name() {
        rejects(
            &format!("{BASE}\n[databases.survivor]\nconninfo = \"host=c\"\n"),
            21,
            "`survivor` names a database by its part in the way back",
        );
    }

    #[test]
    fn a_repair_may_name_its_way_back_and_only_counts_on_it() {
        let cutover =
            "\n[[repair]]\nway-back = \"cutover\"\ntable = \"cases\"\nupdated-at = \"u\"\n";
        let repair = "\n[[repair]]\nway-back = \"selective-repair\"\ntable = \"cases\"\nids = \"SELECT 1\"\n";
        let text = format!("{BASE}{cutover}{repair}");
        let path = Path::new("t.toml");
        for (way, scoped) in [
            (WayBack::Cutover, Some("u")),
            (WayBack::SelectiveRepair, None),
        ] {
            let (p, _) = Playbook::parse_offline_as(path, &text, Some(way)).unwrap();
            let rs = crate::reentry::steps::rows::repairs(&p);
            assert_eq!(rs.len(), 1, "{way}");
            assert_eq!(rs[0].updated_at.as_deref(), scoped, "{way}");
        }
        // Twice on the same way back is an error, located at the second.
        rejects(
            &format!("{BASE}{cutover}{cutover}"),
            28,
            "repaired twice on this way back",
        );
        rejects(
            &format!("{BASE}{}", cutover.replace("\"cutover\"", "\"sideways\"")),
            22,
            "expected one of \"cutover\", \"selective-repair\"",
        );
    }

    /// Each error as (line, message).
    fn errors(text: &str) -> Vec<(usize, String)> {
        let d = parse(text).expect_err("the playbook should be rejected");
        d.items
            .iter()
            .map(|i| {
                (
                    i.span.clone().map(|s| d.line_col(s.start).0).unwrap_or(0),
                    i.message.clone(),
                )
            })
            .collect()
    }

    #[track_caller]
    fn rejects(text: &str, line: usize, needle: &str) {
        let errs = errors(text);
        assert!(
            errs.iter().any(|(l, m)| *l == line && m.contains(needle)),
            "expected line {line}: {needle:?}; got {errs:?}"
        );
    }

    #[test]
    fn the_minimal_playbook_parses() {
        let p = parse(BASE).unwrap_or_else(|d| panic!("{d}"));
        assert_eq!(p.gate_names(), [("system-gate", "api")]);
    }

    #[test]
    fn malformed_playbooks_are_rejected_at_the_place_of_the_error() {
        // Syntax.
        rejects(&BASE.replace("name = \"t\"", "name = \"t"), 2, "");
        // Unknown keys, also near-misses.
        rejects(
            &BASE.replace("[playbook]", "[playbok]"),
            1,
            "unknown key `playbok`",
        );
        rejects(
            &BASE.replace("reopen-order", "reopen_order"),
            15,
            "unknown key `reopen_order` in [gates]",
        );
        // Types and values.
        rejects(
            &BASE.replace("[gates]", "[gates]\ncache-ttl = 30"),
            15,
            "cache-ttl` in [gates] must be a duration",
        );
        rejects(
            &BASE.replace("[gates]", "[gates]\ncache-ttl = \"30 parsecs\""),
            15,
            "is not a duration",
        );
        rejects(
            &BASE.replace("\"cutover\"", "\"rollback\""),
            3,
            "expected one of \"cutover\", \"selective-repair\"",
        );
        rejects(
            &BASE.replace(
                "databases = [\"current\", \"restored\"]",
                "databases = \"current\"",
            ),
            19,
            "must be a list of strings",
        );
        // Required parts.
        rejects(
            &BASE.replace("[databases.restored]\nconninfo = \"host=b\"", ""),
            5,
            "needs `restored`",
        );
        rejects(&BASE.replace("name = \"api\"\n", ""), 17, "needs `name`");
        // References.
        rejects(
            &BASE.replace("[\"current\", \"restored\"]", "[\"current\", \"replica\"]"),
            19,
            "no database named `replica`",
        );
        rejects(
            &BASE.replace("[\"api\"]", "[\"api\", \"batch\"]"),
            15,
            "`batch` is re-opened but never closed",
        );
        rejects(
            &format!("{BASE}\n[[gates.shedlock]]\nname = \"jobs\"\ndatabases = [\"current\"]\n"),
            15,
            "`jobs` is closed but never re-opened",
        );
        rejects(&format!("{BASE}\n[[gates.quartz]]\nname = \"api\"\ndatabases = [\"current\"]\nscheduler = \"S\"\n"), 22, "gate `api` is declared twice");
        // The recovery target.
        rejects(
            &BASE.replace("lsn = \"0/5000120\"", "lsn = \"5000120\""),
            12,
            "is not an LSN",
        );
        rejects(
            &BASE.replace(
                "lsn = \"0/5000120\"",
                "lsn = \"0/5000120\"\ntime = \"2026-11-25T12:00:00Z\"",
            ),
            11,
            "exactly one of",
        );
        // Secrets from the environment.
        rejects(
            &BASE.replace("host=a", "host=a password=${REENTRY_TEST_NOT_SET_ANYWHERE}"),
            6,
            "REENTRY_TEST_NOT_SET_ANYWHERE is not set",
        );
        // The way back and the sections agree.
        rejects(
            &BASE.replace("\"cutover\"", "\"selective-repair\""),
            3,
            "needs at least one [[repair]]",
        );
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let text = BASE
            .replace("[playbook]", "[playbook]\ncolour = \"blue\"")
            .replace("[gates]", "[gates]\ncache-ttl = 5")
            .replace("[\"current\", \"restored\"]", "[\"current\", 7]");
        let errs = errors(&text);
        assert_eq!(errs.len(), 3, "{errs:?}");
        let rendered = parse(&text).unwrap_err().to_string();
        assert!(rendered.starts_with("t.toml has 3 errors"), "{rendered}");
        assert!(
            rendered.contains("t.toml:2:1: unknown key `colour`"),
            "{rendered}"
        );
    }

    #[test]
    fn the_example_playbooks_parse() {
        set_example_secrets();
        for name in ["case-management", "payment-ledger"] {
            let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("playbooks")
                .join(format!("{name}.toml"));
            let p = Playbook::load(&path).unwrap_or_else(|d| panic!("{d}"));
            assert_eq!(p.playbook.name, name);
        }
    }

    #[test]
    fn the_reference_playbook_parses_and_shows_secrets_as_written() {
        set_example_secrets();
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/playbooks/reference.toml"
        ));
        let p = Playbook::load(path).unwrap_or_else(|d| panic!("{d}"));
        assert_eq!(p.playbook.way_back, WayBack::Cutover);
        assert_eq!(p.gate_names().len(), 4);
        let conn = &p.databases["current"].conninfo;
        assert!(conn.expose().contains(REFERENCE_SECRET));
        for shown in [
            conn.to_string(),
            format!("{conn:?}"),
            serde_json::to_string(&p).unwrap(),
        ] {
            assert!(
                !shown.contains(REFERENCE_SECRET),
                "a secret leaked into {shown}"
            );
            assert!(shown.contains("${CASES_DB_PASSWORD}"));
        }
        // The Kafka password: used, and shown only as its template.
        let k = p.kafka.as_ref().expect("[kafka]");
        let pw = k.sasl_password.as_ref().expect("sasl-password");
        assert_eq!(pw.expose(), REFERENCE_SECRET);
        let json = serde_json::to_string(&p).unwrap();
        assert!(!json.contains(REFERENCE_SECRET) && json.contains("${KAFKA_PASSWORD}"));
    }
    #[test]
    fn conninfo_variables_are_quoted_for_where_they_land() {
        let pw = "REENTRY_TEST_CONNINFO_PW";
        std::env::set_var(pw, "x y='z\\");
        let c = |t: &str| Conninfo::from(t.to_owned()).expose().to_owned();
        assert_eq!(
            c("host=h password=${REENTRY_TEST_CONNINFO_PW}"),
            r"host=h password='x y=\'z\\'"
        );
        assert_eq!(
            c("password='${REENTRY_TEST_CONNINFO_PW}' host=h"),
            r"password='x y=\'z\\' host=h"
        );
        assert_eq!(
            c("password=a${REENTRY_TEST_CONNINFO_PW} host=h"),
            r"password=ax\ y=\'z\\ host=h"
        );
        assert_eq!(
            c("postgresql://u:${REENTRY_TEST_CONNINFO_PW}@h/db"),
            "postgresql://u:x%20y%3D%27z%5C@h/db"
        );
        std::env::set_var("REENTRY_TEST_CONNINFO_WHOLE", "host=h dbname=d");
        assert_eq!(
            c("${REENTRY_TEST_CONNINFO_WHOLE} user=u"),
            "host=h dbname=d user=u"
        );
        // What tokio-postgres (and libpq, by the same rules) reads back.
        for t in [
            "host=h password=${REENTRY_TEST_CONNINFO_PW}",
            "host=h password='${REENTRY_TEST_CONNINFO_PW}'",
            "postgresql://u:${REENTRY_TEST_CONNINFO_PW}@h/db",
        ] {
            let cfg: tokio_postgres::Config = c(t).parse().unwrap();
            assert_eq!(cfg.get_password(), Some(&b"x y='z\\"[..]), "{t}");
        }
        assert_eq!(
            crate::pg::conn::split_password(&c("host=h password=a${REENTRY_TEST_CONNINFO_PW}"))
                .1
                .as_deref(),
            Some("ax y='z\\")
        );
    }
}
