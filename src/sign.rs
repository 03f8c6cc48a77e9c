//! Signed backup labels (Ed25519, with `ring`).
//!
//! Encryption does not say who wrote an object: age recipients are public
//! keys, so whoever can put objects into the repository can write a label
//! and an index as well as the backup host can. So the host that backs up
//! holds a private signing key and signs each label; every host that
//! chooses, expires, verifies or copies backups holds the public verify
//! key(s) and uses only labels that verify. A label records the SHA-256
//! of its backup's index (`files.json`) and manifest as they are stored,
//! and the index the checksum of every piece: one signature covers what a
//! restore lays out.
//!
//! The signed bytes are the label in a canonical form (keys sorted, no
//! spaces), without `signature` and without `verification` (recorded later
//! by `backup verify`, which holds no private key), after the key the
//! label is stored under: a label cannot be moved to another id.
//!
//! The private key is a PKCS#8 file in PEM (`-----BEGIN PRIVATE KEY-----`),
//! as `reentry repo keygen` or `openssl genpkey -algorithm ed25519` write
//! it, the owner's alone. A public key is written `ed25519:` and 64 hex
//! digits; its key id is the first 8 bytes of its SHA-256, in hex.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The only algorithm.
pub const ALGORITHM: &str = "ed25519";
/// What a signed message starts with: a signature made for anything else
/// is no label's.
const DOMAIN: &[u8] = b"reentry backup label signature v1\n";
const PEM_BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
const PEM_END: &str = "-----END PRIVATE KEY-----";

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("cannot read the signing key file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the signing key file {} is readable by others (mode {mode:04o}): run `chmod 600 {}`; a private key must be the owner's alone", path.display(), path.display())]
    Exposed { path: PathBuf, mode: u32 },
    #[error("{} is not an Ed25519 private key in PKCS#8 PEM (-----BEGIN PRIVATE KEY-----): {why}", path.display())]
    BadKey { path: PathBuf, why: String },
    #[error("{what}: {text:?} is not a verify key: want ed25519: and 64 hex digits, as `reentry repo keygen` prints")]
    BadVerifyKey { what: String, text: String },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Names a public key without being one.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyId([u8; 8]);

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

/// A public key labels are verified with.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifyKey {
    bytes: [u8; 32],
    id: KeyId,
}

impl fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifyKey({})", self.id)
    }
}

impl fmt::Display for VerifyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{ALGORITHM}:{}", hex(&self.bytes))
    }
}

impl VerifyKey {
    fn from_bytes(bytes: [u8; 32]) -> VerifyKey {
        let digest = Sha256::digest(bytes);
        VerifyKey {
            bytes,
            id: KeyId(digest[..8].try_into().expect("8 of 32 bytes")),
        }
    }

    /// `ed25519:` and 64 hex digits; `what` says where it came from.
    pub fn parse(text: &str, what: &str) -> Result<VerifyKey, SignError> {
        let bad = || SignError::BadVerifyKey {
            what: what.to_owned(),
            text: text.to_owned(),
        };
        let hex = text.trim().strip_prefix("ed25519:").ok_or_else(bad)?;
        let bytes = unhex(hex).ok_or_else(bad)?;
        Ok(VerifyKey::from_bytes(bytes.try_into().map_err(|_| bad())?))
    }

    pub fn key_id(&self) -> KeyId {
        self.id
    }
}

/// The private key labels are signed with.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    public: VerifyKey,
    path: PathBuf,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({}, {})", self.path.display(), self.public.id)
    }
}

impl SigningKey {
    /// Reads a PKCS#8 PEM file, refused when others can read it.
    pub fn from_file(path: &Path) -> Result<SigningKey, SignError> {
        use crate::fsutil::SecretFile;
        let text = crate::fsutil::read_secret(path).map_err(|e| match e {
            SecretFile::Exposed(mode) => SignError::Exposed {
                path: path.to_owned(),
                mode,
            },
            SecretFile::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => SignError::BadKey {
                path: path.to_owned(),
                why: e.to_string(),
            },
            SecretFile::Io(source) => SignError::Read {
                path: path.to_owned(),
                source,
            },
        })?;
        let bad = |why: &str| SignError::BadKey {
            path: path.to_owned(),
            why: why.to_owned(),
        };
        let body = text
            .split_once(PEM_BEGIN)
            .and_then(|(_, rest)| rest.split_once(PEM_END))
            .map(|(b, _)| b)
            .ok_or_else(|| bad("no PRIVATE KEY block"))?;
        let der = unbase64(body).ok_or_else(|| bad("its block is not base64"))?;
        // PKCS#8 v1 (OpenSSL) and v2 (ring, with the public key) alike.
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map_err(|e| bad(&format!("not an Ed25519 key ({e})")))?;
        let public = VerifyKey::from_bytes(
            pair.public_key()
                .as_ref()
                .try_into()
                .expect("an Ed25519 public key is 32 bytes"),
        );
        Ok(SigningKey {
            pair,
            public,
            path: path.to_owned(),
        })
    }

    /// The public key that verifies what this key signs.
    pub fn public(&self) -> &VerifyKey {
        &self.public
    }
}

/// Makes a new key pair and writes the private key to `out`, which must
/// not exist, as its owner's alone (0600). Returns the public key.
pub fn keygen(out: &Path) -> Result<VerifyKey, SignError> {
    let rng = ring::rand::SystemRandom::new();
    let der = Ed25519KeyPair::generate_pkcs8(&rng).expect("the system's random source works");
    let pair = Ed25519KeyPair::from_pkcs8(der.as_ref()).expect("a key it just made");
    let public = VerifyKey::from_bytes(
        pair.public_key()
            .as_ref()
            .try_into()
            .expect("an Ed25519 public key is 32 bytes"),
    );
    let mut text = format!("{PEM_BEGIN}\n");
    let b64 = base64(der.as_ref());
    for line in b64.as_bytes().chunks(64) {
        text.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        text.push('\n');
    }
    text.push_str(PEM_END);
    text.push('\n');
    let write_err = |source| SignError::Write {
        path: out.to_owned(),
        source,
    };
    let mut f = crate::fsutil::private_options()
        .create_new(true)
        .open(out)
        .map_err(write_err)?;
    f.write_all(text.as_bytes()).map_err(write_err)?;
    f.sync_all().map_err(write_err)?;
    Ok(public)
}

/// A label's signature, as the label records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signature {
    pub algorithm: String,
    pub key_id: String,
    /// 64 bytes, in hex.
    pub value: String,
}

/// The keys labels are signed and verified with; either may be absent.
#[derive(Clone, Default, Debug)]
pub struct Trust {
    pub signer: Option<std::sync::Arc<SigningKey>>,
    pub verify: Vec<VerifyKey>,
}

impl Trust {
    /// Every key a signature may verify with: those given, and the signing
    /// key's own.
    pub fn verifiers(&self) -> impl Iterator<Item = &VerifyKey> {
        self.verify
            .iter()
            .chain(self.signer.as_deref().map(SigningKey::public))
    }

    pub fn verifies(&self) -> bool {
        self.verifiers().next().is_some()
    }

    /// The verify keys' ids, as a list for a message.
    pub fn shown(&self) -> String {
        let mut ids: Vec<String> = self.verifiers().map(|k| k.id.to_string()).collect();
        ids.dedup();
        ids.join(", ")
    }
}

/// What is signed for the label `value` stored under `key`.
fn message(key: &str, value: &Value) -> Vec<u8> {
    let mut out = DOMAIN.to_vec();
    out.extend_from_slice(key.as_bytes());
    out.push(b'\n');
    let mut value = value.clone();
    if let Value::Object(m) = &mut value {
        m.remove("signature");
        m.remove("verification");
    }
    canonical(&value, &mut out);
    out
}

/// `value` as JSON with object keys sorted and no whitespace: the same
/// bytes for the same value, whatever order it was read or written in.
fn canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend(serde_json::to_vec(k).expect("a string serializes"));
                out.push(b':');
                canonical(&m[k], out);
            }
            out.push(b'}');
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(v, out);
            }
            out.push(b']');
        }
        v => out.extend(serde_json::to_vec(v).expect("a scalar serializes")),
    }
}

/// Signs the label `value` that is to be stored under `key`.
pub fn sign(signer: &SigningKey, key: &str, value: &Value) -> Signature {
    let sig = signer.pair.sign(&message(key, value));
    Signature {
        algorithm: ALGORITHM.to_owned(),
        key_id: signer.public.id.to_string(),
        value: hex(sig.as_ref()),
    }
}

/// Why the label `value` read from `key` is not vouched for by any key of
/// `trust`; none when one of them verifies its signature.
pub fn check(trust: &Trust, key: &str, value: &Value) -> Result<(), String> {
    let Some(sig) = value.get("signature").filter(|s| !s.is_null()) else {
        return Err(format!(
            "it is not signed; labels here must be signed by a verify key (key id {})",
            trust.shown()
        ));
    };
    let sig: Signature = serde_json::from_value(sig.clone())
        .map_err(|e| format!("its signature is malformed: {e}"))?;
    if sig.algorithm != ALGORITHM {
        return Err(format!(
            "its signature is of algorithm {:?}, not {ALGORITHM}",
            sig.algorithm
        ));
    }
    let Some(k) = trust.verifiers().find(|k| k.id.to_string() == sig.key_id) else {
        return Err(format!(
            "it is signed by key id {}, which is not a verify key here (key id {})",
            sig.key_id,
            trust.shown()
        ));
    };
    let bytes = unhex(&sig.value).ok_or_else(|| "its signature is not hex".to_owned())?;
    UnparsedPublicKey::new(&ED25519, &k.bytes)
        .verify(&message(key, value), &bytes)
        .map_err(|_| {
            format!(
                "its signature does not verify with key id {}: it was changed after it \
                 was signed, or it was signed for another key",
                sig.key_id
            )
        })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding, as PEM has it.
fn base64(b: &[u8]) -> String {
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The bytes of base64 `text`, whitespace ignored.
fn unbase64(text: &str) -> Option<Vec<u8>> {
    let chars: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    if !chars.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::new();
    let quads = chars.len() / 4;
    for (n, quad) in chars.chunks(4).enumerate() {
        let pad = quad.iter().rev().take_while(|c| **c == b'=').count();
        // Padding ends the text, and is at most two characters.
        if pad > 2 || (pad > 0 && n + 1 != quads) {
            return None;
        }
        let mut n = 0u32;
        for (i, c) in quad.iter().enumerate() {
            let v = match c {
                b'=' if i >= 4 - pad => 0,
                c => B64.iter().position(|b| b == c)? as u32,
            };
            n |= v << (18 - 6 * i);
        }
        for i in 0..3 - pad {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_key(dir: &Path) -> (SigningKey, VerifyKey) {
        let p = dir.join("signing.pem");
        let public = keygen(&p).unwrap();
        (SigningKey::from_file(&p).unwrap(), public)
    }

    #[test]
    fn base64_round_trips_every_length() {
        for n in 0..10 {
            let b: Vec<u8> = (0..n).map(|i| (i * 37 + 5) as u8).collect();
            assert_eq!(unbase64(&base64(&b)).unwrap(), b, "{n}");
        }
        assert_eq!(base64(b"foob"), "Zm9vYg==");
        assert!(unbase64("Zm9=vYg=").is_none());
    }

    #[test]
    fn keygen_writes_a_private_pem_once_and_prints_a_public_key_that_parses() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.pem");
        let public = keygen(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with(PEM_BEGIN), "{text}");
        assert_eq!(
            VerifyKey::parse(&public.to_string(), "t").unwrap(),
            public,
            "{public}"
        );
        assert_eq!(SigningKey::from_file(&p).unwrap().public(), &public);
        assert!(keygen(&p).is_err(), "an existing key is never overwritten");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            SigningKey::from_file(&p),
            Err(SignError::Exposed { .. })
        ));
        for bad in ["", "ed25519:", "ed25519:zz", "age1abc", "ed25519:00"] {
            assert!(VerifyKey::parse(bad, "t").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_signature_verifies_only_for_its_key_its_content_and_its_verify_key() {
        let dir = tempfile::tempdir().unwrap();
        let (signer, public) = new_key(dir.path());
        let trust = Trust {
            signer: None,
            verify: vec![public.clone()],
        };
        let key = "backup/20260102-030405F/backup.json";
        let mut label = serde_json::json!({"id": "20260102-030405F", "size_bytes": 7, "wal_ranges": [{"b": 1, "a": 2}], "verification": null});
        label["signature"] = serde_json::to_value(sign(&signer, key, &label)).unwrap();
        check(&trust, key, &label).unwrap();
        // Pretty-printed and read back, and a later verification, change
        // nothing.
        let reread: Value =
            serde_json::from_str(&serde_json::to_string_pretty(&label).unwrap()).unwrap();
        let mut verified = reread.clone();
        verified["verification"] = serde_json::json!({"status": "ok"});
        check(&trust, key, &verified).unwrap();
        // One field changed, another key, no signature.
        let mut changed = label.clone();
        changed["size_bytes"] = 8.into();
        assert!(check(&trust, key, &changed)
            .unwrap_err()
            .contains("does not verify"));
        assert!(check(&trust, "backup/29990101-000000F/backup.json", &label)
            .unwrap_err()
            .contains("does not verify"));
        let mut unsigned = label.clone();
        unsigned.as_object_mut().unwrap().remove("signature");
        assert!(check(&trust, key, &unsigned)
            .unwrap_err()
            .contains("not signed"));
        // A stranger's signature names its key id.
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        let (stranger, _) = new_key(&other);
        let mut forged = label.clone();
        forged["signature"] = serde_json::to_value(sign(&stranger, key, &label)).unwrap();
        let e = check(&trust, key, &forged).unwrap_err();
        assert!(
            e.contains(&format!("signed by key id {}", stranger.public().key_id())),
            "{e}"
        );
    }

    /// Interoperable with OpenSSL both ways: its key signs, and it verifies
    /// the signature as plain Ed25519.
    #[test]
    fn an_openssl_key_signs_and_openssl_verifies_the_signature() {
        use std::os::unix::fs::PermissionsExt;
        use std::process::Command;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let run = |args: &[&str]| {
            let o = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            o.stdout
        };
        run(&["genpkey", "-algorithm", "ed25519", "-out", "k.pem"]);
        std::fs::set_permissions(d.join("k.pem"), std::fs::Permissions::from_mode(0o600)).unwrap();
        let signer = SigningKey::from_file(&d.join("k.pem")).unwrap();
        let der = run(&["pkey", "-in", "k.pem", "-pubout", "-outform", "DER"]);
        assert_eq!(&der[der.len() - 32..], signer.public().bytes);
        run(&["pkey", "-in", "k.pem", "-pubout", "-out", "pub.pem"]);
        let key = "backup/20260102-030405F/backup.json";
        let label = serde_json::json!({"id": "20260102-030405F"});
        let sig = sign(&signer, key, &label);
        std::fs::write(d.join("msg"), message(key, &label)).unwrap();
        std::fs::write(d.join("sig"), unhex(&sig.value).unwrap()).unwrap();
        let out = run(&[
            "pkeyutl", "-verify", "-pubin", "-inkey", "pub.pem", "-rawin", "-in", "msg",
            "-sigfile", "sig",
        ]);
        assert!(String::from_utf8_lossy(&out).contains("Signature Verified Successfully"));
    }
}
