//! Durable file-system primitives: everything the repository writes goes
//! through a temporary file, fsync, an atomic link or rename, and an fsync of
//! the directory, so that a crash leaves either the old state or the new one.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Prefix of every temporary file the tool creates; `wal verify` and friends
/// skip (and may report) files that carry it.
pub const TEMP_PREFIX: &str = ".reentry-tmp.";

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and any missing parents, fsyncing each parent whose entries
/// changed so the new directories survive a crash.
pub fn create_dir_all_durable(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_all_durable(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        // Another process won the race; the directory is what we wanted.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(e),
    }
    match dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

/// Creates `dir` and any missing parents, the ones it creates 0700
/// whatever the umask: what goes in them is the operator's alone.
pub fn create_private_dir_all(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Creates the directory `path` (which must not exist) 0700: scratch
/// space may hold decrypted data.
fn private_dir(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new().mode(0o700).create(path)
}

/// Creates `path` (which must not exist) 0600 with `bytes`, durably.
pub fn write_private_new(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut f = private_options().create_new(true).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Opens `path` for appending, creating it 0600 if it is new.
pub fn open_private_append(path: &Path) -> io::Result<File> {
    private_options().create(true).append(true).open(path)
}

/// Write-only options that create files 0600 whatever the umask.
pub fn private_options() -> fs::OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = fs::OpenOptions::new();
    o.write(true).mode(0o600);
    o
}

/// A secret's file, as ssh reads its keys.
#[derive(Debug)]
pub enum SecretFile {
    Io(io::Error),
    /// Its group or others may read or write it: its mode.
    Exposed(u32),
}

/// The text of the secret at `path`, refused when anyone but its owner
/// may read or write it.
pub fn read_secret(path: &Path) -> Result<String, SecretFile> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let mut file = File::open(path).map_err(SecretFile::Io)?;
    let mode = file
        .metadata()
        .map_err(SecretFile::Io)?
        .permissions()
        .mode()
        & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SecretFile::Exposed(mode));
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(SecretFile::Io)?;
    Ok(text)
}

/// A name beside `target` that no other process or thread will pick.
pub fn temp_path_beside(target: &Path) -> PathBuf {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let base = target
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("file");
    let name = format!(
        "{TEMP_PREFIX}{base}.{}.{nanos}.{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    target.with_file_name(name)
}

/// Publishes the fully written and fsynced `tmp` as `target` unless `target`
/// exists. Returns `false` when it does, leaving `target` untouched and `tmp`
/// in place for the caller: unlike `rename`, a hard link never replaces what
/// another writer published.
pub fn publish_no_replace(tmp: &Path, target: &Path) -> io::Result<bool> {
    match fs::hard_link(tmp, target) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(e),
    }
    fs::remove_file(tmp)?;
    if let Some(dir) = target.parent() {
        sync_dir(dir)?;
    }
    Ok(true)
}

/// Removes a temporary file on drop unless it was published.
pub struct TempGuard(pub Option<PathBuf>);

impl TempGuard {
    pub fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// Replaces `target` with `bytes` atomically and durably: readers see the
/// old content or the new, never a mix.
pub fn write_atomic(target: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_as(target, bytes, |p| File::create_new(p))
}

/// `write_atomic`, the file 0600 whatever the umask: plans, reports.
pub fn write_atomic_private(target: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_as(target, bytes, |p| {
        private_options().create_new(true).open(p)
    })
}

fn write_atomic_as(
    target: &Path,
    bytes: &[u8],
    create: impl FnOnce(&Path) -> io::Result<File>,
) -> io::Result<()> {
    use std::io::Write;
    let tmp = temp_path_beside(target);
    let _guard = TempGuard(Some(tmp.clone()));
    let mut f = create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, target)?;
    match target.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// Sum of file sizes and number of files below `dir`.
pub fn tree_size(dir: &Path) -> io::Result<(u64, u64)> {
    let (mut bytes, mut files) = (0, 0);
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            let (b, f) = tree_size(&entry.path())?;
            bytes += b;
            files += f;
        } else {
            bytes += meta.len();
            files += 1;
        }
    }
    Ok((bytes, files))
}

/// A scratch directory, removed with everything in it on drop.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn new(label: &str) -> io::Result<ScratchDir> {
        let path = temp_path_beside(&std::env::temp_dir().join(label));
        private_dir(&path)?;
        Ok(ScratchDir(path))
    }

    /// A scratch directory beside `path`: on its file system, for data
    /// on its way there.
    pub fn beside(path: &Path) -> io::Result<ScratchDir> {
        let path = temp_path_beside(path);
        private_dir(&path)?;
        Ok(ScratchDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Whether this process runs as root.
pub fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Gives `path` and everything below it to the owner of `like`.
pub fn chown_tree_like(path: &Path, like: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let owner = fs::metadata(like)?;
    chown_tree(path, owner.uid(), owner.gid())
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if fs::symlink_metadata(path)?.is_dir() {
        for entry in fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}
