//! The data side of diffs and exports: reads of many ranges, issued in
//! parallel and delivered in order, and the block-by-block comparison that
//! decides where no change map does.

use super::ranges::{pieces, push};
use crate::sys;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};

/// Reads at once, at most.
const THREADS: usize = 4;
/// The largest single read.
pub const MAX_READ: u64 = 1 << 20;
/// The bytes one batch of parallel reads holds in memory.
const BATCH_BYTES: u64 = 32 << 20;
/// Comparison and zero detection work in blocks of this size.
pub const BLOCK: usize = 4096;

/// Runs `work` on every piece, up to [`THREADS`] at a time, and gives the
/// results to `sink` in the pieces' order.
pub fn parallel_in_order<I: Copy + Sync, T: Send>(
    list: &[I],
    weight: impl Fn(&I) -> u64,
    work: impl Fn(I) -> io::Result<T> + Sync,
    mut sink: impl FnMut(I, T) -> io::Result<()>,
) -> io::Result<()> {
    let mut i = 0;
    while i < list.len() {
        let mut j = i;
        let mut bytes = 0;
        while j < list.len() && (j == i || bytes + weight(&list[j]) <= BATCH_BYTES) {
            bytes += weight(&list[j]);
            j += 1;
        }
        let batch = &list[i..j];
        let n = THREADS.min(batch.len());
        let mut per_thread: Vec<io::Result<Vec<T>>> = if n == 1 {
            vec![batch.iter().map(|&p| work(p)).collect()]
        } else {
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..n)
                    .map(|t| {
                        let work = &work;
                        s.spawn(move || batch.iter().skip(t).step_by(n).map(|&p| work(p)).collect())
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("a reader thread panicked"))
                    .collect()
            })
        };
        let mut iters = Vec::with_capacity(n);
        for r in per_thread.drain(..) {
            iters.push(r?.into_iter());
        }
        for (k, &p) in batch.iter().enumerate() {
            let t = iters[k % n].next().expect("one result per piece");
            sink(p, t)?;
        }
        i = j;
    }
    Ok(())
}

/// Reads `[s, e)` of `f` exactly, counting the bytes in `read`.
pub fn read_range(f: &File, (s, e): (u64, u64), read: &AtomicU64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; (e - s) as usize];
    let mut got = 0;
    while got < buf.len() {
        let n = sys::pread(f.as_fd(), &mut buf[got..], s + got as u64)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "an image is shorter than its size",
            ));
        }
        got += n;
    }
    read.fetch_add(buf.len() as u64, Ordering::Relaxed);
    Ok(buf)
}

/// The sub-ranges of `candidates` (all below both files' sizes) where `a`
/// and `b` differ, block by block. Counts the bytes read.
pub fn compare_data(
    a: &File,
    b: &File,
    candidates: &[(u64, u64)],
    read: &AtomicU64,
) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    parallel_in_order(
        &pieces(candidates, MAX_READ),
        |p| p.1 - p.0,
        |p: (u64, u64)| {
            let x = read_range(a, p, read)?;
            let y = read_range(b, p, read)?;
            let mut diff = Vec::new();
            for (k, (u, v)) in x.chunks(BLOCK).zip(y.chunks(BLOCK)).enumerate() {
                if u != v {
                    let s = p.0 + (k * BLOCK) as u64;
                    push(&mut diff, s, s + u.len() as u64);
                }
            }
            Ok(diff)
        },
        |_, diff| {
            for (s, e) in diff {
                push(&mut out, s, e);
            }
            Ok(())
        },
    )?;
    Ok(out)
}

/// Whether a block is all zeros.
pub fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}
