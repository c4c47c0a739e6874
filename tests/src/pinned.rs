//! Waiting on a running agent's pinned maps until a change is applied.
//!
//! The maps are read through lbctl's reader, and how long the change took is
//! measured.
use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use lb_common::{FrontendKey, Reason};
use lb_userspace::inspect;

pub struct PinnedMaps(inspect::PinnedMaps);

impl PinnedMaps {
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(Self(inspect::PinnedMaps::open(dir)?))
    }

    /// How many packets the datapath counted under `reason`.
    pub fn verdict_count(&self, reason: Reason) -> Result<u64> {
        let totals = inspect::verdicts(&self.0)?;
        Ok(totals.into_iter().find(|(name, _)| *name == reason.name()).map_or(0, |(_, count)| count))
    }

    /// The backend addresses a frontend picks new connections from, or
    /// `None` when the frontend does not exist.
    pub fn backends(&self, frontend: FrontendKey) -> Option<BTreeSet<Ipv4Addr>> {
        self.0.backends(&frontend).map(|backends| backends.iter().map(|b| *b.ip()).collect())
    }

    /// The names of the programmed service ports (`namespace/name:port`).
    pub fn service_names(&self) -> Result<BTreeSet<String>> {
        Ok(inspect::services(&self.0)?.into_iter().map(|s| s.name).collect())
    }

    /// Polls until the frontend's backends are `expected` (`None`: until the
    /// frontend is gone); returns how long it took from `since`.
    pub fn wait_for(&self, frontend: FrontendKey, expected: Option<&BTreeSet<Ipv4Addr>>, since: Instant, timeout: Duration) -> Result<Duration> {
        loop {
            if self.backends(frontend).as_ref() == expected {
                return Ok(since.elapsed());
            }
            if since.elapsed() > timeout {
                bail!("after {timeout:?} the frontend's backends are {:?}, not {expected:?}", self.backends(frontend));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
