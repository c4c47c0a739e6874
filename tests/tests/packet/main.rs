//! Byte-exact datapath tests through BPF_PROG_TEST_RUN.
//!
//! In the shape of kube-proxy's packet-flow tests, each case is an input
//! packet, the expected verdict, the expected output bytes (built by
//! etherparse, so addresses, ports and checksums are checked independently of
//! our code), the verdict reason it must be counted under and how the counters
//! of the services it touches move. Every case runs through both hooks, XDP and
//! tc. Needs root.
//!
//! Each case is its own `#[test]` (`cargo test --test packet -- --exact
//! translate::established_tcp_flow_keeps_its_backend` runs one alone) and
//! sends first the packets that build the flows it needs, from client ports
//! no other case uses: no case relies on another having run.
//!
//! This file is the harness; the cases are grouped by feature in the
//! modules, and the tests that need a fixture of their own (balancing,
//! source NAT) are in `balancing` and `source_nat`.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Mutex, MutexGuard, OnceLock, PoisonError},
};

use etherparse::{SlicedPacket, TransportSlice};
use lb_common::Reason;
use lb_tests::fixture::{Fixture, Hook, Verdict};

mod balancing;
mod fixtures;
mod fragment;
mod icmp_error;
mod ipv6;
mod kube_proxy_flows;
mod malformed;
mod node;
mod not_service;
mod reject;
mod source_nat;
mod translate;

enum Expect {
    Unchanged,
    Bytes(Vec<u8>),
}

struct Case {
    /// Packets sent before the input, each of which must pass: they build
    /// the flows the input belongs to.
    setup: Vec<Vec<u8>>,
    input: Vec<u8>,
    verdict: Verdict,
    output: Expect,
    reason: Reason,
    /// How the input moves each service's counters, by the service's name
    /// as the syncer shows it: (packets, new flows, rejected). Every other
    /// service's must stay where they were.
    counts: BTreeMap<&'static str, [u64; 3]>,
    /// The kernel's test runner refuses to build an skb from an IPv4 frame
    /// whose IP header is cut short (the stack never hands tc one), so such
    /// cases run through XDP only.
    xdp_only: bool,
}

fn case(input: Vec<u8>, verdict: Verdict, output: Expect, reason: Reason) -> Case {
    Case { setup: Vec::new(), input, verdict, output, reason, counts: BTreeMap::new(), xdp_only: false }
}

impl Case {
    /// Sends `packets` first.
    fn after(mut self, packets: impl IntoIterator<Item = Vec<u8>>) -> Self {
        self.setup.extend(packets);
        self
    }

    /// The input moves `service`'s packets, new flows and rejected counters
    /// by these amounts.
    fn counts(mut self, service: &'static str, moves: [u64; 3]) -> Self {
        self.counts.insert(service, moves);
        self
    }

    fn xdp_only(self) -> Self {
        Self { xdp_only: true, ..self }
    }
}

/// Edits a valid frame into a malformed one.
fn edited(bytes: Vec<u8>, edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut bytes = bytes;
    edit(&mut bytes);
    bytes
}

fn set_u16(bytes: &mut [u8], at: usize, value: u16) {
    bytes[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

/// Every programmed service's (packets, new flows, rejected), by name.
fn service_counts(fixture: &Fixture) -> BTreeMap<String, [u64; 3]> {
    let maps = &fixture.datapath.maps;
    fixture
        .syncer
        .programmed_names()
        .map(|name| {
            let id = fixture.syncer.service_id(name).expect("a programmed service has an id");
            let c = maps.service_totals(id).expect("service counters");
            (name.to_string(), [c.packets, c.new_flows, c.rejected])
        })
        .collect()
}

/// Runs `case` on `fixture`; one line per way it went wrong. The counters
/// are read just before and after the input, so the setup packets and other
/// cases' packets on the same fixture do not count, as long as nothing else
/// runs packets through the fixture meanwhile.
fn check(fixture: &Fixture, hook: Hook, case: &Case) -> Vec<String> {
    for (i, packet) in case.setup.iter().enumerate() {
        match fixture.try_run(hook, packet) {
            Ok(result) if result.verdict == Verdict::Pass => {}
            Ok(result) => return vec![format!("{hook:?}: setup packet {i}: verdict {:?}, expected Pass", result.verdict)],
            Err(e) => return vec![format!("{hook:?}: setup packet {i}: {e}")],
        }
    }
    let (before, services_before) = (fixture.reason_totals(), service_counts(fixture));
    let result = match fixture.try_run(hook, &case.input) {
        Ok(result) => result,
        Err(e) => return vec![format!("{hook:?}: {e}")],
    };
    let (after, services_after) = (fixture.reason_totals(), service_counts(fixture));
    let mut failures = Vec::new();
    let expected_output = match &case.output {
        Expect::Unchanged => &case.input,
        Expect::Bytes(bytes) => bytes,
    };
    if result.verdict != case.verdict {
        failures.push(format!("{hook:?}: verdict {:?}, expected {:?}", result.verdict, case.verdict));
    }
    if &result.output != expected_output {
        failures.push(format!("{hook:?}:\n  output   {:02x?}\n  expected {:02x?}", result.output, expected_output));
    }
    let counted: Vec<Reason> = Reason::ALL.into_iter().filter(|r| after[*r as usize] != before[*r as usize]).collect();
    if counted != [case.reason] || after[case.reason as usize] != before[case.reason as usize] + 1 {
        failures.push(format!("{hook:?}: counted under {counted:?}, expected once under {:?}", case.reason));
    }
    for name in case.counts.keys().filter(|name| !services_after.contains_key(**name)) {
        failures.push(format!("{hook:?}: no service {name} is programmed"));
    }
    for (name, after) in &services_after {
        let moved: Vec<u64> = after.iter().zip(&services_before[name]).map(|(a, b)| a - b).collect();
        let expected = case.counts.get(name.as_str()).copied().unwrap_or_default();
        if moved != expected {
            failures.push(format!("{hook:?}: {name} counters (packets, new flows, rejected) moved by {moved:?}, expected {expected:?}"));
        }
    }
    failures
}

/// Runs cases in order on one fixture of the test's own.
fn check_all(fixture: &Fixture, hook: Hook, cases: &[Case]) {
    let failures: Vec<String> = cases.iter().enumerate().flat_map(|(i, case)| check(fixture, hook, case).into_iter().map(move |f| format!("case {i}: {f}"))).collect();
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

/// A fixture per hook, loaded on first use and shared by every case of the
/// process: loading and verifying the programs takes about 20 s in an
/// emulated kernel, too long to pay for each case. One per hook because the
/// hooks share their maps: a flow one hook's run of a case built would be
/// found by the other's. It lives in a static, which needs `Fixture: Send`
/// (a Mutex is Sync only then): the datapath owns its programs and maps by
/// file descriptor, nothing tied to the thread that loaded it.
struct Shared {
    load: fn() -> Fixture,
    xdp: OnceLock<Mutex<Fixture>>,
    tc: OnceLock<Mutex<Fixture>>,
}

impl Shared {
    const fn new(load: fn() -> Fixture) -> Self {
        Self { load, xdp: OnceLock::new(), tc: OnceLock::new() }
    }

    /// The hook's fixture, held for the whole of a case so that its counter
    /// deltas are its own while cargo runs cases on parallel threads. A case
    /// that panicked holding it leaves nothing the others depend on, so a
    /// poisoned lock is taken as it is.
    fn lock(&self, hook: Hook) -> MutexGuard<'_, Fixture> {
        let cell = match hook {
            Hook::Xdp => &self.xdp,
            Hook::Tc => &self.tc,
        };
        cell.get_or_init(|| Mutex::new((self.load)())).lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Runs `case` through both hooks (XDP only for `xdp_only`), each on its
/// hook's shared fixture, and fails with everything that went wrong.
fn run_case(shared: &Shared, case: Case) {
    let mut failures = Vec::new();
    for hook in [Hook::Xdp, Hook::Tc] {
        if case.xdp_only && hook != Hook::Xdp {
            continue;
        }
        // The lock is released before the next hook's is taken: no case
        // holds two, so none waits on another holding the one it wants.
        failures.extend(check(&shared.lock(hook), hook, &case));
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

/// One `#[test]` per case, run on the shared fixture given first, and
/// `cases()`, every case of the module by name, for `cases_share_no_flow`.
/// A case's doc comment says what it shows.
macro_rules! packet_cases {
    ($shared:expr; $($(#[$doc:meta])* $name:ident => $case:expr;)*) => {
        pub(crate) fn cases() -> Vec<(&'static str, crate::Case)> {
            vec![$((stringify!($name), $case)),*]
        }
        $(
            $(#[$doc])*
            #[test]
            fn $name() {
                crate::run_case(&$shared, $case);
            }
        )*
    };
}
pub(crate) use packet_cases;

/// The TCP and UDP ports from the ephemeral range (32768 and above, so the
/// clients' and source NAT's, not the services') in a case's packets.
fn client_ports(case: &Case) -> BTreeSet<u16> {
    let ports = |packet: &Vec<u8>| match SlicedPacket::from_ethernet(packet).ok()?.transport? {
        TransportSlice::Tcp(tcp) => Some([tcp.source_port(), tcp.destination_port()]),
        TransportSlice::Udp(udp) => Some([udp.source_port(), udp.destination_port()]),
        _ => None,
    };
    case.setup.iter().chain([&case.input]).filter_map(ports).flatten().filter(|&port| port >= 32768).collect()
}

/// Cases on one shared fixture must not share a client port: one would find
/// the flows of the other, or its source NAT port taken, and pass or fail
/// by which ran first.
#[test]
fn cases_share_no_flow() {
    let cluster = [translate::cases(), reject::cases(), not_service::cases(), icmp_error::cases(), malformed::cases(), fragment::cases()];
    for (fixture, cases) in [("cluster", cluster.into_iter().flatten().collect()), ("node", node::cases()), ("kube-proxy", kube_proxy_flows::cases()), ("ipv6", ipv6::cases())] {
        let mut owner: BTreeMap<u16, &str> = BTreeMap::new();
        for (name, case) in cases {
            for port in client_ports(&case) {
                if let Some(other) = owner.insert(port, name) {
                    assert_eq!(other, name, "{fixture} fixture: port {port} used by {other} and {name}");
                }
            }
        }
    }
}
