//! Source NAT ports of node port flows: given back when flows close or expire, kept by flows that took them meanwhile.
use std::collections::BTreeSet;

use lb_common::{
    ConntrackKey, ConntrackValue, DatapathConfig, IPPROTO_TCP, IPPROTO_UDP, Reason, ip_be, lifecycle::state_name,
};
use lb_tests::{
    fixture::{Fixture, Hook, Verdict, desired, service},
    packets::Frame,
};
use lb_userspace::{
    conntrack::now_ticks,
    model::{Protocol, ServicePort, ServicePortName},
};

use crate::{
    DNS, HOOKS, Svc, WEB, endpoint, expect_entry, expect_pass, fin, flow_entries, key, rst, send, set_expires,
};

const NODE_IP: [u8; 4] = [192, 168, 0, 1];
const NODE_PORT: &str = "192.168.0.1:30080";
const UDP_NODE_PORT: &str = "192.168.0.1:30053";
/// A source NAT range of four ports.
const SNAT_PORTS: std::ops::RangeInclusive<u16> = 62_000..=62_003;

/// Node ports 30080 (TCP) and 30053 (UDP) with externalTrafficPolicy
/// Cluster: new flows get the node's address and a port of the range as
/// their source.
fn node_port_fixture() -> Fixture {
    let external = |(name, port): (ServicePortName, ServicePort)| (name.to_external(), ServicePort { snat: true, ..port });
    let mut fixture = Fixture::new(&desired([
        external(service("cluster", NODE_IP, 30080, Protocol::Tcp, &[([10, 244, 1, 2], 8080)])),
        external(service("cluster", NODE_IP, 30053, Protocol::Udp, &[([10, 244, 1, 2], 5353)])),
    ]));
    let config = DatapathConfig {
        snat_ip: ip_be(NODE_IP.into()),
        snat_port_min: *SNAT_PORTS.start(),
        snat_port_max: *SNAT_PORTS.end(),
        ..DatapathConfig::default()
    };
    fixture.datapath.maps.set_config(config).expect("config");
    fixture
}

/// The node port service of `proto`, as the backend sees it from the node.
fn node_port(proto: u8) -> Svc {
    if proto == IPPROTO_TCP {
        Svc { proto, frontend: NODE_PORT, backend: WEB.backend }
    } else {
        Svc { proto, frontend: UDP_NODE_PORT, backend: DNS.backend }
    }
}

/// Opens a source-translated flow from `client` and returns the node's
/// source port it got; checks the output and that the backend's answer
/// goes back to the client.
fn open_translated(fixture: &Fixture, hook: Hook, svc: Svc, client: &str) -> u16 {
    let first = if svc.proto == IPPROTO_TCP { Frame::tcp_syn(client, svc.frontend) } else { svc.request(client) };
    let what = format!("{} flow from {client}", svc.name());
    let (result, reason) = send(fixture, hook, &what, &first.bytes());
    assert_eq!((result.verdict, reason), (Verdict::Pass, Reason::ForwardNew), "{hook:?}: {what}");
    let l4 = first.l4_offset();
    let port = u16::from_be_bytes([result.output[l4], result.output[l4 + 1]]);
    assert!(SNAT_PORTS.contains(&port), "{hook:?}: {what}: source port {port}");
    let node = format!("192.168.0.1:{port}");
    assert_eq!(result.output, first.clone().with_src(&node).with_dst(svc.backend).bytes(), "{hook:?}: {what}: output");
    let answer = if svc.proto == IPPROTO_TCP { Frame::tcp_syn_ack(svc.backend, &node) } else { svc.response(&node) };
    expect_pass(fixture, hook, &format!("{what}: answer"), &answer, &answer.clone().with_src(svc.frontend).with_dst(client), Reason::ReplyTranslated);
    port
}

/// Four clients' flows take the four ports.
fn fill_ports(fixture: &Fixture, hook: Hook, svc: Svc, clients: &[String]) -> Vec<u16> {
    let ports: Vec<u16> = clients.iter().map(|client| open_translated(fixture, hook, svc, client)).collect();
    let distinct: BTreeSet<u16> = ports.iter().copied().collect();
    assert_eq!(distinct, SNAT_PORTS.collect(), "{hook:?} {}: every port of the range, once: {ports:?}", svc.name());
    ports
}

fn expect_no_port(fixture: &Fixture, hook: Hook, svc: Svc, client: &str, what: &str) {
    let first = if svc.proto == IPPROTO_TCP { Frame::tcp_syn(client, svc.frontend) } else { svc.request(client) };
    let (result, reason) = send(fixture, hook, what, &first.bytes());
    assert_eq!((result.verdict, reason), (Verdict::Drop, Reason::DropNoSnatPort), "{hook:?} {}: {what}", svc.name());
}

/// Makes both entries of each source-translated flow (`clients[i]` on the
/// node's port `ports[i]`) expired.
fn expire_translated(fixture: &mut Fixture, svc: Svc, clients: &[String], ports: &[u16]) {
    for (client, port) in clients.iter().zip(ports) {
        set_expires(fixture, &key(client, svc.frontend, svc.proto), now_ticks() - 1);
        set_expires(fixture, &key(svc.backend, &format!("192.168.0.1:{port}"), svc.proto), now_ticks() - 1);
    }
}

fn clients(net: u8) -> Vec<String> {
    (2..6).map(|host| format!("10.0.{net}.{host}:40000")).collect()
}

#[test]
fn closed_flows_free_their_source_nat_ports() {
    for hook in HOOKS {
        let mut fixture = node_port_fixture();
        let web = node_port(IPPROTO_TCP);

        let first = clients(0);
        let ports = fill_ports(&fixture, hook, web, &first);
        expect_no_port(&fixture, hook, web, "10.0.9.9:40000", "a fifth flow while four live flows hold the ports");

        // Two reset by their clients, two closed by both FINs.
        for (i, (client, port)) in first.iter().zip(&ports).enumerate() {
            let node = format!("192.168.0.1:{port}");
            if i < 2 {
                let reset = rst(client, NODE_PORT);
                expect_pass(&fixture, hook, "the client's RST", &reset, &reset.clone().with_src(&node).with_dst(web.backend), Reason::ForwardEstablished);
            } else {
                let client_fin = fin(client, NODE_PORT);
                expect_pass(&fixture, hook, "the client's FIN", &client_fin, &client_fin.clone().with_src(&node).with_dst(web.backend), Reason::ForwardEstablished);
                let backend_fin = fin(web.backend, &node);
                expect_pass(&fixture, hook, "the backend's FIN", &backend_fin, &backend_fin.clone().with_src(NODE_PORT).with_dst(client), Reason::ReplyTranslated);
            }
        }

        // Four new clients take the closed flows' ports (and their replies
        // go to the new clients); a fifth finds them held again.
        let second = clients(1);
        let reused = fill_ports(&fixture, hook, web, &second);
        expect_no_port(&fixture, hook, web, "10.0.9.9:40000", "a fifth flow after the ports were reused");

        // A late RST of a closed flow (a state change, so both of its
        // entries are written) leaves the flow that took its port alone.
        let (old, port) = (&first[2], ports[2]);
        let new = &second[reused.iter().position(|p| *p == port).expect("the port was reused")];
        let node = format!("192.168.0.1:{port}");
        let late = rst(old, NODE_PORT);
        expect_pass(&fixture, hook, "a late RST of a closed flow", &late, &late.clone().with_src(&node).with_dst(web.backend), Reason::ForwardEstablished);
        assert_eq!(state_name(IPPROTO_TCP, expect_entry(&fixture, &key(old, NODE_PORT, IPPROTO_TCP), "the old flow").flow_flags), "reset", "{hook:?}");
        let (_, reply) = flow_entries(&fixture, &key(new, NODE_PORT, IPPROTO_TCP), &format!("{hook:?}: the flow on port {port}"));
        assert_eq!((state_name(IPPROTO_TCP, reply.flow_flags), reply.destination()), ("established", endpoint(new)), "{hook:?}: the port's new flow keeps its state");
        expect_no_port(&fixture, hook, web, "10.0.9.9:40000", "a fifth flow after the late RST");

        // Live flows whose entries expired hold nothing.
        expire_translated(&mut fixture, web, &second, &reused);
        fill_ports(&fixture, hook, web, &clients(2));
        expect_no_port(&fixture, hook, web, "10.0.9.9:40000", "a fifth flow after the expired ports were reused");
    }
}

/// The garbage collector reads a table, then deletes what it found
/// expired. A flow that took one of those tuples in between (here new
/// clients' flows, given the expired flows' source NAT ports, and for TCP
/// answered, so back in the same table) keeps its entries through the
/// deletion, and the backend's answers still reach its client; only the
/// old flows' own entries go.
#[test]
fn a_collection_leaves_alone_the_flows_that_took_expired_tuples_meanwhile() {
    use lb_common::lifecycle::is_alive;
    use lb_userspace::{conntrack, maps::table_fd};
    for hook in HOOKS {
        for proto in [IPPROTO_TCP, IPPROTO_UDP] {
            let mut fixture = node_port_fixture();
            let svc = node_port(proto);
            let old = clients(0);
            let ports = fill_ports(&fixture, hook, svc, &old);
            expire_translated(&mut fixture, svc, &old, &ports);

            let now = now_ticks();
            let read: Vec<(&str, Vec<ConntrackKey>)> = fixture
                .datapath
                .maps
                .conntrack
                .tables()
                .iter()
                .map(|(name, _, table)| {
                    let entries = conntrack::read_all(table_fd(table)).expect("the collector's read");
                    (*name, entries.into_iter().filter(|(_, v)| !is_alive(v.expires, now)).map(|(k, _)| k).collect())
                })
                .collect();
            assert_eq!(read.iter().map(|(_, keys)| keys.len()).sum::<usize>(), 8, "{hook:?} {}: both entries of the four flows read expired", svc.name());

            let new = clients(1);
            let reused = fill_ports(&fixture, hook, svc, &new);
            let mut deleted = 0;
            for (name, keys) in &read {
                let table = fixture.datapath.maps.conntrack.named(name).expect("table");
                deleted += conntrack::delete_if(table_fd(table), keys, |_, v: &ConntrackValue| !is_alive(v.expires, now)).expect("the collector's deletion");
            }
            assert_eq!(deleted, 4, "{hook:?} {}: the old flows' forward entries went, their reply tuples are the new flows'", svc.name());
            for (client, port) in new.iter().zip(&reused) {
                let what = format!("{hook:?} {}: the flow from {client} on port {port} after the collection", svc.name());
                flow_entries(&fixture, &svc.forward_key(client), &what);
                let answer = svc.response(&format!("192.168.0.1:{port}"));
                expect_pass(&fixture, hook, &what, &answer, &answer.clone().with_src(svc.frontend).with_dst(client), Reason::ReplyTranslated);
            }
        }
    }
}

#[test]
fn expired_udp_flows_free_their_source_nat_ports() {
    for hook in HOOKS {
        let mut fixture = node_port_fixture();
        let dns = node_port(IPPROTO_UDP);
        let first = clients(0);
        let ports = fill_ports(&fixture, hook, dns, &first);
        expect_no_port(&fixture, hook, dns, "10.0.9.9:40000", "a fifth UDP flow while four live flows hold the ports");
        expire_translated(&mut fixture, dns, &first, &ports);
        fill_ports(&fixture, hook, dns, &clients(1));
        expect_no_port(&fixture, hook, dns, "10.0.9.9:40000", "a fifth UDP flow after the expired ports were reused");
    }
}
