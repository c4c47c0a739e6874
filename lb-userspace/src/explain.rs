//! `lbctl explain`: what the datapath would do with one packet.
//!
//! The answer is found by running the real XDP program (BPF_PROG_TEST_RUN) on a
//! copy of the live service maps, so the agent's maps and counters are left
//! untouched.
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV4};

use aya::programs::{TestRun, TestRunOptions};
use lb_common::{
    BackendSetMemberKey, BackendSlotKey, ConntrackKey, Endpoint, FrontendKey, IPPROTO_TCP, IPPROTO_UDP, Ipv6,
    MAP_BACKEND_SET_MEMBERS, MAP_BACKEND_SLOTS, MAP_SERVICE_BACKEND_SETS, MAP_SERVICE_FRONTENDS,
    MAP_SERVICE_VIPS, Reason, checksum, ip_be, ip_from_be,
    reply::{ETH_HLEN, ETH_P_IPV4, IPV4_HLEN, TCP_ACK, TCP_HLEN, TCP_SYN, UDP_HLEN},
};
use serde::Serialize;

use crate::{
    datapath::Datapath,
    error::{Error, Result},
    inspect::PinnedMaps,
};

/// The question: a packet from `source` to `destination` (of one family).
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    /// IPPROTO_TCP (a SYN is sent) or IPPROTO_UDP.
    pub proto: u8,
}

/// The answer.
#[derive(Debug, Serialize)]
pub struct Explanation {
    /// The verdict reason the datapath counted.
    pub verdict: &'static str,
    /// "pass", "drop" or "bounce" (sent back: a reject).
    pub action: &'static str,
    pub service: Option<String>,
    /// Where the packet would go, when translated.
    pub backend: Option<String>,
    pub why: String,
}

const ETH_P_IPV6: u16 = 0x86dd;
const IPV6_HLEN: usize = 40;

/// The IP header's length for the probe's family.
fn ip_header_len(probe: &Probe) -> usize {
    if probe.destination.is_ipv6() { IPV6_HLEN } else { IPV4_HLEN }
}

/// An Ethernet + IPv4 or IPv6 + TCP SYN or UDP packet with valid
/// checksums.
pub fn probe_packet(probe: &Probe, tcp_flags: u8) -> Vec<u8> {
    let l4_len = if probe.proto == IPPROTO_TCP { TCP_HLEN } else { UDP_HLEN };
    let ip_len = ip_header_len(probe);
    let mut packet = vec![0u8; ETH_HLEN + ip_len + l4_len];
    packet[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    packet[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    let ip = &mut packet[ETH_HLEN..ETH_HLEN + ip_len];
    let (ethertype, pseudo) = match (probe.source.ip(), probe.destination.ip()) {
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            ip[6] = probe.proto;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&src.octets());
            ip[24..40].copy_from_slice(&dst.octets());
            // The pseudo-header: both addresses, the length and the next
            // header as 32-bit words.
            let mut pseudo = [0u8; 40];
            pseudo[..32].copy_from_slice(&ip[8..40]);
            pseudo[32..36].copy_from_slice(&(l4_len as u32).to_be_bytes());
            pseudo[39] = probe.proto;
            (ETH_P_IPV6, checksum::sum_words(&pseudo, 0))
        }
        (src, dst) => {
            let v4 = |ip: IpAddr| if let IpAddr::V4(ip) = ip { ip_be(ip) } else { 0 };
            let (src, dst) = (v4(src), v4(dst));
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((IPV4_HLEN + l4_len) as u16).to_be_bytes());
            ip[8] = 64;
            ip[9] = probe.proto;
            ip[12..16].copy_from_slice(&src.to_ne_bytes());
            ip[16..20].copy_from_slice(&dst.to_ne_bytes());
            let check = checksum::finish(checksum::sum_words(ip, 0));
            ip[10..12].copy_from_slice(&check.to_ne_bytes());
            (ETH_P_IPV4, checksum::pseudo_header_sum(src, dst, probe.proto, l4_len as u16))
        }
    };
    packet[12..14].copy_from_slice(&ethertype.to_be_bytes());
    let l4 = &mut packet[ETH_HLEN + ip_len..];
    l4[0..2].copy_from_slice(&probe.source.port().to_be_bytes());
    l4[2..4].copy_from_slice(&probe.destination.port().to_be_bytes());
    let check_at = if probe.proto == IPPROTO_TCP {
        l4[4..8].copy_from_slice(&1u32.to_be_bytes());
        l4[12] = ((TCP_HLEN / 4) as u8) << 4;
        l4[13] = tcp_flags;
        l4[14..16].copy_from_slice(&64240u16.to_be_bytes());
        16
    } else {
        l4[4..6].copy_from_slice(&(UDP_HLEN as u16).to_be_bytes());
        6
    };
    let check = checksum::finish(checksum::sum_words(l4, pseudo));
    l4[check_at..check_at + 2].copy_from_slice(&check.to_ne_bytes());
    packet
}

fn copy_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |source| Error::Map { name, source }
}

/// Runs the probe through a fresh copy of the datapath holding the live
/// services and the live conntrack entry of the probe's 5-tuple.
pub fn explain(live: &PinnedMaps, probe: &Probe) -> Result<Explanation> {
    let mut copy = Datapath::load()?;
    let found = match (probe.source, probe.destination) {
        (SocketAddr::V4(source), SocketAddr::V4(destination)) => copy_ipv4(live, &mut copy, source, destination, probe.proto)?,
        (SocketAddr::V6(source), SocketAddr::V6(destination)) => copy_ipv6(live, &mut copy, (source, destination), probe.proto)?,
        _ => return Err(Error::Usage(format!("{} and {} are not of one family: give two IPv4 or two IPv6 addresses", probe.source, probe.destination))),
    };
    run(live, &copy, probe, found)
}

/// What the copy holds of the probe's flow and service: the flow's entry
/// (service id), and the destination's frontend (service id, backends).
struct Copied {
    flow_service: Option<u32>,
    frontend: Option<(u32, u32)>,
}

/// Copies every live IPv4 service and the probe's conntrack entry.
fn copy_ipv4(live: &PinnedMaps, copy: &mut Datapath, source: SocketAddrV4, destination: SocketAddrV4, proto: u8) -> Result<Copied> {
    let maps = &mut copy.maps;
    for entry in live.frontends.iter() {
        let (key, value) = entry.map_err(copy_err(MAP_SERVICE_FRONTENDS))?;
        maps.frontends.insert(key, value, 0).map_err(copy_err(MAP_SERVICE_FRONTENDS))?;
        let set = live.service_backend_sets.get(&value.service_id, 0).map_err(copy_err(MAP_SERVICE_BACKEND_SETS))?;
        maps.service_backend_sets.set(value.service_id, set, 0).map_err(copy_err(MAP_SERVICE_BACKEND_SETS))?;
    }
    for entry in live.vips.iter() {
        let (key, value) = entry.map_err(copy_err(MAP_SERVICE_VIPS))?;
        maps.service_vips.insert(key, value, 0).map_err(copy_err(MAP_SERVICE_VIPS))?;
    }
    for entry in live.slots.iter() {
        let (key, value): (BackendSlotKey, _) = entry.map_err(copy_err(MAP_BACKEND_SLOTS))?;
        maps.backend_slots.insert(key, value, 0).map_err(copy_err(MAP_BACKEND_SLOTS))?;
    }
    for entry in live.members.iter() {
        let (key, value): (BackendSetMemberKey, _) = entry.map_err(copy_err(MAP_BACKEND_SET_MEMBERS))?;
        maps.backend_set_members.insert(key, value, 0).map_err(copy_err(MAP_BACKEND_SET_MEMBERS))?;
    }
    let config = live.config.get(&0, 0).map_err(copy_err(lb_common::MAP_DATAPATH_CONFIG))?;
    maps.set_config(config)?;
    let tuple = ConntrackKey::new(source, destination, proto);
    let found = live.conntrack.find(&tuple);
    if let Some((name, value)) = found {
        let table = maps.conntrack.named_mut(name).ok_or(Error::Missing(name))?;
        table.insert(tuple, value, 0).map_err(copy_err(name))?;
    }
    let frontend = live.frontends.get(&FrontendKey::new(*destination.ip(), destination.port(), proto), 0).ok();
    Ok(Copied { flow_service: found.map(|(_, v)| v.service_id), frontend: frontend.map(|f| (f.service_id, f.backend_count)) })
}

/// Copies the IPv6 service the probe is addressed to (its frontend,
/// address and backend set; the copy's IPv6 tables are small) and the
/// probe's conntrack entry.
fn copy_ipv6(live: &PinnedMaps, copy: &mut Datapath, (source, destination): (std::net::SocketAddrV6, std::net::SocketAddrV6), proto: u8) -> Result<Copied> {
    let v6 = &mut copy.maps.ipv6;
    let address = Ipv6::new(*destination.ip());
    let key = FrontendKey { ip: address, port: destination.port().to_be(), proto, _pad: 0, _pad_v6: 0 };
    let frontend = live.ipv6.frontends.get(&key, 0).ok();
    if let Some(value) = frontend {
        v6.frontends.insert(key, value, 0).map_err(copy_err(lb_common::MAP_SERVICE_FRONTENDS_V6))?;
        let set = live.service_backend_sets.get(&value.service_id, 0).map_err(copy_err(MAP_SERVICE_BACKEND_SETS))?;
        copy.maps.service_backend_sets.set(value.service_id, set, 0).map_err(copy_err(MAP_SERVICE_BACKEND_SETS))?;
        for entry in live.ipv6.slots.iter() {
            let (slot, backend) = entry.map_err(copy_err(lb_common::MAP_BACKEND_SLOTS_V6))?;
            if slot.backend_set == value.backend_set || slot.backend_set == set {
                v6.backend_slots.insert(slot, backend, 0).map_err(copy_err(lb_common::MAP_BACKEND_SLOTS_V6))?;
                v6.backend_set_members.insert(BackendSetMemberKey::new(slot.backend_set, backend), slot.slot, 0)
                    .map_err(copy_err(lb_common::MAP_BACKEND_SET_MEMBERS_V6))?;
            }
        }
    }
    if let Ok(vip) = live.ipv6.vips.get(&address, 0) {
        v6.service_vips.insert(address, vip, 0).map_err(copy_err(lb_common::MAP_SERVICE_VIPS_V6))?;
    }
    let config = live.ipv6.config.get(&0, 0).map_err(copy_err(lb_common::MAP_DATAPATH_CONFIG_V6))?;
    copy.maps.set_config_v6(config)?;
    let config = live.config.get(&0, 0).map_err(copy_err(lb_common::MAP_DATAPATH_CONFIG))?;
    copy.maps.set_config(config)?;
    let endpoint = |addr: std::net::SocketAddrV6| Endpoint { ip: Ipv6::new(*addr.ip()), port: addr.port().to_be() };
    let tuple = ConntrackKey::of(endpoint(source), endpoint(destination), proto);
    let found = live.ipv6.find_flow(&tuple);
    if let Some((name, value)) = found {
        let v6 = &mut copy.maps.ipv6;
        let table = match name {
            lb_common::MAP_CONNTRACK_UDP_V6 => &mut v6.conntrack_udp,
            lb_common::MAP_CONNTRACK_TCP_PENDING_V6 => &mut v6.conntrack_tcp_pending,
            _ => &mut v6.conntrack_tcp,
        };
        table.insert(tuple, value, 0).map_err(copy_err(name))?;
    }
    Ok(Copied { flow_service: found.map(|(_, v)| v.service_id), frontend: frontend.map(|f| (f.service_id, f.backend_count)) })
}

/// Runs the probe through the copy and says what it did.
fn run(live: &PinnedMaps, copy: &Datapath, probe: &Probe, found: Copied) -> Result<Explanation> {
    // A tracked flow's next packet, or a new connection's first.
    let input = probe_packet(probe, if found.flow_service.is_some() { TCP_ACK } else { TCP_SYN });
    let mut output = vec![0u8; input.len() + 128];
    let result = copy
        .xdp_program()?
        .test_run(TestRunOptions { data_in: Some(&input), data_out: Some(&mut output), repeat: 1, ..Default::default() })
        .map_err(|source| Error::Program { name: lb_common::PROG_XDP, source })?;
    let totals = copy.maps.verdict_totals()?;
    let reason = Reason::ALL.into_iter().find(|r| totals[*r as usize] > 0).unwrap_or(Reason::PassNotService);
    let action = match result.return_value {
        1 => "drop",
        3 => "bounce",
        _ => "pass",
    };
    let service_id = found.flow_service.or(found.frontend.map(|(id, _)| id));
    let service = service_id.map(|id| live.name(id));
    let ip_len = ip_header_len(probe);
    let out_dst = (result.data_size_out as usize >= ETH_HLEN + ip_len + 4).then(|| {
        let l4 = ETH_HLEN + ip_len;
        let port = u16::from_be_bytes([output[l4 + 2], output[l4 + 3]]);
        let ip: IpAddr = if probe.destination.is_ipv6() {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&output[ETH_HLEN + 24..ETH_HLEN + 40]);
            Ipv6Addr::from(octets).into()
        } else {
            ip_from_be(u32::from_ne_bytes([output[30], output[31], output[32], output[33]])).into()
        };
        SocketAddr::new(ip, port)
    });
    let backend = match reason {
        Reason::ForwardNew | Reason::ForwardEstablished | Reason::ForwardRescheduled => out_dst.map(|d| d.to_string()),
        _ => None,
    };
    let backends = found.frontend.map_or(0, |(_, count)| count);
    let why = match reason {
        Reason::ForwardNew => format!("a new connection: one of the service's {backends} endpoints picked at random, and the flow recorded"),
        Reason::ForwardEstablished => "an established flow: its conntrack entry's backend still serves the service".to_owned(),
        Reason::ForwardRescheduled => "a tracked flow whose backend left the service: a new endpoint picked".to_owned(),
        Reason::ReplyTranslated => "a backend's reply: its source becomes the service address again".to_owned(),
        Reason::RejectNoBackend => "the service has no ready endpoints: rejected (TCP reset / ICMP port unreachable)".to_owned(),
        Reason::RejectUnknownPort => "a service address, but no service on this port and protocol: rejected".to_owned(),
        Reason::DropNoLocalEndpoint => "internalTrafficPolicy Local and no endpoint on this node: dropped".to_owned(),
        Reason::PassNotService => "not addressed to a service and not a reply: passed unchanged".to_owned(),
        Reason::IcmpErrorTranslated => "an ICMP error about a tracked flow: translated like the flow's packets".to_owned(),
        Reason::DropUnallocatedClusterIp => "an address in --service-cidr that no service has: dropped".to_owned(),
        Reason::EchoAnswered => "an echo request to a cluster IP: answered from it (--answer-ping)".to_owned(),
        other => format!("{}: see docs/architecture.md", other.name()),
    };
    Ok(Explanation { verdict: reason.name(), action, service, backend, why })
}

/// Parses "ip" or "ip:port" ("[ip]:port" for IPv6; port 40000 when left
/// out).
pub fn parse_source(text: &str) -> std::result::Result<SocketAddr, String> {
    text.parse::<SocketAddr>()
        .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 40000)))
        .map_err(|_| format!("{text:?} is not an IP address or address:port ([address]:port for IPv6)"))
}

pub fn parse_protocol(text: &str) -> std::result::Result<u8, String> {
    match text.to_ascii_lowercase().as_str() {
        "tcp" => Ok(IPPROTO_TCP),
        "udp" => Ok(IPPROTO_UDP),
        _ => Err(format!("{text:?} is not tcp or udp")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both families' probes: the IPv4 header checksum, and the TCP or
    /// UDP checksum over the family's pseudo-header.
    #[test]
    fn probe_packets_carry_valid_checksums() {
        let cases = [("IPv4", "10.0.0.2:40000", "10.96.0.10:80"), ("IPv6", "[fd00::2]:40000", "[fd00:96::10]:80")];
        for (family, source, destination) in cases {
            for proto in [IPPROTO_TCP, IPPROTO_UDP] {
                let probe = Probe { source: source.parse().expect("addr"), destination: destination.parse().expect("addr"), proto };
                let packet = probe_packet(&probe, TCP_SYN);
                let ip_len = ip_header_len(&probe);
                let l4 = &packet[ETH_HLEN + ip_len..];
                let pseudo = match (probe.source.ip(), probe.destination.ip()) {
                    (IpAddr::V4(src), IpAddr::V4(dst)) => {
                        assert_eq!(checksum::fold(checksum::sum_words(&packet[14..34], 0)), 0xffff, "IPv4 header");
                        checksum::pseudo_header_sum(ip_be(src), ip_be(dst), proto, l4.len() as u16)
                    }
                    _ => {
                        assert_eq!(&packet[12..14], &[0x86, 0xdd], "the IPv6 ethertype");
                        pseudo_v6(&probe, l4.len())
                    }
                };
                assert_eq!(checksum::fold(checksum::sum_words(l4, pseudo)), 0xffff, "{family} L4 {proto}");
            }
        }
    }

    /// The IPv6 pseudo-header's sum, computed from its definition (RFC
    /// 8200 §8.1) independently of `probe_packet`.
    fn pseudo_v6(probe: &Probe, l4_len: usize) -> u32 {
        let (IpAddr::V6(src), IpAddr::V6(dst)) = (probe.source.ip(), probe.destination.ip()) else { return 0 };
        let mut header = Vec::new();
        header.extend_from_slice(&src.octets());
        header.extend_from_slice(&dst.octets());
        header.extend_from_slice(&(l4_len as u32).to_be_bytes());
        header.extend_from_slice(&[0, 0, 0, probe.proto]);
        checksum::sum_words(&header, 0)
    }

    #[test]
    fn wrong_arguments_say_what_is_wrong() {
        assert!(parse_source("10.0.0.300").expect_err("invalid").contains("not an IP address"));
        assert_eq!(parse_source("10.0.0.2").map(|s| s.port()), Ok(40000));
        assert_eq!(parse_source("fd00::2").map(|s| s.port()), Ok(40000), "an IPv6 address alone");
        assert_eq!(parse_source("[fd00::2]:45000").map(|s| s.port()), Ok(45000));
        assert!(parse_protocol("sctp").expect_err("invalid").contains("not tcp or udp"));
    }
}
