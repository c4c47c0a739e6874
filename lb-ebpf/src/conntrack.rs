//! Connection tracking: a flow's translation, kept for its later packets and its replies.
//!
//! One LRU entry per direction of a translated flow, keyed by the 5-tuple as it
//! appears on the wire in that direction, so both the forward packet and the
//! reply find their translation with one lookup. TCP and UDP flows have a table
//! each (`CONNTRACK_TCP`, `CONNTRACK_UDP`).
//!
//! Each entry carries its flow's state and expiry (`lifecycle`): an expired
//! entry is a miss, a closed flow's tuple opens a new connection, and the
//! two entries of a flow are kept in step, their state and expiry written
//! together, a missing one restored from the other.
//!
//! Admission: a TCP connection opened by a SYN is recorded in
//! `CONNTRACK_TCP_PENDING` and moves to `CONNTRACK_TCP` when the backend
//! answers, so a SYN flood churns only the pending table. Only packets that
//! can belong to a pending flow (SYN, SYN-ACK, RST) look there: every other
//! packet pays one lookup, as before.
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::generated::{bpf_get_prandom_u32, bpf_jiffies64, bpf_ktime_get_ns},
};
use lb_common::{
    Backend, CT_FORWARD, CT_REPLY, ConntrackKey, ConntrackValue, Endpoint, IPPROTO_TCP,
    lifecycle::{FLOW_SEEN_REPLY, TCP_ACK, TCP_RST, TCP_SYN, flags_after, initial_flags, is_alive, is_closed, needs_refresh, opens_connection, ticks_from_ns},
};

pub use crate::family::Table;
use crate::{
    family::{Family, MapFull},
    maps::SNAT_PORT_CURSOR,
    parse::Flow,
    service,
};

/// The monotonic clock in ticks (`lifecycle`), to within a timer tick: all
/// a lifetime of seconds needs. From jiffies (one load: the verifier
/// inlines the helper) as the agent configured, else from the monotonic
/// clock (a helper call).
#[inline(always)]
pub fn now() -> u32 {
    // SAFETY: helper calls without arguments.
    let jiffies = unsafe { bpf_jiffies64() };
    service::clock_ticks(jiffies).unwrap_or_else(|| ticks_from_ns(unsafe { bpf_ktime_get_ns() }))
}

/// A conntrack entry found for a packet.
pub struct Entry<A> {
    value: *mut ConntrackValue<A>,
    table: Table,
}

impl<A: Family> Entry<A> {
    /// The entry in the map, read in place: the fast path reads only the
    /// fields it needs, when it needs them.
    #[inline(always)]
    pub fn value(&self) -> &ConntrackValue<A> {
        // SAFETY: the pointer came from a successful lookup and stays valid
        // for this program run; the writes through it (`remember_backend_set`,
        // `track`) are made after the last use of this borrow.
        unsafe { &*self.value }
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
        unsafe { (*self.value).backend_set = backend_set };
    }

    /// Moves the flow's state and expiry on for a packet just translated by
    /// this entry. Most packets change neither enough to write; a write
    /// (every few seconds of a busy flow, a state change, or any packet of
    /// a pending connection) goes to both of the flow's entries, restoring
    /// the other one if it is gone. A
    /// pending connection the backend answered moves to the confirmed
    /// table. Not while a borrow from `value` is in use.
    #[inline(always)]
    pub fn track(&self, flow: &Flow<A>, now: u32) {
        // SAFETY: as above; the fields are read, then written, here only.
        let ct = unsafe { &mut *self.value };
        let flags = flags_after(ct.flow_flags, ct.direction == CT_REPLY, flow.tcp_flags);
        let expires = now.saturating_add(service::ct_lifetime(flow.tuple.proto, flags));
        // A pending connection's packets (a retransmitted SYN) always go on
        // to the partner check: a reply entry that the garbage collector or
        // an eviction took is back before the backend's answer comes.
        if self.table == Table::Confirmed && flags == ct.flow_flags && !needs_refresh(ct.expires, expires) {
            return;
        }
        ct.flow_flags = flags;
        ct.expires = expires;
        let key = &flow.tuple;
        if self.table == Table::Pending && flags & FLOW_SEEN_REPLY != 0 {
            confirm(key, ct);
            return;
        }
        let partner_key = ct.partner_key(key.proto);
        match A::ct_lookup(self.table, &partner_key) {
            Some(partner) => {
                // SAFETY: a pointer from a successful lookup, valid for this
                // run; two plain stores.
                let partner = unsafe { &mut *partner };
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
                let _restored_unless_taken = insert(&partner_key, &ct.partner(key), BPF_NOEXIST, self.table);
            }
        }
    }
}

/// Moves a pending connection that the backend just answered, both of its
/// entries (`ct` is `key`'s, already updated), to the confirmed table.
#[inline(always)]
fn confirm<A: Family>(key: &ConntrackKey<A>, ct: &ConntrackValue<A>) {
    let partner_key = ct.partner_key(key.proto);
    let partner = match A::ct_lookup(Table::Pending, &partner_key) {
        // SAFETY: a pointer from a successful lookup, valid for this run.
        Some(held) if ct.pairs_with(key, unsafe { &*held }) => {
            // SAFETY: as above.
            let mut partner = unsafe { *held };
            partner.flow_flags = ct.flow_flags;
            partner.expires = ct.expires;
            partner
        }
        _ => ct.partner(key),
    };
    // The partner first, as when a flow is recorded: once this entry is
    // confirmed, its packets' answers must be found.
    if insert(&partner_key, &partner, 0, Table::Confirmed).is_ok() && insert(key, ct, 0, Table::Confirmed).is_ok() {
        remove(&partner_key, Table::Pending);
        remove(key, Table::Pending);
    }
}

/// The entry for a packet's 5-tuple: in the confirmed table, or for the
/// packets that can belong to a pending connection (`tcp_flags` with SYN
/// or RST), in the pending table.
#[inline(always)]
pub fn lookup<A: Family>(tuple: &ConntrackKey<A>, tcp_flags: u8) -> Option<Entry<A>> {
    if let Some(value) = A::ct_lookup(Table::Confirmed, tuple) {
        return Some(Entry { value, table: Table::Confirmed });
    }
    if tuple.proto != IPPROTO_TCP || tcp_flags & (TCP_SYN | TCP_RST) == 0 {
        return None;
    }
    A::ct_lookup(Table::Pending, tuple).map(|value| Entry { value, table: Table::Pending })
}

/// The entry for `tuple` in any table (for ICMP errors, which carry no
/// flags of their own).
#[inline(always)]
pub fn lookup_any<A: Family>(tuple: &ConntrackKey<A>) -> Option<Entry<A>> {
    lookup(tuple, TCP_SYN)
}

/// Stores `value` for `key` in `table` (`flags`: 0, or BPF_NOEXIST to fail
/// when the key is held).
#[inline(always)]
fn insert<A: Family>(key: &ConntrackKey<A>, value: &ConntrackValue<A>, flags: u32, table: Table) -> Result<(), RecordError> {
    A::ct_insert(table, key, value, u64::from(flags)).map_err(|MapFull| RecordError::Full)
}

/// Deletes `key` from `table`, if it is there.
#[inline(always)]
fn remove<A: Family>(key: &ConntrackKey<A>, table: Table) {
    A::ct_remove(table, key);
}

/// Why a flow could not be recorded.
pub enum RecordError {
    /// The backend's replies to this flow would carry the tuple of another
    /// live flow's (the same client port reaching the same backend through
    /// another frontend): to be recorded with its source port translated.
    Clash,
    /// The map refused an entry.
    Full,
    /// Source translation was needed (external traffic, hairpin, or a
    /// clash of reply tuples), and no node address or port range is
    /// configured, or no source port was free.
    NoSnatPort,
}

/// How many source ports a new translated flow looks at before giving up
/// (128 would take the verifier four times as long). Ports are tried in
/// turn from a per-CPU cursor, so the ones tried first are the longest
/// unused: a port is skipped only when a live flow to the same backend
/// holds it.
const SNAT_PORT_ATTEMPTS: u32 = 64;

/// The state and expiry a new flow's two entries start with, and their
/// table.
#[derive(Clone, Copy)]
pub struct Start {
    pub flow_flags: u8,
    pub expires: u32,
    /// A TCP connection's opening SYN: pending until the backend answers.
    /// A flow picked up mid-stream (after an eviction or a restart) is
    /// confirmed at once: its connection was open.
    pub table: Table,
}

impl Start {
    /// For the flow's first packet `flow`, seen at `now`.
    #[inline(always)]
    pub fn of<A>(flow: &Flow<A>, now: u32) -> Self {
        let flow_flags = initial_flags(flow.tcp_flags);
        let opening = flow.tuple.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN;
        Self {
            flow_flags,
            expires: now.saturating_add(service::ct_lifetime(flow.tuple.proto, flow_flags)),
            table: if opening { Table::Pending } else { Table::Confirmed },
        }
    }

    #[inline(always)]
    fn stamp<A>(self, value: &mut ConntrackValue<A>) {
        value.flow_flags = self.flow_flags;
        value.expires = self.expires;
    }
}

/// Where a new flow goes: its service and backend, the backend set it was
/// picked from, and its start, at `now`.
#[derive(Clone, Copy)]
pub struct Placement<A: Family> {
    pub service_id: u32,
    pub backend: Backend<A>,
    pub backend_set: u32,
    pub start: Start,
    pub now: u32,
}

/// Whether a held entry's tuple may be taken by a new flow: the flow it
/// belongs to is over (closed or expired).
#[inline(always)]
fn is_over<A>(held: &ConntrackValue<A>, now: u32) -> bool {
    !is_alive(held.expires, now) || is_closed(held.flow_flags)
}

/// Stores `value` for `key` in `table` unless a live flow holds the key
/// (in either TCP table); a closed or expired flow's entry is taken over,
/// and removed from the other table.
#[inline(always)]
fn claim<A: Family>(key: &ConntrackKey<A>, value: &ConntrackValue<A>, now: u32, table: Table) -> Result<(), RecordError> {
    if key.proto == IPPROTO_TCP {
        let other = if table == Table::Pending { Table::Confirmed } else { Table::Pending };
        if let Some(held) = A::ct_lookup(other, key) {
            // SAFETY: a pointer from a successful lookup, read at once.
            if !is_over(unsafe { &*held }, now) {
                return Err(RecordError::NoSnatPort);
            }
            remove(key, other);
        }
    }
    if insert(key, value, BPF_NOEXIST, table).is_ok() {
        return Ok(());
    }
    match A::ct_lookup(table, key) {
        // SAFETY: as above.
        Some(held) if !is_over(unsafe { &*held }, now) => Err(RecordError::NoSnatPort),
        // Over, or evicted since the insert failed: written over.
        _ => insert(key, value, 0, table),
    }
}

/// Records that the flow `tuple` (client → frontend) goes to `backend`,
/// picked from `backend_set`, and that the backend's replies are to be
/// translated back to the frontend; returns the forward entry.
///
/// When the same client port already reaches the same backend through
/// another frontend, the replies of the two flows would carry the same
/// 5-tuple: `RecordError::Clash`, and the caller records the flow with its
/// source port translated (the address kept, a port from the source NAT
/// range), as Linux conntrack resolves such a clash.
#[inline(always)]
pub fn record<A: Family>(tuple: &ConntrackKey<A>, placed: &Placement<A>) -> Result<&'static ConntrackValue<A>, RecordError> {
    let scratch = A::scratch().ok_or(RecordError::Full)?;
    let mut table = placed.start.table;
    let client = tuple.source();
    scratch.reply_key = reply_key(tuple, placed.backend, client);
    scratch.reply = reply_value(&scratch.reply_key, tuple, placed.service_id);
    placed.start.stamp(&mut scratch.reply);
    // The reply entry goes first: once the forward entry exists, packets can
    // reach the backend, and its answer must already be translatable.
    if claim(&scratch.reply_key, &scratch.reply, placed.now, table).is_err() {
        let held = lookup_any(&scratch.reply_key);
        if held.as_ref().is_some_and(|held| held.value().source() != scratch.reply.source()) {
            return Err(RecordError::Clash);
        }
        // This flow's own live reply entry, its forward entry evicted: the
        // flow is written again where that entry is.
        if let Some(held) = held {
            table = held.table;
        }
        insert(&scratch.reply_key, &scratch.reply, 0, table)?;
    }
    scratch.forward = forward_value(tuple, client, placed.service_id, placed.backend, placed.backend_set);
    placed.start.stamp(&mut scratch.forward);
    insert(tuple, &scratch.forward, 0, table)?;
    Ok(&scratch.forward)
}

/// As `record`, with the flow's source translated to `snat_ip` and a source
/// port of the configured range that no live flow to the same backend uses
/// (the client's own port when it is in the range and free).
#[inline(always)]
pub fn record_with_snat<A: Family>(tuple: &ConntrackKey<A>, placed: &Placement<A>, snat_ip: A) -> Result<&'static ConntrackValue<A>, RecordError> {
    let Placement { backend, now, .. } = *placed;
    let (min, max) = service::snat_port_range();
    if snat_ip.is_unspecified() || min == 0 || max < min {
        return Err(RecordError::NoSnatPort);
    }
    let span = u32::from(max - min) + 1;
    let client_port = u16::from_be(tuple.src_port);
    let Some(cursor) = SNAT_PORT_CURSOR.get_ptr_mut(0) else {
        return Err(RecordError::NoSnatPort);
    };
    // SAFETY: this CPU's slot of a per-CPU array, valid for this run.
    let first = unsafe { *cursor };
    // The search only reads: the verifier walks each of its iterations, so
    // the writes (and their branches) come once, after it.
    let mut found = None;
    let mut attempt = 0;
    while attempt < SNAT_PORT_ATTEMPTS {
        let port = if attempt == 0 && client_port >= min && client_port <= max {
            client_port
        } else {
            min + (first.wrapping_add(attempt) % span) as u16
        };
        if is_free(&reply_key(tuple, backend, Endpoint { ip: snat_ip, port: port.to_be() }), now) {
            found = Some(port);
            break;
        }
        attempt += 1;
    }
    // SAFETY: as above. Next time from past the ports tried, or after a
    // run of held ones, from a random place in the range.
    unsafe { *cursor = if found.is_some() { first.wrapping_add(attempt + 1) } else { bpf_get_prandom_u32() } };
    let port = found.ok_or(RecordError::NoSnatPort)?;
    let node = Endpoint { ip: snat_ip, port: port.to_be() };
    let scratch = A::scratch().ok_or(RecordError::Full)?;
    scratch.reply_key = reply_key(tuple, backend, node);
    scratch.reply = reply_value(&scratch.reply_key, tuple, placed.service_id);
    placed.start.stamp(&mut scratch.reply);
    // BPF_NOEXIST: a port another CPU took for a flow to this backend a
    // moment ago is not taken again.
    claim(&scratch.reply_key, &scratch.reply, now, placed.start.table)?;
    scratch.forward = forward_value(tuple, node, placed.service_id, backend, placed.backend_set);
    placed.start.stamp(&mut scratch.forward);
    insert(tuple, &scratch.forward, 0, placed.start.table)?;
    Ok(&scratch.forward)
}

/// Whether no live flow holds `key` in any table.
#[inline(always)]
fn is_free<A: Family>(key: &ConntrackKey<A>, now: u32) -> bool {
    // SAFETY: pointers from successful lookups, read at once.
    let held = |entry: Option<*mut ConntrackValue<A>>| entry.is_some_and(|held| !is_over(unsafe { &*held }, now));
    !held(A::ct_lookup(Table::Confirmed, key)) && (key.proto != IPPROTO_TCP || !held(A::ct_lookup(Table::Pending, key)))
}

/// When a flow is placed afresh over an entry that is still stored (its
/// backend left, or its tuple reused after it closed or expired), the old
/// flow's entries go: its reply entry neither holds a source NAT port nor
/// translates a later direct connection's packets, and the new flow's
/// entries (perhaps in the other table) are the only ones for its tuple.
#[inline(always)]
pub fn forget<A: Family>(tuple: &ConntrackKey<A>, old: Entry<A>) {
    let table = old.table;
    let old = old.value();
    let partner_key = old.partner_key(tuple.proto);
    // SAFETY: a pointer from a successful lookup, read at once.
    if A::ct_lookup(table, &partner_key).is_some_and(|partner| old.pairs_with(tuple, unsafe { &*partner })) {
        remove(&partner_key, table);
    }
    remove(tuple, table);
}

/// The key of the backend's replies, sent to `to` (the client, or the
/// node's address when the source was translated).
#[inline(always)]
fn reply_key<A: Family>(tuple: &ConntrackKey<A>, backend: Backend<A>, to: Endpoint<A>) -> ConntrackKey<A> {
    ConntrackKey::of(backend.into(), to, tuple.proto)
}

/// Replies come from the frontend again and go to the client.
#[inline(always)]
fn reply_value<A: Family>(reply_tuple: &ConntrackKey<A>, tuple: &ConntrackKey<A>, service_id: u32) -> ConntrackValue<A> {
    ConntrackValue::translating(reply_tuple, tuple.destination(), tuple.source(), service_id, 0, CT_REPLY)
}

/// Requests come from `source` (the client, or the node with source NAT)
/// and go to the backend.
#[inline(always)]
fn forward_value<A: Family>(tuple: &ConntrackKey<A>, source: Endpoint<A>, service_id: u32, backend: Backend<A>, backend_set: u32) -> ConntrackValue<A> {
    ConntrackValue::translating(tuple, source, backend.into(), service_id, backend_set, CT_FORWARD)
}
