//! Clients' requests from inside a namespace: HTTP over TCP, UDP, /metrics and health GETs, ping.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::{Netns, scaled};

/// Sends one HTTP GET on a (keep-alive) connection and returns the body,
/// without its final newline.
pub fn ask(conn: &mut TcpStream) -> std::io::Result<String> {
    conn.write_all(b"GET / HTTP/1.1\r\nHost: kubia\r\n\r\n")?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|n| n.trim().parse::<usize>().ok())
        .ok_or_else(|| std::io::Error::other(format!("no Content-Length in {head:?}")))?;
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body)?;
    Ok(String::from_utf8_lossy(&body).trim_end().to_owned())
}

/// The whole response (status line, headers, body) to a GET of `path`
/// from `addr`, from inside `ns`.
pub fn http_get(ns: &Netns, addr: &'static str, path: &'static str) -> Result<String> {
    ns.enter(move || -> std::io::Result<String> {
        let mut conn = TcpStream::connect(addr)?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(conn, "GET {path} HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        conn.read_to_string(&mut response)?;
        Ok(response)
    })?
    .with_context(|| format!("GET {addr}{path}"))
}

/// Asks `addr` once over a connected UDP socket; the answer, trimmed.
pub fn udp_ask(addr: impl Into<SocketAddr>) -> std::io::Result<String> {
    let addr = addr.into();
    let socket = UdpSocket::bind(if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" })?;
    socket.connect(addr)?;
    socket.set_read_timeout(Some(Duration::from_secs(3)))?;
    socket.send(b"query")?;
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned())
}

/// GETs `path` from `addr` inside `ns` until the response starts with
/// `expected` (a status line) or `timeout` passes; the last response.
pub fn http_get_until(ns: &Netns, addr: &'static str, path: &'static str, expected: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let response = http_get(ns, addr, path).unwrap_or_default();
        if response.starts_with(expected) || Instant::now() > deadline {
            return response;
        }
        thread::yield_now();
    }
}

/// Connects to `addr` and asks once.
pub fn connect_and_ask(addr: impl Into<SocketAddr>) -> std::io::Result<String> {
    let mut conn = TcpStream::connect_timeout(&addr.into(), scaled(Duration::from_secs(3)))?;
    conn.set_read_timeout(Some(scaled(Duration::from_secs(3))))?;
    ask(&mut conn)
}

/// Sends one ICMP echo request to `to` from a raw socket and waits up to
/// two seconds for the matching echo reply; returns the address it came
/// from.
pub fn ping(to: Ipv4Addr) -> std::io::Result<Ipv4Addr> {
    const ID: [u8; 2] = [0x4c, 0x42];
    let mut request = [8u8, 0, 0, 0, ID[0], ID[1], 0, 1, b'p', b'i', b'n', b'g'];
    let sum = lb_common::checksum::finish(lb_common::checksum::sum_words(&request, 0));
    request[2..4].copy_from_slice(&sum.to_ne_bytes());
    // SAFETY: plain socket calls on a descriptor owned by `socket` below,
    // with buffers and addresses that outlive each call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let socket = <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd);
        let timeout = libc::timeval { tv_sec: 2, tv_usec: 0 };
        let timeout_ptr = (&raw const timeout).cast();
        if libc::setsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, timeout_ptr, size_of::<libc::timeval>() as u32) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let target = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from(to).to_be() },
            sin_zero: [0; 8],
        };
        let target_ptr = (&raw const target).cast();
        let sent = libc::sendto(socket.as_raw_fd(), request.as_ptr().cast(), request.len(), 0, target_ptr, size_of::<libc::sockaddr_in>() as u32);
        if sent < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut buf = [0u8; 1500];
        loop {
            // A raw ICMP socket sees every ICMP message with its IPv4 header.
            let len = libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0);
            if len < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let packet = &buf[..len as usize];
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            if let Some(icmp) = packet.get(ihl..ihl + 8)
                && icmp[0] == 0
                && icmp[4..6] == ID
            {
                return Ok(Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]));
            }
        }
    }
}
