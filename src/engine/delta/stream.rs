//! Ceph's `rbd diff v1` stream (what `rbd export-diff` writes and `rbd
//! import-diff` and `rbd merge-diff` read): a banner, metadata records
//! (`f` from-snapshot, `t` to-snapshot, `s` image size), data records
//! (`w` offset, length and the bytes; `z` offset and length of zeros), and
//! `e`. Integers are little-endian; names are a 32-bit length and bytes.

use std::io::{self, Read, Write};

pub const BANNER: &[u8] = b"rbd diff v1\n";
/// The longest snapshot name read (as Ceph's own tools).
const MAX_NAME: u32 = 4096;

/// Writes a stream, counting its bytes.
pub struct Writer<W: Write> {
    out: W,
    pub bytes: u64,
    pub records: u64,
}

impl<W: Write> Writer<W> {
    /// Writes the banner and metadata.
    pub fn start(out: W, from: Option<&str>, to: Option<&str>, size: u64) -> io::Result<Self> {
        let mut w = Writer {
            out,
            bytes: 0,
            records: 0,
        };
        w.put(BANNER)?;
        for (tag, name) in [(b'f', from), (b't', to)] {
            if let Some(name) = name {
                w.put(&[tag])?;
                w.put(&(name.len() as u32).to_le_bytes())?;
                w.put(name.as_bytes())?;
            }
        }
        w.put(b"s")?;
        w.put(&size.to_le_bytes())?;
        Ok(w)
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.bytes += b.len() as u64;
        Ok(())
    }

    fn head(&mut self, tag: u8, off: u64, len: u64) -> io::Result<()> {
        let mut h = [0u8; 17];
        h[0] = tag;
        h[1..9].copy_from_slice(&off.to_le_bytes());
        h[9..17].copy_from_slice(&len.to_le_bytes());
        self.records += 1;
        self.put(&h)
    }

    pub fn data(&mut self, off: u64, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.head(b'w', off, data.len() as u64)?;
        self.put(data)
    }

    pub fn zero(&mut self, off: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.head(b'z', off, len)
    }

    pub fn finish(mut self) -> io::Result<W> {
        self.put(b"e")?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// The metadata of a stream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Header {
    pub from: Option<String>,
    pub to: Option<String>,
    pub size: Option<u64>,
}

/// A data record.
#[derive(Debug, PartialEq, Eq)]
pub enum Record {
    Write { off: u64, len: u64 },
    Zero { off: u64, len: u64 },
    End,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_exact<R: Read>(r: &mut R, buf: &mut [u8], what: &str) -> io::Result<()> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => {
            bad(format!("the stream ends inside {what}: it is truncated"))
        }
        _ => e,
    })
}

fn u64_of<R: Read>(r: &mut R, what: &str) -> io::Result<u64> {
    let mut b = [0u8; 8];
    read_exact(r, &mut b, what)?;
    Ok(u64::from_le_bytes(b))
}

/// Reads a stream: the header with [`Reader::header`], then records.
pub struct Reader<R: Read> {
    inner: R,
    pending: Option<u8>,
}

impl<R: Read> Reader<R> {
    pub fn new(inner: R) -> Self {
        Reader {
            inner,
            pending: None,
        }
    }

    /// Reads the banner and the metadata records.
    pub fn header(&mut self) -> io::Result<Header> {
        let mut banner = [0u8; BANNER.len()];
        read_exact(&mut self.inner, &mut banner, "the banner")?;
        if banner != BANNER {
            return Err(bad(
                "not an rbd diff v1 stream (its first line is not \"rbd diff v1\")",
            ));
        }
        let mut h = Header::default();
        loop {
            let mut tag = [0u8; 1];
            read_exact(&mut self.inner, &mut tag, "the header")?;
            match tag[0] {
                t @ (b'f' | b't') => {
                    let mut l = [0u8; 4];
                    read_exact(&mut self.inner, &mut l, "a snapshot name")?;
                    let len = u32::from_le_bytes(l);
                    if len > MAX_NAME {
                        return Err(bad(format!("a snapshot name of {len} bytes")));
                    }
                    let mut name = vec![0u8; len as usize];
                    read_exact(&mut self.inner, &mut name, "a snapshot name")?;
                    let name = String::from_utf8(name)
                        .map_err(|_| bad("a snapshot name that is not UTF-8"))?;
                    *(if t == b'f' { &mut h.from } else { &mut h.to }) = Some(name);
                }
                b's' => h.size = Some(u64_of(&mut self.inner, "the size record")?),
                other => {
                    self.pending = Some(other);
                    return Ok(h);
                }
            }
        }
    }

    /// The next data record; a `Write`'s bytes follow, to be read with
    /// [`Reader::data`].
    pub fn record(&mut self) -> io::Result<Record> {
        let tag = match self.pending.take() {
            Some(t) => t,
            None => {
                let mut t = [0u8; 1];
                read_exact(&mut self.inner, &mut t, "the records (no end record)")?;
                t[0]
            }
        };
        match tag {
            b'e' => Ok(Record::End),
            b'w' | b'z' => {
                let off = u64_of(&mut self.inner, "a data record")?;
                let len = u64_of(&mut self.inner, "a data record")?;
                if len == 0 {
                    return Err(bad(format!("a record of length 0 at offset {off}")));
                }
                Ok(if tag == b'w' {
                    Record::Write { off, len }
                } else {
                    Record::Zero { off, len }
                })
            }
            other => Err(bad(format!(
                "an unknown record {:?} (0x{other:02x}) among the data records",
                other as char
            ))),
        }
    }

    /// Reads exactly `buf.len()` bytes of a `Write` record.
    pub fn data(&mut self, buf: &mut [u8]) -> io::Result<()> {
        read_exact(&mut self.inner, buf, "a data record's bytes")
    }

    /// Checks that nothing follows the end record.
    pub fn expect_eof(&mut self) -> io::Result<()> {
        let mut b = [0u8; 1];
        loop {
            match self.inner.read(&mut b) {
                Ok(0) => return Ok(()),
                Ok(_) => return Err(bad("data follows the end record")),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_reads_back_as_written() {
        let mut w = Writer::start(Vec::new(), Some("a"), Some("bb"), 8192).unwrap();
        w.data(0, b"hello").unwrap();
        w.zero(4096, 4096).unwrap();
        let bytes = w.finish().unwrap();
        assert!(bytes.starts_with(BANNER));
        let mut r = Reader::new(&bytes[..]);
        let h = r.header().unwrap();
        assert_eq!(
            (h.from.as_deref(), h.to.as_deref(), h.size),
            (Some("a"), Some("bb"), Some(8192))
        );
        assert_eq!(r.record().unwrap(), Record::Write { off: 0, len: 5 });
        let mut d = [0u8; 5];
        r.data(&mut d).unwrap();
        assert_eq!(&d, b"hello");
        assert_eq!(
            r.record().unwrap(),
            Record::Zero {
                off: 4096,
                len: 4096
            }
        );
        assert_eq!(r.record().unwrap(), Record::End);
        r.expect_eof().unwrap();
        // Every truncation is an error, never a shorter image.
        for cut in 0..bytes.len() - 1 {
            let mut r = Reader::new(&bytes[..cut]);
            let res = r.header().and_then(|_| loop {
                match r.record()? {
                    Record::Write { len, .. } => r.data(&mut vec![0; len as usize])?,
                    Record::Zero { .. } => {}
                    Record::End => break Ok(()),
                }
            });
            assert!(res.is_err(), "cut at {cut}");
        }
    }
}
