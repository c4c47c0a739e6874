//! The datapath's counters: verdict reasons per packet and traffic per service.
//!
//! Every packet is counted under one verdict reason, and service traffic per
//! service. Per-CPU slots, so plain adds need no atomics.
use lb_common::Reason;

use crate::maps::{SERVICE_COUNTERS, VERDICT_COUNTERS};

#[inline(always)]
pub fn count_reason(reason: Reason) {
    if let Some(slot) = VERDICT_COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: a per-CPU slot, written only by this CPU.
        unsafe { *slot += 1 };
    }
}

/// One translated packet of `ip_len` bytes for the service; `new_flow` when
/// it was assigned a backend.
#[inline(always)]
pub fn count_service_packet(service_id: u32, ip_len: u32, new_flow: bool) {
    if let Some(counters) = SERVICE_COUNTERS.get_ptr_mut(service_id) {
        // SAFETY: a per-CPU slot, written only by this CPU.
        unsafe {
            (*counters).packets += 1;
            (*counters).bytes += u64::from(ip_len);
            if new_flow {
                (*counters).new_flows += 1;
            }
        }
    }
}

#[inline(always)]
pub fn count_service_reject(service_id: u32) {
    if let Some(counters) = SERVICE_COUNTERS.get_ptr_mut(service_id) {
        // SAFETY: a per-CPU slot, written only by this CPU.
        unsafe { (*counters).rejected += 1 };
    }
}

/// A connection of one of the node's own sockets translated at connect or
/// send time (no packet passes the hooks for it).
#[inline(always)]
pub fn count_service_connection(service_id: u32) {
    if let Some(counters) = SERVICE_COUNTERS.get_ptr_mut(service_id) {
        // SAFETY: a per-CPU slot, written only by this CPU.
        unsafe { (*counters).new_flows += 1 };
    }
}
