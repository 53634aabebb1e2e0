//! Packet builders and an independent checksum check for the fixtures.

use std::net::Ipv4Addr;

use crate::frame;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_PSH: u8 = 0x08;

/// RFC 1071 ones'-complement sum, folded and inverted.
pub fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut carry: Option<u8> = None;
    for chunk in chunks {
        for &byte in *chunk {
            match carry.take() {
                None => carry = Some(byte),
                Some(high) => sum += u32::from(u16::from_be_bytes([high, byte])),
            }
        }
    }
    if let Some(high) = carry {
        sum += u32::from(high) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub struct Ipv4Spec<'a> {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub options: &'a [u8],
    /// (flags incl. MF, fragment offset in 8-byte units)
    pub frag: (u16, u16),
}

impl Ipv4Spec<'_> {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        Self { src, dst, options: &[], frag: (0, 0) }
    }
}

fn build(ip: &Ipv4Spec<'_>, proto: u8, l4: &[u8]) -> Vec<u8> {
    assert!(ip.options.len().is_multiple_of(4) && ip.options.len() <= 40);
    let ihl = 20 + ip.options.len();
    let mut p = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00];
    let mut hdr = vec![0u8; 20];
    hdr[0] = 0x40 | (ihl / 4) as u8;
    hdr[2..4].copy_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
    hdr[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    hdr[6..8].copy_from_slice(&(ip.frag.0 | ip.frag.1).to_be_bytes());
    hdr[8] = 64;
    hdr[9] = proto;
    hdr[12..16].copy_from_slice(&ip.src.octets());
    hdr[16..20].copy_from_slice(&ip.dst.octets());
    hdr.extend_from_slice(ip.options);
    let csum = checksum(&[&hdr]);
    hdr[10..12].copy_from_slice(&csum.to_be_bytes());
    p.extend_from_slice(&hdr);
    p.extend_from_slice(l4);
    p
}

fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> Vec<u8> {
    frame::pseudo(src.into(), dst.into(), proto, len)
}

pub fn tcp(ip: &Ipv4Spec<'_>, sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    build(ip, 6, &frame::tcp(ip.src.into(), ip.dst.into(), sport, dport, flags, payload))
}

/// A UDP datagram; `zero_checksum` sends it without a checksum (allowed in IPv4).
pub fn udp(ip: &Ipv4Spec<'_>, sport: u16, dport: u16, payload: &[u8], zero_checksum: bool) -> Vec<u8> {
    let mut l4 = frame::udp(ip.src.into(), ip.dst.into(), sport, dport, payload);
    if zero_checksum {
        l4[6..8].copy_from_slice(&[0, 0]);
    }
    build(ip, 17, &l4)
}

/// What a test reads back from an IPv4 TCP/UDP frame, checksums verified from scratch.
#[derive(Debug, PartialEq, Eq)]
pub struct View {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub ip_checksum_ok: bool,
    /// None for a UDP datagram without checksum.
    pub l4_checksum_ok: Option<bool>,
    pub payload: Vec<u8>,
}

pub fn view(frame: &[u8]) -> View {
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let proto = ip[9];
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let l4 = &ip[ihl..total];
    let ip_checksum_ok = checksum(&[&ip[..ihl]]) == 0;
    let (header_len, csum_field) = if proto == 6 { (usize::from(l4[12] >> 4) * 4, 16) } else { (8, 6) };
    let raw = u16::from_be_bytes([l4[csum_field], l4[csum_field + 1]]);
    let l4_checksum_ok =
        if proto == 17 && raw == 0 { None } else { Some(checksum(&[&pseudo(src, dst, proto, l4.len()), l4]) == 0) };
    View {
        src,
        dst,
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        ip_checksum_ok,
        l4_checksum_ok,
        payload: l4[header_len..].to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_packets_verify() {
        let ip = Ipv4Spec::new(Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 96, 0, 1));
        let v = view(&tcp(&ip, 40000, 80, TCP_SYN, b"abc"));
        assert!(v.ip_checksum_ok && v.l4_checksum_ok == Some(true));
        assert_eq!((v.sport, v.dport, v.payload.as_slice()), (40000, 80, &b"abc"[..]));
        let v = view(&udp(&ip, 5000, 53, b"q", false));
        assert_eq!(v.l4_checksum_ok, Some(true));
        assert_eq!(view(&udp(&ip, 5000, 53, b"q", true)).l4_checksum_ok, None);
        let mut bad = tcp(&ip, 40000, 80, TCP_SYN, b"abc");
        bad[40] ^= 1;
        assert_eq!(view(&bad).l4_checksum_ok, Some(false));
    }
}
