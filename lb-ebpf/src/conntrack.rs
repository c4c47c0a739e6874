//! Connection tracking: one LRU entry per direction of a translated flow,
//! keyed by the 5-tuple as it appears on the wire in that direction, so
//! both the forward packet and the reply find their translation with one
//! lookup.
use lb_common::{Backend, CT_FORWARD, CT_REPLY, ConntrackKey, ConntrackValue};

use crate::maps::CONNTRACK;

/// A conntrack entry found for a packet.
pub struct Entry(*mut ConntrackValue);

impl Entry {
    #[inline(always)]
    pub fn value(&self) -> ConntrackValue {
        // SAFETY: the pointer came from a successful lookup and stays valid
        // for this program run; entries are written whole.
        unsafe { *self.0 }
    }

    /// Records that the flow's backend was found in `backend_set`, so later
    /// packets skip the membership lookup while that set is current.
    #[inline(always)]
    pub fn remember_backend_set(&self, backend_set: u32) {
        // SAFETY: as above; a single aligned u32 store.
        unsafe { (*self.0).backend_set = backend_set };
    }
}

/// The entry for a packet's 5-tuple.
#[inline(always)]
pub fn lookup(tuple: &ConntrackKey) -> Option<Entry> {
    CONNTRACK.get_ptr_mut(tuple).map(Entry)
}

/// The map refused an entry.
pub struct ConntrackFull;

/// Records that the flow `tuple` (client → frontend) goes to `backend`,
/// picked from `backend_set`, and that the backend's replies are to be
/// translated back to the frontend.
#[inline(always)]
pub fn record(
    tuple: &ConntrackKey,
    service_id: u32,
    backend: Backend,
    backend_set: u32,
) -> Result<(), ConntrackFull> {
    let forward = ConntrackValue {
        nat_ip: backend.ip,
        service_id,
        nat_port: backend.port,
        direction: CT_FORWARD,
        _pad: 0,
        backend_set,
    };
    let reply_tuple = ConntrackKey {
        src_ip: backend.ip,
        dst_ip: tuple.src_ip,
        src_port: backend.port,
        dst_port: tuple.src_port,
        proto: tuple.proto,
        _pad: 0,
            _pad2: 0,
    };
    let reply = ConntrackValue {
        nat_ip: tuple.dst_ip,
        service_id,
        nat_port: tuple.dst_port,
        direction: CT_REPLY,
        _pad: 0,
        backend_set: 0,
    };
    // The reply entry goes first: once the forward entry exists, packets can
    // reach the backend, and its answer must already be translatable.
    CONNTRACK.insert(&reply_tuple, &reply, 0).map_err(|_| ConntrackFull)?;
    CONNTRACK.insert(tuple, &forward, 0).map_err(|_| ConntrackFull)
}
