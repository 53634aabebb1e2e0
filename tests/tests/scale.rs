//! Batched map writes against the real kernel: what a thousand services
//! write in a few `BPF_MAP_UPDATE_BATCH` calls reads back exactly as planned.
//! Needs root (loads the eBPF programs).

use mcs_agent::plan::{Applied, Capacity};
use mcs_tests::testrun::program;

fn manifests(services: usize, endpoints: usize) -> String {
    let mut yaml = String::new();
    for i in 0..services {
        let (hi, lo) = (i / 250, i % 250 + 1);
        yaml.push_str(&format!(
            "apiVersion: multicluster.x-k8s.io/v1beta1\nkind: ServiceImport\nmetadata: {{name: s{i}, namespace: ns}}\nspec:\n  type: ClusterSetIP\n  ips: [\"10.96.{hi}.{lo}\"]\n  ports: [{{name: http, port: 80, protocol: TCP}}]\n---\n"
        ));
        let eps: String = (0..endpoints).map(|k| format!("- addresses: [\"10.{}.{hi}.{lo}\"]\n", 40 + k)).collect();
        yaml.push_str(&format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s{i}-a\n  namespace: ns\n  labels: {{multicluster.kubernetes.io/service-name: s{i}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n{eps}---\n"
        ));
    }
    yaml
}

#[test]
fn a_thousand_services_written_in_batches_read_back_as_planned() {
    let capacity = Capacity { services: 2048, backends: 8192, slots: 1 << 22 };
    let (dp, reconciler, report) = program(capacity, 1024, &manifests(1000, 5));
    assert_eq!((report.frontends, report.backends), (1000, 5000));

    // Read back as a restarted agent would: every entry, address and slot the
    // plan wrote is there, so planning the same state again writes nothing.
    let kernel = dp.kernel_state();
    assert_eq!((kernel.services.len(), kernel.backends.len()), (1000, 5000));
    let (adopted, problems) = Applied::adopt(capacity, &kernel.services, &kernel.backends, |i| dp.selection_slot(i));
    assert!(problems.is_empty(), "{problems:?}");
    let again = adopted.plan(reconciler.state());
    assert!(again.ops.is_empty(), "the kernel differs from the plan: {} writes to fix it", again.ops.len());
}
