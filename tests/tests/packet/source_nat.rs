//! Source NAT and the settings around it, each test on a fixture of its own.
//!
//! Each fixture holds flows whose ports must collide, or has its configuration
//! changed. The cases: reply clashes, port collisions, no node address,
//! loadBalancerSourceRanges and --masquerade-all.
use lb_common::{Reason, SNAT_PORT_MAX, SNAT_PORT_MIN};
use lb_tests::{
    fixture::{Fixture, Hook, Verdict, service},
    packets::Frame,
};
use lb_userspace::model::{Protocol, ServicePort};

use crate::{
    Expect::{Bytes, Unchanged},
    case, check_all,
    fixtures::{LOCAL_BACKEND, NODE_IP, TWIN, external_services, node_fixture},
};

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

/// loadBalancerSourceRanges (10.0.0.0/24) on a Local-policy load balancer
/// IP whose service also has a node port: a client in the range is served,
/// one outside it and a pod are dropped and counted, and the node port is
/// not restricted.
#[test]
fn load_balancer_source_ranges_admit_listed_clients_only() {
    use Verdict::*;
    const RANGED_LB_IP: [u8; 4] = [203, 0, 113, 20];
    const RANGED: &str = "default/ranged:80/external";
    let (name, port) = service("ranged", RANGED_LB_IP, 80, Protocol::Tcp, &[(LOCAL_BACKEND, 8080)]);
    let mut external = ServicePort { drop_when_empty: true, source_ranges: [([10, 0, 0, 0].into(), 24)].into(), source_ranged: [RANGED_LB_IP.into()].into(), ..port };
    external.frontends.insert(lb_userspace::model::Frontend { ip: NODE_IP.into(), port: 30090, protocol: Protocol::Tcp });
    let mut state = external_services();
    state.services.insert(name.to_external(), external);
    let allowed = Frame::tcp_syn("10.0.0.2:40030", "203.0.113.20:80");
    let outside = Frame::tcp_syn("10.0.1.2:40031", "203.0.113.20:80");
    let pod = Frame::tcp_syn("10.244.2.7:40032", "203.0.113.20:80");
    let node_port = Frame::tcp_syn("10.0.1.2:40033", "192.168.0.1:30090");
    // Each case is a new flow of its own: their order does not matter.
    let cases = [
        // In a source range: served, the client kept (Local).
        case(allowed.bytes(), Pass, Bytes(allowed.clone().with_dst("10.244.1.3:8080").bytes()), Reason::ForwardNew).counts(RANGED, [1, 1, 0]),
        // Outside every source range: dropped.
        case(outside.bytes(), Drop, Unchanged, Reason::DropSourceRange),
        // A pod outside every source range: dropped too.
        case(pod.bytes(), Drop, Unchanged, Reason::DropSourceRange),
        // The same service's node port: not restricted.
        case(node_port.bytes(), Pass, Bytes(node_port.clone().with_dst("10.244.1.3:8080").bytes()), Reason::ForwardNew).counts(RANGED, [1, 1, 0]),
    ];
    for hook in [Hook::Xdp, Hook::Tc] {
        let mut fixture = node_fixture();
        fixture.program(&state);
        check_all(&fixture, hook, &cases);
    }
}

/// `--masquerade-all`: a pod's new connection to a cluster IP gets the node
/// as its source too, and its reply goes back to the pod.
#[test]
fn masquerade_all_translates_pods_to_cluster_ips() {
    use Verdict::*;
    let syn = Frame::tcp_syn("10.244.2.7:62020", "10.96.0.21:80");
    let syn_ack = Frame::tcp_syn_ack("10.244.1.2:8080", "192.168.0.1:62021");
    let cases = [
        // A pod to a cluster IP: from the node.
        case(syn.bytes(), Pass, Bytes(syn.clone().with_dst("10.244.1.2:8080").with_src("192.168.0.1:62020").bytes()), Reason::ForwardNew).counts(TWIN, [1, 1, 0]),
        // The reply, on a flow of its own: back to the pod from the cluster IP.
        case(syn_ack.bytes(), Pass, Bytes(syn_ack.clone().with_src("10.96.0.21:80").with_dst("10.244.2.7:62021").bytes()), Reason::ReplyTranslated)
            .after([Frame::tcp_syn("10.244.2.7:62021", "10.96.0.21:80").bytes()])
            .counts(TWIN, [1, 0, 0]),
    ];
    for hook in [Hook::Xdp, Hook::Tc] {
        let mut fixture = node_fixture();
        let mut config = fixture.datapath.maps.datapath_config.get(&0, 0).expect("config");
        config.flags |= lb_common::DATAPATH_MASQUERADE_ALL;
        fixture.datapath.maps.set_config(config).expect("config");
        check_all(&fixture, hook, &cases);
    }
}
