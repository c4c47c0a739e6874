//! Packet cases on balancing and conntrack that need a fixture of their own.
//!
//! Each reprograms the services or fills a table: established flows keep their
//! backend, new ones spread, session affinity, and UDP churn beside an idle TCP
//! connection.
use std::collections::BTreeSet;

use aya::programs::{TestRun, TestRunOptions};
use lb_common::Reason;
use lb_tests::{
    fixture::{Fixture, Hook, Verdict, desired, service},
    packets::Frame,
};
use lb_userspace::model::{Endpoint, Protocol, ServicePort};

use crate::fixtures::BACKEND;

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
