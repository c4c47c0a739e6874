//! Rejects: a TCP reset or ICMP port unreachable where no backend can answer.
//!
//! A service without endpoints, or a service address's unknown port, is
//! answered with a TCP reset or ICMP port unreachable; what cannot be answered
//! is dropped.
use lb_common::Reason;
use lb_tests::{
    fixture::Verdict::{Bounce, Drop},
    packets::Frame,
};

use crate::{
    Expect::{Bytes, Unchanged},
    case,
    fixtures::{CLUSTER, EMPTY_TCP, EMPTY_UDP},
    packet_cases,
};

packet_cases! { CLUSTER;
    /// No endpoints, a TCP SYN: reset.
    no_endpoints_tcp_syn_is_reset => {
        let syn = Frame::tcp_syn("10.0.0.2:40200", "10.96.0.11:80");
        case(syn.bytes(), Bounce, Bytes(syn.expected_reset()), Reason::RejectNoBackend).counts(EMPTY_TCP, [0, 0, 1])
    };
    /// No endpoints, TCP data: a reset from its ACK.
    no_endpoints_tcp_data_is_reset_from_its_ack => {
        let data = Frame::tcp_data("10.0.0.2:40201", "10.96.0.11:80", b"abc");
        case(data.bytes(), Bounce, Bytes(data.expected_reset()), Reason::RejectNoBackend).counts(EMPTY_TCP, [0, 0, 1])
    };
    /// No endpoints, UDP: port unreachable.
    no_endpoints_udp_is_port_unreachable => {
        let query = Frame::udp("10.0.0.2:40202", "10.96.0.11:53", b"query");
        case(query.bytes(), Bounce, Bytes(query.expected_port_unreachable()), Reason::RejectNoBackend).counts(EMPTY_UDP, [0, 0, 1])
    };
    /// A service address's unknown TCP port: reset, counted under no service.
    unknown_tcp_port_is_reset => {
        let syn = Frame::tcp_syn("10.0.0.2:40203", "10.96.0.10:81");
        case(syn.bytes(), Bounce, Bytes(syn.expected_reset()), Reason::RejectUnknownPort)
    };
    /// A service address's unknown UDP port: port unreachable.
    unknown_udp_port_is_port_unreachable => {
        let query = Frame::udp("10.0.0.2:40204", "10.96.0.10:54", b"query");
        case(query.bytes(), Bounce, Bytes(query.expected_port_unreachable()), Reason::RejectUnknownPort)
    };
    /// No endpoints, a TCP reset: not answered (nor counted as rejected).
    no_endpoints_tcp_reset_is_not_answered => {
        let rst = Frame::tcp_data("10.0.0.2:40205", "10.96.0.11:80", b"").with_tcp(|t| t.rst = true);
        case(rst.bytes(), Drop, Unchanged, Reason::DropUnanswerable)
    };
    /// No endpoints, UDP with IP options: dropped, the datapath builds no
    /// port unreachable for it.
    no_endpoints_udp_with_ip_options_is_dropped => {
        let query = Frame::udp("10.0.0.2:40206", "10.96.0.11:53", b"q").with_ip_options(&[1, 1, 1, 0]);
        case(query.bytes(), Drop, Unchanged, Reason::DropUnanswerable)
    };
}
