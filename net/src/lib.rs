//! Serving Marsad's HTTP APIs where the internet can reach them: TLS from PEM
//! files (reloaded when they change), a cap on open connections, a deadline
//! for request headers and for whole requests, and per-client rate limits
//! answered with 429 and `Retry-After`.
//!
//! It owns the transport, not the meaning: it must not read request bodies,
//! decide who a client is behind proxies (the caller passes that in), or log
//! anything a request carries.

#![deny(missing_docs)]

pub mod limit;
pub mod openapi;
mod serve;
mod tls;

use std::path::PathBuf;

pub use limit::{RateLimit, enforce_rate_limit, enforce_request_timeout};
pub use serve::{ConnectionSecurity, ServeOptions, serve};
pub use tls::{RELOAD_CHECK, TlsFiles, server_config};

/// Why a listener cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The certificate or key cannot be used.
    #[error("TLS: {path}: {reason}")]
    Tls {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The listening socket failed.
    #[error("listener: {0}")]
    Listen(std::io::Error),
}
