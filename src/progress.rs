//! Progress of long work (replaying WAL, checking an archive, scanning a
//! topic), reported to a callback that the caller renders: the library
//! never prints. The CLI draws it with indicatif on a terminal and drops it
//! otherwise; tests and the engine pass `Reporter::silent()`.

use std::fmt;
use std::sync::Arc;

pub trait Progress: Send + Sync {
    /// A new stage of work, with its size when known.
    fn stage(&self, _what: &str, _total: Option<u64>) {}
    /// How far the current stage is, with a short status.
    fn advance(&self, _done: u64, _status: &str) {}
    /// A line worth keeping (what is about to happen).
    fn note(&self, _line: &str) {}
    /// The stage is over: clear what was drawn.
    fn finish(&self) {}
}

struct Silent;

impl Progress for Silent {}

/// A shared progress callback, cheap to clone into options.
#[derive(Clone)]
pub struct Reporter(Arc<dyn Progress>);

impl Reporter {
    pub fn new(p: impl Progress + 'static) -> Reporter {
        Reporter(Arc::new(p))
    }

    pub fn silent() -> Reporter {
        Reporter::new(Silent)
    }
}

impl Default for Reporter {
    fn default() -> Reporter {
        Reporter::silent()
    }
}

impl std::ops::Deref for Reporter {
    type Target = dyn Progress;

    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl fmt::Debug for Reporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Reporter")
    }
}
