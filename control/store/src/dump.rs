//! The body of a Raft snapshot: the whole MVCC state as one byte stream, written row by
//! row from a RocksDB snapshot and read back row by row, so that neither the member that
//! builds a snapshot nor the one that installs it holds the store in memory.
//!
//! # Layout
//! Integers are LEB128 varints, as postcard writes them; signed ones are zigzagged first.
//! A byte string is its length, then its bytes.
//! 1. [`MAGIC`].
//! 2. The revision, the compact revision, the number of `meta` rows, and those rows
//!    (key, value).
//! 3. The rows of the `kv` and `rev` column families in key order, each a tag byte
//!    ([`TAG_KV`] or [`TAG_REV`]), its key and its value.
//! 4. [`TAG_END`], then the CRC-32 of everything before it, 4 bytes little-endian.
//!
//! Rows carry a tag rather than a count per family because the count is only known once
//! the rows are written, and a stream cannot go back to put it in front of them.

use std::io::{self, Read, Write};

use crate::types::Revision;

/// The first bytes of a body; the last byte is the layout's version.
pub(crate) const MAGIC: &[u8; 8] = b"BATONSN\x02";
const TAG_END: u8 = 0;
const TAG_KV: u8 = 1;
const TAG_REV: u8 = 2;
/// The longest key or value a body may carry. A corrupt length then fails as malformed
/// instead of asking for an allocation of that size. Values are bounded far below this
/// by the transaction size limit.
const MAX_FIELD: u64 = 256 << 20;
/// The most `meta` rows a body may carry (a store has a handful).
const MAX_META_ROWS: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("reading or writing a snapshot body failed")]
    Io(#[from] io::Error),
    #[error("the snapshot body is malformed: {0}")]
    Malformed(&'static str),
    #[error("the snapshot body's checksum is {computed:08x}, but it records {recorded:08x}")]
    Checksum { recorded: u32, computed: u32 },
}

/// Which column family a row belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    Kv,
    Rev,
}

/// What precedes the rows: the store's position and its `meta` rows (the Raft position
/// among them, so that a snapshot is consistent with the log id it claims).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Head {
    pub revision: Revision,
    pub compact_revision: Revision,
    pub meta: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Head {
    /// A row of `meta`.
    pub(crate) fn meta(&self, key: &[u8]) -> Option<&[u8]> {
        self.meta
            .iter()
            .find(|(k, _)| k.as_slice() == key)
            .map(|(_, v)| v.as_slice())
    }
}

fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn unzigzag(n: u64) -> i64 {
    ((n >> 1) as i64) ^ -((n & 1) as i64)
}

/// Writes a body to `out`, checksumming as it goes.
pub(crate) struct DumpWriter<W: Write> {
    out: W,
    crc: crc32fast::Hasher,
    written: u64,
}

impl<W: Write> DumpWriter<W> {
    /// Starts a body: the magic and the head.
    pub(crate) fn new(out: W, head: &Head) -> Result<Self, DumpError> {
        let mut w = Self {
            out,
            crc: crc32fast::Hasher::new(),
            written: 0,
        };
        w.put(MAGIC)?;
        w.varint(zigzag(head.revision))?;
        w.varint(zigzag(head.compact_revision))?;
        w.varint(head.meta.len() as u64)?;
        for (k, v) in &head.meta {
            w.bytes(k)?;
            w.bytes(v)?;
        }
        Ok(w)
    }

    pub(crate) fn row(
        &mut self,
        family: Family,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), DumpError> {
        self.put(&[match family {
            Family::Kv => TAG_KV,
            Family::Rev => TAG_REV,
        }])?;
        self.bytes(key)?;
        Ok(self.bytes(value)?)
    }

    /// Ends the body: returns the writer and the body's length in bytes.
    pub(crate) fn finish(mut self) -> Result<(W, u64), DumpError> {
        self.put(&[TAG_END])?;
        let crc = self.crc.clone().finalize();
        self.out.write_all(&crc.to_le_bytes())?;
        Ok((self.out, self.written + 4))
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.crc.update(b);
        self.written += b.len() as u64;
        self.out.write_all(b)
    }

    fn varint(&mut self, mut n: u64) -> io::Result<()> {
        let mut buf = [0u8; 10];
        let mut i = 0;
        while n >= 0x80 {
            buf[i] = (n as u8) | 0x80;
            n >>= 7;
            i += 1;
        }
        buf[i] = n as u8;
        self.put(&buf[..=i])
    }

    fn bytes(&mut self, b: &[u8]) -> io::Result<()> {
        self.varint(b.len() as u64)?;
        self.put(b)
    }
}

/// Reads a body from `inp` row by row, checking its framing and, at its end, its
/// checksum. Rows read before a failure may be wrong; callers apply them only where a
/// failed read leaves nothing half done (see [`crate::mvcc::Mvcc::restore_from`]).
pub(crate) struct DumpReader<R: Read> {
    inp: R,
    crc: crc32fast::Hasher,
    ended: bool,
}

impl<R: Read> DumpReader<R> {
    /// Reads the magic and the head.
    pub(crate) fn new(inp: R) -> Result<(Self, Head), DumpError> {
        let mut r = Self {
            inp,
            crc: crc32fast::Hasher::new(),
            ended: false,
        };
        let mut magic = [0u8; MAGIC.len()];
        r.take(&mut magic)?;
        if &magic != MAGIC {
            return Err(DumpError::Malformed(
                "it does not start with the snapshot magic of this version",
            ));
        }
        let revision = unzigzag(r.varint()?);
        let compact_revision = unzigzag(r.varint()?);
        let rows = r.varint()?;
        if rows > MAX_META_ROWS {
            return Err(DumpError::Malformed("too many meta rows"));
        }
        let mut meta = Vec::with_capacity(rows as usize);
        for _ in 0..rows {
            meta.push((r.bytes()?, r.bytes()?));
        }
        let head = Head {
            revision,
            compact_revision,
            meta,
        };
        Ok((r, head))
    }

    /// The next row, or None at the end of a body whose checksum matched. Input after
    /// the checksum is left unread.
    #[allow(clippy::type_complexity)]
    pub(crate) fn next_row(&mut self) -> Result<Option<(Family, Vec<u8>, Vec<u8>)>, DumpError> {
        if self.ended {
            return Ok(None);
        }
        let mut tag = [0u8];
        self.take(&mut tag)?;
        let family = match tag[0] {
            TAG_KV => Family::Kv,
            TAG_REV => Family::Rev,
            TAG_END => {
                let computed = self.crc.clone().finalize();
                let mut recorded = [0u8; 4];
                self.inp.read_exact(&mut recorded).map_err(eof)?;
                let recorded = u32::from_le_bytes(recorded);
                if recorded != computed {
                    return Err(DumpError::Checksum { recorded, computed });
                }
                self.ended = true;
                return Ok(None);
            }
            _ => return Err(DumpError::Malformed("a row has an unknown tag")),
        };
        Ok(Some((family, self.bytes()?, self.bytes()?)))
    }

    fn take(&mut self, buf: &mut [u8]) -> Result<(), DumpError> {
        self.inp.read_exact(buf).map_err(eof)?;
        self.crc.update(buf);
        Ok(())
    }

    fn varint(&mut self) -> Result<u64, DumpError> {
        let mut n = 0u64;
        for i in 0..10 {
            let mut b = [0u8];
            self.take(&mut b)?;
            let b = b[0];
            if i == 9 && b > 1 {
                return Err(DumpError::Malformed("a number overflows 64 bits"));
            }
            n |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(DumpError::Malformed("a number overflows 64 bits"))
    }

    fn bytes(&mut self) -> Result<Vec<u8>, DumpError> {
        let len = self.varint()?;
        if len > MAX_FIELD {
            return Err(DumpError::Malformed(
                "a key or value is longer than allowed",
            ));
        }
        let mut v = vec![0u8; len as usize];
        self.take(&mut v)?;
        Ok(v)
    }
}

/// A body cut short is malformed, not an I/O failure of the reader.
fn eof(e: io::Error) -> DumpError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        DumpError::Malformed("it ends early")
    } else {
        DumpError::Io(e)
    }
}

/// Reads a whole body without keeping it: its head and row count once its framing and
/// checksum hold.
pub(crate) fn verify(inp: impl Read) -> Result<(Head, u64), DumpError> {
    let (mut r, head) = DumpReader::new(inp)?;
    let mut rows = 0;
    while r.next_row()?.is_some() {
        rows += 1;
    }
    Ok((head, rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(rows: &[(Family, &[u8], &[u8])]) -> (Head, Vec<u8>) {
        let head = Head {
            revision: 1234,
            compact_revision: -1,
            meta: vec![(b"raft_applied".to_vec(), vec![1, 2, 3])],
        };
        let mut w = DumpWriter::new(Vec::new(), &head).unwrap();
        for (f, k, v) in rows {
            w.row(*f, k, v).unwrap();
        }
        let (out, len) = w.finish().unwrap();
        assert_eq!(len, out.len() as u64);
        (head, out)
    }

    #[test]
    fn a_body_reads_back_as_written() {
        let long = vec![7u8; 70_000];
        let rows: [(Family, &[u8], &[u8]); 3] = [
            (Family::Kv, b"a", b""),
            (Family::Kv, b"b", &long),
            (Family::Rev, &[0, 0, 0, 9], b"a"),
        ];
        let (head, bytes) = body(&rows);
        let (mut r, read) = DumpReader::new(&bytes[..]).unwrap();
        assert_eq!(read, head);
        assert_eq!(read.meta(b"raft_applied"), Some(&[1u8, 2, 3][..]));
        for (f, k, v) in rows {
            assert_eq!(r.next_row().unwrap(), Some((f, k.to_vec(), v.to_vec())));
        }
        assert_eq!(r.next_row().unwrap(), None);
        assert_eq!(verify(&bytes[..]).unwrap(), (head, 3));
    }

    #[test]
    fn damage_is_an_error_not_a_shorter_store() {
        let (_, bytes) = body(&[(Family::Kv, b"key", b"value")]);
        // Every cut short body fails, wherever it is cut.
        for cut in 0..bytes.len() {
            assert!(verify(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        // So does any flipped bit, by its framing or its checksum.
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            assert!(verify(&bad[..]).is_err(), "flipped at {at}");
        }
        // A huge length is refused before anything is allocated for it.
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&[0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(matches!(
            DumpReader::new(&huge[..]),
            Err(DumpError::Malformed(_))
        ));
    }
}
