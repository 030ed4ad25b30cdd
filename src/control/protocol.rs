//! The protocol's types (doc/CONTROL.md): the versioned message a client
//! sends, the request in it, the reply and the response or error it
//! carries (the data of `status` is in `status.rs`).

use super::status::{AttachedVolume, Status};
use crate::engine::report::{PoolInfo, Problem, VolumeInfo};
use crate::engine::{Pending, ResizeOutcome, Revision, StopOutcome};
use crate::error::{Cause, Error, ErrorClass};
use serde::{Deserialize, Serialize};

/// The protocol's version: a client and a daemon talk only when the major
/// numbers match; a minor number grows with additions an older peer can
/// ignore (a new request, a new optional field).
pub const PROTOCOL_MAJOR: u32 = 1;

pub const PROTOCOL_MINOR: u32 = 5;

/// `MAJOR.MINOR` of this build.
pub fn protocol_version() -> String {
    format!("{PROTOCOL_MAJOR}.{PROTOCOL_MINOR}")
}

/// The largest request line the daemon reads.
pub const MAX_REQUEST: usize = 1 << 20;

/// An administration request. `VID`s are as typed (`CLASS/VM/NAME` or
/// `VM:NAME`); sizes and values are already validated by the CLI and are
/// validated again by the engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    PoolInfo,
    PoolCheck {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        volume: Option<String>,
    },
    /// (1.1) A pool property: `revisions_to_keep`, the default of new
    /// origin volumes.
    PoolSet {
        property: String,
        value: String,
    },
    Status,
    VolumeCreate {
        vid: String,
        size: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        snapshot_of: Option<String>,
        #[serde(default, skip_serializing_if = "is_false")]
        volatile: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        revisions_to_keep: Option<i64>,
        #[serde(default, skip_serializing_if = "is_false")]
        read_only: bool,
        #[serde(default, skip_serializing_if = "is_false")]
        optional: bool,
        /// (1.1) The new origin volume's data comes as the passed file
        /// descriptor (its size is the data's): the volume exists with
        /// all its data, or not at all.
        #[serde(default, skip_serializing_if = "is_false")]
        with_data: bool,
    },
    VolumeList,
    VolumeInfo {
        vid: String,
        /// (1.1) Leave out `usage` (no FIEMAP of the files): cheap.
        #[serde(default, skip_serializing_if = "is_false")]
        brief: bool,
    },
    VolumeRevisions {
        vid: String,
    },
    VolumeResize {
        vid: String,
        size: u64,
        #[serde(default, skip_serializing_if = "is_false")]
        allow_shrink: bool,
    },
    VolumeRevert {
        vid: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        revision: Option<String>,
    },
    VolumeSet {
        vid: String,
        property: String,
        value: String,
    },
    /// The data comes as the passed file descriptor.
    VolumeImport {
        vid: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<u64>,
        /// How the source is shown in the reply.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        source: String,
    },
    /// The destination comes as the passed file descriptor.
    VolumeExport {
        vid: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        revision: Option<String>,
        /// How the destination is shown; `-` for stdout (no message).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        dest: String,
    },
    /// A clone within this pool.
    VolumeClone {
        src: String,
        dst: String,
    },
    VolumeRemove {
        vid: String,
        /// (1.3) Even with pinned revisions.
        #[serde(default, skip_serializing_if = "is_false")]
        force: bool,
    },
    /// (1.3) Pins a revision: never pruned, not counted.
    VolumePin {
        vid: String,
        revision: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
    },
    /// (1.3) Unpins a revision.
    VolumeUnpin {
        vid: String,
        revision: String,
    },
    /// (1.3) The running volume's run ends without a commit.
    VolumeDiscardChanges {
        vid: String,
    },
    /// (1.3) Withdraws a queued discard or revert.
    VolumeCancelPending {
        vid: String,
    },
    /// (1.1) Begins an import whose data the client writes in place: the
    /// daemon makes a sparse file of `size` bytes and answers its path;
    /// the volume is `importing` until `volume_import_end`. Mounted pools
    /// only.
    VolumeImportBegin {
        vid: String,
        size: u64,
    },
    /// (1.1) Ends it: `success` commits the data (the previous image
    /// becomes a revision), otherwise it is dropped.
    VolumeImportEnd {
        vid: String,
        success: bool,
    },
    /// (1.3) Drops an import begun with `volume_import_begin` and not
    /// ended (its writer died): the file goes, the volume is as it was.
    VolumeImportAbort {
        vid: String,
    },
    /// (1.4) The byte ranges where revision `from` (K or an id) and `to`
    /// (default: the committed image) differ.
    VolumeDiff {
        vid: String,
        from: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<String>,
    },
    /// (1.4) The committed image as an `rbd diff v1` stream, to the passed
    /// file descriptor: whole, or the changes `since` revision K (or id).
    VolumeExportDelta {
        vid: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<String>,
        /// How the destination is shown; `-` for stdout.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        dest: String,
    },
    /// (1.4) Applies the `rbd diff v1` stream read from the passed file
    /// descriptor onto the committed image whose id it names.
    VolumeImportDelta {
        vid: String,
        /// How the source is shown in the reply.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        source: String,
    },
    /// (1.1) Waits until the volume's run is over and its commit (or
    /// discard) is done and durable; at once when it is not running.
    /// Refused when still running after `timeout_ms` (default 60 s), naming
    /// what holds it.
    VolumeWaitStopped {
        vid: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    /// (1.2) Puts a loop device on the volume's dirty image, starting it
    /// (`volume attach`).
    VolumeAttach {
        vid: String,
        #[serde(default, skip_serializing_if = "is_false")]
        read_only: bool,
        /// Default: on.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        direct_io: Option<bool>,
        /// The device's logical block size: 512 (the default, what
        /// a disk image is laid out for) or 4096 (needed for direct I/O
        /// on XFS and btrfs).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        block_size: Option<u32>,
    },
    /// (1.2) Removes it, waits until the kernel let go of the file (up to
    /// `timeout_ms`, default 30 s), and stops the volume when nothing else
    /// has it open. `force`: even while the device is in use.
    VolumeDetach {
        vid: String,
        #[serde(default, skip_serializing_if = "is_false")]
        force: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Request {
    /// Whether the request takes a file descriptor.
    pub fn takes_fd(&self) -> bool {
        matches!(
            self,
            Request::VolumeImport { .. }
                | Request::VolumeExport { .. }
                | Request::VolumeExportDelta { .. }
                | Request::VolumeImportDelta { .. }
                | Request::VolumeCreate {
                    with_data: true,
                    ..
                }
        )
    }
}

/// What a client sends: the request, and the protocol version it speaks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// `MAJOR.MINOR`.
    pub protocol: String,
    pub request: Request,
}

impl Message {
    pub fn new(request: Request) -> Message {
        Message {
            protocol: protocol_version(),
            request,
        }
    }
}

/// What a request produced: data, one variant per request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", content = "data", rename_all = "snake_case")]
pub enum Response {
    PoolInfo(PoolInfoBox),
    /// `pool check`: every problem found (none: the pool is consistent).
    Problems(Vec<Problem>),
    Status(Box<Status>),
    Created {
        vid: String,
        /// Set when the volume is larger than the free space of the pool's
        /// filesystem (allowed: images are sparse).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        warning: Option<String>,
    },
    Volumes(Vec<VolumeInfo>),
    Volume(Box<VolumeInfo>),
    Revisions(Vec<Revision>),
    Resized {
        vid: String,
        size: u64,
        outcome: ResizeOutcome,
        /// As for `Created`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        warning: Option<String>,
    },
    Reverted {
        vid: String,
        /// The revision gone back to (its number, or `@TIMESTAMP`; its
        /// file name when queued).
        revision: String,
        /// The revision the previous image was saved as, if one was kept.
        saved_as: Option<u64>,
        /// (1.3) The volume runs: the revert happens at its stop.
        #[serde(default, skip_serializing_if = "is_false")]
        queued: bool,
    },
    /// `volume_pin`, `volume_unpin`: the revision, and whether it is
    /// pinned now (`changed`: whether that changed).
    Pinned {
        vid: String,
        revision: String,
        pinned: bool,
        changed: bool,
    },
    /// `volume_discard_changes`: what the end of the run will do.
    Queued {
        vid: String,
        /// For a person (what clients before 1.5 show).
        pending: String,
        /// (1.5) The change queued (none: one this build does not know).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[serde(deserialize_with = "super::lenient")]
        change: Option<Pending>,
    },
    /// `volume_cancel_pending`: whether there was a queued change.
    Cancelled {
        vid: String,
        cancelled: bool,
    },
    Set {
        vid: String,
        property: String,
        value: String,
    },
    Imported {
        vid: String,
        source: String,
        saved_as: Option<u64>,
    },
    Exported {
        vid: String,
        dest: String,
        bytes: u64,
    },
    Cloned {
        src: String,
        dst: String,
        pool: String,
    },
    Removed {
        vid: String,
    },
    /// `pool set`.
    PoolSet {
        property: String,
        value: String,
    },
    /// `volume_import_begin`: write `size` bytes to `path`, in place (do
    /// not create or truncate it), then send `volume_import_end`.
    ImportBegun {
        vid: String,
        path: String,
        size: u64,
    },
    /// `volume_import_abort`: whether there was an import to drop.
    ImportAborted {
        vid: String,
        aborted: bool,
    },
    /// `volume_import_end`: whether the data was committed, and the
    /// revision the previous image was kept as.
    ImportEnded {
        vid: String,
        committed: bool,
        saved_as: Option<u64>,
    },
    /// `volume_wait_stopped`: the volume is stopped, its last run committed
    /// or discarded.
    Stopped {
        vid: String,
    },
    /// `volume_attach`.
    Attached(AttachedVolume),
    /// (1.4) `volume_diff`, `volume_export_delta`, `volume_import_delta`.
    Delta(Box<crate::engine::delta::DeltaResponse>),
    /// `volume_detach`: the device removed, and what the stop did
    /// (`None` while the mount still has the volume open).
    Detached {
        vid: String,
        device: String,
        /// What the stop did, for a person (what clients before 1.5 show).
        stop: Option<String>,
        /// (1.5) What the stop did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        outcome: Option<StopReport>,
    },
}

/// What a stop did (`volume_detach`), as it crosses the socket: the
/// engine's [`StopOutcome`] under stable names. A kind this build does not
/// know (from a newer daemon) reads as `unknown`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StopReport {
    /// The run's writes are the committed image; the previous image was
    /// kept as revision `revision`, if one was kept.
    Committed {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        revision: Option<u64>,
    },
    /// Nothing was written: no revision was added.
    Unchanged,
    /// The run's writes were dropped (a snapshot or volatile volume, or a
    /// queued discard).
    Discarded,
    /// A queued revert: the writes were dropped and the volume went back
    /// to revision file `revision`; the previous image is `saved_as`.
    Reverted {
        revision: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        saved_as: Option<u64>,
    },
    /// Not committed: the dirty image is still written by `holders` (a
    /// description for a person); committed once they let go.
    Held { holders: String },
    #[serde(other)]
    Unknown,
}

impl From<&StopOutcome> for StopReport {
    fn from(o: &StopOutcome) -> StopReport {
        match o {
            StopOutcome::Committed { revision } => StopReport::Committed {
                revision: *revision,
            },
            StopOutcome::Unchanged => StopReport::Unchanged,
            StopOutcome::Discarded => StopReport::Discarded,
            StopOutcome::Reverted { revision, saved_as } => StopReport::Reverted {
                revision: revision.clone(),
                saved_as: *saved_as,
            },
            StopOutcome::Held { holders } => StopReport::Held {
                holders: holders.clone(),
            },
        }
    }
}

/// How a stop reads to a person: the CLI's text, and the `stop` field
/// clients before 1.5 show (doc/CONTROL.md lists its forms).
impl std::fmt::Display for StopReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReport::Committed { revision: Some(k) } => {
                write!(f, "committed; the previous image is revision {k}")
            }
            StopReport::Committed { revision: None } => f.write_str("committed"),
            StopReport::Unchanged => f.write_str("unchanged (no revision added)"),
            StopReport::Discarded => f.write_str("discarded"),
            StopReport::Reverted {
                revision,
                saved_as: Some(k),
            } => write!(
                f,
                "reverted to {revision} as queued; the previous image is revision {k}"
            ),
            StopReport::Reverted { revision, .. } => write!(f, "reverted to {revision} as queued"),
            StopReport::Held { holders } => write!(f, "not committed: still written by {holders}"),
            StopReport::Unknown => f.write_str("stopped"),
        }
    }
}

/// `PoolInfo`, boxed (it is much larger than the other responses).
pub type PoolInfoBox = Box<PoolInfo>;

/// An error as it crosses the socket: its kind (the error class, which
/// also gives the CLI's exit status), its cause where a client may act on
/// one, and a one-line message for a person. Clients classify on `kind`
/// and `cause`, never on the message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireError {
    /// `invalid-input`, `not-found`, `busy`, `refused`, `no-space`,
    /// `corrupt`, `unsupported`, `exists`, `io`, or `protocol` (the peers
    /// do not speak the same major version); a kind this build does not
    /// know reads as `io`.
    #[serde(with = "class_name")]
    pub kind: ErrorClass,
    /// The CLI's exit status for it.
    pub code: u8,
    pub message: String,
    /// (1.3) Why: `no-such-volume`, `already-attached`, `device-in-use`,
    /// `timed-out`, … (doc/CONTROL.md). A cause this build does not know
    /// reads as none: the error is then its kind alone.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "cause_name")]
    pub cause: Option<Cause>,
}

impl From<&Error> for WireError {
    fn from(e: &Error) -> WireError {
        WireError {
            kind: e.class(),
            code: e.class().exit_code(),
            message: e.to_string(),
            cause: e.cause(),
        }
    }
}

impl From<WireError> for Error {
    fn from(w: WireError) -> Error {
        Error::Remote {
            class: w.kind,
            cause: w.cause,
            message: w.message,
        }
    }
}

/// `ErrorClass` by its name on the wire.
mod class_name {
    use crate::error::ErrorClass;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(c: &ErrorClass, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(c.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ErrorClass, D::Error> {
        let name = String::deserialize(d)?;
        Ok(ErrorClass::from_name(&name).unwrap_or(ErrorClass::Io))
    }
}

/// `Option<Cause>` by its name on the wire.
mod cause_name {
    use crate::error::Cause;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(c: &Option<Cause>, s: S) -> Result<S::Ok, S::Error> {
        match c {
            Some(c) => s.serialize_str(c.name()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Cause>, D::Error> {
        let name = Option::<String>::deserialize(d)?;
        Ok(name.as_deref().and_then(Cause::from_name))
    }
}

/// What the daemon sends back: one JSON line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    /// The daemon's `MAJOR.MINOR`.
    pub protocol: String,
    #[serde(flatten)]
    pub outcome: ReplyOutcome,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyOutcome {
    Ok(Box<Response>),
    Error(WireError),
}

impl Reply {
    pub fn ok(r: Response) -> Reply {
        Reply {
            protocol: protocol_version(),
            outcome: ReplyOutcome::Ok(Box::new(r)),
        }
    }

    pub fn error(e: WireError) -> Reply {
        Reply {
            protocol: protocol_version(),
            outcome: ReplyOutcome::Error(e),
        }
    }
}

/// The major number of a `MAJOR.MINOR` version string.
pub fn major_of(version: &str) -> Option<u32> {
    version.split('.').next()?.trim().parse().ok()
}

/// The error of peers that do not speak the same major version.
pub fn version_mismatch(theirs: &str, who: &str, fix: &str) -> Error {
    Error::Protocol {
        reason: format!(
            "{who} speaks control protocol {theirs}, this reflinkfs speaks {}; {fix}",
            protocol_version()
        ),
    }
}
