//! Connection tracking: one LRU entry per direction of a translated flow,
//! keyed by the 5-tuple as it appears on the wire in that direction, so
//! both the forward packet and the reply find their translation with one
//! lookup. TCP and UDP flows have a table each (`CONNTRACK_TCP`,
//! `CONNTRACK_UDP`).
//!
//! Each entry carries its flow's state and expiry (`lifecycle`): an expired
//! entry is a miss, a closed flow's tuple opens a new connection, and the
//! two entries of a flow are kept in step, their state and expiry written
//! together, a missing one restored from the other.
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::generated::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
};
use lb_common::{
    Backend, CT_FORWARD, CT_REPLY, ConntrackKey, ConntrackValue, Endpoint, IPPROTO_TCP,
    lifecycle::{flags_after, initial_flags, is_alive, is_closed, needs_refresh, opens_connection, ticks_from_ns},
};

use crate::{
    maps::{CONNTRACK_TCP, CONNTRACK_UDP, SNAT_PORT_CURSOR},
    parse::Flow,
    service,
};

/// The monotonic clock in ticks (`lifecycle`), read coarsely: the last
/// timer tick's time is all a lifetime of seconds needs, and cheaper.
#[inline(always)]
pub fn now() -> u32 {
    // SAFETY: a helper call without arguments.
    ticks_from_ns(unsafe { bpf_ktime_get_coarse_ns() })
}

/// A conntrack entry found for a packet.
pub struct Entry(*mut ConntrackValue);

impl Entry {
    /// The entry in the map, read in place: the fast path reads only the
    /// fields it needs, when it needs them.
    #[inline(always)]
    pub fn value(&self) -> &ConntrackValue {
        // SAFETY: the pointer came from a successful lookup and stays valid
        // for this program run; the writes through it (`remember_backend_set`,
        // `track`) are made after the last use of this borrow.
        unsafe { &*self.0 }
    }

    /// Whether the entry translates a packet with `tcp_flags` at `now`: it
    /// has not expired, and the packet does not open a new connection on a
    /// closed flow's tuple (a client reusing its port, or a direct
    /// connection to the backend answered from the same ports).
    #[inline(always)]
    pub fn serves(&self, tcp_flags: u8, now: u32) -> bool {
        let ct = self.value();
        is_alive(ct.expires, now) && !(opens_connection(tcp_flags) && is_closed(ct.flow_flags))
    }

    /// Records that the flow's backend was found in `backend_set`, so later
    /// packets skip the membership lookup while that set is current. Not
    /// while a borrow from `value` is in use.
    #[inline(always)]
    pub fn remember_backend_set(&self, backend_set: u32) {
        // SAFETY: as above; a single aligned u32 store.
        unsafe { (*self.0).backend_set = backend_set };
    }

    /// Moves the flow's state and expiry on for a packet just translated by
    /// this entry. Most packets change neither enough to write; a write
    /// (every few seconds of a busy flow, or a state change) goes to both
    /// of the flow's entries, restoring the other one if it is gone. Not
    /// while a borrow from `value` is in use.
    #[inline(always)]
    pub fn track(&self, flow: &Flow, now: u32) {
        // SAFETY: as above; the fields are read, then written, here only.
        let ct = unsafe { &mut *self.0 };
        let flags = flags_after(ct.flow_flags, ct.direction == CT_REPLY, flow.tcp_flags);
        let expires = now.saturating_add(service::ct_lifetime(flow.tuple.proto, flags));
        if flags == ct.flow_flags && !needs_refresh(ct.expires, expires) {
            return;
        }
        ct.flow_flags = flags;
        ct.expires = expires;
        let key = &flow.tuple;
        let partner_key = ct.partner_key(key.proto);
        match lookup(&partner_key) {
            Some(partner) => {
                // SAFETY: a pointer from a successful lookup, valid for this
                // run; two plain stores.
                let partner = unsafe { &mut *partner.0 };
                // A tuple another flow took over (its source NAT port
                // reused after this flow closed) is not this flow's.
                if ct.pairs_with(key, partner) {
                    partner.flow_flags = flags;
                    partner.expires = expires;
                }
            }
            // Evicted or collected on its own: restored, so that this
            // flow's other direction is translated again.
            None => {
                let _restored_unless_taken = insert(&partner_key, &ct.partner(key), BPF_NOEXIST);
            }
        }
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
/// Ports are tried in turn from a per-CPU cursor, so the ones tried first
/// are the longest unused: a port is skipped only when a live flow to the
/// same backend holds it.
const SNAT_PORT_ATTEMPTS: u32 = 32;

/// The state and expiry a new flow's two entries start with.
#[derive(Clone, Copy)]
pub struct Start {
    pub flow_flags: u8,
    pub expires: u32,
}

impl Start {
    /// For the flow's first packet `flow`, seen at `now`.
    #[inline(always)]
    pub fn of(flow: &Flow, now: u32) -> Self {
        let flow_flags = initial_flags(flow.tcp_flags);
        Self { flow_flags, expires: now.saturating_add(service::ct_lifetime(flow.tuple.proto, flow_flags)) }
    }

    #[inline(always)]
    fn stamp(self, mut value: ConntrackValue) -> ConntrackValue {
        value.flow_flags = self.flow_flags;
        value.expires = self.expires;
        value
    }
}

/// Whether a held entry's tuple may be taken by a new flow: the flow it
/// belongs to is over (closed or expired).
#[inline(always)]
fn is_over(held: &ConntrackValue, now: u32) -> bool {
    !is_alive(held.expires, now) || is_closed(held.flow_flags)
}

/// Stores `value` for `key` unless a live flow holds the key; a closed or
/// expired flow's entry is taken over.
#[inline(always)]
fn claim(key: &ConntrackKey, value: &ConntrackValue, now: u32) -> Result<(), RecordError> {
    if insert(key, value, BPF_NOEXIST).is_ok() {
        return Ok(());
    }
    match lookup(key) {
        Some(held) if !is_over(held.value(), now) => Err(RecordError::NoSnatPort),
        // Over, or evicted since the insert failed: written over.
        _ => insert(key, value, 0),
    }
}

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
pub fn record(tuple: &ConntrackKey, service_id: u32, backend: Backend, backend_set: u32, start: Start, now: u32) -> Result<ConntrackValue, RecordError> {
    let client = tuple.source();
    let reply_tuple = reply_key(tuple, backend, client);
    let reply = start.stamp(reply_value(&reply_tuple, tuple, service_id));
    // The reply entry goes first: once the forward entry exists, packets can
    // reach the backend, and its answer must already be translatable.
    if insert(&reply_tuple, &reply, BPF_NOEXIST).is_err() {
        let clash = lookup(&reply_tuple).is_some_and(|held| held.value().source() != reply.source() && !is_over(held.value(), now));
        if clash {
            return record_with_snat(tuple, service_id, backend, backend_set, start, now, client.ip);
        }
        // This flow's own earlier entry (its tuple reused, or its forward
        // entry evicted), an entry evicted just now, or a finished flow's:
        // written again.
        insert(&reply_tuple, &reply, 0)?;
    }
    let forward = start.stamp(forward_value(tuple, client, service_id, backend, backend_set));
    insert(tuple, &forward, 0)?;
    Ok(forward)
}

/// As `record`, with the flow's source translated to `snat_ip` and a source
/// port of the configured range that no live flow to the same backend uses
/// (the client's own port when it is in the range and free).
#[inline(always)]
pub fn record_with_snat(
    tuple: &ConntrackKey,
    service_id: u32,
    backend: Backend,
    backend_set: u32,
    start: Start,
    now: u32,
    snat_ip: u32,
) -> Result<ConntrackValue, RecordError> {
    let (min, max) = service::snat_port_range();
    if snat_ip == 0 || min == 0 || max < min {
        return Err(RecordError::NoSnatPort);
    }
    let span = u32::from(max - min) + 1;
    let client_port = u16::from_be(tuple.src_port);
    let Some(cursor) = SNAT_PORT_CURSOR.get_ptr_mut(0) else {
        return Err(RecordError::NoSnatPort);
    };
    // SAFETY: this CPU's slot of a per-CPU array, valid for this run.
    let first = unsafe { *cursor };
    let mut attempt = 0;
    while attempt < SNAT_PORT_ATTEMPTS {
        let port = if attempt == 0 && client_port >= min && client_port <= max {
            client_port
        } else {
            min + (first.wrapping_add(attempt) % span) as u16
        };
        let node = Endpoint { ip: snat_ip, port: port.to_be() };
        let reply_tuple = reply_key(tuple, backend, node);
        let reply = start.stamp(reply_value(&reply_tuple, tuple, service_id));
        // BPF_NOEXIST first: a port a live flow to this backend holds is
        // skipped, even one recorded on another CPU at the same moment.
        if claim(&reply_tuple, &reply, now).is_ok() {
            // SAFETY: as above.
            unsafe { *cursor = first.wrapping_add(attempt + 1) };
            let forward = start.stamp(forward_value(tuple, node, service_id, backend, backend_set));
            insert(tuple, &forward, 0)?;
            return Ok(forward);
        }
        attempt += 1;
    }
    // Next time from elsewhere in the range: a random jump past the run of
    // held ports.
    // SAFETY: as above; a helper call without arguments.
    unsafe { *cursor = bpf_get_prandom_u32() };
    Err(RecordError::NoSnatPort)
}

/// When a flow is placed afresh over an entry that is still stored (its
/// backend left, or its tuple reused after it closed or expired), the old
/// flow's reply entry goes, so that it neither holds a source NAT port nor
/// translates a later direct connection's packets.
#[inline(always)]
pub fn forget(tuple: &ConntrackKey, old: &ConntrackValue) {
    let partner_key = old.partner_key(tuple.proto);
    if lookup(&partner_key).is_some_and(|partner| old.pairs_with(tuple, partner.value())) {
        let _already_gone = if tuple.proto == IPPROTO_TCP { CONNTRACK_TCP.remove(&partner_key) } else { CONNTRACK_UDP.remove(&partner_key) };
    }
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
