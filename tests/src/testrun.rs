//! The real programs on test frames (BPF_PROG_TEST_RUN), with maps
//! programmed by the agent's own reconcile path from manifests.

use aya::programs::{TestRun as _, TestRunOptions};
use mcs_agent::{
    datapath::{Datapath, Sizes},
    desired::Policy,
    model::Origin,
    plan::{Applied, Capacity},
    reconcile::{Reconciler, Report},
    source::manifests::parse_documents,
};

/// Loads the programs with small maps and programs `manifests`, which must
/// be valid and yield `frontends` frontends.
pub fn programmed(manifests: &str, conntrack: u32, frontends: usize) -> Datapath {
    let capacity = Capacity { services: 64, backends: 64, slots: 1 << 16 };
    let (dp, _, report) = program(capacity, conntrack, manifests);
    assert_eq!(report.frontends, frontends);
    dp
}

/// Loads the programs with maps of this capacity and programs `manifests`
/// (valid, without problems) through the agent's reconcile path.
pub fn program(capacity: Capacity, conntrack: u32, manifests: &str) -> (Datapath, Reconciler, Report) {
    let mut dp = Datapath::load(
        Sizes { capacity, conntrack, xnat_conntrack: conntrack, external: true, ..Sizes::default() },
        None,
    )
    .expect("loading the eBPF programs (needs root / CAP_BPF + CAP_NET_ADMIN)");
    let (snapshot, errors) = parse_documents(&Origin("fixture".into()), manifests);
    assert!(errors.is_empty(), "{errors:?}");
    let mut reconciler = Reconciler::new(Applied::new(capacity), Policy::default());
    let report = reconciler.apply_snapshot(&snapshot, vec![], &mut dp).expect("programming the manifests");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    (dp, reconciler, report)
}

/// One run of `program` on `input`: its verdict and output frame.
pub fn run(dp: &mut Datapath, program: &'static str, input: &[u8]) -> (i32, Vec<u8>) {
    run_repeat(dp, program, input, 1).0
}

/// `repeat` runs; also the kernel's mean time per run, in ns. The output
/// has room for a frame that grows (a rejection pushes headers).
pub fn run_repeat(dp: &mut Datapath, program: &'static str, input: &[u8], repeat: u32) -> ((i32, Vec<u8>), u128) {
    let mut out = vec![0u8; input.len() + 256];
    let result = dp
        .program_mut(program)
        .unwrap()
        .test_run(TestRunOptions { data_in: Some(input), data_out: Some(&mut out), repeat, ..Default::default() })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    ((result.return_value as i32, out), result.duration.as_nanos())
}

/// One run of `mcs_xdp` on `input` as if it arrived on interface
/// `ifindex` of the calling thread's network namespace (where its route
/// lookups happen): its verdict and output frame.
pub fn run_xdp(dp: &mut Datapath, ifindex: u32, input: &[u8]) -> (u32, Vec<u8>) {
    run_xdp_repeat(dp, ifindex, input, 1).0
}

/// `repeat` runs of `mcs_xdp`; also the kernel's mean time per run, in ns.
pub fn run_xdp_repeat(dp: &mut Datapath, ifindex: u32, input: &[u8], repeat: u32) -> ((u32, Vec<u8>), u128) {
    // xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let ctx: Vec<u8> = [0, input.len() as u32, 0, ifindex, 0, 0].iter().flat_map(|w| w.to_ne_bytes()).collect();
    let mut out = vec![0u8; input.len() + 256];
    let result = dp
        .xdp_program_mut()
        .unwrap()
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat,
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN of mcs_xdp");
    out.truncate(result.data_size_out as usize);
    ((result.return_value, out), result.duration.as_nanos())
}
