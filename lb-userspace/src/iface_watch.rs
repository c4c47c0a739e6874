//! Interfaces by name pattern: the links the datapath is attached to, followed as they come and go.
//!
//! The node's links matching `--iface-pattern` (a CNI's pod veths such as
//! `veth*`, `cali*`, `cni*`) are found by an initial dump and then followed
//! through netlink link events, so interfaces created after the agent started
//! are attached too and removed ones let go.
use futures::{StreamExt, TryStreamExt};
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
};
use rtnetlink::{MulticastGroup, new_connection, new_multicast_connection};
use tokio::sync::mpsc;

use crate::error::{Error, Result};

/// A link appeared (or changed) or went away, by name.
#[derive(Debug, PartialEq, Eq)]
pub enum LinkEvent {
    Present(String),
    /// Every link that existed at the start has been sent.
    DumpDone,
    Gone(String),
}

fn name(link: &LinkMessage) -> Option<String> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.clone()),
        _ => None,
    })
}

fn netlink_err(e: impl std::fmt::Display) -> Error {
    Error::Io { what: "netlink".into(), source: std::io::Error::other(e.to_string()) }
}

/// Sends every existing link, then every link event, until the receiver is
/// gone.
pub async fn watch(events: mpsc::UnboundedSender<LinkEvent>) -> Result<()> {
    // Subscribe first, so that no link created during the dump is missed.
    let (connection, _, mut messages) =
        new_multicast_connection(&[MulticastGroup::Link]).map_err(|e| Error::Io { what: "netlink".into(), source: e })?;
    tokio::spawn(connection);
    let (dump_connection, handle, _) = new_connection().map_err(|e| Error::Io { what: "netlink".into(), source: e })?;
    tokio::spawn(dump_connection);
    let mut links = handle.link().get().execute();
    while let Some(link) = links.try_next().await.map_err(netlink_err)? {
        if let Some(name) = name(&link)
            && events.send(LinkEvent::Present(name)).is_err()
        {
            return Ok(());
        }
    }
    if events.send(LinkEvent::DumpDone).is_err() {
        return Ok(());
    }
    while let Some((message, _)) = messages.next().await {
        let event = match message.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => name(&link).map(LinkEvent::Present),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => name(&link).map(LinkEvent::Gone),
            _ => None,
        };
        if let Some(event) = event
            && events.send(event).is_err()
        {
            return Ok(());
        }
    }
    Ok(())
}

/// Shell-style matching: `*` any run of characters, `?` one character.
pub fn matches(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // The classic two-pointer wildcard match, backtracking to the last `*`.
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_patterns_match_like_a_shell() {
        let cases = [
            ("veth*", "veth1a2b", true),
            ("veth*", "eth0", false),
            ("cali*", "cali12345", true),
            ("eth?", "eth0", true),
            ("eth?", "eth10", false),
            ("*", "anything", true),
            ("b*c", "bxyc", true),
            ("b*c", "bxycd", false),
            ("lo", "lo", true),
        ];
        for (pattern, name, expected) in cases {
            assert_eq!(matches(pattern, name), expected, "{pattern} ~ {name}");
        }
    }
}
