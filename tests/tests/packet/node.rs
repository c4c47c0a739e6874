//! Packet cases for a node's external services and clients outside the pod range.
//!
//! Node ports under either externalTrafficPolicy, hairpin, load balancer IPs,
//! pings to cluster IPs, clients outside the pod range and unallocated cluster
//! IPs. Client ports in the source NAT range (61000-65535) are kept when free,
//! which makes the source-translated outputs exact.
use etherparse::{Icmpv4Type, icmpv4::DestUnreachableHeader};
use lb_common::Reason;
use lb_tests::{
    fixture::Verdict::{Bounce, Drop, Pass},
    packets::{Frame, echo_reply, echo_request},
};

use crate::{
    Expect::{Bytes, Unchanged},
    case, edited,
    fixtures::{HAIRPIN, LB, LB_IP, LOCAL, NODE, NODE_IP, NODE_PORT_TCP, NODE_PORT_UDP, TWIN, connection},
    packet_cases,
};

/// A connection from 10.0.0.2:`port` through the Cluster-policy node port,
/// source-translated to the node's address and the same port.
fn node_port_connection(port: u16) -> [Vec<u8>; 2] {
    connection(&format!("10.0.0.2:{port}"), "192.168.0.1:30080", "10.244.1.2:8080", &format!("192.168.0.1:{port}"))
}

packet_cases! { NODE;
    /// Node port, Cluster policy: to the backend, from the node.
    cluster_policy_node_port_translates_the_source => {
        let syn = Frame::tcp_syn("10.0.0.2:62000", "192.168.0.1:30080");
        case(syn.bytes(), Pass, Bytes(syn.clone().with_dst("10.244.1.2:8080").with_src("192.168.0.1:62000").bytes()), Reason::ForwardNew).counts(NODE_PORT_TCP, [1, 1, 0])
    };
    /// Node port, Cluster policy, the SYN-ACK: from the node port, to the client.
    cluster_policy_syn_ack_goes_to_the_client => {
        let syn_ack = Frame::tcp_syn_ack("10.244.1.2:8080", "192.168.0.1:62001");
        let out = syn_ack.clone().with_src("192.168.0.1:30080").with_dst("10.0.0.2:62001");
        case(syn_ack.bytes(), Pass, Bytes(out.bytes()), Reason::ReplyTranslated).after([Frame::tcp_syn("10.0.0.2:62001", "192.168.0.1:30080").bytes()]).counts(NODE_PORT_TCP, [1, 0, 0])
    };
    /// Node port, Cluster policy, established: the same translation.
    cluster_policy_established_flow_keeps_its_translation => {
        let data = Frame::tcp_data("10.0.0.2:62002", "192.168.0.1:30080", b"GET / HTTP/1.0\r\n\r\n");
        let out = data.clone().with_dst("10.244.1.2:8080").with_src("192.168.0.1:62002");
        case(data.bytes(), Pass, Bytes(out.bytes()), Reason::ForwardEstablished).after(node_port_connection(62002)).counts(NODE_PORT_TCP, [1, 0, 0])
    };
    /// Fragmentation needed to the node, about a source-translated packet:
    /// to the client, quoting what it sent.
    fragmentation_needed_reaches_the_source_translated_client => {
        let data = Frame::tcp_data("10.0.0.2:62003", "192.168.0.1:30080", b"GET / HTTP/1.0\r\n\r\n");
        let sent = data.clone().with_dst("10.244.1.2:8080").with_src("192.168.0.1:62003");
        let router = [192, 168, 1, 254];
        let frag_needed = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 });
        case(sent.icmp_error(router, NODE_IP, frag_needed.clone()), Pass, Bytes(data.icmp_error(router, [10, 0, 0, 2], frag_needed)), Reason::IcmpErrorTranslated)
            .after(node_port_connection(62003))
            .counts(NODE_PORT_TCP, [1, 0, 0])
    };
    /// Node port, Cluster policy, a reply: from the node port, to the client.
    cluster_policy_reply_goes_to_the_client => {
        let reply = Frame::tcp_data("10.244.1.2:8080", "192.168.0.1:62004", b"You've hit kubia-1");
        let out = reply.clone().with_src("192.168.0.1:30080").with_dst("10.0.0.2:62004");
        case(reply.bytes(), Pass, Bytes(out.bytes()), Reason::ReplyTranslated).after(node_port_connection(62004)).counts(NODE_PORT_TCP, [1, 0, 0])
    };
    /// UDP node port, Cluster policy: the source translated.
    cluster_policy_udp_translates_the_source => {
        let query = Frame::udp("10.0.0.2:62005", "192.168.0.1:30053", b"query");
        case(query.bytes(), Pass, Bytes(query.clone().with_dst("10.244.1.2:5353").with_src("192.168.0.1:62005").bytes()), Reason::ForwardNew).counts(NODE_PORT_UDP, [1, 1, 0])
    };
    /// UDP node port, Cluster policy, a reply: back to the client.
    cluster_policy_udp_reply_goes_to_the_client => {
        let query = Frame::udp("10.0.0.2:62006", "192.168.0.1:30053", b"query");
        let answer = Frame::udp("10.244.1.2:5353", "192.168.0.1:62006", b"answer");
        let out = answer.clone().with_src("192.168.0.1:30053").with_dst("10.0.0.2:62006");
        case(answer.bytes(), Pass, Bytes(out.bytes()), Reason::ReplyTranslated).after([query.bytes()]).counts(NODE_PORT_UDP, [1, 0, 0])
    };
    /// Node port, Local policy: to the local backend, the client's address kept.
    local_policy_keeps_the_client_address => {
        let syn = Frame::tcp_syn("10.0.0.2:40701", "192.168.0.1:30081");
        case(syn.bytes(), Pass, Bytes(syn.clone().with_dst("10.244.1.3:8080").bytes()), Reason::ForwardNew).counts(LOCAL, [1, 1, 0])
    };
    /// Node port, Local policy, a reply: from the node port.
    local_policy_reply_comes_from_the_node_port => {
        let syn_ack = Frame::tcp_syn_ack("10.244.1.3:8080", "10.0.0.2:40702");
        let setup = Frame::tcp_syn("10.0.0.2:40702", "192.168.0.1:30081");
        case(syn_ack.bytes(), Pass, Bytes(syn_ack.clone().with_src("192.168.0.1:30081").bytes()), Reason::ReplyTranslated).after([setup.bytes()]).counts(LOCAL, [1, 0, 0])
    };
    /// Node port, Local policy, no local endpoint: dropped.
    local_policy_without_a_local_endpoint_drops => {
        case(Frame::tcp_syn("10.0.0.2:40703", "192.168.0.1:30082").bytes(), Drop, Unchanged, Reason::DropNoLocalEndpoint)
    };
    /// The node's address, another port: the node's own traffic, unchanged.
    node_address_other_port_is_unchanged => {
        case(Frame::tcp_syn("10.0.0.2:40704", "192.168.0.1:22").bytes(), Pass, Unchanged, Reason::PassNotService)
    };
    /// The node's address, malformed: left to the kernel.
    node_address_malformed_is_left_to_the_kernel => {
        case(edited(Frame::tcp_syn("10.0.0.2:40705", "192.168.0.1:22").bytes(), |b| b[14] = 0x44), Pass, Unchanged, Reason::PassMalformed)
    };
    /// The node's address, a fragment: left to the kernel.
    node_address_fragment_is_left_to_the_kernel => {
        case(edited(Frame::tcp_syn("10.0.0.2:40706", "192.168.0.1:22").bytes(), |b| b[20] |= 0x20), Pass, Unchanged, Reason::PassNotService)
    };
    /// Hairpin: a pod reaching itself gets the node as its source.
    hairpin_gets_the_node_as_source => {
        let syn = Frame::tcp_syn("10.244.1.2:63000", "10.96.0.20:80");
        case(syn.bytes(), Pass, Bytes(syn.clone().with_dst("10.244.1.2:8080").with_src("192.168.0.1:63000").bytes()), Reason::ForwardNew).counts(HAIRPIN, [1, 1, 0])
    };
    /// The hairpin reply: from the service, back to the pod.
    hairpin_reply_goes_back_to_the_pod => {
        let syn_ack = Frame::tcp_syn_ack("10.244.1.2:8080", "192.168.0.1:63001");
        let out = syn_ack.clone().with_src("10.96.0.20:80").with_dst("10.244.1.2:63001");
        case(syn_ack.bytes(), Pass, Bytes(out.bytes()), Reason::ReplyTranslated).after([Frame::tcp_syn("10.244.1.2:63001", "10.96.0.20:80").bytes()]).counts(HAIRPIN, [1, 0, 0])
    };
    /// A load balancer IP with Local policy, from a pod: every endpoint
    /// serves, as through the cluster IP, the client kept.
    load_balancer_ip_from_a_pod_is_served_as_the_cluster_ip => {
        let syn = Frame::tcp_syn("10.244.2.7:40710", "203.0.113.10:80");
        case(syn.bytes(), Pass, Bytes(syn.clone().with_dst("10.244.1.2:8080").bytes()), Reason::ForwardNew).counts(LB, [1, 1, 0])
    };
    /// A load balancer IP with Local policy, the reply to the pod: from the
    /// load balancer IP.
    load_balancer_ip_reply_to_a_pod_comes_from_it => {
        let syn_ack = Frame::tcp_syn_ack("10.244.1.2:8080", "10.244.2.7:40711");
        let setup = Frame::tcp_syn("10.244.2.7:40711", "203.0.113.10:80");
        case(syn_ack.bytes(), Pass, Bytes(syn_ack.clone().with_src("203.0.113.10:80").bytes()), Reason::ReplyTranslated).after([setup.bytes()]).counts(LB, [1, 0, 0])
    };
    /// A load balancer IP with Local policy, from outside the cluster, no
    /// local endpoint: dropped.
    load_balancer_ip_from_outside_without_a_local_endpoint_drops => {
        case(Frame::tcp_syn("10.0.0.2:40712", "203.0.113.10:80").bytes(), Drop, Unchanged, Reason::DropNoLocalEndpoint)
    };
    /// An echo request to a cluster IP (--answer-ping): answered from it, TTL 64.
    echo_request_to_a_cluster_ip_is_answered => {
        case(echo_request([10, 0, 0, 2], [10, 96, 0, 20], 63), Bounce, Bytes(echo_reply([10, 96, 0, 20], [10, 0, 0, 2], 64)), Reason::EchoAnswered)
    };
    /// An echo request to the node's address: the node answers itself.
    echo_request_to_the_node_is_unchanged => {
        case(echo_request([10, 0, 0, 2], NODE_IP, 63), Pass, Unchanged, Reason::PassNotService)
    };
    /// An echo request to a load balancer IP: not a cluster IP, unchanged.
    echo_request_to_a_load_balancer_ip_is_unchanged => {
        case(echo_request([10, 0, 0, 2], LB_IP, 63), Pass, Unchanged, Reason::PassNotService)
    };
    /// An echo reply to a cluster IP: unchanged.
    echo_reply_to_a_cluster_ip_is_unchanged => {
        case(echo_reply([10, 0, 0, 2], [10, 96, 0, 20], 64), Pass, Unchanged, Reason::PassNotService)
    };
    /// A cluster IP from outside --cluster-cidr: masqueraded to the node, as
    /// kube-proxy does.
    cluster_ip_from_outside_the_pod_range_is_masqueraded => {
        let syn = Frame::tcp_syn("10.0.0.2:62010", "10.96.0.21:80");
        case(syn.bytes(), Pass, Bytes(syn.clone().with_dst("10.244.1.2:8080").with_src("192.168.0.1:62010").bytes()), Reason::ForwardNew).counts(TWIN, [1, 1, 0])
    };
    /// Its reply: from the cluster IP, back to the client.
    masqueraded_reply_goes_back_to_the_client => {
        let syn_ack = Frame::tcp_syn_ack("10.244.1.2:8080", "192.168.0.1:62011");
        let out = syn_ack.clone().with_src("10.96.0.21:80").with_dst("10.0.0.2:62011");
        case(syn_ack.bytes(), Pass, Bytes(out.bytes()), Reason::ReplyTranslated).after([Frame::tcp_syn("10.0.0.2:62011", "10.96.0.21:80").bytes()]).counts(TWIN, [1, 0, 0])
    };
    /// A cluster IP from a pod: the pod's address kept.
    cluster_ip_from_a_pod_keeps_its_address => {
        let syn = Frame::tcp_syn("10.244.2.7:40713", "10.96.0.21:80");
        case(syn.bytes(), Pass, Bytes(syn.clone().with_dst("10.244.1.2:8080").bytes()), Reason::ForwardNew).counts(TWIN, [1, 1, 0])
    };
    /// An unallocated cluster IP (in --service-cidr, no service): dropped.
    unallocated_cluster_ip_drops_tcp => {
        case(Frame::tcp_syn("10.0.0.2:40720", "10.96.0.99:80").bytes(), Drop, Unchanged, Reason::DropUnallocatedClusterIp)
    };
    /// UDP to an unallocated cluster IP: dropped.
    unallocated_cluster_ip_drops_udp => {
        case(Frame::udp("10.0.0.2:40721", "10.96.0.99:53", b"q").bytes(), Drop, Unchanged, Reason::DropUnallocatedClusterIp)
    };
    /// Just outside --service-cidr: not a service, unchanged.
    just_outside_the_service_range_is_unchanged => {
        case(Frame::tcp_syn("10.0.0.2:40722", "10.97.0.1:80").bytes(), Pass, Unchanged, Reason::PassNotService)
    };
}
