//! Verdict reasons: why the datapath did what it did to a packet.
//!
//! One reason per packet, counted in `VERDICT_COUNTERS` at the reason's index.

/// Every packet the programs see is counted under exactly one reason.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A packet of a known flow, sent on to its backend.
    ForwardEstablished = 0,
    /// The first packet of a flow: a backend was picked.
    ForwardNew = 1,
    /// A known flow whose backend left the service: a new backend was picked.
    ForwardRescheduled = 2,
    /// A backend's reply, translated back to the service address.
    ReplyTranslated = 3,
    /// For a service frontend with no backends: answered with a TCP reset or
    /// ICMP port unreachable.
    RejectNoBackend = 4,
    /// For a service address on a port it does not serve: rejected likewise.
    RejectUnknownPort = 5,
    /// Neither IPv4 nor IPv6 (ARP, VLAN-tagged, ...): passed unchanged.
    PassNotIp = 6,
    /// IP not addressed to a service, and not a reply (ICMPv6, neighbour
    /// discovery included, is left to the kernel): passed unchanged.
    PassNotService = 7,
    /// Malformed IPv4 or IPv6 not addressed to a service: passed unchanged, for the
    /// kernel to judge.
    PassMalformed = 8,
    /// Malformed (truncated headers, bad header or total length) and
    /// addressed to a service: dropped.
    DropMalformed = 9,
    /// A later IP fragment addressed to a cluster IP whose first fragment
    /// (with the ports) was not seen or not translated: dropped. The later
    /// fragments of a translated first fragment are translated with it.
    DropFragment = 10,
    /// To be rejected, but the reply cannot be built (IP options on a UDP
    /// datagram, or a TCP reset answering a reset): dropped instead.
    DropUnanswerable = 11,
    /// The conntrack entry of a new flow could not be stored: dropped.
    DropConntrackFull = 12,
    /// A kernel helper failed while rewriting the packet: dropped.
    DropRewriteFailed = 13,
    /// For a frontend without backends that drops rather than rejects
    /// (internalTrafficPolicy Local without a local endpoint).
    DropNoLocalEndpoint = 14,
    /// A new flow needed source translation (external traffic with
    /// externalTrafficPolicy Cluster, or a pod reaching itself) and no node
    /// address is configured, or no source port was free: dropped.
    DropNoSnatPort = 15,
    /// An ICMP error (destination unreachable, fragmentation needed, time
    /// exceeded, parameter problem) about a packet of a translated flow:
    /// the quoted headers and the ICMP's own addresses translated like the
    /// flow's packets in the direction the error travels.
    IcmpErrorTranslated = 16,
    /// An ICMP echo request to a cluster IP, answered from it (the agent's
    /// `--answer-ping`): sent back where it came from.
    EchoAnswered = 17,
    /// A new connection to an address in the service ranges that no service
    /// has (a deleted service's, say): dropped, as kube-proxy does, rather
    /// than routed on.
    DropUnallocatedClusterIp = 18,
    /// A new connection to a load balancer IP from a source outside the
    /// service's `loadBalancerSourceRanges`: dropped, as kube-proxy's
    /// firewall chain does.
    DropSourceRange = 19,
}

impl Reason {
    pub const COUNT: u32 = 20;

    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::ForwardEstablished,
        Reason::ForwardNew,
        Reason::ForwardRescheduled,
        Reason::ReplyTranslated,
        Reason::RejectNoBackend,
        Reason::RejectUnknownPort,
        Reason::PassNotIp,
        Reason::PassNotService,
        Reason::PassMalformed,
        Reason::DropMalformed,
        Reason::DropFragment,
        Reason::DropUnanswerable,
        Reason::DropConntrackFull,
        Reason::DropRewriteFailed,
        Reason::DropNoLocalEndpoint,
        Reason::DropNoSnatPort,
        Reason::IcmpErrorTranslated,
        Reason::EchoAnswered,
        Reason::DropUnallocatedClusterIp,
        Reason::DropSourceRange,
    ];

    /// The stable snake_case name used in logs, metrics and the CLI.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::ForwardEstablished => "forward_established",
            Reason::ForwardNew => "forward_new",
            Reason::ForwardRescheduled => "forward_rescheduled",
            Reason::ReplyTranslated => "reply_translated",
            Reason::RejectNoBackend => "reject_no_backend",
            Reason::RejectUnknownPort => "reject_unknown_port",
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassNotService => "pass_not_service",
            Reason::PassMalformed => "pass_malformed",
            Reason::DropMalformed => "drop_malformed",
            Reason::DropFragment => "drop_fragment",
            Reason::DropUnanswerable => "drop_unanswerable",
            Reason::DropConntrackFull => "drop_conntrack_full",
            Reason::DropRewriteFailed => "drop_rewrite_failed",
            Reason::DropNoLocalEndpoint => "drop_no_local_endpoint",
            Reason::DropNoSnatPort => "drop_no_snat_port",
            Reason::IcmpErrorTranslated => "icmp_error_translated",
            Reason::EchoAnswered => "echo_answered",
            Reason::DropUnallocatedClusterIp => "drop_unallocated_cluster_ip",
            Reason::DropSourceRange => "drop_source_range",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_reason_at_its_own_index() {
        for (index, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, index, "{}", reason.name());
        }
    }
}
