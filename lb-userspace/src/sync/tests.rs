//! The syncer's tests: what it writes, in what order, and what it adopts.
//!
//! Each change programmed exactly and in a safe order (against an in-memory
//! model of the maps that checks the ordering guarantees), adoption after a
//! restart, capacity, shared frontends.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
};

use super::*;
use crate::model::Protocol;

/// The maps as plain collections, checking at every write that nothing
/// in use points at an incomplete set and nothing in use is deleted.
#[derive(Default)]
struct FakeMaps {
    slots: HashMap<BackendSlotKey, Endpoint>,
    members: HashMap<(u32, Endpoint), u32>,
    frontends: HashMap<Frontend, FrontendEntry>,
    service_sets: HashMap<u32, u32>,
    vips: HashMap<IpAddr, VipValue>,
    names: HashMap<u32, String>,
    source_ranges: BTreeSet<(u32, (IpAddr, u8))>,
    flows_removed_for: Vec<u32>,
    /// Sizes enforced as the kernel does (a write of a new key to a
    /// full map fails); unbounded when `None`. Frontends and addresses are
    /// counted per family, the other maps together.
    limits: Option<Limits>,
}

impl FakeMaps {
    fn sized(limits: Limits) -> Self {
        Self { limits: Some(limits), ..Self::default() }
    }

    /// Fails like a full map when inserting a new key into `map`
    /// (holding `len`) goes past `limit`.
    fn check_room(&self, map: &'static str, len: usize, is_new: bool, limit: fn(&Limits) -> u32) -> Result<()> {
        match self.limits {
            Some(limits) if is_new && len as u32 >= limit(&limits) => Err(Error::Capacity { what: map, limit: limit(&limits) }),
            _ => Ok(()),
        }
    }

    fn in_use(&self, set: u32) -> bool {
        self.frontends.values().any(|f| f.backend_set == set) || self.service_sets.values().any(|&s| s == set)
    }

    fn assert_complete(&self, set: u32, count: u32) {
        for slot in 0..count {
            let b = self.slots.get(&BackendSlotKey { backend_set: set, slot });
            let b = b.unwrap_or_else(|| panic!("set {set} is missing slot {slot}"));
            assert_eq!(self.members.get(&(set, *b)), Some(&slot));
        }
    }
}

impl MapWriter for FakeMaps {
    fn put_backend_slot(&mut self, key: BackendSlotKey, backend: Endpoint) -> Result<()> {
        assert!(!self.in_use(key.backend_set), "a set in use was modified");
        self.check_room("BACKEND_SLOTS", self.slots.len(), !self.slots.contains_key(&key), |l| l.backend_slots)?;
        self.slots.insert(key, backend);
        Ok(())
    }
    fn remove_backend_slot(&mut self, key: BackendSlotKey, backend: Endpoint) -> Result<()> {
        assert!(!self.in_use(key.backend_set), "a set in use was deleted");
        assert_eq!(self.slots.remove(&key).map(|b| IpFamily::of(b.ip)), Some(IpFamily::of(backend.ip)), "removed from its family's map");
        Ok(())
    }
    fn put_set_member(&mut self, backend_set: u32, backend: Endpoint, slot: u32) -> Result<()> {
        assert!(!self.in_use(backend_set), "a set in use was modified");
        let is_new = !self.members.contains_key(&(backend_set, backend));
        self.check_room("BACKEND_SET_MEMBERS", self.members.len(), is_new, |l| l.backend_slots)?;
        self.members.insert((backend_set, backend), slot);
        Ok(())
    }
    fn remove_set_member(&mut self, backend_set: u32, backend: Endpoint) -> Result<()> {
        assert!(!self.in_use(backend_set), "a set in use lost a member");
        self.members.remove(&(backend_set, backend));
        Ok(())
    }
    fn put_service_backend_set(&mut self, service_id: u32, backend_set: u32) -> Result<()> {
        let count = self.slots.keys().filter(|k| k.backend_set == backend_set).count();
        self.assert_complete(backend_set, count as u32);
        self.service_sets.insert(service_id, backend_set);
        Ok(())
    }
    fn put_frontend(&mut self, frontend: Frontend, value: FrontendEntry) -> Result<()> {
        assert!(self.vips.contains_key(&frontend.ip), "frontend written before its address");
        self.assert_complete(value.backend_set, value.backend_count);
        let of_family = self.frontends.keys().filter(|f| IpFamily::of(f.ip) == IpFamily::of(frontend.ip)).count();
        self.check_room("SERVICE_FRONTENDS", of_family, !self.frontends.contains_key(&frontend), |l| l.frontends)?;
        self.frontends.insert(frontend, value);
        Ok(())
    }
    fn remove_frontend(&mut self, frontend: Frontend) -> Result<()> {
        self.frontends.remove(&frontend);
        Ok(())
    }
    fn put_service_vip(&mut self, ip: IpAddr, vip: VipValue) -> Result<()> {
        let of_family = self.vips.keys().filter(|v| IpFamily::of(**v) == IpFamily::of(ip)).count();
        self.check_room("SERVICE_VIPS", of_family, !self.vips.contains_key(&ip), |l| l.addresses)?;
        self.vips.insert(ip, vip);
        Ok(())
    }
    fn remove_service_vip(&mut self, ip: IpAddr) -> Result<()> {
        self.vips.remove(&ip);
        Ok(())
    }
    fn reset_service_counters(&mut self, _: u32) -> Result<()> {
        Ok(())
    }
    fn put_service_name(&mut self, service_id: u32, name: ServiceName) -> Result<()> {
        self.names.insert(service_id, name.as_str().to_owned());
        Ok(())
    }
    fn remove_service_name(&mut self, service_id: u32) -> Result<()> {
        self.names.remove(&service_id);
        Ok(())
    }
    fn put_source_range(&mut self, service_id: u32, range: (IpAddr, u8)) -> Result<()> {
        let is_new = !self.source_ranges.contains(&(service_id, range));
        self.check_room("LB_SOURCE_RANGES", self.source_ranges.len(), is_new, |l| l.source_ranges)?;
        self.source_ranges.insert((service_id, range));
        Ok(())
    }
    fn remove_source_range(&mut self, service_id: u32, range: (IpAddr, u8)) -> Result<()> {
        self.source_ranges.remove(&(service_id, range));
        Ok(())
    }
    fn remove_service_flows(&mut self, service_ids: &BTreeSet<u32>) -> Result<usize> {
        self.flows_removed_for.extend(service_ids);
        Ok(0)
    }
}

impl FakeMaps {
    /// What a restarted agent would read back.
    fn read_back(&self) -> ProgrammedMaps {
        ProgrammedMaps {
            names: self.names.iter().map(|(&id, n)| (id, ServiceName::new(n, lb_common::IPPROTO_TCP))).collect(),
            service_sets: self.service_sets.iter().filter(|&(_, &s)| s != NO_BACKEND_SET).map(|(&i, &s)| (i, s)).collect(),
            frontends: self.frontends.iter().map(|(&k, &v)| (k, v)).collect(),
            vips: self.vips.keys().copied().collect(),
            slots: self.slots.clone(),
            members: self.members.clone(),
            source_ranges: self.source_ranges.iter().copied().collect(),
        }
    }
}

fn name(n: &str) -> ServicePortName {
    ServicePortName::new("default", n, "http")
}

fn service(vip: [u8; 4], port: u16, endpoints: &[u8]) -> ServicePort {
    ServicePort {
        frontends: [Frontend { ip: vip.into(), port, protocol: Protocol::Tcp }].into(),
        endpoints: endpoints.iter().map(|&last| Endpoint { ip: [10, 244, 0, last].into(), port: 8080 }).collect(),
        ..ServicePort::default()
    }
}

fn state(services: &[(&str, ServicePort)]) -> DesiredState {
    DesiredState { services: services.iter().map(|(n, s)| (name(n), s.clone())).collect() }
}

/// The maps hold exactly the desired state: nothing missing, nothing left over.
fn assert_maps_equal(maps: &FakeMaps, syncer: &Syncer, desired: &DesiredState) {
    let mut expected_slots = 0;
    let mut expected_members = 0;
    let mut vips = HashMap::new();
    for (n, s) in &desired.services {
        let id = syncer.service_id(n).expect("programmed");
        for f in &s.frontends {
            let vip = vips.entry(f.ip).or_insert(VipValue { frontends: 0, flags: 0 });
            vip.frontends += 1;
            if !n.external {
                vip.flags = VIP_CLUSTER_IP;
            }
            let value = maps.frontends[f];
            assert_eq!(value.service_id, id);
            let programmed: BTreeSet<Endpoint> =
                (0..value.backend_count).map(|slot| maps.slots[&BackendSlotKey { backend_set: value.backend_set, slot }]).collect();
            assert_eq!(programmed, s.endpoints, "{n}");
            assert_eq!(maps.service_sets[&id], value.backend_set, "{n}: the service's current set");
        }
        expected_slots += s.endpoints.len();
        expected_members += s.endpoints.len() + s.draining.len();
    }
    assert_eq!(maps.frontends.len(), desired.services.values().map(|s| s.frontends.len()).sum::<usize>());
    assert_eq!(maps.slots.len(), expected_slots, "no leftover backend slots");
    assert_eq!(maps.members.len(), expected_members, "no leftover memberships");
    assert_eq!(maps.vips, vips);
    let names: HashMap<u32, String> =
        desired.services.keys().map(|n| (syncer.service_id(n).expect("programmed"), n.to_string())).collect();
    assert_eq!(maps.names, names, "a name per programmed service id");
}

#[test]
fn each_change_is_programmed_exactly_and_in_a_safe_order() {
    let a = service([10, 96, 0, 1], 80, &[1, 2, 3]);
    let cases: Vec<(&str, DesiredState, SyncReport)> = vec![
        ("new service", state(&[("a", a.clone())]), SyncReport { added: 1, ..Default::default() }),
        ("nothing changed", state(&[("a", a.clone())]), SyncReport { unchanged: 1, ..Default::default() }),
        ("endpoint added", state(&[("a", service([10, 96, 0, 1], 80, &[1, 2, 3, 4]))]), SyncReport { updated: 1, ..Default::default() }),
        ("endpoint removed", state(&[("a", service([10, 96, 0, 1], 80, &[2, 3, 4]))]), SyncReport { updated: 1, ..Default::default() }),
        ("all endpoints gone", state(&[("a", service([10, 96, 0, 1], 80, &[]))]), SyncReport { updated: 1, ..Default::default() }),
        ("second service on the same address", state(&[("a", service([10, 96, 0, 1], 80, &[5])), ("b", service([10, 96, 0, 1], 81, &[5]))]), SyncReport { updated: 1, added: 1, ..Default::default() }),
        ("frontend moved", state(&[("a", service([10, 96, 0, 9], 80, &[5])), ("b", service([10, 96, 0, 1], 81, &[5]))]), SyncReport { updated: 1, unchanged: 1, ..Default::default() }),
        ("service removed", state(&[("b", service([10, 96, 0, 1], 81, &[5]))]), SyncReport { removed: 1, unchanged: 1, ..Default::default() }),
        ("everything removed", state(&[]), SyncReport { removed: 1, ..Default::default() }),
    ];
    let mut syncer = Syncer::new();
    let mut maps = FakeMaps::default();
    for (case, desired, expected) in cases {
        let report = syncer.apply(&desired, &mut maps).expect(case);
        assert_eq!(report, expected, "{case}");
        assert_maps_equal(&maps, &syncer, &desired);
    }
    assert_eq!(maps.flows_removed_for.len(), 2, "flows of removed services are purged");
}

#[test]
fn an_endpoint_in_two_services_is_independent_in_each() {
    let mut syncer = Syncer::new();
    let mut maps = FakeMaps::default();
    let both = state(&[("a", service([10, 96, 0, 1], 80, &[7])), ("b", service([10, 96, 0, 2], 80, &[7]))]);
    syncer.apply(&both, &mut maps).expect("apply");
    let only_b = state(&[("a", service([10, 96, 0, 1], 80, &[])), ("b", service([10, 96, 0, 2], 80, &[7]))]);
    syncer.apply(&only_b, &mut maps).expect("apply");
    let set_of = |n: &str| maps.service_sets[&syncer.service_id(&name(n)).expect("programmed")];
    let ep = Endpoint { ip: [10, 244, 0, 7].into(), port: 8080 };
    assert!(maps.members.contains_key(&(set_of("b"), ep)));
    assert!(!maps.members.contains_key(&(set_of("a"), ep)));
}

#[test]
fn draining_endpoints_are_members_without_a_slot() {
    let mut syncer = Syncer::new();
    let mut maps = FakeMaps::default();
    let mut port = service([10, 96, 0, 1], 80, &[1]);
    port.draining.insert(Endpoint { ip: [10, 244, 0, 2].into(), port: 8080 });
    let desired = state(&[("a", port)]);
    syncer.apply(&desired, &mut maps).expect("apply");
    assert_maps_equal(&maps, &syncer, &desired);
    let set = maps.service_sets[&syncer.service_id(&name("a")).expect("programmed")];
    let draining = (set, Endpoint { ip: [10, 244, 0, 2].into(), port: 8080 });
    assert_eq!(maps.members.get(&draining), Some(&DRAINING_SLOT));
    assert_eq!(maps.slots.len(), 1, "only the serving endpoint has a slot");
    let frontend = maps.frontends.values().next().expect("frontend");
    assert_eq!(frontend.backend_count, 1);
}

/// A port served over TCP and UDP (cluster DNS) is two service ports: a
/// socket's backend is judged by its own protocol's, where a TCP port
/// keeps a not-ready endpoint draining and the UDP port has let it go.
#[test]
fn a_socket_backend_is_judged_by_its_own_protocols_port() {
    let mut syncer = Syncer::new();
    let mut maps = FakeMaps::default();
    let endpoint = |last: u8| Endpoint { ip: [10, 244, 0, last].into(), port: 5353 };
    let dns = |protocol: Protocol, draining: &[u8]| ServicePort {
        frontends: [Frontend { ip: [10, 96, 0, 10].into(), port: 53, protocol }].into(),
        endpoints: [endpoint(1)].into(),
        draining: draining.iter().map(|&last| endpoint(last)).collect(),
        ..ServicePort::default()
    };
    let desired = DesiredState {
        services: [
            (ServicePortName::new("kube-system", "dns", "dns-tcp"), dns(Protocol::Tcp, &[2])),
            (ServicePortName::new("kube-system", "dns", "dns"), dns(Protocol::Udp, &[])),
        ]
        .into(),
    };
    syncer.apply(&desired, &mut maps).expect("apply");
    let frontend = ([10, 96, 0, 10].into(), 53);
    let cases = [
        ("a serving endpoint, UDP", Some(Protocol::Udp), endpoint(1), true),
        ("a serving endpoint, TCP", Some(Protocol::Tcp), endpoint(1), true),
        ("a not-ready endpoint keeps a TCP socket", Some(Protocol::Tcp), endpoint(2), true),
        ("a not-ready endpoint loses a UDP socket", Some(Protocol::Udp), endpoint(2), false),
        ("an entry without its protocol: either port", None, endpoint(2), true),
        ("an endpoint in neither", None, endpoint(3), false),
    ];
    for (rule, protocol, backend, serves) in cases {
        assert_eq!(syncer.socket_backend_serves(frontend, protocol, backend), serves, "{rule}");
    }
}

#[test]
fn drop_when_empty_becomes_a_frontend_flag() {
    let mut syncer = Syncer::new();
    let mut maps = FakeMaps::default();
    let port = ServicePort { drop_when_empty: true, ..service([10, 96, 0, 1], 80, &[]) };
    syncer.apply(&state(&[("a", port)]), &mut maps).expect("apply");
    let frontend = maps.frontends.values().next().expect("frontend");
    assert_eq!((frontend.backend_count, frontend.flags), (0, FRONTEND_DROP_WHEN_EMPTY));
}

/// (moment in ms, expected delay in ms) for a 100 ms interval and a
/// burst of 2, each call followed by a sync at moment + delay.
#[test]
fn sync_limiter_lets_a_lone_change_through_and_spaces_out_bursts() {
    let cases: [(&str, &[(u64, u64)]); 3] = [
        ("a lone change is applied at once", &[(0, 0)]),
        ("changes a second apart are each applied at once", &[(0, 0), (1000, 0), (2000, 0)]),
        ("a burst: two at once, then one per interval", &[(0, 0), (1, 0), (2, 98), (101, 99)]),
    ];
    for (rule, steps) in cases {
        let start = Instant::now();
        let mut limiter = SyncLimiter::new(2, Duration::from_millis(100), start);
        for &(at, expected) in steps {
            let now = start + Duration::from_millis(at);
            let delay = limiter.delay(now);
            let delay_ms = delay.as_millis() as u64;
            assert!(delay_ms.abs_diff(expected) <= 1, "{rule}: at {at} ms waited {delay_ms} ms, expected {expected}");
            limiter.record(now + delay);
        }
    }
}

#[test]
fn freed_service_ids_are_reused_oldest_first() {
    let mut syncer = Syncer::new();
    let mut maps = FakeMaps::default();
    let three = state(&[("a", service([10, 96, 0, 1], 80, &[1])), ("b", service([10, 96, 0, 2], 80, &[1])), ("c", service([10, 96, 0, 3], 80, &[1]))]);
    syncer.apply(&three, &mut maps).expect("apply");
    let (a, b) = (syncer.service_id(&name("a")), syncer.service_id(&name("b")));
    syncer.apply(&state(&[("c", service([10, 96, 0, 3], 80, &[1]))]), &mut maps).expect("apply");
    let next = state(&[("c", service([10, 96, 0, 3], 80, &[1])), ("d", service([10, 96, 0, 4], 80, &[1])), ("e", service([10, 96, 0, 5], 80, &[1]))]);
    syncer.apply(&next, &mut maps).expect("apply");
    assert_eq!(syncer.service_id(&name("d")), a);
    assert_eq!(syncer.service_id(&name("e")), b);
}

/// Services, one with a draining endpoint, one dropping when empty (and
/// sending in-cluster clients to a cluster IP, as the external side of a
/// Local policy does), two sharing an address.
fn varied_state() -> DesiredState {
    let mut draining = service([10, 96, 0, 1], 80, &[1, 2]);
    draining.draining.insert(Endpoint { ip: [10, 244, 0, 9].into(), port: 8080 });
    let dropping = ServicePort { drop_when_empty: true, in_cluster_via: Some(([10, 96, 0, 1].into(), 80)), ..service([10, 96, 0, 2], 53, &[]) };
    state(&[("a", draining), ("b", dropping), ("c", service([10, 96, 0, 1], 443, &[3])), ("d", service([10, 96, 0, 4], 80, &[4, 5, 6]))])
}

#[test]
fn an_adopted_state_is_unchanged_by_the_same_desired_state() {
    let desired = varied_state();
    let mut first = Syncer::new();
    let mut maps = FakeMaps::default();
    first.apply(&desired, &mut maps).expect("apply");
    let (mut adopted, report) = Syncer::adopt(&maps.read_back(), &mut maps, Limits::default()).expect("adopt");
    assert_eq!(report, AdoptReport { adopted: 4, discarded: 0 });
    assert_maps_equal(&maps, &first, &desired);
    let resync = adopted.apply(&desired, &mut maps).expect("apply");
    assert_eq!(resync, SyncReport { unchanged: 4, ..Default::default() }, "the first sync after a restart changes nothing");
    for n in desired.services.keys() {
        assert_eq!(adopted.service_id(n), first.service_id(n), "{n} keeps its id (and its counters)");
    }
    assert!(maps.flows_removed_for.is_empty(), "no flow is purged");
}

#[test]
fn changes_made_while_away_are_applied_on_top_of_an_adopted_state() {
    let mut first = Syncer::new();
    let mut maps = FakeMaps::default();
    first.apply(&varied_state(), &mut maps).expect("apply");
    let (mut adopted, _) = Syncer::adopt(&maps.read_back(), &mut maps, Limits::default()).expect("adopt");
    let mut changed = varied_state();
    changed.services.remove(&name("c"));
    changed.services.insert(name("d"), service([10, 96, 0, 4], 80, &[4, 7]));
    changed.services.insert(name("e"), service([10, 96, 0, 5], 80, &[8]));
    // FakeMaps panics if a set id still in use were written again.
    let report = adopted.apply(&changed, &mut maps).expect("apply");
    assert_eq!(report, SyncReport { added: 1, updated: 1, removed: 1, unchanged: 2, over_capacity: 0 });
    assert_maps_equal(&maps, &adopted, &changed);
    assert_eq!(maps.flows_removed_for, vec![first.service_id(&name("c")).expect("programmed")]);
}

#[test]
fn pieces_of_no_adoptable_service_are_deleted() {
    let desired = state(&[("a", service([10, 96, 0, 1], 80, &[1, 2]))]);
    let mut first = Syncer::new();
    let mut maps = FakeMaps::default();
    first.apply(&desired, &mut maps).expect("apply");
    // A crash halfway through adding service id 7: name, set and one slot
    // written, no frontend yet. And a frontend of an id without a name.
    maps.names.insert(7, "default/half:http".into());
    maps.service_sets.insert(7, 40);
    maps.slots.insert(BackendSlotKey { backend_set: 40, slot: 0 }, Endpoint { ip: [10, 244, 0, 5].into(), port: 80 });
    maps.vips.insert([10, 96, 0, 8].into(), VipValue { frontends: 1, flags: VIP_CLUSTER_IP });
    let orphan = FrontendEntry { service_id: 9, backend_set: 41, backend_count: 0, flags: 0, affinity_seconds: 0, in_cluster_via: None };
    maps.frontends.insert(Frontend { ip: [10, 96, 0, 8].into(), port: 80, protocol: Protocol::Tcp }, orphan);
    let (adopted, report) = Syncer::adopt(&maps.read_back(), &mut maps, Limits::default()).expect("adopt");
    assert_eq!(report, AdoptReport { adopted: 1, discarded: 2 });
    assert_maps_equal(&maps, &adopted, &desired);
    assert_eq!(maps.flows_removed_for, vec![7, 9]);
    assert!(!maps.service_sets.values().any(|&s| s == 40));
}

#[test]
fn adopted_names_parse_back_into_service_ports() {
    let ipv6_external = ServicePortName::new("default", "kubia", "http").to_external().in_family(IpFamily::V6);
    assert_eq!(adopt::parse_port_name("default/kubia:http/external/ipv6"), Some(ipv6_external.clone()), "an IPv6 external side");
    assert_eq!(ipv6_external.to_string(), "default/kubia:http/external/ipv6", "and back");
    let cases = [
        ("namespace, name and port", "default/kubia:http", Some(("default", "kubia", "http"))),
        ("an unnamed single port", "kube-system/dns", Some(("kube-system", "dns", ""))),
        ("no namespace", "kubia:http", None),
        ("empty name", "default/:http", None),
    ];
    for (rule, text, expected) in cases {
        let parsed = adopt::parse_port_name(text);
        let expected = expected.map(|(namespace, n, port)| ServicePortName::new(namespace, n, port));
        assert_eq!(parsed, expected, "{rule}");
    }
    let external = ServicePortName::new("default", "kubia", "http").to_external();
    assert_eq!(adopt::parse_port_name(&external.to_string()), Some(external), "the external side of a port");
}

/// A service port needing `endpoints` backends on its own cluster IP
/// 10.96.1.`n`.
fn sized_service(n: u8, endpoints: u8) -> ServicePort {
    service([10, 96, 1, n], 80, &(1..=endpoints).collect::<Vec<_>>())
}

/// Each case: the rule, the map sizes, the desired states applied one
/// after the other, and after the last, the service ports programmed
/// (with their endpoint count) and the ones over capacity with the
/// limit named.
#[test]
fn service_ports_that_do_not_fit_are_left_out_and_the_others_programmed() {
    let slots = |n| Limits { backend_slots: n, ..Limits::default() };
    type Case = (&'static str, Limits, Vec<DesiredState>, Vec<(&'static str, usize)>, Vec<(&'static str, &'static str)>);
    let cases: Vec<Case> = vec![
        (
            "a service port whose backends do not fit is left out; the ones before and after it are programmed",
            slots(5),
            vec![state(&[("a", sized_service(1, 3)), ("b", sized_service(2, 3)), ("c", sized_service(3, 2))])],
            vec![("a", 3), ("c", 2)],
            vec![("b", "backend slots: needs 3, 2 of 5 free (--backend-slots-max)")],
        ),
        (
            "a left-out service port is programmed once room is freed",
            slots(5),
            vec![
                state(&[("a", sized_service(1, 3)), ("b", sized_service(2, 3))]),
                state(&[("b", sized_service(2, 3))]),
            ],
            vec![("b", 3)],
            vec![],
        ),
        (
            "a change that does not fit leaves the service port as it was",
            slots(5),
            vec![state(&[("a", sized_service(1, 3))]), state(&[("a", sized_service(1, 4))])],
            vec![("a", 3)],
            vec![("a", "backend slots: needs 4, 2 of 5 free (--backend-slots-max)")],
        ),
        (
            "draining endpoints count against the backend set members",
            slots(4),
            vec![state(&[("a", ServicePort {
                draining: [Endpoint { ip: [10, 244, 0, 9].into(), port: 8080 }, Endpoint { ip: [10, 244, 0, 8].into(), port: 8080 }].into(),
                ..sized_service(1, 3)
            })])],
            vec![],
            vec![("a", "backend set members: needs 5, 4 of 4 free (--backend-slots-max)")],
        ),
        (
            "frontends beyond --frontends-max",
            Limits { frontends: 2, ..Limits::default() },
            vec![state(&[("a", sized_service(1, 1)), ("b", sized_service(2, 1)), ("c", sized_service(3, 1))])],
            vec![("a", 1), ("b", 1)],
            vec![("c", "frontends: needs 1, 0 of 2 free (--frontends-max)")],
        ),
        (
            "a new address beyond --service-addresses-max; a port on an address in use still fits",
            Limits { addresses: 1, ..Limits::default() },
            vec![state(&[("a", sized_service(1, 1)), ("b", sized_service(2, 1)), ("c", service([10, 96, 1, 1], 443, &[1]))])],
            vec![("a", 1), ("c", 1)],
            vec![("b", "service addresses: needs 1, 0 of 1 free (--service-addresses-max)")],
        ),
        (
            "service ids run out",
            Limits { service_ports: 2, ..Limits::default() },
            vec![state(&[("a", sized_service(1, 1)), ("b", sized_service(2, 1)), ("c", sized_service(3, 1))])],
            vec![("a", 1), ("b", 1)],
            vec![("c", "service ports: needs 1, 0 of 2 free (--service-ports-max)")],
        ),
    ];
    for (rule, limits, states, programmed, over) in cases {
        let mut syncer = Syncer::with_limits(limits);
        let mut maps = FakeMaps::sized(limits);
        for desired in &states {
            let report = syncer.apply(desired, &mut maps).unwrap_or_else(|e| panic!("{rule}: {e}"));
            assert_eq!(report.over_capacity, syncer.over_capacity().len(), "{rule}");
        }
        let mut found: Vec<(String, usize)> = Vec::new();
        for value in maps.frontends.values() {
            let name = &maps.names[&value.service_id];
            found.push((name.trim_start_matches("default/").trim_end_matches(":http").to_owned(), value.backend_count as usize));
        }
        found.sort();
        let expected: Vec<(String, usize)> = programmed.iter().map(|&(n, c)| (n.to_owned(), c)).collect();
        assert_eq!(found, expected, "{rule}: programmed");
        let over_found: Vec<(String, String)> = syncer.over_capacity().iter().map(|(n, why)| (n.name.clone(), why.clone())).collect();
        let over_expected: Vec<(String, String)> = over.iter().map(|&(n, why)| (n.to_owned(), why.to_owned())).collect();
        assert_eq!(over_found, over_expected, "{rule}: over capacity");
    }
}

#[test]
fn an_adopted_state_counts_against_the_limits() {
    let limits = Limits { backend_slots: 5, ..Limits::default() };
    let mut first = Syncer::with_limits(limits);
    let mut maps = FakeMaps::sized(limits);
    first.apply(&state(&[("a", sized_service(1, 3))]), &mut maps).expect("apply");
    let (mut adopted, _) = Syncer::adopt(&maps.read_back(), &mut maps, limits).expect("adopt");
    let report = adopted.apply(&state(&[("a", sized_service(1, 3)), ("b", sized_service(2, 3))]), &mut maps).expect("apply");
    assert_eq!(report, SyncReport { unchanged: 1, over_capacity: 1, ..Default::default() });
}

/// A load balancer service port with source ranges: the flag on its
/// load balancer IP only, the ranges under its id, replaced on change
/// and deleted with it; adopted as they are after a restart.
#[test]
fn source_ranges_restrict_load_balancer_ips_only() {
    let lb_ip: IpAddr = Ipv4Addr::new(203, 0, 113, 7).into();
    let node_port = Frontend { ip: [192, 168, 0, 1].into(), port: 30080, protocol: Protocol::Tcp };
    let with_ranges = |ranges: &[(IpAddr, u8)]| ServicePort {
        frontends: [Frontend { ip: lb_ip, port: 80, protocol: Protocol::Tcp }, node_port].into(),
        source_ranges: ranges.iter().copied().collect(),
        source_ranged: [lb_ip].into(),
        ..sized_service(1, 1)
    };
    let mut syncer = Syncer::new();
    let mut maps = FakeMaps::default();
    let first = state(&[("a", with_ranges(&[([10, 1, 0, 0].into(), 16)]))]);
    syncer.apply(&first, &mut maps).expect("apply");
    let id = syncer.service_id(&name("a")).expect("programmed");
    let flags = |maps: &FakeMaps, ip: IpAddr, port: u16| maps.frontends[&Frontend { ip, port, protocol: Protocol::Tcp }].flags & FRONTEND_SOURCE_RANGES;
    assert_eq!(flags(&maps, lb_ip, 80), FRONTEND_SOURCE_RANGES, "the load balancer IP is restricted");
    assert_eq!(flags(&maps, node_port.ip, 30080), 0, "the node port is not");
    let range = |ip: [u8; 4], len| (id, (IpAddr::from(ip), len));
    assert_eq!(maps.source_ranges, [range([10, 1, 0, 0], 16)].into());

    let (mut adopted, report) = Syncer::adopt(&maps.read_back(), &mut maps, Limits::default()).expect("adopt");
    assert_eq!(report.adopted, 1);
    assert_eq!(adopted.apply(&first, &mut maps).expect("apply"), SyncReport { unchanged: 1, ..Default::default() }, "adopted as they are");

    let changed = state(&[("a", with_ranges(&[([10, 2, 0, 0].into(), 16), ([198, 51, 100, 7].into(), 32)]))]);
    adopted.apply(&changed, &mut maps).expect("apply");
    assert_eq!(maps.source_ranges, [range([10, 2, 0, 0], 16), range([198, 51, 100, 7], 32)].into(), "replaced");
    adopted.apply(&state(&[]), &mut maps).expect("apply");
    assert!(maps.source_ranges.is_empty(), "deleted with the service");
}

/// Two services sharing an external IP and port: the first keeps the
/// frontend; removing the other changes nothing; when the first goes,
/// the other takes it over in place; when both go, it is gone.
#[test]
fn a_frontend_claimed_by_two_service_ports_stays_with_the_first_until_it_lets_go() {
    let shared = Frontend { ip: [198, 51, 100, 9].into(), port: 80, protocol: Protocol::Tcp };
    let key = shared;
    let claim = |n: u8, endpoints: u8| ServicePort { frontends: [shared].into(), ..sized_service(n, endpoints) };
    let mut syncer = Syncer::new();
    let mut maps = FakeMaps::default();
    let id = |syncer: &Syncer, n: &str| syncer.service_id(&name(n)).expect("programmed");
    syncer.apply(&state(&[("a", claim(1, 1)), ("b", claim(2, 2))]), &mut maps).expect("apply");
    assert_eq!(maps.frontends[&key].service_id, id(&syncer, "a"), "the first claimant holds it");
    syncer.apply(&state(&[("a", claim(1, 1))]), &mut maps).expect("apply");
    assert_eq!(maps.frontends[&key].service_id, id(&syncer, "a"), "the other leaving changes nothing");
    syncer.apply(&state(&[("a", claim(1, 1)), ("b", claim(2, 2))]), &mut maps).expect("apply");
    syncer.apply(&state(&[("b", claim(2, 3))]), &mut maps).expect("apply");
    let value = maps.frontends[&key];
    assert_eq!((value.service_id, value.backend_count), (id(&syncer, "b"), 3), "taken over by the other, with its current set");
    assert_eq!(maps.vips[&shared.ip].frontends, 1);
    syncer.apply(&state(&[]), &mut maps).expect("apply");
    assert!(maps.frontends.is_empty() && maps.vips.is_empty(), "gone with both");
}

/// A dual-stack service port pair: each family's frontends, backends and
/// address in its own maps, distinct ids and names; adopted back as they
/// were after a restart.
#[test]
fn each_family_is_programmed_in_its_own_maps_and_adopted_back() {
    let v6 = |text: &str| text.parse::<IpAddr>().expect("address");
    let ipv6_port = ServicePort {
        frontends: [Frontend { ip: v6("fd00:96::10"), port: 80, protocol: Protocol::Tcp }].into(),
        endpoints: [Endpoint { ip: v6("fd00:244::2"), port: 8080 }, Endpoint { ip: v6("fd00:244::3"), port: 8080 }].into(),
        draining: [Endpoint { ip: v6("fd00:244::9"), port: 8080 }].into(),
        source_ranges: [(v6("2001:db8::"), 32)].into(),
        in_cluster_via: Some((v6("fd00:96::10"), 80)),
        ..ServicePort::default()
    };
    let mut desired = state(&[("a", service([10, 96, 0, 10], 80, &[2, 3]))]);
    desired.services.insert(name("a").in_family(IpFamily::V6), ipv6_port);
    let mut syncer = Syncer::new();
    let mut maps = FakeMaps::default();
    syncer.apply(&desired, &mut maps).expect("apply");
    assert_maps_equal(&maps, &syncer, &desired);
    let (id4, id6) = (syncer.service_id(&name("a")), syncer.service_id(&name("a").in_family(IpFamily::V6)));
    assert_ne!(id4, id6, "a service id per family");
    assert_eq!(maps.names.get(&id6.expect("programmed")).map(String::as_str), Some("default/a:http/ipv6"));
    assert!(maps.vips.contains_key(&v6("fd00:96::10")), "the IPv6 address has its entry");

    let (mut adopted, report) = Syncer::adopt(&maps.read_back(), &mut maps, Limits::default()).expect("adopt");
    assert_eq!(report, AdoptReport { adopted: 2, discarded: 0 });
    assert_eq!(adopted.apply(&desired, &mut maps).expect("apply"), SyncReport { unchanged: 2, ..Default::default() }, "adopted as they were");
    adopted.apply(&state(&[]), &mut maps).expect("apply");
    assert!(maps.frontends.is_empty() && maps.slots.is_empty() && maps.members.is_empty() && maps.source_ranges.is_empty(), "both families removed");
}

/// Each family's maps have their own sizes: on a node without IPv6 its
/// tables are small, so IPv6 service ports beyond them are left out while
/// IPv4 ones still fit.
#[test]
fn each_family_counts_against_its_own_map_sizes() {
    let limits = Limits { frontends: 2000, ipv6: false, ..Limits::default() };
    let mut desired = DesiredState::default();
    for n in 0..1100u32 {
        let [_, _, hi, lo] = n.to_be_bytes();
        let v6: IpAddr = std::net::Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, u16::from(hi), u16::from(lo)).into();
        let v6_port = ServicePort { frontends: [Frontend { ip: v6, port: 80, protocol: Protocol::Tcp }].into(), ..ServicePort::default() };
        desired.services.insert(name(&format!("s{n}")).in_family(IpFamily::V6), v6_port);
        desired.services.insert(name(&format!("s{n}")), service([10, 97, hi, lo], 80, &[]));
    }
    let mut syncer = Syncer::with_limits(limits);
    let mut maps = FakeMaps::sized(limits);
    let report = syncer.apply(&desired, &mut maps).expect("apply");
    assert_eq!(report.added, 1100 + IPV6_IDLE_ENTRIES as usize, "every IPv4 port, and the IPv6 ones the idle tables hold");
    assert_eq!(report.over_capacity, 1100 - IPV6_IDLE_ENTRIES as usize);
    assert!(syncer.over_capacity().keys().all(|n| n.family == IpFamily::V6), "only IPv6 ports are left out");
    let why = syncer.over_capacity().values().next().expect("one left out");
    assert_eq!(why, "frontends: needs 1, 0 of 1024 free (the IPv6 tables' size on a node without IPv6: give it an IPv6 --node-ip)", "says what raises it");
    let with_ipv6 = Limits { ipv6: true, ..limits };
    let mut syncer = Syncer::with_limits(with_ipv6);
    let mut maps = FakeMaps::sized(with_ipv6);
    assert_eq!(syncer.apply(&desired, &mut maps).expect("apply").added, 2200, "full-size IPv6 tables hold them all");
}
