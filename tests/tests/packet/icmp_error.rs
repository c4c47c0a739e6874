//! ICMP errors about a tracked flow are translated like the flow's packets; others pass.
//!
//! Both their outer addresses and the packet they quote are translated.
use etherparse::{Icmpv4Type, Ipv4Header, icmpv4::DestUnreachableHeader};
use lb_common::Reason;
use lb_tests::{fixture::Verdict::Pass, packets::Frame};

use crate::{
    Expect::{Bytes, Unchanged},
    case, edited,
    fixtures::{BACKEND, CLUSTER, DNS, WEB, dns_flow, web_connection},
    packet_cases, set_u16,
};

const CLIENT: [u8; 4] = [10, 0, 0, 2];
const ROUTER: [u8; 4] = [192, 168, 1, 254];

fn port_unreachable() -> Icmpv4Type {
    Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port)
}

packet_cases! { CLUSTER;
    /// Fragmentation needed from a router, about a packet sent to the
    /// backend: it quotes the service.
    fragmentation_needed_quotes_the_service => {
        let data = Frame::tcp_data("10.0.0.2:40400", "10.96.0.10:80", b"GET / HTTP/1.0\r\n\r\n");
        let frag_needed = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 });
        let sent = data.clone().with_dst("10.244.1.2:8080");
        case(sent.icmp_error(ROUTER, CLIENT, frag_needed.clone()), Pass, Bytes(data.icmp_error(ROUTER, CLIENT, frag_needed)), Reason::IcmpErrorTranslated)
            .after(web_connection("10.0.0.2:40400"))
            .counts(WEB, [1, 0, 0])
    };
    /// Port unreachable from the backend: it comes from the service and
    /// quotes it.
    port_unreachable_from_the_backend_comes_from_the_service => {
        let query = Frame::udp("10.0.0.2:40401", "10.96.0.10:53", b"query");
        let sent = query.clone().with_dst("10.244.1.2:5353");
        case(sent.icmp_error(BACKEND, CLIENT, port_unreachable()), Pass, Bytes(query.icmp_error([10, 96, 0, 10], CLIENT, port_unreachable())), Reason::IcmpErrorTranslated)
            .after(dns_flow("10.0.0.2:40401"))
            .counts(DNS, [1, 0, 0])
    };
    /// An ICMP error from the client about a reply: it goes to the backend
    /// and quotes it.
    error_from_the_client_goes_to_the_backend => {
        let answer = Frame::udp("10.244.1.2:5353", "10.0.0.2:40402", b"answer");
        let received = answer.clone().with_src("10.96.0.10:53");
        case(received.icmp_error(CLIENT, [10, 96, 0, 10], port_unreachable()), Pass, Bytes(answer.icmp_error(CLIENT, BACKEND, port_unreachable())), Reason::IcmpErrorTranslated)
            .after(dns_flow("10.0.0.2:40402"))
            .after([answer.bytes()])
            .counts(DNS, [1, 0, 0])
    };
    /// An ICMP error about a flow not tracked: unchanged.
    error_about_an_untracked_flow_is_unchanged => {
        let elsewhere = Frame::udp("10.0.0.2:40403", "10.0.0.3:53", b"query");
        case(elsewhere.icmp_error(ROUTER, CLIENT, port_unreachable()), Pass, Unchanged, Reason::PassNotService)
    };
    /// An ICMP error quoting fewer than the 8 bytes RFC 792 asks for, even
    /// of a tracked flow's packet: unchanged.
    error_quoting_fewer_than_8_bytes_is_unchanged => {
        let sent = Frame::udp("10.0.0.2:40404", "10.96.0.10:53", b"query").with_dst("10.244.1.2:5353");
        let cut = edited(sent.icmp_error(BACKEND, CLIENT, port_unreachable()), |b| {
            b.truncate(b.len() - 4);
            let len = (b.len() - 14) as u16;
            set_u16(b, 16, len);
            let (mut ip, _) = Ipv4Header::from_slice(&b[14..]).expect("an IPv4 header");
            ip.header_checksum = ip.calc_header_checksum();
            b[14..34].copy_from_slice(&ip.to_bytes());
        });
        case(cut, Pass, Unchanged, Reason::PassNotService).after(dns_flow("10.0.0.2:40404"))
    };
}
