//! Connection tracking: one LRU entry per direction of a translated flow,
//! keyed by the 5-tuple as it appears on the wire in that direction, so
//! both the forward packet and the reply find their translation with one
//! lookup. TCP and UDP flows have a table each (`CONNTRACK_TCP`,
//! `CONNTRACK_UDP`).
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::generated::bpf_get_prandom_u32};
use lb_common::{Backend, CT_FORWARD, CT_REPLY, ConntrackKey, ConntrackValue, DatapathConfig, Endpoint, IPPROTO_TCP};

use crate::{
    maps::{CONNTRACK_TCP, CONNTRACK_UDP},
    service,
};

/// A conntrack entry found for a packet.
pub struct Entry(*mut ConntrackValue);

impl Entry {
    /// The entry in the map, read in place: the fast path reads only the
    /// fields it needs, when it needs them.
    #[inline(always)]
    pub fn value(&self) -> &ConntrackValue {
        // SAFETY: the pointer came from a successful lookup and stays valid
        // for this program run; the only write through it is
        // `remember_backend_set`, made after the last use of this borrow.
        unsafe { &*self.0 }
    }

    /// Records that the flow's backend was found in `backend_set`, so later
    /// packets skip the membership lookup while that set is current. Not
    /// while a borrow from `value` is in use.
    #[inline(always)]
    pub fn remember_backend_set(&self, backend_set: u32) {
        // SAFETY: as above; a single aligned u32 store.
        unsafe { (*self.0).backend_set = backend_set };
    }
}

/// The entry for a packet's 5-tuple.
#[inline(always)]
pub fn lookup(tuple: &ConntrackKey) -> Option<Entry> {
    // One call site per map: the verifier inlines a lookup only where the
    // map is known.
    if tuple.proto == IPPROTO_TCP {
        CONNTRACK_TCP.get_ptr_mut(tuple).map(Entry)
    } else {
        CONNTRACK_UDP.get_ptr_mut(tuple).map(Entry)
    }
}

/// Stores `value` for `key` in its protocol's table (`flags`: 0, or
/// BPF_NOEXIST to fail when the key is held).
#[inline(always)]
fn insert(key: &ConntrackKey, value: &ConntrackValue, flags: u32) -> Result<(), RecordError> {
    let stored = if key.proto == IPPROTO_TCP {
        CONNTRACK_TCP.insert(key, value, u64::from(flags))
    } else {
        CONNTRACK_UDP.insert(key, value, u64::from(flags))
    };
    stored.map_err(|_| RecordError::Full)
}

/// Why a flow could not be recorded.
pub enum RecordError {
    /// The map refused an entry.
    Full,
    /// Source translation was needed (external traffic, hairpin, or a
    /// clash of reply tuples), and no node address or port range is
    /// configured, or no source port was free.
    NoSnatPort,
}

/// How many source ports a new translated flow tries before giving up.
const SNAT_PORT_ATTEMPTS: u32 = 8;

/// Records that the flow `tuple` (client → frontend) goes to `backend`,
/// picked from `backend_set`, and that the backend's replies are to be
/// translated back to the frontend; returns the forward entry.
///
/// When the same client port already reaches the same backend through
/// another frontend, the replies of the two flows would carry the same
/// 5-tuple: this flow's source port is then translated (the address kept,
/// a port from the source NAT range), as Linux conntrack resolves such a
/// clash.
#[inline(always)]
pub fn record(tuple: &ConntrackKey, service_id: u32, backend: Backend, backend_set: u32) -> Result<ConntrackValue, RecordError> {
    let client = tuple.source();
    let reply_tuple = reply_key(tuple, backend, client);
    let reply = reply_value(&reply_tuple, tuple, service_id);
    // The reply entry goes first: once the forward entry exists, packets can
    // reach the backend, and its answer must already be translatable.
    if insert(&reply_tuple, &reply, BPF_NOEXIST).is_err() {
        let clash = lookup(&reply_tuple).is_some_and(|held| held.value().source() != reply.source());
        if clash {
            let config = service::config();
            return record_with_snat(tuple, service_id, backend, backend_set, &DatapathConfig { snat_ip: client.ip, ..config });
        }
        // The same translation recorded before (this flow's, its forward
        // entry evicted since), or an entry evicted just now: written again.
        insert(&reply_tuple, &reply, 0)?;
    }
    let forward = forward_value(tuple, client, service_id, backend, backend_set);
    insert(tuple, &forward, 0)?;
    Ok(forward)
}

/// As `record`, with the flow's source translated to `config.snat_ip` and
/// a source port of the configured range that no other flow to the same
/// backend uses (the client's own port when it is in the range and free).
#[inline(always)]
pub fn record_with_snat(
    tuple: &ConntrackKey,
    service_id: u32,
    backend: Backend,
    backend_set: u32,
    config: &DatapathConfig,
) -> Result<ConntrackValue, RecordError> {
    let (min, max) = (config.snat_port_min, config.snat_port_max);
    if config.snat_ip == 0 || min == 0 || max < min {
        return Err(RecordError::NoSnatPort);
    }
    let span = u32::from(max - min) + 1;
    let client_port = u16::from_be(tuple.src_port);
    for attempt in 0..SNAT_PORT_ATTEMPTS {
        let port = if attempt == 0 && client_port >= min && client_port <= max {
            client_port
        } else {
            // SAFETY: a helper call without arguments.
            min + (unsafe { bpf_get_prandom_u32() } % span) as u16
        };
        let node = Endpoint { ip: config.snat_ip, port: port.to_be() };
        let reply_tuple = reply_key(tuple, backend, node);
        let reply = reply_value(&reply_tuple, tuple, service_id);
        // BPF_NOEXIST: a port another flow to this backend holds is taken,
        // even by a flow recorded on another CPU at the same moment.
        if insert(&reply_tuple, &reply, BPF_NOEXIST).is_ok() {
            let forward = forward_value(tuple, node, service_id, backend, backend_set);
            insert(tuple, &forward, 0)?;
            return Ok(forward);
        }
    }
    Err(RecordError::NoSnatPort)
}

/// The key of the backend's replies, sent to `to` (the client, or the
/// node's address when the source was translated).
#[inline(always)]
fn reply_key(tuple: &ConntrackKey, backend: Backend, to: Endpoint) -> ConntrackKey {
    ConntrackKey { src_ip: backend.ip, dst_ip: to.ip, src_port: backend.port, dst_port: to.port, proto: tuple.proto, _pad: 0, _pad2: 0 }
}

/// Replies come from the frontend again and go to the client.
#[inline(always)]
fn reply_value(reply_tuple: &ConntrackKey, tuple: &ConntrackKey, service_id: u32) -> ConntrackValue {
    ConntrackValue::translating(reply_tuple, tuple.destination(), tuple.source(), service_id, 0, CT_REPLY)
}

/// Requests come from `source` (the client, or the node with source NAT)
/// and go to the backend.
#[inline(always)]
fn forward_value(tuple: &ConntrackKey, source: Endpoint, service_id: u32, backend: Backend, backend_set: u32) -> ConntrackValue {
    ConntrackValue::translating(tuple, source, backend.into(), service_id, backend_set, CT_FORWARD)
}

