//! Frames of either IP family, built from scratch with every checksum
//! computed from the whole packet (never incrementally), for the packet
//! table: a translated frame the test expects is built the same way as the
//! input, so a byte-for-byte match proves the datapath's incremental
//! checksum updates.

use std::net::IpAddr;

use crate::packet::checksum;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

/// Fixed Ethernet addresses: `[dst | src]`.
pub const MACS: [u8; 12] = [0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];

fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    }
}

/// The pseudo-header of `src`/`dst` for an upper-layer packet of `len` bytes.
pub fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Vec<u8> {
    let mut v = octets(src);
    v.extend(octets(dst));
    if src.is_ipv4() {
        v.extend_from_slice(&[0, proto]);
        v.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        v.extend_from_slice(&(len as u32).to_be_bytes());
        v.extend_from_slice(&[0, 0, 0, proto]);
    }
    v
}

/// A TCP segment (20-byte header) with its checksum.
pub fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut l4 = vec![0u8; 20];
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
    l4[4..8].copy_from_slice(&1000u32.to_be_bytes());
    l4[12] = 5 << 4;
    l4[13] = flags;
    l4[14..16].copy_from_slice(&64240u16.to_be_bytes());
    l4.extend_from_slice(payload);
    let csum = checksum(&[&pseudo(src, dst, TCP, l4.len()), &l4]);
    l4[16..18].copy_from_slice(&csum.to_be_bytes());
    l4
}

/// A UDP datagram with its checksum.
pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut l4 = vec![0u8; 8];
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
    l4[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    l4.extend_from_slice(payload);
    let mut csum = checksum(&[&pseudo(src, dst, UDP, l4.len()), &l4]);
    if csum == 0 {
        csum = 0xffff;
    }
    l4[6..8].copy_from_slice(&csum.to_be_bytes());
    l4
}

/// An ICMP (IPv4) or ICMPv6 message: type, code, the 4 bytes after the
/// checksum (unused, or the next-hop MTU), and the quote.
pub fn icmp(src: IpAddr, dst: IpAddr, kind: u8, code: u8, rest: [u8; 4], quote: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(quote);
    let csum = if src.is_ipv4() { checksum(&[&m]) } else { checksum(&[&pseudo(src, dst, ICMPV6, m.len()), &m]) };
    m[2..4].copy_from_slice(&csum.to_be_bytes());
    m
}

/// Where a packet sits in a fragmented datagram.
#[derive(Clone, Copy, Debug)]
pub struct Frag {
    /// Offset in 8-byte units.
    pub offset: u16,
    pub more: bool,
    pub id: u32,
}

/// How the IP header is built.
#[derive(Clone, Debug, Default)]
pub struct Ip {
    /// IPv6 extension headers before the upper layer (or the fragment
    /// header): `(type, body)`, the body padded to a multiple of 8 with its
    /// first two bytes (next header, length) filled in here.
    pub ext: Vec<(u8, Vec<u8>)>,
    pub frag: Option<Frag>,
    /// IPv4 id when not fragmented.
    pub id: u16,
    /// TTL (hop limit); `None`: 64.
    pub ttl: Option<u8>,
}

/// An IP packet of either family (no Ethernet header).
pub fn ip_packet(src: IpAddr, dst: IpAddr, proto: u8, payload: &[u8], opts: &Ip) -> Vec<u8> {
    if src.is_ipv4() {
        let mut h = vec![0u8; 20];
        h[0] = 0x45;
        h[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        let (id, frags) = match opts.frag {
            Some(f) => (f.id as u16, (f.offset & 0x1fff) | if f.more { 0x2000 } else { 0 }),
            None => (opts.id, 0),
        };
        h[4..6].copy_from_slice(&id.to_be_bytes());
        h[6..8].copy_from_slice(&frags.to_be_bytes());
        h[8] = opts.ttl.unwrap_or(64);
        h[9] = proto;
        h[12..16].copy_from_slice(&octets(src));
        h[16..20].copy_from_slice(&octets(dst));
        let csum = checksum(&[&h]);
        h[10..12].copy_from_slice(&csum.to_be_bytes());
        h.extend_from_slice(payload);
        return h;
    }
    // Extension headers, then the fragment header, then the payload.
    let mut chain: Vec<(u8, Vec<u8>)> = opts.ext.clone();
    if let Some(f) = opts.frag {
        let mut body = vec![0u8; 8];
        body[2..4].copy_from_slice(&((f.offset << 3) | u16::from(f.more)).to_be_bytes());
        body[4..8].copy_from_slice(&f.id.to_be_bytes());
        chain.push((44, body));
    }
    let mut rest = Vec::new();
    for (i, (_, body)) in chain.iter().enumerate() {
        let next = chain.get(i + 1).map_or(proto, |(t, _)| *t);
        let mut body = body.clone();
        body.resize(body.len().div_ceil(8).max(1) * 8, 0);
        body[0] = next;
        if chain[i].0 != 44 {
            body[1] = (body.len() / 8 - 1) as u8;
        }
        rest.extend(body);
    }
    rest.extend_from_slice(payload);
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(rest.len() as u16).to_be_bytes());
    h.push(chain.first().map_or(proto, |(t, _)| *t));
    h.push(opts.ttl.unwrap_or(64));
    h.extend(octets(src));
    h.extend(octets(dst));
    h.extend(rest);
    h
}

/// An Ethernet frame around an IP packet.
pub fn frame(ip: &[u8]) -> Vec<u8> {
    let mut f = MACS.to_vec();
    f.extend_from_slice(if ip[0] >> 4 == 4 { &[0x08, 0x00] } else { &[0x86, 0xdd] });
    f.extend_from_slice(ip);
    f
}

/// A whole packet: `frame(ip_packet(...))`.
pub fn packet(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> Vec<u8> {
    frame(&ip_packet(src, dst, proto, l4, &Ip::default()))
}

/// [`packet`] one hop on: its TTL (hop limit) 63, as a router forwards it.
pub fn forwarded(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> Vec<u8> {
    frame(&ip_packet(src, dst, proto, l4, &Ip { ttl: Some(63), ..Ip::default() }))
}

/// The datagram `l4` split in two fragments, the first carrying `first`
/// bytes of it (a multiple of 8).
pub fn fragments(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8], first: usize, id: u32) -> [Vec<u8>; 2] {
    assert!(first.is_multiple_of(8) && first < l4.len());
    let a = Ip { frag: Some(Frag { offset: 0, more: true, id }), ..Ip::default() };
    let b = Ip { frag: Some(Frag { offset: (first / 8) as u16, more: false, id }), ..Ip::default() };
    [frame(&ip_packet(src, dst, proto, &l4[..first], &a)), frame(&ip_packet(src, dst, proto, &l4[first..], &b))]
}

/// `frame` with its Ethernet addresses swapped (a packet sent back out).
pub fn turned(mut frame: Vec<u8>) -> Vec<u8> {
    let (dst, src) = (frame[..6].to_vec(), frame[6..12].to_vec());
    frame[..6].copy_from_slice(&src);
    frame[6..12].copy_from_slice(&dst);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify_from_scratch() {
        for (src, dst) in [("10.0.0.2", "10.96.0.10"), ("fd00::2", "fd00:96::10")] {
            let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
            let seg = tcp(src, dst, 40000, 80, 0x02, b"abc");
            assert_eq!(checksum(&[&pseudo(src, dst, TCP, seg.len()), &seg]), 0);
            let dgram = udp(src, dst, 5000, 53, b"q");
            assert_eq!(checksum(&[&pseudo(src, dst, UDP, dgram.len()), &dgram]), 0);
            let proto = if src.is_ipv4() { ICMP } else { ICMPV6 };
            let m = icmp(src, dst, 3, 3, [0; 4], &dgram);
            let ok = if src.is_ipv4() { checksum(&[&m]) } else { checksum(&[&pseudo(src, dst, proto, m.len()), &m]) };
            assert_eq!(ok, 0);
        }
        let v4 = ip_packet("10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap(), UDP, b"12345678", &Ip::default());
        assert_eq!(checksum(&[&v4[..20]]), 0);
    }
}
