//! Layout 3's conntrack, kept so an agent can carry the flows of a node
//! that ran it over (`carry_over`): two maps, one per direction, that the
//! LRU could evict apart. Layout 4 keeps both entries in [`crate::MAP_CT`].

use super::{Ip4, Ip6, MapAddr, Pod, Zeroable};

pub const MAP_CONNTRACK: &str = "CONNTRACK";
pub const MAP_REV_NAT: &str = "REV_NAT";
pub const MAP_CONNTRACK6: &str = "CONNTRACK6";
pub const MAP_REV_NAT6: &str = "REV_NAT6";

/// `CONNTRACK` key: client -> VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey<A> {
    pub client_ip: A,
    pub vip: A,
    pub client_port: u16,
    pub vip_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// `CONNTRACK` value: the backend.
#[repr(C, packed(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue<A> {
    pub backend_ip: A,
    pub backend_port: u16,
    pub flags: u8,
    pub _pad: u8,
    pub backend_id: u32,
    pub service_id: u32,
    pub closed_ns: u64,
    pub created_ns: u64,
}

/// `REV_NAT` key: backend -> client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNatKey<A> {
    pub backend_ip: A,
    pub client_ip: A,
    pub backend_port: u16,
    pub client_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// `REV_NAT` value: the VIP.
#[repr(C, packed(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNatValue<A> {
    pub vip: A,
    pub vip_port: u16,
    pub flags: u8,
    pub _pad: u8,
    pub backend_id: u32,
    pub _pad2: u32,
    pub closed_ns: u64,
}

pod_for_both! {
    CtKey: 8 + 8, 32 + 8;
    CtValue: 4 + 28, 16 + 28;
    RevNatKey: 8 + 8, 32 + 8;
    RevNatValue: 4 + 20, 16 + 20;
}
