//! Service lookups: frontends, service addresses, backend choice and the
//! check that a backend still serves its service.
use aya_ebpf::helpers::generated::bpf_get_prandom_u32;
use lb_common::{Backend, BackendSlotKey, ConntrackKey, FrontendKey, FrontendValue, ServiceBackendKey};

use crate::maps::{BACKEND_SLOTS, SERVICE_BACKENDS, SERVICE_FRONTENDS, SERVICE_VIPS};

/// The frontend a packet is addressed to, if any.
#[inline(always)]
pub fn frontend(tuple: &ConntrackKey) -> Option<FrontendValue> {
    let key = FrontendKey { ip: tuple.dst_ip, port: tuple.dst_port, proto: tuple.proto, _pad: 0 };
    // SAFETY: the value is copied out at once; user space replaces entries
    // whole, so the copy is of one version.
    unsafe { SERVICE_FRONTENDS.get(&key).copied() }
}

/// Whether `ip` is the address of any service frontend.
#[inline(always)]
pub fn is_service_address(ip: u32) -> bool {
    SERVICE_VIPS.get_ptr(ip).is_some()
}

/// A backend picked uniformly at random among the frontend's current set,
/// or `None` when the set is empty.
#[inline(always)]
pub fn pick_backend(fe: &FrontendValue) -> Option<Backend> {
    if fe.backend_count == 0 {
        return None;
    }
    // SAFETY: a helper call without arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % fe.backend_count;
    let key = BackendSlotKey { backend_set: fe.backend_set, slot };
    // SAFETY: copied out at once; sets are immutable once a frontend points
    // at them.
    unsafe { BACKEND_SLOTS.get(&key).copied() }
}

/// Whether `backend` is in the current backend set of the service.
#[inline(always)]
pub fn still_serves(service_id: u32, backend: Backend) -> bool {
    SERVICE_BACKENDS.get_ptr(ServiceBackendKey { service_id, backend }).is_some()
}
