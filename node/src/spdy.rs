//! A SPDY/3.1 server session: as much of the protocol as kubectl's streams use.
//!
//! kubectl still speaks SPDY for `port-forward`, even over WebSocket: since 1.31 it tunnels
//! SPDY frames through a WebSocket (`SPDY/3.1+portforward.k8s.io`), and before that it
//! upgrades the connection to SPDY directly. No maintained Rust crate serves SPDY, so this
//! module does, narrowly:
//! - frames are read from a byte stream (the WebSocket tunnel is turned into one first),
//!   each bounded by [`MAX_FRAME`];
//! - the client opens every stream (SYN_STREAM), and the server answers each with an empty
//!   SYN_REPLY; the server opens none;
//! - header blocks from the client are zlib with the SPDY/3 dictionary, one inflater per
//!   connection; the server's blocks (always empty) are written as stored zlib blocks, so
//!   no compressor is needed;
//! - pings from the client are echoed; there is no flow control (kubectl sends none and
//!   needs none).

use std::sync::LazyLock;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The largest frame taken: kubectl's data frames are at most 32 KiB and its header
/// blocks a few hundred bytes.
pub const MAX_FRAME: usize = 1 << 20;
/// The largest header block once inflated.
const MAX_HEADERS: usize = 64 << 10;

/// Why a session ended badly.
#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    #[error("reading the connection")]
    Io(#[from] std::io::Error),
    #[error("a {0}-byte frame is over the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("SPDY version {0} is not served (only 3)")]
    Version(u16),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    #[error("the header block cannot be inflated")]
    Inflate(#[source] flate2::DecompressError),
}

/// A frame, as far as the server cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The client opens a stream.
    SynStream {
        id: u32,
        headers: Vec<(String, String)>,
        fin: bool,
    },
    Data {
        id: u32,
        data: Bytes,
        fin: bool,
    },
    /// The client aborts a stream.
    RstStream {
        id: u32,
        status: u32,
    },
    Ping(u32),
    GoAway,
    /// SETTINGS, WINDOW_UPDATE, HEADERS, NOOP: nothing for the server to do.
    Ignored,
}

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const FLAG_FIN: u8 = 0x01;
/// RST_STREAM status: the stream is cancelled.
pub const CANCEL: u32 = 5;

/// The SPDY/3 header dictionary (draft 3, section 2.6.10.1): the length-prefixed tokens,
/// then a run of common values. 1423 bytes; its Adler-32, 0xE3C6A7C2, is the DICTID
/// kubectl's blocks name.
static DICTIONARY: LazyLock<Vec<u8>> = LazyLock::new(|| {
    const WORDS: &[&str] = &[
        "options",
        "head",
        "post",
        "put",
        "delete",
        "trace",
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "accept-ranges",
        "age",
        "allow",
        "authorization",
        "cache-control",
        "connection",
        "content-base",
        "content-encoding",
        "content-language",
        "content-length",
        "content-location",
        "content-md5",
        "content-range",
        "content-type",
        "date",
        "etag",
        "expect",
        "expires",
        "from",
        "host",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "last-modified",
        "location",
        "max-forwards",
        "pragma",
        "proxy-authenticate",
        "proxy-authorization",
        "range",
        "referer",
        "retry-after",
        "server",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "vary",
        "via",
        "warning",
        "www-authenticate",
        "method",
        "get",
        "status",
        "200 OK",
        "version",
        "HTTP/1.1",
        "url",
        "public",
        "set-cookie",
        "keep-alive",
        "origin",
    ];
    const TAIL: &str = concat!(
        "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
        "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized",
        "403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable",
        "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT",
        "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,",
        "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
    );
    let mut d = Vec::with_capacity(1423);
    for w in WORDS {
        d.extend_from_slice(&(w.len() as u32).to_be_bytes());
        d.extend_from_slice(w.as_bytes());
    }
    d.extend_from_slice(TAIL.as_bytes());
    d
});

/// The SPDY/3 header dictionary, for a client's compressor (tests).
pub fn dictionary() -> &'static [u8] {
    &DICTIONARY
}

/// Reads frames from one connection, inflating header blocks with the connection's one
/// zlib stream.
pub struct Reader<R> {
    io: R,
    inflater: flate2::Decompress,
}

impl<R> std::fmt::Debug for Reader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").finish_non_exhaustive()
    }
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub fn new(io: R) -> Self {
        Self {
            io,
            inflater: flate2::Decompress::new(true),
        }
    }

    /// The next frame; None at a clean end of the connection.
    pub async fn next(&mut self) -> Result<Option<Frame>, SpdyError> {
        let mut head = [0u8; 8];
        match self.io.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let flags = head[4];
        let len = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
        if len > MAX_FRAME {
            return Err(SpdyError::TooLarge(len));
        }
        let mut body = vec![0u8; len];
        self.io.read_exact(&mut body).await?;
        let fin = flags & FLAG_FIN != 0;
        if head[0] & 0x80 == 0 {
            let id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
            return Ok(Some(Frame::Data {
                id,
                data: body.into(),
                fin,
            }));
        }
        let version = u16::from_be_bytes([head[0] & 0x7f, head[1]]);
        if version != 3 {
            return Err(SpdyError::Version(version));
        }
        let kind = u16::from_be_bytes([head[2], head[3]]);
        let word = |at: usize| -> Result<u32, SpdyError> {
            body.get(at..at + 4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or(SpdyError::Malformed("frame too short"))
        };
        Ok(Some(match kind {
            SYN_STREAM => {
                let id = word(0)? & 0x7fff_ffff;
                let block = body
                    .get(10..)
                    .ok_or(SpdyError::Malformed("SYN_STREAM too short"))?;
                let headers = self.headers(block)?;
                Frame::SynStream { id, headers, fin }
            }
            RST_STREAM => Frame::RstStream {
                id: word(0)? & 0x7fff_ffff,
                status: word(4)?,
            },
            PING => Frame::Ping(word(0)?),
            GOAWAY => Frame::GoAway,
            _ => Frame::Ignored,
        }))
    }

    /// Inflates one header block (it ends with a sync flush) and reads its pairs.
    fn headers(&mut self, block: &[u8]) -> Result<Vec<(String, String)>, SpdyError> {
        let mut out = Vec::with_capacity(256);
        let mut input = block;
        loop {
            let before = self.inflater.total_in();
            out.reserve(1024);
            let r = self
                .inflater
                .decompress_vec(input, &mut out, flate2::FlushDecompress::Sync);
            let used = (self.inflater.total_in() - before) as usize;
            input = &input[used..];
            match r {
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflater
                        .set_dictionary(&DICTIONARY)
                        .map_err(SpdyError::Inflate)?;
                    continue;
                }
                Err(e) => return Err(SpdyError::Inflate(e)),
            }
            if out.len() > MAX_HEADERS {
                return Err(SpdyError::Malformed("header block too large"));
            }
            // The whole block is in once the input is used up and there was room left.
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
        }
        parse_pairs(&out)
    }
}

fn parse_pairs(mut b: &[u8]) -> Result<Vec<(String, String)>, SpdyError> {
    let word = |b: &mut &[u8]| -> Result<u32, SpdyError> {
        let w = b
            .get(..4)
            .map(|x| u32::from_be_bytes([x[0], x[1], x[2], x[3]]))
            .ok_or(SpdyError::Malformed("header block cut short"))?;
        *b = &b[4..];
        Ok(w)
    };
    let n = word(&mut b)?;
    let mut pairs = Vec::new();
    for _ in 0..n.min(256) {
        let text = |b: &mut &[u8]| -> Result<String, SpdyError> {
            let len = word(b)? as usize;
            let s = b
                .get(..len)
                .ok_or(SpdyError::Malformed("header block cut short"))?;
            *b = &b[len..];
            Ok(String::from_utf8_lossy(s).into_owned())
        };
        let name = text(&mut b)?;
        let value = text(&mut b)?;
        pairs.push((name.to_ascii_lowercase(), value));
    }
    Ok(pairs)
}

/// Writes the server's frames. Header blocks go out as stored (uncompressed) zlib
/// blocks of the connection's one zlib stream.
#[derive(Debug, Default)]
pub struct Writer {
    started: bool,
}

impl Writer {
    fn control(kind: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(8 + payload.len());
        f.extend_from_slice(&[0x80, 0x03]);
        f.extend_from_slice(&kind.to_be_bytes());
        f.push(flags);
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        f.extend_from_slice(payload);
        f
    }

    /// An empty header block, as the next piece of the connection's zlib stream.
    fn empty_block(&mut self) -> Vec<u8> {
        let mut z = Vec::new();
        if !self.started {
            // zlib header: deflate, no compression level to speak of, a preset dictionary
            // (0x7820 is a multiple of 31, as the header check wants), and its id.
            z.extend_from_slice(&[0x78, 0x20]);
            z.extend_from_slice(&adler32(&DICTIONARY).to_be_bytes());
            self.started = true;
        }
        let raw = 0u32.to_be_bytes(); // no pairs
        let len = raw.len() as u16;
        z.push(0x00); // a stored block, not the last
        z.extend_from_slice(&len.to_le_bytes());
        z.extend_from_slice(&(!len).to_le_bytes());
        z.extend_from_slice(&raw);
        // The sync flush that ends every block.
        z.extend_from_slice(&[0x00, 0x00, 0x00, 0xff, 0xff]);
        z
    }

    /// The answer to a client's SYN_STREAM.
    pub fn syn_reply(&mut self, id: u32) -> Vec<u8> {
        let mut p = id.to_be_bytes().to_vec();
        p.extend(self.empty_block());
        Self::control(SYN_REPLY, 0, &p)
    }

    pub fn data(id: u32, data: &[u8], fin: bool) -> Vec<u8> {
        let mut f = Vec::with_capacity(8 + data.len());
        f.extend_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
        f.push(if fin { FLAG_FIN } else { 0 });
        f.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
        f.extend_from_slice(data);
        f
    }

    pub fn rst(id: u32, status: u32) -> Vec<u8> {
        let mut p = id.to_be_bytes().to_vec();
        p.extend_from_slice(&status.to_be_bytes());
        Self::control(RST_STREAM, 0, &p)
    }

    pub fn ping(id: u32) -> Vec<u8> {
        Self::control(PING, 0, &id.to_be_bytes())
    }

    pub fn goaway(last: u32) -> Vec<u8> {
        let mut p = last.to_be_bytes().to_vec();
        p.extend_from_slice(&0u32.to_be_bytes());
        Self::control(GOAWAY, 0, &p)
    }
}

/// Writes frames to a connection from one task; the sender feeds it, and its end (all
/// senders dropped) closes the connection's writing side.
pub fn spawn_writer<W>(
    mut w: W,
) -> (
    tokio::sync::mpsc::Sender<Vec<u8>>,
    tokio::task::JoinHandle<()>,
)
where
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tokio::io::AsyncWriteExt;
    let (out, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
    let task = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if w.write_all(&frame).await.is_err() {
                return;
            }
            // Frames already queued go out in the same flush.
            while let Ok(more) = rx.try_recv() {
                if w.write_all(&more).await.is_err() {
                    return;
                }
            }
            if w.flush().await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    });
    (out, task)
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

/// Whether a ping came from the client (odd ids; the server's own would be even), which
/// is the only kind to echo: echoing the answers to one's own pings never ends.
pub fn is_client_ping(id: u32) -> bool {
    id % 2 == 1
}

/// A client's SYN_STREAM, compressed as spdystream does: zlib with the dictionary, one
/// stream across frames, a sync flush after each block (for tests of the server).
#[cfg(test)]
pub(crate) fn client_syn(z: &mut flate2::Compress, id: u32, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut raw = (headers.len() as u32).to_be_bytes().to_vec();
    for (k, v) in headers {
        raw.extend_from_slice(&(k.len() as u32).to_be_bytes());
        raw.extend_from_slice(k.as_bytes());
        raw.extend_from_slice(&(v.len() as u32).to_be_bytes());
        raw.extend_from_slice(v.as_bytes());
    }
    let mut block = Vec::with_capacity(raw.len() + 64);
    z.compress_vec(&raw, &mut block, flate2::FlushCompress::Sync)
        .unwrap();
    let mut p = id.to_be_bytes().to_vec();
    p.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    p.extend(block);
    Writer::control(SYN_STREAM, 0, &p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dictionary_is_the_one_kubectl_names() {
        assert_eq!(DICTIONARY.len(), 1423);
        assert_eq!(adler32(&DICTIONARY), 0xE3C6_A7C2);
    }

    #[tokio::test]
    async fn frames_from_a_client_are_read_with_their_headers() {
        let mut z = flate2::Compress::new(flate2::Compression::best(), true);
        z.set_dictionary(&DICTIONARY).unwrap();
        let mut bytes = client_syn(
            &mut z,
            1,
            &[("streamtype", "error"), ("port", "80"), ("requestid", "0")],
        );
        bytes.extend(client_syn(
            &mut z,
            3,
            &[("streamtype", "data"), ("port", "80"), ("requestid", "0")],
        ));
        bytes.extend(Writer::data(3, b"GET / HTTP/1.0\r\n\r\n", false));
        bytes.extend(Writer::data(1, b"", true));
        bytes.extend(Writer::ping(1));
        bytes.extend(Writer::rst(3, CANCEL));
        bytes.extend(Writer::goaway(0));
        let mut r = Reader::new(&bytes[..]);
        let Some(Frame::SynStream { id: 1, headers, .. }) = r.next().await.unwrap() else {
            panic!("a SYN_STREAM first")
        };
        assert!(headers.contains(&("streamtype".into(), "error".into())));
        let Some(Frame::SynStream { id: 3, headers, .. }) = r.next().await.unwrap() else {
            panic!("a second SYN_STREAM")
        };
        assert!(headers.contains(&("streamtype".into(), "data".into())));
        assert_eq!(
            r.next().await.unwrap(),
            Some(Frame::Data {
                id: 3,
                data: Bytes::from_static(b"GET / HTTP/1.0\r\n\r\n"),
                fin: false
            })
        );
        assert!(matches!(
            r.next().await.unwrap(),
            Some(Frame::Data {
                id: 1,
                fin: true,
                ..
            })
        ));
        assert_eq!(r.next().await.unwrap(), Some(Frame::Ping(1)));
        assert_eq!(
            r.next().await.unwrap(),
            Some(Frame::RstStream {
                id: 3,
                status: CANCEL
            })
        );
        assert_eq!(r.next().await.unwrap(), Some(Frame::GoAway));
        assert_eq!(r.next().await.unwrap(), None);
    }

    #[tokio::test]
    async fn the_servers_header_blocks_inflate_with_the_dictionary() {
        let mut w = Writer::default();
        let mut inflate = flate2::Decompress::new(true);
        for id in [1u32, 3] {
            let frame = w.syn_reply(id);
            assert_eq!(&frame[..4], &[0x80, 3, 0, SYN_REPLY as u8]);
            let block = &frame[12..];
            let mut out = Vec::with_capacity(64);
            let mut input = block;
            loop {
                let before = inflate.total_in();
                let r = inflate.decompress_vec(input, &mut out, flate2::FlushDecompress::Sync);
                input = &input[(inflate.total_in() - before) as usize..];
                match r {
                    Err(e) if e.needs_dictionary().is_some() => {
                        inflate.set_dictionary(&DICTIONARY).unwrap();
                    }
                    r => {
                        r.unwrap();
                        break;
                    }
                }
            }
            assert_eq!(out, [0, 0, 0, 0], "an empty block: no pairs");
        }
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused() {
        let mut bytes = vec![0, 0, 0, 1, 0];
        bytes.extend_from_slice(&((MAX_FRAME as u32) + 1).to_be_bytes()[1..]);
        let mut r = Reader::new(&bytes[..]);
        assert!(matches!(r.next().await, Err(SpdyError::TooLarge(_))));
    }
}
