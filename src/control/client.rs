//! The CLI's side of the control socket.

use super::{major_of, version_mismatch, Message, Reply, ReplyOutcome, Request, Response};
use crate::error::{Error, Result};
use crate::sys;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Connects to the daemon of a mounted pool; `None` when the pool is not
/// mounted (no socket, or a stale one nobody listens on).
///
/// Nothing on the way is followed through a symlink: the pool and its
/// metadata directory are opened with `O_NOFOLLOW`, the socket must be a
/// socket, and it is reached through the open directory. The daemon must
/// be root, the caller, or the pool's owner: a request (and the file an
/// import or export hands over) never goes to a stranger's socket.
pub fn connect(pool: &Path) -> Result<Option<UnixStream>> {
    use crate::engine::pool::{no_access, CONTROL_SOCKET, META_DIR};
    let path = pool.join(META_DIR).join(CONTROL_SOCKET);
    let gone = |e: &std::io::Error| {
        matches!(
            e.raw_os_error(),
            Some(libc::ENOENT) | Some(libc::ECONNREFUSED) | Some(libc::ENOTDIR)
        )
    };
    let refuse = |what: &str| Error::NotRegular {
        what: what.to_owned(),
        path: path.clone(),
    };
    let denied = |e: &std::io::Error| e.raw_os_error() == Some(libc::EACCES);
    let root = match sys::open_dir_path(pool) {
        Ok(fd) => fd,
        Err(e) if gone(&e) => return Ok(None),
        Err(e) if denied(&e) => return Err(no_access("pool directory", pool, pool)),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(Error::NotRegular {
                what: "pool directory".into(),
                path: pool.to_owned(),
            })
        }
        Err(e) => return Err(Error::io(format!("opening {}", pool.display()), e)),
    };
    let meta = match sys::open_subdir(root.as_fd(), META_DIR) {
        Ok(fd) => fd,
        Err(e) if gone(&e) => return Ok(None),
        Err(e) if denied(&e) => return Err(no_access("pool", pool, pool)),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(refuse("metadata directory of the control socket"))
        }
        Err(e) => return Err(Error::io(format!("opening {}", path.display()), e)),
    };
    match sys::lstatat(meta.as_fd(), CONTROL_SOCKET) {
        Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFSOCK => {}
        Ok(_) => return Err(refuse("control socket")),
        Err(e) if gone(&e) => return Ok(None),
        Err(e) if denied(&e) => return Err(no_access("pool", pool, pool)),
        Err(e) => return Err(Error::io(format!("examining {}", path.display()), e)),
    }
    let stream = match UnixStream::connect(sys::path_in_dir_fd(meta.as_fd(), CONTROL_SOCKET)) {
        Ok(s) => s,
        Err(e) if gone(&e) => return Ok(None),
        Err(e) if denied(&e) => return Err(no_access("the control socket", &path, pool)),
        Err(e) => {
            return Err(Error::io(
                format!("connecting to the daemon at {}", path.display()),
                e,
            ))
        }
    };
    let (pid, uid, _) = sys::peer_cred(stream.as_fd())
        .map_err(|e| Error::io(format!("asking who listens on {}", path.display()), e))?;
    let owner = sys::fstat(root.as_fd())
        .map_err(|e| Error::io(format!("examining {}", pool.display()), e))?
        .st_uid;
    if uid != 0 && uid != sys::getuid() && uid != owner {
        return Err(Error::Refused {
            vid: "control socket".into(),
            reason: format!(
                "{} is served by process {pid} of uid {uid}, which is neither root, you, nor the pool's owner (uid {owner}); not talking to it",
                path.display()
            ),
        });
    }
    Ok(Some(stream))
}

/// Sends a request (with `fd` for import and export) and waits for the
/// reply. A daemon of another major protocol version (an older or newer
/// reflinkfs still mounted) is refused with an error that says what to do.
pub fn call(stream: UnixStream, req: &Request, fd: Option<BorrowedFd<'_>>) -> Result<Response> {
    let mut line = serde_json::to_vec(&Message::new(req.clone())).expect("requests serialise");
    line.push(b'\n');
    let mut sent = 0;
    let mut fd = fd;
    let mut send_error = None;
    while sent < line.len() {
        match sys::send_with_fd(stream.as_fd(), &line[sent..], fd.take()) {
            Ok(n) => sent += n,
            // The daemon may refuse before reading the request (an unknown
            // peer): its reply is still there to read.
            Err(e) => {
                send_error = Some(e);
                break;
            }
        }
    }
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(|e| Error::io("reading the daemon's reply", e))?;
    if reply.is_empty() {
        if let Some(e) = send_error {
            return Err(Error::io("sending the request to the daemon", e));
        }
        return Err(Error::io(
            "the daemon closed the connection without a reply",
            std::io::Error::from_raw_os_error(libc::ECONNRESET),
        ));
    }
    let fix = "unmount the pool and mount it again with this reflinkfs (or use the reflinkfs that mounted it)";
    match serde_json::from_str::<Reply>(&reply) {
        Ok(r) if major_of(&r.protocol) != Some(super::PROTOCOL_MAJOR) => {
            Err(version_mismatch(&r.protocol, "the pool's daemon", fix))
        }
        Ok(Reply {
            outcome: ReplyOutcome::Ok(r),
            ..
        }) => Ok(*r),
        Ok(Reply {
            outcome: ReplyOutcome::Error(w),
            ..
        }) => Err(Error::from(w)),
        Err(e) => {
            // A daemon from before versioned replies answers in a shape
            // this client cannot read.
            if reply.contains("\"protocol\"") {
                return Err(Error::io(
                    format!("the daemon's reply is not valid: {e}"),
                    std::io::Error::from_raw_os_error(libc::EPROTO),
                ));
            }
            Err(version_mismatch(
                "0 (unversioned)",
                "the pool's daemon",
                fix,
            ))
        }
    }
}
