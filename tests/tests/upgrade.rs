//! Upgrades across conntrack layouts and sizes: flows migrate into the new tables.
//!
//! An agent that finds pinned conntrack tables of the layout before flow state
//! and expiry (28-byte values), or of another size, migrates every flow into
//! the new tables, and the datapath goes on translating them as established
//! flows; a table of a layout it does not know is replaced by an empty one.
//! Each test pins only under a bpf filesystem of its own, unmounted on drop
//! (also when the test fails). Needs root.
use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{Context, Result, bail};
use aya::maps::{MapData, MapInfo};
use lb_common::{
    CT_FORWARD, CT_REPLY, ConntrackKey, ConntrackValue, DatapathConfig, Endpoint, IPPROTO_TCP, IPPROTO_UDP,
    MAP_CONNTRACK_TCP, MAP_CONNTRACK_UDP, MAX_CONNTRACK_ENTRIES, Reason,
    lifecycle::{FLOW_BACKEND_FIN, FLOW_CLIENT_FIN, FLOW_RESET, FLOW_SEEN_REPLY},
};
use lb_tests::{
    fixture::{Fixture, Hook, Verdict, desired, service},
    netns::Bpffs,
    packets::Frame,
};
use lb_userspace::{
    conntrack::{now_ticks, read_all, write_all},
    datapath::Datapath,
    maps::{MapSettings, PinnedState, migrate::V1_VALUE_SIZE},
    model::{DesiredState, Protocol, ServicePortName},
    sync::Syncer,
};

/// BPF_MAP_TYPE_LRU_HASH.
const LRU_HASH: u32 = 9;
/// BPF_F_NO_COMMON_LRU: per-CPU LRU lists, as the object declares.
const NO_COMMON_LRU: u32 = 2;
/// The value size of an unknown layout.
const UNKNOWN_VALUE_SIZE: usize = 20;

/// Flows per table: a few thousand entries (two per flow), well within
/// one CPU's share of the smallest table below (65,536 entries).
const FLOWS: u16 = 1500;

const VIP: [u8; 4] = [10, 96, 0, 10];
const WEB_PORT: u16 = 80;
const DNS_PORT: u16 = 53;
const NODE: [u8; 4] = [10, 201, 0, 1];
const BACKENDS: [[u8; 4]; 4] = [[10, 244, 1, 2], [10, 244, 1, 3], [10, 244, 1, 4], [10, 244, 1, 5]];
const WEB_TARGET: u16 = 8080;
const DNS_TARGET: u16 = 5353;

/// The ids a fresh syncer gives the two service ports: in name order,
/// from 0 ("default/dns:53" before "default/web:80").
const DNS_ID: u32 = 0;
const WEB_ID: u32 = 1;

fn services() -> DesiredState {
    let endpoints = |port: u16| BACKENDS.iter().map(|&ip| (ip, port)).collect::<Vec<_>>();
    desired([
        service("web", VIP, WEB_PORT, Protocol::Tcp, &endpoints(WEB_TARGET)),
        service("dns", VIP, DNS_PORT, Protocol::Udp, &endpoints(DNS_TARGET)),
    ])
}

fn sock(ip: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(ip), port)
}

fn endpoint(a: SocketAddrV4) -> Endpoint {
    a.into()
}

fn key(src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> ConntrackKey {
    ConntrackKey::new(src, dst, proto)
}

/// A translated flow as a previous agent recorded it: client to frontend,
/// translated to a backend, the source translated to the node's address
/// when `snat` is set.
#[derive(Clone, Copy, Debug)]
struct Flow {
    proto: u8,
    client: SocketAddrV4,
    frontend: SocketAddrV4,
    backend: SocketAddrV4,
    snat: Option<SocketAddrV4>,
    service_id: u32,
}

impl Flow {
    /// Where the backend sees the flow come from.
    fn seen_from(&self) -> SocketAddrV4 {
        self.snat.unwrap_or(self.client)
    }

    fn forward_key(&self) -> ConntrackKey {
        key(self.client, self.frontend, self.proto)
    }

    fn reply_key(&self) -> ConntrackKey {
        key(self.backend, self.seen_from(), self.proto)
    }

    /// Both entries, without state or expiry (`flow_flags` and `expires`
    /// 0), the backend set 0: the one a v1 table holds.
    fn entries(&self) -> [(ConntrackKey, ConntrackValue); 2] {
        let (forward, reply) = (self.forward_key(), self.reply_key());
        [
            (
                forward,
                ConntrackValue::translating(&forward, endpoint(self.seen_from()), endpoint(self.backend), self.service_id, 0, CT_FORWARD),
            ),
            (reply, ConntrackValue::translating(&reply, endpoint(self.frontend), endpoint(self.client), self.service_id, 0, CT_REPLY)),
        ]
    }
}

/// `FLOWS` flows of `proto` to its service, spread over the backends, every
/// fifth one with source NAT.
fn flows(proto: u8) -> Vec<Flow> {
    let (port, target, service_id) = if proto == IPPROTO_TCP { (WEB_PORT, WEB_TARGET, WEB_ID) } else { (DNS_PORT, DNS_TARGET, DNS_ID) };
    (0..FLOWS)
        .map(|i| {
            let client = sock([10, 1, (i / 250) as u8, (i % 250) as u8 + 1], 20_000 + i);
            Flow {
                proto,
                client,
                frontend: sock(VIP, port),
                backend: sock(BACKENDS[usize::from(i) % BACKENDS.len()], target),
                snat: (i % 5 == 4).then(|| sock(NODE, 61_000 + i)),
                service_id,
            }
        })
        .collect()
}

fn all_entries(flows: &[Flow]) -> HashMap<ConntrackKey, ConntrackValue> {
    flows.iter().flat_map(Flow::entries).collect()
}

/// A value in the layout before flow state and expiry, written out field
/// by field: addresses, ports, the two checksum changes, service id,
/// backend set, direction, a padding byte (zero), the combined checksum
/// change.
fn v1_bytes(v: &ConntrackValue) -> [u8; V1_VALUE_SIZE as usize] {
    let mut b = [0u8; V1_VALUE_SIZE as usize];
    b[0..4].copy_from_slice(&v.src_ip.to_ne_bytes());
    b[4..8].copy_from_slice(&v.dst_ip.to_ne_bytes());
    b[8..10].copy_from_slice(&v.src_port.to_ne_bytes());
    b[10..12].copy_from_slice(&v.dst_port.to_ne_bytes());
    b[12..14].copy_from_slice(&v.addr_csum_delta.to_ne_bytes());
    b[14..16].copy_from_slice(&v.port_csum_delta.to_ne_bytes());
    b[16..20].copy_from_slice(&v.service_id.to_ne_bytes());
    b[20..24].copy_from_slice(&v.backend_set.to_ne_bytes());
    b[24] = v.direction;
    b[26..28].copy_from_slice(&v.l4_csum_delta.to_ne_bytes());
    b
}

/// `union bpf_attr` for BPF_MAP_CREATE, up to the map's name, zero after.
#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
    rest: [u8; 84],
}

/// Creates a conntrack table as an earlier agent did (LRU hash with
/// per-CPU lists, 16-byte keys) with `value_size`-byte values, and pins it
/// as `name` under `dir`.
fn pin_table(dir: &Path, name: &str, value_size: usize, max_entries: u32) -> Result<MapData> {
    const BPF_MAP_CREATE: libc::c_long = 0;
    let mut attr = MapCreateAttr {
        map_type: LRU_HASH,
        key_size: size_of::<ConntrackKey>() as u32,
        value_size: value_size as u32,
        max_entries,
        map_flags: NO_COMMON_LRU,
        inner_map_fd: 0,
        numa_node: 0,
        map_name: [0; 16],
        rest: [0; 84],
    };
    attr.map_name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: the bpf syscall with an attribute block of the size given,
    // which holds no pointers.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, &raw mut attr, size_of::<MapCreateAttr>()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("creating {name} with {value_size}-byte values"));
    }
    // SAFETY: a descriptor the kernel just returned, owned from here on.
    let map = MapData::from_fd(unsafe { OwnedFd::from_raw_fd(fd as i32) }).with_context(|| format!("opening {name}"))?;
    let path = dir.join(name);
    map.pin(&path).with_context(|| format!("pinning {name} at {}", path.display()))?;
    Ok(map)
}

/// Checks that `write_all` wrote all `len` entries into the old table.
fn wrote_all(written: std::io::Result<usize>, len: usize) -> Result<()> {
    let written = written.context("writing the old table's entries")?;
    if written != len {
        bail!("only {written} of {len} entries written");
    }
    Ok(())
}

/// Loads the datapath over the pins of `dir`, as an upgraded agent does
/// (with the settings it writes before anything is attached).
fn load(dir: &Path, settings: &MapSettings) -> Result<(Datapath, PinnedState)> {
    let (mut datapath, pinned) = Datapath::load_pinned(dir, None, settings, lb_userspace::features::KernelFeatures::probe(&[])).context("loading the pinned datapath (needs root)")?;
    datapath.maps.set_config(DatapathConfig { ct_lifetimes: settings.ct_lifetimes, ..DatapathConfig::default() })?;
    Ok((datapath, pinned))
}

/// Every entry of the table pinned as `name` under `dir`, and what the
/// kernel says about the table.
fn pinned_table(dir: &Path, name: &'static str) -> Result<(MapInfo, Vec<(ConntrackKey, ConntrackValue)>)> {
    let path = dir.join(name);
    let info = MapInfo::from_pin(&path).with_context(|| format!("{} is not pinned", path.display()))?;
    let map = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let entries = read_all(map.fd().as_fd()).with_context(|| format!("reading {name}"))?;
    Ok((info, entries))
}

fn migrated<'a>(pinned: &'a PinnedState, name: &str) -> Option<&'a [(ConntrackKey, ConntrackValue)]> {
    pinned.migrated.iter().find(|(table, _)| *table == name).map(|(_, entries)| entries.as_slice())
}

fn migrated_names(pinned: &PinnedState) -> Vec<&'static str> {
    pinned.migrated.iter().map(|(name, _)| *name).collect()
}

/// What is wrong with `got` as the migration of `want` (v1 entries): every
/// key once and no other, the same translation, established
/// (`FLOW_SEEN_REPLY`), expiring `lifetime` ticks after a moment in
/// `now`. At most a few problems, for a readable failure.
fn migration_problems(
    got: &[(ConntrackKey, ConntrackValue)],
    want: &HashMap<ConntrackKey, ConntrackValue>,
    lifetime: u32,
    now: std::ops::RangeInclusive<u32>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let got_map: HashMap<_, _> = got.iter().copied().collect();
    if got_map.len() != got.len() {
        problems.push(format!("{} entries, {} distinct keys", got.len(), got_map.len()));
    }
    let missing = want.keys().filter(|k| !got_map.contains_key(k)).count();
    if missing > 0 {
        problems.push(format!("{missing} of {} keys missing", want.len()));
    }
    let extra = got_map.keys().filter(|k| !want.contains_key(k)).count();
    if extra > 0 {
        problems.push(format!("{extra} keys that were not in the old table"));
    }
    let expires = now.start().saturating_add(lifetime)..=now.end().saturating_add(lifetime);
    for (k, v) in &got_map {
        let Some(old) = want.get(k) else { continue };
        let translation = ConntrackValue { flow_flags: 0, expires: 0, ..*v };
        if translation != *old {
            problems.push(format!("{k:?}: translation {translation:?}, was {old:?}"));
        }
        if v.flow_flags != FLOW_SEEN_REPLY {
            problems.push(format!("{k:?}: flow_flags {:#x}, want FLOW_SEEN_REPLY", v.flow_flags));
        }
        if !expires.contains(&v.expires) {
            problems.push(format!("{k:?}: expires at {}, want {expires:?} (now {now:?} + {lifetime} ticks)", v.expires));
        }
        if problems.len() >= 5 {
            break;
        }
    }
    problems
}

/// Runs one packet through the XDP program; returns its output and the one
/// reason it was counted under.
fn send(fixture: &Fixture, what: &str, input: &Frame) -> (Verdict, Vec<u8>, Reason) {
    let before = fixture.reason_totals();
    let result = fixture.run(Hook::Xdp, &input.bytes());
    let after = fixture.reason_totals();
    let counted: Vec<Reason> = Reason::ALL.into_iter().filter(|r| after[*r as usize] != before[*r as usize]).collect();
    match counted[..] {
        [reason] if after[reason as usize] == before[reason as usize] + 1 => (result.verdict, result.output, reason),
        _ => panic!("{what}: counted under {counted:?}, not once under one reason"),
    }
}

/// Sends `input` and checks that it leaves as `output`, byte for byte,
/// counted under `reason`.
fn expect_pass(fixture: &Fixture, what: &str, input: &Frame, output: &Frame, reason: Reason) {
    let (verdict, bytes, counted) = send(fixture, what, input);
    assert_eq!((verdict, counted), (Verdict::Pass, reason), "{what}");
    assert_eq!(bytes, output.bytes(), "{what}: output");
}

fn text(a: SocketAddrV4) -> String {
    a.to_string()
}

#[test]
fn an_upgrade_migrates_flows_from_the_layout_without_state() -> Result<()> {
    let bpffs = Bpffs::new()?;
    let dir = bpffs.dir.as_path();
    let settings = MapSettings::default();
    let (tcp_flows, udp_flows) = (flows(IPPROTO_TCP), flows(IPPROTO_UDP));
    let tables = [
        (MAP_CONNTRACK_TCP, all_entries(&tcp_flows), settings.ct_lifetimes.tcp_established),
        (MAP_CONNTRACK_UDP, all_entries(&udp_flows), settings.ct_lifetimes.udp_stream),
    ];
    for (name, entries, _) in &tables {
        let old = pin_table(dir, name, V1_VALUE_SIZE as usize, MAX_CONNTRACK_ENTRIES)?;
        let v1: Vec<_> = entries.iter().map(|(k, v)| (*k, v1_bytes(v))).collect();
        wrote_all(write_all(old.fd().as_fd(), &v1), v1.len())?;
        assert_eq!(read_all_v1(&old)?, entries.len(), "{name}: the old table holds every entry");
    }

    let before = now_ticks();
    let (datapath, pinned) = load(dir, &settings)?;
    let after = now_ticks();

    assert_eq!(migrated_names(&pinned), [MAP_CONNTRACK_TCP, MAP_CONNTRACK_UDP], "both tables migrated");
    for (name, entries, lifetime) in &tables {
        assert!(pinned.replaced.contains(name), "{name}: not in replaced {:?}", pinned.replaced);
        assert!(!pinned.adopted.contains(name), "{name}: adopted as it was");
        let listed = migrated(&pinned, name).unwrap_or_default();
        let problems = migration_problems(listed, entries, *lifetime, before..=after);
        assert!(problems.is_empty(), "{name}: PinnedState::migrated: {problems:#?}");

        let (info, stored) = pinned_table(dir, name)?;
        assert_eq!(info.value_size() as usize, size_of::<ConntrackValue>(), "{name}: the new table's layout");
        assert_eq!(info.max_entries(), MAX_CONNTRACK_ENTRIES, "{name}: the new table's size");
        let problems = migration_problems(&stored, entries, *lifetime, before..=after);
        assert!(problems.is_empty(), "{name}: the new pinned table: {problems:#?}");
    }

    // The migrated flows are the datapath's: established, to their
    // backend, with the checksums the stored changes give.
    let mut fixture = Fixture { datapath, syncer: Syncer::new() };
    fixture.program(&services());
    for (name, port, id) in [("web", WEB_PORT, WEB_ID), ("dns", DNS_PORT, DNS_ID)] {
        let programmed = fixture.syncer.service_id(&ServicePortName::new("default", name, &port.to_string()));
        assert_eq!(programmed, Some(id), "the id the syncer gives {name}, which the migrated entries carry");
    }
    let (plain, snat) = (tcp_flows[6], tcp_flows[9]);
    assert!(plain.snat.is_none() && snat.snat.is_some());
    for (what, flow) in [("TCP flow", plain), ("TCP flow with source NAT", snat)] {
        let request = Frame::tcp_data(&text(flow.client), &text(flow.frontend), b"request");
        let translated = request.clone().with_src(&text(flow.seen_from())).with_dst(&text(flow.backend));
        expect_pass(&fixture, &format!("migrated {what}: request"), &request, &translated, Reason::ForwardEstablished);
        let response = Frame::tcp_data(&text(flow.backend), &text(flow.seen_from()), b"response");
        let back = response.clone().with_src(&text(flow.frontend)).with_dst(&text(flow.client));
        expect_pass(&fixture, &format!("migrated {what}: response"), &response, &back, Reason::ReplyTranslated);
    }
    let dns = udp_flows[7];
    let query = Frame::udp(&text(dns.client), &text(dns.frontend), b"query");
    let translated = query.clone().with_dst(&text(dns.backend));
    expect_pass(&fixture, "migrated UDP flow: query", &query, &translated, Reason::ForwardEstablished);
    // The backend the flow had, not one picked afresh: no new flow counted.
    assert_eq!(fixture.datapath.maps.service_totals(WEB_ID)?.new_flows, 0, "web: no flow placed afresh");
    assert_eq!(fixture.datapath.maps.service_totals(DNS_ID)?.new_flows, 0, "dns: no flow placed afresh");
    Ok(())
}

/// Entries of an old-layout table, counted.
fn read_all_v1(map: &MapData) -> Result<usize> {
    Ok(lb_userspace::conntrack::read_all_raw::<ConntrackKey, [u8; V1_VALUE_SIZE as usize]>(map.fd().as_fd())?.len())
}

#[test]
fn a_new_table_size_keeps_the_flows() -> Result<()> {
    let bpffs = Bpffs::new()?;
    let dir = bpffs.dir.as_path();
    let now = now_ticks();
    // Current-layout entries of confirmed flows in each state, with
    // expiries of their own.
    let stamp = |flows: &[Flow]| -> HashMap<ConntrackKey, ConntrackValue> {
        let states = [
            FLOW_SEEN_REPLY,
            FLOW_SEEN_REPLY | FLOW_CLIENT_FIN,
            FLOW_SEEN_REPLY | FLOW_CLIENT_FIN | FLOW_BACKEND_FIN,
            FLOW_SEEN_REPLY | FLOW_RESET,
        ];
        flows
            .iter()
            .enumerate()
            .flat_map(|(i, flow)| {
                let (flow_flags, expires) = (states[i % states.len()], now + 100 + i as u32);
                flow.entries().map(|(k, v)| (k, ConntrackValue { flow_flags, expires, backend_set: 3, ..v }))
            })
            .collect()
    };
    let tcp = stamp(&flows(IPPROTO_TCP));
    let udp = stamp(&flows(IPPROTO_UDP));
    let mut old_ids = HashMap::new();
    for (name, entries) in [(MAP_CONNTRACK_TCP, &tcp), (MAP_CONNTRACK_UDP, &udp)] {
        let old = pin_table(dir, name, size_of::<ConntrackValue>(), MAX_CONNTRACK_ENTRIES)?;
        let current: Vec<_> = entries.iter().map(|(k, v)| (*k, *v)).collect();
        wrote_all(write_all(old.fd().as_fd(), &current), current.len())?;
        old_ids.insert(name, old.info()?.id());
    }

    let settings = MapSettings { conntrack_tcp_max: 65_536, ..MapSettings::default() };
    let (_datapath, pinned) = load(dir, &settings)?;

    assert!(pinned.adopted.contains(&MAP_CONNTRACK_UDP), "UDP (same layout and size) not adopted: {pinned:?}");
    assert!(!pinned.replaced.contains(&MAP_CONNTRACK_UDP), "UDP replaced");
    assert!(pinned.replaced.contains(&MAP_CONNTRACK_TCP), "TCP (another size) not replaced: {:?}", pinned.replaced);
    assert_eq!(migrated_names(&pinned), [MAP_CONNTRACK_TCP], "only TCP migrated");
    let listed: HashMap<_, _> = migrated(&pinned, MAP_CONNTRACK_TCP).unwrap_or_default().iter().copied().collect();
    assert!(listed == tcp, "PinnedState::migrated: {} entries, {} of them unchanged, of {}", listed.len(), same(&listed, &tcp), tcp.len());

    let (info, stored) = pinned_table(dir, MAP_CONNTRACK_TCP)?;
    assert_eq!(info.max_entries(), 65_536, "TCP recreated at the new size");
    assert_ne!(info.id(), old_ids[MAP_CONNTRACK_TCP], "TCP is a new table");
    let stored_map: HashMap<_, _> = stored.iter().copied().collect();
    assert!(
        stored.len() == tcp.len() && stored_map == tcp,
        "the new TCP table: {} entries, {} of them unchanged, of {}",
        stored.len(),
        same(&stored_map, &tcp),
        tcp.len()
    );

    let (info, stored) = pinned_table(dir, MAP_CONNTRACK_UDP)?;
    assert_eq!((info.id(), info.max_entries()), (old_ids[MAP_CONNTRACK_UDP], MAX_CONNTRACK_ENTRIES), "UDP is the old table");
    let stored_map: HashMap<_, _> = stored.iter().copied().collect();
    assert!(stored_map == udp, "the UDP table: {} entries, {} of them unchanged, of {}", stored.len(), same(&stored_map, &udp), udp.len());
    Ok(())
}

/// How many of `want`'s entries `got` holds unchanged.
fn same(got: &HashMap<ConntrackKey, ConntrackValue>, want: &HashMap<ConntrackKey, ConntrackValue>) -> usize {
    want.iter().filter(|(k, v)| got.get(k) == Some(v)).count()
}

#[test]
fn an_unknown_layout_is_replaced_empty() -> Result<()> {
    let bpffs = Bpffs::new()?;
    let dir = bpffs.dir.as_path();
    let old = pin_table(dir, MAP_CONNTRACK_TCP, UNKNOWN_VALUE_SIZE, MAX_CONNTRACK_ENTRIES)?;
    let entries: Vec<_> = flows(IPPROTO_TCP).iter().take(100).map(|f| (f.forward_key(), [0xa5u8; UNKNOWN_VALUE_SIZE])).collect();
    wrote_all(write_all(old.fd().as_fd(), &entries), entries.len())?;
    let old_id = old.info()?.id();
    drop(old);

    let (_datapath, pinned) = load(dir, &MapSettings::default())?;

    assert!(pinned.replaced.contains(&MAP_CONNTRACK_TCP), "not replaced: {pinned:?}");
    assert!(!pinned.adopted.contains(&MAP_CONNTRACK_TCP), "adopted: {pinned:?}");
    assert!(migrated(&pinned, MAP_CONNTRACK_TCP).is_none(), "listed as migrated: {:?}", migrated_names(&pinned));
    let (info, stored) = pinned_table(dir, MAP_CONNTRACK_TCP)?;
    assert_ne!(info.id(), old_id, "a new table");
    assert_eq!(info.value_size() as usize, size_of::<ConntrackValue>(), "in this layout");
    assert!(stored.is_empty(), "the new table holds {} entries", stored.len());
    let (_, udp) = pinned_table(dir, MAP_CONNTRACK_UDP)?;
    assert!(udp.is_empty(), "the UDP table, created afresh, holds {} entries", udp.len());
    Ok(())
}
