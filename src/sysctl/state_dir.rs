//! The state directory, held open: a directory file descriptor reached by a walk from `/`, and
//! every file operation of the ledger relative to it.
//!
//! Checking a path and then opening it by path leaves a window: whoever can write a parent
//! directory can swap the checked directory for their own in between (`renameat2` with
//! `RENAME_EXCHANGE` does it atomically), and the ledger read afterwards, whose entries a
//! restore writes to the kernel as root, is theirs. So, as sshd's `StrictModes` does for
//! `authorized_keys`, [`StateDir::open`] walks the path one component at a time from `/` with
//! `openat(O_NOFOLLOW | O_DIRECTORY)`, checking each directory it opened (not the name), and keeps
//! the last one open. Every directory on the way must be owned by root or this process's user,
//! and writable by nobody else: not by others, and by a group only when it is root's group (a
//! umask of 002 makes such directories). A sticky directory (`/tmp`) may be writable by anyone:
//! the sticky bit stops others renaming or removing what they do not own, and the next
//! component, which is checked for its owner in turn, is not theirs. The state directory itself
//! must be owned by this process's user. After that the path is only a name for messages.
//!
//! `rustix` makes these calls (`openat`, `renameat`, `unlinkat`, `fstat`, ...) without `unsafe`
//! in this crate, which denies it; `std` has no `*at` calls, and `libc` would need an `unsafe`
//! block for each.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, CWD, Dir, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;

use super::ledger::LedgerError;

/// A state directory that passed the walk, held open by a file descriptor.
#[derive(Debug)]
pub struct StateDir {
    fd: OwnedFd,
    path: PathBuf,
}

/// Mode of the directories and files nodetune creates: its user's alone.
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

impl StateDir {
    /// Walks `path` from `/` (a relative path is taken from the current directory), creating
    /// missing directories with mode 0700, and refuses a symlink anywhere on the way or a
    /// directory someone else could change (see the module docs).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LedgerError> {
        let given = path.as_ref();
        let abs = std::path::absolute(given).map_err(|source| LedgerError::Io {
            action: "resolve",
            path: given.to_owned(),
            source,
        })?;
        let names = components(&abs)?;
        let mut at = PathBuf::from("/");
        let root_flags = if names.is_empty() {
            OFlags::RDONLY
        } else {
            OFlags::PATH
        };
        let mut fd = open_dir(CWD, OsStr::new("/"), &at, root_flags)?;
        check_parent(&stat(&fd, &at)?, &at, &abs)?;
        for (i, name) in names.iter().enumerate() {
            let last = i + 1 == names.len();
            at.push(name);
            let flags = if last { OFlags::RDONLY } else { OFlags::PATH };
            let next = open_or_create_dir(&fd, name, &at, flags)?;
            let st = stat(&next, &at)?;
            if last {
                check_state_dir(&st, &at)?;
            } else {
                check_parent(&st, &at, &abs)?;
            }
            fd = next;
        }
        Ok(Self { fd, path: abs })
    }

    /// Checks the held directory's own owner and mode again (they may have changed since the
    /// walk; its parents no longer matter, since nothing is reached through them any more).
    pub fn recheck(&self) -> Result<(), LedgerError> {
        check_state_dir(&stat(&self.fd, &self.path)?, &self.path)
    }

    /// The directory's path, for messages (the directory is reached through the descriptor).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `name` inside the directory, for messages.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// A second handle on the same directory (the same descriptor, duplicated).
    pub fn try_clone(&self) -> Result<Self, LedgerError> {
        let fd = self.fd.try_clone().map_err(|source| LedgerError::Io {
            action: "duplicate the descriptor of",
            path: self.path.clone(),
            source,
        })?;
        Ok(Self {
            fd,
            path: self.path.clone(),
        })
    }

    /// Opens `name` for reading without following a symlink or blocking on a FIFO.
    pub fn open_read(&self, name: &str) -> io::Result<File> {
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        Ok(rustix::fs::openat(&self.fd, name, flags, Mode::empty())?.into())
    }

    /// Opens (creating it, mode 0600) `name` read-write without following a symlink.
    pub fn open_or_create(&self, name: &str) -> io::Result<File> {
        let flags =
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        Ok(rustix::fs::openat(&self.fd, name, flags, Mode::from(FILE_MODE))?.into())
    }

    /// Creates `name` afresh (mode 0600) with `O_EXCL | O_NOFOLLOW`: it can never follow a link
    /// nor open what someone planted.
    pub fn create_new(&self, name: &str) -> io::Result<File> {
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        Ok(rustix::fs::openat(&self.fd, name, flags, Mode::from(FILE_MODE))?.into())
    }

    /// Removes the file `name` (a symlink itself, never its target).
    pub fn remove(&self, name: &str) -> io::Result<()> {
        Ok(rustix::fs::unlinkat(&self.fd, name, AtFlags::empty())?)
    }

    /// Renames `from` to `to`, both inside the directory.
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        Ok(rustix::fs::renameat(&self.fd, from, &self.fd, to)?)
    }

    /// Whether anything (a symlink included) is called `name`.
    pub fn contains(&self, name: &str) -> bool {
        rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW).is_ok()
    }

    /// Flushes the directory's entries (after a rename or create) to disk.
    pub fn sync(&self) -> io::Result<()> {
        Ok(rustix::fs::fsync(&self.fd)?)
    }

    /// The names in the directory (`.` and `..` left out; names that are not UTF-8 too, since
    /// nodetune never writes one).
    pub fn names(&self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for entry in Dir::read_from(&self.fd)? {
            if let Ok(name) = entry?.file_name().to_str()
                && name != "."
                && name != ".."
            {
                out.push(name.to_owned());
            }
        }
        Ok(out)
    }
}

/// The normal components of an absolute path; `..` is refused (a walk that climbs back out is
/// not the path a person reads).
fn components(abs: &Path) -> Result<Vec<&OsStr>, LedgerError> {
    let mut out = Vec::new();
    for c in abs.components() {
        match c {
            Component::Normal(name) => out.push(name),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(unsafe_dir(
                    abs,
                    "it contains `..`; give the directory's path without it".into(),
                ));
            }
        }
    }
    Ok(out)
}

fn open_dir(
    parent: impl rustix::fd::AsFd,
    name: &OsStr,
    at: &Path,
    flags: OFlags,
) -> Result<OwnedFd, LedgerError> {
    let flags = flags | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    rustix::fs::openat(parent, name, flags, Mode::empty()).map_err(|e| LedgerError::Io {
        action: "open",
        path: at.to_owned(),
        source: e.into(),
    })
}

/// Opens the directory `name` under `parent`, creating it (mode 0700) when it is missing. A
/// symlink or another kind of file there is refused by name.
fn open_or_create_dir(
    parent: &OwnedFd,
    name: &OsStr,
    at: &Path,
    flags: OFlags,
) -> Result<OwnedFd, LedgerError> {
    let open = |flags| {
        let flags = flags | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        rustix::fs::openat(parent, name, flags, Mode::empty())
    };
    let result = match open(flags) {
        Err(Errno::NOENT) => match rustix::fs::mkdirat(parent, name, Mode::from(DIR_MODE)) {
            Ok(()) | Err(Errno::EXIST) => open(flags),
            Err(e) => {
                return Err(LedgerError::Io {
                    action: "create",
                    path: at.to_owned(),
                    source: e.into(),
                });
            }
        },
        other => other,
    };
    result.map_err(
        |e| match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => unsafe_dir(
                at,
                "it is a symlink; give the real directory instead".into(),
            ),
            Ok(st) if !FileType::from_raw_mode(st.st_mode).is_dir() => {
                unsafe_dir(at, "it is not a directory".into())
            }
            _ => LedgerError::Io {
                action: "open",
                path: at.to_owned(),
                source: e.into(),
            },
        },
    )
}

fn stat(fd: &OwnedFd, at: &Path) -> Result<Stat, LedgerError> {
    let st = rustix::fs::fstat(fd).map_err(|e| LedgerError::Io {
        action: "inspect",
        path: at.to_owned(),
        source: e.into(),
    })?;
    if !FileType::from_raw_mode(st.st_mode).is_dir() {
        return Err(unsafe_dir(at, "it is not a directory".into()));
    }
    Ok(st)
}

fn unsafe_dir(path: &Path, reason: String) -> LedgerError {
    LedgerError::UnsafeStateDir {
        path: path.to_owned(),
        reason,
    }
}

/// A directory on the way to the state directory: owned by root or this process's user, and
/// writable by no one else unless sticky (see the module docs).
fn check_parent(st: &Stat, at: &Path, state: &Path) -> Result<(), LedgerError> {
    let euid = effective_uid();
    if st.st_uid != 0 && st.st_uid != euid {
        return Err(unsafe_dir(
            at,
            format!(
                "it leads to the state directory {} but is owned by uid {}, who could swap the \
                 state directory; only root or uid {euid} may own its parents",
                state.display(),
                st.st_uid
            ),
        ));
    }
    let mode = st.st_mode & 0o7777;
    let others_write = mode & 0o002 != 0 || (mode & 0o020 != 0 && st.st_gid != 0);
    if others_write && mode & 0o1000 == 0 {
        let who = if mode & 0o002 != 0 {
            "others".to_owned()
        } else {
            format!("group {}", st.st_gid)
        };
        return Err(unsafe_dir(
            at,
            format!(
                "it leads to the state directory {} but is writable by {who} (mode {mode:04o}) \
                 without the sticky bit, so another user could swap the state directory for \
                 their own; chmod go-w it, or choose a state directory whose parents only root \
                 can write",
                state.display(),
            ),
        ));
    }
    Ok(())
}

/// The state directory itself: this process's user's, writable by no one else.
fn check_state_dir(st: &Stat, at: &Path) -> Result<(), LedgerError> {
    let euid = effective_uid();
    if st.st_uid != euid {
        return Err(unsafe_dir(
            at,
            format!(
                "it is owned by uid {}, not by this process's uid {euid}",
                st.st_uid
            ),
        ));
    }
    // Group write is fine only for the root group (a umask of 002 makes such directories).
    let mode = st.st_mode & 0o7777;
    if mode & 0o002 != 0 || (mode & 0o020 != 0 && st.st_gid != 0) {
        return Err(unsafe_dir(
            at,
            format!(
                "it is writable by group {} or others (mode {mode:04o}); chmod go-w it",
                st.st_gid
            ),
        ));
    }
    Ok(())
}

/// This process's effective uid.
pub fn effective_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_dot_is_refused_before_anything_is_created() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("a").join("..").join("state");
        let err = StateDir::open(&path).expect_err("refused");
        assert!(err.to_string().contains("`..`"), "{err}");
        assert!(!tmp.path().join("a").exists());
    }

    #[test]
    fn files_are_reached_through_the_descriptor() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = StateDir::open(tmp.path().join("s")).expect("open");
        dir.create_new("f").expect("create");
        assert!(dir.create_new("f").is_err(), "O_EXCL");
        dir.rename("f", "g").expect("rename");
        assert_eq!(dir.names().expect("names"), ["g"]);
        // Moved elsewhere, the directory is still the one held.
        std::fs::rename(tmp.path().join("s"), tmp.path().join("t")).expect("mv");
        assert!(dir.contains("g"));
        dir.remove("g").expect("remove");
        assert!(!tmp.path().join("t").join("g").exists());
    }

    #[test]
    fn a_held_directory_opened_to_others_later_is_refused_on_the_next_load() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = StateDir::open(tmp.path().join("s")).expect("open");
        dir.recheck().expect("fine as created");
        let perms = std::fs::Permissions::from_mode(0o777);
        std::fs::set_permissions(tmp.path().join("s"), perms).expect("chmod");
        let err = crate::sysctl::Ledger::load_in(dir).expect_err("refused");
        assert!(err.to_string().contains("mode 0777"), "{err}");
    }
}
