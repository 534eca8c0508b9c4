//! Reading and writing sysctl files below `/proc/sys` (or another root, for tests).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::vocab::KeyState;

use super::key::SysctlKey;

/// Where sysctls live on Linux.
pub const DEFAULT_ROOT: &str = "/proc/sys";

/// A read or write of one sysctl failed. Each variant maps to a [`KeyState`] via
/// [`SysctlIoError::state`].
#[derive(Debug, thiserror::Error)]
pub enum SysctlIoError {
    /// The running kernel has no such key (ENOENT, ENOTDIR).
    #[error("the running kernel has no sysctl {key}")]
    NotFound {
        /// Canonical key.
        key: String,
    },
    /// The kernel rejected the value (EINVAL, ERANGE), or the key names a directory.
    #[error("the kernel rejected {op} of {key}: {source}")]
    Invalid {
        /// Canonical key.
        key: String,
        /// `"a read"` or `"the value"`.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// Not permitted (EPERM, EACCES, EROFS): missing privilege, a read-only key, a read-only
    /// `/proc/sys` mount, or a key another namespace owns.
    #[error("not permitted to {op} {key}: {source}")]
    Denied {
        /// Canonical key.
        key: String,
        /// `"read"` or `"write"`.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// Any other failure (other errno, a short write, a value that is not UTF-8).
    #[error("could not {op} {key}: {message}")]
    Failed {
        /// Canonical key.
        key: String,
        /// `"read"` or `"write"`.
        op: &'static str,
        /// What went wrong.
        message: String,
    },
}

impl SysctlIoError {
    /// The per-key state this error stands for.
    pub fn state(&self) -> KeyState {
        match self {
            Self::NotFound { .. } => KeyState::Unsupported,
            Self::Invalid { .. } => KeyState::Invalid,
            Self::Denied { .. } => KeyState::Denied,
            Self::Failed { .. } => KeyState::Failed,
        }
    }

    fn from_io(key: &SysctlKey, write: bool, err: io::Error) -> Self {
        let key = key.dotted();
        let op = if write { "write" } else { "read" };
        match err.raw_os_error() {
            Some(libc::ENOENT | libc::ENOTDIR) => Self::NotFound { key },
            Some(libc::EINVAL | libc::ERANGE | libc::EISDIR) => Self::Invalid {
                key,
                op: if write { "the value" } else { "a read" },
                source: err,
            },
            Some(libc::EPERM | libc::EACCES | libc::EROFS) => Self::Denied {
                key,
                op,
                source: err,
            },
            _ => Self::Failed {
                key,
                op,
                message: err.to_string(),
            },
        }
    }
}

/// The sysctl file system: `/proc/sys` by default, any directory tree of files in tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysctlFs {
    /// The directory keys are resolved against.
    pub root: PathBuf,
}

impl Default for SysctlFs {
    fn default() -> Self {
        Self {
            root: PathBuf::from(DEFAULT_ROOT),
        }
    }
}

impl SysctlFs {
    /// A sysctl tree rooted somewhere else than `/proc/sys` (tests, a mounted `/proc` of another
    /// namespace).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The file behind `key`.
    pub fn path_of(&self, key: &SysctlKey) -> PathBuf {
        self.root.join(Path::new(key.path()))
    }

    /// Reads the current value, without the trailing newline the kernel prints (inner tabs and
    /// spaces are kept; compare with [`super::value::same`]).
    pub fn read(&self, key: &SysctlKey) -> Result<String, SysctlIoError> {
        let mut buf = Vec::new();
        File::open(self.path_of(key))
            .and_then(|mut f| f.read_to_end(&mut buf))
            .map_err(|e| SysctlIoError::from_io(key, false, e))?;
        let mut s = String::from_utf8(buf).map_err(|_| SysctlIoError::Failed {
            key: key.dotted(),
            op: "read",
            message: "the value is not UTF-8".into(),
        })?;
        if s.ends_with('\n') {
            s.pop();
        }
        Ok(s)
    }

    /// Writes `value` the way sysctl(8) does: open the existing file write-only (never create
    /// it), then one `write(2)` of the value plus a newline. The kernel parses a sysctl write in
    /// one go, so a short write is reported as a failure rather than continued.
    pub fn write(&self, key: &SysctlKey, value: &str) -> Result<(), SysctlIoError> {
        let mut f = OpenOptions::new()
            .write(true)
            .truncate(true) // ignored by procfs; keeps plain-file test trees honest
            .custom_flags(libc::O_CLOEXEC)
            .open(self.path_of(key))
            .map_err(|e| SysctlIoError::from_io(key, true, e))?;
        let mut line = String::with_capacity(value.len() + 1);
        line.push_str(value);
        line.push('\n');
        let n = f.write(line.as_bytes()).map_err(|e| {
            // The file exists (it was just opened), so ENOENT here is the kernel refusing the
            // value (e.g. an unknown tcp_congestion_control), not a missing key.
            if e.raw_os_error() == Some(libc::ENOENT) {
                SysctlIoError::Invalid {
                    key: key.dotted(),
                    op: "the value",
                    source: e,
                }
            } else {
                SysctlIoError::from_io(key, true, e)
            }
        })?;
        if n != line.len() {
            return Err(SysctlIoError::Failed {
                key: key.dotted(),
                op: "write",
                message: format!("short write: {n} of {} bytes accepted", line.len()),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn key(s: &str) -> SysctlKey {
        SysctlKey::parse(s).unwrap()
    }

    #[test]
    fn read_write_in_a_tree() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("net/ipv4/conf/eth0.100")).unwrap();
        fs::write(dir.path().join("net/ipv4/tcp_fin_timeout"), "60\n").unwrap();
        fs::write(dir.path().join("net/ipv4/conf/eth0.100/rp_filter"), "0\n").unwrap();
        let sfs = SysctlFs::new(dir.path());

        let k = key("net.ipv4.tcp_fin_timeout");
        assert_eq!(sfs.read(&k).unwrap(), "60");
        sfs.write(&k, "5").unwrap();
        assert_eq!(fs::read_to_string(sfs.path_of(&k)).unwrap(), "5\n");
        assert_eq!(sfs.read(&k).unwrap(), "5");

        let vlan = key("net.ipv4.conf.eth0/100.rp_filter");
        sfs.write(&vlan, "2").unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("net/ipv4/conf/eth0.100/rp_filter")).unwrap(),
            "2\n"
        );
    }

    #[test]
    fn errors_map_to_states() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("net/ipv4")).unwrap();
        fs::write(dir.path().join("net/ipv4/tcp_fin_timeout"), "60\n").unwrap();
        let sfs = SysctlFs::new(dir.path());

        let missing = key("net.ipv4.tcp_tw_recycle");
        let e = sfs.read(&missing).unwrap_err();
        assert_eq!(e.state(), KeyState::Unsupported);
        // writing never creates the file
        let e = sfs.write(&missing, "1").unwrap_err();
        assert_eq!(e.state(), KeyState::Unsupported);
        assert!(!sfs.path_of(&missing).exists());
        // a component that is a file
        let e = sfs.read(&key("net.ipv4.tcp_fin_timeout.x")).unwrap_err();
        assert_eq!(e.state(), KeyState::Unsupported);
        // a directory is not a key
        let e = sfs.read(&key("net.ipv4")).unwrap_err();
        assert_eq!(e.state(), KeyState::Invalid, "{e}");

        let k = key("net.ipv4.tcp_fin_timeout");
        let mk = |errno| SysctlIoError::from_io(&k, true, io::Error::from_raw_os_error(errno));
        assert_eq!(mk(libc::EINVAL).state(), KeyState::Invalid);
        assert_eq!(mk(libc::EPERM).state(), KeyState::Denied);
        assert_eq!(mk(libc::EACCES).state(), KeyState::Denied);
        assert_eq!(mk(libc::EROFS).state(), KeyState::Denied);
        assert_eq!(mk(libc::EIO).state(), KeyState::Failed);
        assert!(
            mk(libc::EIO)
                .to_string()
                .contains("net.ipv4.tcp_fin_timeout")
        );
    }
}
