//! Typed errors that cross the plugin boundary.
//!
//! The kind travels as a number rather than a Rust enum so that a later 1.x can add kinds
//! without changing the frozen FFI types: an unknown number reads as [`ErrorKind::Other`].

use std::fmt;

/// What sort of failure a plugin call ended in; decides how the host reacts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The plugin's configuration is wrong: retrying will not help until it is fixed.
    Config,
    /// A passing failure (network, throttling): retry later.
    Transient,
    /// A failure that retrying will not fix.
    Permanent,
    /// The plugin panicked; the panic was caught at the boundary.
    Panicked,
    /// The call did not finish in time and was cancelled.
    Timeout,
    /// The plugin does not offer that kind or operation.
    Unsupported,
    /// The plugin answered, but with something that is not what the operation returns.
    InvalidResponse,
    /// A kind this version does not know.
    Other,
}

impl ErrorKind {
    /// The number the kind crosses the FFI boundary as.
    pub const fn code(self) -> u32 {
        match self {
            ErrorKind::Other => 0,
            ErrorKind::Config => 1,
            ErrorKind::Transient => 2,
            ErrorKind::Permanent => 3,
            ErrorKind::Panicked => 4,
            ErrorKind::Timeout => 5,
            ErrorKind::Unsupported => 6,
            ErrorKind::InvalidResponse => 7,
        }
    }

    /// The kind of a number from the boundary; an unknown number reads as `Other`.
    pub const fn from_code(code: u32) -> Self {
        match code {
            1 => ErrorKind::Config,
            2 => ErrorKind::Transient,
            3 => ErrorKind::Permanent,
            4 => ErrorKind::Panicked,
            5 => ErrorKind::Timeout,
            6 => ErrorKind::Unsupported,
            7 => ErrorKind::InvalidResponse,
            _ => ErrorKind::Other,
        }
    }

    /// The kind as operators read it in logs and status (`transient`, `config`, ...).
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Config => "config",
            ErrorKind::Transient => "transient",
            ErrorKind::Permanent => "permanent",
            ErrorKind::Panicked => "panicked",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::InvalidResponse => "invalid-response",
            ErrorKind::Other => "other",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error returned by a plugin, or by the host on a plugin's behalf.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct PluginError {
    /// What kind of failure this is: it decides whether and when warden retries.
    pub kind: ErrorKind,
    /// What happened, for the operator: name what failed and where.
    pub message: String,
    /// Optional machine-readable detail, as JSON text (empty when there is none).
    pub detail: String,
}

impl PluginError {
    /// An error of any kind.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            detail: String::new(),
        }
    }
    /// The configuration cannot work: warden does not retry until an operator fixes it.
    pub fn config(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Config, message)
    }
    /// Worth retrying soon (network, throttling, a server not answering).
    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Transient, message)
    }
    /// Retrying will not help (the thing measured does not exist, access denied).
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Permanent, message)
    }
    /// The operation is not offered by this plugin.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }
    /// Adds structured detail (JSON) for logs and `warden status`.
    pub fn with_detail(mut self, detail: &serde_json::Value) -> Self {
        self.detail = detail.to_string();
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_unknown_codes_read_as_other() {
        for kind in [
            ErrorKind::Config,
            ErrorKind::Transient,
            ErrorKind::Permanent,
            ErrorKind::Panicked,
            ErrorKind::Timeout,
            ErrorKind::Unsupported,
            ErrorKind::InvalidResponse,
            ErrorKind::Other,
        ] {
            assert_eq!(ErrorKind::from_code(kind.code()), kind);
        }
        assert_eq!(ErrorKind::from_code(999), ErrorKind::Other);
    }
}
