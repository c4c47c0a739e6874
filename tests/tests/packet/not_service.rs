//! Traffic that is not the datapath's passes unchanged.
//!
//! Other addresses, ARP, IPv6, ICMP that is not an error about a flow.
use lb_common::Reason;
use lb_tests::{
    fixture::Verdict::Pass,
    packets::{Frame, echo_request},
};

use crate::{Expect::Unchanged, case, edited, fixtures::CLUSTER, packet_cases};

packet_cases! { CLUSTER;
    /// TCP to an address that is no service's: unchanged.
    tcp_to_another_address_is_unchanged => {
        case(Frame::tcp_syn("10.0.0.2:40300", "10.0.0.3:80").bytes(), Pass, Unchanged, Reason::PassNotService)
    };
    /// UDP to an address that is no service's: unchanged.
    udp_to_another_address_is_unchanged => {
        case(Frame::udp("10.0.0.2:40301", "10.0.0.3:53", b"query").bytes(), Pass, Unchanged, Reason::PassNotService)
    };
    /// ARP, even asking for a service address: unchanged.
    arp_is_unchanged => {
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
        arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 10, 96, 0, 10]);
        case(arp, Pass, Unchanged, Reason::PassNotIp)
    };
    /// IPv6 claiming no payload (a jumbogram's zero length, or a cut
    /// header): unchanged, left to the kernel.
    ipv6_without_a_payload_is_unchanged => {
        let mut ipv6 = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x86, 0xdd, 0x60];
        ipv6.resize(14 + 40, 0);
        case(ipv6, Pass, Unchanged, Reason::PassMalformed)
    };
    /// ICMP (not an error) to a service address: unchanged.
    icmp_to_a_service_address_is_unchanged => {
        case(edited(Frame::udp("10.0.0.2:1", "10.96.0.10:53", b"ping").bytes(), |b| b[23] = 1), Pass, Unchanged, Reason::PassNotService)
    };
    /// An echo request to a cluster IP without --answer-ping: unchanged.
    echo_request_without_answer_ping_is_unchanged => {
        case(echo_request([10, 0, 0, 2], [10, 96, 0, 10], 63), Pass, Unchanged, Reason::PassNotService)
    };
}
