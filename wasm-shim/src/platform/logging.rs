//! wasi:logging: a component's log records go to its container's stderr, one line each
//! (`LEVEL context: message`), so that `kubectl logs` shows them beside what it prints.

use wasmtime::component::{ComponentType, Lift, Linker, Lower};

use crate::host::Host;

const VERSIONS: &[&str] = &["0.1.0-draft"];

/// A record's context and message together are cut at this many bytes: a log line is
/// not a channel for bulk data.
const MAX_RECORD: usize = 16 << 10;

// Made only by lifting a guest's argument.
#[allow(dead_code)]
#[derive(ComponentType, Lift, Lower, Clone, Copy, Debug)]
#[component(enum)]
#[repr(u8)]
enum Level {
    #[component(name = "trace")]
    Trace,
    #[component(name = "debug")]
    Debug,
    #[component(name = "info")]
    Info,
    #[component(name = "warn")]
    Warn,
    #[component(name = "error")]
    Error,
    #[component(name = "critical")]
    Critical,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Trace => "TRACE",
            Level::Debug => "DEBUG",
            Level::Info => "INFO",
            Level::Warn => "WARN",
            Level::Error => "ERROR",
            Level::Critical => "CRITICAL",
        }
    }
}

/// One record as a log line: control characters (a newline would start a forged
/// record) are escaped, and the whole is bounded.
fn line(level: Level, context: &str, message: &str) -> String {
    let mut out = String::with_capacity(16 + context.len() + message.len());
    out.push_str(level.name());
    if !context.is_empty() {
        out.push(' ');
        out.extend(context.chars().flat_map(char::escape_default));
        out.push(':');
    }
    out.push(' ');
    for c in message.chars() {
        if out.len() >= MAX_RECORD {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.push('\n');
    out
}

pub(super) fn add_to_linker(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    for version in VERSIONS {
        let mut logging = linker.instance(&format!("wasi:logging/logging@{version}"))?;
        logging.func_wrap_async(
            "log",
            |store, (level, context, message): (Level, String, String)| {
                Box::new(async move {
                    let write =
                        super::write_log_line(store.data(), &line(level, &context, &message));
                    write.await;
                    Ok(())
                })
            },
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_one_bounded_line() {
        assert_eq!(line(Level::Info, "app", "ready"), "INFO app: ready\n");
        assert_eq!(line(Level::Warn, "", "x"), "WARN x\n");
        // A newline in the message cannot start a second, forged record.
        assert_eq!(
            line(Level::Error, "a\nb", "one\nINFO two"),
            "ERROR a\\nb: one\\nINFO two\n"
        );
        let long = line(Level::Debug, "c", &"x".repeat(1 << 20));
        assert!(long.len() < MAX_RECORD + 16, "{}", long.len());
    }
}
