//! Packet fuzzing through BPF_PROG_TEST_RUN on both hooks.
//!
//! With live service maps (services with and without endpoints, a node address
//! for source NAT, pod and service ranges), the cases are random frames and
//! mutations of valid ones (bit flips, random bytes, truncation, extension,
//! random lengths, header lengths, flags and protocols). Properties checked on
//! every case:
//! - the verdict is one the program defines (the fixture refuses others);
//! - a packet passed as not the datapath's (not a service, not IPv4,
//!   malformed) leaves byte for byte unchanged;
//! - a translated packet, or a reject or echo answer, whose input
//!   checksums verified has IPv4 and L4 checksums that verify when
//!   recomputed here, independently;
//! - the conntrack tables hold at most two entries per flow the counters
//!   say was placed.
//!
//! `LB_FUZZ_CASES` sets the number of cases (default 200,000) and
//! `LB_FUZZ_SEED` the seed (default: the time); a failure prints both, to
//! replay it. Needs root.
use lb_common::{DatapathConfig, Ipv4Cidr, Ipv4Cidrs, Reason, SNAT_PORT_MAX, SNAT_PORT_MIN, ip_be};
use lb_tests::{
    fixture::{Fixture, Hook, Verdict, desired, service},
    packets::{Frame, echo_request},
};
use lb_userspace::model::Protocol;

/// xorshift64*: small, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

fn fixture() -> Fixture {
    let mut fixture = Fixture::new(&desired([
        service("web", [10, 96, 0, 10], 80, Protocol::Tcp, &[([10, 244, 1, 2], 8080), ([10, 244, 2, 2], 8080)]),
        service("dns", [10, 96, 0, 10], 53, Protocol::Udp, &[([10, 244, 1, 2], 5353)]),
        service("empty", [10, 96, 0, 11], 80, Protocol::Tcp, &[]),
        service("empty", [10, 96, 0, 11], 53, Protocol::Udp, &[]),
    ]));
    let config = DatapathConfig {
        snat_ip: ip_be([192, 168, 0, 1].into()),
        snat_port_min: SNAT_PORT_MIN,
        snat_port_max: SNAT_PORT_MAX,
        flags: lb_common::DATAPATH_ANSWER_ECHO,
        cluster_cidrs: Ipv4Cidrs::new([Ipv4Cidr::new([10, 244, 0, 0].into(), 16)]),
        service_cidrs: Ipv4Cidrs::new([Ipv4Cidr::new([10, 96, 0, 0].into(), 16)]),
        ..DatapathConfig::default()
    };
    fixture.datapath.maps.set_config(config).expect("config");
    fixture
}

/// Valid frames the mutations start from: new flows, replies, data,
/// rejects, non-service traffic, ping, options.
fn seeds() -> Vec<Vec<u8>> {
    vec![
        Frame::tcp_syn("10.0.0.2:40000", "10.96.0.10:80").bytes(),
        Frame::tcp_syn("10.244.3.4:40001", "10.96.0.10:80").bytes(),
        Frame::tcp_data("10.0.0.2:40000", "10.96.0.10:80", b"GET / HTTP/1.1\r\n\r\n").bytes(),
        Frame::tcp_syn_ack("10.244.1.2:8080", "10.0.0.2:40000").bytes(),
        Frame::udp("10.0.0.2:40002", "10.96.0.10:53", b"query").bytes(),
        Frame::udp("10.244.1.2:5353", "10.0.0.2:40002", b"answer").bytes(),
        Frame::tcp_syn("10.0.0.2:40003", "10.96.0.11:80").bytes(),
        Frame::udp("10.0.0.2:40004", "10.96.0.11:53", b"q").bytes(),
        Frame::tcp_syn("10.0.0.2:40005", "10.96.0.99:80").bytes(),
        Frame::tcp_syn("10.0.0.2:40006", "192.168.0.1:22").bytes(),
        Frame::tcp_syn("10.0.0.2:40007", "10.96.0.10:80").with_ip_options(&[1, 1, 1, 0]).bytes(),
        echo_request([10, 0, 0, 2], [10, 96, 0, 10], 64),
    ]
}

/// A random frame: an Ethernet header for IPv4, then anything.
fn random_frame(rng: &mut Rng) -> Vec<u8> {
    let mut frame = Frame::tcp_syn("10.0.0.2:1", "10.96.0.10:80").bytes()[..14].to_vec();
    let len = rng.below(120);
    frame.extend((0..len).map(|_| rng.byte()));
    frame
}

/// One to three mutations of `frame`.
fn mutate(rng: &mut Rng, mut frame: Vec<u8>) -> Vec<u8> {
    for _ in 0..=rng.below(3) {
        let at = 14 + rng.below(frame.len().saturating_sub(14));
        match rng.below(9) {
            0 if at < frame.len() => frame[at] ^= 1 << rng.below(8),
            1 if at < frame.len() => frame[at] = rng.byte(),
            2 => frame.truncate(14 + rng.below(frame.len().saturating_sub(13))),
            3 => frame.extend((0..rng.below(40)).map(|_| rng.byte())),
            4 if frame.len() >= 18 => {
                let total = rng.below(200) as u16;
                frame[16..18].copy_from_slice(&total.to_be_bytes());
            }
            5 if frame.len() > 14 => frame[14] = 0x40 | (rng.byte() & 0x0f),
            6 if frame.len() > 23 => frame[23] = [1, 6, 17, rng.byte()][rng.below(4)],
            7 if frame.len() > 20 => frame[20] = rng.byte() & 0x3f,
            8 if frame.len() > 46 => frame[46] = rng.byte(),
            _ => {}
        }
    }
    frame
}

/// The one's-complement sum of `data` as 16-bit big-endian words.
fn ones_sum(data: &[u8], mut sum: u32) -> u32 {
    for pair in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]));
    }
    sum
}

fn folded(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Whether an IPv4 frame's header checksum, and for an unfragmented TCP or
/// UDP packet its L4 checksum (UDP's 0 meaning none), verify; `None` when
/// the frame is not one whose checksums can be judged.
fn checksums_verify(frame: &[u8]) -> Option<bool> {
    let ip = frame.get(14..)?;
    let ihl = usize::from(*ip.first()? & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    if ip[0] >> 4 != 4 || ihl < 20 || total < ihl || total > ip.len() {
        return None;
    }
    let header_ok = folded(ones_sum(&ip[..ihl], 0)) == 0xffff;
    let fragmented = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
    let proto = ip[9];
    let segment = &ip[ihl..total];
    if fragmented || !(proto == 6 && segment.len() >= 20 || proto == 17 && segment.len() >= 8) {
        return Some(header_ok);
    }
    if proto == 17 && segment[6..8] == [0, 0] {
        return Some(header_ok);
    }
    let pseudo = ones_sum(&ip[12..20], u32::from(proto) + segment.len() as u32);
    Some(header_ok && folded(ones_sum(segment, pseudo)) == 0xffff)
}

#[test]
fn fuzzed_packets_keep_the_datapaths_promises() {
    let cases: usize = std::env::var("LB_FUZZ_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(200_000);
    let seed: u64 = std::env::var("LB_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1
    });
    let replay = format!("LB_FUZZ_SEED={seed} LB_FUZZ_CASES={cases}");
    let mut rng = Rng(seed);
    let fixture = fixture();
    let seeds = seeds();
    let unchanged_reasons = [Reason::PassNotService, Reason::PassNotIp, Reason::PassMalformed];
    let translated_reasons = [Reason::ForwardNew, Reason::ForwardEstablished, Reason::ForwardRescheduled, Reason::ReplyTranslated];
    let (mut ran, mut translated, mut checked) = (0usize, 0usize, 0usize);
    let mut by_reason = [0u64; Reason::COUNT as usize];
    for case in 0..cases {
        let input = match rng.below(4) {
            0 => random_frame(&mut rng),
            _ => {
                let seed = seeds[rng.below(seeds.len())].clone();
                mutate(&mut rng, seed)
            }
        };
        let hook = if case % 2 == 0 { Hook::Xdp } else { Hook::Tc };
        let before = fixture.reason_totals();
        let result = match fixture.try_run(hook, &input) {
            Ok(result) => result,
            // The kernel's test runner builds no skb from a frame whose
            // IPv4 header is cut short (the stack never hands tc one).
            Err(_) if hook == Hook::Tc && input.len() < 34 => continue,
            Err(e) => panic!("case {case} ({replay}): {e}\ninput {input:02x?}"),
        };
        ran += 1;
        let after = fixture.reason_totals();
        let counted: Vec<Reason> = Reason::ALL.into_iter().filter(|r| after[*r as usize] != before[*r as usize]).collect();
        assert_eq!(counted.len(), 1, "case {case} ({replay}): one reason per packet, got {counted:?}\ninput {input:02x?}");
        let reason = counted[0];
        by_reason[reason as usize] += 1;
        if unchanged_reasons.contains(&reason) {
            assert_eq!(result.verdict, Verdict::Pass, "case {case} ({replay}): {reason:?}");
            assert_eq!(result.output, input, "case {case} ({replay}): {reason:?} must leave the packet unchanged");
        }
        if result.verdict == Verdict::Bounce && checksums_verify(&input) == Some(true) {
            assert_eq!(
                checksums_verify(&result.output),
                Some(true),
                "case {case} ({replay}): the {reason:?} answer has a bad checksum\ninput  {input:02x?}\noutput {:02x?}",
                result.output
            );
        }
        if translated_reasons.contains(&reason) {
            translated += 1;
            if checksums_verify(&input) == Some(true) {
                checked += 1;
                assert_eq!(
                    checksums_verify(&result.output),
                    Some(true),
                    "case {case} ({replay}): {reason:?} broke a checksum\ninput  {input:02x?}\noutput {:02x?}",
                    result.output
                );
            }
        }
    }
    let placed = by_reason[Reason::ForwardNew as usize] + by_reason[Reason::ForwardRescheduled as usize];
    let entries: usize = fixture.datapath.maps.conntrack.tables().iter().map(|(_, _, table)| table.keys().count()).sum();
    assert!(entries as u64 <= 2 * placed, "{entries} conntrack entries for {placed} flows placed ({replay})");
    let counted: Vec<String> = Reason::ALL.into_iter().filter(|r| by_reason[*r as usize] > 0).map(|r| format!("{} {}", r.name(), by_reason[r as usize])).collect();
    println!("{ran} fuzzed packets ({replay}): {translated} translated ({checked} with checksums checked), {entries} conntrack entries; {}", counted.join(", "));
    assert!(translated > cases / 100 && checked > 0, "the fuzzer reached the translation paths");
}

/// A value of a random kind, sometimes large or with odd text.
fn random_value(rng: &mut Rng) -> serde_json::Value {
    use serde_json::json;
    match rng.below(9) {
        0 => json!(null),
        1 => json!(rng.next() as i64),
        2 => json!(-1),
        3 => json!("ünïcödé 🚀 \u{202e}\u{0}"),
        4 => json!(rng.below(2) == 0),
        5 => json!([]),
        6 => json!((0..2_000).map(|i| format!("10.{}.{}.1", i / 256, i % 256)).collect::<Vec<_>>()),
        7 => json!({}),
        _ => json!("x".repeat(rng.below(300))),
    }
}

/// `value` with one field somewhere replaced by a random value or removed.
fn mutate_object(rng: &mut Rng, value: &mut serde_json::Value) {
    // A random path down, as a JSON pointer; then an edit there.
    let mut path = Vec::new();
    let mut node = &*value;
    for _ in 0..rng.below(5) {
        let step = match node {
            serde_json::Value::Object(map) if !map.is_empty() => map.keys().nth(rng.below(map.len())).cloned(),
            serde_json::Value::Array(items) if !items.is_empty() => Some(rng.below(items.len()).to_string()),
            _ => None,
        };
        let Some(step) = step else { break };
        let Some(child) = node.get(&step).or_else(|| step.parse::<usize>().ok().and_then(|i| node.get(i))) else { break };
        path.push(step.replace('~', "~0").replace('/', "~1"));
        node = child;
    }
    let remove = matches!(node, serde_json::Value::Object(map) if !map.is_empty()) && rng.below(3) == 0;
    let pointer = path.iter().map(|step| format!("/{step}")).collect::<String>();
    let Some(target) = value.pointer_mut(&pointer) else { return };
    match target {
        serde_json::Value::Object(map) if remove => {
            let key = map.keys().nth(rng.below(map.len())).cloned().unwrap_or_default();
            map.remove(&key);
        }
        other => *other = random_value(rng),
    }
}

/// Mutated Services, EndpointSlices, legacy Endpoints and Nodes, written as
/// manifests beside a good service: reading and modelling them never
/// panics, what cannot be read is skipped with a line naming it, and the
/// good service is always programmed with its endpoint.
#[test]
fn fuzzed_objects_are_skipped_alone() {
    use serde_json::json;
    let cases: usize = std::env::var("LB_FUZZ_OBJECTS").ok().and_then(|c| c.parse().ok()).unwrap_or(2_000);
    let seed: u64 = std::env::var("LB_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed) | 1;
    let mut rng = Rng(seed);
    let service = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "fuzz", "namespace": "default"},
        "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.20", "externalIPs": ["198.51.100.1"], "sessionAffinity": "ClientIP",
            "loadBalancerSourceRanges": ["10.0.0.0/8"], "trafficDistribution": "PreferClose",
            "ports": [{"name": "http", "port": 80, "targetPort": "web", "nodePort": 30080, "protocol": "TCP"}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.1", "ipMode": "VIP"}]}}});
    let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "fuzz-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "fuzz"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.244.1.9"], "conditions": {"ready": true, "serving": true, "terminating": false},
            "nodeName": "node-1", "zone": "a", "hints": {"forZones": [{"name": "a"}]}}]});
    let endpoints = json!({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "legacy", "namespace": "default"},
        "subsets": [{"addresses": [{"ip": "10.244.1.7", "nodeName": "node-1"}], "notReadyAddresses": [{"ip": "10.244.1.8"}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}]});
    let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1", "labels": {"topology.kubernetes.io/zone": "a"}},
        "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]}});
    let good = "apiVersion: v1\nkind: Service\nmetadata: {name: good, namespace: default}\nspec:\n  clusterIP: 10.96.0.30\n  \
                ports: [{name: http, port: 80, targetPort: 8080}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                metadata: {name: good-1, namespace: default, labels: {kubernetes.io/service-name: good}}\naddressType: IPv4\n\
                ports: [{name: http, port: 8080}]\nendpoints: [{addresses: [\"10.244.1.2\"]}]\n";
    let dir = lb_tests::cluster::TempDir::new("fuzz-manifests").expect("dir");
    std::fs::write(dir.0.join("good.yaml"), good).expect("good manifest");
    let mut skipped_lines = 0;
    for case in 0..cases {
        let mut objects = [service.clone(), slice.clone(), endpoints.clone(), node.clone()];
        for _ in 0..=rng.below(4) {
            let target = rng.below(objects.len());
            mutate_object(&mut rng, &mut objects[target]);
        }
        let text = objects.iter().map(|o| serde_yaml_ng::to_string(o).expect("yaml")).collect::<Vec<_>>().join("\n---\n");
        std::fs::write(dir.0.join("fuzz.yaml"), &text).expect("fuzzed manifest");
        let update = lb_userspace::source::manifests::ManifestDir::for_node(dir.0.clone(), "node-1").load().expect("the directory reads");
        let computed = lb_userspace::model::kubernetes::desired_state(&update.objects, "node-1");
        let good_port = lb_userspace::model::ServicePortName::new("default", "good", "http");
        let endpoints = computed.state.services.get(&good_port).map(|p| p.endpoints.len());
        assert_eq!(endpoints, Some(1), "case {case} (LB_FUZZ_SEED={seed}): the good service must stay programmed\n{text}");
        for line in update.skipped.iter().chain(&computed.skipped) {
            let named = objects.iter().filter_map(|o| o["metadata"]["name"].as_str()).filter(|n| !n.is_empty()).any(|name| line.contains(name));
            assert!(named || line.contains("document"), "case {case}: a skip line names its object: {line}");
        }
        skipped_lines += update.skipped.len() + computed.skipped.len();
    }
    println!("{cases} fuzzed sets of a Service, an EndpointSlice, an Endpoints and a Node (LB_FUZZ_SEED={seed}): {skipped_lines} skip lines, the good service programmed every time");
}
