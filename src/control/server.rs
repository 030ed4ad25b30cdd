//! The daemon's control socket, `POOL/.reflinkfs/control.sock` (mode 0600).
//!
//! One request per connection: a JSON line, with a file descriptor attached
//! (SCM_RIGHTS) for import and export; one JSON reply line. Peers are
//! checked with SO_PEERCRED: root or the pool's owner. A malformed,
//! oversized or unknown request gets an error reply, and the daemon keeps
//! serving.

use super::{
    execute, major_of, protocol_version, version_mismatch, Daemon, Message, Reply, Request,
    WireError, MAX_REQUEST, PROTOCOL_MAJOR,
};
use crate::engine::{guard, Pool};
use crate::error::Error;
use crate::sys;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

/// How long a reply may wait for a client that does not read it.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Binds the socket (replacing a stale one: the caller holds the pool's
/// lock, so no other daemon can be using it) and serves it on a thread.
///
/// The socket is bound through the open metadata directory (never through
/// a `.reflinkfs` swapped for a symlink) and created under a umask that
/// makes it 0600 from the start: nothing is changed by path afterwards.
/// Call it before the daemon starts other threads (the umask is
/// process-wide).
pub fn spawn(pool: Arc<Pool>, daemon: Arc<dyn Daemon>) -> std::io::Result<()> {
    let path = pool.control_socket_path();
    if pool.remove_meta_file(crate::engine::pool::CONTROL_SOCKET)? {
        log::info!("removed stale control socket {}", path.display());
    }
    let old_mask = sys::umask(0o177);
    let bound = UnixListener::bind(pool.control_socket_fd_path());
    sys::umask(old_mask);
    let listener = bound?;
    let owner = pool.owner_uid()?;
    // The pool's owner may administer it: the 0600 socket is theirs.
    if owner != sys::getuid() {
        pool.give_meta_file_to_owner(crate::engine::pool::CONTROL_SOCKET)?;
    }
    log::info!(
        "control socket {} (root and uid {owner} may use it)",
        path.display()
    );
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            // A panic here (not in a request: each has its own guard)
            // must not end the control socket.
            guard::keep_running("the control socket's listener", || {
                accept_loop(&listener, &pool, &daemon, owner)
            })
        })?;
    Ok(())
}

/// Accepts connections, each served on its own thread, whose panic is
/// logged and counted (the client sees its connection closed).
fn accept_loop(listener: &UnixListener, pool: &Arc<Pool>, daemon: &Arc<dyn Daemon>, owner: u32) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let pool = pool.clone();
                let daemon = daemon.clone();
                let spawned = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        guard::catch("a control request", || {
                            serve(stream, &pool, daemon.as_ref(), owner)
                        });
                    });
                if let Err(e) = spawned {
                    log::error!("control: cannot start a thread: {e}");
                }
            }
            Err(e) => {
                log::error!("control: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Removes the socket file at shutdown.
pub fn remove(pool: &Pool) {
    let _ = pool.remove_meta_file(crate::engine::pool::CONTROL_SOCKET);
}

fn send(stream: &mut UnixStream, reply: &Reply) {
    let mut line = serde_json::to_vec(reply).expect("replies serialise");
    line.push(b'\n');
    // A client that stops reading must not keep this thread for ever.
    let _ = stream.set_write_timeout(Some(SEND_TIMEOUT));
    if let Err(e) = stream.write_all(&line) {
        log::warn!("control: could not send the reply: {e}");
    }
}

fn refuse(stream: &mut UnixStream, e: &Error) {
    send(stream, &Reply::error(WireError::from(e)));
}

fn bad_request(reason: impl Into<String>) -> Error {
    Error::InvalidValue {
        property: "request".into(),
        reason: reason.into(),
    }
}

/// Reads one request line and the fd that came with it.
fn read_request(stream: &UnixStream) -> Result<(Vec<u8>, Option<OwnedFd>), Error> {
    let mut line = Vec::new();
    let mut fd = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (n, got) = sys::recv_with_fd(stream.as_fd(), &mut buf)
            .map_err(|e| Error::io("reading the request", e))?;
        if fd.is_none() {
            fd = got;
        }
        if n == 0 {
            break;
        }
        line.extend_from_slice(&buf[..n]);
        if let Some(pos) = line.iter().position(|&b| b == b'\n') {
            line.truncate(pos);
            break;
        }
        if line.len() > MAX_REQUEST {
            return Err(bad_request(format!(
                "the request is longer than {MAX_REQUEST} bytes"
            )));
        }
    }
    Ok((line, fd))
}

fn serve(mut stream: UnixStream, pool: &Pool, daemon: &dyn Daemon, owner: u32) {
    let (pid, uid) = match sys::peer_cred(stream.as_fd()) {
        Ok((pid, uid, _)) => (pid, uid),
        Err(e) => {
            log::warn!("control: no peer credentials: {e}");
            return;
        }
    };
    if uid != 0 && uid != owner {
        log::warn!("control: refused a request from uid {uid} (PID {pid}): only root and the pool's owner (uid {owner}) may administer it");
        refuse(
            &mut stream,
            &Error::Refused {
                vid: "control socket".into(),
                reason: format!("uid {uid} may not administer this pool; only root and its owner (uid {owner}) may"),
            },
        );
        return;
    }
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let (line, fd) = match read_request(&stream) {
        Ok(r) => r,
        Err(e) => {
            log::warn!("control: bad request from PID {pid}: {e}");
            refuse(&mut stream, &e);
            drain(&mut stream);
            return;
        }
    };
    let msg: Message = match serde_json::from_slice(&line) {
        Ok(m) => m,
        Err(e) => {
            // An unversioned request (`{"op": …}`) comes from a client older
            // than the protocol's versions.
            let unversioned = serde_json::from_slice::<serde_json::Value>(&line)
                .is_ok_and(|v| v.get("op").is_some() && v.get("protocol").is_none());
            let err = if unversioned {
                version_mismatch(
                    "0 (unversioned)",
                    "the client",
                    "use the reflinkfs that mounted this pool, or mount it with the client's",
                )
            } else {
                bad_request(format!("not a valid request: {e}"))
            };
            log::warn!("control: {err} (PID {pid})");
            refuse(&mut stream, &err);
            return;
        }
    };
    if major_of(&msg.protocol) != Some(PROTOCOL_MAJOR) {
        let err = version_mismatch(
            &msg.protocol,
            "the client",
            "use the reflinkfs that mounted this pool, or mount it with the client's",
        );
        log::warn!("control: refused PID {pid}: {err}");
        refuse(&mut stream, &err);
        return;
    }
    let req = msg.request;
    log::debug!(
        "control: protocol {} (daemon {})",
        msg.protocol,
        protocol_version()
    );
    let _ = stream.set_read_timeout(None);
    let fd = fd.map(File::from);
    if req.takes_fd() && fd.is_none() {
        refuse(
            &mut stream,
            &bad_request("this operation needs a file descriptor passed with the request"),
        );
        return;
    }
    log::info!("control: {req:?} from PID {pid} (uid {uid})");
    crate::engine::failpoint::panic_if!("control", format!("{req:?}"));
    let changes = changes_the_mount(&req);
    let result = execute(pool, req, fd, Some(daemon), Some(pid));
    // A change shows on the mount before its reply. A read-only request
    // does not wait: an invalidation may wait for a directory's lock that
    // an unlink or rename waiting for a volume's import holds.
    if changes {
        daemon.settled();
    }
    match result {
        Ok(response) => send(&mut stream, &Reply::ok(response)),
        Err(e) => {
            log::warn!("control: request from PID {pid} failed: {e}");
            refuse(&mut stream, &e);
        }
    }
}

/// Whether a request may change what the mount shows (its reply then
/// waits until the kernel's caches of it are dropped). `volume_wait_stopped`
/// does: the commit it waits for changed the files.
fn changes_the_mount(req: &Request) -> bool {
    !matches!(
        req,
        Request::PoolInfo
            | Request::Status
            | Request::VolumeList
            | Request::VolumeInfo { .. }
            | Request::VolumeRevisions { .. }
            | Request::VolumeExport { .. }
            | Request::VolumeDiff { .. }
    )
}

/// After refusing an oversized request, reads and drops the rest for a
/// little while, so the client gets to read the reply instead of a reset.
fn drain(stream: &mut UnixStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0usize;
    while total < (64 << 20) {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
}
