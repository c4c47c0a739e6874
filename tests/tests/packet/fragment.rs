//! Packet cases for IP fragments.
//!
//! The first, which carries the ports, follows its flow; a later one to a
//! service whose first was never seen cannot be placed.
use lb_common::Reason;
use lb_tests::{
    fixture::Verdict::{Drop, Pass},
    packets::Frame,
};

use crate::{
    Expect::{Bytes, Unchanged},
    case, edited,
    fixtures::{CLUSTER, WEB, web_connection},
    packet_cases, set_u16,
};

/// Sets "more fragments".
fn first_fragment(b: &mut [u8]) {
    b[20] |= 0x20;
}

packet_cases! { CLUSTER;
    /// The first fragment of a tracked flow: translated like its other
    /// packets.
    first_fragment_of_a_tracked_flow_is_translated => {
        let syn = Frame::tcp_syn("10.0.0.2:40600", "10.96.0.10:80");
        let out = syn.clone().with_dst("10.244.1.2:8080");
        case(edited(syn.bytes(), |b| first_fragment(b)), Pass, Bytes(edited(out.bytes(), |b| first_fragment(b))), Reason::ForwardEstablished)
            .after(web_connection("10.0.0.2:40600"))
            .counts(WEB, [1, 0, 0])
    };
    /// A later fragment to a service, its first never seen: dropped.
    later_fragment_without_its_first_is_dropped => {
        let query = Frame::udp("10.0.0.2:40601", "10.96.0.10:53", b"query");
        case(edited(query.bytes(), |b| set_u16(b, 20, 0x0010)), Drop, Unchanged, Reason::DropFragment)
    };
    /// A fragment not to a service: unchanged.
    fragment_elsewhere_is_unchanged => {
        case(edited(Frame::tcp_syn("10.0.0.2:40602", "10.0.0.3:80").bytes(), |b| first_fragment(b)), Pass, Unchanged, Reason::PassNotService)
    };
}
