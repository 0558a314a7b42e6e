//! Container logs: what a component writes to stdout and stderr, one file per container,
//! in the CRI log format the kubelet reads (`<RFC3339Nano> <stream> <F|P> <text>`),
//! size-capped and rotated, and readable by tail, since, offset and follow for
//! `kubectl logs`.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// Where one container's logs go, and how much of them to keep.
#[derive(Clone, Debug)]
pub struct LogConfig {
    pub path: PathBuf,
    /// Rotate when the current file passes this size.
    pub max_bytes: u64,
    /// Rotated files kept (`path.1` is the newest).
    pub max_files: usize,
}

#[derive(Debug)]
struct LogFile {
    cfg: LogConfig,
    file: File,
    size: u64,
    /// Bytes of a line not yet ended, per stream (0 = stdout, 1 = stderr).
    partial: [Vec<u8>; 2],
    /// What is written, as it is written, for whoever is attached (`kubectl attach`).
    tap: Option<tokio::sync::broadcast::Sender<(u8, bytes::Bytes)>>,
}

fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    k8s_time(d.as_secs() as i64, d.subsec_nanos())
}

/// RFC 3339 with nanoseconds, UTC, without a date library: days since the epoch to a
/// civil date (Howard Hinnant's algorithm).
fn k8s_time(secs: i64, nanos: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl LogFile {
    fn open(cfg: LogConfig) -> std::io::Result<Self> {
        if let Some(dir) = cfg.path.parent() {
            fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&cfg.path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            cfg,
            file,
            size,
            partial: [Vec::new(), Vec::new()],
            tap: None,
        })
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        for i in (1..self.cfg.max_files).rev() {
            let from = rotated(&self.cfg.path, i);
            if from.exists() {
                fs::rename(&from, rotated(&self.cfg.path, i + 1))?;
            }
        }
        if self.cfg.max_files > 0 {
            fs::rename(&self.cfg.path, rotated(&self.cfg.path, 1))?;
        }
        self.file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&self.cfg.path)?;
        self.size = 0;
        Ok(())
    }

    fn line(&mut self, stream: usize, text: &[u8], full: bool) -> std::io::Result<()> {
        let name = if stream == 0 { "stdout" } else { "stderr" };
        let tag = if full { "F" } else { "P" };
        let mut line = format!("{} {name} {tag} ", timestamp(SystemTime::now())).into_bytes();
        line.extend_from_slice(text);
        line.push(b'\n');
        if self.size + line.len() as u64 > self.cfg.max_bytes && self.size > 0 {
            self.rotate()?;
        }
        self.file.write_all(&line)?;
        self.size += line.len() as u64;
        Ok(())
    }

    /// Writes the complete lines of `buf`; keeps an unfinished tail for later. A partial
    /// line longer than 16 KiB is written as a `P` record, as CRI runtimes do.
    fn write(&mut self, stream: usize, buf: &[u8]) -> std::io::Result<()> {
        if let Some(tap) = &self.tap {
            if tap.receiver_count() > 0 {
                let _ = tap.send((stream as u8, bytes::Bytes::copy_from_slice(buf)));
            }
        }
        let mut pending = std::mem::take(&mut self.partial[stream]);
        pending.extend_from_slice(buf);
        let mut start = 0;
        while let Some(pos) = pending[start..].iter().position(|b| *b == b'\n') {
            let end = start + pos;
            self.line(stream, &pending[start..end], true)?;
            start = end + 1;
        }
        let mut rest = pending.split_off(start);
        while rest.len() > 16 << 10 {
            let tail = rest.split_off(16 << 10);
            self.line(stream, &rest, false)?;
            rest = tail;
        }
        self.partial[stream] = rest;
        Ok(())
    }

    fn flush_partials(&mut self) -> std::io::Result<()> {
        for stream in 0..2 {
            let p = std::mem::take(&mut self.partial[stream]);
            if !p.is_empty() {
                self.line(stream, &p, true)?;
            }
        }
        self.file.flush()
    }
}

fn rotated(path: &Path, i: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{i}"));
    PathBuf::from(s)
}

/// One container's log, shared by its stdout and stderr.
#[derive(Clone, Debug)]
pub struct ContainerLog {
    inner: Arc<Mutex<LogFile>>,
}

impl ContainerLog {
    pub fn open(cfg: LogConfig) -> std::io::Result<Self> {
        Ok(Self {
            inner: Arc::new(Mutex::new(LogFile::open(cfg)?)),
        })
    }

    pub fn stdout(&self) -> LogStream {
        LogStream {
            log: self.clone(),
            stream: 0,
        }
    }

    pub fn stderr(&self) -> LogStream {
        LogStream {
            log: self.clone(),
            stream: 1,
        }
    }

    /// What the container writes from now on, stream (0 stdout, 1 stderr) and bytes as
    /// written. A reader that falls more than a few hundred writes behind loses some
    /// (it is told so); the log file keeps everything.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<(u8, bytes::Bytes)> {
        let mut inner = self.inner.lock().expect("log lock");
        inner
            .tap
            .get_or_insert_with(|| tokio::sync::broadcast::channel(256).0)
            .subscribe()
    }

    /// Writes out unfinished lines (when the container stops).
    pub fn flush(&self) -> std::io::Result<()> {
        self.inner.lock().expect("log lock").flush_partials()
    }
}

/// stdout or stderr of a container, as WASI sees it.
#[derive(Clone, Debug)]
pub struct LogStream {
    log: ContainerLog,
    stream: usize,
}

impl LogStream {
    fn append(&self, bytes: &[u8]) -> std::io::Result<()> {
        self.log
            .inner
            .lock()
            .expect("log lock")
            .write(self.stream, bytes)
    }
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    // Written synchronously, not through a background writer task, so that everything a
    // guest printed is in the file the moment it exits.
    fn p2_stream(&self) -> Box<dyn wasmtime_wasi::p2::OutputStream> {
        Box::new(self.clone())
    }
}

impl wasmtime_wasi::p2::OutputStream for LogStream {
    fn write(&mut self, bytes: bytes::Bytes) -> wasmtime_wasi::p2::StreamResult<()> {
        self.append(&bytes)
            .map_err(|e| wasmtime_wasi::p2::StreamError::LastOperationFailed(e.into()))
    }

    fn flush(&mut self) -> wasmtime_wasi::p2::StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> wasmtime_wasi::p2::StreamResult<usize> {
        Ok(64 << 10)
    }
}

#[wasmtime_wasi::async_trait]
impl wasmtime_wasi::p2::Pollable for LogStream {
    async fn ready(&mut self) {}
}

impl AsyncWrite for LogStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        // Appends to a local file are short and bounded; doing them inline keeps the
        // order of stdout and stderr lines exactly as the guest wrote them.
        let r = self.append(buf);
        Poll::Ready(r.map(|()| buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// What part of a log to read (kubectl logs' options).
#[derive(Clone, Debug, Default)]
pub struct LogQuery {
    pub tail_lines: Option<usize>,
    /// Only lines written at or after this instant.
    pub since: Option<SystemTime>,
    /// Keep the timestamp in front of each line.
    pub timestamps: bool,
    /// Stop after this many bytes.
    pub limit_bytes: Option<usize>,
}

fn parse_record(line: &str) -> Option<(&str, &str)> {
    // "<ts> <stream> <tag> <text>"
    let (ts, rest) = line.split_once(' ')?;
    let (_stream, rest) = rest.split_once(' ')?;
    let (_tag, text) = rest.split_once(' ').unwrap_or((rest, ""));
    Some((ts, text))
}

/// Reads the current and rotated files, oldest first, as `kubectl logs` prints them.
pub fn read_logs(cfg: &LogConfig, q: &LogQuery) -> std::io::Result<Vec<String>> {
    let mut files: Vec<PathBuf> = (1..=cfg.max_files)
        .rev()
        .map(|i| rotated(&cfg.path, i))
        .filter(|p| p.exists())
        .collect();
    files.push(cfg.path.clone());
    // Formatted once: records compare as strings, since their timestamps have one width.
    let since = q.since.map(timestamp);
    let mut out = Vec::new();
    for f in files {
        let Ok(file) = File::open(&f) else { continue };
        for line in BufReader::new(file).lines() {
            let line = line?;
            let Some((ts, text)) = parse_record(&line) else {
                continue;
            };
            if since.as_deref().is_some_and(|s| ts < s) {
                continue;
            }
            out.push(if q.timestamps {
                format!("{ts} {text}")
            } else {
                text.to_string()
            });
        }
    }
    if let Some(n) = q.tail_lines {
        let skip = out.len().saturating_sub(n);
        out.drain(..skip);
    }
    if let Some(limit) = q.limit_bytes {
        let mut total = 0;
        out.retain(|l| {
            total += l.len() + 1;
            total <= limit
        });
    }
    Ok(out)
}

/// Follows the current file from `offset`, returning new complete lines and the new offset;
/// call again to continue (the node agent polls it while a `kubectl logs -f` is open).
pub fn follow_from(
    cfg: &LogConfig,
    offset: u64,
    timestamps: bool,
) -> std::io::Result<(Vec<String>, u64)> {
    let mut file = File::open(&cfg.path)?;
    let len = file.metadata()?.len();
    // Rotated under us: start over at the new file's beginning.
    let offset = if offset > len { 0 } else { offset };
    file.seek(SeekFrom::Start(offset))?;
    let mut out = Vec::new();
    let mut reader = BufReader::new(file);
    let mut pos = offset;
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n == 0 || !line.ends_with('\n') {
            break;
        }
        pos += n as u64;
        if let Some((ts, text)) = parse_record(line.trim_end_matches('\n')) {
            out.push(if timestamps {
                format!("{ts} {text}")
            } else {
                text.to_string()
            });
        }
    }
    Ok((out, pos))
}

/// How often a follower looks for new lines.
pub const FOLLOW_POLL: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(k8s_time(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(k8s_time(1_700_000_000, 5), "2023-11-14T22:13:20.000000005Z");
    }

    #[test]
    fn lines_rotate_and_read_back_with_tail_and_follow() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig {
            path: dir.path().join("c.log"),
            max_bytes: 400,
            max_files: 2,
        };
        let log = ContainerLog::open(cfg.clone()).unwrap();
        let mut out = log.stdout();
        let mut err = log.stderr();
        for i in 0..10 {
            let _ = Pin::new(&mut out).poll_write(
                &mut Context::from_waker(futures_noop()),
                format!("line {i}\n").as_bytes(),
            );
        }
        let _ = Pin::new(&mut err).poll_write(
            &mut Context::from_waker(futures_noop()),
            b"oops, no newline",
        );
        log.flush().unwrap();
        assert!(rotated(&cfg.path, 1).exists(), "the log rotated");
        let all = read_logs(&cfg, &LogQuery::default()).unwrap();
        assert_eq!(all.last().unwrap(), "oops, no newline");
        assert!(all.contains(&"line 9".to_string()));
        let tail = read_logs(
            &cfg,
            &LogQuery {
                tail_lines: Some(2),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            tail,
            vec!["line 9".to_string(), "oops, no newline".to_string()]
        );
        let stamped = read_logs(
            &cfg,
            &LogQuery {
                tail_lines: Some(1),
                timestamps: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(stamped[0].ends_with("Z oops, no newline"), "{stamped:?}");
        let future = SystemTime::now() + Duration::from_secs(3600);
        assert!(read_logs(
            &cfg,
            &LogQuery {
                since: Some(future),
                ..Default::default()
            }
        )
        .unwrap()
        .is_empty());
        let (lines, off) = follow_from(&cfg, 0, false).unwrap();
        assert!(!lines.is_empty());
        let _ = Pin::new(&mut out).poll_write(&mut Context::from_waker(futures_noop()), b"more\n");
        let (lines, _) = follow_from(&cfg, off, false).unwrap();
        assert_eq!(lines, vec!["more".to_string()]);
    }

    fn futures_noop() -> &'static std::task::Waker {
        std::task::Waker::noop()
    }
}
