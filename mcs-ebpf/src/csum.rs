//! Ones'-complement checksum arithmetic for fields rewritten in place.

/// The change a rewrite makes to a checksummed sum (RFC 1624, eqn. 3):
/// the sum of `~old + new` over every changed 16-bit word, unfolded.
/// Works on raw (wire-order) words: the ones'-complement sum does not care
/// about byte order as long as it is consistent. Also a valid `__wsum` diff
/// for `bpf_l4_csum_replace` with a zero field size.
#[derive(Clone, Copy)]
pub struct Delta(pub u32);

impl Delta {
    pub const NONE: Self = Delta(0);

    #[inline(always)]
    pub fn word(self, old: u16, new: u16) -> Self {
        Delta(self.0.wrapping_add(u32::from(!old)).wrapping_add(u32::from(new)))
    }

    #[inline(always)]
    pub fn dword(self, old: u32, new: u32) -> Self {
        self.word(old as u16, new as u16).word((old >> 16) as u16, (new >> 16) as u16)
    }

    #[inline(always)]
    pub fn words<const N: usize>(self, old: [u32; N], new: [u32; N]) -> Self {
        let mut d = self;
        for i in 0..N {
            d = d.dword(old[i], new[i]);
        }
        d
    }

    /// Both changes.
    #[inline(always)]
    pub fn plus(self, other: Self) -> Self {
        Delta(self.0.wrapping_add(other.0))
    }

    /// The checksum `check` becomes after the changes.
    #[inline(always)]
    pub fn apply(self, check: u16) -> u16 {
        !fold(u32::from(!check), self.0)
    }
}

/// Adds two unfolded sums and folds to 16 bits.
#[inline(always)]
pub fn fold(a: u32, b: u32) -> u16 {
    let (sum, carry) = a.overflowing_add(b);
    let mut s = u64::from(sum) + u64::from(carry);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// Applies `delta` to the checksum at `field`, in place. `udp`: a UDP
/// checksum, where a computed zero is sent as all ones, and where zero means
/// "none" and stays so if `zero_none` (IPv4). The change the update made to
/// the field, for a checksum that covers it (an ICMP error's, over its
/// quote).
///
/// # Safety
/// `field` is a valid, bounds-checked pointer into the packet.
#[inline(always)]
pub unsafe fn update(field: *mut u16, delta: Delta, udp: bool, zero_none: bool) -> Delta {
    // SAFETY: the caller's.
    let old = unsafe { field.read_unaligned() };
    if udp && zero_none && old == 0 {
        return Delta::NONE;
    }
    let new = delta.apply(old);
    let new = if udp && new == 0 { 0xffff } else { new };
    // SAFETY: the caller's.
    unsafe { field.write_unaligned(new) };
    Delta::NONE.word(old, new)
}
