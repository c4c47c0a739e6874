//! The kernel features the agent uses beyond its floor (Linux 5.10), and their fallbacks.
//!
//! Each is probed on the running kernel at start, and each has an older
//! mechanism used where the kernel lacks it or where `--disable-kernel-feature`
//! says so (so the older paths can be tested on any kernel).
use aya::{
    programs::{ProgramType, SchedClassifier, TcAttachType},
    sys::{BpfHelper, is_helper_supported},
};
use lb_common::{KERNEL_FALLBACK_CONNECT_EPERM, KERNEL_FALLBACK_NO_SOCKET_LB, KERNEL_FALLBACK_TC_NETLINK};
use serde::Serialize;
use tracing::{info, warn};

/// A kernel feature newer than the floor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Feature {
    /// tcx links for the tc programs (Linux 6.6); without them a clsact
    /// qdisc and a direct-action cls_bpf filter, attached through netlink.
    Tcx,
    /// `bpf_set_retval` in the socket programs (Linux 5.18); without it a
    /// connect to a service without endpoints fails with EPERM, not
    /// ECONNREFUSED.
    SetRetval,
}

impl Feature {
    pub const ALL: [Feature; 2] = [Feature::Tcx, Feature::SetRetval];

    const fn fallback_bit(self) -> u32 {
        match self {
            Feature::Tcx => KERNEL_FALLBACK_TC_NETLINK,
            Feature::SetRetval => KERNEL_FALLBACK_CONNECT_EPERM,
        }
    }

    /// Whether the running kernel has it.
    fn probe(self) -> bool {
        match self {
            // Querying tcx programs is an unknown attach type before 6.6.
            Feature::Tcx => SchedClassifier::query_tcx("lo", TcAttachType::Ingress).is_ok(),
            Feature::SetRetval => {
                match is_helper_supported(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_set_retval) {
                    Ok(supported) => supported,
                    Err(e) => {
                        warn!("probing bpf_set_retval: {e}; taking it as missing");
                        false
                    }
                }
            }
        }
    }
}

/// What the agent uses, feature by feature, and what it falls back to:
/// `KERNEL_FALLBACK_*` bits, as the datapath configuration records them for
/// inspection tools.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelFeatures {
    /// Features the kernel lacks.
    missing: u32,
    /// Features the kernel has but the agent was told not to use.
    disabled: u32,
    /// Other fallbacks decided while loading (`KERNEL_FALLBACK_NO_SOCKET_LB`).
    degraded: u32,
}

impl KernelFeatures {
    /// Probes the running kernel.
    pub fn probe(disabled: &[Feature]) -> Self {
        Self::resolve(Feature::probe, disabled)
    }

    /// `present` says which features the kernel has.
    pub fn resolve(present: impl Fn(Feature) -> bool, disabled: &[Feature]) -> Self {
        let mut features = Self::default();
        for feature in Feature::ALL {
            if disabled.contains(&feature) {
                features.disabled |= feature.fallback_bit();
            } else if !present(feature) {
                features.missing |= feature.fallback_bit();
            }
        }
        features
    }

    pub const fn uses(&self, feature: Feature) -> bool {
        (self.missing | self.disabled) & feature.fallback_bit() == 0
    }

    /// Records that the socket programs could not be loaded.
    pub fn without_socket_programs(&mut self) {
        self.degraded |= KERNEL_FALLBACK_NO_SOCKET_LB;
    }

    /// The `KERNEL_FALLBACK_*` bits of every fallback in use.
    pub const fn fallbacks(&self) -> u32 {
        self.missing | self.disabled | self.degraded
    }

    /// One log line per fallback, saying why and what it changes.
    pub fn log(&self) {
        for fallback in FALLBACKS.iter().filter(|f| self.fallbacks() & f.bit != 0) {
            let why = if self.disabled & fallback.bit != 0 { "disabled by --disable-kernel-feature" } else { "not in this kernel" };
            warn!(feature = fallback.feature, since = fallback.since, "{why}: {}", fallback.instead);
        }
        if self.fallbacks() == 0 {
            info!("every kernel feature in use: {}", FALLBACKS.iter().map(|f| f.feature).collect::<Vec<_>>().join(", "));
        }
    }
}

/// A fallback as inspection tools show it.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Fallback {
    #[serde(skip)]
    pub bit: u32,
    /// The feature whose absence it stands in for.
    pub feature: &'static str,
    /// The Linux release that brought the feature.
    pub since: &'static str,
    /// What the agent does without it.
    pub instead: &'static str,
}

/// Every fallback the agent knows, in `KERNEL_FALLBACK_*` bit order.
pub const FALLBACKS: [Fallback; 3] = [
    Fallback {
        bit: KERNEL_FALLBACK_TC_NETLINK,
        feature: "tcx",
        since: "6.6",
        instead: "tc programs attached as a cls_bpf filter on a clsact qdisc (netlink)",
    },
    Fallback {
        bit: KERNEL_FALLBACK_CONNECT_EPERM,
        feature: "bpf_set_retval",
        since: "5.18",
        instead: "a node process's connect to a service without endpoints fails with EPERM, not ECONNREFUSED",
    },
    Fallback {
        bit: KERNEL_FALLBACK_NO_SOCKET_LB,
        feature: "cgroup sock_addr programs",
        since: "5.8",
        instead: "the socket programs could not be loaded: the node's own processes do not reach services",
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    /// A rule, the features present, those disabled, whether each of
    /// `Feature::ALL` is used, and the fallback bits.
    type Case = (&'static str, &'static [Feature], &'static [Feature], [bool; 2], u32);

    #[test]
    fn each_feature_is_used_only_when_present_and_not_disabled() {
        let cases: [Case; 5] = [
            ("a new kernel uses everything", &Feature::ALL, &[], [true, true], 0),
            ("6.1 has no tcx", &[Feature::SetRetval], &[], [false, true], KERNEL_FALLBACK_TC_NETLINK),
            (
                "5.10 has neither",
                &[],
                &[],
                [false, false],
                KERNEL_FALLBACK_TC_NETLINK | KERNEL_FALLBACK_CONNECT_EPERM,
            ),
            ("disabled on a new kernel", &Feature::ALL, &[Feature::Tcx], [false, true], KERNEL_FALLBACK_TC_NETLINK),
            (
                "disabled and missing",
                &[Feature::Tcx],
                &[Feature::Tcx, Feature::SetRetval],
                [false, false],
                KERNEL_FALLBACK_TC_NETLINK | KERNEL_FALLBACK_CONNECT_EPERM,
            ),
        ];
        for (rule, present, disabled, used, fallbacks) in cases {
            let features = KernelFeatures::resolve(|f| present.contains(&f), disabled);
            assert_eq!(Feature::ALL.map(|f| features.uses(f)), used, "{rule}");
            assert_eq!(features.fallbacks(), fallbacks, "{rule}");
        }
    }

    #[test]
    fn fallbacks_are_listed_once_in_bit_order() {
        for (i, fallback) in FALLBACKS.iter().enumerate() {
            assert_eq!(fallback.bit, 1 << i, "{}", fallback.feature);
        }
    }
}
