//! Malformed input: dropped when addressed to a service, left to the kernel otherwise.
//!
//! Malformed input addressed to a service cannot be translated safely.
use lb_common::Reason;
use lb_tests::{
    fixture::Verdict::{Drop, Pass},
    packets::Frame,
};

use crate::{Expect::Unchanged, case, edited, fixtures::CLUSTER, packet_cases, set_u16};

/// A SYN to web from `port`, to edit.
fn syn(port: u16) -> Vec<u8> {
    Frame::tcp_syn(&format!("10.0.0.2:{port}"), "10.96.0.10:80").bytes()
}

/// A SYN from `port` to an address that is no service's, to edit.
fn elsewhere(port: u16) -> Vec<u8> {
    Frame::tcp_syn(&format!("10.0.0.2:{port}"), "10.0.0.3:80").bytes()
}

/// A query to dns from `port`, to edit.
fn query(port: u16) -> Vec<u8> {
    Frame::udp(&format!("10.0.0.2:{port}"), "10.96.0.10:53", b"query").bytes()
}

/// Sets the IP total length to the frame's length: 14 bytes beyond it.
fn total_length_beyond(b: &mut [u8]) {
    let len = b.len() as u16;
    set_u16(b, 16, len);
}

packet_cases! { CLUSTER;
    /// An Ethernet header alone: unchanged.
    ethernet_header_alone_is_unchanged => {
        case(syn(40500)[..14].to_vec(), Pass, Unchanged, Reason::PassMalformed).xdp_only()
    };
    /// A truncated IPv4 header: unchanged.
    truncated_ipv4_header_is_unchanged => {
        case(syn(40501)[..14 + 12].to_vec(), Pass, Unchanged, Reason::PassMalformed).xdp_only()
    };
    /// IHL below 5, to a service: dropped.
    short_ihl_to_a_service_is_dropped => {
        case(edited(syn(40502), |b| b[14] = 0x44), Drop, Unchanged, Reason::DropMalformed)
    };
    /// IHL below 5, not to a service: unchanged.
    short_ihl_elsewhere_is_unchanged => {
        case(edited(elsewhere(40503), |b| b[14] = 0x44), Pass, Unchanged, Reason::PassMalformed)
    };
    /// IP version 6 in an IPv4 frame, to a service: dropped.
    version_6_in_ipv4_to_a_service_is_dropped => {
        case(edited(syn(40504), |b| b[14] = 0x65), Drop, Unchanged, Reason::DropMalformed)
    };
    /// A total length beyond the frame, to a service: dropped.
    total_length_beyond_the_frame_to_a_service_is_dropped => {
        case(edited(syn(40505), |b| total_length_beyond(b)), Drop, Unchanged, Reason::DropMalformed)
    };
    /// A total length beyond the frame, not to a service: unchanged.
    total_length_beyond_the_frame_elsewhere_is_unchanged => {
        case(edited(elsewhere(40506), |b| total_length_beyond(b)), Pass, Unchanged, Reason::PassMalformed)
    };
    /// A total length shorter than the headers, to a service: dropped.
    total_length_short_of_the_headers_is_dropped => {
        case(edited(syn(40507), |b| set_u16(b, 16, 30)), Drop, Unchanged, Reason::DropMalformed)
    };
    /// A truncated TCP header, to a service: dropped.
    truncated_tcp_header_is_dropped => {
        case(edited(syn(40508), |b| { b.truncate(14 + 20 + 10); set_u16(b, 16, 30) }), Drop, Unchanged, Reason::DropMalformed)
    };
    /// A TCP data offset below 5, to a service: dropped.
    short_tcp_data_offset_is_dropped => {
        case(edited(syn(40509), |b| b[14 + 20 + 12] = 0x40), Drop, Unchanged, Reason::DropMalformed)
    };
    /// A UDP length beyond the IP payload, to a service: dropped.
    udp_length_beyond_the_payload_is_dropped => {
        case(edited(query(40510), |b| set_u16(b, 14 + 20 + 4, 200)), Drop, Unchanged, Reason::DropMalformed)
    };
    /// A UDP length below its header, to a service: dropped.
    udp_length_below_its_header_is_dropped => {
        case(edited(query(40511), |b| set_u16(b, 14 + 20 + 4, 4)), Drop, Unchanged, Reason::DropMalformed)
    };
}
