//! A loaded datapath to run packets through, with services programmed by the real syncer.
//!
//! Packets go through either hook by BPF_PROG_TEST_RUN.
use std::net::{Ipv4Addr, SocketAddrV6};

use aya::programs::{TestRun, TestRunOptions};
use lb_common::{
    Backend, BackendSetMemberKey, BackendSlotKey, FRONTEND_SNAT, FrontendKey, FrontendValue, Ipv6, Reason, VIP_CLUSTER_IP, VipValue,
};
use lb_userspace::{
    datapath::Datapath,
    model::{DesiredState, Endpoint, Frontend, Protocol, ServicePort, ServicePortName},
    sync::Syncer,
};

/// Which program a packet goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    Tc,
}

/// What the hook does with the packet, independent of the hook's codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
    /// Sent back out of the interface it came in on.
    Bounce,
}

impl Hook {
    pub fn verdict(self, code: u32) -> Option<Verdict> {
        match (self, code) {
            (Hook::Xdp, 2) | (Hook::Tc, 0) => Some(Verdict::Pass),
            (Hook::Xdp, 1) | (Hook::Tc, 2) => Some(Verdict::Drop),
            (Hook::Xdp, 3) | (Hook::Tc, 7) => Some(Verdict::Bounce),
            _ => None,
        }
    }
}

pub struct Fixture {
    pub datapath: Datapath,
    pub syncer: Syncer,
}

pub struct RunResult {
    pub verdict: Verdict,
    pub output: Vec<u8>,
}

impl Fixture {
    pub fn new(desired: &DesiredState) -> Self {
        let datapath = Datapath::load().expect("loading the datapath (needs root)");
        let mut fixture = Self { datapath, syncer: Syncer::new() };
        fixture.program(desired);
        fixture
    }

    pub fn program(&mut self, desired: &DesiredState) {
        self.syncer.apply(desired, &mut self.datapath.maps).expect("programming the maps");
    }

    /// An IPv6 frontend `address`:`port` of service `id` (below the ids the
    /// syncer hands out to this fixture's IPv4 services, which start at 0:
    /// give ids from the top), whose backend set, also `id`, holds
    /// `backends`: written into the IPv6 maps directly, as the agent's
    /// syncer does not program IPv6 services yet. `flags` are
    /// `FRONTEND_*`; without `FRONTEND_SNAT` the address is a cluster IP.
    pub fn program_ipv6_frontend(&mut self, id: u32, frontend: SocketAddrV6, proto: u8, backends: &[SocketAddrV6], flags: u32) {
        let v6 = &mut self.datapath.maps.ipv6;
        for (slot, backend) in backends.iter().enumerate() {
            let backend = Backend { ip: Ipv6::new(*backend.ip()), port: backend.port().to_be(), _pad: 0, _pad_v6: 0 };
            v6.backend_slots.insert(BackendSlotKey { backend_set: id, slot: slot as u32 }, backend, 0).expect("an IPv6 backend slot");
            v6.backend_set_members.insert(BackendSetMemberKey::new(id, backend), slot as u32, 0).expect("an IPv6 set member");
        }
        self.datapath.maps.service_backend_sets.set(id, id, 0).expect("the service's backend set");
        let ip = Ipv6::new(*frontend.ip());
        let key = FrontendKey { ip, port: frontend.port().to_be(), proto, _pad: 0, _pad_v6: 0 };
        let value = FrontendValue {
            service_id: id,
            backend_set: id,
            backend_count: backends.len() as u32,
            flags,
            affinity_seconds: 0,
            _pad_v6: 0,
            in_cluster_ip: Ipv6::default(),
            in_cluster_port: 0,
            _pad: 0,
            _pad_v6_end: 0,
        };
        v6.frontends.insert(key, value, 0).expect("an IPv6 frontend");
        let frontends = v6.service_vips.get(&ip, 0).map_or(0, |v| v.frontends);
        let vip = VipValue { frontends: frontends + 1, flags: if flags & FRONTEND_SNAT == 0 { VIP_CLUSTER_IP } else { 0 } };
        v6.service_vips.insert(ip, vip, 0).expect("an IPv6 service address");
    }

    /// Runs one packet through the hook's program once.
    pub fn run(&self, hook: Hook, input: &[u8]) -> RunResult {
        self.try_run(hook, input).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like `run`, with the kernel's refusal as an error.
    pub fn try_run(&self, hook: Hook, input: &[u8]) -> Result<RunResult, String> {
        let mut output = vec![0u8; input.len() + 256];
        let opts = TestRunOptions { data_in: Some(input), data_out: Some(&mut output), repeat: 1, ..Default::default() };
        let result = match hook {
            Hook::Xdp => self.datapath.xdp_program().expect("xdp program").test_run(opts),
            Hook::Tc => self.datapath.tc_program().expect("tc program").test_run(opts),
        }
        .map_err(|e| format!("BPF_PROG_TEST_RUN on {hook:?}: {e:?}"))?;
        output.truncate(result.data_size_out as usize);
        let verdict = hook
            .verdict(result.return_value)
            .ok_or_else(|| format!("{hook:?} returned unexpected code {}", result.return_value))?;
        Ok(RunResult { verdict, output })
    }

    pub fn reason_totals(&self) -> [u64; Reason::COUNT as usize] {
        self.datapath.maps.verdict_totals().expect("reading verdict counters")
    }

    pub fn service_id(&self, namespace: &str, name: &str, port: &str) -> u32 {
        let key = ServicePortName::new(namespace, name, port);
        self.syncer.service_id(&key).unwrap_or_else(|| panic!("{key} is not programmed"))
    }
}

/// A service port in the "default" namespace with one frontend.
pub fn service(name: &str, vip: [u8; 4], port: u16, protocol: Protocol, endpoints: &[([u8; 4], u16)]) -> (ServicePortName, ServicePort) {
    (
        ServicePortName::new("default", name, &port.to_string()),
        ServicePort {
            frontends: [Frontend { ip: Ipv4Addr::from(vip).into(), port, protocol }].into(),
            endpoints: endpoints.iter().map(|&(ip, port)| Endpoint { ip: ip.into(), port }).collect(),
            ..ServicePort::default()
        },
    )
}

pub fn desired(services: impl IntoIterator<Item = (ServicePortName, ServicePort)>) -> DesiredState {
    DesiredState { services: services.into_iter().collect() }
}

/// Pins the calling thread to one CPU: with per-CPU LRU lists a table
/// evicts from the list of the CPU that inserts, so the flows of a test
/// must all be recorded on one CPU to compete.
pub fn pin_to_one_cpu() {
    lb_userspace::conntrack::pin_thread_to_cpu(0).expect("pinning the test to CPU 0");
}
