//! The two address families: the maps of each family hold its own address type.
//!
//! IPv4 and IPv6 have twin maps (as Cilium's `cilium_lb4_*`/`cilium_lb6_*`)
//! whose keys and values are the same generic structs over the address type:
//! `u32` for IPv4 (so every IPv4 key keeps its size and the IPv4 fast path its
//! cost) and `Ipv6` for IPv6. docs/architecture.md says why.
use bytemuck::{Pod, Zeroable};
use core::net::Ipv6Addr;

use crate::checksum;

/// An IP address as the maps hold it: network byte order, exactly as in the
/// packet headers.
pub trait IpAddress: Copy + Eq + Pod + core::fmt::Debug {
    /// What a map struct adds after a field to keep its IPv6 version free
    /// of hidden padding (see `Ipv6`): nothing for IPv4, 4 bytes for IPv6.
    type Pad: Copy + Eq + Ord + core::hash::Hash + Default + core::fmt::Debug + Pod;

    /// The all-zero address: "none configured" in the maps.
    const UNSPECIFIED: Self;

    /// What replacing this address with `new` adds to a checksum that
    /// covers it (one's complement, unfolded; see `checksum`).
    fn csum_delta(self, new: Self) -> u32;

    /// The address with only the bits set in `mask` kept.
    fn masked(self, mask: Self) -> Self;

    /// Whether this is the all-zero address.
    #[inline(always)]
    fn is_unspecified(self) -> bool {
        self == Self::UNSPECIFIED
    }
}

impl IpAddress for u32 {
    type Pad = ();
    const UNSPECIFIED: Self = 0;

    #[inline(always)]
    fn csum_delta(self, new: Self) -> u32 {
        checksum::delta_u32(self, new)
    }

    #[inline(always)]
    fn masked(self, mask: Self) -> Self {
        self & mask
    }
}

/// An IPv6 address in network byte order, as four 32-bit words read from
/// the header with native loads (four compares, four stores).
///
/// 8-aligned: the datapath is built with misaligned memory access allowed,
/// so LLVM merges neighbouring 4-byte stack accesses into 8-byte ones, and
/// the verifier refuses those at offsets that are not 8-aligned. Every
/// struct holding an `Ipv6` is therefore 8-aligned, and pads itself with
/// `IpAddress::Pad` where its IPv6 version would otherwise have hidden
/// padding.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Ipv6(pub [u32; 4]);
const _: () = assert!(size_of::<Ipv6>() == 16 && align_of::<Ipv6>() == 8);

impl Ipv6 {
    pub fn new(addr: Ipv6Addr) -> Self {
        Self(bytemuck::cast(addr.octets()))
    }

    pub fn addr(self) -> Ipv6Addr {
        let bytes: [u8; 16] = bytemuck::cast(self.0);
        Ipv6Addr::from(bytes)
    }
}

user_pod!(Ipv6);

impl From<Ipv6Addr> for Ipv6 {
    fn from(addr: Ipv6Addr) -> Self {
        Self::new(addr)
    }
}

impl From<Ipv6> for Ipv6Addr {
    fn from(addr: Ipv6) -> Self {
        addr.addr()
    }
}

impl IpAddress for Ipv6 {
    type Pad = u32;
    const UNSPECIFIED: Self = Ipv6([0; 4]);

    /// IPv6 has no header checksum: the delta is for the TCP/UDP checksum,
    /// through the pseudo-header.
    #[inline(always)]
    fn csum_delta(self, new: Self) -> u32 {
        let [a, b, c, d] = self.0;
        let [e, f, g, h] = new.0;
        checksum::delta_u32(a, e) + checksum::delta_u32(b, f) + checksum::delta_u32(c, g) + checksum::delta_u32(d, h)
    }

    #[inline(always)]
    fn masked(self, mask: Self) -> Self {
        let [a, b, c, d] = self.0;
        let [e, f, g, h] = mask.0;
        Ipv6([a & e, b & f, c & g, d & h])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::{apply, finish, sum_words};

    #[test]
    fn ipv6_words_hold_the_address_in_header_order() {
        let addr: Ipv6Addr = "fd00:10:96::a".parse().expect("address");
        let words = Ipv6::new(addr);
        assert_eq!(bytemuck::bytes_of(&words), &addr.octets(), "the words' bytes are the header's");
        assert_eq!(words.addr(), addr, "and back");
        assert!(Ipv6::UNSPECIFIED.is_unspecified() && !words.is_unspecified());
    }

    /// The address delta applied to a checksum over the address gives the
    /// checksum over the new address computed from scratch.
    #[test]
    fn ipv6_address_delta_equals_recomputed_checksum() {
        let cases = [
            ("cluster IP to pod", "fd00:10:96::a", "fd00:10:244:1::7"),
            ("all bits flip", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "::"),
            ("unchanged", "2001:db8::1", "2001:db8::1"),
        ];
        for (rule, old, new) in cases {
            let old: Ipv6Addr = old.parse().expect("address");
            let new: Ipv6Addr = new.parse().expect("address");
            let check = finish(sum_words(&old.octets(), 0x1234));
            let want = finish(sum_words(&new.octets(), 0x1234));
            let got = apply(check, Ipv6::new(old).csum_delta(Ipv6::new(new)));
            assert!(got == want || got | want == 0xffff && got & want == 0, "{rule}: {got:#x}, want {want:#x}");
        }
    }
}
