//! The rules of a conntrack entry's life, shared by the datapath and the agent.
//!
//! What a packet's TCP flags do to its flow's state, how long a flow in each
//! state lives without traffic, and when a flow counts as over. Pure functions,
//! used unchanged by the datapath (on every translated packet) and by the agent
//! (garbage collection, `lbctl`), in the manner of Linux conntrack and Cilium.
//!
//! Time is the kernel's monotonic clock (CLOCK_MONOTONIC, which
//! `bpf_ktime_get_coarse_ns` reads coarsely) in ticks of 2^30 ns (about
//! 1.07 s): a shift, not a division, on the fast path, and a u32 that lasts
//! 146 years of uptime.
use bytemuck::{Pod, Zeroable};

pub use crate::reply::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use crate::IPPROTO_TCP;

/// Nanoseconds of the monotonic clock to ticks: `ns >> TICK_SHIFT`.
pub const TICK_SHIFT: u32 = 30;

/// A stored expiry is moved on only when the new one is at least this many
/// ticks later: a busy flow writes its entry every few seconds, not on
/// every packet.
pub const REFRESH_TICKS: u32 = 4;

/// The monotonic clock in ticks.
#[inline(always)]
pub const fn ticks_from_ns(ns: u64) -> u32 {
    (ns >> TICK_SHIFT) as u32
}

/// Whole seconds in ticks, rounded up (a lifetime is never shortened).
pub const fn ticks_from_secs(secs: u64) -> u32 {
    let ticks = secs.saturating_mul(1_000_000_000).div_ceil(1 << TICK_SHIFT);
    if ticks > u32::MAX as u64 { u32::MAX } else { ticks as u32 }
}

/// Ticks in seconds, rounded down.
pub const fn secs_from_ticks(ticks: u32) -> u64 {
    ((ticks as u64) << TICK_SHIFT) / 1_000_000_000
}

/// `ConntrackValue::flow_flags`: the backend has answered (a TCP SYN-ACK,
/// or any packet of the reply direction): the flow is confirmed.
pub const FLOW_SEEN_REPLY: u8 = 1;
/// The client sent a FIN.
pub const FLOW_CLIENT_FIN: u8 = 2;
/// The backend sent a FIN.
pub const FLOW_BACKEND_FIN: u8 = 4;
/// Either side sent a RST.
pub const FLOW_RESET: u8 = 8;

/// The TCP flags that can change a flow's state: packets without any of
/// them leave it as it is (and take the fast path).
pub const TCP_STATE_FLAGS: u8 = TCP_FIN | TCP_SYN | TCP_RST;

/// How long a flow lives without traffic, by state, in ticks. One copy in
/// `DatapathConfig`, set by the agent from its flags.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ConntrackLifetimes {
    /// TCP before the backend answered (a SYN sent, or a flow picked up
    /// mid-stream).
    pub tcp_syn: u32,
    /// TCP answered and not closing.
    pub tcp_established: u32,
    /// TCP after one side's FIN: the other side may still send.
    pub tcp_half_closed: u32,
    /// TCP after both FINs or a RST: only stray packets are left.
    pub tcp_closed: u32,
    /// UDP before any reply.
    pub udp: u32,
    /// UDP after a reply.
    pub udp_stream: u32,
}

impl ConntrackLifetimes {
    /// The defaults, in seconds: kube-proxy's established (24 h) and
    /// half-closed (its close-wait, 1 h) TCP timeouts, Cilium's SYN timeout
    /// (60 s), Linux's close (10 s) and UDP timeouts (30 s, 120 s once
    /// answered).
    pub const DEFAULT_SECS: [u64; 6] = [60, 86_400, 3_600, 10, 30, 120];

    /// Lifetimes from seconds, in the order of the fields.
    pub const fn from_secs(secs: [u64; 6]) -> Self {
        Self {
            tcp_syn: ticks_from_secs(secs[0]),
            tcp_established: ticks_from_secs(secs[1]),
            tcp_half_closed: ticks_from_secs(secs[2]),
            tcp_closed: ticks_from_secs(secs[3]),
            udp: ticks_from_secs(secs[4]),
            udp_stream: ticks_from_secs(secs[5]),
        }
    }
}

impl Default for ConntrackLifetimes {
    fn default() -> Self {
        Self::from_secs(Self::DEFAULT_SECS)
    }
}

/// Whether the flow is over: reset, or closed by both sides. Its entries
/// still translate stray packets until they expire, but a new connection
/// on its tuple is placed afresh and its source NAT port may be taken.
#[inline(always)]
pub const fn is_closed(flow_flags: u8) -> bool {
    flow_flags & FLOW_RESET != 0 || flow_flags & (FLOW_CLIENT_FIN | FLOW_BACKEND_FIN) == FLOW_CLIENT_FIN | FLOW_BACKEND_FIN
}

/// How long a flow of `proto` in state `flow_flags` lives without traffic.
#[inline(always)]
pub const fn lifetime(proto: u8, flow_flags: u8, lifetimes: &ConntrackLifetimes) -> u32 {
    if proto != IPPROTO_TCP {
        return if flow_flags & FLOW_SEEN_REPLY != 0 { lifetimes.udp_stream } else { lifetimes.udp };
    }
    if is_closed(flow_flags) {
        lifetimes.tcp_closed
    } else if flow_flags & (FLOW_CLIENT_FIN | FLOW_BACKEND_FIN) != 0 {
        lifetimes.tcp_half_closed
    } else if flow_flags & FLOW_SEEN_REPLY != 0 {
        lifetimes.tcp_established
    } else {
        lifetimes.tcp_syn
    }
}

/// The flow's state after one of its packets: `from_backend` for the reply
/// direction, `tcp_flags` 0 for UDP.
#[inline(always)]
pub const fn flags_after(flow_flags: u8, from_backend: bool, tcp_flags: u8) -> u8 {
    let mut flags = flow_flags;
    if from_backend {
        flags |= FLOW_SEEN_REPLY;
    }
    if tcp_flags & TCP_FIN != 0 {
        flags |= if from_backend { FLOW_BACKEND_FIN } else { FLOW_CLIENT_FIN };
    }
    if tcp_flags & TCP_RST != 0 {
        flags |= FLOW_RESET;
    }
    flags
}

/// Whether a packet opens a connection: a TCP SYN (with ACK: the backend's
/// answer to one). Such a packet on a closed flow's tuple belongs to a new
/// connection, not to the closed one.
#[inline(always)]
pub const fn opens_connection(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_SYN | TCP_RST) == TCP_SYN
}

/// The state a flow's entries are created in: a mid-stream packet (no
/// SYN) already says the connection was open. `reset` when it is a RST.
#[inline(always)]
pub const fn initial_flags(tcp_flags: u8) -> u8 {
    flags_after(0, false, tcp_flags)
}

/// Whether an entry that expires at `expires` is alive at `now` (ticks).
#[inline(always)]
pub const fn is_alive(expires: u32, now: u32) -> bool {
    now < expires
}

/// Whether an entry's expiry is to be written: the state changed, or the
/// new expiry is `REFRESH_TICKS` past the stored one.
#[inline(always)]
pub const fn needs_refresh(stored_expires: u32, new_expires: u32) -> bool {
    new_expires >= stored_expires.saturating_add(REFRESH_TICKS) || new_expires < stored_expires
}

/// A flow's state as `lbctl` and the metrics name it.
pub const fn state_name(proto: u8, flow_flags: u8) -> &'static str {
    if proto != IPPROTO_TCP {
        return if flow_flags & FLOW_SEEN_REPLY != 0 { "udp_answered" } else { "udp_unanswered" };
    }
    if flow_flags & FLOW_RESET != 0 {
        "reset"
    } else if is_closed(flow_flags) {
        "closed"
    } else if flow_flags & (FLOW_CLIENT_FIN | FLOW_BACKEND_FIN) != 0 {
        "half_closed"
    } else if flow_flags & FLOW_SEEN_REPLY != 0 {
        "established"
    } else {
        "syn_sent"
    }
}

/// Every name `state_name` gives, TCP then UDP.
pub const STATE_NAMES: [&str; 7] = ["syn_sent", "established", "half_closed", "closed", "reset", "udp_unanswered", "udp_answered"];

const _: () = assert!(size_of::<ConntrackLifetimes>() == 24);

#[cfg(feature = "user")]
// SAFETY: `bytemuck::Pod`: plain old data with no padding.
unsafe impl aya::Pod for ConntrackLifetimes {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IPPROTO_UDP;

    #[test]
    fn tcp_flags_move_a_flow_through_its_states() {
        use IPPROTO_TCP as TCP;
        let cases = [
            ("a SYN opens a flow that waits for its answer", 0, false, TCP_SYN, "syn_sent"),
            ("the SYN-ACK confirms it", 0, true, TCP_SYN | TCP_ACK, "established"),
            ("data from the client keeps it established", FLOW_SEEN_REPLY, false, TCP_ACK, "established"),
            ("the client's FIN half-closes it", FLOW_SEEN_REPLY, false, TCP_FIN | TCP_ACK, "half_closed"),
            ("the backend's FIN after the client's closes it", FLOW_SEEN_REPLY | FLOW_CLIENT_FIN, true, TCP_FIN | TCP_ACK, "closed"),
            ("the backend's FIN alone half-closes it", FLOW_SEEN_REPLY, true, TCP_FIN | TCP_ACK, "half_closed"),
            ("a RST from the client resets it", FLOW_SEEN_REPLY, false, TCP_RST, "reset"),
            ("a RST from the backend resets an unanswered flow", 0, true, TCP_RST | TCP_ACK, "reset"),
            ("a second FIN from the same side changes nothing", FLOW_SEEN_REPLY | FLOW_CLIENT_FIN, false, TCP_FIN, "half_closed"),
            ("a mid-stream packet creates an unanswered flow", initial_flags(TCP_ACK), false, TCP_ACK, "syn_sent"),
        ];
        for (rule, before, from_backend, tcp_flags, want) in cases {
            assert_eq!(state_name(TCP, flags_after(before, from_backend, tcp_flags)), want, "{rule}");
        }
    }

    #[test]
    fn each_state_lives_as_long_as_its_lifetime() {
        let lifetimes = ConntrackLifetimes { tcp_syn: 1, tcp_established: 2, tcp_half_closed: 3, tcp_closed: 4, udp: 5, udp_stream: 6 };
        let cases = [
            ("TCP waiting for the answer", IPPROTO_TCP, 0, 1),
            ("TCP established", IPPROTO_TCP, FLOW_SEEN_REPLY, 2),
            ("TCP after the client's FIN", IPPROTO_TCP, FLOW_SEEN_REPLY | FLOW_CLIENT_FIN, 3),
            ("TCP after the backend's FIN", IPPROTO_TCP, FLOW_SEEN_REPLY | FLOW_BACKEND_FIN, 3),
            ("TCP after both FINs", IPPROTO_TCP, FLOW_SEEN_REPLY | FLOW_CLIENT_FIN | FLOW_BACKEND_FIN, 4),
            ("TCP after a RST", IPPROTO_TCP, FLOW_SEEN_REPLY | FLOW_RESET, 4),
            ("UDP unanswered", IPPROTO_UDP, 0, 5),
            ("UDP answered", IPPROTO_UDP, FLOW_SEEN_REPLY, 6),
        ];
        for (rule, proto, flags, want) in cases {
            assert_eq!(lifetime(proto, flags, &lifetimes), want, "{rule}");
            assert!(STATE_NAMES.contains(&state_name(proto, flags)), "{rule}: {}", state_name(proto, flags));
        }
    }

    #[test]
    fn only_a_syn_opens_a_connection() {
        let cases = [
            ("a SYN", TCP_SYN, true),
            ("a SYN-ACK", TCP_SYN | TCP_ACK, true),
            ("an ACK", TCP_ACK, false),
            ("a FIN", TCP_FIN | TCP_ACK, false),
            ("a SYN with RST is no opening", TCP_SYN | TCP_RST, false),
            ("UDP (no flags)", 0, false),
        ];
        for (rule, flags, want) in cases {
            assert_eq!(opens_connection(flags), want, "{rule}");
        }
    }

    #[test]
    fn expiry_is_written_only_when_it_moved_enough() {
        let cases = [
            ("the same expiry", 100, 100, false),
            ("one tick later", 100, 101, false),
            ("REFRESH_TICKS later", 100, 100 + REFRESH_TICKS, true),
            ("earlier (a shorter state's lifetime)", 100, 90, true),
        ];
        for (rule, stored, new, want) in cases {
            assert_eq!(needs_refresh(stored, new), want, "{rule}");
        }
    }

    #[test]
    fn seconds_and_ticks_convert_without_shortening() {
        let cases = [("zero", 0, 0), ("one second is one tick", 1, 1), ("ten seconds", 10, 10), ("a day", 86_400, 80_467)];
        for (rule, secs, ticks) in cases {
            assert_eq!(ticks_from_secs(secs), ticks, "{rule}");
            assert!(secs_from_ticks(ticks_from_secs(secs)) + 1 >= secs, "{rule}");
        }
        assert_eq!(ticks_from_ns(3 << TICK_SHIFT), 3);
        assert_eq!(ticks_from_secs(u64::MAX / 1_000_000_000), u32::MAX, "saturates");
    }
}
