//! Sources of truth: the Kubernetes API (`api`) or a directory of manifests
//! (`manifests`). A source's background task signals on a watch channel
//! when it noticed a change; the agent then takes a snapshot of the
//! objects, once per sync however many changes came in between.
pub mod api;
pub mod manifests;

use std::time::Instant;

use tokio::sync::watch;

use crate::{error::Result, model::kubernetes::ClusterObjects};

/// The objects as a source sees them now.
#[derive(Clone, Debug)]
pub struct Update {
    pub objects: ClusterObjects,
    /// Objects the source could not read, one line each (object and why).
    pub skipped: Vec<String>,
}

/// When the source last noticed a change; `None` until it has a complete
/// view (the initial lists, the first read of the directory).
pub type ChangeSender = watch::Sender<Option<Instant>>;
pub type ChangeReceiver = watch::Receiver<Option<Instant>>;

pub enum Source {
    Manifests(manifests::ManifestDir),
    Api(api::ApiSource),
}

impl Source {
    /// The objects now.
    pub fn snapshot(&mut self) -> Result<Update> {
        match self {
            Source::Manifests(dir) => dir.load(),
            Source::Api(api) => Ok(api.snapshot()),
        }
    }
}
