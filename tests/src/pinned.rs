//! Reading a running agent's pinned maps, to wait for it to have applied a
//! change and to measure how long that took.
use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::maps::{HashMap, Map, MapData};
use lb_common::{
    Backend, BackendSlotKey, FrontendKey, FrontendValue, MAP_BACKEND_SLOTS, MAP_SERVICE_FRONTENDS, ip_from_be,
};

pub struct PinnedMaps {
    frontends: HashMap<MapData, FrontendKey, FrontendValue>,
    slots: HashMap<MapData, BackendSlotKey, Backend>,
}

fn open_hash(dir: &Path, name: &str) -> Result<Map> {
    let data = MapData::from_pin(dir.join(name)).with_context(|| format!("opening pinned map {name}"))?;
    Ok(Map::HashMap(data))
}

impl PinnedMaps {
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(Self {
            frontends: HashMap::try_from(open_hash(dir, MAP_SERVICE_FRONTENDS)?)?,
            slots: HashMap::try_from(open_hash(dir, MAP_BACKEND_SLOTS)?)?,
        })
    }

    /// The backend addresses a frontend picks new connections from, or
    /// `None` when the frontend does not exist.
    pub fn backends(&self, frontend: FrontendKey) -> Option<BTreeSet<Ipv4Addr>> {
        let value = self.frontends.get(&frontend, 0).ok()?;
        (0..value.backend_count)
            .map(|slot| {
                self.slots.get(&BackendSlotKey { backend_set: value.backend_set, slot }, 0).ok().map(|b| ip_from_be(b.ip))
            })
            .collect()
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
