//! Why the agent could not start, or stopped: what it was doing, with the
//! cause as the error's source, so the binary prints the whole chain
//! (`--interface nope0` / `no such interface`).

use std::error::Error as StdError;

type Cause = Box<dyn StdError + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A flag or configuration that cannot work, said in the user's words.
    #[error("{0}")]
    Config(String),
    /// The datapath failed, in its own words.
    #[error(transparent)]
    Datapath(#[from] crate::datapath::DatapathError),
    /// A step that failed (naming the flag or resource it used), and why.
    #[error("{what}")]
    Step {
        what: String,
        #[source]
        source: Cause,
    },
}

/// Names the step a fallible call belongs to, as the error's message.
pub trait Context<T> {
    fn context(self, what: &str) -> Result<T, AgentError>;
    fn with_context(self, what: impl FnOnce() -> String) -> Result<T, AgentError>;
}

impl<T, E: Into<Cause>> Context<T> for Result<T, E> {
    fn context(self, what: &str) -> Result<T, AgentError> {
        self.map_err(|e| AgentError::Step { what: what.to_owned(), source: e.into() })
    }

    fn with_context(self, what: impl FnOnce() -> String) -> Result<T, AgentError> {
        self.map_err(|e| AgentError::Step { what: what(), source: e.into() })
    }
}

/// An error and its causes on one line (`a: b: c`), as anyhow's `{:#}`
/// prints them: for a log field.
pub fn chain(e: &(dyn StdError + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_step_is_the_message_and_the_cause_its_source() {
        let failed: Result<(), std::io::Error> = Err(std::io::Error::other("no such interface"));
        let e = failed.context("--interface nope0").unwrap_err();
        assert_eq!(e.to_string(), "--interface nope0");
        assert_eq!(e.source().map(ToString::to_string).as_deref(), Some("no such interface"));
        // A step inside a step keeps the whole chain.
        let outer: Result<(), AgentError> = Err(e);
        let e = outer.context("taking over").unwrap_err();
        assert_eq!(chain(&e), "taking over: --interface nope0: no such interface");
    }
}
