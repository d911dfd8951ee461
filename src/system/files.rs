//! File operations for a program running as root: it writes, deletes and reads only what is
//! provably its own, and no read grows without bound.
//!
//! Paths are never handed to the kernel whole. Each directory is opened with `O_NOFOLLOW`
//! relative to its already checked parent, so a symlink or a directory someone else controls
//! anywhere on the way is seen and refused instead of followed. Files are then created, renamed
//! and removed relative to the checked directory's descriptor (`openat`, `renameat`,
//! `unlinkat`), so swapping a path component afterwards changes nothing.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, readlinkat, renameat};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstat, fstatat, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};

/// Largest config file read: far above any real one, far below a memory problem.
pub const CONFIG_LIMIT: u64 = 4 << 20;
/// Largest state file read.
pub const STATE_LIMIT: u64 = 4 << 20;
/// Largest `/proc` or `/sys` file read.
pub const PROC_LIMIT: u64 = 64 << 10;
/// Symbolic links followed while resolving one path, as the kernel's own limit.
const MAX_SYMLINKS: usize = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileErrorKind {
    /// The file or a directory on its path does not exist.
    Missing,
    /// It exists but is not something root may act on (a symlink, another user's directory,
    /// a FIFO, too large).
    Refused,
    /// Any other failure of a system call.
    Io,
}

/// What went wrong with a path, as one line: `PATH: problem`.
#[derive(Debug)]
pub struct FileError {
    pub path: PathBuf,
    pub kind: FileErrorKind,
    pub problem: String,
}

impl FileError {
    fn refused(path: &Path, problem: impl Into<String>) -> FileError {
        FileError {
            path: path.to_path_buf(),
            kind: FileErrorKind::Refused,
            problem: problem.into(),
        }
    }

    fn io(path: &Path, what: &str, errno: Errno) -> FileError {
        let kind = match errno {
            Errno::ENOENT => FileErrorKind::Missing,
            _ => FileErrorKind::Io,
        };
        FileError {
            path: path.to_path_buf(),
            kind,
            problem: format!("{what}: {}", std::io::Error::from(errno)),
        }
    }

    fn from_io(path: &Path, what: &str, e: std::io::Error) -> FileError {
        match e.raw_os_error() {
            Some(code) => FileError::io(path, what, Errno::from_raw(code)),
            None => FileError {
                path: path.to_path_buf(),
                kind: FileErrorKind::Io,
                problem: format!("{what}: {e}"),
            },
        }
    }

    pub fn not_found(&self) -> bool {
        self.kind == FileErrorKind::Missing
    }
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.problem)
    }
}

impl std::error::Error for FileError {}

type Result<T> = std::result::Result<T, FileError>;

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

fn describe_type(st: &FileStat) -> &'static str {
    match file_type(st) {
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFLNK => "a symbolic link",
        SFlag::S_IFIFO => "a FIFO",
        SFlag::S_IFSOCK => "a socket",
        SFlag::S_IFCHR => "a character device",
        SFlag::S_IFBLK => "a block device",
        _ => "a regular file",
    }
}

/// Whether only root or the caller can change what the directory `st` holds: owned by one of
/// them, and writable by no one else unless sticky (in a sticky directory like `/tmp` others
/// cannot rename or remove entries they do not own, and the next component's owner is checked
/// in turn).
fn check_directory(shown: &Path, st: &FileStat, whole: &Path) -> Result<()> {
    let owner = st.st_uid;
    if owner != 0 && owner != euid() {
        return Err(FileError::refused(
            whole,
            format!(
                "directory {} is owned by uid {owner}, not by root; another user could swap what is in it",
                shown.display()
            ),
        ));
    }
    let sticky = st.st_mode & 0o1000 != 0;
    if st.st_mode & 0o022 != 0 && !sticky {
        return Err(FileError::refused(
            whole,
            format!(
                "directory {} is writable by other users (mode {:o}); another user could swap what is in it",
                shown.display(),
                st.st_mode & 0o7777
            ),
        ));
    }
    Ok(())
}

/// What the last component of a walked path must be.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Last {
    /// A real directory (not a symlink to one), created with the mode when missing.
    Directory { create: Option<u32> },
    /// A regular file, reached through trusted symlinks if need be.
    File,
}

enum Walked {
    Directory { fd: OwnedFd, created: bool },
    File(File),
}

fn open_directory_at(
    parent: &OwnedFd,
    name: &OsStr,
    shown: &Path,
    whole: &Path,
) -> Result<OwnedFd> {
    let fd = openat(
        parent,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::ELOOP => FileError::refused(
            whole,
            format!(
                "{} is a symbolic link; refusing to follow it",
                shown.display()
            ),
        ),
        Errno::ENOTDIR => {
            FileError::refused(whole, format!("{} is not a directory", shown.display()))
        }
        e => FileError::io(whole, &format!("cannot open {}", shown.display()), e),
    })?;
    let st = fstat(&fd).map_err(|e| FileError::io(whole, "cannot inspect it", e))?;
    check_directory(shown, &st, whole)?;
    Ok(fd)
}

/// Resolves `path` one component at a time from `/`, checking every directory on the way.
fn walk(path: &Path, last: Last) -> Result<Walked> {
    if !path.is_absolute() {
        return Err(FileError::refused(path, "is not an absolute path"));
    }
    let root = openat(
        nix::fcntl::AT_FDCWD,
        "/",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| FileError::io(path, "cannot open /", e))?;
    let st = fstat(&root).map_err(|e| FileError::io(path, "cannot inspect /", e))?;
    check_directory(Path::new("/"), &st, path)?;

    // The directories walked so far, so that `..` (in a symlink's target) goes back to one
    // that was already checked.
    let mut stack: Vec<(OwnedFd, PathBuf)> = vec![(root, PathBuf::from("/"))];
    let mut pending: VecDeque<OsString> = components(path);
    let mut symlinks = 0;
    let mut created = false;

    while let Some(name) = pending.pop_front() {
        let is_last = pending.is_empty();
        if name == ".." {
            if stack.len() > 1 {
                stack.pop();
            }
            if is_last {
                return Err(FileError::refused(path, "ends in \"..\""));
            }
            continue;
        }
        let (parent, parent_shown) = stack.last().expect("the root stays on the stack");
        let shown = parent_shown.join(&name);
        let st = match fstatat(parent, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Some(st),
            Err(Errno::ENOENT) => None,
            Err(e) => {
                return Err(FileError::io(
                    path,
                    &format!("cannot inspect {}", shown.display()),
                    e,
                ));
            }
        };
        let st = match st {
            Some(st) => st,
            None => match last {
                Last::Directory { create: Some(mode) } => {
                    match mkdirat(parent, name.as_os_str(), Mode::from_bits_truncate(mode)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => {
                            return Err(FileError::io(
                                path,
                                &format!("cannot create {}", shown.display()),
                                e,
                            ));
                        }
                    }
                    let fd = open_directory_at(parent, &name, &shown, path)?;
                    // The umask may have narrowed the mode.
                    fchmod(&fd, Mode::from_bits_truncate(mode))
                        .map_err(|e| FileError::io(path, "cannot set its mode", e))?;
                    created = is_last;
                    stack.push((fd, shown));
                    continue;
                }
                _ => {
                    return Err(FileError::io(
                        path,
                        &if is_last {
                            "cannot read it".to_string()
                        } else {
                            format!("cannot read it ({} is missing)", shown.display())
                        },
                        Errno::ENOENT,
                    ));
                }
            },
        };
        match file_type(&st) {
            SFlag::S_IFLNK => {
                if is_last && matches!(last, Last::Directory { .. }) {
                    return Err(FileError::refused(
                        path,
                        "is a symbolic link; refusing to write through it",
                    ));
                }
                // The directory holding it is checked, so only its owner could have made it.
                if st.st_uid != 0 && st.st_uid != euid() {
                    return Err(FileError::refused(
                        path,
                        format!(
                            "symbolic link {} is owned by uid {}, not by root; another user could point it elsewhere",
                            shown.display(),
                            st.st_uid
                        ),
                    ));
                }
                symlinks += 1;
                if symlinks > MAX_SYMLINKS {
                    return Err(FileError::refused(path, "has too many symbolic links"));
                }
                let target = readlinkat(parent, name.as_os_str()).map_err(|e| {
                    FileError::io(path, &format!("cannot read link {}", shown.display()), e)
                })?;
                let target = PathBuf::from(target);
                if target.is_absolute() {
                    stack.truncate(1);
                }
                for component in components(&target).into_iter().rev() {
                    pending.push_front(component);
                }
            }
            SFlag::S_IFDIR => {
                let fd = open_directory_at(parent, &name, &shown, path)?;
                if is_last && last == Last::File {
                    return Err(FileError::refused(
                        path,
                        "is a directory, not a regular file",
                    ));
                }
                stack.push((fd, shown));
            }
            _ if !is_last => {
                return Err(FileError::refused(
                    path,
                    format!("{} is not a directory", shown.display()),
                ));
            }
            _ if last == Last::File => {
                if file_type(&st) != SFlag::S_IFREG {
                    return Err(FileError::refused(
                        path,
                        format!("is {}, not a regular file", describe_type(&st)),
                    ));
                }
                let fd = openat(
                    parent,
                    name.as_os_str(),
                    OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| FileError::io(path, "cannot read it", e))?;
                return Ok(Walked::File(File::from(fd)));
            }
            _ => {
                return Err(FileError::refused(
                    path,
                    format!("is {}, not a directory", describe_type(&st)),
                ));
            }
        }
    }
    if last == Last::File {
        return Err(FileError::refused(
            path,
            "is a directory, not a regular file",
        ));
    }
    let (fd, _) = stack.pop().expect("the root stays on the stack");
    Ok(Walked::Directory { fd, created })
}

fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

/// Opens a file that must not be swappable by another user (a key file), as ssh checks its
/// keys: every directory on the path owned by root or the caller and writable by no one else
/// (sticky directories excepted), symbolic links followed only when root or the caller owns
/// them, and the file itself a regular file. The caller checks the file's own owner and mode
/// on the returned descriptor.
pub fn open_trusted(path: &Path) -> Result<File> {
    match walk(path, Last::File)? {
        Walked::File(file) => Ok(file),
        Walked::Directory { .. } => unreachable!("walk returns a file for Last::File"),
    }
}

/// A file read by [`read_secret`], with a warning for the user when everyone may read it.
pub struct SecretFile {
    pub bytes: Vec<u8>,
    pub warning: Option<String>,
}

/// Reads a file whose contents are secret or steer what root does (a key file, a provider's
/// wg-quick file): opened as [`open_trusted`] does, then refused unless owned by the caller and
/// writable by no one else, and refused when larger than `limit`. The checks and the read use
/// one descriptor, so the file cannot be swapped in between. `what` names the kind of file in
/// messages, which never quote the contents.
pub fn read_secret(path: &Path, what: &str, limit: u64) -> Result<SecretFile> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let file = open_trusted(path)?;
    let meta = file
        .metadata()
        .map_err(|e| FileError::from_io(path, "cannot read it", e))?;
    if meta.uid() != euid() {
        return Err(FileError::refused(
            path,
            format!(
                "is owned by uid {}, not by uid {} who runs wg-namespace; another user could swap the {what}",
                meta.uid(),
                euid()
            ),
        ));
    }
    let mode = meta.permissions().mode();
    if mode & 0o022 != 0 {
        return Err(FileError::refused(
            path,
            format!(
                "is writable by other users (mode {:o}); chmod 600 it",
                mode & 0o777
            ),
        ));
    }
    let warning = (mode & 0o004 != 0).then(|| {
        format!(
            "{} is readable by every user (mode {:o}); chmod 600 it",
            path.display(),
            mode & 0o777
        )
    });
    let bytes = read_bounded(file, path, limit)?;
    Ok(SecretFile { bytes, warning })
}

/// Reads a whole file that is input, not ours (a config file, a `/proc` file): opened without
/// blocking, so that a FIFO cannot stall us, refused unless it is a regular file, and refused
/// when it holds more than `limit` bytes.
pub fn read_regular(path: &Path, limit: u64) -> Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| FileError::from_io(path, "cannot read it", e))?;
    read_bounded(file, path, limit)
}

/// [`read_regular`] for text: invalid UTF-8 is refused too.
pub fn read_text(path: &Path, limit: u64) -> Result<String> {
    String::from_utf8(read_regular(path, limit)?)
        .map_err(|_| FileError::refused(path, "is not UTF-8 text"))
}

/// Reads an open file, refusing anything but a regular file of at most `limit` bytes.
fn read_bounded(file: File, path: &Path, limit: u64) -> Result<Vec<u8>> {
    let st = fstat(&file).map_err(|e| FileError::io(path, "cannot inspect it", e))?;
    if file_type(&st) != SFlag::S_IFREG {
        return Err(FileError::refused(
            path,
            format!("is {}, not a regular file", describe_type(&st)),
        ));
    }
    let too_large = || FileError::refused(path, format!("is larger than {limit} bytes"));
    if st.st_size as u64 > limit {
        return Err(too_large());
    }
    // Room for the whole file and the read that finds its end, so that it takes two reads,
    // not a dozen growing ones. `/proc` files say size 0, so the read itself is bounded too.
    let mut bytes = Vec::with_capacity(st.st_size as usize + 1);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| FileError::from_io(path, "cannot read it", e))?;
    if bytes.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(bytes)
}

/// Which file a name held: its device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    device: u64,
    inode: u64,
}

impl FileIdentity {
    fn of(stat: &nix::sys::stat::FileStat) -> FileIdentity {
        FileIdentity {
            device: stat.st_dev,
            inode: stat.st_ino,
        }
    }
}

/// A directory root may write in, opened and checked once; everything in it is then made,
/// read and removed relative to this descriptor.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
    created: bool,
}

impl Dir {
    /// Opens the existing directory `path` (see the module comment for what is checked).
    pub fn open(path: &Path) -> Result<Dir> {
        Dir::walk(path, None)
    }

    /// Opens `path`, creating it and any missing directory on the way with `mode`.
    pub fn create(path: &Path, mode: u32) -> Result<Dir> {
        Dir::walk(path, Some(mode))
    }

    fn walk(path: &Path, create: Option<u32>) -> Result<Dir> {
        match walk(path, Last::Directory { create })? {
            Walked::Directory { fd, created } => Ok(Dir {
                fd,
                path: path.to_path_buf(),
                created,
            }),
            Walked::File(_) => unreachable!("walk returns a directory for Last::Directory"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether [`Dir::create`] made the directory itself just now.
    pub fn created(&self) -> bool {
        self.created
    }

    fn shown(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// A plain name inside this directory: no `/`, not `.` or `..`.
    fn check_name<'n>(&self, name: &'n str) -> Result<&'n str> {
        if name.is_empty() || name == "." || name == ".." || name.contains('/') {
            return Err(FileError::refused(
                &self.path,
                format!("{name:?} is not a plain file name"),
            ));
        }
        Ok(name)
    }

    /// The directory `name` inside this one, checked like every directory.
    pub fn subdir(&self, name: &str) -> Result<Dir> {
        let name = self.check_name(name)?;
        let shown = self.shown(name);
        let fd = open_directory_at(&self.fd, OsStr::new(name), &shown, &shown)?;
        Ok(Dir {
            fd,
            path: shown,
            created: false,
        })
    }

    /// Sets the directory's own mode.
    pub fn set_mode(&self, mode: u32) -> Result<()> {
        fchmod(&self.fd, Mode::from_bits_truncate(mode))
            .map_err(|e| FileError::io(&self.path, "cannot set its mode", e))
    }

    /// Replaces `name` with `bytes` atomically, with `mode`: written to `.NAME.tmp` (made anew
    /// with `O_EXCL`, so never through a symlink planted there), synced to disk, then renamed
    /// over `name` (which replaces a symlink at `name` rather than following it).
    pub fn write_atomically(&self, name: &str, bytes: &[u8], mode: u32) -> Result<()> {
        self.replace(name, bytes, mode, true)
    }

    /// [`Dir::write_atomically`] without waiting for the disk (each sync costs a device flush
    /// where the directory is not on tmpfs), for files that every `up` writes anew and that
    /// serve only a namespace, which no reboot keeps: a power cut can leave such a file
    /// empty, never half replaced while anyone reads it.
    pub fn write_atomically_unsynced(&self, name: &str, bytes: &[u8], mode: u32) -> Result<()> {
        self.replace(name, bytes, mode, false)
    }

    fn replace(&self, name: &str, bytes: &[u8], mode: u32, sync: bool) -> Result<()> {
        let name = self.check_name(name)?;
        let tmp = format!(".{name}.tmp");
        let shown = self.shown(name);
        self.remove_file(&tmp)?;
        let fd = openat(
            &self.fd,
            tmp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(mode),
        )
        .map_err(|e| FileError::io(&shown, "cannot write it", e))?;
        let result = (|| -> std::io::Result<()> {
            let mut file = File::from(fd);
            // The umask may have narrowed the mode given at creation.
            fchmod(file.as_fd(), Mode::from_bits_truncate(mode))?;
            file.write_all(bytes)?;
            if sync {
                file.sync_all()?;
            }
            renameat(&self.fd, tmp.as_str(), &self.fd, name)?;
            Ok(())
        })();
        result.map_err(|e| {
            let _ = unlinkat(&self.fd, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
            FileError::from_io(&shown, "cannot write it", e)
        })
    }

    /// Opens (creating, mode 0600) the lock file `name`: never through a symlink, and only a
    /// regular file owned by the caller.
    pub fn open_lock(&self, name: &str) -> Result<File> {
        let name = self.check_name(name)?;
        let shown = self.shown(name);
        let fd = openat(
            &self.fd,
            name,
            OFlag::O_RDWR
                | OFlag::O_CREAT
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| match e {
            Errno::ELOOP => FileError::refused(&shown, "is a symbolic link; refusing to follow it"),
            e => FileError::io(&shown, "cannot open it", e),
        })?;
        let st = fstat(&fd).map_err(|e| FileError::io(&shown, "cannot inspect it", e))?;
        if file_type(&st) != SFlag::S_IFREG {
            return Err(FileError::refused(
                &shown,
                format!("is {}, not a regular file", describe_type(&st)),
            ));
        }
        if st.st_uid != euid() {
            return Err(FileError::refused(
                &shown,
                format!("is owned by uid {}, not by uid {}", st.st_uid, euid()),
            ));
        }
        Ok(File::from(fd))
    }

    /// Reads `name` whole; `None` when it does not exist. Symlinks and anything but a regular
    /// file of at most `limit` bytes are refused.
    pub fn read(&self, name: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        let name = self.check_name(name)?;
        let shown = self.shown(name);
        let fd = match openat(
            &self.fd,
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(Errno::ELOOP) => {
                return Err(FileError::refused(
                    &shown,
                    "is a symbolic link; refusing to follow it",
                ));
            }
            Err(e) => return Err(FileError::io(&shown, "cannot read it", e)),
        };
        read_bounded(File::from(fd), &shown, limit).map(Some)
    }

    /// Removes the file (or symlink: never what it points to) `name`; missing is fine.
    pub fn remove_file(&self, name: &str) -> Result<()> {
        let name = self.check_name(name)?;
        match unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(FileError::io(&self.shown(name), "cannot remove it", e)),
        }
    }

    /// Removes the empty directory `name`; missing is fine, not empty is an error.
    pub fn remove_dir(&self, name: &str) -> Result<()> {
        let name = self.check_name(name)?;
        match unlinkat(&self.fd, name, UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(FileError::io(&self.shown(name), "cannot remove it", e)),
        }
    }

    /// The names in the directory (UTF-8 ones only), unsorted.
    pub fn names(&self) -> Result<Vec<String>> {
        use std::os::fd::AsRawFd;
        // The descriptor's own entry in /proc reads exactly the directory we checked.
        let entries = std::fs::read_dir(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
            .map_err(|e| FileError::from_io(&self.path, "cannot list it", e))?;
        Ok(entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect())
    }

    /// Binds a listening unix socket at `name` with `mode`, owned by root and `group`: bound
    /// under a temporary name (through this directory's descriptor, never a path someone could
    /// swap), given its owner and mode, then renamed over `name`, replacing a stale socket (or
    /// anything else) there in one step. Returns the listener and the socket file's identity,
    /// taken before it got its name, for [`Dir::remove_if_still`].
    pub fn bind_socket(
        &self,
        name: &str,
        mode: u32,
        group: Option<u32>,
    ) -> Result<(std::os::unix::net::UnixListener, FileIdentity)> {
        use std::os::fd::AsRawFd;
        let name = self.check_name(name)?;
        let tmp = format!(".{name}.{}.tmp", std::process::id());
        let shown = self.shown(name);
        self.remove_file(&tmp)?;
        let through_fd = format!("/proc/self/fd/{}/{tmp}", self.fd.as_raw_fd());
        let listener = std::os::unix::net::UnixListener::bind(&through_fd)
            .map_err(|e| FileError::from_io(&shown, "cannot bind it", e))?;
        let result = (|| -> nix::Result<FileIdentity> {
            nix::unistd::fchownat(
                &self.fd,
                tmp.as_str(),
                Some(nix::unistd::Uid::from_raw(0)),
                group.map(nix::unistd::Gid::from_raw),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )?;
            // The socket was just made here, in a directory only root writes: the name is it.
            nix::sys::stat::fchmodat(
                &self.fd,
                tmp.as_str(),
                Mode::from_bits_truncate(mode),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )?;
            let made = fstatat(&self.fd, tmp.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW)?;
            renameat(&self.fd, tmp.as_str(), &self.fd, name)?;
            Ok(FileIdentity::of(&made))
        })();
        let identity = result.map_err(|e| {
            let _ = unlinkat(&self.fd, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
            FileError::io(&shown, "cannot put the socket in place", e)
        })?;
        Ok((listener, identity))
    }

    /// Removes `name` only while it is still the file `identity` names: what another process
    /// has put there since stays. Returns whether it removed it. Only root writes in the
    /// directories this is used in, and the name is looked at just before it is removed.
    pub fn remove_if_still(&self, name: &str, identity: FileIdentity) -> Result<bool> {
        let name = self.check_name(name)?;
        match fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(entry) if FileIdentity::of(&entry) == identity => {}
            Ok(_) | Err(Errno::ENOENT) => return Ok(false),
            Err(e) => return Err(FileError::io(&self.shown(name), "cannot inspect it", e)),
        }
        self.remove_file(name)?;
        Ok(true)
    }

    /// Whether `name` is still the very file `file` has open.
    pub fn holds(&self, name: &str, file: &File) -> bool {
        let Ok(name) = self.check_name(name) else {
            return false;
        };
        match (
            fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW),
            fstat(file),
        ) {
            (Ok(entry), Ok(held)) => entry.st_ino == held.st_ino && entry.st_dev == held.st_dev,
            _ => false,
        }
    }
}

/// `path` as an absolute path, relative ones taken from the working directory.
pub fn absolute(path: &Path) -> Result<PathBuf> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    let cwd = std::env::current_dir()
        .map_err(|e| FileError::from_io(path, "cannot find the working directory", e))?;
    Ok(cwd.join(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain() {
        let dir = Dir::open(Path::new("/")).unwrap();
        for bad in ["", ".", "..", "a/b"] {
            assert!(dir.check_name(bad).is_err(), "{bad:?}");
        }
        assert!(dir.check_name(".x.tmp").is_ok());
    }

    #[test]
    fn fifos_and_devices_are_refused_without_blocking() {
        let e = read_regular(Path::new("/dev/zero"), 16).unwrap_err();
        assert_eq!(e.kind, FileErrorKind::Refused, "{e}");
        assert!(e.to_string().contains("character device"), "{e}");
    }

    #[test]
    fn proc_files_are_read_with_a_bound() {
        let stat = read_regular(Path::new("/proc/self/stat"), PROC_LIMIT).unwrap();
        assert!(!stat.is_empty());
        let e = read_regular(Path::new("/proc/self/stat"), 4).unwrap_err();
        assert!(e.to_string().contains("larger than 4 bytes"), "{e}");
    }
}
