//! Client-side encryption of the repository's objects with age (X25519).
//!
//! The host that archives and backs up needs only the public keys, the
//! recipients (`age1…`): a compromised database host cannot read the
//! repository. The private keys, the identities (`AGE-SECRET-KEY-1…`), are
//! needed only to read: fetch, restore, verify with `--materialise`.
//!
//! Several recipients may be given; every object is readable by any one of
//! their identities. To rotate, encrypt to the new recipient and keep the
//! old identity in the identity file: old objects stay readable, new ones
//! need the new key. Each object's header records the key id of the
//! recipients it was written for, so a wrong key is named before anything
//! is written.

use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The only algorithm so far: age v1 to X25519 recipients.
pub const ALGORITHM: &str = "age-x25519";

#[derive(Debug, thiserror::Error)]
pub enum CryptError {
    #[error("{what} is not an age X25519 recipient (age1…): {why}")]
    BadRecipient { what: String, why: String },
    #[error("cannot read the identity file {}: {source}", path.display())]
    IdentityFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the identity file {} is readable by others (mode {mode:04o}): run `chmod 600 {}`; a private key must be the owner's alone", path.display(), path.display())]
    IdentityExposed { path: PathBuf, mode: u32 },
    #[error("{}: line {line} is not an age X25519 identity (AGE-SECRET-KEY-1…)", path.display())]
    BadIdentity { path: PathBuf, line: usize },
    #[error("{} holds no identity", path.display())]
    NoIdentity { path: PathBuf },
    #[error(
        "{what} is encrypted (key id {key_id}) and no identity was given: \
         pass --identity FILE or set REENTRY_AGE_IDENTITY_FILE"
    )]
    NeedIdentity { what: String, key_id: KeyId },
    #[error(
        "none of the identities in {} can decrypt {what}, which is encrypted to key id {key_id}; \
         they are for key id(s) {have}",
        path.display()
    )]
    WrongIdentity {
        what: String,
        key_id: KeyId,
        path: PathBuf,
        have: String,
    },
    #[error("{what} cannot be decrypted: {why}")]
    Damaged { what: String, why: String },
}

impl CryptError {
    /// The error, naming `what` it was about.
    pub fn about(self, what: &str) -> CryptError {
        match self {
            CryptError::NeedIdentity { key_id, .. } => CryptError::NeedIdentity {
                what: what.to_owned(),
                key_id,
            },
            CryptError::WrongIdentity {
                key_id, path, have, ..
            } => CryptError::WrongIdentity {
                what: what.to_owned(),
                key_id,
                path,
                have,
            },
            CryptError::Damaged { why, .. } => CryptError::Damaged {
                what: what.to_owned(),
                why,
            },
            e => e,
        }
    }
}

/// The first 8 bytes of SHA-256 over the sorted recipients, one per line:
/// names a set of recipients without being a key.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

fn key_id_of(recipients: &[String]) -> KeyId {
    let mut sorted: Vec<&str> = recipients.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let digest = Sha256::digest(sorted.join("\n").as_bytes());
    KeyId(digest[..8].try_into().expect("8 of 32 bytes"))
}

/// The public keys objects are encrypted to.
#[derive(Clone)]
pub struct Recipients {
    keys: Vec<age::x25519::Recipient>,
    shown: Vec<String>,
    id: KeyId,
}

impl fmt::Debug for Recipients {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Recipients({})", self.id)
    }
}

impl Recipients {
    /// Parses `age1…` strings; `what` says where they came from.
    pub fn parse(list: &[String], what: &str) -> Result<Recipients, CryptError> {
        let mut keys = Vec::new();
        let mut shown = Vec::new();
        for r in list.iter().map(|r| r.trim()).filter(|r| !r.is_empty()) {
            let key: age::x25519::Recipient =
                r.parse().map_err(|e: &str| CryptError::BadRecipient {
                    what: format!("{what}: {r:?}"),
                    why: e.to_owned(),
                })?;
            shown.push(key.to_string());
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(CryptError::BadRecipient {
                what: what.to_owned(),
                why: "no recipient given".into(),
            });
        }
        let id = key_id_of(&shown);
        Ok(Recipients { keys, shown, id })
    }

    pub fn key_id(&self) -> KeyId {
        self.id
    }

    /// The public keys, as written.
    pub fn shown(&self) -> &[String] {
        &self.shown
    }

    /// `plain` encrypted to every recipient.
    pub fn encrypt(&self, plain: &[u8]) -> Vec<u8> {
        let encryptor =
            age::Encryptor::with_recipients(self.keys.iter().map(|k| k as &dyn age::Recipient))
                .expect("at least one recipient");
        let mut out = Vec::with_capacity(plain.len() + 256);
        let mut w = encryptor
            .wrap_output(&mut out)
            .expect("writing to memory cannot fail");
        w.write_all(plain).expect("writing to memory cannot fail");
        w.finish().expect("writing to memory cannot fail");
        out
    }
}

/// What a repository encrypts to and decrypts with; either may be absent.
#[derive(Clone, Default, Debug)]
pub struct Keys {
    /// New objects are encrypted to these.
    pub to: Option<Recipients>,
    /// Encrypted objects are decrypted with these.
    pub identities: Option<std::sync::Arc<Identities>>,
    /// Labels are signed with, and verified with, these (sign.rs).
    pub trust: crate::sign::Trust,
}

impl Keys {
    /// Whether this host is set up for an encrypted repository: it
    /// encrypts or decrypts. Its labels must then be signed.
    pub fn encrypted(&self) -> bool {
        self.to.is_some() || self.identities.is_some()
    }

    /// The identity file, for a `restore_command` to be given.
    pub fn identity_file(&self) -> Option<&Path> {
        self.identities.as_deref().map(|i| i.path.as_path())
    }
}

/// How a backup's objects are encrypted, as its label records it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Encryption {
    pub algorithm: String,
    pub key_id: String,
    pub recipients: Vec<String>,
}

impl Recipients {
    pub fn describe(&self) -> Encryption {
        Encryption {
            algorithm: ALGORITHM.to_owned(),
            key_id: self.id.to_string(),
            recipients: self.shown.clone(),
        }
    }
}

/// The private keys objects are decrypted with.
pub struct Identities {
    keys: Vec<age::x25519::Identity>,
    /// The key id of each identity's own recipient.
    ids: Vec<KeyId>,
    path: PathBuf,
}

impl fmt::Debug for Identities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identities({})", self.path.display())
    }
}

impl Identities {
    /// Reads an age identity file: one `AGE-SECRET-KEY-1…` per line,
    /// `#` comments and blank lines allowed, as `age-keygen` writes it.
    pub fn from_file(path: &Path) -> Result<Identities, CryptError> {
        use crate::fsutil::SecretFile;
        // As ssh does with its keys: a secret others can read is refused.
        let text = crate::fsutil::read_secret(path).map_err(|e| match e {
            SecretFile::Exposed(mode) => CryptError::IdentityExposed {
                path: path.to_owned(),
                mode,
            },
            SecretFile::Io(source) => CryptError::IdentityFile {
                path: path.to_owned(),
                source,
            },
        })?;
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let key: age::x25519::Identity = line.parse().map_err(|_| CryptError::BadIdentity {
                path: path.to_owned(),
                line: n + 1,
            })?;
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(CryptError::NoIdentity {
                path: path.to_owned(),
            });
        }
        let ids = keys
            .iter()
            .map(|k| key_id_of(&[k.to_public().to_string()]))
            .collect();
        Ok(Identities {
            keys,
            ids,
            path: path.to_owned(),
        })
    }

    /// Decrypts `cipher`, which `what` names and whose header records
    /// `key_id`.
    pub fn decrypt(&self, cipher: &[u8], what: &str, key_id: KeyId) -> Result<Vec<u8>, CryptError> {
        let damaged = |why: String| CryptError::Damaged {
            what: what.to_owned(),
            why,
        };
        let decryptor = age::Decryptor::new(cipher).map_err(|e| damaged(e.to_string()))?;
        let mut r = match decryptor.decrypt(self.keys.iter().map(|k| k as &dyn age::Identity)) {
            Ok(r) => r,
            Err(age::DecryptError::NoMatchingKeys) => {
                return Err(CryptError::WrongIdentity {
                    what: what.to_owned(),
                    key_id,
                    path: self.path.clone(),
                    have: self
                        .ids
                        .iter()
                        .map(KeyId::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                })
            }
            Err(e) => return Err(damaged(e.to_string())),
        };
        let mut plain = Vec::with_capacity(cipher.len());
        r.read_to_end(&mut plain)
            .map_err(|e| damaged(e.to_string()))?;
        Ok(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_one_identity_of_several_recipients_decrypts_and_a_stranger_is_named() {
        let (a, b, c) = (
            age::x25519::Identity::generate(),
            age::x25519::Identity::generate(),
            age::x25519::Identity::generate(),
        );
        let to = Recipients::parse(
            &[a.to_public().to_string(), b.to_public().to_string()],
            "test",
        )
        .unwrap();
        let cipher = to.encrypt(b"segment bytes");
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, keys: &[&age::x25519::Identity]| {
            let p = dir.path().join(name);
            let text: Vec<String> = keys
                .iter()
                .map(|k| {
                    use age::secrecy::ExposeSecret;
                    k.to_string().expose_secret().to_owned()
                })
                .collect();
            std::fs::write(&p, format!("# created: now\n{}\n", text.join("\n"))).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            p
        };
        let only_b = Identities::from_file(&file("b", &[&b])).unwrap();
        assert_eq!(
            only_b.decrypt(&cipher, "x", to.key_id()).unwrap(),
            b"segment bytes"
        );
        let stranger = Identities::from_file(&file("c", &[&c])).unwrap();
        let e = stranger.decrypt(&cipher, "x", to.key_id()).unwrap_err();
        assert!(matches!(e, CryptError::WrongIdentity { .. }), "{e}");
        assert!(e.to_string().contains(&to.key_id().to_string()), "{e}");
        // The key id does not depend on the order recipients are given in.
        let swapped = Recipients::parse(
            &[b.to_public().to_string(), a.to_public().to_string()],
            "test",
        )
        .unwrap();
        assert_eq!(swapped.key_id(), to.key_id());
        assert!(Recipients::parse(&["age1nope".into()], "test").is_err());
    }
}
