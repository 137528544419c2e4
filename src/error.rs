//! The crate's top-level error; per-boundary errors live next to their module.

use crate::capture::CaptureError;
use crate::config::ConfigError;
use crate::sql::SqlError;

/// Anything that stops `run` or a command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Catalog, install or query failure.
    #[error(transparent)]
    Sql(#[from] SqlError),
    /// The capture task failed for good.
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// The database refused the relay at start for a reason waiting will not fix.
    #[error("Cannot connect to {0}: {1}")]
    Startup(String, #[source] Box<SqlError>),
    /// Binding or serving the listener.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Tasks still running when the shutdown timeout ran out.
    #[error("Shutdown timed out; still running: {0}")]
    ShutdownTimeout(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its sources, joined with ": " (for logs: `tokio_postgres::Error` alone
/// says only "db error").
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}
