//! The TLS files a client of Redis or of a search server is given: a CA to
//! trust in place of the system's, and a client certificate with its key.
//! Paths only: the files are read when a connection is made, so a plan or
//! a journal never holds a key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A client certificate and its key, as read (PEM).
pub type ClientPair = (Vec<u8>, Vec<u8>);

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsFiles {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    pub fn is_empty(&self) -> bool {
        *self == TlsFiles::default()
    }

    /// The CA file's bytes, when one is named.
    pub fn ca_bytes(&self) -> Result<Option<Vec<u8>>, String> {
        self.ca.as_deref().map(read).transpose()
    }

    /// The client certificate and key, read; both or neither.
    pub fn client_pair(&self) -> Result<Option<ClientPair>, String> {
        match (&self.certificate, &self.key) {
            (Some(c), Some(k)) => Ok(Some((read(c)?, read(k)?))),
            (None, None) => Ok(None),
            _ => Err(TlsFiles::UNPAIRED.into()),
        }
    }

    /// The playbook key to point at when a certificate or a key is given
    /// without the other.
    pub fn unpaired(certificate: bool, key: bool) -> Option<&'static str> {
        match (certificate, key) {
            (true, false) => Some("tls-certificate"),
            (false, true) => Some("tls-key"),
            _ => None,
        }
    }

    pub const UNPAIRED: &'static str =
        "tls-certificate and tls-key: a client certificate needs its key, and a key its certificate";
}

fn read(p: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
}
