//! `volume diff`, `volume export --delta/--since` and `volume import
//! --delta` (doc/DELTA.md).

use super::changes;
use super::ids::{self, RevId};
use super::io::{compare_data, is_zero, parallel_in_order, read_range, BLOCK, MAX_READ};
use super::ranges::{clip, pieces, push, total, union};
use super::stream::{Reader, Record, Writer};
use crate::engine::lifecycle::{io_ctx, open_image};
use crate::engine::pool::{Names, Pool};
use crate::engine::vid::ValidVid;
use crate::error::refused;
use crate::error::{Error, Result};
use crate::sys;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};

/// `volume diff`: the byte ranges where two images of a volume differ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffReport {
    pub vid: String,
    pub from: String,
    pub to: String,
    pub from_id: Option<String>,
    pub to_id: Option<String>,
    pub from_size: u64,
    pub to_size: u64,
    /// `change map`, `same image`, or `extents and data` (no map joins the
    /// two: their extents and then their data were compared).
    pub method: String,
    pub changed_bytes: u64,
    /// Data bytes read to decide (0 with a change map).
    pub bytes_read: u64,
    /// `[offset, length]` of each changed range, ascending.
    pub ranges: Vec<[u64; 2]>,
}

/// `volume export --delta` or `--since`: what the stream holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportReport {
    pub vid: String,
    pub dest: String,
    pub from_id: Option<String>,
    pub to_id: String,
    pub size: u64,
    pub method: String,
    pub changed_bytes: u64,
    pub records: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub bytes_read: u64,
    pub stream_bytes: u64,
}

/// `volume import --delta`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportReport {
    pub vid: String,
    pub source: String,
    pub from_id: Option<String>,
    pub to_id: String,
    pub size: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    /// The revision the previous image was kept as.
    pub saved_as: Option<u64>,
}

/// Changed ranges, how they were found, and the data bytes read for it.
type Changes = (Vec<(u64, u64)>, &'static str, u64);

/// One image of a volume, open.
struct Point {
    file: File,
    label: String,
    size: u64,
    id: Option<RevId>,
}

fn size_of(f: &File) -> std::io::Result<u64> {
    Ok(sys::fstat(f.as_fd())?.st_size as u64)
}

fn bad_stream(vid: &ValidVid, e: std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::InvalidData => Error::InvalidValue {
            property: "the delta stream".into(),
            reason: format!("{e}; {vid} was not changed"),
        },
        _ => Error::io(format!("{vid}: reading the delta stream"), e),
    }
}

impl Pool {
    /// Opens the committed image (`which` = None), a revision K, or the
    /// image or revision whose id is `which`. With `assign`, an image from
    /// before ids gets one now.
    fn open_point(&self, vid: &ValidVid, which: Option<&str>, assign: bool) -> Result<Point> {
        let kind = self.volume(vid)?.config().kind();
        kind.need_origin(vid, "a diff or delta")?;
        if let Some(want) = which.and_then(RevId::parse) {
            return self.point_by_id(vid, want);
        }
        let (file, shown) = self.open_export_source(vid, which)?;
        let ctx = |e| Error::io(format!("{vid}: reading the id of {}", shown.display()), e);
        let id = match assign {
            true => ids::id_or_assign(&file).map_err(ctx)?,
            false => ids::read_id(&file).map_err(ctx)?,
        };
        let size =
            size_of(&file).map_err(|e| Error::io(format!("examining {}", shown.display()), e))?;
        let label = which.map_or("the committed image".into(), |k| format!("revision {k}"));
        Ok(Point {
            file,
            label,
            size,
            id,
        })
    }

    fn point_by_id(&self, vid: &ValidVid, want: RevId) -> Result<Point> {
        let dir = self.vm_dir(vid, false)?;
        let mut names = vec![(Names::of(vid).img(), "the committed image".to_owned())];
        for r in self.list_revisions(vid, Some(&dir))? {
            names.push((r.file_name.clone(), format!("revision {}", r.id)));
        }
        for (name, label) in names {
            let Ok(file) = open_image(&dir, vid, &name, libc::O_RDONLY) else {
                continue;
            };
            if ids::read_id(&file).ok().flatten() == Some(want) {
                let size = size_of(&file).map_err(io_ctx(&dir, "examining", &name))?;
                return Ok(Point {
                    file,
                    label,
                    size,
                    id: Some(want),
                });
            }
        }
        Err(Error::InvalidValue {
            property: "revision".into(),
            reason: format!("no image or revision of {vid} has the id {want}"),
        })
    }

    /// The ranges of `b` that may differ from `a` (every range left out is
    /// equal), how that was decided, and the data bytes read for it.
    fn changes_between(&self, vid: &ValidVid, a: &Point, b: &Point) -> Result<Changes> {
        let common = a.size.min(b.size);
        if let (Some(x), Some(y)) = (a.id, b.id) {
            if x == y {
                return Ok((Vec::new(), "same image", 0));
            }
            let dir = changes::changes_dir(&self.meta, vid, false)
                .map_err(|e| Error::io(format!("{vid}: opening its change maps"), e))?;
            if let Some(steps) = dir.and_then(|d| changes::chain(&d, x, y)) {
                let mut out = clip(&union(&steps), b.size);
                out = union(&[out, vec![(common, b.size)]]);
                return Ok((out, "change map", 0));
            }
        }
        let read = AtomicU64::new(0);
        let ctx = |e| Error::io(format!("{vid}: comparing {} with {}", a.label, b.label), e);
        let candidates = match changes::extent_changes(&a.file, a.size, &b.file, b.size) {
            Ok(c) => clip(&c, common),
            Err(_) => vec![(0, common)],
        };
        let mut out = compare_data(&a.file, &b.file, &candidates, &read).map_err(ctx)?;
        push(&mut out, common, b.size);
        Ok((out, "extents and data", read.load(Ordering::Relaxed)))
    }

    /// `volume diff VID --from K [--to K2]` (default: the committed image).
    pub fn diff(&self, vid: &ValidVid, from: &str, to: Option<&str>) -> Result<DiffReport> {
        let a = self.open_point(vid, Some(from), false)?;
        let b = self.open_point(vid, to, false)?;
        let (ranges, method, bytes_read) = self.changes_between(vid, &a, &b)?;
        Ok(DiffReport {
            vid: vid.to_string(),
            from: a.label,
            to: b.label,
            from_id: a.id.map(|i| i.to_string()),
            to_id: b.id.map(|i| i.to_string()),
            from_size: a.size,
            to_size: b.size,
            method: method.into(),
            changed_bytes: total(&ranges),
            bytes_read,
            ranges: ranges.iter().map(|&(s, e)| [s, e - s]).collect(),
        })
    }

    /// `volume export VID --delta [--since K] FILE`: the committed image as
    /// an `rbd diff v1` stream, whole (no from-snapshot) or as the changes
    /// since revision K. Both ends are named by their ids.
    pub fn export_delta(
        &self,
        vid: &ValidVid,
        since: Option<&str>,
        dest: &File,
        dest_label: &str,
    ) -> Result<ExportReport> {
        let b = self.open_point(vid, None, true)?;
        let no_id = |p: &Point| {
            refused(
                vid,
                format!(
                    "{} has no id (its filesystem has no extended attributes)",
                    p.label
                ),
            )
        };
        let to_id = b.id.ok_or_else(|| no_id(&b))?;
        let (changed, method, mut bytes_read, from_id) = match since {
            Some(k) => {
                let a = self.open_point(vid, Some(k), true)?;
                let from_id = a.id.ok_or_else(|| no_id(&a))?;
                let (r, m, read) = self.changes_between(vid, &a, &b)?;
                (r, m, read, Some(from_id))
            }
            None => (vec![(0, b.size)], "full", 0, None),
        };
        let read = AtomicU64::new(0);
        let from_name = from_id.map(|i| i.to_string());
        let sums = write_stream(
            &b,
            &changed,
            from_name.as_deref(),
            &to_id.to_string(),
            dest,
            &read,
        )
        .map_err(|e| Error::io(format!("{vid}: exporting to {dest_label}"), e))?;
        bytes_read += read.load(Ordering::Relaxed);
        log::info!(
            "{vid}: exported {} ({} bytes of data, {} records) {} -> {to_id} to {dest_label}",
            if since.is_some() {
                "a delta"
            } else {
                "a full stream"
            },
            sums.data,
            sums.records,
            from_name.as_deref().unwrap_or("(none)")
        );
        Ok(ExportReport {
            vid: vid.to_string(),
            dest: dest_label.into(),
            from_id: from_name,
            to_id: to_id.to_string(),
            size: b.size,
            method: method.into(),
            changed_bytes: total(&changed),
            records: sums.records,
            data_bytes: sums.data,
            zero_bytes: sums.zero,
            bytes_read,
            stream_bytes: sums.stream,
        })
    }
}

#[derive(Default)]
struct Sums {
    records: u64,
    data: u64,
    zero: u64,
    stream: u64,
}

/// What one stretch of the stream is: zeros known from the extent map, or
/// data to read (at most [`MAX_READ`] bytes).
#[derive(Clone, Copy)]
struct Item {
    range: (u64, u64),
    data: bool,
}

/// The items of `changed` (clipped to the image): holes and unwritten
/// extents are zeros without a read; the rest is read.
fn items_of(b: &Point, changed: &[(u64, u64)]) -> Vec<Item> {
    let data: Vec<(u64, u64)> = match sys::fiemap_physical(b.file.as_fd(), false) {
        Ok(ext) => {
            let mut d = Vec::new();
            for e in ext
                .iter()
                .filter(|e| e.flags & sys::FIEMAP_EXTENT_UNWRITTEN == 0)
            {
                push(&mut d, e.logical, e.logical + e.length);
            }
            d
        }
        Err(_) => vec![(0, b.size)],
    };
    let mut out = Vec::new();
    let mut j = 0;
    for &(s, e) in &clip(changed, b.size) {
        let mut at = s;
        while at < e {
            while data.get(j).is_some_and(|d| d.1 <= at) {
                j += 1;
            }
            let (next, is_data) = match data.get(j) {
                Some(&(ds, de)) if ds <= at => (de.min(e), true),
                Some(&(ds, _)) => (ds.min(e), false),
                None => (e, false),
            };
            if is_data {
                out.extend(
                    pieces(&[(at, next)], MAX_READ)
                        .into_iter()
                        .map(|range| Item { range, data: true }),
                );
            } else {
                out.push(Item {
                    range: (at, next),
                    data: false,
                });
            }
            at = next;
        }
    }
    out
}

/// Writes records, merging adjacent zeros into one `z`.
struct Emitter<W: std::io::Write> {
    w: Writer<W>,
    zeros: Option<(u64, u64)>,
    sums: Sums,
}

impl<W: std::io::Write> Emitter<W> {
    fn flush_zeros(&mut self) -> std::io::Result<()> {
        if let Some((s, e)) = self.zeros.take() {
            self.w.zero(s, e - s)?;
        }
        Ok(())
    }

    fn zero(&mut self, s: u64, e: u64) -> std::io::Result<()> {
        self.sums.zero += e - s;
        match &mut self.zeros {
            Some(z) if z.1 == s => z.1 = e,
            _ => {
                self.flush_zeros()?;
                self.zeros = Some((s, e));
            }
        }
        Ok(())
    }

    fn data(&mut self, off: u64, buf: &[u8]) -> std::io::Result<()> {
        self.flush_zeros()?;
        self.sums.data += buf.len() as u64;
        self.w.data(off, buf)
    }

    /// A block read at `base`: all-zero blocks become `z`, the rest `w`.
    fn read_data(&mut self, base: u64, buf: &[u8]) -> std::io::Result<()> {
        let mut run = None::<usize>;
        for (k, blk) in buf.chunks(BLOCK).enumerate() {
            let at = k * BLOCK;
            if is_zero(blk) {
                if let Some(r) = run.take() {
                    self.data(base + r as u64, &buf[r..at])?;
                }
                let s = base + at as u64;
                self.zero(s, s + blk.len() as u64)?;
            } else if run.is_none() {
                run = Some(at);
            }
        }
        if let Some(r) = run {
            self.data(base + r as u64, &buf[r..])?;
        }
        Ok(())
    }
}

/// Writes the stream of `changed` ranges of `b`: zero blocks as `z`
/// records, the rest as `w`, in ascending order.
fn write_stream(
    b: &Point,
    changed: &[(u64, u64)],
    from: Option<&str>,
    to: &str,
    dest: &File,
    read: &AtomicU64,
) -> std::io::Result<Sums> {
    let w = Writer::start(
        BufWriter::with_capacity(1 << 20, dest),
        from,
        Some(to),
        b.size,
    )?;
    let mut em = Emitter {
        w,
        zeros: None,
        sums: Sums::default(),
    };
    let items = items_of(b, changed);
    parallel_in_order(
        &items,
        |i| if i.data { i.range.1 - i.range.0 } else { 0 },
        |i| match i.data {
            true => read_range(&b.file, i.range, read).map(Some),
            false => Ok(None),
        },
        |item, buf| match buf {
            Some(buf) => em.read_data(item.range.0, &buf),
            None => em.zero(item.range.0, item.range.1),
        },
    )?;
    em.flush_zeros()?;
    let mut sums = em.sums;
    sums.records = em.w.records;
    sums.stream = em.w.bytes + 1;
    em.w.finish()?;
    Ok(sums)
}

impl Pool {
    /// `volume import VID --delta FILE`: applies an `rbd diff v1` stream to
    /// a stopped origin volume, into a new image that is committed as an
    /// import is (the previous one becomes a revision). A stream with a
    /// from-snapshot applies only onto the committed image with that id; one
    /// without is whole, and applies onto nothing (zeros). Refused, with
    /// nothing changed, on any other base, a truncated or malformed stream,
    /// or a record outside the image.
    pub fn import_delta(&self, vid: &ValidVid, source: &File, label: &str) -> Result<ImportReport> {
        let writes = !self.read_only();
        let (claim, _, dir) = self.claim_origin(
            vid,
            crate::engine::volume::OpName::Import,
            "importing a delta into it",
            writes,
        )?;
        let mut rd = Reader::new(BufReader::with_capacity(1 << 20, source));
        let h = rd.header().map_err(|e| bad_stream(vid, e))?;
        let bad = |reason: String| Error::InvalidValue {
            property: "the delta stream".into(),
            reason: format!("{reason}; {vid} was not changed"),
        };
        let size = h.size.ok_or_else(|| bad("it has no size record".into()))?;
        crate::engine::size::check_size(size, &size.to_string())?;
        let v = vid.to_string();
        let n = Names::of(vid);
        let from_id = match &h.from {
            None => None,
            Some(name) => {
                let want = RevId::parse(name).ok_or_else(|| {
                    bad(format!(
                        "it applies onto snapshot {name:?}, which is not a reflinkfs revision id"
                    ))
                })?;
                let cur = open_image(&dir, vid, &n.img(), libc::O_RDONLY)?;
                let have =
                    ids::read_id(&cur).map_err(io_ctx(&dir, "reading the id of", &n.img()))?;
                if have != Some(want) {
                    return Err(refused(vid, format!(
                        "the delta applies onto revision id {want}, but the committed image is {}; nothing was changed",
                        have.map_or("without an id".into(), |i| format!("id {i}"))
                    )));
                }
                Some((want, cur))
            }
        };
        // The stream's to-name becomes the new image's id, unless this
        // volume already has that id (the base's, or a revision's): two
        // images of one id would make a diff between them call them equal.
        let taken = |id: &RevId| {
            from_id.as_ref().is_some_and(|(f, _)| f == id)
                || self.revision_ids(vid, &dir).contains(id)
        };
        let to_id = match h.to.as_deref().and_then(RevId::parse) {
            Some(id) if !taken(&id) => id,
            Some(id) => {
                log::warn!("{vid}: the delta's to-snapshot {id} is an id this volume already has; the new image gets a new one");
                RevId::random()
            }
            None => RevId::random(),
        };
        let tmp = n.import();
        dir.remove_if_exists(&v, &tmp)
            .map_err(io_ctx(&dir, "removing", &tmp))?;
        let made = match &from_id {
            Some((_, cur)) => dir
                .copy_from(&v, cur, &dir.shown(&n.img()), &tmp, self.copy_strategy())
                .map(|(f, _)| f),
            None => dir.create_sparse(&v, &tmp, size),
        };
        let f = made.map_err(io_ctx(&dir, "creating", &tmp))?;
        let applied = apply(&mut rd, &f, size)
            .map_err(|e| bad_stream(vid, e))
            .and_then(|sums| {
                ids::stamp(&f, to_id).map_err(io_ctx(&dir, "writing the id of", &tmp))?;
                Ok(sums)
            });
        let sums = applied.inspect_err(|_| dir.remove_tmp(&v, &tmp))?;
        let saved_as = self
            .replace_committed(&claim.volume, &dir, &f, &tmp, "import", None)
            .inspect_err(|_| dir.remove_tmp(&v, &tmp))?;
        log::info!("{vid}: imported a delta from {label}: now id {to_id}");
        Ok(ImportReport {
            vid: v,
            source: label.into(),
            from_id: from_id.map(|(i, _)| i.to_string()),
            to_id: to_id.to_string(),
            size,
            data_bytes: sums.data,
            zero_bytes: sums.zero,
            saved_as,
        })
    }
}

/// Applies the records of a stream to `f`, made `size` bytes long.
fn apply<R: std::io::Read>(rd: &mut Reader<R>, f: &File, size: u64) -> std::io::Result<Sums> {
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    sys::ftruncate(f.as_fd(), size)?;
    let mut sums = Sums::default();
    let mut buf = vec![0u8; MAX_READ as usize];
    loop {
        let (off, len, data) = match rd.record()? {
            Record::End => break,
            Record::Write { off, len } => (off, len, true),
            Record::Zero { off, len } => (off, len, false),
        };
        if off.checked_add(len).is_none_or(|end| end > size) {
            return Err(bad(format!(
                "a record for {len} bytes at offset {off} lies beyond the image's {size} bytes"
            )));
        }
        if data {
            let mut done = 0;
            while done < len {
                let k = (len - done).min(MAX_READ) as usize;
                rd.data(&mut buf[..k])?;
                crate::engine::fsops::write_all_at(f, &buf[..k], off + done)?;
                done += k as u64;
            }
            sums.data += len;
        } else {
            zero_range(f, off, len)?;
            sums.zero += len;
        }
        sums.records += 1;
    }
    rd.expect_eof()?;
    Ok(sums)
}

/// Makes `len` bytes at `off` read as zeros: a punched hole, or written
/// zeros where holes cannot be punched.
fn zero_range(f: &File, off: u64, len: u64) -> std::io::Result<()> {
    match sys::punch_hole(f.as_fd(), off, len) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            let z = vec![0u8; MAX_READ as usize];
            let mut done = 0;
            while done < len {
                let k = (len - done).min(MAX_READ) as usize;
                crate::engine::fsops::write_all_at(f, &z[..k], off + done)?;
                done += k as u64;
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}
