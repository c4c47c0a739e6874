//! Internet checksum math (RFC 1071, incremental update per RFC 1624).
//!
//! Values are handled as the 16-bit words appear in memory, so a checksum
//! read from a packet with a native load can be updated with addresses and
//! ports read the same way, with no byte swapping.

/// Folds a 32-bit one's complement accumulator into 16 bits.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The change to a checksum when a 16-bit word covered by it goes from
/// `old` to `new`: ~m + m', unfolded, to be summed with other changes and
/// applied once.
#[inline(always)]
pub const fn delta_u16(old: u16, new: u16) -> u32 {
    !old as u32 + new as u32
}

/// The change when a 32-bit value (an address) goes from `old` to `new`.
/// An address is covered by both the IPv4 header checksum and, through the
/// pseudo-header, the TCP/UDP checksum: the same delta serves both.
#[inline(always)]
pub const fn delta_u32(old: u32, new: u32) -> u32 {
    (!old & 0xffff) + (!old >> 16) + (new & 0xffff) + (new >> 16)
}

/// The checksum field after the changes summed in `delta`:
/// HC' = ~(~HC + delta) (RFC 1624, eqn. 3). `delta` may sum up to a few
/// hundred changes without overflowing.
#[inline(always)]
pub const fn apply(check: u16, delta: u32) -> u16 {
    !fold(!check as u32 + delta)
}

/// The checksum field after one folded change `delta` (a `fold`ed sum of
/// changes): as `apply`, with a single fold, because two 16-bit values sum
/// to at most 0x1fffe, and one fold of that is at most 0xffff.
#[inline(always)]
pub const fn add(check: u16, delta: u16) -> u16 {
    let sum = !check as u32 + delta as u32;
    !((sum & 0xffff) + (sum >> 16)) as u16
}

/// A UDP checksum after an update: zero means "no checksum" in UDP, so a
/// computed zero is sent as 0xffff (RFC 768).
#[inline(always)]
pub const fn udp_nonzero(check: u16) -> u16 {
    if check == 0 { 0xffff } else { check }
}

/// One's complement sum of `bytes` (an even count), as native-order words,
/// added to `initial`.
#[inline(always)]
pub fn sum_words(bytes: &[u8], initial: u32) -> u32 {
    let mut sum = initial;
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u16::from_ne_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    sum
}

/// The checksum field value for data whose words sum to `sum`.
#[inline(always)]
pub const fn finish(sum: u32) -> u16 {
    !fold(sum)
}

/// The sum of the IPv4 pseudo-header (RFC 793/768) for an L4 segment.
#[inline(always)]
pub const fn pseudo_header_sum(src_ip: u32, dst_ip: u32, proto: u8, l4_len: u16) -> u32 {
    (src_ip & 0xffff)
        + (src_ip >> 16)
        + (dst_ip & 0xffff)
        + (dst_ip >> 16)
        + u16::from_ne_bytes([0, proto]) as u32
        + u16::from_ne_bytes(l4_len.to_be_bytes()) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The RFC 1071 example: words 0001 f203 f4f5 f6f7 sum to ddf2.
    #[test]
    fn full_sum_matches_rfc1071_example() {
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        let sum = sum_words(&data, 0);
        assert_eq!(u16::from_be(fold(sum)), 0xddf2);
    }

    /// An incremental update equals recomputing from scratch, for every
    /// case of carries the table exercises.
    #[test]
    fn incremental_update_equals_recompute() {
        let cases: [([u8; 12], usize, [u8; 4]); 4] = [
            ([10, 0, 0, 1, 10, 96, 0, 10, 0x12, 0x34, 0x56, 0x78], 4, [10, 244, 1, 7]),
            ([0xff; 12], 0, [0, 0, 0, 0]),
            ([0; 12], 8, [0xff, 0xff, 0xff, 0xff]),
            ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 4, [5, 6, 7, 8]),
        ];
        for (mut data, at, new) in cases {
            let check = finish(sum_words(&data, 0));
            let old = u32::from_ne_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
            data[at..at + 4].copy_from_slice(&new);
            let updated = apply(check, delta_u32(old, u32::from_ne_bytes(new)));
            let recomputed = finish(sum_words(&data, 0));
            // 0x0000 and 0xffff are the same one's complement value.
            assert!(
                updated == recomputed || (updated | recomputed) == 0xffff && (updated & recomputed) == 0,
                "{data:?}: updated {updated:#x} recomputed {recomputed:#x}"
            );
        }
    }

    #[test]
    fn u16_update_equals_recompute() {
        let mut data = [0x1f, 0x90, 0x00, 0x50, 0xab, 0xcd];
        let check = finish(sum_words(&data, 0));
        let old = u16::from_ne_bytes([data[2], data[3]]);
        data[2..4].copy_from_slice(&8080u16.to_be_bytes());
        let updated = apply(check, delta_u16(old, 8080u16.to_be()));
        assert_eq!(updated, finish(sum_words(&data, 0)));
    }

    /// Address and port changes summed and applied once equal applying them
    /// one after the other (and recomputing).
    #[test]
    fn summed_deltas_equal_successive_updates() {
        let mut data = [10, 0, 0, 1, 10, 96, 0, 10, 0x9c, 0x40, 0x00, 0x50];
        let check = finish(sum_words(&data, 0));
        let old_ip = u32::from_ne_bytes([10, 96, 0, 10]);
        let new_ip = u32::from_ne_bytes([10, 244, 1, 2]);
        let old_port = u16::from_ne_bytes([0x00, 0x50]);
        let new_port = 8080u16.to_be();
        let once = apply(check, delta_u32(old_ip, new_ip) + delta_u16(old_port, new_port));
        let twice = apply(apply(check, delta_u32(old_ip, new_ip)), delta_u16(old_port, new_port));
        data[4..8].copy_from_slice(&new_ip.to_ne_bytes());
        data[10..12].copy_from_slice(&new_port.to_ne_bytes());
        assert_eq!(once, twice);
        assert_eq!(once, finish(sum_words(&data, 0)));
    }

    #[test]
    fn one_fold_suffices_for_one_folded_delta() {
        let deltas = (0..=0xffffu32).step_by(251).chain([0, 1, 0xfffe, 0xffff]);
        for delta in deltas {
            for check in 0..=0xffffu16 {
                assert_eq!(add(check, delta as u16), apply(check, delta), "check {check:#x} delta {delta:#x}");
            }
        }
    }

    #[test]
    fn udp_zero_result_is_sent_as_all_ones() {
        assert_eq!(udp_nonzero(0), 0xffff);
        assert_eq!(udp_nonzero(0x1234), 0x1234);
    }
}
