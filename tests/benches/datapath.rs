//! `cargo xtask bench`, datapath: nanoseconds per packet through the XDP program.
//!
//! Measured in the kernel by BPF_PROG_TEST_RUN, side by side with an empty XDP
//! program (the floor), at 1 and at 10,000 services, and an IPv6 service's
//! established flow and reply beside them.
//!
//! BPF_PROG_TEST_RUN does not reset the packet between repeats, so a DNAT
//! would turn every repeat after the first into non-service traffic. The
//! benchmark services therefore use their own VIP:port as their backend: the
//! translation does all of its work (lookups, membership check, rewrite,
//! checksum update, counters) but writes back the same bytes, and the
//! counters prove that every repeat took the path claimed. New connections
//! cannot repeat (the first creates the flow), so they are timed one run at
//! a time with the flow deleted between runs, against the floor timed the
//! same way.
use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_common::{ConntrackKey, IPPROTO_TCP, Reason};
use lb_tests::{
    fixture::{Fixture, desired},
    packets::Frame,
    packets6::Frame6,
};
use lb_userspace::model::{Endpoint, Frontend, Protocol, ServicePort, ServicePortName};

const REPEAT: u32 = 1_000_000;
const ROUNDS: usize = 11;
const SINGLE_RUNS: usize = 20_000;
const CLIENT: &str = "10.0.0.2:40000";
const CLIENT6: &str = "[fd00:10::2]:40000";
const VIP6: &str = "[fd00:96::1]:80";
/// The IPv6 service's id and backend set, far above the IPv4 services'.
const IPV6_SERVICE_ID: u32 = 60_000;

fn vip(index: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + index + 1)
}

/// `count` services, each with its own VIP:80 as its only backend.
fn fixture(count: u32) -> Fixture {
    let services = (0..count).map(|i| {
        let name = ServicePortName::new("bench", &format!("svc-{i}"), "http");
        let service = ServicePort {
            frontends: [Frontend { ip: vip(i).into(), port: 80, protocol: Protocol::Tcp }].into(),
            endpoints: [Endpoint { ip: vip(i).into(), port: 80 }].into(),
            ..ServicePort::default()
        };
        (name, service)
    });
    Fixture::new(&desired(services))
}

fn run(program: &Xdp, input: &[u8], repeat: u32) -> Result<(Duration, Vec<u8>, u32)> {
    let mut output = vec![0u8; input.len() + 64];
    let result = program.test_run(TestRunOptions { data_in: Some(input), data_out: Some(&mut output), repeat, ..Default::default() })?;
    output.truncate(result.data_size_out as usize);
    Ok((result.duration, output, result.return_value))
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

struct Row {
    case: &'static str,
    ns: f64,
    /// Median over rounds of this case's time divided by the floor's,
    /// measured right before it.
    ratio: f64,
    proof: String,
}

struct Repeated<'a> {
    case: &'static str,
    input: &'a [u8],
    reason: Reason,
}

/// Times each case with `REPEAT` repeats, round by round: in every round
/// each case runs right after the floor, so a noisy moment of the shared
/// machine hits both sides of a ratio alike. Checks that every repeat did
/// its work: the packet is unchanged (so the next repeat takes the same
/// path) and the case's verdict counter grew by exactly `REPEAT`.
fn measure_repeated(fx: &Fixture, floor: &Xdp, cases: &[Repeated]) -> Result<Vec<Row>> {
    let program = fx.datapath.xdp_program()?;
    let mut ns = vec![Vec::new(); cases.len() + 1];
    let mut ratios = vec![Vec::new(); cases.len() + 1];
    for _ in 0..ROUNDS {
        for (i, case) in cases.iter().enumerate() {
            let floor_ns = run(floor, case.input, REPEAT)?.0.as_nanos() as f64;
            let before = fx.reason_totals()[case.reason as usize];
            let (per_run, output, code) = run(program, case.input, REPEAT)?;
            let after = fx.reason_totals()[case.reason as usize];
            ensure!(code == 2, "{}: XDP returned {code}, expected XDP_PASS", case.case);
            ensure!(output == case.input, "{}: the packet changed, so later repeats took another path", case.case);
            ensure!(
                after - before == u64::from(REPEAT),
                "{}: {} of {REPEAT} repeats counted as {}",
                case.case,
                after - before,
                case.reason.name()
            );
            let case_ns = per_run.as_nanos() as f64;
            ns[0].push(floor_ns);
            ratios[0].push(1.0);
            ns[i + 1].push(case_ns);
            ratios[i + 1].push(case_ns / floor_ns);
        }
    }
    let mut rows = vec![Row { case: "empty XDP program (floor)", ns: median(ns[0].clone()), ratio: 1.0, proof: "-".into() }];
    for (i, case) in cases.iter().enumerate() {
        rows.push(Row {
            case: case.case,
            ns: median(ns[i + 1].clone()),
            ratio: median(ratios[i + 1].clone()),
            proof: format!("{} +{REPEAT} x{ROUNDS}", case.reason.name()),
        });
    }
    Ok(rows)
}

fn flow_keys(frame: &Frame) -> [ConntrackKey; 2] {
    let client = std::net::SocketAddrV4::new(frame.ip.source.into(), 40000);
    let service = std::net::SocketAddrV4::new(frame.ip.destination.into(), 80);
    [ConntrackKey::new(client, service, IPPROTO_TCP), ConntrackKey::new(service, client, IPPROTO_TCP)]
}

/// New connections, one run at a time with the flow deleted in between;
/// returns the median time, the median floor timed the same way, and the
/// proof.
fn measure_new(fx: &mut Fixture, floor: &Xdp, syn: &Frame) -> Result<(f64, f64, String)> {
    let input = syn.bytes();
    let keys = flow_keys(syn);
    let before = fx.reason_totals()[Reason::ForwardNew as usize];
    let (mut lb, mut floor_ns) = (Vec::with_capacity(SINGLE_RUNS), Vec::with_capacity(SINGLE_RUNS));
    for _ in 0..SINGLE_RUNS {
        for key in &keys {
            // Pending after a SYN; confirmed for the warm-up flow the first
            // time round with one service.
            let conntrack = &mut fx.datapath.maps.conntrack;
            if let Some((name, _)) = conntrack.find(key) {
                conntrack.named_mut(name).ok_or_else(|| anyhow::anyhow!("no table {name}"))?.remove(key)?;
            }
        }
        floor_ns.push(run(floor, &input, 1)?.0.as_nanos() as f64);
        let (per_run, output, _) = run(fx.datapath.xdp_program()?, &input, 1)?;
        ensure!(output == input, "new connection: unexpected output");
        lb.push(per_run.as_nanos() as f64);
    }
    let counted = fx.reason_totals()[Reason::ForwardNew as usize] - before;
    ensure!(counted == SINGLE_RUNS as u64, "new connection: {counted} of {SINGLE_RUNS} runs counted as forward_new");
    Ok((median(lb), median(floor_ns), format!("forward_new +1 x{SINGLE_RUNS}")))
}

fn bench_scale(services: u32, floor: &Xdp) -> Result<Vec<Row>> {
    eprintln!("==> {services} services: programming and warming the conntrack table");
    let mut fx = fixture(services);
    // One established flow per service (SYN, then the SYN-ACK that
    // confirms it), so the tables are as full as the scale says.
    for i in 0..services {
        let service = format!("{}:80", vip(i));
        for packet in [Frame::tcp_syn(CLIENT, &service), Frame::tcp_syn_ack(&service, CLIENT)] {
            let out = fx.run(lb_tests::fixture::Hook::Xdp, &packet.bytes());
            if out.output != packet.bytes() {
                bail!("warm-up flow to service {i} was not translated in place");
            }
        }
    }
    // One IPv6 service beside them, its own address its backend too, with
    // an established flow: the IPv6 path's cost next to the IPv4 one's.
    let vip6 = lb_tests::packets6::addr6(VIP6);
    fx.program_ipv6_frontend(IPV6_SERVICE_ID, vip6, IPPROTO_TCP, &[vip6], 0);
    for packet in [Frame6::tcp_syn(CLIENT6, VIP6), Frame6::tcp_syn_ack(VIP6, CLIENT6)] {
        let out = fx.run(lb_tests::fixture::Hook::Xdp, &packet.bytes());
        if out.output != packet.bytes() {
            bail!("warm-up flow to the IPv6 service was not translated in place");
        }
    }
    let established6 = Frame6::tcp_data(CLIENT6, VIP6, b"payload").bytes();
    let reply6 = Frame6::tcp_data(VIP6, CLIENT6, b"payload").bytes();
    let target = vip(services - 1);
    let pass = Frame::tcp_data(CLIENT, "10.0.0.3:80", b"payload").bytes();
    let established = Frame::tcp_data(CLIENT, &format!("{target}:80"), b"payload").bytes();
    let reply = Frame::tcp_data(&format!("{target}:80"), CLIENT, b"payload").bytes();

    eprintln!("==> {services} services: {ROUNDS} rounds of {REPEAT} repeats per case");
    let mut rows = measure_repeated(
        &fx,
        floor,
        &[
            Repeated { case: "non-service pass-through", input: &pass, reason: Reason::PassNotService },
            Repeated { case: "established-flow forward", input: &established, reason: Reason::ForwardEstablished },
            Repeated { case: "reply reverse-NAT", input: &reply, reason: Reason::ReplyTranslated },
            Repeated { case: "IPv6 established-flow forward", input: &established6, reason: Reason::ForwardEstablished },
            Repeated { case: "IPv6 reply reverse-NAT", input: &reply6, reason: Reason::ReplyTranslated },
        ],
    )?;

    eprintln!("==> {services} services: new connections ({SINGLE_RUNS} single runs)");
    let new_target = vip(services / 2);
    let syn = Frame::tcp_syn(CLIENT, &format!("{new_target}:80"));
    let (ns, single_floor, proof) = measure_new(&mut fx, floor, &syn)?;
    rows.push(Row { case: "empty XDP program, single run", ns: single_floor, ratio: 1.0, proof: "-".into() });
    rows.push(Row { case: "new connection, single run", ns, ratio: ns / single_floor, proof });
    Ok(rows)
}

/// The empty XDP program, loaded from its own object (no agent loads it).
fn load_floor() -> Result<aya::Ebpf> {
    let object = lb_userspace::BENCH_FLOOR_OBJECT;
    ensure!(!object.is_empty(), "no benchmark floor object: lb-userspace was built from LB_EBPF_OBJECT without an lb-bench-floor object beside it");
    let mut ebpf = aya::Ebpf::load(object).context("loading the benchmark floor object")?;
    let floor: &mut Xdp = ebpf.program_mut(lb_common::PROG_XDP_FLOOR).context("no floor program in its object")?.try_into()?;
    floor.load().context("loading the floor program")?;
    Ok(ebpf)
}

fn main() -> Result<()> {
    let floor_object = load_floor()?;
    let floor: &Xdp = floor_object.program(lb_common::PROG_XDP_FLOOR).context("no floor program")?.try_into()?;
    let mut table = Vec::new();
    for services in [1, 10_000] {
        for row in bench_scale(services, floor)? {
            table.push((services, row));
        }
    }
    println!("\n| services | case | ns/packet | x floor | every run did the work (counter delta) |");
    println!("|---:|---|---:|---:|---|");
    for (services, row) in &table {
        println!("| {services} | {} | {:.1} | {:.2} | {} |", row.case, row.ns, row.ratio, row.proof);
    }
    let ratio_of = |services: u32, case: &str| table.iter().find(|(s, r)| *s == services && r.case == case).map(|(_, r)| r.ratio).unwrap_or(f64::NAN);
    println!("\ngrowth from 1 to 10,000 services (ratio to the floor at 10,000 / at 1):");
    for case in ["non-service pass-through", "established-flow forward", "reply reverse-NAT", "IPv6 established-flow forward", "IPv6 reply reverse-NAT", "new connection, single run"] {
        println!("  {case}: {:.2}x", ratio_of(10_000, case) / ratio_of(1, case));
    }
    Ok(())
}
