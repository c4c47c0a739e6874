//! Fragmented datagrams of a tracked flow, translated fragment by fragment.
use lb_common::Reason;
use lb_tests::{
    fixture::{Fixture, Verdict, desired, service},
    packets::Frame,
};
use lb_userspace::model::Protocol;

use crate::HOOKS;

/// A fragmented datagram of a tracked flow is translated fragment by
/// fragment: the first (with the UDP header) like any packet of the flow,
/// the later ones by the ports the first left in `FRAGMENT_PORTS`. A large
/// DNS answer from the backend reaches the client from the service, and a
/// large query reaches the backend. A later fragment whose first was never
/// seen is dropped when it is for a cluster IP, and left alone otherwise.
#[test]
fn fragments_of_a_tracked_flow_are_translated() {
    for hook in HOOKS {
        let fixture = Fixture::new(&desired([service("dns", [10, 96, 0, 10], 53, Protocol::Udp, &[([10, 244, 1, 2], 5353)])]));
        let big: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
        let query = Frame::udp("10.0.0.2:5000", "10.96.0.10:53", &big);
        let sent = query.clone().with_dst("10.244.1.2:5353");
        let answer = Frame::udp("10.244.1.2:5353", "10.0.0.2:5000", &big);
        let delivered = answer.clone().with_src("10.96.0.10:53");
        for (what, input, output) in [("query", &query, &sent), ("answer", &answer, &delivered)] {
            let (fragments, expected) = (input.fragments(1480), output.fragments(1480));
            assert_eq!(fragments.len(), 3, "{what}: 3008 bytes of UDP in 1480-byte pieces");
            for (i, (fragment, want)) in fragments.iter().zip(&expected).enumerate() {
                let before = fixture.reason_totals();
                let out = fixture.run(hook, fragment);
                assert_eq!(out.verdict, Verdict::Pass, "{hook:?} {what} fragment {i}");
                assert_eq!(&out.output, want, "{hook:?} {what} fragment {i}: translated, checksums and all");
                let after = fixture.reason_totals();
                let counted: Vec<Reason> = Reason::ALL.into_iter().filter(|r| after[*r as usize] != before[*r as usize]).collect();
                let reason = match (what, i) {
                    ("query", 0) => Reason::ForwardNew,
                    ("query", _) => Reason::ForwardEstablished,
                    _ => Reason::ReplyTranslated,
                };
                assert_eq!(counted, vec![reason], "{hook:?} {what} fragment {i}");
            }
        }
        let orphan = Frame::udp("10.0.0.3:5000", "10.96.0.10:53", &big).fragments(1480);
        let out = fixture.run(hook, &orphan[1]);
        assert_eq!(out.verdict, Verdict::Drop, "{hook:?}: a later fragment to a cluster IP without its first");
        let elsewhere = Frame::udp("10.0.0.3:5000", "10.0.0.9:53", &big).fragments(1480);
        let out = fixture.run(hook, &elsewhere[1]);
        assert_eq!((out.verdict, &out.output), (Verdict::Pass, &elsewhere[1]), "{hook:?}: not a service's: unchanged");
    }
}
