//! mcs-agent's kernel programs: ClusterSetIP DNAT on TC ingress and reverse NAT
//! on TC egress of the interfaces that face client pods, for IPv4 and IPv6.

#![no_std]
#![no_main]
// BPF's atomic add, for counters every CPU writes.
#![feature(asm_experimental_arch)]

mod csum;
mod ct;
mod egress;
mod family;
mod icmp;
mod ingress;
mod maps;
mod nat;
mod parse;
mod sock;
mod xdp;
mod xnat;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic, so this is never called.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
