//! IPv6 packet cases: the datapath's IPv6 path on both hooks.
//!
//! Its fixture writes the IPv6 maps directly (the agent's syncer does not
//! program IPv6 services yet): a cluster IP fd00:96::10 with TCP 80 and UDP
//! 53 on one backend, fd00:244:1::2, a cluster IP without endpoints, and a
//! node port on the node's fd00:1::1 with externalTrafficPolicy Cluster
//! (source NAT to the node).
use lb_common::{DatapathConfig, DatapathConfigV6, FRONTEND_SNAT, IPPROTO_TCP, IPPROTO_UDP, Ipv6, Reason, SNAT_PORT_MAX, SNAT_PORT_MIN};
use lb_tests::{
    fixture::{
        Fixture,
        Verdict::{Drop, Pass},
    },
    packets6::Frame6,
};
use lb_userspace::model::DesiredState;
use std::net::{Ipv6Addr, SocketAddrV6};

use crate::{
    Expect::{Bytes, Unchanged},
    Shared, case, edited, packet_cases,
};

fn ip(text: &str) -> Ipv6 {
    Ipv6::new(text.parse::<Ipv6Addr>().expect("an IPv6 address"))
}

fn at(text: &str) -> SocketAddrV6 {
    lb_tests::packets6::addr6(text)
}

fn fixture() -> Fixture {
    let mut fixture = Fixture::new(&DesiredState::default());
    let config = DatapathConfig { snat_port_min: SNAT_PORT_MIN, snat_port_max: SNAT_PORT_MAX, ..DatapathConfig::default() };
    fixture.datapath.maps.set_config(config).expect("config");
    let v6 = DatapathConfigV6 { snat_ip: ip("fd00:1::1"), ..DatapathConfigV6::default() };
    fixture.datapath.maps.ipv6.datapath_config.set(0, v6, 0).expect("IPv6 config");
    fixture.program_ipv6_frontend(1, at("[fd00:96::10]:80"), IPPROTO_TCP, &[at("[fd00:244:1::2]:8080")], 0);
    fixture.program_ipv6_frontend(2, at("[fd00:96::10]:53"), IPPROTO_UDP, &[at("[fd00:244:1::2]:5353")], 0);
    fixture.program_ipv6_frontend(3, at("[fd00:96::11]:80"), IPPROTO_TCP, &[], 0);
    fixture.program_ipv6_frontend(4, at("[fd00:1::1]:30080"), IPPROTO_TCP, &[at("[fd00:244:1::2]:8080")], FRONTEND_SNAT);
    fixture
}

pub static IPV6: Shared = Shared::new(fixture);

/// A confirmed connection from `client` to the cluster IP's port 80.
fn connection(client: &str) -> [Vec<u8>; 2] {
    [Frame6::tcp_syn(client, "[fd00:96::10]:80").bytes(), Frame6::tcp_syn_ack("[fd00:244:1::2]:8080", client).bytes()]
}

packet_cases! { IPV6;
    /// A TCP SYN to a cluster IP: to the backend, byte for byte.
    tcp_syn_to_a_cluster_ip_goes_to_the_backend => {
        let syn = Frame6::tcp_syn("[fd00:10::2]:42000", "[fd00:96::10]:80");
        case(syn.bytes(), Pass, Bytes(syn.clone().with_dst("[fd00:244:1::2]:8080").bytes()), Reason::ForwardNew)
    };
    /// The backend's SYN-ACK: from the cluster IP again.
    syn_ack_comes_from_the_cluster_ip => {
        let syn_ack = Frame6::tcp_syn_ack("[fd00:244:1::2]:8080", "[fd00:10::2]:42001");
        let out = syn_ack.clone().with_src("[fd00:96::10]:80");
        case(syn_ack.bytes(), Pass, Bytes(out.bytes()), Reason::ReplyTranslated)
            .after([Frame6::tcp_syn("[fd00:10::2]:42001", "[fd00:96::10]:80").bytes()])
    };
    /// Data of a confirmed connection: the same translation.
    established_tcp_flow_keeps_its_backend => {
        let data = Frame6::tcp_data("[fd00:10::2]:42002", "[fd00:96::10]:80", b"GET / HTTP/1.0\r\n\r\n");
        case(data.bytes(), Pass, Bytes(data.clone().with_dst("[fd00:244:1::2]:8080").bytes()), Reason::ForwardEstablished)
            .after(connection("[fd00:10::2]:42002"))
    };
    /// UDP to a cluster IP (its checksum, mandatory in IPv6, updated).
    udp_to_a_cluster_ip_goes_to_the_backend => {
        let query = Frame6::udp("[fd00:10::2]:42003", "[fd00:96::10]:53", b"query");
        case(query.bytes(), Pass, Bytes(query.clone().with_dst("[fd00:244:1::2]:5353").bytes()), Reason::ForwardNew)
    };
    /// The backend's UDP answer: from the cluster IP.
    udp_reply_comes_from_the_cluster_ip => {
        let answer = Frame6::udp("[fd00:244:1::2]:5353", "[fd00:10::2]:42004", b"answer");
        case(answer.bytes(), Pass, Bytes(answer.clone().with_src("[fd00:96::10]:53").bytes()), Reason::ReplyTranslated)
            .after([Frame6::udp("[fd00:10::2]:42004", "[fd00:96::10]:53", b"query").bytes()])
    };
    /// A node port with externalTrafficPolicy Cluster: to the backend, from
    /// the node's IPv6 address (the client's port kept, in the range).
    node_port_translates_the_source => {
        let syn = Frame6::tcp_syn("[2001:db8::7]:62000", "[fd00:1::1]:30080");
        let out = syn.clone().with_dst("[fd00:244:1::2]:8080").with_src("[fd00:1::1]:62000");
        case(syn.bytes(), Pass, Bytes(out.bytes()), Reason::ForwardNew)
    };
    /// The node port's reply: to the client, from the node port.
    node_port_reply_goes_to_the_client => {
        let syn_ack = Frame6::tcp_syn_ack("[fd00:244:1::2]:8080", "[fd00:1::1]:62001");
        let out = syn_ack.clone().with_src("[fd00:1::1]:30080").with_dst("[2001:db8::7]:62001");
        case(syn_ack.bytes(), Pass, Bytes(out.bytes()), Reason::ReplyTranslated)
            .after([Frame6::tcp_syn("[2001:db8::7]:62001", "[fd00:1::1]:30080").bytes()])
    };
    /// A Destination Options header before TCP: followed, and the packet
    /// translated with the header kept.
    destination_options_header_is_followed => {
        let syn = Frame6::tcp_syn("[fd00:10::2]:42005", "[fd00:96::10]:80").with_destination_options();
        case(syn.bytes(), Pass, Bytes(syn.clone().with_dst("[fd00:244:1::2]:8080").bytes()), Reason::ForwardNew)
    };
    /// A later fragment to a cluster IP: dropped (IPv6 fragments are not
    /// translated).
    later_fragment_to_a_cluster_ip_is_dropped => {
        let piece = Frame6::udp("[fd00:10::2]:42006", "[fd00:96::10]:53", b"query").with_fragment_header(1, false);
        case(piece.bytes(), Drop, Unchanged, Reason::DropFragment)
    };
    /// An atomic fragment (offset 0, no more): a whole packet, translated.
    atomic_fragment_is_translated => {
        let query = Frame6::udp("[fd00:10::2]:42007", "[fd00:96::10]:53", b"query").with_fragment_header(0, false);
        case(query.bytes(), Pass, Bytes(query.clone().with_dst("[fd00:244:1::2]:5353").bytes()), Reason::ForwardNew)
    };
    /// A payload length beyond the frame, to a cluster IP: dropped.
    payload_length_beyond_the_frame_to_a_cluster_ip_is_dropped => {
        let syn = Frame6::tcp_syn("[fd00:10::2]:42008", "[fd00:96::10]:80").bytes();
        case(edited(syn, |b| b[18..20].copy_from_slice(&200u16.to_be_bytes())), Drop, Unchanged, Reason::DropMalformed)
    };
    /// An IPv6 header cut short: left to the kernel.
    truncated_ipv6_header_is_unchanged => {
        let syn = Frame6::tcp_syn("[fd00:10::2]:42009", "[fd00:96::10]:80").bytes();
        case(syn[..14 + 30].to_vec(), Pass, Unchanged, Reason::PassMalformed).xdp_only()
    };
    /// A TCP header cut short, to a cluster IP: dropped.
    truncated_tcp_header_to_a_cluster_ip_is_dropped => {
        let syn = Frame6::tcp_syn("[fd00:10::2]:42010", "[fd00:96::10]:80").bytes();
        let mut cut = syn[..14 + 40 + 10].to_vec();
        cut[18..20].copy_from_slice(&10u16.to_be_bytes());
        case(cut, Drop, Unchanged, Reason::DropMalformed)
    };
    /// No endpoints: an IPv6 reject (reset or ICMPv6 unreachable) is not
    /// built yet, so dropped and counted as unanswerable.
    no_endpoints_is_dropped_as_unanswerable => {
        let syn = Frame6::tcp_syn("[fd00:10::2]:42011", "[fd00:96::11]:80");
        case(syn.bytes(), Drop, Unchanged, Reason::DropUnanswerable)
    };
    /// Traffic to another IPv6 address: unchanged.
    another_address_is_unchanged => {
        let syn = Frame6::tcp_syn("[fd00:10::2]:42012", "[fd00:10::3]:80");
        case(syn.bytes(), Pass, Unchanged, Reason::PassNotService)
    };
}
