//! The CLI's side of the control socket.

use super::{Outcome, Reply, Request};
use crate::error::{Error, ErrorClass, Result};
use crate::sys;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Connects to the daemon of a mounted pool; `None` when the pool is not
/// mounted (no socket, or a stale one nobody listens on).
pub fn connect(pool: &Path) -> Result<Option<UnixStream>> {
    let path = pool
        .join(crate::engine::pool::META_DIR)
        .join(crate::engine::pool::CONTROL_SOCKET);
    match UnixStream::connect(&path) {
        Ok(s) => Ok(Some(s)),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT) | Some(libc::ECONNREFUSED) | Some(libc::ENOTDIR)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(Error::io(
            format!("connecting to the daemon at {}", path.display()),
            e,
        )),
    }
}

/// Sends a request (with `fd` for import and export) and waits for the
/// reply.
pub fn call(stream: UnixStream, req: &Request, fd: Option<BorrowedFd<'_>>) -> Result<Outcome> {
    let mut line = serde_json::to_vec(req).expect("requests serialise");
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
    match serde_json::from_str::<Reply>(&reply) {
        Ok(Reply::Ok(o)) => Ok(o),
        Ok(Reply::Error(w)) => Err(Error::Remote {
            class: ErrorClass::from_name(&w.class).unwrap_or(ErrorClass::Io),
            message: w.message,
        }),
        Err(e) => Err(Error::io(
            format!("the daemon's reply is not valid: {e}"),
            std::io::Error::from_raw_os_error(libc::EPROTO),
        )),
    }
}
