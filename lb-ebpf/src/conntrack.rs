//! Connection tracking: one LRU entry per direction of a translated flow,
//! keyed by the 5-tuple as it appears on the wire in that direction, so
//! both the forward packet and the reply find their translation with one
//! lookup.
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::generated::bpf_get_prandom_u32};
use lb_common::{Backend, CT_FORWARD, CT_REPLY, ConntrackKey, ConntrackValue, DatapathConfig};

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

/// Why a flow could not be recorded.
pub enum RecordError {
    /// The map refused an entry.
    Full,
    /// Source translation was needed, and no node address is configured or
    /// no source port was free.
    NoSnatPort,
}

/// How many source ports a new translated flow tries before giving up.
const SNAT_PORT_ATTEMPTS: u32 = 8;

/// Records that the flow `tuple` (client → frontend) goes to `backend`,
/// picked from `backend_set`, and that the backend's replies are to be
/// translated back to the frontend.
#[inline(always)]
pub fn record(tuple: &ConntrackKey, service_id: u32, backend: Backend, backend_set: u32) -> Result<(), RecordError> {
    let reply_tuple = reply_key(tuple, backend, tuple.src_ip, tuple.src_port);
    let reply = reply_value(tuple, service_id, 0, 0);
    // The reply entry goes first: once the forward entry exists, packets can
    // reach the backend, and its answer must already be translatable.
    CONNTRACK.insert(&reply_tuple, &reply, 0).map_err(|_| RecordError::Full)?;
    let forward = forward_value(service_id, backend, backend_set, 0, 0);
    CONNTRACK.insert(tuple, &forward, 0).map_err(|_| RecordError::Full)
}

/// As `record`, with the flow's source translated to `config.snat_ip` and
/// a source port of the configured range that no other flow to the same
/// backend uses (the client's own port when it is in the range and free);
/// returns that port (network byte order).
#[inline(always)]
pub fn record_with_snat(
    tuple: &ConntrackKey,
    service_id: u32,
    backend: Backend,
    backend_set: u32,
    config: &DatapathConfig,
) -> Result<u16, RecordError> {
    let (min, max) = (config.snat_port_min, config.snat_port_max);
    if config.snat_ip == 0 || min == 0 || max < min {
        return Err(RecordError::NoSnatPort);
    }
    let span = u32::from(max - min) + 1;
    let client_port = u16::from_be(tuple.src_port);
    let reply = reply_value(tuple, service_id, tuple.src_ip, tuple.src_port);
    for attempt in 0..SNAT_PORT_ATTEMPTS {
        let port = if attempt == 0 && client_port >= min && client_port <= max {
            client_port
        } else {
            // SAFETY: a helper call without arguments.
            min + (unsafe { bpf_get_prandom_u32() } % span) as u16
        };
        let reply_tuple = reply_key(tuple, backend, config.snat_ip, port.to_be());
        // BPF_NOEXIST: a port another flow to this backend holds is taken,
        // even by a flow recorded on another CPU at the same moment.
        if CONNTRACK.insert(&reply_tuple, &reply, u64::from(BPF_NOEXIST)).is_ok() {
            let forward = forward_value(service_id, backend, backend_set, config.snat_ip, port.to_be());
            CONNTRACK.insert(tuple, &forward, 0).map_err(|_| RecordError::Full)?;
            return Ok(port.to_be());
        }
    }
    Err(RecordError::NoSnatPort)
}

/// The key of the backend's replies, sent to `dst_ip:dst_port` (the client,
/// or the node's address when the source was translated).
#[inline(always)]
fn reply_key(tuple: &ConntrackKey, backend: Backend, dst_ip: u32, dst_port: u16) -> ConntrackKey {
    ConntrackKey { src_ip: backend.ip, dst_ip, src_port: backend.port, dst_port, proto: tuple.proto, _pad: 0, _pad2: 0 }
}

/// Replies get the frontend as their source back, and with source
/// translation the client as their destination.
#[inline(always)]
fn reply_value(tuple: &ConntrackKey, service_id: u32, client_ip: u32, client_port: u16) -> ConntrackValue {
    ConntrackValue {
        nat_ip: tuple.dst_ip,
        service_id,
        nat_port: tuple.dst_port,
        direction: CT_REPLY,
        _pad: 0,
        backend_set: 0,
        snat_ip: client_ip,
        snat_port: client_port,
        _pad2: 0,
    }
}

#[inline(always)]
fn forward_value(service_id: u32, backend: Backend, backend_set: u32, snat_ip: u32, snat_port: u16) -> ConntrackValue {
    ConntrackValue {
        nat_ip: backend.ip,
        service_id,
        nat_port: backend.port,
        direction: CT_FORWARD,
        _pad: 0,
        backend_set,
        snat_ip,
        snat_port,
        _pad2: 0,
    }
}
