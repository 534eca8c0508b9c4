//! Reading a file nodetune is handed (a manifest, a policy) without trusting it: only a regular
//! file, opened without blocking, and never more than a stated number of bytes, so `/dev/zero`
//! cannot eat memory nor a FIFO hang the reader. The one reader for every such file.
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Why a bounded read failed.
#[derive(Debug, thiserror::Error)]
pub enum BoundedReadError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not a regular file (a FIFO, device, socket or directory)")]
    NotRegular,
    #[error("it is {size} bytes; at most {max} are accepted")]
    TooLarge { size: u64, max: u64 },
    /// The size was fine when opened, but more came (a file still being written, a stream).
    #[error("larger than {max} bytes")]
    Grew { max: u64 },
    #[error("not UTF-8")]
    NotUtf8,
}

/// The text of the regular file at `path`, of at most `max` bytes. Anything else (FIFO, device,
/// directory, socket) is refused before a byte is read.
pub fn read_regular_file(path: &Path, max: u64) -> Result<String, BoundedReadError> {
    // O_NONBLOCK: opening a FIFO must not wait for a writer before the type check refuses it.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(BoundedReadError::NotRegular);
    }
    if meta.len() > max {
        return Err(BoundedReadError::TooLarge {
            size: meta.len(),
            max,
        });
    }
    read_stream(file, max)
}

/// The text of `reader` (standard input, a checked file), of at most `max` bytes: one byte
/// more is read only to tell "exactly `max`" from "more".
pub fn read_stream(reader: impl Read, max: u64) -> Result<String, BoundedReadError> {
    let mut bytes = Vec::new();
    reader.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(BoundedReadError::Grew { max });
    }
    String::from_utf8(bytes).map_err(|_| BoundedReadError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_within_the_bound_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.yaml");
        std::fs::write(&path, "abc").expect("write");
        assert_eq!(read_regular_file(&path, 3).expect("read"), "abc");
        assert!(matches!(
            read_regular_file(&path, 2),
            Err(BoundedReadError::TooLarge { size: 3, max: 2 })
        ));
    }

    #[test]
    fn devices_directories_and_fifos_are_refused_unread() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            read_regular_file(Path::new("/dev/zero"), 10),
            Err(BoundedReadError::NotRegular)
        ));
        assert!(matches!(
            read_regular_file(dir.path(), 10),
            Err(BoundedReadError::NotRegular)
        ));
        let fifo = dir.path().join("fifo");
        // mkfifo(1) rather than libc::mkfifo: the library allows no unsafe code here.
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo runs");
        assert!(made.success(), "mkfifo failed");
        assert!(matches!(
            read_regular_file(&fifo, 10),
            Err(BoundedReadError::NotRegular)
        ));
    }

    #[test]
    fn streams_are_cut_at_the_bound_and_must_be_text() {
        assert_eq!(read_stream(&b"12345"[..], 5).expect("read"), "12345");
        assert!(matches!(
            read_stream(&b"123456"[..], 5),
            Err(BoundedReadError::Grew { max: 5 })
        ));
        assert!(matches!(
            read_stream(&[0xff_u8, 0xfe][..], 5),
            Err(BoundedReadError::NotUtf8)
        ));
    }
}
