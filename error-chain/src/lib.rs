//! # baton-error-chain: showing an error with its causes
//!
//! Baton's error types keep their causes as typed `#[source]`s and leave them out of their
//! own message, so that a chain prints each cause once. Where an error is shown on its own
//! (a log line, a pod's status message, an Event), [`Chain`] prints the whole chain on one
//! line, `outer: cause: root cause`, as anyhow's `{:#}` does.

use std::error::Error;
use std::fmt;

/// Displays an error and its sources, joined with `": "`.
#[derive(Debug)]
pub struct Chain<'a>(pub &'a (dyn Error + 'a));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.0.to_string();
        f.write_str(&shown)?;
        let mut next = self.0.source();
        while let Some(cause) = next {
            let text = cause.to_string();
            // Some third-party errors repeat their source in their message: once is enough.
            if !text.is_empty() && !shown.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            shown = text;
            next = cause.source();
        }
        Ok(())
    }
}

/// The chain as a string: for status messages and events.
pub fn chain(e: &(dyn Error + '_)) -> String {
    Chain(e).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("middle: {0}")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn each_cause_once() {
        let e = Outer(Middle(std::io::Error::other("root")));
        assert_eq!(chain(&e), "outer: middle: root");
    }
}
