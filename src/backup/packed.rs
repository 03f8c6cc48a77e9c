//! A base backup on object storage: the directory pg_basebackup wrote,
//! packed into objects of at most `PIECE` bytes before compression, each in
//! the stored format of `stored.rs` (a header with the length and SHA-256
//! of its content, then zstd), uploaded and downloaded `jobs` at a time.
//!
//! ```text
//! backup/<id>/pack/000000     small files end to end, or one part of a large file
//! backup/<id>/files.json      the index: every directory, file and link, and
//!                             where each file's bytes are; each piece's checksum
//! backup/<id>/backup_manifest pg_basebackup's manifest, stored alone: an
//!                             incremental backup's child needs it
//! ```
//!
//! Every piece and the index are written create-only, before the label
//! (repo.rs) that makes the backup visible. Pieces have at most `PIECE`
//! bytes, so memory stays at about `jobs` pieces whatever the file sizes.
//! A restore materialises the plain directory that pg_combinebackup,
//! pg_verifybackup and PostgreSQL read.
//!
//! Whoever can write into the repository can write an index. The label
//! records the SHA-256 of the index and of the manifest as stored, and
//! each is read only when it matches (`vouched`); where labels are signed
//! (sign.rs), only the backup host could have written those checksums. The
//! index records each piece's checksum, which every read of a piece checks. Signed or not, the index is checked whole before
//! anything is written from it (`Index::check_layout`): every path stays
//! in the directory it is materialised into, there is no link (tablespaces
//! are not supported), nothing is written through a link, every part lies
//! in its piece.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::backup::label::BackupLabel;
use crate::backup::repo::{Repo, RepoError};
use crate::backup::stored::{self, Algorithm, Checksum, Compression, Form, ReadError};
use crate::backup::vouched::Vouched;
use crate::crypt::{CryptError, Identities, Keys};
use crate::progress::Progress;
use crate::storage::{Put, Store, StoreError};

/// The most content one piece holds.
pub const PIECE: u64 = 16 << 20;
pub const INDEX_FILE: &str = "files.json";
pub const MANIFEST_FILE: &str = "backup_manifest";
/// 2: each piece's `checksum` names its algorithm; 1 (still read) had a
/// bare SHA-256 as `sha256`.
const INDEX_FORMAT: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("cannot {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("{location} is damaged: {detail}")]
    Corrupt { location: String, detail: String },
    #[error(
        "{location}: entry {entry:?} {problem}; refusing to restore from this index, \
         which is corrupt or was tampered with (nothing was written from it)"
    )]
    BadIndex {
        location: String,
        entry: String,
        problem: String,
    },
    #[error("{location} is missing")]
    Missing { location: String },
    #[error(
        "{location} is not what its backup's label vouches for: {detail}; refusing to use it \
         (it was changed or replaced after the backup, or planted)"
    )]
    NotVouched { location: String, detail: String },
    #[error("{location} already exists: a backup's objects are written once")]
    Exists { location: String },
    #[error(transparent)]
    Key(#[from] CryptError),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PackError + 'a {
    move |source| PackError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// The index of a packed backup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Index {
    pub format: u32,
    pub compression: Compression,
    pub pieces: Vec<Piece>,
    pub entries: Vec<Entry>,
}

/// One object: its content's length and checksum (as its header records
/// them) and its stored size. Earlier builds wrote the checksum as
/// `sha256`, in bare hex.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Piece {
    pub raw_len: u64,
    pub stored_len: u64,
    #[serde(alias = "sha256")]
    pub checksum: Checksum,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        size: u64,
        /// Where its bytes are, in order.
        parts: Vec<Part>,
    },
    Link {
        path: String,
        target: String,
    },
}

/// `len` bytes of a file at `offset` in piece `piece`'s content.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Part {
    pub piece: usize,
    pub offset: u64,
    pub len: u64,
}

/// Whether `path` is a plain relative path: no root, no `..`, no empty or
/// `.` part, no NUL. `Path::join` replaces the base with an absolute path
/// and follows `..` out of it.
fn plain_relative(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\0')
        && path
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

impl Index {
    /// Why the index cannot be materialised, naming the entry: a path
    /// that is not plain relative, one given twice, a link, a piece longer
    /// than `PIECE`, or a part outside its piece.
    ///
    /// A backup holds links only in `pg_tblspc/`, for tablespaces, which
    /// are not supported: backups of a cluster with them are refused.
    /// Whether a link's target stays inside the restore cannot be told
    /// from its text (`pg_tblspc/1 -> "2/../.."` climbs through whatever
    /// `pg_tblspc/2` is), so every link is refused.
    pub fn check_layout(&self) -> Result<(), (String, String)> {
        if let Some(i) = self.pieces.iter().position(|p| p.raw_len > PIECE) {
            return Err((
                format!("piece {i}"),
                format!(
                    "holds {} bytes, more than a piece's {PIECE}",
                    self.pieces[i].raw_len
                ),
            ));
        }
        let mut seen = HashSet::new();
        for e in &self.entries {
            let path = e.path();
            let bad = |problem: String| Err((path.to_owned(), problem));
            if !plain_relative(path) {
                return bad(
                    "is not a plain relative path (it is absolute, or has an empty, `.`, `..` \
                     or NUL part)"
                        .into(),
                );
            }
            if !seen.insert(path) {
                return bad("is listed twice".into());
            }
            match e {
                Entry::Link { target, .. } => {
                    return bad(format!(
                        "is a link (to {target:?}): a backup holds links only for tablespaces, \
                         which reentry does not restore yet"
                    ));
                }
                Entry::File { size, parts, .. } => {
                    let mut covered: u64 = 0;
                    for part in parts {
                        let Some(piece) = self.pieces.get(part.piece) else {
                            return bad(format!(
                                "has a part in piece {}, and the index has {} pieces",
                                part.piece,
                                self.pieces.len()
                            ));
                        };
                        let end = part.offset.checked_add(part.len);
                        if end.is_none_or(|end| end > piece.raw_len) {
                            return bad(format!(
                                "has a part at {} of {} bytes in piece {}, which holds {} bytes",
                                part.offset, part.len, part.piece, piece.raw_len
                            ));
                        }
                        covered = covered.saturating_add(part.len);
                    }
                    if covered != *size {
                        return bad(format!("is {size} bytes, and its parts hold {covered}"));
                    }
                }
                Entry::Dir { .. } => {}
            }
        }
        Ok(())
    }

    pub fn bytes(&self) -> u64 {
        self.pieces.iter().map(|p| p.raw_len).sum()
    }

    pub fn stored_bytes(&self) -> u64 {
        self.pieces.iter().map(|p| p.stored_len).sum()
    }
}

impl Entry {
    pub fn path(&self) -> &str {
        match self {
            Entry::Dir { path, .. } | Entry::File { path, .. } | Entry::Link { path, .. } => path,
        }
    }
}

/// The permission bits a restored file or directory gets: its owner's
/// from the index, no more. The data is the operator's alone, whatever
/// the source allowed (`initdb -g`) or the umask would give.
fn restored_mode(mode: u32) -> u32 {
    mode & 0o700
}

/// Refuses to create `p` (below `to`) when one of the directories between
/// them is a link: a write there would land outside `to`.
fn no_link_above(to: &Path, p: &Path) -> Result<(), PackError> {
    let mut dir = p.parent();
    while let Some(d) = dir.filter(|d| d.starts_with(to) && *d != to) {
        let meta = fs::symlink_metadata(d).map_err(io_err("read", d))?;
        if meta.file_type().is_symlink() {
            return Err(PackError::Io {
                op: "create",
                path: p.to_owned(),
                source: io::Error::other(format!(
                    "{} is a symbolic link: nothing is written through one",
                    d.display()
                )),
            });
        }
        dir = d.parent();
    }
    Ok(())
}

pub fn piece_key(id: &str, piece: usize) -> String {
    Repo::backup_key(id, &format!("pack/{piece:06}"))
}

/// What one piece is made of: byte ranges of files, in order.
#[derive(Debug, Default)]
struct Plan {
    ranges: Vec<Range>,
    len: u64,
}

/// `len` bytes at `offset` of the file at `path`, or of the vouched
/// manifest held in memory; with `check`, the file's index in the
/// `Checks` that hash it.
#[derive(Debug)]
struct Range {
    path: PathBuf,
    offset: u64,
    len: u64,
    manifest: bool,
    check: Option<usize>,
}

/// The files of a signed plain backup, each hashed as the pieces that
/// hold it read it, and checked against the vouched manifest once all of
/// it is read. A file larger than a piece is read by several pieces, on
/// any thread: its parts are hashed in order, each waiting for the one
/// before it. That one is in the piece before, which `parallel` handed
/// out first, and which only ever waits for the piece before it in turn.
struct Checks<'a> {
    vouched: &'a Vouched,
    files: Vec<FileHash>,
    /// A piece failed: no part before a waiting one may come.
    stopped: AtomicBool,
}

struct FileHash {
    rel: PathBuf,
    size: u64,
    /// The hash so far, and how many bytes it has taken.
    state: Mutex<(Sha256, u64)>,
    turn: Condvar,
}

impl Checks<'_> {
    /// Hashes `bytes`, read at `offset` of file `i`, once what comes
    /// before them is hashed; with its last byte, the file is checked.
    fn feed(&self, i: usize, offset: u64, bytes: &[u8]) -> Result<(), PackError> {
        let f = &self.files[i];
        let mut state = f.state.lock().expect("no panic holding it");
        while state.1 != offset {
            if self.stopped.load(Ordering::Relaxed) {
                return Err(PackError::Io {
                    op: "pack",
                    path: f.rel.clone(),
                    source: io::Error::other("stopped: another piece failed"),
                });
            }
            state = f
                .turn
                .wait_timeout(state, std::time::Duration::from_millis(100))
                .expect("no panic holding it")
                .0;
        }
        state.0.update(bytes);
        state.1 += bytes.len() as u64;
        let whole = (state.1 == f.size).then(|| std::mem::take(&mut state.0).finalize());
        drop(state);
        f.turn.notify_all();
        if let Some(digest) = whole {
            self.vouched
                .check(&f.rel, f.size, &digest)
                .map_err(RepoError::from)?;
        }
        Ok(())
    }
}

/// Walks `dir` and lays its files out in pieces: small files end to end
/// until a piece is full, a large file in parts of `PIECE` bytes. With
/// `vouched` (a signed plain backup), no file of `pg_wal/` is packed,
/// the manifest is the one vouched for, and every other file must be one
/// it lists, of the size it lists (the content is checked as it is
/// packed, `Checks`); one it lists must not be missing.
fn lay_out<'v>(dir: &Path, vouched: Option<&'v Vouched>) -> Result<Layout<'v>, PackError> {
    let mut entries = Vec::new();
    let mut plans: Vec<Plan> = vec![Plan::default()];
    let mut checks = vouched.map(|v| Checks {
        vouched: v,
        files: Vec::new(),
        stopped: AtomicBool::new(false),
    });
    let mut seen = std::collections::BTreeSet::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = dir.join(&rel);
        let mut names: Vec<_> = fs::read_dir(&abs)
            .map_err(io_err("list", &abs))?
            .collect::<io::Result<Vec<_>>>()
            .map_err(io_err("list", &abs))?;
        names.sort_by_key(|e| e.file_name());
        let mut subdirs = Vec::new();
        for e in names {
            let path = rel.join(e.file_name());
            let shown = path.to_string_lossy().into_owned();
            let abs = e.path();
            let meta = fs::symlink_metadata(&abs).map_err(io_err("read", &abs))?;
            let mode = meta.permissions().mode() & 0o7777;
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&abs).map_err(io_err("read", &abs))?;
                if vouched.is_some() {
                    return Err(RepoError::NotVouched {
                        location: abs.display().to_string(),
                        detail: format!(
                            "it is a link (to {}), and a signed backup's manifest vouches for \
                             files only",
                            target.display()
                        ),
                    }
                    .into());
                }
                entries.push(Entry::Link {
                    path: shown,
                    target: target.to_string_lossy().into_owned(),
                });
            } else if meta.is_dir() {
                entries.push(Entry::Dir { path: shown, mode });
                subdirs.push(path);
            } else {
                let mut size = meta.len();
                let manifest = vouched.is_some() && path == Path::new(MANIFEST_FILE);
                let mut check = None;
                if let (Some(v), Some(c)) = (vouched, checks.as_mut()) {
                    if Vouched::left_out(&path) {
                        continue;
                    }
                    if manifest {
                        size = v.bytes().len() as u64;
                    } else {
                        v.size(&path, size).map_err(RepoError::from)?;
                        seen.insert(path.clone());
                        if size == 0 {
                            v.check(&path, 0, &Sha256::digest(b""))
                                .map_err(RepoError::from)?;
                        } else {
                            check = Some(c.files.len());
                            c.files.push(FileHash {
                                rel: path.clone(),
                                size,
                                state: Mutex::new((Sha256::new(), 0)),
                                turn: Condvar::new(),
                            });
                        }
                    }
                }
                let mut parts = Vec::new();
                let mut at = 0;
                while at < size {
                    // A piece that is full, or a small file that does not
                    // fit the rest of it, starts the next piece; a large
                    // file fills the rest and goes on in the next.
                    let used = plans.last().expect("never empty").len;
                    let fits = size - at <= PIECE - used.min(PIECE);
                    if used >= PIECE || (used > 0 && !fits && size <= PIECE) {
                        plans.push(Plan::default());
                    }
                    let piece = plans.len() - 1;
                    let last = plans.last_mut().expect("never empty");
                    let len = (size - at).min(PIECE - last.len);
                    parts.push(Part {
                        piece,
                        offset: last.len,
                        len,
                    });
                    last.ranges.push(Range {
                        path: abs.clone(),
                        offset: at,
                        len,
                        manifest,
                        check,
                    });
                    last.len += len;
                    at += len;
                }
                entries.push(Entry::File {
                    path: shown,
                    mode,
                    size,
                    parts,
                });
            }
        }
        // Depth first, in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    if let Some(v) = vouched {
        v.all_present(&seen).map_err(RepoError::from)?;
        if !entries.iter().any(|e| e.path() == MANIFEST_FILE) {
            return Err(RepoError::from(crate::backup::vouched::Mismatch {
                location: dir.join(MANIFEST_FILE),
                detail: "it is missing, and the backup's signed label vouches for it".into(),
            })
            .into());
        }
    }
    if plans.last().is_some_and(|p| p.ranges.is_empty()) {
        plans.pop();
    }
    Ok(Layout {
        entries,
        plans,
        checks,
    })
}

/// What `lay_out` found: the index's entries, the pieces, and with a
/// vouched manifest the files' checks.
struct Layout<'v> {
    entries: Vec<Entry>,
    plans: Vec<Plan>,
    checks: Option<Checks<'v>>,
}

/// Runs `work(i)` for every i below `n` on `jobs` threads; the first error
/// stops the others from starting more.
pub(crate) fn parallel<T: Send>(
    n: usize,
    jobs: usize,
    work: impl Fn(usize) -> Result<T, PackError> + Sync,
) -> Result<Vec<T>, PackError> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: Mutex<Vec<Option<T>>> = Mutex::new((0..n).map(|_| None).collect());
    let first_error: Mutex<Option<PackError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..jobs.clamp(1, n.max(1)) {
            s.spawn(|| loop {
                if failed.load(Ordering::Relaxed) {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                match work(i) {
                    Ok(v) => results.lock().expect("no panic holding it")[i] = Some(v),
                    Err(e) => {
                        failed.store(true, Ordering::Relaxed);
                        first_error
                            .lock()
                            .expect("no panic holding it")
                            .get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().expect("no panic holding it") {
        return Err(e);
    }
    Ok(results
        .into_inner()
        .expect("no panic holding it")
        .into_iter()
        .map(|r| r.expect("every item ran"))
        .collect())
}

/// What `upload` wrote: the index, and the SHA-256 of the index and of the
/// manifest as stored, for the label to record (and its signature to
/// cover).
#[derive(Debug)]
pub struct Uploaded {
    pub index: Index,
    pub objects: BTreeMap<String, Checksum>,
}

/// Packs directory `dir` (a backup pg_basebackup wrote) into backup `id`'s
/// objects and writes its index and its manifest. With `vouched` (a
/// signed plain backup's manifest), each file is checked against it in
/// the read that packs it, and the first that differs, or that it does
/// not list, stops the upload before the index is written (see
/// `lay_out`): the caller removes what was written.
#[allow(clippy::too_many_arguments)]
pub fn upload(
    store: &dyn Store,
    id: &str,
    dir: &Path,
    vouched: Option<&Vouched>,
    form: Form,
    keys: &Keys,
    jobs: usize,
    progress: &dyn Progress,
) -> Result<Uploaded, PackError> {
    let to = keys.to.as_ref();
    let Layout {
        entries,
        plans,
        checks,
    } = lay_out(dir, vouched)?;
    let total: u64 = plans.iter().map(|p| p.len).sum();
    progress.stage("uploading", Some(total));
    let done = AtomicU64::new(0);
    let pack = |i: usize| -> Result<Piece, PackError> {
        let plan = &plans[i];
        let mut raw = Vec::with_capacity(plan.len as usize);
        for r in &plan.ranges {
            let (path, offset, len) = (&r.path, r.offset, r.len);
            let before = raw.len();
            if r.manifest {
                let bytes = vouched.expect("a manifest range is vouched for").bytes();
                raw.extend_from_slice(&bytes[offset as usize..(offset + len) as usize]);
            } else {
                let mut f = File::open(path).map_err(io_err("read", path))?;
                f.seek(SeekFrom::Start(offset))
                    .map_err(io_err("read", path))?;
                f.take(len)
                    .read_to_end(&mut raw)
                    .map_err(io_err("read", path))?;
            }
            if (raw.len() - before) as u64 != len {
                return Err(PackError::Io {
                    op: "read",
                    path: path.clone(),
                    source: io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the file shrank while it was packed",
                    ),
                });
            }
            // What is packed is what is hashed: one read.
            if let (Some(c), Some(checks)) = (r.check, &checks) {
                checks.feed(c, offset, &raw[before..])?;
            }
        }
        let (body, header) = stored::encode_sealed(&raw, &mut io::empty(), form, to)
            .map_err(io_err("compress", dir))?;
        let key = piece_key(id, i);
        if store.put_new_or_same(&key, &body)? == Put::Exists {
            return Err(PackError::Exists {
                location: format!("{}/{key}", store.location()),
            });
        }
        let n = done.fetch_add(plan.len, Ordering::Relaxed) + plan.len;
        progress.advance(n, "");
        Ok(Piece {
            raw_len: header.raw_len,
            stored_len: body.len() as u64,
            checksum: header.checksum,
        })
    };
    let pieces = parallel(plans.len(), jobs, |i| {
        let r = pack(i);
        if let (Err(_), Some(c)) = (&r, &checks) {
            c.stopped.store(true, Ordering::Relaxed);
        }
        r
    })?;
    progress.finish();
    let index = Index {
        format: INDEX_FORMAT,
        compression: form.compression,
        pieces,
        entries,
    };
    let mut text = serde_json::to_vec(&index).expect("an index serializes");
    text.push(b'\n');
    put_new(store, &Repo::backup_key(id, INDEX_FILE), &text)?;
    let manifest = dir.join(MANIFEST_FILE);
    let (body, _) = match vouched {
        Some(v) => stored::encode_sealed(v.bytes(), &mut io::empty(), form, to),
        None => {
            File::open(&manifest).and_then(|mut f| stored::encode_sealed(&[], &mut f, form, to))
        }
    }
    .map_err(io_err("read", &manifest))?;
    put_new(store, &Repo::backup_key(id, MANIFEST_FILE), &body)?;
    let objects = BTreeMap::from([
        (
            INDEX_FILE.to_owned(),
            Checksum::of(Algorithm::Sha256, &text),
        ),
        (
            MANIFEST_FILE.to_owned(),
            Checksum::of(Algorithm::Sha256, &body),
        ),
    ]);
    Ok(Uploaded { index, objects })
}

/// Refuses `bytes`, read from object `name` of backup `label`, unless the
/// label vouches for them: it records their checksum, or (unsigned, from
/// a build or a host that recorded none) records none. A signed label
/// that records none vouches for nothing.
fn vouched(
    store: &dyn Store,
    label: &BackupLabel,
    name: &str,
    bytes: &[u8],
) -> Result<(), PackError> {
    let location = || format!("{}/{}", store.location(), Repo::backup_key(&label.id, name));
    match label.objects.get(name) {
        Some(want) => {
            let got = Checksum::of(want.algorithm, bytes);
            if got != *want {
                return Err(PackError::NotVouched {
                    location: location(),
                    detail: format!("its checksum is {got}, and the label records {want}"),
                });
            }
            Ok(())
        }
        None if label.signature.is_some() => Err(PackError::NotVouched {
            location: location(),
            detail: "its signed label records no checksum of it".into(),
        }),
        None => Ok(()),
    }
}

fn put_new(store: &dyn Store, key: &str, body: &[u8]) -> Result<(), PackError> {
    match store.put_new_or_same(key, body)? {
        Put::Created => Ok(()),
        Put::Exists => Err(PackError::Exists {
            location: format!("{}/{key}", store.location()),
        }),
    }
}

/// Backup `label`'s index, as its label vouches for it.
pub fn index(store: &dyn Store, label: &BackupLabel) -> Result<Index, PackError> {
    let key = Repo::backup_key(&label.id, INDEX_FILE);
    let location = format!("{}/{key}", store.location());
    let text = store.get(&key)?.ok_or_else(|| PackError::Missing {
        location: location.clone(),
    })?;
    vouched(store, label, INDEX_FILE, &text)?;
    parse_index(&location, &text)
}

/// An index read from `location`: its JSON and its format, not yet its
/// layout (`Index::check_layout`). The fuzz target `packed_index` calls it.
pub fn parse_index(location: &str, text: &[u8]) -> Result<Index, PackError> {
    let location = location.to_owned();
    let index: Index = serde_json::from_slice(text).map_err(|e| PackError::Corrupt {
        location: location.clone(),
        detail: e.to_string(),
    })?;
    if !(1..=INDEX_FORMAT).contains(&index.format) {
        return Err(PackError::Corrupt {
            location,
            detail: format!(
                "index format {} is not one this reentry reads",
                index.format
            ),
        });
    }
    Ok(index)
}

/// Backup `label`'s index, refused unless it can be materialised without
/// writing outside the directory it is materialised into.
pub fn checked_index(store: &dyn Store, label: &BackupLabel) -> Result<Index, PackError> {
    let index = index(store, label)?;
    index
        .check_layout()
        .map_err(|(entry, problem)| PackError::BadIndex {
            location: format!(
                "{}/{}",
                store.location(),
                Repo::backup_key(&label.id, INDEX_FILE)
            ),
            entry,
            problem,
        })?;
    Ok(index)
}

/// The content of stored object `key`, checked against its header and
/// against what the index records of it.
fn fetch_piece(
    store: &dyn Store,
    key: &str,
    want: Option<&Piece>,
    keys: Option<&Identities>,
) -> Result<Vec<u8>, PackError> {
    read_piece(store, key, want, None, keys, false)
}

/// `fetch_piece`, or with `check_only` a check that reads nothing out.
/// With `vouch` (a label and the object's name), the stored bytes are
/// first checked against what the label records of them.
fn read_piece(
    store: &dyn Store,
    key: &str,
    want: Option<&Piece>,
    vouch: Option<(&BackupLabel, &str)>,
    keys: Option<&Identities>,
    check_only: bool,
) -> Result<Vec<u8>, PackError> {
    let location = format!("{}/{key}", store.location());
    let body = store.get(key)?.ok_or_else(|| PackError::Missing {
        location: location.clone(),
    })?;
    if let Some((label, name)) = vouch {
        vouched(store, label, name, &body)?;
    }
    // The index's length only sizes the buffer up to a piece's: a larger
    // one is a damaged index, found below, not an allocation.
    let mut raw = Vec::with_capacity(want.map_or(0, |p| p.raw_len.min(PIECE) as usize));
    let header = if check_only {
        // Without a key an encrypted object is checked against the
        // checksum of its payload; any other is read whole.
        stored::check(&body[..])
    } else {
        stored::read_with(&body[..], &mut raw, keys)
    }
    .map_err(|e| match e {
        ReadError::Key(e) => PackError::Key(e),
        ReadError::Corrupt(detail) => PackError::Corrupt {
            location: location.clone(),
            detail,
        },
        ReadError::Io(e) => PackError::Corrupt {
            location: location.clone(),
            detail: e.to_string(),
        },
    })?;
    if let Some(p) = want {
        if header.checksum != p.checksum || header.raw_len != p.raw_len {
            return Err(PackError::Corrupt {
                location,
                detail: format!(
                    "it holds {} bytes with checksum {}; the index records {} bytes with checksum {}",
                    header.raw_len, header.checksum, p.raw_len, p.checksum
                ),
            });
        }
    }
    Ok(raw)
}

/// Backup `label`'s `backup_manifest`, written to `dest`.
pub fn fetch_manifest(
    store: &dyn Store,
    label: &BackupLabel,
    dest: &Path,
    keys: &Keys,
) -> Result<(), PackError> {
    let raw = manifest(store, label, keys)?;
    fs::write(dest, raw).map_err(io_err("write", dest))
}

/// Backup `label`'s `backup_manifest`, as its label vouches for it: with
/// an encrypted backup, proof that the identities given can read it.
pub fn manifest(store: &dyn Store, label: &BackupLabel, keys: &Keys) -> Result<Vec<u8>, PackError> {
    let id = &label.id;
    let key = Repo::backup_key(id, MANIFEST_FILE);
    let identities = keys.identities.as_deref();
    match read_piece(
        store,
        &key,
        None,
        Some((label, MANIFEST_FILE)),
        identities,
        false,
    ) {
        Err(PackError::Key(e)) => Err(PackError::Key(
            e.about(&format!("backup {id} ({}/{key})", store.location())),
        )),
        r => r,
    }
}

/// Downloads backup `label` and writes the directory pg_basebackup wrote
/// into `to`, which exists and is empty. With `only`, just the files whose
/// path is in it (and the directories above them).
pub fn materialise(
    store: &dyn Store,
    label: &BackupLabel,
    to: &Path,
    only: Option<&[&str]>,
    keys: &Keys,
    jobs: usize,
    progress: &dyn Progress,
) -> Result<Index, PackError> {
    let id = label.id.as_str();
    // A wrong or missing key fails here, before anything is written.
    manifest(store, label, keys)?;
    let identities = keys.identities.as_deref();
    let index = checked_index(store, label)?;
    let wanted =
        |path: &str| only.is_none_or(|o| o.iter().any(|w| w.starts_with(path) || *w == path));
    // Directories and empty files first, so that pieces can land in any
    // order; each file is opened by every piece that holds part of it.
    // There are no links: `check_layout` refuses them.
    let mut targets: Vec<Vec<(PathBuf, u64, u64, u64)>> = vec![Vec::new(); index.pieces.len()];
    for e in &index.entries {
        match e {
            Entry::Dir { path, mode } if wanted(path) => {
                let p = to.join(path);
                no_link_above(to, &p)?;
                // Private from its creation; set again, past the umask.
                let mode = restored_mode(*mode);
                fs::DirBuilder::new()
                    .mode(mode)
                    .create(&p)
                    .map_err(io_err("create", &p))?;
                fs::set_permissions(&p, fs::Permissions::from_mode(mode))
                    .map_err(io_err("set permissions on", &p))?;
            }
            Entry::File {
                path,
                mode,
                size,
                parts,
            } if wanted(path) => {
                let p = to.join(path);
                no_link_above(to, &p)?;
                // Create-only: never opens what is already there, a link
                // included. Private from its creation.
                let mode = restored_mode(*mode);
                let f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(&p)
                    .map_err(io_err("create", &p))?;
                f.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(io_err("set permissions on", &p))?;
                f.set_len(*size).map_err(io_err("write", &p))?;
                let mut at = 0;
                for part in parts {
                    targets[part.piece].push((p.clone(), at, part.offset, part.len));
                    at += part.len;
                }
            }
            _ => {}
        }
    }
    let needed: Vec<usize> = (0..index.pieces.len())
        .filter(|i| !targets[*i].is_empty())
        .collect();
    let total: u64 = needed.iter().map(|i| index.pieces[*i].raw_len).sum();
    progress.stage("downloading", Some(total));
    let done = AtomicU64::new(0);
    parallel(needed.len(), jobs, |n| {
        let i = needed[n];
        let raw = fetch_piece(store, &piece_key(id, i), Some(&index.pieces[i]), identities)?;
        if raw.len() as u64 != index.pieces[i].raw_len {
            return Err(PackError::Corrupt {
                location: format!("{}/{}", store.location(), piece_key(id, i)),
                detail: "it was read without being decrypted".into(),
            });
        }
        for (path, at, offset, len) in &targets[i] {
            let f = fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(io_err("write", path))?;
            f.write_all_at(&raw[*offset as usize..(*offset + *len) as usize], *at)
                .map_err(io_err("write", path))?;
        }
        let d =
            done.fetch_add(index.pieces[i].raw_len, Ordering::Relaxed) + index.pieces[i].raw_len;
        progress.advance(d, "");
        Ok(())
    })?;
    // Durable before a server is started on it.
    for e in &index.entries {
        if let Entry::File { path, .. } = e {
            if wanted(path) {
                let p = to.join(path);
                File::open(&p)
                    .and_then(|f| f.sync_all())
                    .map_err(io_err("fsync", &p))?;
            }
        }
    }
    progress.finish();
    Ok(index)
}

/// What checking every object of a backup found.
#[derive(Debug, Default)]
pub struct Checked {
    pub pieces: usize,
    pub bytes: u64,
    pub problems: Vec<String>,
}

/// Reads every object of backup `id` and checks it against its header and
/// the index, `jobs` at a time, and that every file's bytes are in them.
/// Damage is reported, not returned as an error; a store that cannot be
/// read is an error.
pub fn check(
    store: &dyn Store,
    label: &BackupLabel,
    keys: &Keys,
    jobs: usize,
    progress: &dyn Progress,
) -> Result<Checked, PackError> {
    let id = label.id.as_str();
    let identities = keys.identities.as_deref();
    let mut out = Checked::default();
    let index = match index(store, label) {
        Ok(i) => i,
        Err(
            e @ (PackError::Corrupt { .. }
            | PackError::Missing { .. }
            | PackError::NotVouched { .. }),
        ) => {
            out.problems.push(format!("backup {id}: {e}"));
            return Ok(out);
        }
        Err(e) => return Err(e),
    };
    let layout = index.check_layout();
    if let Err((entry, problem)) = &layout {
        let e = PackError::BadIndex {
            location: format!("{}/{}", store.location(), Repo::backup_key(id, INDEX_FILE)),
            entry: entry.clone(),
            problem: problem.clone(),
        };
        out.problems.push(format!("backup {id}: {e}"));
    }
    for e in index.entries.iter().filter(|_| layout.is_ok()) {
        if let Entry::File {
            path, size, parts, ..
        } = e
        {
            let covered: u64 = parts.iter().map(|p| p.len).sum();
            let outside = parts.iter().any(|p| {
                index
                    .pieces
                    .get(p.piece)
                    .is_none_or(|piece| p.offset + p.len > piece.raw_len)
            });
            if covered != *size || outside {
                out.problems.push(format!(
                    "backup {id}: the index places {path} wrongly ({covered} of {size} bytes)"
                ));
            }
        }
    }
    progress.stage("checking objects", Some(index.bytes()));
    let done = AtomicU64::new(0);
    let problems = parallel(index.pieces.len() + 1, jobs, |i| {
        let (key, want, vouch) = match i {
            0 => (
                Repo::backup_key(id, MANIFEST_FILE),
                None,
                Some((label, MANIFEST_FILE)),
            ),
            i => (piece_key(id, i - 1), Some(&index.pieces[i - 1]), None),
        };
        let r = match read_piece(store, &key, want, vouch, identities, identities.is_none()) {
            Ok(_) => None,
            Err(
                e @ (PackError::Corrupt { .. }
                | PackError::Missing { .. }
                | PackError::NotVouched { .. }),
            ) => Some(format!("backup {id}: {e}")),
            Err(e) => return Err(e),
        };
        if let Some(p) = want {
            let d = done.fetch_add(p.raw_len, Ordering::Relaxed) + p.raw_len;
            progress.advance(d, "");
        }
        Ok(r)
    })?;
    progress.finish();
    out.pieces = index.pieces.len();
    out.bytes = index.bytes();
    out.problems.extend(problems.into_iter().flatten());
    Ok(out)
}

/// Deletes every object of backup `id`, the label first so that the
/// backup stops being visible before any of it goes.
pub fn delete(store: &dyn Store, id: &str) -> Result<usize, PackError> {
    let label = Repo::backup_key(id, crate::backup::label::LABEL_FILE);
    store.delete(&label)?;
    let objects = store.list(&Repo::backup_key(id, ""))?;
    for o in &objects {
        store.delete(&o.key)?;
    }
    Ok(objects.len() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(raw_len: u64) -> Piece {
        Piece {
            raw_len,
            stored_len: raw_len,
            checksum: Checksum::of(stored::Algorithm::Sha256, b""),
        }
    }

    fn file(path: &str, parts: &[(usize, u64, u64)]) -> Entry {
        Entry::File {
            path: path.into(),
            mode: 0o600,
            size: parts.iter().map(|p| p.2).sum(),
            parts: parts
                .iter()
                .map(|&(piece, offset, len)| Part { piece, offset, len })
                .collect(),
        }
    }

    fn dir(path: &str) -> Entry {
        Entry::Dir {
            path: path.into(),
            mode: 0o700,
        }
    }

    fn link(path: &str, target: &str) -> Entry {
        Entry::Link {
            path: path.into(),
            target: target.into(),
        }
    }

    fn layout(entries: Vec<Entry>) -> Result<(), (String, String)> {
        Index {
            format: INDEX_FORMAT,
            compression: Compression::default(),
            pieces: vec![piece(100)],
            entries,
        }
        .check_layout()
    }

    #[test]
    fn an_index_that_stays_in_its_directory_checks_out() {
        layout(vec![
            dir("base"),
            file("base/1", &[(0, 0, 60)]),
            file("PG_VERSION", &[(0, 60, 40)]),
            dir("pg_tblspc"),
        ])
        .unwrap();
    }

    #[test]
    fn paths_that_are_not_plain_relative_are_refused_naming_the_entry() {
        for bad in [
            "../escape",
            "/etc/cron.d/x",
            "base/../../escape",
            "base//1",
            "./base",
            "base/.",
            "",
            "base/\0x",
        ] {
            let (entry, problem) = layout(vec![file(bad, &[(0, 0, 1)])]).unwrap_err();
            assert_eq!(entry, bad);
            assert!(
                problem.contains("not a plain relative path"),
                "{bad:?}: {problem}"
            );
        }
    }

    /// Security review follow-up: a link's target was resolved by its text,
    /// and `pg_tblspc/1 -> "2/../.."` looks inside the target while the
    /// file system resolves `2` first, which may itself be a link out.
    #[test]
    fn every_link_is_refused_naming_it_wherever_it_points() {
        for (path, target) in [
            ("pg_tblspc/1", "2/../.."),
            ("pg_tblspc/2", "/home/ops"),
            ("pg_tblspc/16384", "/srv/pitr/x/tblspc/16384"),
            ("pg_tblspc/16385", "../tblspc/16385"),
            ("l", "base"),
        ] {
            let (entry, problem) =
                layout(vec![dir("base"), dir("pg_tblspc"), link(path, target)]).unwrap_err();
            assert_eq!(entry, path);
            assert!(
                problem.contains(&format!("is a link (to {target:?})"))
                    && problem.contains("tablespaces"),
                "{path} -> {target}: {problem}"
            );
        }
        // The two links of the example, then a file through the first:
        // refused at the first link, before anything beneath it.
        let (entry, _) = layout(vec![
            dir("pg_tblspc"),
            link("pg_tblspc/2", "/home/ops"),
            link("pg_tblspc/1", "2/../.."),
            file("pg_tblspc/1/evil", &[(0, 0, 1)]),
        ])
        .unwrap_err();
        assert_eq!(entry, "pg_tblspc/2");
        let twice = layout(vec![dir("base"), link("base", "x")]).unwrap_err();
        assert!(twice.1.contains("twice"), "{twice:?}");
    }

    #[test]
    fn parts_outside_their_piece_are_refused_not_a_panic() {
        for (parts, want) in [
            (vec![(7, 0, 1)], "in piece 7, and the index has 1 pieces"),
            (
                vec![(0, 100, 1)],
                "at 100 of 1 bytes in piece 0, which holds 100",
            ),
            (vec![(0, 1, u64::MAX)], "in piece 0, which holds 100"),
        ] {
            let (entry, problem) = layout(vec![file("base/1", &parts)]).unwrap_err();
            assert_eq!(entry, "base/1");
            assert!(problem.contains(want), "{problem}");
        }
        let mut f = file("base/1", &[(0, 0, 10)]);
        if let Entry::File { size, .. } = &mut f {
            *size = 1 << 40;
        }
        assert!(layout(vec![f]).unwrap_err().1.contains("its parts hold 10"));
        let huge = Index {
            format: INDEX_FORMAT,
            compression: Compression::default(),
            pieces: vec![piece(u64::MAX)],
            entries: vec![],
        };
        assert_eq!(huge.check_layout().unwrap_err().0, "piece 0");
    }

    #[test]
    fn small_files_share_a_piece_and_large_ones_are_split() {
        let dir = crate::fsutil::ScratchDir::new("reentry-pack-test").unwrap();
        let d = dir.path();
        fs::create_dir(d.join("base")).unwrap();
        fs::write(d.join("a"), vec![1u8; 100]).unwrap();
        fs::write(d.join("base/big"), vec![2u8; (PIECE * 2 + 5) as usize]).unwrap();
        fs::write(d.join("base/small"), vec![3u8; 10]).unwrap();
        std::os::unix::fs::symlink("/elsewhere", d.join("pg_tblspc")).unwrap();
        let Layout { entries, plans, .. } = lay_out(d, None).unwrap();
        let sizes: Vec<u64> = plans.iter().map(|p| p.len).collect();
        // a (100) with the first PIECE-100 bytes of big, then the rest of
        // big, then its tail with small.
        assert_eq!(sizes.iter().sum::<u64>(), 100 + PIECE * 2 + 5 + 10);
        assert!(sizes.iter().all(|s| *s <= PIECE), "{sizes:?}");
        for e in &entries {
            if let Entry::File { size, parts, .. } = e {
                assert_eq!(parts.iter().map(|p| p.len).sum::<u64>(), *size);
            }
        }
        assert!(entries
            .iter()
            .any(|e| matches!(e, Entry::Link { target, .. } if target == "/elsewhere")));
    }
}
