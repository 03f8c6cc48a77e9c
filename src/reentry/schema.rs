//! A small schema for TOML files people write, and a walk that reports
//! every unknown key, missing key, wrong type and bad value at once, each at
//! its place in the file. Serde stops at the first error; a person fixing a
//! playbook during an incident should see them all.

use std::ops::Range;

use toml_edit::{Item, TableLike, Value};

use crate::diag::Diagnostic;

#[derive(Clone, Copy)]
pub enum Kind {
    Str,
    /// A string that may use `${VAR}` from the environment (secrets).
    Interp,
    Bool,
    Int,
    /// `30s`, `5m`, `24h`.
    Duration,
    /// A list of strings.
    Strs,
    OneOf(&'static [&'static str]),
    Table(&'static [Field]),
    /// `[[name]]` entries (or an inline array of inline tables).
    Tables(&'static [Field]),
    /// `[name.ANY]` tables, each with the same fields.
    Map(&'static [Field]),
    /// A table of any keys, each a string that may use `${VAR}`
    /// (librdkafka properties).
    Props,
}

#[derive(Clone, Copy)]
pub struct Field {
    pub key: &'static str,
    pub kind: Kind,
    pub required: bool,
}

pub const fn req(key: &'static str, kind: Kind) -> Field {
    Field {
        key,
        kind,
        required: true,
    }
}

pub const fn opt(key: &'static str, kind: Kind) -> Field {
    Field {
        key,
        kind,
        required: false,
    }
}

fn describe(kind: Kind) -> String {
    match kind {
        Kind::Str | Kind::Interp => "a string".into(),
        Kind::Bool => "true or false".into(),
        Kind::Int => "an integer".into(),
        Kind::Duration => "a duration like \"30s\", \"5m\" or \"24h\"".into(),
        Kind::Strs => "a list of strings".into(),
        Kind::OneOf(values) => format!(
            "one of {}",
            values
                .iter()
                .map(|v| format!("\"{v}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Kind::Table(_) | Kind::Map(_) => "a table".into(),
        Kind::Props => "a table of strings (KEY = \"value\")".into(),
        Kind::Tables(_) => "an array of tables ([[…]])".into(),
    }
}

fn found(item: &Item) -> &'static str {
    match item {
        Item::None => "nothing",
        Item::Table(_) => "a table",
        Item::ArrayOfTables(_) => "an array of tables",
        Item::Value(v) => match v {
            Value::String(_) => "a string",
            Value::Integer(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Boolean(_) => "a boolean",
            Value::Datetime(_) => "a datetime",
            Value::Array(_) => "an array",
            Value::InlineTable(_) => "an inline table",
        },
    }
}

/// Walks `table` against `fields`; `at` names it in messages ("[gates]").
pub fn check_table(
    table: &dyn TableLike,
    span: Option<Range<usize>>,
    fields: &[Field],
    at: &str,
    out: &mut Vec<Diagnostic>,
) {
    for (key, item) in table.iter() {
        let key_span = table.get_key_value(key).and_then(|(k, _)| k.span());
        match fields.iter().find(|f| f.key == key) {
            None => {
                let known: Vec<&str> = fields.iter().map(|f| f.key).collect();
                out.push(Diagnostic::at(
                    key_span,
                    format!(
                        "unknown key `{key}` in {at}; expected one of: {}",
                        known.join(", ")
                    ),
                ));
            }
            Some(field) => check_item(
                item,
                key_span,
                field.kind,
                &format!("`{key}` in {at}"),
                &child(at, key),
                out,
            ),
        }
    }
    for f in fields.iter().filter(|f| f.required) {
        if table.get(f.key).is_none() {
            out.push(Diagnostic::at(
                span.clone(),
                format!("{at} needs `{}` ({})", f.key, describe(f.kind)),
            ));
        }
    }
}

fn child(at: &str, key: &str) -> String {
    if at == "the playbook" {
        format!("[{key}]")
    } else {
        format!("{}.{key}]", at.trim_end_matches(']'))
    }
}

fn check_item(
    item: &Item,
    key_span: Option<Range<usize>>,
    kind: Kind,
    what: &str,
    at: &str,
    out: &mut Vec<Diagnostic>,
) {
    let span = item.span().or_else(|| key_span.clone());
    let wrong = |out: &mut Vec<Diagnostic>| {
        out.push(Diagnostic::at(
            span.clone(),
            format!("{what} must be {}, not {}", describe(kind), found(item)),
        ))
    };
    match kind {
        Kind::Str | Kind::Interp => match item.as_str() {
            Some(s) if matches!(kind, Kind::Interp) => {
                check_interpolation(s, span.clone(), what, out)
            }
            Some(_) => {}
            None => wrong(out),
        },
        Kind::Bool => {
            if item.as_bool().is_none() {
                wrong(out)
            }
        }
        Kind::Int => {
            if item.as_integer().is_none() {
                wrong(out)
            }
        }
        Kind::Duration => match item.as_str() {
            Some(s) => {
                if let Err(e) = humantime::parse_duration(s) {
                    out.push(Diagnostic::at(
                        span.clone(),
                        format!("{what} is not a duration ({e}); write e.g. \"30s\" or \"5m\""),
                    ));
                }
            }
            None => wrong(out),
        },
        Kind::Strs => match item.as_array() {
            Some(a) => {
                for v in a.iter().filter(|v| v.as_str().is_none()) {
                    out.push(Diagnostic::at(
                        v.span(),
                        format!("{what} must hold strings only"),
                    ));
                }
            }
            None => wrong(out),
        },
        Kind::OneOf(values) => match item.as_str() {
            Some(s) if values.contains(&s) => {}
            Some(s) => out.push(Diagnostic::at(
                span.clone(),
                format!("{what} is \"{s}\"; expected {}", describe(kind)),
            )),
            None => wrong(out),
        },
        Kind::Table(fields) => match item.as_table_like() {
            Some(t) => check_table(t, span.clone().or(key_span), fields, at, out),
            None => wrong(out),
        },
        Kind::Props => match item.as_table_like() {
            Some(t) => {
                for (name, v) in t.iter() {
                    let key_span = t.get_key_value(name).and_then(|(k, _)| k.span());
                    let at = format!("{what}.{name}");
                    match v.as_str() {
                        Some(s) => check_interpolation(s, v.span().or(key_span), &at, out),
                        None => out.push(Diagnostic::at(
                            v.span().or(key_span),
                            format!("{at} must be a string, not {}", found(v)),
                        )),
                    }
                }
            }
            None => wrong(out),
        },
        Kind::Map(fields) => match item.as_table_like() {
            Some(t) => {
                for (name, entry) in t.iter() {
                    let entry_at = format!("{}.{name}]", at.trim_end_matches(']'));
                    let entry_key = t.get_key_value(name).and_then(|(k, _)| k.span());
                    match entry.as_table_like() {
                        Some(e) => {
                            check_table(e, entry.span().or(entry_key), fields, &entry_at, out)
                        }
                        None => out.push(Diagnostic::at(
                            entry.span().or(entry_key),
                            format!("{entry_at} must be a table, not {}", found(entry)),
                        )),
                    }
                }
            }
            None => wrong(out),
        },
        Kind::Tables(fields) => {
            let at = format!("[{}]", at);
            if let Some(list) = item.as_array_of_tables() {
                for (i, t) in list.iter().enumerate() {
                    check_table(t, t.span(), fields, &format!("{} #{}", at, i + 1), out);
                }
            } else if let Some(list) = item.as_array() {
                for (i, v) in list.iter().enumerate() {
                    match v.as_inline_table() {
                        Some(t) => {
                            check_table(t, v.span(), fields, &format!("{} #{}", at, i + 1), out)
                        }
                        None => out.push(Diagnostic::at(
                            v.span(),
                            format!("{what} must hold tables only"),
                        )),
                    }
                }
            } else {
                wrong(out)
            }
        }
    }
}

/// `${NAME}` must be well formed; an unset variable is reported apart, as
/// it only matters where the value is needed. `$$` is a `$`.
fn check_interpolation(s: &str, span: Option<Range<usize>>, what: &str, out: &mut Vec<Diagnostic>) {
    match interpolate(s) {
        Ok(_) => {}
        Err(InterpError::Unset(var)) => out.push(Diagnostic::unset(
            span,
            &var,
            format!("{what}: environment variable {var} is not set"),
        )),
        Err(e) => out.push(Diagnostic::at(span, format!("{what}: {e}"))),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterpError {
    #[error("{0}")]
    Syntax(String),
    #[error("environment variable {0} is not set")]
    Unset(String),
}

/// Prefixes of the variables that hold the operator's own credentials:
/// object storage's (read by the repository's client) and reentry's keys.
/// A playbook names application systems; it has no use for these, and a
/// URL it controls must not be able to carry them away.
const OPERATORS: &[&str] = &["AWS_", "AZURE_", "GOOGLE_", "REENTRY_AGE_", "REENTRY_REPO"];

/// Expands `${NAME}` from the environment; `$$` stands for `$`.
pub fn interpolate(s: &str) -> Result<String, InterpError> {
    interpolate_with(s, |_, _, value| value.to_owned())
}

/// Expands `${NAME}` as `interpolate` does, each value written as
/// `escape(expanded so far, template after the variable, value)` returns.
pub fn interpolate_with(
    s: &str,
    mut escape: impl FnMut(&str, &str, &str) -> String,
) -> Result<String, InterpError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let end = tail
                .find('}')
                .ok_or_else(|| InterpError::Syntax("unclosed `${`".to_owned()))?;
            let name = &tail[..end];
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(InterpError::Syntax(format!(
                    "`${{{name}}}` is not a variable name (letters, digits, _)"
                )));
            }
            if OPERATORS.iter().any(|p| name.starts_with(p)) {
                return Err(InterpError::Syntax(format!(
                    "`${{{name}}}` is the operator's own: a playbook cannot read variables named {} (reentry's repository and key credentials)",
                    OPERATORS.iter().map(|p| format!("{p}…")).collect::<Vec<_>>().join(", ")
                )));
            }
            let value = std::env::var(name).map_err(|_| InterpError::Unset(name.to_owned()))?;
            rest = &tail[end + 1..];
            let escaped = escape(&out, rest, &value);
            out.push_str(&escaped);
        } else {
            return Err(InterpError::Syntax(
                "a `$` must start `${NAME}` (write `$$` for a dollar sign)".into(),
            ));
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolates_variables_and_escapes() {
        std::env::set_var("REENTRY_TEST_SECRET_X", "s3cret");
        assert_eq!(
            interpolate("password=${REENTRY_TEST_SECRET_X} cost=$$5").unwrap(),
            "password=s3cret cost=$5"
        );
        assert_eq!(
            interpolate("${REENTRY_TEST_UNSET_Y}").unwrap_err(),
            InterpError::Unset("REENTRY_TEST_UNSET_Y".into())
        );
        assert!(interpolate("${oops").is_err());
        assert!(interpolate("$5").is_err());
        assert!(interpolate("${a-b}").is_err());
    }

    #[test]
    fn the_operators_credentials_are_not_a_playbooks_to_read() {
        for name in [
            "AWS_SECRET_ACCESS_KEY",
            "AZURE_STORAGE_KEY",
            "REENTRY_AGE_IDENTITY_FILE",
        ] {
            let e = interpolate(&format!("https://x.example/?k=${{{name}}}")).unwrap_err();
            assert!(
                matches!(&e, InterpError::Syntax(m) if m.contains("is the operator's own")),
                "{name}: {e}"
            );
        }
    }
}
