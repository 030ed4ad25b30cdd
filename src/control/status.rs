//! The data of `status` (doc/CONTROL.md): the daemon, its running, busy,
//! held and attached volumes, and their queued changes.

use crate::engine::view::IoMode;
use crate::engine::{LifeState, Pending, Pool, ValidVid};
use serde::{Deserialize, Serialize};

/// A running volume, in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenVolume {
    pub vid: String,
    pub open_handles: usize,
}

/// A volume a start, commit, hold or operation is in progress on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusyVolume {
    pub vid: String,
    pub state: LifeState,
}

/// `reflinkfs status`: whether the pool is mounted, and what its daemon is
/// doing. Offline, only `pool` and `mounted` (false).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Status {
    pub pool: String,
    pub mounted: bool,
    /// `None` once the mount was lazily unmounted (`detached_from` says
    /// where it was).
    pub mountpoint: Option<String>,
    pub detached_from: Option<String>,
    pub io_mode: Option<IoMode>,
    pub pid: Option<u32>,
    pub uptime_seconds: Option<u64>,
    pub running: Vec<OpenVolume>,
    pub busy: Vec<BusyVolume>,
    pub held: Vec<String>,
    /// (1.3) Once the mount is gone (unmounted, or lazily unmounted and
    /// every file closed): the held volumes the daemon still waits for, to
    /// commit them, before it exits.
    pub waiting_for: Vec<String>,
    pub commits_in_flight: Vec<String>,
    /// The protocol version of the daemon (`None` offline).
    pub protocol: Option<String>,
    /// (1.2) Volumes attached to loop devices, mounted or not.
    pub attached: Vec<AttachedVolume>,
    /// (1.3) Volumes whose run ends with a queued change instead of a
    /// commit (`discard-changes`, a revert of a running volume).
    pub pending: Vec<PendingVolume>,
}

/// A volume with a change queued for the end of its run, in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingVolume {
    pub vid: String,
    /// The change, for a person (what clients before 1.5 show).
    pub pending: String,
    /// (1.5) The change: `{"action": "discard"}` or `{"action":
    /// "revert", "revision": FILE}`; one this build does not know: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(deserialize_with = "super::lenient")]
    pub change: Option<Pending>,
}

/// A volume attached to a loop device (`volume attach`), in `status` and
/// the reply of `volume_attach`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedVolume {
    pub vid: String,
    #[serde(flatten)]
    pub device: LoopDevice,
    /// The dirty image the device reads and writes.
    pub backing: String,
    pub read_only: bool,
    /// Whether the device does direct I/O (the kernel may refuse it).
    pub direct_io: bool,
}

/// A loop device as the kernel has it now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoopDevice {
    /// `/dev/loopN`.
    #[serde(rename = "device")]
    pub path: String,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    /// Its logical block size (512 unless asked for 4096). A consumer must
    /// use it (Xen's blkback does; give qemu `logical_block_size=`).
    #[serde(default)]
    pub block_size: Option<u32>,
}

impl LoopDevice {
    /// `/dev/loop{number}`, its numbers and its block size (`None` for
    /// what the kernel does not say: the device went).
    pub fn of(number: u32) -> LoopDevice {
        let (major, minor) = crate::sys::loop_dev_numbers(number).unzip();
        LoopDevice {
            path: crate::sys::loop_path(number).display().to_string(),
            major,
            minor,
            block_size: crate::sys::loop_block_size(number),
        }
    }
}

impl AttachedVolume {
    pub fn of(pool: &Pool, vid: &ValidVid, a: crate::engine::AttachedLoop) -> AttachedVolume {
        AttachedVolume {
            vid: vid.to_string(),
            device: LoopDevice::of(a.number),
            backing: pool
                .path()
                .join(vid.class())
                .join(vid.vm())
                .join(crate::engine::Names::of(vid).dirty())
                .display()
                .to_string(),
            read_only: a.read_only,
            direct_io: a.direct_io,
        }
    }
}
