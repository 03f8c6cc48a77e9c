//! Located errors in files people write (playbooks, checks): every error at
//! once, each as `file:line:column: message` with the line and a caret, the
//! way compilers report them.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Byte range in the file, when the error has a place.
    pub span: Option<Range<usize>>,
    pub message: String,
    /// The environment variable whose absence this reports: an error only
    /// where its value is needed (connecting), a note for an offline lint.
    pub unset_var: Option<String>,
}

impl Diagnostic {
    pub fn at(span: Option<Range<usize>>, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            span,
            message: message.into(),
            unset_var: None,
        }
    }

    pub fn unset(span: Option<Range<usize>>, var: &str, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            span,
            message: message.into(),
            unset_var: Some(var.to_owned()),
        }
    }
}

/// An error and each of its causes, once, joined by `: `. Error messages
/// never repeat their cause; whoever prints an error prints its chain.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// A file's diagnostics, rendered with their locations.
#[derive(Debug, Clone, thiserror::Error)]
pub struct Diagnostics {
    pub path: PathBuf,
    pub text: String,
    pub items: Vec<Diagnostic>,
}

impl Diagnostics {
    pub fn new(path: &Path, text: &str, items: Vec<Diagnostic>) -> Diagnostics {
        Diagnostics {
            path: path.to_owned(),
            text: text.to_owned(),
            items,
        }
    }

    /// 1-based line and column of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before
            .rfind('\n')
            .map_or(before.len(), |nl| before.len() - nl - 1)
            + 1;
        (line, col)
    }
}

impl Diagnostics {
    /// `file:line:col: note: message`, one line each: what an offline
    /// check leaves for later.
    pub fn notes(&self) -> String {
        self.items
            .iter()
            .map(|d| match &d.span {
                Some(s) => {
                    let (line, col) = self.line_col(s.start);
                    format!("{}:{line}:{col}: note: {}", self.path.display(), d.message)
                }
                None => format!("{}: note: {}", self.path.display(), d.message),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.items.len();
        write!(
            f,
            "{} has {n} error{}",
            self.path.display(),
            if n == 1 { "" } else { "s" }
        )?;
        for d in &self.items {
            match &d.span {
                Some(span) => {
                    let (line, col) = self.line_col(span.start);
                    let source = self.text.lines().nth(line - 1).unwrap_or("");
                    let width = (span.end.saturating_sub(span.start))
                        .clamp(1, source.len().saturating_sub(col - 1).max(1));
                    write!(
                        f,
                        "\n{}:{line}:{col}: {}\n{line:>5} | {source}\n      | {}{}",
                        self.path.display(),
                        d.message,
                        " ".repeat(col - 1),
                        "^".repeat(width)
                    )?;
                }
                None => write!(f, "\n{}: {}", self.path.display(), d.message)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_says_each_cause_once() {
        let e = crate::reentry::run::RunError::Io {
            what: "cannot write",
            path: "/run/x".into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        };
        assert_eq!(chain(&e), "cannot write /run/x: no such file");
    }

    #[test]
    fn renders_line_column_and_a_caret_under_the_span() {
        let text = "a = 1\nbad = \"x\"\n";
        let d = Diagnostics::new(
            Path::new("p.toml"),
            text,
            vec![Diagnostic::at(Some(6..9), "unknown key `bad`")],
        );
        let shown = d.to_string();
        assert!(shown.contains("p.toml:2:1: unknown key `bad`"), "{shown}");
        assert!(
            shown.contains("    2 | bad = \"x\"\n      | ^^^"),
            "{shown}"
        );
    }
}
