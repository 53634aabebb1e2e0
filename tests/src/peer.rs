//! The outside's end of a veth uplink, made to take `XDP_TX` frames: a
//! veth takes frames an XDP program sends back out of its peer only while
//! it runs NAPI, which an XDP program of its own turns on (turning GRO on
//! did not, on this kernel). A NIC's wire needs nothing of the sort.

use std::sync::mpsc;

use mcs_agent::{
    datapath::{Datapath, Sizes, XdpAttach},
    plan::Capacity,
};

use crate::netns::Netns;

/// While this lives, `iface` in its namespace has an XDP program that
/// passes every frame (this agent's, with no source NAT address set).
/// Dropped, the thread holding it ends and it detaches.
pub struct XdpPass {
    _done: mpsc::Sender<()>,
}

pub fn xdp_pass(ns: &Netns, iface: &str) -> XdpPass {
    let (done_tx, done) = mpsc::channel::<()>();
    let (ready_tx, ready) = mpsc::channel::<Result<(), String>>();
    let iface = iface.to_owned();
    ns.spawn(move || {
        let attached = (|| {
            let capacity = Capacity { services: 8, backends: 8, slots: 64 };
            let mut dp = Datapath::load(Sizes { capacity, conntrack: 64, ..Sizes::default() }, None)
                .map_err(|e| format!("loading the programs: {e}"))?;
            dp.attach_external(&iface, XdpAttach::Native).map_err(|e| format!("attaching: {e}"))?;
            Ok(dp)
        })();
        match attached {
            Ok(dp) => {
                let _ = ready_tx.send(Ok(()));
                let _ = done.recv();
                drop(dp);
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        }
    });
    ready
        .recv()
        .expect("the XDP pass thread answers")
        .unwrap_or_else(|e| panic!("an XDP pass program in {}: {e}", ns.name()));
    XdpPass { _done: done_tx }
}
