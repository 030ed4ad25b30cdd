//! Processes, signals and sockets: fork and detach, the signal mask,
//! thread priority, peer credentials, and passing an fd over a socket.

use super::{cvt, cvt_ssize};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// A pipe with both ends close-on-exec: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a writable array of two ints, as pipe2 requires.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 just returned these two fds and nothing else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The two sides of `fork()`.
pub enum Forked {
    Parent { child: libc::pid_t },
    Child,
}

/// `fork()`.
///
/// # Safety
///
/// The process must have a single thread. The child of a multi-threaded
/// process gets copies of locks (the allocator's, stdio's) held by threads
/// that do not exist in it, and may deadlock on its first allocation.
pub unsafe fn fork() -> io::Result<Forked> {
    // SAFETY: the caller guarantees a single thread (see above).
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        child => Ok(Forked::Parent { child }),
    }
}

/// `setsid()`: a new session, detached from the terminal.
pub fn setsid() -> io::Result<()> {
    // SAFETY: plain syscall without arguments.
    cvt(unsafe { libc::setsid() }).map(drop)
}

/// Points stdin, stdout and stderr at `file` (`dup2` onto 0, 1 and 2).
/// Only the three standard descriptors can be replaced this way: an fd
/// that Rust code owns is never closed behind its owner's back.
pub fn redirect_stdio(file: BorrowedFd<'_>) -> io::Result<()> {
    for to in [libc::STDIN_FILENO, libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        // SAFETY: `file` is open; `to` is a standard descriptor, which no
        // Rust object owns, and dup2 closes and replaces it atomically.
        cvt(unsafe { libc::dup2(file.as_raw_fd(), to) })?;
    }
    Ok(())
}

/// Blocks `signals` in the calling thread (and in threads it starts later),
/// so that one thread can take them with [`wait_signal`].
pub fn block_signals(signals: &[libc::c_int]) -> io::Result<()> {
    let set = sigset(signals);
    // SAFETY: `set` is an initialised sigset_t; the old mask is not needed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set; sigaddset only adds valid
    // signal numbers to the initialised set.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        for &s in signals {
            libc::sigaddset(set.as_mut_ptr(), s);
        }
        set.assume_init()
    }
}

/// `SIGTERM` for 15, and so on, for logs.
pub fn signal_name(sig: libc::c_int) -> String {
    match sig {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGHUP => "SIGHUP".into(),
        n => format!("signal {n}"),
    }
}

/// Waits for one of `signals` (which must be blocked) and returns it.
pub fn wait_signal(signals: &[libc::c_int]) -> io::Result<libc::c_int> {
    let set = sigset(signals);
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is initialised and `sig` is a valid place for the result.
    let r = unsafe { libc::sigwait(&set, &mut sig) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(sig)
}

/// Sets the process's file mode creation mask; returns the old one. The
/// mask is process-wide: call it only while no other thread creates files.
pub fn umask(mask: libc::mode_t) -> libc::mode_t {
    // SAFETY: umask cannot fail and touches no memory.
    unsafe { libc::umask(mask) }
}

/// 64 random bits from the kernel (`getrandom`), for ids that must not
/// repeat across a pool's life.
pub fn random_u64() -> u64 {
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of a
        // buffer we own; getrandom writes at most that many bytes.
        let n = unsafe { libc::getrandom(buf[got..].as_mut_ptr().cast(), buf.len() - got, 0) };
        if n > 0 {
            got += n as usize;
        } else if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // getrandom only fails before the entropy pool is ready, long
            // before a pool is used; fall back to the clock.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            return t ^ u64::from(std::process::id()) << 32;
        }
    }
    u64::from_ne_bytes(buf)
}

/// Lowers the calling thread's CPU priority (nice +`n`): the daemon's
/// threads that copy and commit yield the CPU to the threads that answer
/// requests. Errors (no permission to renice) leave it as it was.
pub fn lower_thread_priority(n: libc::c_int) {
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority only changes the scheduling of thread `tid`, this
    // thread; who = a TID is what Linux takes for PRIO_PROCESS.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, n) };
}

/// The real user id of the process.
pub fn getuid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

/// The peer of a connected Unix socket (`SO_PEERCRED`): (pid, uid, gid).
pub fn peer_cred(sock: BorrowedFd<'_>) -> io::Result<(i32, u32, u32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writing, and `len` holds the
    // size of `cred`, as getsockopt requires.
    cvt(unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok((cred.pid, cred.uid, cred.gid))
}

/// `pidfd_open(pid)`: a handle on a process that stays about that process
/// (never one that reuses its PID). Errors: `ESRCH` (no such process).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1;
    // no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0 as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// Whether the process of a pidfd has exited (its pidfd polls readable).
/// An error of poll counts as not exited: the caller keeps what it has.
pub fn pidfd_exited(fd: BorrowedFd<'_>) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd, and the count says one.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n == 1 && pfd.revents & libc::POLLIN != 0
}

/// Sends `data` on a Unix stream socket, with `fd` attached as SCM_RIGHTS
/// when given. Returns the bytes sent (the ancillary data goes with the
/// first byte). Errors: `EPIPE`, `ECONNRESET`.
pub fn send_with_fd(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // Room for one fd, aligned as cmsghdr requires.
    let mut cbuf = [0u64; 4];
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE is a pure computation on a constant size.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg_control points at `cbuf`, which is larger than
        // `space`; CMSG_FIRSTHDR returns a pointer inside it, and the data
        // written (one int) fits in the space CMSG_SPACE reserved.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>(), fd.as_raw_fd());
        }
    }
    // SAFETY: `msg` points at `iov` and `cbuf`, both alive for the call.
    cvt_ssize(unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) })
}

/// Receives into `buf` from a Unix stream socket, with at most one fd
/// passed as SCM_RIGHTS (any more are closed). Returns the bytes read (0
/// at end of stream) and the fd.
pub fn recv_with_fd(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 8];
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf);
    // SAFETY: `msg` points at `iov` (over `buf`) and `cbuf`, both alive and
    // writable for the call.
    let n =
        cvt_ssize(unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) })?;
    let mut got: Option<OwnedFd> = None;
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of
    // cmsg headers; the CMSG_* macros walk exactly those, and each
    // SCM_RIGHTS payload holds whole ints, each a new fd we now own.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            // A header whose length is shorter than a header carries no fd
            // (and must not wrap around into a huge count).
            let payload = ((*c).cmsg_len as usize).checked_sub(libc::CMSG_LEN(0) as usize);
            if let (libc::SOL_SOCKET, libc::SCM_RIGHTS, Some(payload)) =
                ((*c).cmsg_level, (*c).cmsg_type, payload)
            {
                let count = payload / std::mem::size_of::<libc::c_int>();
                let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
                for i in 0..count {
                    let fd = OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i)));
                    if got.is_none() {
                        got = Some(fd);
                    }
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n, got))
}

/// Whether an fd is a terminal.
pub fn is_tty(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: isatty only inspects the fd.
    unsafe { libc::isatty(fd.as_raw_fd()) == 1 }
}
