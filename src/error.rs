//! The one error type of the engine, its exit statuses and its errnos.

use std::io;
use std::path::PathBuf;

/// Everything the engine can refuse or fail with. Messages name the volume
/// and, where there is one, the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid volume id {input:?}: {reason}")]
    InvalidVid { input: String, reason: String },

    #[error("invalid size {input:?}: {reason}")]
    InvalidSize { input: String, reason: String },

    #[error("invalid value for {property}: {reason}")]
    InvalidValue { property: String, reason: String },

    #[error("volume {0} does not exist")]
    NoSuchVolume(String),

    #[error("volume {0} already exists")]
    VolumeExists(String),

    #[error("volume {vid} has no revision {wanted:?}; valid revisions: {valid}")]
    UnknownRevision {
        vid: String,
        wanted: String,
        valid: String,
    },

    #[error("volume {vid} is busy: {reason}")]
    Busy { vid: String, reason: String },

    #[error("pool {pool} is in use by {holder} (lock file {lock})")]
    PoolLocked {
        pool: PathBuf,
        holder: String,
        lock: PathBuf,
    },

    #[error("volume {vid}: {reason}")]
    Refused { vid: String, reason: String },

    /// A refusal whose cause a client acts on (the Qubes driver retries a
    /// detach of a device in use, drops a stale import, …): classified by
    /// `cause`, never by the message's words.
    #[error("{}", because_text(vid, *cause, reason))]
    Because {
        vid: String,
        cause: Cause,
        reason: String,
    },

    #[error("pool {pool}: {reason}")]
    PoolRefused { pool: PathBuf, reason: String },

    #[error("volume {vid} is read-only (rw=false); it cannot be opened for writing")]
    ReadOnly { vid: String },

    #[error("volume {vid}: image {path} is missing")]
    MissingImage { vid: String, path: PathBuf },

    #[error("{what} {path} is not a regular file (a symlink or other file was planted there); reflinkfs never follows it")]
    NotRegular { what: String, path: PathBuf },

    #[error("no space left on the pool's filesystem while {context}")]
    NoSpace {
        context: String,
        #[source]
        source: io::Error,
    },

    #[error("corrupt metadata file {path}: {reason}")]
    CorruptMetadata { path: PathBuf, reason: String },

    #[error("{path} is not a reflinkfs pool (no .reflinkfs/pool.json)")]
    NotAPool { path: PathBuf },

    /// A reflinkfs mount (or a directory in one) given where a pool is
    /// wanted: `place` says which, `hint` what to give instead.
    #[error("{path} is {place} of the pool {pool}, not a pool itself; {hint}")]
    MountGivenAsPool {
        path: PathBuf,
        place: String,
        pool: PathBuf,
        hint: String,
    },

    #[error("the pool directory {path} does not exist")]
    NoSuchPool { path: PathBuf },

    #[error("{what} {path}: permission denied; {who}")]
    NoAccess {
        what: String,
        path: PathBuf,
        /// Who may use it, and how.
        who: String,
    },

    #[error("{path} is not the mountpoint of a reflinkfs pool")]
    NotAMount { path: PathBuf },

    #[error("cannot unmount {mountpoint}: {holders}")]
    MountBusy {
        mountpoint: PathBuf,
        holders: String,
    },

    #[error("{path} is already a reflinkfs pool")]
    PoolExists { path: PathBuf },

    #[error("the filesystem of {path} does not support reflinks ({source}); use --setup-check=no (setup_check=no) to create a copy-mode pool, where every snapshot is a full sparse copy")]
    ReflinkUnsupported {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A client and a daemon that do not speak the same protocol.
    #[error("{reason}")]
    Protocol { reason: String },

    /// An error the daemon reported for a request sent to it, with the
    /// class and cause it gave.
    #[error("{message}")]
    Remote {
        class: ErrorClass,
        cause: Option<Cause>,
        message: String,
    },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a request was refused, as a client can act on it; it crosses the
/// control socket as the error's `cause` (doc/CONTROL.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    NoSuchVolume,
    NoSuchPool,
    NoSuchRevision,
    /// `volume attach` of a volume that is attached.
    AlreadyAttached,
    /// `volume detach` of a volume that is not attached.
    NotAttached,
    /// The volume's loop device is still used (a VM, a mount).
    DeviceInUse,
    /// The volume runs; the operation needs it stopped.
    Running,
    /// The volume's run is written by something outside reflinkfs.
    Held,
    /// An import into the volume is in progress.
    Importing,
    /// Another operation on the volume is in progress.
    InProgress,
    /// A wait (for a stop) ran out of time.
    TimedOut,
    /// The volume is not running; the operation needs a run.
    NotRunning,
    /// The revision is pinned (or a queued revert's target).
    Pinned,
}

impl Cause {
    /// The class, and so the exit status, of an error with this cause.
    pub fn class(self) -> ErrorClass {
        match self {
            Cause::NoSuchVolume | Cause::NoSuchPool | Cause::NoSuchRevision => ErrorClass::NotFound,
            Cause::NotAttached | Cause::NotRunning | Cause::Pinned => ErrorClass::Refused,
            Cause::AlreadyAttached
            | Cause::DeviceInUse
            | Cause::Running
            | Cause::Held
            | Cause::Importing
            | Cause::InProgress
            | Cause::TimedOut => ErrorClass::Busy,
        }
    }

    /// Every cause.
    pub const ALL: [Cause; 13] = [
        Cause::NoSuchVolume,
        Cause::NoSuchPool,
        Cause::NoSuchRevision,
        Cause::AlreadyAttached,
        Cause::NotAttached,
        Cause::DeviceInUse,
        Cause::Running,
        Cause::Held,
        Cause::Importing,
        Cause::InProgress,
        Cause::TimedOut,
        Cause::NotRunning,
        Cause::Pinned,
    ];

    /// The cause of a name on the wire; `None` for one this build does not
    /// know.
    pub fn from_name(name: &str) -> Option<Cause> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Cause::NoSuchVolume => "no-such-volume",
            Cause::NoSuchPool => "no-such-pool",
            Cause::NoSuchRevision => "no-such-revision",
            Cause::AlreadyAttached => "already-attached",
            Cause::NotAttached => "not-attached",
            Cause::DeviceInUse => "device-in-use",
            Cause::Running => "running",
            Cause::Held => "held",
            Cause::Importing => "importing",
            Cause::InProgress => "in-progress",
            Cause::TimedOut => "timed-out",
            Cause::NotRunning => "not-running",
            Cause::Pinned => "pinned",
        }
    }
}

/// The message of [`Error::Because`]: worded as a busy volume or as a
/// refusal, by its class.
fn because_text(vid: &str, cause: Cause, reason: &str) -> String {
    match cause.class() {
        ErrorClass::Busy => format!("volume {vid} is busy: {reason}"),
        _ => format!("volume {vid}: {reason}"),
    }
}

/// The classes of error, each with its own process exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// An I/O error not covered by another class.
    Io,
    /// Invalid volume id, size or property value.
    InvalidInput,
    /// No such volume, revision, source or pool.
    NotFound,
    /// The volume is running or dirty, or the pool is locked by another process.
    Busy,
    /// Refused by a property or by the pool's mode.
    Refused,
    /// The filesystem ran out of space; nothing was changed.
    NoSpace,
    /// Metadata is corrupt or a file is not what it should be.
    Corrupt,
    /// The filesystem lacks reflinks and no copy mode was asked for.
    Unsupported,
    /// The volume or pool already exists.
    Exists,
    /// The CLI and the daemon speak different major protocol versions.
    Protocol,
}

impl ErrorClass {
    /// Every class with its exit status and a short description, for
    /// `--help`, the README and the tests.
    pub const ALL: [(ErrorClass, u8, &'static str); 10] = [
        (ErrorClass::Io, 1, "I/O or other unexpected error"),
        (
            ErrorClass::InvalidInput,
            3,
            "invalid volume id, size or property value",
        ),
        (
            ErrorClass::NotFound,
            4,
            "no such pool, volume, revision or source",
        ),
        (
            ErrorClass::Busy,
            5,
            "volume running or dirty, pool locked by another process, or mount in use",
        ),
        (
            ErrorClass::Refused,
            6,
            "refused by a volume property or the pool's mode",
        ),
        (
            ErrorClass::NoSpace,
            7,
            "no space left on the pool's filesystem",
        ),
        (
            ErrorClass::Corrupt,
            8,
            "corrupt metadata, or a symlink or foreign file in the pool",
        ),
        (
            ErrorClass::Unsupported,
            9,
            "reflinks unsupported (see --setup-check=no)",
        ),
        (ErrorClass::Exists, 10, "volume or pool already exists"),
        (
            ErrorClass::Protocol,
            11,
            "the CLI and the pool's daemon speak different protocol versions",
        ),
    ];

    pub fn exit_code(self) -> u8 {
        Self::ALL
            .iter()
            .find(|(c, _, _)| *c == self)
            .map(|(_, code, _)| *code)
            .unwrap_or(1)
    }

    pub fn from_name(name: &str) -> Option<ErrorClass> {
        Self::ALL
            .iter()
            .map(|(c, _, _)| *c)
            .find(|c| c.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::Io => "io",
            ErrorClass::InvalidInput => "invalid-input",
            ErrorClass::NotFound => "not-found",
            ErrorClass::Busy => "busy",
            ErrorClass::Refused => "refused",
            ErrorClass::NoSpace => "no-space",
            ErrorClass::Corrupt => "corrupt",
            ErrorClass::Unsupported => "unsupported",
            ErrorClass::Exists => "exists",
            ErrorClass::Protocol => "protocol",
        }
    }
}

impl Error {
    /// Wraps an I/O error with what was being done. ENOSPC and EDQUOT become
    /// [`Error::NoSpace`] so that callers and exit statuses see them as such.
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        let context = context.into();
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => Error::NoSpace { context, source },
            _ => Error::Io { context, source },
        }
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            Error::InvalidVid { .. } | Error::InvalidSize { .. } | Error::InvalidValue { .. } => {
                ErrorClass::InvalidInput
            }
            Error::NoSuchVolume(_)
            | Error::UnknownRevision { .. }
            | Error::MissingImage { .. }
            | Error::NotAPool { .. }
            | Error::MountGivenAsPool { .. }
            | Error::NoSuchPool { .. }
            | Error::NotAMount { .. } => ErrorClass::NotFound,
            Error::Busy { .. } | Error::PoolLocked { .. } | Error::MountBusy { .. } => {
                ErrorClass::Busy
            }
            Error::Refused { .. }
            | Error::PoolRefused { .. }
            | Error::ReadOnly { .. }
            | Error::NoAccess { .. } => ErrorClass::Refused,
            Error::NoSpace { .. } => ErrorClass::NoSpace,
            Error::CorruptMetadata { .. } | Error::NotRegular { .. } => ErrorClass::Corrupt,
            Error::ReflinkUnsupported { .. } => ErrorClass::Unsupported,
            Error::VolumeExists(_) | Error::PoolExists { .. } => ErrorClass::Exists,
            Error::Remote { class, .. } => *class,
            Error::Because { cause, .. } => cause.class(),
            Error::Protocol { .. } => ErrorClass::Protocol,
            Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENOENT) => {
                ErrorClass::NotFound
            }
            Error::Io { .. } => ErrorClass::Io,
        }
    }

    /// The cause a client acts on, where there is one.
    pub fn cause(&self) -> Option<Cause> {
        match self {
            Error::Because { cause, .. } => Some(*cause),
            Error::Remote { cause, .. } => *cause,
            Error::NoSuchVolume(_) => Some(Cause::NoSuchVolume),
            Error::NoSuchPool { .. } => Some(Cause::NoSuchPool),
            Error::UnknownRevision { .. } => Some(Cause::NoSuchRevision),
            _ => None,
        }
    }

    /// A busy or refused volume, with the cause a client acts on.
    pub fn because(vid: impl ToString, cause: Cause, reason: impl Into<String>) -> Error {
        Error::Because {
            vid: vid.to_string(),
            cause,
            reason: reason.into(),
        }
    }

    /// The errno a FUSE reply carries for this error: its class's, but for
    /// the errors that carry a more exact one.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::NoSpace { source, .. } => source.raw_os_error().unwrap_or(libc::ENOSPC),
            // Not a mountpoint: what umount(2) says.
            Error::NotAMount { .. } => libc::EINVAL,
            Error::NoAccess { .. } => libc::EACCES,
            // A planted symlink is what ELOOP means for O_NOFOLLOW.
            Error::NotRegular { .. } => libc::ELOOP,
            // Unlinking a pinned revision: not allowed, whoever asks.
            Error::Because {
                cause: Cause::Pinned,
                ..
            } => libc::EPERM,
            _ => match self.class() {
                // Bad input from a FUSE request can only come through a
                // name or a size the kernel passed on: EINVAL is what a
                // syscall gives.
                ErrorClass::InvalidInput => libc::EINVAL,
                // A volume whose image is missing: the file the caller
                // named is gone, as for a deleted file.
                ErrorClass::NotFound => libc::ENOENT,
                ErrorClass::Busy => libc::EBUSY,
                // Refusals are about write access (rw=false, read-only
                // pool).
                ErrorClass::Refused => libc::EROFS,
                ErrorClass::NoSpace => libc::ENOSPC,
                // Corrupt metadata is an I/O-level failure for the caller.
                ErrorClass::Corrupt | ErrorClass::Io | ErrorClass::Protocol => libc::EIO,
                ErrorClass::Unsupported => libc::EOPNOTSUPP,
                ErrorClass::Exists => libc::EEXIST,
            },
        }
    }
}

/// A volume busy with something that ends by itself (a start, a commit,
/// an operation): the client may retry.
pub fn busy(vid: impl ToString, reason: impl Into<String>) -> Error {
    Error::Busy {
        vid: vid.to_string(),
        reason: reason.into(),
    }
}

/// A request this volume's state or kind does not allow.
pub fn refused(vid: impl ToString, reason: impl Into<String>) -> Error {
    Error::Refused {
        vid: vid.to_string(),
        reason: reason.into(),
    }
}

/// `Display` of a type by its `as_str()`: the names of states and kinds
/// read the same in text and on the wire.
macro_rules! display_as_str {
    ($t:ty) => {
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use display_as_str;

/// Serde of a state type as its `as_str()` name: a name read back is
/// matched against `all()`, and one this build does not know (from a newer
/// daemon) reads as `Unknown`. For enums that nest another (an operation
/// in a state), which serde's derive would send as an object.
macro_rules! serde_as_str {
    ($t:ident) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(
                &self,
                s: S,
            ) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<$t, D::Error> {
                let name = std::borrow::Cow::<str>::deserialize(d)?;
                Ok($t::all()
                    .find(|x| x.as_str() == name)
                    .unwrap_or($t::Unknown))
            }
        }
    };
}
pub(crate) use serde_as_str;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cause_reads_back_from_its_wire_name() {
        let mut names: Vec<&str> = Cause::ALL.iter().map(|c| c.name()).collect();
        for c in Cause::ALL {
            assert_eq!(Cause::from_name(c.name()), Some(c));
        }
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Cause::ALL.len(), "names are distinct");
        assert_eq!(Cause::from_name("a-cause-of-a-newer-daemon"), None);
    }

    #[test]
    fn exit_codes_are_distinct() {
        let mut codes: Vec<u8> = ErrorClass::ALL.iter().map(|c| c.1).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), ErrorClass::ALL.len());
        assert!(
            !codes.contains(&0) && !codes.contains(&2),
            "0 and 2 are taken"
        );
    }

    #[test]
    fn enospc_becomes_no_space() {
        let e = Error::io("copying", io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.class(), ErrorClass::NoSpace);
        assert_eq!(e.class().exit_code(), 7);
        assert_eq!(e.errno(), libc::ENOSPC);
    }
}
