//! Destroying the node's own sockets that went to a backend which has since left its service.
//!
//! The socket programs sent them there, so their cookies are the ones
//! `SOCKET_REVNAT` remembers; sock_diag finds them (a dump of the node's IPv4
//! TCP and connected UDP sockets) and destroys them (SOCK_DESTROY, Linux 4.5
//! with CONFIG_INET_DIAG_DESTROY, which distribution kernels enable). Their
//! applications then see ECONNABORTED and reconnect at once, to a backend that
//! serves, instead of sending into one that is gone: a connected UDP socket
//! would otherwise blackhole until it reconnects by itself, the socket-level
//! load balancers' best-known failure (Cilium #12859). Pods' sockets (their
//! processes in child cgroups of the socket programs' cgroup) live in the pods'
//! network namespaces: each namespace any process is in is visited, from a
//! thread that joins it (setns).
use std::{
    collections::HashSet,
    io,
    mem::size_of,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use lb_common::{SocketRevNatKey, SocketRevNatValue, ip_from_be};

use crate::model::{Endpoint, Protocol};

/// The cookies of sockets whose backend no longer serves their frontend,
/// as `serves((frontend ip, port), protocol, backend)` says (`protocol`
/// `None` for an entry that did not record it: either).
pub fn stale_cookies(
    entries: impl IntoIterator<Item = (SocketRevNatKey, SocketRevNatValue)>,
    serves: impl Fn((std::net::IpAddr, u16), Option<Protocol>, Endpoint) -> bool,
) -> HashSet<u64> {
    entries
        .into_iter()
        .filter(|(key, value)| {
            let frontend = (ip_from_be(value.frontend_ip).into(), u16::from_be(value.frontend_port));
            let backend = Endpoint { ip: ip_from_be(key.backend_ip).into(), port: u16::from_be(key.backend_port) };
            !serves(frontend, Protocol::from_number(value.proto), backend)
        })
        .map(|(key, _)| key.cookie)
        .collect()
}

/// SO_NETNS_COOKIE (asm-generic, Linux 5.14).
const SO_NETNS_COOKIE: i32 = 71;

/// This process's network namespace cookie, as `bpf_get_netns_cookie`
/// reports it for its sockets; `None` before Linux 5.14.
pub fn netns_cookie() -> Option<u64> {
    let fd = std::net::UdpSocket::bind("127.0.0.1:0").ok()?;
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let done = unsafe { libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&raw mut cookie).cast(), &mut len) };
    (done == 0 && len as usize == size_of::<u64>()).then_some(cookie)
}

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_ESTABLISHED: u32 = 1;
const TCP_LISTEN: u32 = 10;

/// `struct inet_diag_sockid`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    interface: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagRequest {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// `struct nlmsghdr` followed by a request.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Message {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
    request: DiagRequest,
}

/// Destroys the IPv4 TCP sockets (all but listeners) and connected UDP
/// sockets whose cookie is in `cookies`, in every network namespace a
/// process is in (socket cookies are unique across them); returns how many,
/// or the last error of a destroy the kernel refused (after trying them
/// all): without CONFIG_INET_DIAG_DESTROY, EOPNOTSUPP.
pub fn destroy_everywhere(cookies: &HashSet<u64>) -> io::Result<usize> {
    if cookies.is_empty() {
        return Ok(0);
    }
    let mut refused = None;
    let mut destroyed = match destroy(cookies) {
        Ok(n) => n,
        Err(e) => {
            refused = Some(e);
            0
        }
    };
    let own = std::fs::metadata("/proc/self/ns/net").map(|m| std::os::unix::fs::MetadataExt::ino(&m)).ok();
    let mut seen = HashSet::new();
    for entry in std::fs::read_dir("/proc")?.filter_map(Result::ok) {
        let path = entry.path().join("ns/net");
        let Ok(inode) = std::fs::metadata(&path).map(|m| std::os::unix::fs::MetadataExt::ino(&m)) else { continue };
        if Some(inode) == own || !seen.insert(inode) {
            continue;
        }
        // setns changes the calling thread only: a thread of its own.
        let cookies = cookies.clone();
        let visit = std::thread::spawn(move || -> io::Result<usize> {
            // A process gone meanwhile has nothing to destroy.
            let Ok(ns) = std::fs::File::open(&path) else { return Ok(0) };
            // SAFETY: setns on a namespace file we hold open, for this
            // thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Ok(0);
            }
            destroy(&cookies)
        });
        match visit.join() {
            Ok(Ok(n)) => destroyed += n,
            Ok(Err(e)) => refused = Some(e),
            Err(_) => {}
        }
    }
    match refused {
        Some(e) => Err(e),
        None => Ok(destroyed),
    }
}

/// Destroys this thread's namespace's IPv4 TCP sockets (all but listeners)
/// and connected UDP sockets whose cookie is in `cookies`; returns how many,
/// or the last error of a destroy the kernel refused, after trying them all.
fn destroy(cookies: &HashSet<u64>) -> io::Result<usize> {
    if cookies.is_empty() {
        return Ok(0);
    }
    let mut destroyed = 0;
    let mut refused = None;
    for (protocol, states) in [(libc::IPPROTO_TCP as u8, !(1u32 << TCP_LISTEN)), (libc::IPPROTO_UDP as u8, 1 << TCP_ESTABLISHED)] {
        let found = dump(protocol, states)?;
        for id in found.into_iter().filter(|id| cookies.contains(&(u64::from(id.cookie[0]) | u64::from(id.cookie[1]) << 32))) {
            match request(&Message {
                kind: SOCK_DESTROY,
                flags: (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
                request: DiagRequest { family: libc::AF_INET as u8, protocol, states: u32::MAX, id, ..DiagRequest::default() },
                ..Message::default()
            }) {
                Ok(()) => destroyed += 1,
                // A socket closed meanwhile is not an error.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => refused = Some(e),
            }
        }
    }
    match refused {
        Some(e) => Err(e),
        None => Ok(destroyed),
    }
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: a plain socket(2) call; the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned by socket(2), owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send(fd: &OwnedFd, message: &Message) -> io::Result<()> {
    let message = Message { len: size_of::<Message>() as u32, ..*message };
    // SAFETY: the message is a plain repr(C) value of the given size.
    let sent = unsafe { libc::send(fd.as_raw_fd(), (&raw const message).cast(), size_of::<Message>(), 0) };
    if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Reads netlink messages until DONE (or an error/ack), handing each
/// payload of `kind` to `each`.
fn receive(fd: &OwnedFd, mut each: impl FnMut(&[u8])) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: recv into a buffer we own, of its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut rest = &buf[..n as usize];
        while rest.len() >= 16 {
            let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let kind = u16::from_ne_bytes([rest[4], rest[5]]);
            if len < 16 || len > rest.len() {
                return Err(io::Error::other("a truncated netlink message"));
            }
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes([rest[16], rest[17], rest[18], rest[19]]);
                    return if errno == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(-errno)) };
                }
                _ => each(&rest[16..len]),
            }
            rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        }
    }
}

fn request(message: &Message) -> io::Result<()> {
    let fd = socket()?;
    send(&fd, message)?;
    receive(&fd, |_| {})
}

/// The ids (tuple and cookie) of the node's IPv4 sockets of `protocol` in
/// `states`.
fn dump(protocol: u8, states: u32) -> io::Result<Vec<SockId>> {
    let fd = socket()?;
    send(&fd, &Message {
        kind: SOCK_DIAG_BY_FAMILY,
        flags: (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
        request: DiagRequest { family: libc::AF_INET as u8, protocol, states, ..DiagRequest::default() },
        ..Message::default()
    })?;
    let mut found = Vec::new();
    // `struct inet_diag_msg`: family, state, timer, retrans, then the id.
    receive(&fd, |payload| {
        if payload.len() >= 4 + size_of::<SockId>() {
            // SAFETY: SockId is plain old data; the bytes are long enough,
            // read unaligned.
            found.push(unsafe { std::ptr::read_unaligned(payload[4..].as_ptr().cast::<SockId>()) });
        }
    })?;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_sockets_are_those_whose_backend_left_the_frontend() {
        let entry = |cookie, backend: [u8; 4], proto: u8| {
            (
                SocketRevNatKey { cookie, backend_ip: lb_common::ip_be(backend.into()), backend_port: 8080u16.to_be(), _pad: 0 },
                SocketRevNatValue { frontend_ip: lb_common::ip_be([10, 96, 0, 10].into()), frontend_port: 53u16.to_be(), proto, _pad: 0 },
            )
        };
        // Backend .2 serves port 53 over TCP only (draining: UDP left it).
        let serves = |frontend, protocol: Option<Protocol>, backend: Endpoint| {
            frontend == ([10, 96, 0, 10].into(), 53)
                && (backend.ip == std::net::IpAddr::from([10, 244, 1, 1]) || backend.ip == std::net::IpAddr::from([10, 244, 1, 2]) && protocol != Some(Protocol::Udp))
        };
        let cases = [
            ("a backend that serves", entry(1, [10, 244, 1, 1], lb_common::IPPROTO_UDP), false),
            ("a backend that left", entry(2, [10, 244, 2, 2], lb_common::IPPROTO_TCP), true),
            ("a UDP socket whose backend serves the TCP port only", entry(3, [10, 244, 1, 2], lb_common::IPPROTO_UDP), true),
            ("a TCP socket whose backend serves the TCP port", entry(4, [10, 244, 1, 2], lb_common::IPPROTO_TCP), false),
            ("an entry without its protocol: either", entry(5, [10, 244, 1, 2], 0), false),
        ];
        for (rule, entry, stale) in cases {
            let cookie = entry.0.cookie;
            assert_eq!(stale_cookies([entry], serves).contains(&cookie), stale, "{rule}");
        }
    }

    #[test]
    fn diag_messages_have_the_kernels_layout() {
        assert_eq!(size_of::<SockId>(), 48);
        assert_eq!(size_of::<DiagRequest>(), 56);
        assert_eq!(size_of::<Message>(), 72);
    }
}
