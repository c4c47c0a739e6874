//! The demo behind `cargo xtask demo`: the seeds' kubia service (ClusterIP
//! 10.96.0.10, port 80 → targetPort 8080, three pods) in network namespaces
//! on this machine, with the real lb-agent doing the load balancing. No
//! cluster needed. Everything it creates is removed when it ends.
use std::{
    collections::BTreeMap,
    net::{SocketAddrV4, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{Context, Result};
use lb_tests::{
    cluster::{Cluster, EMPTY_VIP, KUBIA_VIP, kubia_services, pod_ip, pod_name},
    netns::{connect_and_ask, pod_name as answered_by},
};

fn main() -> Result<()> {
    println!("==> creating the namespace cluster: a client, a node running lb-agent, three kubia pods");
    let mut cluster = Cluster::start(3, &kubia_services(&[0, 1, 2]))?;
    for i in 0..3 {
        println!("    pod {} at {}:8080", pod_name(i), pod_ip(i));
    }
    println!("    service default/kubia: ClusterIP {KUBIA_VIP} port 80 -> targetPort 8080 (and UDP 53 -> 5353)");

    println!("\n==> 10 requests from the client to {KUBIA_VIP}:80");
    let answers = cluster.client.enter(|| {
        (0..10).map(|_| connect_and_ask(SocketAddrV4::new(KUBIA_VIP, 80))).collect::<Vec<_>>()
    })?;
    let mut hits = BTreeMap::<String, usize>::new();
    for answer in answers {
        let answer = answer.context("request through the ClusterIP")?;
        println!("    $ curl {KUBIA_VIP}   ->  {answer}");
        *hits.entry(answered_by(&answer)).or_default() += 1;
    }
    println!("    spread: {hits:?}");

    println!("\n==> a UDP request to {KUBIA_VIP}:53 (the reply comes from the ClusterIP, not the pod)");
    let (from, answer) = cluster.client.enter(|| -> Result<_> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.set_read_timeout(Some(Duration::from_secs(3)))?;
        socket.send_to(b"query", SocketAddrV4::new(KUBIA_VIP, 53))?;
        let mut buf = [0u8; 256];
        let (n, from) = socket.recv_from(&mut buf)?;
        Ok((from, String::from_utf8_lossy(&buf[..n]).trim_end().to_owned()))
    })??;
    println!("    reply from {from}: {answer}");

    println!("\n==> a service without endpoints ({EMPTY_VIP}:80) is refused at once, as with kube-proxy");
    let refused = cluster.client.enter(|| {
        TcpStream::connect_timeout(&SocketAddrV4::new(EMPTY_VIP, 80).into(), Duration::from_secs(5)).map(drop)
    })?;
    println!("    connect: {}", refused.err().map_or("connected?!".to_owned(), |e| e.to_string()));

    println!("\n==> scaling kubia down to {} only", pod_name(0));
    let synced = cluster.update_services(&kubia_services(&[0]))?;
    println!("    agent: {}", synced.split_once("lb_agent: ").map_or(synced.as_str(), |(_, l)| l));
    let answers = cluster.client.enter(|| {
        (0..5).map(|_| connect_and_ask(SocketAddrV4::new(KUBIA_VIP, 80))).collect::<Vec<_>>()
    })?;
    for answer in answers {
        println!("    $ curl {KUBIA_VIP}   ->  {}", answer.context("request through the ClusterIP")?);
    }

    println!("\n==> cleaning up: stopping the agent, deleting the namespaces");
    drop(cluster);
    println!("done");
    Ok(())
}
