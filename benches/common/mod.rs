//! What the whole-service benches share: ports, child processes, waiting.

use std::net::TcpListener;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};

/// A knob from the environment, or its default.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A loopback port nothing listens on now.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A child process killed when dropped.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `ok` every 100 ms until it holds, failing after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !ok() {
        ensure!(Instant::now() < deadline, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Waits until every base URL answers `/healthz` (a service started by the bench).
pub fn wait_serving(bases: &[&str]) -> Result<()> {
    wait_until("marsad serves", Duration::from_secs(60), || {
        bases.iter().all(|base| {
            reqwest::blocking::Client::new()
                .get(format!("{base}/healthz"))
                .send()
                .is_ok_and(|r| r.status().is_success())
        })
    })
}
