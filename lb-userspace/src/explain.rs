//! `lbctl explain`: what the datapath would do with one packet.
//!
//! The answer is found by running the real XDP program (BPF_PROG_TEST_RUN) on a
//! copy of the live service maps, so the agent's maps and counters are left
//! untouched.
use std::net::{Ipv4Addr, SocketAddrV4};

use aya::programs::{TestRun, TestRunOptions};
use lb_common::{
    BackendSetMemberKey, BackendSlotKey, ConntrackKey, FrontendKey, IPPROTO_TCP, IPPROTO_UDP,
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

/// The question: a packet from `source` to `destination`.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    pub source: SocketAddrV4,
    pub destination: SocketAddrV4,
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

/// An Ethernet + IPv4 + TCP SYN or UDP packet with valid checksums.
pub fn probe_packet(probe: &Probe, tcp_flags: u8) -> Vec<u8> {
    let l4_len = if probe.proto == IPPROTO_TCP { TCP_HLEN } else { UDP_HLEN };
    let mut packet = vec![0u8; ETH_HLEN + IPV4_HLEN + l4_len];
    packet[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    packet[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    packet[12..14].copy_from_slice(&ETH_P_IPV4.to_be_bytes());
    let (src, dst) = (ip_be(*probe.source.ip()), ip_be(*probe.destination.ip()));
    let ip = &mut packet[ETH_HLEN..ETH_HLEN + IPV4_HLEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((IPV4_HLEN + l4_len) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = probe.proto;
    ip[12..16].copy_from_slice(&src.to_ne_bytes());
    ip[16..20].copy_from_slice(&dst.to_ne_bytes());
    let check = checksum::finish(checksum::sum_words(ip, 0));
    ip[10..12].copy_from_slice(&check.to_ne_bytes());
    let l4 = &mut packet[ETH_HLEN + IPV4_HLEN..];
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
    let pseudo = checksum::pseudo_header_sum(src, dst, probe.proto, l4_len as u16);
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
    let tuple = ConntrackKey::new(probe.source, probe.destination, probe.proto);
    let found = live.conntrack.find(&tuple);
    if let Some((name, value)) = found {
        let table = maps.conntrack.named_mut(name).ok_or(Error::Missing(name))?;
        table.insert(tuple, value, 0).map_err(copy_err(name))?;
    }
    let established = found.map(|(_, value)| value);

    // A tracked flow's next packet, or a new connection's first.
    let input = probe_packet(probe, if established.is_some() { TCP_ACK } else { TCP_SYN });
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
    let frontend = FrontendKey::new(*probe.destination.ip(), probe.destination.port(), probe.proto);
    let service_id = established.map(|ct| ct.service_id).or_else(|| live.frontends.get(&frontend, 0).ok().map(|f| f.service_id));
    let service = service_id.map(|id| live.name(id));
    let out_dst = (result.data_size_out as usize >= ETH_HLEN + IPV4_HLEN + 4).then(|| {
        let ip = u32::from_ne_bytes([output[30], output[31], output[32], output[33]]);
        let port = u16::from_be_bytes([output[36], output[37]]);
        SocketAddrV4::new(ip_from_be(ip), port)
    });
    let backend = match reason {
        Reason::ForwardNew | Reason::ForwardEstablished | Reason::ForwardRescheduled => out_dst.map(|d| d.to_string()),
        _ => None,
    };
    let backends = live.frontends.get(&frontend, 0).map(|f| f.backend_count).unwrap_or(0);
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

/// Parses "ip" or "ip:port" (port 40000 when left out).
pub fn parse_source(text: &str) -> std::result::Result<SocketAddrV4, String> {
    text.parse::<SocketAddrV4>()
        .or_else(|_| text.parse::<Ipv4Addr>().map(|ip| SocketAddrV4::new(ip, 40000)))
        .map_err(|_| format!("{text:?} is not an IPv4 address or address:port"))
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

    #[test]
    fn probe_packets_carry_valid_checksums() {
        for proto in [IPPROTO_TCP, IPPROTO_UDP] {
            let probe = Probe { source: "10.0.0.2:40000".parse().expect("addr"), destination: "10.96.0.10:80".parse().expect("addr"), proto };
            let packet = probe_packet(&probe, TCP_SYN);
            assert_eq!(checksum::fold(checksum::sum_words(&packet[14..34], 0)), 0xffff, "IP header");
            let l4 = &packet[34..];
            let pseudo = checksum::pseudo_header_sum(ip_be([10, 0, 0, 2].into()), ip_be([10, 96, 0, 10].into()), proto, l4.len() as u16);
            assert_eq!(checksum::fold(checksum::sum_words(l4, pseudo)), 0xffff, "L4 {proto}");
        }
    }

    #[test]
    fn wrong_arguments_say_what_is_wrong() {
        assert!(parse_source("10.0.0.300").expect_err("invalid").contains("not an IPv4 address"));
        assert_eq!(parse_source("10.0.0.2").map(|s| s.port()), Ok(40000));
        assert!(parse_protocol("sctp").expect_err("invalid").contains("not tcp or udp"));
    }
}
