//! Garbage collection: expired entries deleted and the rest counted; a SYN flood evicts no established flow.
use aya::programs::{TestRun, TestRunOptions};

use lb_common::{MAP_CONNTRACK_TCP, Reason};
use lb_tests::{
    fixture::{Fixture, Hook, Verdict, desired, service},
    packets::Frame,
};
use lb_userspace::{conntrack::now_ticks, model::Protocol};

use crate::{DNS, WEB, entry, services, set_expires};

/// A SYN flood never evicts an established connection: connections not
/// answered yet wait in their own table (`CONNTRACK_TCP_PENDING`), so more
/// new flows than this CPU's share of the TCP table (all recorded on one
/// CPU, which evicts from its own LRU list) leave an idle established flow
/// in place; the pressure shows in the garbage collector's figures, the
/// pending table at its CPU share.
#[test]
fn a_syn_flood_does_not_evict_an_idle_established_connection() {
    use lb_common::{MAP_CONNTRACK_TCP_PENDING, MAX_CONNTRACK_ENTRIES, MAX_PENDING_ENTRIES};
    lb_tests::fixture::pin_to_one_cpu();
    let fixture = Fixture::new(&desired([service("web", [10, 96, 0, 10], 80, Protocol::Tcp, &[([10, 244, 1, 2], 8080)])]));
    let syn = Frame::tcp_syn("10.0.0.2:40000", "10.96.0.10:80");
    assert_eq!(fixture.run(Hook::Xdp, &syn.bytes()).verdict, Verdict::Pass);
    assert_eq!(fixture.run(Hook::Xdp, &Frame::tcp_syn_ack("10.244.1.2:8080", "10.0.0.2:40000").bytes()).verdict, Verdict::Pass);

    let cpus = aya::util::nr_cpus().expect("possible CPUs") as u32;
    let share = MAX_CONNTRACK_ENTRIES / cpus;
    // Two entries per flow: more flows than this CPU's share of the TCP table.
    let flows = (share / 2 + 10_000) as usize;
    let program = fixture.datapath.xdp_program().expect("xdp program");
    let mut output = vec![0u8; 256];
    for flow in 0..flows {
        // Spoofed sources: 60,000 ports from each of as many addresses as it takes.
        let client = format!("10.1.0.{}:{}", flow / 60_000 + 1, 1024 + flow % 60_000);
        let bytes = Frame::tcp_syn(&client, "10.96.0.10:80").bytes();
        let opts = TestRunOptions { data_in: Some(&bytes), data_out: Some(&mut output), repeat: 1, ..Default::default() };
        let result = program.test_run(opts).expect("BPF_PROG_TEST_RUN");
        assert_eq!(Hook::Xdp.verdict(result.return_value), Some(Verdict::Pass), "SYN {flow}");
    }
    assert_eq!(fixture.reason_totals()[Reason::ForwardNew as usize], flows as u64 + 1, "every SYN was a new flow");

    let data = Frame::tcp_data("10.0.0.2:40000", "10.96.0.10:80", b"still there?");
    let before = fixture.reason_totals();
    let out = fixture.run(Hook::Xdp, &data.bytes());
    assert_eq!(out.output, data.clone().with_dst("10.244.1.2:8080").bytes(), "the idle connection reaches its backend");
    let after = fixture.reason_totals();
    assert_eq!(after[Reason::ForwardEstablished as usize], before[Reason::ForwardEstablished as usize] + 1, "and is still tracked");

    let pass = collect(&fixture);
    let live = |table: &str| pass.tables.iter().find(|(name, _)| *name == table).map_or(0, |(_, n)| *n);
    let pending_share = u64::from(MAX_PENDING_ENTRIES / cpus);
    println!(
        "{flows} SYNs on one CPU: pending table {} entries (its CPU share {pending_share}), TCP table {}",
        live(MAP_CONNTRACK_TCP_PENDING),
        live(MAP_CONNTRACK_TCP)
    );
    assert!(live(MAP_CONNTRACK_TCP_PENDING) >= pending_share * 9 / 10, "the flood fills the pending table: {:?}", pass.tables);
    assert_eq!(live(MAP_CONNTRACK_TCP), 2, "only the established connection is confirmed: {:?}", pass.tables);
    let syn_sent = pass.entries.iter().find(|(p, s, _)| *p == "TCP" && *s == "syn_sent").map_or(0, |e| e.2);
    assert!(syn_sent >= pending_share * 9 / 10, "the pressure shows as syn_sent entries: {:?}", pass.entries);
}

/// The agent's garbage collection deletes the entries that expired and only
/// those, and counts the live ones by table and state: one TCP and one UDP
/// flow expired, one of each still live.
#[test]
fn garbage_collection_deletes_expired_entries_and_counts_the_rest() {
    let mut fixture = Fixture::new(&services());
    let (expired, live) = ("10.0.0.2:40000", "10.0.0.2:40001");
    for svc in [WEB, DNS] {
        svc.open(&fixture, Hook::Xdp, expired);
        svc.open(&fixture, Hook::Xdp, live);
        set_expires(&mut fixture, &svc.forward_key(expired), now_ticks() - 1);
        set_expires(&mut fixture, &svc.reply_key(expired), now_ticks() - 1);
    }
    let pass = collect(&fixture);
    assert_eq!(pass.deleted, 4, "both entries of both expired flows");
    for svc in [WEB, DNS] {
        for (what, key, alive) in [
            ("expired forward", svc.forward_key(expired), false),
            ("expired reply", svc.reply_key(expired), false),
            ("live forward", svc.forward_key(live), true),
            ("live reply", svc.reply_key(live), true),
        ] {
            assert_eq!(entry(&fixture, &key).is_some(), alive, "{} {what}", svc.name());
        }
    }
    let count = |protocol: &str, state: &str| pass.entries.iter().find(|(p, s, _)| *p == protocol && *s == state).map_or(0, |e| e.2);
    assert_eq!((count("TCP", "established"), count("UDP", "udp_answered")), (2, 2), "live entries by state: {:?}", pass.entries);
    assert_eq!(pass.tables.iter().map(|(_, n)| n).sum::<u64>(), 4, "live entries by table: {:?}", pass.tables);
}

/// One garbage collection pass over the fixture's tables, as the agent's
/// collector makes over the pinned ones.
fn collect(fixture: &Fixture) -> lb_userspace::conntrack::GcPass {
    use lb_common::{MAP_CONNTRACK_TCP_PENDING, MAX_CONNTRACK_ENTRIES, MAX_PENDING_ENTRIES};
    use lb_userspace::{conntrack::{Table, collect_tables}, maps::table_fd};
    let tables: Vec<Table<'_>> = fixture
        .datapath
        .maps
        .conntrack
        .tables()
        .into_iter()
        .map(|(name, proto, table)| Table {
            name,
            proto,
            fd: table_fd(table),
            capacity: if name == MAP_CONNTRACK_TCP_PENDING { MAX_PENDING_ENTRIES } else { MAX_CONNTRACK_ENTRIES },
            ipv6: false,
        })
        .collect();
    collect_tables(&tables, now_ticks()).expect("a collection pass")
}
