//! A signed plain backup's files, checked against the `backup_manifest`
//! its label vouches for in the very read that uses them.
//!
//! Whoever can write into a local repository can change a plain backup's
//! files after it was taken. Its label, signed by the backup host,
//! records the SHA-256 of the manifest (`Repo::plain_backup` reads the
//! manifest once and checks it); the manifest lists every file
//! pg_basebackup wrote with its size and SHA-256 (reentry takes backups
//! with `--manifest-checksums=SHA256`). A file is checked as it is read
//! for use: restore hashes each file as it copies it into its target,
//! `repo copy` as it packs it. Checking first and reading again later
//! would let a writer swap the file in between.
//!
//! There is no ignore list, unlike pg_verifybackup's: postgresql.auto.conf,
//! backup_label, tablespace_map and any `*.signal` are checked like every
//! other file (reentry runs pg_basebackup without `-R`, so the manifest
//! lists them as the server sent them), and a file the manifest does not
//! list is refused. The one exception is `pg_wal/`, whose files the
//! manifest never lists: none of them is used, and WAL comes from the
//! archive alone, through restore_command (a backup waits until its WAL
//! is archived).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::backup::repo::RepoError;

/// The manifest's own name: not listed in itself.
pub const MANIFEST_FILE: &str = "backup_manifest";
/// The directory whose files a signed plain backup's use leaves out.
pub const WAL_DIR: &str = "pg_wal";

/// A file whose content is not what the vouched manifest lists, or one it
/// does not list, or one it lists that is missing: where and what.
#[derive(Debug)]
pub struct Mismatch {
    pub location: PathBuf,
    pub detail: String,
}

impl From<Mismatch> for RepoError {
    fn from(m: Mismatch) -> RepoError {
        RepoError::NotVouched {
            location: m.location.display().to_string(),
            detail: m.detail,
        }
    }
}

struct Listed {
    size: u64,
    sha256: [u8; 32],
}

/// A signed plain backup's manifest, as its label vouches for it: the
/// bytes read once, and what they list.
pub struct Vouched {
    id: String,
    data: PathBuf,
    bytes: Vec<u8>,
    files: BTreeMap<PathBuf, Listed>,
}

#[derive(Deserialize)]
struct RawManifest {
    #[serde(rename = "Files")]
    files: Vec<RawFile>,
}

#[derive(Deserialize)]
struct RawFile {
    #[serde(rename = "Path")]
    path: Option<String>,
    /// Hex, for a path that is not UTF-8.
    #[serde(rename = "Encoded-Path")]
    encoded_path: Option<String>,
    #[serde(rename = "Size")]
    size: u64,
    #[serde(rename = "Checksum-Algorithm")]
    algorithm: Option<String>,
    #[serde(rename = "Checksum")]
    checksum: Option<String>,
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Vouched {
    /// The manifest `bytes` of backup `id`, whose files are in `data`;
    /// the label's checksum of them has been checked. Refused unless
    /// every file is listed once, by a plain relative path, with a
    /// SHA-256: without one, nothing vouches for the file's content.
    pub fn parse(id: &str, data: &Path, bytes: Vec<u8>) -> Result<Vouched, RepoError> {
        let location = data.join(MANIFEST_FILE);
        let bad = |detail: String| RepoError::NotVouched {
            location: location.display().to_string(),
            detail,
        };
        let raw: RawManifest = serde_json::from_slice(&bytes).map_err(|e| {
            bad(format!(
                "its signed label vouches for it, yet it is no manifest: {e}"
            ))
        })?;
        let mut files = BTreeMap::new();
        for f in raw.files {
            let path = match (&f.path, &f.encoded_path) {
                (Some(p), None) => PathBuf::from(p),
                (None, Some(h)) => match unhex(h) {
                    Some(b) => PathBuf::from(OsStr::from_bytes(&b)),
                    None => return Err(bad(format!("Encoded-Path {h:?} is not hex"))),
                },
                _ => {
                    return Err(bad(
                        "a file has neither or both of Path and Encoded-Path".into()
                    ))
                }
            };
            let plain = path.components().next().is_some()
                && path.components().all(|c| matches!(c, Component::Normal(_)));
            if !plain {
                return Err(bad(format!(
                    "it lists {}, which is not a plain relative path",
                    path.display()
                )));
            }
            let sha256 = match (
                f.algorithm.as_deref(),
                f.checksum.as_deref().and_then(unhex),
            ) {
                (Some("SHA256"), Some(sum)) if sum.len() == 32 => {
                    let mut a = [0; 32];
                    a.copy_from_slice(&sum);
                    a
                }
                (algorithm, _) => {
                    return Err(bad(format!(
                        "it lists {} with checksum algorithm {}, and a signed backup's files are \
                         checked by SHA-256 (reentry backs up with --manifest-checksums=SHA256)",
                        path.display(),
                        algorithm.unwrap_or("none")
                    )))
                }
            };
            let shown = path.display().to_string();
            if files
                .insert(
                    path,
                    Listed {
                        size: f.size,
                        sha256,
                    },
                )
                .is_some()
            {
                return Err(bad(format!("it lists {shown} twice")));
            }
        }
        Ok(Vouched {
            id: id.to_owned(),
            data: data.to_owned(),
            bytes,
            files,
        })
    }

    /// The manifest as its label vouches for it.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Whether the file at `rel` (relative to the data directory) is left
    /// out of any use: one in `pg_wal/`.
    pub fn left_out(rel: &Path) -> bool {
        rel.starts_with(WAL_DIR) && rel != Path::new(WAL_DIR)
    }

    fn refuse(&self, rel: &Path, detail: String) -> Mismatch {
        Mismatch {
            location: self.data.join(rel),
            detail,
        }
    }

    fn vouches(&self) -> String {
        format!(
            "the manifest that backup {}'s signed label vouches for",
            self.id
        )
    }

    /// The size the manifest lists for the file at `rel`, which is `len`
    /// bytes now: refused when it lists none, or another size.
    pub fn size(&self, rel: &Path, len: u64) -> Result<u64, Mismatch> {
        let listed = self
            .files
            .get(rel)
            .ok_or_else(|| self.refuse(rel, format!("{} does not list it", self.vouches())))?;
        if listed.size != len {
            return Err(self.refuse(
                rel,
                format!(
                    "it is {len} bytes, and {} lists {}",
                    self.vouches(),
                    listed.size
                ),
            ));
        }
        Ok(listed.size)
    }

    /// Refuses the file at `rel` unless what was read of it, `len` bytes
    /// whose SHA-256 is `sha256`, is what the manifest lists.
    pub fn check(&self, rel: &Path, len: u64, sha256: &[u8]) -> Result<(), Mismatch> {
        let listed = self.size(rel, len)?;
        let want = &self.files[rel].sha256;
        debug_assert_eq!(listed, len);
        if sha256 != want.as_slice() {
            return Err(self.refuse(
                rel,
                format!(
                    "its SHA-256 is {}, and {} lists {}",
                    hex(sha256),
                    self.vouches(),
                    hex(want)
                ),
            ));
        }
        Ok(())
    }

    /// `check` of a file read whole; the manifest itself must be the
    /// bytes the label vouched for.
    pub fn check_whole(&self, rel: &Path, body: &[u8]) -> Result<(), Mismatch> {
        if rel == Path::new(MANIFEST_FILE) {
            if body != self.bytes.as_slice() {
                return Err(self.refuse(
                    rel,
                    "it changed since its checksum was checked against its signed label".into(),
                ));
            }
            return Ok(());
        }
        self.check(rel, body.len() as u64, &Sha256::digest(body))
    }

    /// Refuses the first file the manifest lists that is not in `seen`
    /// (relative paths), leaving out `pg_wal/`.
    pub fn all_present(&self, seen: &BTreeSet<PathBuf>) -> Result<(), Mismatch> {
        match self
            .files
            .keys()
            .find(|p| !Vouched::left_out(p) && !seen.contains(*p))
        {
            Some(p) => {
                Err(self.refuse(p, format!("it is missing, and {} lists it", self.vouches())))
            }
            None => Ok(()),
        }
    }

    /// A check of the file at `rel` fed with its bytes in order as they
    /// are read.
    pub fn reading(&self, rel: &Path) -> Reading<'_> {
        Reading {
            vouched: self,
            rel: rel.to_owned(),
            hasher: Sha256::new(),
            len: 0,
        }
    }
}

/// One file's bytes hashed as they are read (`Vouched::reading`).
pub struct Reading<'a> {
    vouched: &'a Vouched,
    rel: PathBuf,
    hasher: Sha256,
    len: u64,
}

impl Reading<'_> {
    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Refused unless everything read is what the manifest lists.
    pub fn finish(self) -> Result<(), Mismatch> {
        let digest = self.hasher.finalize();
        self.vouched.check(&self.rel, self.len, &digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(files: &str) -> Vec<u8> {
        format!(
            r#"{{ "PostgreSQL-Backup-Manifest-Version": 2,
"System-Identifier": 7000000000000000001,
"Files": [{files}],
"WAL-Ranges": [],
"Manifest-Checksum": "00" }}"#
        )
        .into_bytes()
    }

    fn entry(path: &str, body: &[u8]) -> String {
        format!(
            r#"{{ "Path": "{path}", "Size": {}, "Last-Modified": "2026-01-02 03:04:05 GMT", "Checksum-Algorithm": "SHA256", "Checksum": "{}" }}"#,
            body.len(),
            hex(&Sha256::digest(body))
        )
    }

    #[test]
    fn every_file_is_checked_and_an_unlisted_or_missing_one_is_refused_naming_it() {
        let files = [
            entry("PG_VERSION", b"18\n"),
            entry("postgresql.auto.conf", b""),
        ]
        .join(",");
        let v = Vouched::parse("20260102-030405F", Path::new("/r/d"), manifest(&files)).unwrap();
        v.check_whole(Path::new("PG_VERSION"), b"18\n").unwrap();
        let e = v.check_whole(Path::new("PG_VERSION"), b"17\n").unwrap_err();
        assert_eq!(e.location, Path::new("/r/d/PG_VERSION"));
        assert!(e.detail.starts_with("its SHA-256 is "), "{}", e.detail);
        let e = v
            .check_whole(
                Path::new("postgresql.auto.conf"),
                b"recovery_target_lsn = '0/1'\n",
            )
            .unwrap_err();
        assert!(e.detail.starts_with("it is 28 bytes, and the manifest that backup 20260102-030405F's signed label vouches for lists 0"), "{}", e.detail);
        let e = v.check_whole(Path::new("standby.signal"), b"").unwrap_err();
        assert!(e.detail.ends_with("does not list it"), "{}", e.detail);
        let mut r = v.reading(Path::new("PG_VERSION"));
        r.update(b"18");
        r.update(b"\n");
        r.finish().unwrap();
        let seen = BTreeSet::from([PathBuf::from("PG_VERSION")]);
        let e = v.all_present(&seen).unwrap_err();
        assert_eq!(e.location, Path::new("/r/d/postgresql.auto.conf"));
        assert!(e.detail.starts_with("it is missing"), "{}", e.detail);
        assert!(Vouched::left_out(Path::new("pg_wal/00000002.history")));
        assert!(!Vouched::left_out(Path::new("pg_wal")));
        assert!(!Vouched::left_out(Path::new("pg_walx/1")));
    }

    #[test]
    fn a_manifest_without_sha256_or_with_a_path_out_of_the_directory_is_refused() {
        let crc = r#"{ "Path": "PG_VERSION", "Size": 3, "Checksum-Algorithm": "CRC32C", "Checksum": "00000000" }"#;
        let e = Vouched::parse("i", Path::new("/r/d"), manifest(crc))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("checksum algorithm CRC32C"), "{e}");
        let none = r#"{ "Path": "PG_VERSION", "Size": 3 }"#;
        let e = Vouched::parse("i", Path::new("/r/d"), manifest(none))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("checksum algorithm none"), "{e}");
        for bad in ["../x", "/etc/passwd", "./x", "base/../x"] {
            let e = Vouched::parse("i", Path::new("/r/d"), manifest(&entry(bad, b"")))
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("not a plain relative path"), "{bad}: {e}");
        }
        let twice = [entry("a", b""), entry("a", b"")].join(",");
        let e = Vouched::parse("i", Path::new("/r/d"), manifest(&twice))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("lists a twice"), "{e}");
        // A path that is not UTF-8 is given in hex.
        let encoded = format!(
            r#"{{ "Encoded-Path": "{}", "Size": 0, "Checksum-Algorithm": "SHA256", "Checksum": "{}" }}"#,
            hex(b"base/\xff"),
            hex(&Sha256::digest(b""))
        );
        let v = Vouched::parse("i", Path::new("/r/d"), manifest(&encoded)).unwrap();
        v.check_whole(Path::new(OsStr::from_bytes(b"base/\xff")), b"")
            .unwrap();
    }
}
