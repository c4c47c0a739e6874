//! This node's own IPv4 addresses, where node ports answer unless told otherwise.
//!
//! Used when no `--node-ip` is given and no Node object says otherwise (the
//! manifests source): every address of an interface that is up, except loopback
//! and link-local ones, as kube-proxy's iptables mode answers on all local
//! addresses. The first (the source of translated traffic) is the one of the
//! interface holding the default route.
use std::net::Ipv4Addr;

/// The node's addresses, the default route's interface first; the
/// interfaces and the routing table read at once.
pub fn local() -> std::io::Result<Vec<Ipv4Addr>> {
    let routes = std::fs::read_to_string("/proc/net/route")?;
    Ok(ordered(interface_addresses()?, default_route_interface(&routes).as_deref()))
}

/// (interface, address) of every IPv4 address of an interface that is up.
fn interface_addresses() -> std::io::Result<Vec<(String, Ipv4Addr)>> {
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
        // SAFETY: ifa_addr is null or points at a sockaddr of its family.
        if !up || ifa.ifa_addr.is_null() || i32::from(unsafe { (*ifa.ifa_addr).sa_family }) != libc::AF_INET {
            continue;
        }
        // SAFETY: an AF_INET address is a sockaddr_in; the name a C string.
        let (addr, name) = unsafe {
            let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
            (Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)), std::ffi::CStr::from_ptr(ifa.ifa_name).to_string_lossy().into_owned())
        };
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

/// The usable addresses, those of `primary` first, each once.
fn ordered(addresses: Vec<(String, Ipv4Addr)>, primary: Option<&str>) -> Vec<Ipv4Addr> {
    let usable = |ip: &Ipv4Addr| !ip.is_loopback() && !ip.is_link_local() && !ip.is_unspecified();
    let mut ordered: Vec<Ipv4Addr> = Vec::new();
    let first = addresses.iter().filter(|(iface, _)| Some(iface.as_str()) == primary);
    let rest = addresses.iter().filter(|(iface, _)| Some(iface.as_str()) != primary);
    for (_, ip) in first.chain(rest) {
        if usable(ip) && !ordered.contains(ip) {
            ordered.push(*ip);
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
        let addresses = vec![
            ("lo".to_owned(), Ipv4Addr::new(127, 0, 0, 1)),
            ("eth1".to_owned(), Ipv4Addr::new(192, 168, 0, 5)),
            ("eth0".to_owned(), Ipv4Addr::new(10, 0, 0, 7)),
            ("eth2".to_owned(), Ipv4Addr::new(169, 254, 1, 1)),
            ("eth0".to_owned(), Ipv4Addr::new(10, 0, 0, 8)),
        ];
        let cases = [
            ("the default route's interface first", Some("eth0"), vec![[10, 0, 0, 7], [10, 0, 0, 8], [192, 168, 0, 5]]),
            ("without a default route, in interface order", None, vec![[192, 168, 0, 5], [10, 0, 0, 7], [10, 0, 0, 8]]),
        ];
        for (rule, primary, expected) in cases {
            let expected: Vec<Ipv4Addr> = expected.into_iter().map(Ipv4Addr::from).collect();
            assert_eq!(ordered(addresses.clone(), primary), expected, "{rule}");
        }
    }
}
