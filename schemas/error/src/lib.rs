//! The one contract every crate's error type meets ([`Classify`]), and the one shape errors take
//! over HTTP ([`Classify::body`]).
//!
//! ```text
//!  CaptureError, ApplyError, LogError, ConnectorError, RepairError, ResolveError
//!        │ impl Classify: code() · is_transient() · hint() — decided once, at the crate edge
//!        ▼
//!  supervisor (retry or stop the component) · logs and /readyz (code, hint) · HTTP bodies
//!  {"error": {"code": "APP001", "message": "… : cause : cause", "hint": "…"}}
//! ```
//!
//! Guarantees: a code is stable across releases (documented with its hint, never reused for
//! another meaning); [`Classify::is_transient`] is `true` only where retrying the same work
//! later can succeed without anyone acting.

/// What the runtime and operators need of an error: a stable code, whether a retry can cure it,
/// and what to do about it.
pub trait Classify: std::error::Error {
    /// A stable code (`CAP006`, `LOG008`…), for logs, metrics, docs and HTTP bodies.
    fn code(&self) -> &'static str;
    /// A retry with backoff can succeed (connection lost, server starting, lock busy…);
    /// otherwise the error is definite: the part it concerns stops and says why.
    fn is_transient(&self) -> bool;
    /// What the operator should do, in one sentence.
    fn hint(&self) -> &'static str;

    /// The message with every cause: `error: cause: cause …`.
    fn chain(&self) -> String
    where
        Self: Sized,
    {
        chain(self)
    }

    /// The HTTP error body: `{"error": {"code", "message", "hint"}}`.
    fn body(&self) -> serde_json::Value
    where
        Self: Sized,
    {
        body(self.code(), &self.chain(), self.hint())
    }
}

/// `error: cause: cause …` of any error.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let next = c.to_string();
        // Some errors repeat their source's text in their own; print it once.
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = c.source();
    }
    text
}

/// The HTTP error body for errors that are not a crate's (a bad request field, say).
pub fn body(code: &str, message: &str, hint: &str) -> serde_json::Value {
    serde_json::json!({"error": {"code": code, "message": message, "hint": hint}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    impl Classify for Outer {
        fn code(&self) -> &'static str {
            "TST001"
        }
        fn is_transient(&self) -> bool {
            true
        }
        fn hint(&self) -> &'static str {
            "retry"
        }
    }

    #[test]
    fn chain_and_body() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(e.chain(), "outer: inner");
        assert_eq!(
            e.body(),
            serde_json::json!({"error": {"code": "TST001", "message": "outer: inner", "hint": "retry"}})
        );
    }
}
