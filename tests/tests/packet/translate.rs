//! Cluster IP translation: flows to the backend, replies back from the service.
//!
//! New TCP and UDP flows go to the backend, their later packets follow, replies
//! come back from the service; with IP options, padding and UDP without
//! checksum.
use lb_common::Reason;
use lb_tests::{fixture::Verdict::Pass, packets::Frame};

use crate::{
    Expect::Bytes,
    case,
    fixtures::{CLUSTER, DNS, WEB, dns_flow, web_connection},
    packet_cases,
};

packet_cases! { CLUSTER;
    /// A new TCP flow: the destination becomes the backend.
    new_tcp_flow_goes_to_the_backend => {
        let syn = Frame::tcp_syn("10.0.0.2:40100", "10.96.0.10:80");
        case(syn.bytes(), Pass, Bytes(syn.clone().with_dst("10.244.1.2:8080").bytes()), Reason::ForwardNew).counts(WEB, [1, 1, 0])
    };
    /// The backend's SYN-ACK: from the service, the connection confirmed.
    syn_ack_comes_from_the_service => {
        let syn = Frame::tcp_syn("10.0.0.2:40101", "10.96.0.10:80");
        let syn_ack = Frame::tcp_syn_ack("10.244.1.2:8080", "10.0.0.2:40101");
        case(syn_ack.bytes(), Pass, Bytes(syn_ack.clone().with_src("10.96.0.10:80").bytes()), Reason::ReplyTranslated).after([syn.bytes()]).counts(WEB, [1, 0, 0])
    };
    /// An established TCP flow: the same backend.
    established_tcp_flow_keeps_its_backend => {
        let data = Frame::tcp_data("10.0.0.2:40102", "10.96.0.10:80", b"GET / HTTP/1.0\r\n\r\n");
        case(data.bytes(), Pass, Bytes(data.clone().with_dst("10.244.1.2:8080").bytes()), Reason::ForwardEstablished).after(web_connection("10.0.0.2:40102")).counts(WEB, [1, 0, 0])
    };
    /// A TCP reply: the source becomes the service again.
    tcp_reply_comes_from_the_service => {
        let reply = Frame::tcp_data("10.244.1.2:8080", "10.0.0.2:40103", b"You've hit kubia-1");
        case(reply.bytes(), Pass, Bytes(reply.clone().with_src("10.96.0.10:80").bytes()), Reason::ReplyTranslated).after(web_connection("10.0.0.2:40103")).counts(WEB, [1, 0, 0])
    };
    /// IP options: the ports are found after them.
    ip_options_are_skipped => {
        let syn = Frame::tcp_syn("10.0.0.2:40104", "10.96.0.10:80").with_ip_options(&[1, 1, 1, 0]);
        case(syn.bytes(), Pass, Bytes(syn.clone().with_dst("10.244.1.2:8080").bytes()), Reason::ForwardNew).counts(WEB, [1, 1, 0])
    };
    /// A new UDP flow: the destination becomes the backend.
    new_udp_flow_goes_to_the_backend => {
        let query = Frame::udp("10.0.0.2:40110", "10.96.0.10:53", b"query");
        case(query.bytes(), Pass, Bytes(query.clone().with_dst("10.244.1.2:5353").bytes()), Reason::ForwardNew).counts(DNS, [1, 1, 0])
    };
    /// A UDP reply: the source becomes the service again.
    udp_reply_comes_from_the_service => {
        let answer = Frame::udp("10.244.1.2:5353", "10.0.0.2:40111", b"answer");
        case(answer.bytes(), Pass, Bytes(answer.clone().with_src("10.96.0.10:53").bytes()), Reason::ReplyTranslated).after(dns_flow("10.0.0.2:40111")).counts(DNS, [1, 0, 0])
    };
    /// UDP without a checksum stays without.
    udp_without_checksum_stays_without => {
        let query = Frame::udp("10.0.0.2:40112", "10.96.0.10:53", b"q");
        case(query.bytes_without_udp_checksum(), Pass, Bytes(query.clone().with_dst("10.244.1.2:5353").bytes_without_udp_checksum()), Reason::ForwardNew).counts(DNS, [1, 1, 0])
    };
    /// Ethernet padding after the IP packet is kept.
    ethernet_padding_is_kept => {
        let query = Frame::udp("10.0.0.2:40113", "10.96.0.10:53", b"p");
        let padded = |mut bytes: Vec<u8>| { bytes.resize(60, 0); bytes };
        case(padded(query.bytes()), Pass, Bytes(padded(query.clone().with_dst("10.244.1.2:5353").bytes())), Reason::ForwardNew).counts(DNS, [1, 1, 0])
    };
}
