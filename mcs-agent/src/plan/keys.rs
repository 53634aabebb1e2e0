//! The agent's keys and addresses in the maps' byte order, both ways.

use super::*;

/// A frontend's key in its family's map (`SERVICES` or `SERVICES6`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FamilyKey {
    V4(ServiceKey<Ip4>),
    V6(ServiceKey<Ip6>),
}

/// A backend in its family's array (`BACKENDS` or `BACKENDS6`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FamilyBackend {
    V4(Backend<Ip4>),
    V6(Backend<Ip6>),
}

impl FamilyBackend {
    pub fn addr(&self) -> BackendAddr {
        match self {
            FamilyBackend::V4(b) => backend_addr(b),
            FamilyBackend::V6(b) => backend_addr(b),
        }
    }
}

/// A map-order address as an `IpAddr`.
pub trait ToIp: MapAddr {
    fn to_ip(self) -> IpAddr;
}

impl ToIp for Ip4 {
    fn to_ip(self) -> IpAddr {
        IpAddr::V4(self.to_ne_bytes().into())
    }
}

impl ToIp for Ip6 {
    fn to_ip(self) -> IpAddr {
        IpAddr::V6(ip6_from_map(self).into())
    }
}

pub fn service_key(key: &FrontendKey) -> FamilyKey {
    let (port, proto) = (port_to_map(key.port), key.protocol.number());
    match key.vip {
        IpAddr::V4(vip) => FamilyKey::V4(ServiceKey { vip: ip_to_map(vip.octets()), port, proto, _pad: 0 }),
        IpAddr::V6(vip) => FamilyKey::V6(ServiceKey { vip: ip6_to_map(vip.octets()), port, proto, _pad: 0 }),
    }
}

pub fn backend_value(addr: &BackendAddr) -> FamilyBackend {
    let port = port_to_map(addr.port);
    match addr.ip {
        IpAddr::V4(ip) => FamilyBackend::V4(Backend { ip: ip_to_map(ip.octets()), port, _pad: 0 }),
        IpAddr::V6(ip) => FamilyBackend::V6(Backend { ip: ip6_to_map(ip.octets()), port, _pad: 0 }),
    }
}

pub fn backend_addr<A: ToIp>(b: &Backend<A>) -> BackendAddr {
    BackendAddr { ip: b.ip.to_ip(), port: u16::from_be(b.port) }
}

/// A map key read back: its frontend, or the unknown protocol number.
pub fn frontend_of<A: ToIp>(key: &ServiceKey<A>) -> Result<FrontendKey, u8> {
    let protocol = match key.proto {
        mcs_common::IPPROTO_TCP => Protocol::Tcp,
        mcs_common::IPPROTO_UDP => Protocol::Udp,
        other => return Err(other),
    };
    Ok(FrontendKey { vip: key.vip.to_ip(), port: u16::from_be(key.port), protocol })
}
