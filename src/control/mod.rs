//! Administration requests: one JSON type for every §5 operation, executed
//! by the same function offline (the CLI opens the pool itself) and online
//! (the daemon serves them on `POOL/.reflinkfs/control.sock`), so both give
//! the same output, JSON and exit statuses.

pub mod client;
pub mod server;

use crate::engine::admin::CreateOptions;
use crate::engine::{NewKind, Pool, Property, ValidVid};
use crate::error::{Error, ErrorClass, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::fs::File;

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
        volume: Option<String>,
    },
    Status,
    VolumeCreate {
        vid: String,
        size: u64,
        snapshot_of: Option<String>,
        volatile: bool,
        revisions_to_keep: Option<i64>,
        read_only: bool,
        optional: bool,
    },
    VolumeList,
    VolumeInfo {
        vid: String,
    },
    VolumeRevisions {
        vid: String,
    },
    VolumeResize {
        vid: String,
        size: u64,
        allow_shrink: bool,
    },
    VolumeRevert {
        vid: String,
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
        size: Option<u64>,
        /// How the source is shown in the reply.
        source: String,
    },
    /// The destination comes as the passed file descriptor.
    VolumeExport {
        vid: String,
        revision: Option<String>,
        /// How the destination is shown; `-` for stdout (no message).
        dest: String,
    },
    /// A clone within this pool.
    VolumeClone {
        src: String,
        dst: String,
    },
    VolumeRemove {
        vid: String,
    },
}

impl Request {
    /// Whether the request takes a file descriptor.
    pub fn takes_fd(&self) -> bool {
        matches!(
            self,
            Request::VolumeImport { .. } | Request::VolumeExport { .. }
        )
    }
}

/// What a request produced: the machine-readable value (`--json`), the
/// text for people, and the exit status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub value: Value,
    pub text: String,
    pub exit: u8,
}

impl Outcome {
    fn ok(value: Value, text: String) -> Outcome {
        Outcome {
            value,
            text,
            exit: 0,
        }
    }
}

/// What only a running daemon knows.
pub trait Daemon: Send + Sync {
    /// `reflinkfs status`: mountpoint, I/O mode, running volumes, commits
    /// in flight, PID, uptime.
    fn status(&self) -> Value;
    /// Called after a volume was resized: tells the loop devices backed by
    /// its exported path the new capacity.
    fn resized(&self, vid: &ValidVid);
    /// Called after every request, before the reply: the mount has dropped
    /// what the kernel cached of what the request changed.
    fn settled(&self);
}

fn vid_of(pool: &Pool, input: &str) -> Result<ValidVid> {
    pool.resolve_vid(input)
}

/// `VM:NAME` for a new volume: the class of that VM's existing volumes.
fn new_vid(pool: &Pool, input: &str) -> Result<ValidVid> {
    if input.contains('/') {
        return input.parse();
    }
    if let Ok(v) = pool.resolve_vid(input) {
        return Ok(v);
    }
    let bad = |reason: &str| Error::InvalidVid {
        input: input.to_owned(),
        reason: reason.to_owned(),
    };
    let (vm, name) = input.split_once(':').ok_or_else(|| {
        bad("expected CLASS/VM/NAME (for example appvms/work/private) or VM:NAME")
    })?;
    let mut classes: Vec<String> = pool
        .vids()
        .into_iter()
        .filter(|v| v.vm() == vm)
        .map(|v| v.class().to_owned())
        .collect();
    classes.dedup();
    match classes.as_slice() {
        [class] => ValidVid::new(class, vm, name),
        [] => Err(bad(
            "the VM has no volumes yet, so its class is unknown; give CLASS/VM/NAME",
        )),
        _ => Err(bad(
            "the VM name is used in several classes; give CLASS/VM/NAME",
        )),
    }
}

fn to_value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("reports serialise")
}

/// Executes a request against an open pool. `fd` is the file of an import
/// (its source) or export (its destination).
pub fn execute(
    pool: &Pool,
    req: Request,
    fd: Option<File>,
    daemon: Option<&dyn Daemon>,
) -> Result<Outcome> {
    use crate::cli::output;
    let need_fd = |fd: Option<File>| -> Result<File> {
        fd.ok_or_else(|| Error::InvalidValue {
            property: "request".into(),
            reason: "this operation needs a file descriptor passed with the request".into(),
        })
    };
    match req {
        Request::PoolInfo => {
            let info = pool.pool_info()?;
            Ok(Outcome::ok(to_value(&info), output::pool_info(&info)))
        }
        Request::PoolCheck { volume } => {
            let only = volume.as_deref().map(|v| vid_of(pool, v)).transpose()?;
            let problems = pool.check(only.as_ref())?;
            let exit = if problems.is_empty() {
                0
            } else {
                ErrorClass::Corrupt.exit_code()
            };
            Ok(Outcome {
                value: to_value(&problems),
                text: output::problems(&problems),
                exit,
            })
        }
        Request::Status => {
            let value = match daemon {
                Some(d) => d.status(),
                None => json!({ "pool": pool.path().display().to_string(), "mounted": false }),
            };
            let text = output::status(&value);
            Ok(Outcome::ok(value, text))
        }
        Request::VolumeCreate {
            vid,
            size,
            snapshot_of,
            volatile,
            revisions_to_keep,
            read_only,
            optional,
        } => {
            let vid = new_vid(pool, &vid)?;
            let kind = match (snapshot_of, volatile) {
                (Some(src), _) => NewKind::SnapshotOf(vid_of(pool, &src)?),
                (None, true) => NewKind::Volatile,
                (None, false) => NewKind::Origin,
            };
            let opts = CreateOptions {
                size,
                kind,
                rw: read_only.then_some(false),
                revisions_to_keep,
                optional,
            };
            pool.create(&vid, &opts)?;
            Ok(Outcome::ok(
                json!({ "vid": vid.to_string(), "created": true }),
                format!("created {vid}\n"),
            ))
        }
        Request::VolumeList => {
            let list = pool.list()?;
            Ok(Outcome::ok(to_value(&list), output::volume_list(&list)))
        }
        Request::VolumeInfo { vid } => {
            let info = pool.info(&vid_of(pool, &vid)?)?;
            Ok(Outcome::ok(to_value(&info), output::volume_info(&info)))
        }
        Request::VolumeRevisions { vid } => {
            let revs = pool.revisions(&vid_of(pool, &vid)?)?;
            Ok(Outcome::ok(to_value(&revs), output::revisions(&revs)))
        }
        Request::VolumeResize {
            vid,
            size,
            allow_shrink,
        } => {
            let vid = vid_of(pool, &vid)?;
            let outcome = pool.resize(&vid, size, allow_shrink)?;
            if let Some(d) = daemon {
                d.resized(&vid);
            }
            Ok(Outcome::ok(
                json!({ "vid": vid.to_string(), "size": size, "outcome": format!("{outcome:?}").to_lowercase() }),
                format!("{vid}: {}\n", output::resize_outcome(outcome, size)),
            ))
        }
        Request::VolumeRevert { vid, revision } => {
            let vid = vid_of(pool, &vid)?;
            let saved = pool.revert(&vid, revision.as_deref())?;
            let target = revision.as_deref().unwrap_or("(newest)");
            let text = match saved {
                Some(k) => format!(
                    "{vid}: reverted to revision {target}; the previous image is revision {k}\n"
                ),
                None => format!("{vid}: reverted to revision {target}\n"),
            };
            Ok(Outcome::ok(
                json!({ "vid": vid.to_string(), "saved_as": saved }),
                text,
            ))
        }
        Request::VolumeSet {
            vid,
            property,
            value,
        } => {
            let prop = Property::parse(&property, &value)?;
            let vid = vid_of(pool, &vid)?;
            pool.set(&vid, prop)?;
            Ok(Outcome::ok(
                json!({ "vid": vid.to_string(), "property": property, "value": value }),
                format!("{vid}: {property} = {value}\n"),
            ))
        }
        Request::VolumeImport { vid, size, source } => {
            let file = need_fd(fd)?;
            let vid = vid_of(pool, &vid)?;
            let saved = pool.import(&vid, &file, size)?;
            Ok(Outcome::ok(
                json!({ "vid": vid.to_string(), "saved_as": saved }),
                format!(
                    "{vid}: imported {source}{}\n",
                    saved
                        .map(|k| format!("; the previous image is revision {k}"))
                        .unwrap_or_default()
                ),
            ))
        }
        Request::VolumeExport {
            vid,
            revision,
            dest,
        } => {
            let file = need_fd(fd)?;
            let vid = vid_of(pool, &vid)?;
            let bytes = pool.export(&vid, &file, revision.as_deref())?;
            let text = if dest == "-" {
                String::new()
            } else {
                format!("{vid}: exported {bytes} bytes to {dest}\n")
            };
            Ok(Outcome::ok(
                json!({ "vid": vid.to_string(), "bytes": bytes }),
                text,
            ))
        }
        Request::VolumeClone { src, dst } => {
            let src = vid_of(pool, &src)?;
            let dst = pool
                .resolve_vid(&dst)
                .or_else(|_| dst.parse::<ValidVid>())?;
            pool.clone_volume(&src, pool, &dst)?;
            Ok(Outcome::ok(
                json!({ "src": src.to_string(), "dst": dst.to_string() }),
                format!("cloned {src} to {dst} in {}\n", pool.path().display()),
            ))
        }
        Request::VolumeRemove { vid } => {
            let vid = vid_of(pool, &vid)?;
            pool.remove(&vid)?;
            Ok(Outcome::ok(
                json!({ "vid": vid.to_string(), "removed": true }),
                format!("removed {vid}\n"),
            ))
        }
    }
}

/// An error as it crosses the socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireError {
    pub class: String,
    pub code: u8,
    pub message: String,
}

impl From<&Error> for WireError {
    fn from(e: &Error) -> WireError {
        WireError {
            class: e.class().name().to_owned(),
            code: e.class().exit_code(),
            message: e.to_string(),
        }
    }
}

/// One line the daemon sends back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Ok(Outcome),
    Error(WireError),
}
