//! Service lookups: which frontend a packet is for and which backend serves it.
//!
//! Lookups of frontends and service addresses, backend choice, and the check
//! that a backend still serves its service.
use aya_ebpf::helpers::generated::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use lb_common::{
    AffinityKey, AffinityValue, Backend, BackendSetMemberKey, BackendSlotKey, ConntrackKey, DATAPATH_ANSWER_ECHO,
    DATAPATH_SOCKET_LB_HOST_ONLY, DRAINING_SLOT, DatapathConfig, FRONTEND_SOURCE_RANGES, FrontendKey,
    FrontendValue, NO_BACKEND_SET, VIP_CLUSTER_IP, VipValue, lifecycle,
};

use crate::{
    family::Family,
    maps::{DATAPATH_CONFIG, SERVICE_BACKEND_SETS},
};

/// The frontend a packet is addressed to, if any.
#[inline(always)]
pub fn frontend<A: Family>(tuple: &ConntrackKey<A>) -> Option<FrontendValue<A>> {
    A::frontend(&FrontendKey { ip: tuple.dst_ip, port: tuple.dst_port, proto: tuple.proto, _pad: 0, _pad_v6: Default::default() })
}

/// Whether a new connection from `src_ip` may reach `fe`: always, unless it
/// is a load balancer IP with `loadBalancerSourceRanges` and the source is
/// in none of them.
#[inline(always)]
pub fn source_allowed<A: Family>(fe: &FrontendValue<A>, src_ip: A) -> bool {
    fe.flags & FRONTEND_SOURCE_RANGES == 0 || A::in_source_ranges(fe.service_id, src_ip)
}

/// The frontend that serves the client of `tuple`: the one it addressed,
/// or for a pod reaching an external address of an externalTrafficPolicy
/// Local service, the service's cluster IP frontend (the Local policy's
/// node-local endpoints are for clients from outside the cluster).
#[inline(always)]
pub fn serving_frontend<A: Family>(fe: FrontendValue<A>, tuple: &ConntrackKey<A>) -> FrontendValue<A> {
    if fe.in_cluster_ip.is_unspecified() || !A::is_cluster_source(tuple.src_ip) {
        return fe;
    }
    in_cluster_frontend(&fe, tuple.proto).unwrap_or(fe)
}

/// The cluster IP frontend that serves `fe`'s clients from inside the
/// cluster, when `fe` names one.
#[inline(always)]
pub fn in_cluster_frontend<A: Family>(fe: &FrontendValue<A>, proto: u8) -> Option<FrontendValue<A>> {
    if fe.in_cluster_ip.is_unspecified() {
        return None;
    }
    A::frontend(&FrontendKey { ip: fe.in_cluster_ip, port: fe.in_cluster_port, proto, _pad: 0, _pad_v6: Default::default() })
}

/// What `read` finds in the node's settings, read in place (no copy of the
/// whole entry); the default (false, 0) when the slot cannot be read.
#[inline(always)]
fn read_config<T: Default>(read: impl FnOnce(&DatapathConfig) -> T) -> T {
    // SAFETY: a pointer into the array's one slot, valid for this run.
    DATAPATH_CONFIG.get_ptr(0).map_or_else(T::default, |config| read(unsafe { &*config }))
}

/// The node's own network namespace cookie (0 when unknown), and whether
/// the socket programs serve that namespace only.
#[inline(always)]
pub fn socket_scope() -> (u64, bool) {
    read_config(|config| (config.host_netns_cookie, config.flags & DATAPATH_SOCKET_LB_HOST_ONLY != 0))
}

/// Whether a new flow from `src_ip` to a cluster IP gets the node as its
/// source (`Family::masquerades`), `--masquerade-all` included.
#[inline(always)]
pub fn masquerades_cluster_ip_client<A: Family>(src_ip: A) -> bool {
    A::masquerades(src_ip)
}

/// Whether `ip`, which no service has, is in one of the configured service
/// address ranges: a cluster IP not (or no longer) allocated.
#[inline(always)]
pub fn is_unallocated_cluster_ip<A: Family>(ip: A) -> bool {
    A::is_service_range(ip)
}

/// Whether an echo request to `ip` is answered: a cluster IP, with
/// `DATAPATH_ANSWER_ECHO` configured.
#[inline(always)]
pub fn answers_echo(ip: u32) -> bool {
    read_config(|config| config.flags & DATAPATH_ANSWER_ECHO != 0) && is_cluster_ip(ip)
}

/// The service address `ip`, if it is one.
#[inline(always)]
pub fn vip<A: Family>(ip: A) -> Option<VipValue> {
    A::vip(ip)
}

/// Whether `ip` is a cluster IP: nothing but the services answer there.
#[inline(always)]
pub fn is_cluster_ip<A: Family>(ip: A) -> bool {
    A::vip(ip).is_some_and(|v| v.flags & VIP_CLUSTER_IP != 0)
}

/// The source ports of translated flows, host byte order, inclusive;
/// (0, 0) until the agent configures them.
#[inline(always)]
pub fn snat_port_range() -> (u16, u16) {
    read_config(|config| (config.snat_port_min, config.snat_port_max))
}

/// The monotonic clock in ticks at `jiffies`, as the agent configured the
/// conversion; `None` when it did not.
#[inline(always)]
pub fn clock_ticks(jiffies: u64) -> Option<u32> {
    read_config(|config| (config.clock.ns_per_jiffy != 0).then(|| config.clock.ticks(jiffies)))
}

/// How long a flow of `proto` in state `flow_flags` lives without traffic,
/// in clock ticks; 0 (dead at once) until the agent configures it.
#[inline(always)]
pub fn ct_lifetime(proto: u8, flow_flags: u8) -> u32 {
    read_config(|config| lifecycle::lifetime(proto, flow_flags, &config.ct_lifetimes))
}

/// A backend picked uniformly at random among the frontend's current set,
/// or `None` when the set is empty.
#[inline(always)]
pub fn pick_backend<A: Family>(fe: &FrontendValue<A>) -> Option<Backend<A>> {
    if fe.backend_count == 0 {
        return None;
    }
    // SAFETY: a helper call without arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % fe.backend_count;
    A::backend_slot(BackendSlotKey { backend_set: fe.backend_set, slot })
}

/// The backend for a new connection of `client` (an `AffinityKey::client`):
/// with session affinity as `pick_backend_with_affinity`, else at random.
#[inline(always)]
pub fn pick_backend_for<A: Family>(fe: &FrontendValue<A>, client: A::Client) -> Option<Backend<A>> {
    if fe.affinity_seconds != 0 { pick_backend_with_affinity(fe, client) } else { pick_backend(fe) }
}

/// The backend for a new connection of `client` to a frontend with session
/// affinity: the one its last connection got, if that was at most the
/// affinity's timeout ago and the backend still takes new connections;
/// else a random one, remembered for the next.
#[inline(always)]
fn pick_backend_with_affinity<A: Family>(fe: &FrontendValue<A>, client: A::Client) -> Option<Backend<A>> {
    let key = AffinityKey { client, service_id: fe.service_id, _pad: 0 };
    // SAFETY: a helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let timeout_ns = u64::from(fe.affinity_seconds) * 1_000_000_000;
    if let Some(entry) = A::affinity(&key) {
        // SAFETY: a pointer from a successful lookup, valid for this run.
        let remembered = unsafe { *entry };
        if now.saturating_sub(remembered.last_used_ns()) <= timeout_ns && takes_new_connections(fe.backend_set, remembered.backend) {
            // SAFETY: as above; the entry rewritten in place.
            unsafe { *entry = AffinityValue::new(remembered.backend, now) };
            return Some(remembered.backend);
        }
    }
    let backend = pick_backend(fe)?;
    A::remember_affinity(&key, &AffinityValue::new(backend, now));
    Some(backend)
}

/// Whether `backend` has a slot in `backend_set` (a member, not draining).
#[inline(always)]
fn takes_new_connections<A: Family>(backend_set: u32, backend: Backend<A>) -> bool {
    A::member_slot(BackendSetMemberKey::new(backend_set, backend)).is_some_and(|slot| slot != DRAINING_SLOT)
}

/// The service's current backend set (an array read, no hashing).
#[inline(always)]
pub fn current_backend_set(service_id: u32) -> u32 {
    match SERVICE_BACKEND_SETS.get_ptr(service_id) {
        // SAFETY: a pointer into an array map slot, valid for the program's
        // run; a u32 read.
        Some(set) => unsafe { *set },
        None => NO_BACKEND_SET,
    }
}

/// Whether `backend` belongs to `backend_set`.
#[inline(always)]
pub fn is_member<A: Family>(backend_set: u32, backend: Backend<A>) -> bool {
    A::member_slot(BackendSetMemberKey::new(backend_set, backend)).is_some()
}
