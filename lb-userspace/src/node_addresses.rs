//! This node's own addresses, where node ports answer unless told otherwise.
//!
//! Used when no `--node-ip` is given and no Node object says otherwise (the
//! manifests source): every address of an interface that is up, except loopback
//! and link-local ones, as kube-proxy's iptables mode answers on all local
//! addresses. The first of each family (the source of that family's translated
//! traffic) is one of the interface holding the IPv4 default route.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The node's addresses, IPv4 then IPv6, the default route's interface
/// first in each; the interfaces and the routing table read at once.
pub fn local() -> std::io::Result<Vec<IpAddr>> {
    let routes = std::fs::read_to_string("/proc/net/route")?;
    Ok(ordered(interface_addresses()?, default_route_interface(&routes).as_deref()))
}

/// (interface, address) of every address of an interface that is up.
fn interface_addresses() -> std::io::Result<Vec<(String, IpAddr)>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut found = Vec::new();
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: a node of the list getifaddrs returned, not freed yet.
        let ifa = unsafe { &*entry };
        entry = ifa.ifa_next;
        let up = ifa.ifa_flags & libc::IFF_UP as u32 != 0;
        if !up || ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points at a sockaddr of its family: an AF_INET
        // one is a sockaddr_in, an AF_INET6 one a sockaddr_in6.
        let addr: IpAddr = match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
            libc::AF_INET => Ipv4Addr::from(u32::from_be(unsafe { (*(ifa.ifa_addr as *const libc::sockaddr_in)).sin_addr.s_addr })).into(),
            libc::AF_INET6 => Ipv6Addr::from(unsafe { (*(ifa.ifa_addr as *const libc::sockaddr_in6)).sin6_addr.s6_addr }).into(),
            _ => continue,
        };
        // SAFETY: the name is a C string.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
        found.push((name, addr));
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(found)
}

/// The interface of the IPv4 default route in `/proc/net/route`'s text.
fn default_route_interface(routes: &str) -> Option<String> {
    routes.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Iface Destination Gateway Flags RefCnt Use Metric Mask …
        (fields.len() > 7 && fields[1] == "00000000" && fields[7] == "00000000").then(|| fields[0].to_owned())
    })
}

/// The usable addresses, IPv4 then IPv6, those of `primary` first in each,
/// each once.
fn ordered(addresses: Vec<(String, IpAddr)>, primary: Option<&str>) -> Vec<IpAddr> {
    let usable = |ip: &IpAddr| match ip {
        IpAddr::V4(ip) => !ip.is_loopback() && !ip.is_link_local() && !ip.is_unspecified(),
        IpAddr::V6(ip) => !ip.is_loopback() && !ip.is_unicast_link_local() && !ip.is_unspecified() && !ip.is_multicast(),
    };
    let mut ordered: Vec<IpAddr> = Vec::new();
    for family_v6 in [false, true] {
        let of_family = addresses.iter().filter(|(_, ip)| ip.is_ipv6() == family_v6);
        let first = of_family.clone().filter(|(iface, _)| Some(iface.as_str()) == primary);
        let rest = of_family.filter(|(iface, _)| Some(iface.as_str()) != primary);
        for (_, ip) in first.chain(rest) {
            if usable(ip) && !ordered.contains(ip) {
                ordered.push(*ip);
            }
        }
    }
    ordered
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_addresses_put_the_default_route_first_and_skip_loopback_and_link_local() {
        let routes = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                      eth1\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                      eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(default_route_interface(routes).as_deref(), Some("eth0"));
        assert_eq!(default_route_interface("Iface\tDestination\n"), None, "no default route");
        let ip = |text: &str| text.parse::<IpAddr>().expect("address");
        let addresses: Vec<(String, IpAddr)> = [
            ("lo", "127.0.0.1"),
            ("lo", "::1"),
            ("eth1", "fd00:1::5"),
            ("eth1", "192.168.0.5"),
            ("eth0", "fe80::1"),
            ("eth0", "10.0.0.7"),
            ("eth2", "169.254.1.1"),
            ("eth0", "fd00:0::7"),
            ("eth0", "10.0.0.8"),
        ]
        .into_iter()
        .map(|(iface, address)| (iface.to_owned(), ip(address)))
        .collect();
        let cases = [
            (
                "IPv4 then IPv6, the default route's interface first in each; no loopback or link-local",
                Some("eth0"),
                vec!["10.0.0.7", "10.0.0.8", "192.168.0.5", "fd00::7", "fd00:1::5"],
            ),
            ("without a default route, in interface order", None, vec!["192.168.0.5", "10.0.0.7", "10.0.0.8", "fd00:1::5", "fd00::7"]),
        ];
        for (rule, primary, expected) in cases {
            let expected: Vec<IpAddr> = expected.into_iter().map(ip).collect();
            assert_eq!(ordered(addresses.clone(), primary), expected, "{rule}");
        }
    }
}
