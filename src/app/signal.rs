//! The stop signal of `fleetgate serve`: ctrl-c (SIGINT) or SIGTERM.
//!
//! Installed by `main` before the gateway starts, so a signal that arrives while it is still
//! starting (a supervisor stopping it right after launch) is a clean stop once it is up, not
//! the default action, which kills the process before the store is flushed.

use anyhow::Context;

/// The registered signals; [`StopSignal::recv`] waits for the first of them.
pub struct StopSignal {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl StopSignal {
    /// Registers the handlers now (inside the runtime); from here on the signals are queued for
    /// [`recv`](Self::recv) instead of ending the process.
    pub fn install() -> anyhow::Result<StopSignal> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(StopSignal {
                interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
                terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            })
        }
        #[cfg(not(unix))]
        Ok(StopSignal {})
    }

    /// Waits for ctrl-c or SIGTERM (one received before this call counts).
    pub async fn recv(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => {},
            _ = self.terminate.recv() => {},
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
