//! Byte-exact datapath tests through BPF_PROG_TEST_RUN, in the shape of
//! kube-proxy's packet-flow tests: each case is an input packet, the
//! expected verdict, the expected output bytes (built by etherparse, so
//! addresses, ports and checksums are checked independently of our code) and
//! the verdict reason it must be counted under. Every case runs through both
//! hooks, XDP and tc. Needs root.
use std::collections::BTreeSet;

use aya::programs::{TestRun, TestRunOptions};

use lb_common::{DATAPATH_ANSWER_ECHO, DatapathConfig, Ipv4Cidr, Ipv4Cidrs, Reason, SNAT_PORT_MAX, SNAT_PORT_MIN, ip_be};
use lb_tests::{
    fixture::{Fixture, Hook, Verdict, desired, service},
    packets::{Frame, echo_reply, echo_request},
};
use etherparse::{Icmpv4Type, icmpv4::DestUnreachableHeader};
use lb_userspace::model::{DesiredState, Endpoint, Protocol, ServicePort, ServicePortName};

const BACKEND: [u8; 4] = [10, 244, 1, 2];

fn services() -> DesiredState {
    desired([
        service("web", [10, 96, 0, 10], 80, Protocol::Tcp, &[(BACKEND, 8080)]),
        service("dns", [10, 96, 0, 10], 53, Protocol::Udp, &[(BACKEND, 5353)]),
        service("empty", [10, 96, 0, 11], 80, Protocol::Tcp, &[]),
        service("empty", [10, 96, 0, 11], 53, Protocol::Udp, &[]),
    ])
}

enum Expect {
    Unchanged,
    Bytes(Vec<u8>),
}

struct Case {
    name: &'static str,
    input: Vec<u8>,
    verdict: Verdict,
    output: Expect,
    reason: Reason,
    /// The kernel's test runner refuses to build an skb from an IPv4 frame
    /// whose IP header is cut short (the stack never hands tc one), so such
    /// cases run through XDP only.
    xdp_only: bool,
}

fn case(name: &'static str, input: Vec<u8>, verdict: Verdict, output: Expect, reason: Reason) -> Case {
    Case { name, input, verdict, output, reason, xdp_only: false }
}

fn xdp_only(name: &'static str, input: Vec<u8>, verdict: Verdict, output: Expect, reason: Reason) -> Case {
    Case { xdp_only: true, ..case(name, input, verdict, output, reason) }
}

/// Edits a valid frame into a malformed one.
fn edited(frame: &Frame, edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut bytes = frame.bytes();
    edit(&mut bytes);
    bytes
}

fn set_u16(bytes: &mut [u8], at: usize, value: u16) {
    bytes[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

/// The cases, in order: later ones rely on the flows earlier ones created.
fn cases() -> Vec<Case> {
    use Expect::*;
    use Verdict::*;
    let syn = Frame::tcp_syn("10.0.0.2:40000", "10.96.0.10:80");
    let syn_ack = Frame::tcp_syn_ack("10.244.1.2:8080", "10.0.0.2:40000");
    let data = Frame::tcp_data("10.0.0.2:40000", "10.96.0.10:80", b"GET / HTTP/1.0\r\n\r\n");
    let reply = Frame::tcp_data("10.244.1.2:8080", "10.0.0.2:40000", b"You've hit kubia-1");
    let query = Frame::udp("10.0.0.2:5000", "10.96.0.10:53", b"query");
    let answer = Frame::udp("10.244.1.2:5353", "10.0.0.2:5000", b"answer");
    let no_checksum = Frame::udp("10.0.0.2:5001", "10.96.0.10:53", b"q");
    let with_options = Frame::tcp_syn("10.0.0.2:40001", "10.96.0.10:80").with_ip_options(&[1, 1, 1, 0]);
    let padded = Frame::udp("10.0.0.2:5003", "10.96.0.10:53", b"p");
    let mut padded_in = padded.bytes();
    padded_in.resize(60, 0);
    let mut padded_out = padded.clone().with_dst("10.244.1.2:5353").bytes();
    padded_out.resize(60, 0);
    let empty_syn = Frame::tcp_syn("10.0.0.2:40002", "10.96.0.11:80");
    let empty_data = Frame::tcp_data("10.0.0.2:40003", "10.96.0.11:80", b"abc");
    let empty_udp = Frame::udp("10.0.0.2:5002", "10.96.0.11:53", b"query");
    let other_port = Frame::tcp_syn("10.0.0.2:40004", "10.96.0.10:81");
    let other_udp_port = Frame::udp("10.0.0.2:5004", "10.96.0.10:54", b"query");
    let empty_rst = Frame::tcp_data("10.0.0.2:40005", "10.96.0.11:80", b"").with_tcp(|t| t.rst = true);
    let empty_udp_options = Frame::udp("10.0.0.2:5005", "10.96.0.11:53", b"q").with_ip_options(&[1, 1, 1, 0]);
    let not_service = Frame::tcp_syn("10.0.0.2:40000", "10.0.0.3:80");
    let not_service_udp = Frame::udp("10.0.0.2:5000", "10.0.0.3:53", b"query");
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 10, 96, 0, 10]);
    let mut ipv6 = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x86, 0xdd, 0x60];
    ipv6.resize(14 + 40, 0);
    let router = [192, 168, 1, 254];
    let frag_needed = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 });
    let port_unreachable = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
    let sent_data = data.clone().with_dst("10.244.1.2:8080");
    let sent_query = query.clone().with_dst("10.244.1.2:5353");
    let sent_answer = answer.clone().with_src("10.96.0.10:53");
    let mut cut_quote = sent_query.icmp_error(BACKEND, [10, 0, 0, 2], port_unreachable.clone());
    cut_quote.truncate(cut_quote.len() - 4);
    let cut_len = (cut_quote.len() - 14) as u16;
    set_u16(&mut cut_quote, 16, cut_len);
    let (mut cut_ip, _) = etherparse::Ipv4Header::from_slice(&cut_quote[14..]).expect("an IPv4 header");
    cut_ip.header_checksum = cut_ip.calc_header_checksum();
    cut_quote[14..34].copy_from_slice(&cut_ip.to_bytes());
    let icmp_echo = edited(&Frame::udp("10.0.0.2:1", "10.96.0.10:53", b"ping"), |b| b[23] = 1);

    vec![
        case("new TCP flow: destination becomes the backend", syn.bytes(), Pass, Bytes(syn.clone().with_dst("10.244.1.2:8080").bytes()), Reason::ForwardNew),
        case("the backend's SYN-ACK: from the service, the connection confirmed", syn_ack.bytes(), Pass, Bytes(syn_ack.clone().with_src("10.96.0.10:80").bytes()), Reason::ReplyTranslated),
        case("established TCP flow: same backend", data.bytes(), Pass, Bytes(data.clone().with_dst("10.244.1.2:8080").bytes()), Reason::ForwardEstablished),
        case("TCP reply: source becomes the service again", reply.bytes(), Pass, Bytes(reply.clone().with_src("10.96.0.10:80").bytes()), Reason::ReplyTranslated),
        case("new UDP flow: destination becomes the backend", query.bytes(), Pass, Bytes(query.clone().with_dst("10.244.1.2:5353").bytes()), Reason::ForwardNew),
        case("UDP reply: source becomes the service again", answer.bytes(), Pass, Bytes(answer.clone().with_src("10.96.0.10:53").bytes()), Reason::ReplyTranslated),
        case("UDP without checksum: stays without", no_checksum.bytes_without_udp_checksum(), Pass, Bytes(no_checksum.clone().with_dst("10.244.1.2:5353").bytes_without_udp_checksum()), Reason::ForwardNew),
        case("IP options: ports found after them", with_options.bytes(), Pass, Bytes(with_options.clone().with_dst("10.244.1.2:8080").bytes()), Reason::ForwardNew),
        case("Ethernet padding after the IP packet: kept", padded_in, Pass, Bytes(padded_out), Reason::ForwardNew),
        case("no endpoints, TCP SYN: reset", empty_syn.bytes(), Bounce, Bytes(empty_syn.expected_reset()), Reason::RejectNoBackend),
        case("no endpoints, TCP data: reset from its ACK", empty_data.bytes(), Bounce, Bytes(empty_data.expected_reset()), Reason::RejectNoBackend),
        case("no endpoints, UDP: port unreachable", empty_udp.bytes(), Bounce, Bytes(empty_udp.expected_port_unreachable()), Reason::RejectNoBackend),
        case("service address, unknown TCP port: reset", other_port.bytes(), Bounce, Bytes(other_port.expected_reset()), Reason::RejectUnknownPort),
        case("service address, unknown UDP port: port unreachable", other_udp_port.bytes(), Bounce, Bytes(other_udp_port.expected_port_unreachable()), Reason::RejectUnknownPort),
        case("no endpoints, TCP reset: not answered", empty_rst.bytes(), Drop, Unchanged, Reason::DropUnanswerable),
        case("no endpoints, UDP with IP options: dropped", empty_udp_options.bytes(), Drop, Unchanged, Reason::DropUnanswerable),
        case("not a service, TCP: unchanged", not_service.bytes(), Pass, Unchanged, Reason::PassNotService),
        case("not a service, UDP: unchanged", not_service_udp.bytes(), Pass, Unchanged, Reason::PassNotService),
        case("ARP: unchanged", arp, Pass, Unchanged, Reason::PassNotIpv4),
        case("IPv6: unchanged", ipv6, Pass, Unchanged, Reason::PassNotIpv4),
        case("ICMP to a service address: unchanged", icmp_echo, Pass, Unchanged, Reason::PassNotService),
        case("echo request to a cluster IP without --answer-ping: unchanged", echo_request([10, 0, 0, 2], [10, 96, 0, 10], 63), Pass, Unchanged, Reason::PassNotService),
        case("fragmentation needed from a router, about a packet sent to the backend: quotes the service", sent_data.icmp_error(router, [10, 0, 0, 2], frag_needed.clone()), Pass, Bytes(data.icmp_error(router, [10, 0, 0, 2], frag_needed.clone())), Reason::IcmpErrorTranslated),
        case("port unreachable from the backend: comes from the service and quotes it", sent_query.icmp_error(BACKEND, [10, 0, 0, 2], port_unreachable.clone()), Pass, Bytes(query.icmp_error([10, 96, 0, 10], [10, 0, 0, 2], port_unreachable.clone())), Reason::IcmpErrorTranslated),
        case("ICMP error from the client about a reply: goes to the backend and quotes it", sent_answer.icmp_error([10, 0, 0, 2], [10, 96, 0, 10], port_unreachable.clone()), Pass, Bytes(answer.icmp_error([10, 0, 0, 2], BACKEND, port_unreachable.clone())), Reason::IcmpErrorTranslated),
        case("ICMP error about a flow not tracked: unchanged", not_service_udp.icmp_error(router, [10, 0, 0, 2], port_unreachable.clone()), Pass, Unchanged, Reason::PassNotService),
        case("ICMP error quoting fewer than 8 bytes: unchanged", cut_quote, Pass, Unchanged, Reason::PassNotService),
        xdp_only("Ethernet header alone: unchanged", syn.bytes()[..14].to_vec(), Pass, Unchanged, Reason::PassMalformed),
        xdp_only("truncated IPv4 header: unchanged", syn.bytes()[..14 + 12].to_vec(), Pass, Unchanged, Reason::PassMalformed),
        case("IHL below 5, to a service: dropped", edited(&syn, |b| b[14] = 0x44), Drop, Unchanged, Reason::DropMalformed),
        case("IHL below 5, not to a service: unchanged", edited(&not_service, |b| b[14] = 0x44), Pass, Unchanged, Reason::PassMalformed),
        case("IP version 6 in an IPv4 frame, to a service: dropped", edited(&syn, |b| b[14] = 0x65), Drop, Unchanged, Reason::DropMalformed),
        case("total length beyond the frame, to a service: dropped", edited(&syn, |b| { let l = b.len() as u16; set_u16(b, 16, l) }), Drop, Unchanged, Reason::DropMalformed),
        case("total length beyond the frame, not to a service: unchanged", edited(&not_service, |b| { let l = b.len() as u16; set_u16(b, 16, l) }), Pass, Unchanged, Reason::PassMalformed),
        case("total length shorter than the headers, to a service: dropped", edited(&syn, |b| set_u16(b, 16, 30)), Drop, Unchanged, Reason::DropMalformed),
        case("truncated TCP header, to a service: dropped", edited(&syn, |b| { b.truncate(14 + 20 + 10); set_u16(b, 16, 30) }), Drop, Unchanged, Reason::DropMalformed),
        case("TCP data offset below 5, to a service: dropped", edited(&syn, |b| b[14 + 20 + 12] = 0x40), Drop, Unchanged, Reason::DropMalformed),
        case("UDP length beyond the IP payload, to a service: dropped", edited(&query, |b| set_u16(b, 14 + 20 + 4, 200)), Drop, Unchanged, Reason::DropMalformed),
        case("UDP length below its header, to a service: dropped", edited(&query, |b| set_u16(b, 14 + 20 + 4, 4)), Drop, Unchanged, Reason::DropMalformed),
        case("first fragment of a tracked flow: translated like its other packets", edited(&syn, |b| b[20] |= 0x20), Pass, Bytes(edited(&syn.clone().with_dst("10.244.1.2:8080"), |b| b[20] |= 0x20)), Reason::ForwardEstablished),
        case("later fragment, to a service, its first never seen: dropped", edited(&query, |b| set_u16(b, 20, 0x0010)), Drop, Unchanged, Reason::DropFragment),
        case("fragment, not to a service: unchanged", edited(&not_service, |b| b[20] |= 0x20), Pass, Unchanged, Reason::PassNotService),
    ]
}

/// Runs `cases` in order; one line per way a case went wrong.
fn check_cases(fixture: &Fixture, hook: Hook, cases: Vec<Case>) -> Vec<String> {
    let mut failures = Vec::new();
    for case in cases {
        if case.xdp_only && hook != Hook::Xdp {
            continue;
        }
        let before = fixture.reason_totals();
        let result = match fixture.try_run(hook, &case.input) {
            Ok(result) => result,
            Err(e) => {
                failures.push(format!("{}: {e}", case.name));
                continue;
            }
        };
        let after = fixture.reason_totals();
        let expected_output = match &case.output {
            Expect::Unchanged => &case.input,
            Expect::Bytes(bytes) => bytes,
        };
        if result.verdict != case.verdict {
            failures.push(format!("{}: verdict {:?}, expected {:?}", case.name, result.verdict, case.verdict));
        }
        if &result.output != expected_output {
            failures.push(format!("{}:\n  output   {:02x?}\n  expected {:02x?}", case.name, result.output, expected_output));
        }
        let counted: Vec<Reason> = Reason::ALL.into_iter().filter(|r| after[*r as usize] != before[*r as usize]).collect();
        if counted != [case.reason] || after[case.reason as usize] != before[case.reason as usize] + 1 {
            failures.push(format!("{}: counted under {counted:?}, expected once under {:?}", case.name, case.reason));
        }
    }
    failures
}

fn run_table(hook: Hook) {
    let fixture = Fixture::new(&services());
    let failures = check_cases(&fixture, hook, cases());
    assert!(failures.is_empty(), "{hook:?}: {} failures:\n{}", failures.len(), failures.join("\n"));

    // The per-service counters moved with the cases above.
    let web = fixture.datapath.maps.service_totals(fixture.service_id("default", "web", "80")).expect("counters");
    assert_eq!((web.packets, web.new_flows, web.rejected), (7, 2, 0), "web: SYN, SYN-ACK, data, reply, options SYN, fragmentation needed, first fragment");
    let dns = fixture.datapath.maps.service_totals(fixture.service_id("default", "dns", "53")).expect("counters");
    assert_eq!((dns.packets, dns.new_flows), (6, 3), "dns: query, answer, no-checksum query, padded query, two ICMP errors");
    let empty_tcp = fixture.datapath.maps.service_totals(fixture.service_id("default", "empty", "80")).expect("counters");
    assert_eq!(empty_tcp.rejected, 2, "empty TCP: SYN and data rejected; the reset is not counted as rejected");
    let empty_udp = fixture.datapath.maps.service_totals(fixture.service_id("default", "empty", "53")).expect("counters");
    assert_eq!(empty_udp.rejected, 1);
}

#[test]
fn packet_flows_through_xdp() {
    run_table(Hook::Xdp);
}

#[test]
fn packet_flows_through_tc() {
    run_table(Hook::Tc);
}

/// An established flow keeps its backend while the set changes around it,
/// and is moved to another backend once its own backend leaves.
#[test]
fn established_flow_keeps_its_backend_until_the_backend_leaves() {
    for hook in [Hook::Xdp, Hook::Tc] {
        let a = ([10, 244, 1, 2], 8080);
        let b = ([10, 244, 2, 2], 8080);
        let c = ([10, 244, 3, 2], 8080);
        let mut fixture = Fixture::new(&desired([service("web", [10, 96, 0, 10], 80, Protocol::Tcp, &[a])]));
        let syn = Frame::tcp_syn("10.0.0.2:40000", "10.96.0.10:80");
        let data = Frame::tcp_data("10.0.0.2:40000", "10.96.0.10:80", b"more");
        let to_a = fixture.run(hook, &syn.bytes());
        assert_eq!(to_a.output, syn.clone().with_dst("10.244.1.2:8080").bytes(), "{hook:?}");
        assert_eq!(fixture.run(hook, &Frame::tcp_syn_ack("10.244.1.2:8080", "10.0.0.2:40000").bytes()).verdict, Verdict::Pass, "{hook:?}");

        fixture.program(&desired([service("web", [10, 96, 0, 10], 80, Protocol::Tcp, &[a, b, c])]));
        for _ in 0..20 {
            let out = fixture.run(hook, &data.bytes());
            assert_eq!(out.output, data.clone().with_dst("10.244.1.2:8080").bytes(), "{hook:?}: the flow stays on a");
        }
        let established = fixture.reason_totals()[Reason::ForwardEstablished as usize];
        assert_eq!(established, 20, "{hook:?}");

        fixture.program(&desired([service("web", [10, 96, 0, 10], 80, Protocol::Tcp, &[b])]));
        let moved = fixture.run(hook, &data.bytes());
        assert_eq!(moved.output, data.clone().with_dst("10.244.2.2:8080").bytes(), "{hook:?}: a left, the flow goes to b");
        assert_eq!(fixture.reason_totals()[Reason::ForwardRescheduled as usize], 1, "{hook:?}");
        let reply = Frame::tcp_data("10.244.2.2:8080", "10.0.0.2:40000", b"ok");
        let back = fixture.run(hook, &reply.bytes());
        assert_eq!(back.output, reply.clone().with_src("10.96.0.10:80").bytes(), "{hook:?}: b's replies are translated");
    }
}

/// New connections spread over every backend of the set.
#[test]
fn new_flows_spread_over_all_backends() {
    let backends: Vec<([u8; 4], u16)> = (1..=3).map(|i| ([10, 244, i, 2], 8080)).collect();
    let fixture = Fixture::new(&desired([service("web", [10, 96, 0, 10], 80, Protocol::Tcp, &backends)]));
    let mut hits = [0u32; 3];
    for port in 0..300u16 {
        let syn = Frame::tcp_syn(&format!("10.0.0.2:{}", 30000 + port), "10.96.0.10:80");
        let out = fixture.run(Hook::Xdp, &syn.bytes());
        let dst = &out.output[30..34];
        let index = backends.iter().position(|(ip, _)| ip == dst).expect("sent to one of the backends");
        hits[index] += 1;
    }
    assert!(hits.iter().all(|&h| h >= 60), "each backend gets at least 20% of 300: {hits:?}");
}

const NODE_IP: [u8; 4] = [192, 168, 0, 1];
const LOCAL_BACKEND: [u8; 4] = [10, 244, 1, 3];

const POD_CIDR: ([u8; 4], u8) = ([10, 244, 0, 0], 16);
const SERVICE_CIDR: ([u8; 4], u8) = ([10, 96, 0, 0], 16);
const LB_IP: [u8; 4] = [203, 0, 113, 10];

/// The external side of services on a node at 192.168.0.1: a node port
/// with externalTrafficPolicy Cluster (source NAT), one with Local and a
/// local endpoint, one with Local and none; a cluster IP whose only
/// endpoint is 10.244.1.2, for hairpin; and a load balancer IP with Local
/// policy and no local endpoint, whose cluster IP side has 10.244.1.2.
fn external_services() -> DesiredState {
    let external = |(name, port): (ServicePortName, ServicePort), local: bool| {
        (name.to_external(), ServicePort { drop_when_empty: local, snat: !local, ..port })
    };
    let (lb_name, lb_port) = service("lb", LB_IP, 80, Protocol::Tcp, &[]);
    desired([
        service("hairpin", [10, 96, 0, 20], 80, Protocol::Tcp, &[(BACKEND, 8080)]),
        service("twin", [10, 96, 0, 21], 80, Protocol::Tcp, &[(BACKEND, 8080)]),
        external(service("cluster", NODE_IP, 30080, Protocol::Tcp, &[(BACKEND, 8080)]), false),
        external(service("cluster", NODE_IP, 30053, Protocol::Udp, &[(BACKEND, 5353)]), false),
        external(service("local", NODE_IP, 30081, Protocol::Tcp, &[(LOCAL_BACKEND, 8080)]), true),
        external(service("nolocal", NODE_IP, 30082, Protocol::Tcp, &[]), true),
        service("lb", [10, 96, 0, 22], 80, Protocol::Tcp, &[(BACKEND, 8080)]),
        external((lb_name, ServicePort { in_cluster_via: Some(([10, 96, 0, 22].into(), 80)), ..lb_port }), true),
    ])
}

fn node_fixture() -> Fixture {
    let mut fixture = Fixture::new(&external_services());
    let config = DatapathConfig {
        snat_ip: ip_be(NODE_IP.into()),
        snat_port_min: SNAT_PORT_MIN,
        snat_port_max: SNAT_PORT_MAX,
        flags: DATAPATH_ANSWER_ECHO,
        cluster_cidrs: Ipv4Cidrs::new([Ipv4Cidr::new(POD_CIDR.0.into(), POD_CIDR.1)]),
        service_cidrs: Ipv4Cidrs::new([Ipv4Cidr::new(SERVICE_CIDR.0.into(), SERVICE_CIDR.1)]),
        ..DatapathConfig::default()
    };
    fixture.datapath.maps.set_config(config).expect("config");
    fixture
}

/// One pod's client port to two service addresses that share their backend: the
/// second flow's replies would carry the first's 5-tuple, so its source
/// port is translated (the address kept); each flow's replies come back
/// from its own service, to the client's own port.
#[test]
fn reply_clash_between_two_frontends_translates_the_source_port() {
    for hook in [Hook::Xdp, Hook::Tc] {
        let fixture = node_fixture();
        let first = Frame::tcp_syn("10.244.2.7:40000", "10.96.0.20:80");
        let second = Frame::tcp_syn("10.244.2.7:40000", "10.96.0.21:80");
        assert_eq!(fixture.run(hook, &first.bytes()).output, first.clone().with_dst("10.244.1.2:8080").bytes(), "{hook:?}: first flow");
        let out = fixture.run(hook, &second.bytes()).output;
        let port = u16::from_be_bytes([out[34], out[35]]);
        assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&port), "{hook:?}: second flow's source port {port}");
        let source = format!("10.244.2.7:{port}");
        assert_eq!(out, second.clone().with_dst("10.244.1.2:8080").with_src(&source).bytes(), "{hook:?}: second flow, client address kept");
        let reply = Frame::tcp_syn_ack("10.244.1.2:8080", "10.244.2.7:40000");
        let reply_out = fixture.run(hook, &reply.bytes()).output;
        assert_eq!(reply_out, reply.clone().with_src("10.96.0.20:80").bytes(), "{hook:?}: the first flow's reply");
        let reply = Frame::tcp_syn_ack("10.244.1.2:8080", &source);
        let reply_out = fixture.run(hook, &reply.bytes()).output;
        assert_eq!(reply_out, reply.clone().with_src("10.96.0.21:80").with_dst("10.244.2.7:40000").bytes(), "{hook:?}: the second flow's reply");
        let data = Frame::tcp_data("10.244.2.7:40000", "10.96.0.21:80", b"more");
        let data_out = fixture.run(hook, &data.bytes()).output;
        assert_eq!(data_out, data.clone().with_dst("10.244.1.2:8080").with_src(&source).bytes(), "{hook:?}: the second flow keeps its port");
    }
}

/// Client ports in the source NAT range (61000-65535) are kept when free,
/// which makes these outputs exact.
fn external_cases() -> Vec<Case> {
    use Expect::*;
    use Verdict::*;
    let syn = Frame::tcp_syn("10.0.0.2:62000", "192.168.0.1:30080");
    let syn_ack = Frame::tcp_syn_ack("10.244.1.2:8080", "192.168.0.1:62000");
    let data = Frame::tcp_data("10.0.0.2:62000", "192.168.0.1:30080", b"GET / HTTP/1.0\r\n\r\n");
    let reply = Frame::tcp_data("10.244.1.2:8080", "192.168.0.1:62000", b"You've hit kubia-1");
    let query = Frame::udp("10.0.0.2:62001", "192.168.0.1:30053", b"query");
    let answer = Frame::udp("10.244.1.2:5353", "192.168.0.1:62001", b"answer");
    let local_syn = Frame::tcp_syn("10.0.0.2:40001", "192.168.0.1:30081");
    let local_reply = Frame::tcp_syn_ack("10.244.1.3:8080", "10.0.0.2:40001");
    let no_local = Frame::tcp_syn("10.0.0.2:40002", "192.168.0.1:30082");
    let ssh = Frame::tcp_syn("10.0.0.2:40003", "192.168.0.1:22");
    let hairpin = Frame::tcp_syn("10.244.1.2:63000", "10.96.0.20:80");
    let hairpin_reply = Frame::tcp_syn_ack("10.244.1.2:8080", "192.168.0.1:63000");
    let pod_to_lb = Frame::tcp_syn("10.244.2.7:40010", "203.0.113.10:80");
    let lb_reply = Frame::tcp_syn_ack("10.244.1.2:8080", "10.244.2.7:40010");
    let outside_to_lb = Frame::tcp_syn("10.0.0.2:40011", "203.0.113.10:80");
    let outside_to_cluster_ip = Frame::tcp_syn("10.0.0.2:62010", "10.96.0.21:80");
    let outside_reply = Frame::tcp_syn_ack("10.244.1.2:8080", "192.168.0.1:62010");
    let pod_to_cluster_ip = Frame::tcp_syn("10.244.2.7:40012", "10.96.0.21:80");
    let router = [192, 168, 1, 254];
    let frag_needed = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 });
    let sent_data = data.clone().with_dst("10.244.1.2:8080").with_src("192.168.0.1:62000");
    vec![
        case("node port, Cluster policy: to the backend, from the node", syn.bytes(), Pass, Bytes(syn.clone().with_dst("10.244.1.2:8080").with_src("192.168.0.1:62000").bytes()), Reason::ForwardNew),
        case("node port, Cluster policy, the SYN-ACK: from the node port, to the client", syn_ack.bytes(), Pass, Bytes(syn_ack.clone().with_src("192.168.0.1:30080").with_dst("10.0.0.2:62000").bytes()), Reason::ReplyTranslated),
        case("node port, Cluster policy, established: the same translation", data.bytes(), Pass, Bytes(data.clone().with_dst("10.244.1.2:8080").with_src("192.168.0.1:62000").bytes()), Reason::ForwardEstablished),
        case("fragmentation needed to the node, about a source-translated packet: to the client, quoting what it sent", sent_data.icmp_error(router, NODE_IP, frag_needed.clone()), Pass, Bytes(data.icmp_error(router, [10, 0, 0, 2], frag_needed)), Reason::IcmpErrorTranslated),
        case("node port, Cluster policy, reply: from the node port, to the client", reply.bytes(), Pass, Bytes(reply.clone().with_src("192.168.0.1:30080").with_dst("10.0.0.2:62000").bytes()), Reason::ReplyTranslated),
        case("UDP node port, Cluster policy: source translated", query.bytes(), Pass, Bytes(query.clone().with_dst("10.244.1.2:5353").with_src("192.168.0.1:62001").bytes()), Reason::ForwardNew),
        case("UDP node port, Cluster policy, reply: back to the client", answer.bytes(), Pass, Bytes(answer.clone().with_src("192.168.0.1:30053").with_dst("10.0.0.2:62001").bytes()), Reason::ReplyTranslated),
        case("node port, Local policy: to the local backend, client address kept", local_syn.bytes(), Pass, Bytes(local_syn.clone().with_dst("10.244.1.3:8080").bytes()), Reason::ForwardNew),
        case("node port, Local policy, reply: from the node port", local_reply.bytes(), Pass, Bytes(local_reply.clone().with_src("192.168.0.1:30081").bytes()), Reason::ReplyTranslated),
        case("node port, Local policy, no local endpoint: dropped", no_local.bytes(), Drop, Unchanged, Reason::DropNoLocalEndpoint),
        case("node address, another port: the node's own traffic, unchanged", ssh.bytes(), Pass, Unchanged, Reason::PassNotService),
        case("node address, malformed: left to the kernel", edited(&ssh, |b| b[14] = 0x44), Pass, Unchanged, Reason::PassMalformed),
        case("node address, fragment: left to the kernel", edited(&ssh, |b| b[20] |= 0x20), Pass, Unchanged, Reason::PassNotService),
        case("hairpin: a pod reaching itself gets the node as source", hairpin.bytes(), Pass, Bytes(hairpin.clone().with_dst("10.244.1.2:8080").with_src("192.168.0.1:63000").bytes()), Reason::ForwardNew),
        case("hairpin reply: from the service, back to the pod", hairpin_reply.bytes(), Pass, Bytes(hairpin_reply.clone().with_src("10.96.0.20:80").with_dst("10.244.1.2:63000").bytes()), Reason::ReplyTranslated),
        case("load balancer IP, Local policy, from a pod: every endpoint serves, as through the cluster IP, client kept", pod_to_lb.bytes(), Pass, Bytes(pod_to_lb.clone().with_dst("10.244.1.2:8080").bytes()), Reason::ForwardNew),
        case("load balancer IP, Local policy, reply to the pod: from the load balancer IP", lb_reply.bytes(), Pass, Bytes(lb_reply.clone().with_src("203.0.113.10:80").bytes()), Reason::ReplyTranslated),
        case("load balancer IP, Local policy, from outside the cluster, no local endpoint: dropped", outside_to_lb.bytes(), Drop, Unchanged, Reason::DropNoLocalEndpoint),
        case("echo request to a cluster IP (--answer-ping): answered from it, TTL 64", echo_request([10, 0, 0, 2], [10, 96, 0, 20], 63), Bounce, Bytes(echo_reply([10, 96, 0, 20], [10, 0, 0, 2], 64)), Reason::EchoAnswered),
        case("echo request to the node's address: the node answers itself", echo_request([10, 0, 0, 2], NODE_IP, 63), Pass, Unchanged, Reason::PassNotService),
        case("echo request to a load balancer IP: not a cluster IP, unchanged", echo_request([10, 0, 0, 2], LB_IP, 63), Pass, Unchanged, Reason::PassNotService),
        case("cluster IP from outside --cluster-cidr: masqueraded to the node, as kube-proxy", outside_to_cluster_ip.bytes(), Pass, Bytes(outside_to_cluster_ip.clone().with_dst("10.244.1.2:8080").with_src("192.168.0.1:62010").bytes()), Reason::ForwardNew),
        case("its reply: from the cluster IP, back to the client", outside_reply.bytes(), Pass, Bytes(outside_reply.clone().with_src("10.96.0.21:80").with_dst("10.0.0.2:62010").bytes()), Reason::ReplyTranslated),
        case("cluster IP from a pod: the pod's address kept", pod_to_cluster_ip.bytes(), Pass, Bytes(pod_to_cluster_ip.clone().with_dst("10.244.1.2:8080").bytes()), Reason::ForwardNew),
        case("unallocated cluster IP (in --service-cidr, no service): dropped", Frame::tcp_syn("10.0.0.2:40020", "10.96.0.99:80").bytes(), Drop, Unchanged, Reason::DropUnallocatedClusterIp),
        case("UDP to an unallocated cluster IP: dropped", Frame::udp("10.0.0.2:40021", "10.96.0.99:53", b"q").bytes(), Drop, Unchanged, Reason::DropUnallocatedClusterIp),
        case("just outside --service-cidr: not a service, unchanged", Frame::tcp_syn("10.0.0.2:40022", "10.97.0.1:80").bytes(), Pass, Unchanged, Reason::PassNotService),
        case("echo reply to a cluster IP: unchanged", echo_reply([10, 0, 0, 2], [10, 96, 0, 20], 64), Pass, Unchanged, Reason::PassNotService),
    ]
}

#[test]
fn node_port_source_nat_and_hairpin_translations() {
    for hook in [Hook::Xdp, Hook::Tc] {
        let fixture = node_fixture();
        let failures = check_cases(&fixture, hook, external_cases());
        assert!(failures.is_empty(), "{hook:?}: {} failures:\n{}", failures.len(), failures.join("\n"));
    }
}

/// A second client using the same source port to the same backend gets
/// another port from the range; its reply finds its own client.
#[test]
fn source_nat_ports_do_not_collide() {
    for hook in [Hook::Xdp, Hook::Tc] {
        let fixture = node_fixture();
        let first = Frame::tcp_syn("10.0.0.2:62000", "192.168.0.1:30080");
        let second = Frame::tcp_syn("10.0.0.3:62000", "192.168.0.1:30080");
        assert_eq!(fixture.run(hook, &first.bytes()).verdict, Verdict::Pass);
        let out = fixture.run(hook, &second.bytes());
        assert_eq!(out.verdict, Verdict::Pass);
        let l4 = second.l4_offset();
        let port = u16::from_be_bytes([out.output[l4], out.output[l4 + 1]]);
        assert!(port != 62000 && (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&port), "{hook:?}: source port {port}");
        let expected = second.clone().with_dst("10.244.1.2:8080").with_src(&format!("192.168.0.1:{port}"));
        assert_eq!(out.output, expected.bytes(), "{hook:?}: exact apart from the chosen port");
        let reply = Frame::tcp_syn_ack("10.244.1.2:8080", &format!("192.168.0.1:{port}"));
        let back = fixture.run(hook, &reply.bytes());
        assert_eq!(back.output, reply.clone().with_src("192.168.0.1:30080").with_dst("10.0.0.3:62000").bytes(), "{hook:?}");
    }
}

/// Without a node address configured, traffic that needs source NAT is
/// dropped (and counted), not sent out with the client's address.
#[test]
fn source_nat_without_a_node_address_drops() {
    let fixture = Fixture::new(&external_services());
    let syn = Frame::tcp_syn("10.0.0.2:62000", "192.168.0.1:30080");
    let before = fixture.reason_totals()[Reason::DropNoSnatPort as usize];
    assert_eq!(fixture.run(Hook::Xdp, &syn.bytes()).verdict, Verdict::Drop);
    assert_eq!(fixture.reason_totals()[Reason::DropNoSnatPort as usize], before + 1);
}

/// sessionAffinity ClientIP: a client's new connections all reach the
/// backend its first one got, other clients still spread, and once that
/// backend leaves (or only drains) the client gets a new one and sticks to
/// it.
#[test]
fn session_affinity_keeps_a_client_on_one_backend_while_it_serves() {
    for hook in [Hook::Xdp, Hook::Tc] {
        let backends: Vec<([u8; 4], u16)> = (1..=3).map(|i| ([10, 244, i, 2], 8080)).collect();
        let sticky = |backends: &[([u8; 4], u16)]| {
            let (name, port) = service("web", [10, 96, 0, 10], 80, Protocol::Tcp, backends);
            desired([(name, ServicePort { affinity_seconds: 100, ..port })])
        };
        let mut fixture = Fixture::new(&sticky(&backends));
        let backend_of = |fixture: &Fixture, client: &str, port: u16| -> [u8; 4] {
            let out = fixture.run(hook, &Frame::tcp_syn(&format!("{client}:{port}"), "10.96.0.10:80").bytes());
            out.output[30..34].try_into().expect("an address")
        };
        let first = backend_of(&fixture, "10.0.0.2", 40000);
        for port in 40001..40015 {
            assert_eq!(backend_of(&fixture, "10.0.0.2", port), first, "{hook:?}: 15 connections, one backend");
        }
        let others: BTreeSet<[u8; 4]> = (2..40).map(|i| backend_of(&fixture, &format!("10.0.1.{i}"), 40000)).collect();
        assert_eq!(others.len(), 3, "{hook:?}: other clients still spread over every backend");

        // Its backend leaves: the next connection goes elsewhere, and sticks there.
        let rest: Vec<_> = backends.iter().copied().filter(|(ip, _)| *ip != first).collect();
        fixture.program(&sticky(&rest));
        let second = backend_of(&fixture, "10.0.0.2", 41000);
        assert_ne!(second, first, "{hook:?}: an affinity whose backend left is dropped");
        for port in 41001..41010 {
            assert_eq!(backend_of(&fixture, "10.0.0.2", port), second, "{hook:?}: the new affinity holds");
        }

        // Its backend terminates (drains): no new connection goes there.
        let serving: Vec<_> = rest.iter().copied().filter(|(ip, _)| *ip != second).collect();
        let mut draining = sticky(&serving);
        for port in draining.services.values_mut() {
            port.draining.insert(Endpoint { ip: second.into(), port: 8080 });
        }
        fixture.program(&draining);
        let third = backend_of(&fixture, "10.0.0.2", 42000);
        assert!(third != second && third != first, "{hook:?}: not to a draining backend");
    }
}

/// Short UDP flows (DNS) churning through more entries than the table holds
/// do not push out an idle TCP connection: TCP and UDP have a conntrack
/// table each. With one shared LRU table the TCP flow's entries would be
/// the least recently used and go, and its next packet would be placed
/// afresh.
#[test]
fn udp_churn_does_not_evict_an_idle_tcp_connection() {
    lb_tests::fixture::pin_to_one_cpu();
    let fixture = Fixture::new(&desired([
        service("web", [10, 96, 0, 10], 80, Protocol::Tcp, &[(BACKEND, 8080)]),
        service("dns", [10, 96, 0, 53], 53, Protocol::Udp, &[(BACKEND, 5353)]),
    ]));
    let syn = Frame::tcp_syn("10.0.0.2:40000", "10.96.0.10:80");
    assert_eq!(fixture.run(Hook::Xdp, &syn.bytes()).verdict, Verdict::Pass);
    assert_eq!(fixture.run(Hook::Xdp, &Frame::tcp_syn_ack("10.244.1.2:8080", "10.0.0.2:40000").bytes()).verdict, Verdict::Pass);

    // Two entries per flow: this many flows fill the UDP table past its size.
    let flows = lb_common::MAX_CONNTRACK_ENTRIES as usize / 2 + 10_000;
    let clients: Vec<Vec<u8>> = (0..=flows / 60_000).map(|i| Frame::udp(&format!("10.1.0.{}:1024", i + 1), "10.96.0.53:53", b"q").bytes_without_udp_checksum()).collect();
    let program = fixture.datapath.xdp_program().expect("xdp program");
    let l4 = Frame::udp("10.1.0.1:1024", "10.96.0.53:53", b"q").l4_offset();
    let mut output = vec![0u8; clients[0].len() + 64];
    for flow in 0..flows {
        let mut query = clients[flow / 60_000].clone();
        query[l4..l4 + 2].copy_from_slice(&(1024 + (flow % 60_000) as u16).to_be_bytes());
        let opts = TestRunOptions { data_in: Some(&query), data_out: Some(&mut output), repeat: 1, ..Default::default() };
        let result = program.test_run(opts).expect("BPF_PROG_TEST_RUN");
        assert_eq!(Hook::Xdp.verdict(result.return_value), Some(Verdict::Pass), "query {flow}");
    }
    let new_udp_flows = fixture.reason_totals()[Reason::ForwardNew as usize];
    assert_eq!(new_udp_flows, flows as u64 + 1, "every query was a new flow (and the SYN)");

    let data = Frame::tcp_data("10.0.0.2:40000", "10.96.0.10:80", b"still there?");
    let before = fixture.reason_totals();
    let out = fixture.run(Hook::Xdp, &data.bytes());
    assert_eq!(out.output, data.clone().with_dst("10.244.1.2:8080").bytes());
    let after = fixture.reason_totals();
    assert_eq!(after[Reason::ForwardEstablished as usize], before[Reason::ForwardEstablished as usize] + 1, "the TCP flow is still tracked");
}

/// loadBalancerSourceRanges (10.0.0.0/24) on a Local-policy load balancer
/// IP whose service also has a node port: a client in the range is served,
/// one outside it and a pod are dropped and counted, and the node port is
/// not restricted.
#[test]
fn load_balancer_source_ranges_admit_listed_clients_only() {
    use Expect::*;
    use Verdict::*;
    const RANGED_LB_IP: [u8; 4] = [203, 0, 113, 20];
    let (name, port) = service("ranged", RANGED_LB_IP, 80, Protocol::Tcp, &[(LOCAL_BACKEND, 8080)]);
    let mut external = ServicePort { drop_when_empty: true, source_ranges: [([10, 0, 0, 0].into(), 24)].into(), source_ranged: [RANGED_LB_IP.into()].into(), ..port };
    external.frontends.insert(lb_userspace::model::Frontend { ip: NODE_IP.into(), port: 30090, protocol: Protocol::Tcp });
    let mut state = external_services();
    state.services.insert(name.to_external(), external);
    let allowed = Frame::tcp_syn("10.0.0.2:40030", "203.0.113.20:80");
    let outside = Frame::tcp_syn("10.0.1.2:40031", "203.0.113.20:80");
    let pod = Frame::tcp_syn("10.244.2.7:40032", "203.0.113.20:80");
    let node_port = Frame::tcp_syn("10.0.1.2:40033", "192.168.0.1:30090");
    let cases = || vec![
        case("in a source range: served, client kept (Local)", allowed.bytes(), Pass, Bytes(allowed.clone().with_dst("10.244.1.3:8080").bytes()), Reason::ForwardNew),
        case("outside every source range: dropped", outside.bytes(), Drop, Unchanged, Reason::DropSourceRange),
        case("a pod outside every source range: dropped too", pod.bytes(), Drop, Unchanged, Reason::DropSourceRange),
        case("the same service's node port: not restricted", node_port.bytes(), Pass, Bytes(node_port.clone().with_dst("10.244.1.3:8080").bytes()), Reason::ForwardNew),
    ];
    for hook in [Hook::Xdp, Hook::Tc] {
        let mut fixture = node_fixture();
        fixture.program(&state);
        let failures = check_cases(&fixture, hook, cases());
        assert!(failures.is_empty(), "{hook:?}: {} failures:\n{}", failures.len(), failures.join("\n"));
    }
}

/// `--masquerade-all`: a pod's new connection to a cluster IP gets the node
/// as its source too, and its reply goes back to the pod.
#[test]
fn masquerade_all_translates_pods_to_cluster_ips() {
    use Expect::*;
    use Verdict::*;
    let syn = Frame::tcp_syn("10.244.2.7:62020", "10.96.0.21:80");
    let syn_ack = Frame::tcp_syn_ack("10.244.1.2:8080", "192.168.0.1:62020");
    let cases = || {
        vec![
            case("a pod to a cluster IP: from the node", syn.bytes(), Pass, Bytes(syn.clone().with_dst("10.244.1.2:8080").with_src("192.168.0.1:62020").bytes()), Reason::ForwardNew),
            case("the reply: back to the pod from the cluster IP", syn_ack.bytes(), Pass, Bytes(syn_ack.clone().with_src("10.96.0.21:80").with_dst("10.244.2.7:62020").bytes()), Reason::ReplyTranslated),
        ]
    };
    for hook in [Hook::Xdp, Hook::Tc] {
        let mut fixture = node_fixture();
        let mut config = fixture.datapath.maps.datapath_config.get(&0, 0).expect("config");
        config.flags |= lb_common::DATAPATH_MASQUERADE_ALL;
        fixture.datapath.maps.set_config(config).expect("config");
        let failures = check_cases(&fixture, hook, cases());
        assert!(failures.is_empty(), "{hook:?}: {} failures:\n{}", failures.len(), failures.join("\n"));
    }
}
