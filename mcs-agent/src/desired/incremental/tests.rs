//! The incremental model against the whole-snapshot pass: after every
//! change of a random sequence, recomputing only what the change touched
//! gives the state and problems a full pass gives from the same start.

use super::*;
use crate::source::manifests::parse_documents;
use crate::testing::Rng;

const SERVICES: u64 = 6;
/// VIPs and endpoint addresses share a pool, so imports contend for VIPs
/// and endpoints capture them.
fn addr(i: u64) -> String {
    format!("10.0.0.{}", i + 1)
}

fn random_service(rng: &mut Rng, i: u64) -> String {
    let mut yaml = String::new();
    if rng.below(5) > 0 {
        let ips = match rng.below(6) {
            0 => String::new(),
            1 => r#""not-an-ip""#.to_owned(),
            _ => format!(r#""{}""#, addr(rng.below(8))),
        };
        let created = if rng.below(3) == 0 {
            String::new()
        } else {
            format!("creationTimestamp: \"2026-01-0{}T00:00:00Z\"", 1 + rng.below(3))
        };
        let port = if rng.below(2) == 0 { "80" } else { "8080" };
        yaml.push_str(&format!(
                "apiVersion: multicluster.x-k8s.io/v1beta1\nkind: ServiceImport\nmetadata: {{name: svc-{i}, namespace: ns, {created}}}\nspec:\n  type: ClusterSetIP\n  ips: [{ips}]\n  ports:\n  - {{name: http, port: {port}, protocol: TCP}}\n---\n"
            ));
    }
    for s in 0..rng.below(3) {
        let endpoints: Vec<String> = (0..rng.below(4))
            .map(|_| {
                let ready = rng.below(4) > 0;
                format!(
                    "  - addresses: [\"{}\"]\n    conditions: {{ready: {ready}}}\n",
                    addr(8 + rng.below(6).min(5) - if rng.below(3) == 0 { 8 } else { 0 })
                )
            })
            .collect();
        let cluster = ["east", "west"][rng.below(2) as usize];
        let target = 8000 + rng.below(2);
        yaml.push_str(&format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-{s}\n  namespace: ns\n  labels: {{multicluster.kubernetes.io/service-name: svc-{i}, multicluster.kubernetes.io/source-cluster: {cluster}}}\naddressType: IPv4\nports:\n- {{name: http, port: {target}, protocol: TCP}}\nendpoints:\n{}---\n",
                if endpoints.is_empty() { "  []\n".to_owned() } else { endpoints.concat() }
            ).replace("endpoints:\n  []\n", "endpoints: []\n"));
    }
    yaml
}

fn groups(files: &BTreeMap<u64, String>) -> Vec<(ServiceRef, Group)> {
    let mut snapshot = Snapshot::default();
    for (i, yaml) in files {
        let (part, errors) = parse_documents(&Origin(format!("svc-{i}.yaml")), yaml);
        assert!(errors.is_empty(), "{errors:?}\n{yaml}");
        snapshot.imports.extend(part.imports);
        snapshot.slices.extend(part.slices);
    }
    group_snapshot(&snapshot)
}

fn sorted_errors(model: &Model) -> Vec<String> {
    let mut errors: Vec<String> = model.errors().map(ToString::to_string).collect();
    errors.sort();
    errors
}

#[test]
fn incremental_passes_give_what_a_full_pass_gives() {
    let policy = Policy::default();
    let mut seen = [0usize; 4];
    for seed in 1..=40u64 {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed);
        let mut files: BTreeMap<u64, String> = BTreeMap::new();
        let mut incremental = Model::default();
        let mut cluster_ips = ClusterIps::new();
        for step in 0..60 {
            let held = incremental.held().clone();
            if rng.below(4) == 0 {
                // The cluster's Services move (a pass of its own, as in the
                // agent): one may hold a ClusterSetIP, owned by the import
                // asking for it or not.
                cluster_ips = (0..rng.below(3))
                    .map(|_| {
                        let owners =
                            if rng.below(2) == 0 { vec![format!("svc-{}", rng.below(SERVICES))] } else { vec![] };
                        let service = ServiceIp { namespace: "ns".into(), name: "svc".into(), owner_imports: owners };
                        (addr(rng.below(8)).parse().unwrap(), service)
                    })
                    .collect();
                incremental.set_cluster_ips(cluster_ips.clone(), &policy, &Runtime::default());
            } else {
                // One to three services change at once, as in a debounce window.
                let mut changed = BTreeSet::new();
                for _ in 0..=rng.below(3) {
                    let i = rng.below(SERVICES);
                    changed.insert(i);
                    if rng.below(6) == 0 {
                        files.remove(&i);
                    } else {
                        files.insert(i, random_service(&mut rng, i));
                    }
                }
                // What the manifest source hands over: every object of each changed service.
                let all = groups(&files);
                let changes: Vec<(ServiceRef, Group)> = changed
                    .iter()
                    .map(|i| {
                        let service = ("ns".to_owned(), format!("svc-{i}"));
                        let group = all.iter().find(|(s, _)| *s == service).map(|(_, g)| g.clone()).unwrap_or_default();
                        (service, group)
                    })
                    .collect();
                incremental.replace(changes, &policy, &Runtime::default());
            }

            let mut full = Model::with_held(held);
            full.set_cluster_ips(cluster_ips.clone(), &policy, &Runtime::default());
            full.replace(groups(&files), &policy, &Runtime::default());
            assert_eq!(
                incremental.state(),
                full.state(),
                "seed {seed} step {step}: the incremental state differs from a full pass\n{files:#?}"
            );
            assert_eq!(sorted_errors(&incremental), sorted_errors(&full), "seed {seed} step {step}: problems differ");
            assert_eq!(incremental.slots(), full.slots());
            let errors = sorted_errors(&full);
            seen[0] += full.state().frontends.len();
            seen[1] += errors.iter().filter(|e| e.contains("is already the ClusterSetIP")).count();
            seen[2] += errors.iter().filter(|e| e.contains("is the address of an endpoint")).count();
            seen[3] += errors.iter().filter(|e| e.contains("is the ClusterIP of Service")).count();
        }
    }
    // The sequences must exercise what makes services depend on each other.
    assert!(seen.iter().all(|&n| n > 100), "frontends, contended VIPs, captured VIPs, Services' ClusterIPs: {seen:?}");
}

#[test]
fn counted_keys_hold_one_key_without_a_map_and_count_repeats() {
    let mut keys = Counted::One("b");
    keys.add("a");
    keys.add("b");
    assert_eq!(keys.keys().copied().collect::<Vec<_>>(), ["a", "b"], "in key order");
    assert!(keys.remove("b"), "b is still counted once, a once");
    assert!(matches!(&keys, Counted::Many(m) if m.len() == 2));
    assert!(keys.remove("a"));
    assert!(matches!(keys, Counted::One("b")), "one key counted once: back to no map");
    assert!(keys.remove("c"), "a key never counted changes nothing");
    assert!(!keys.remove("b"), "nothing left");

    let mut twice = Counted::One("a");
    twice.add("a");
    assert!(twice.remove("a") && matches!(twice, Counted::One("a")), "counted twice, removed once: still there");

    let mut index: ByAddress<Counted<&str>> = ByAddress::default();
    let (v4, v6): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "::ffff:10.0.0.1".parse().unwrap());
    count(&mut index, v4, "s", true);
    count(&mut index, v6, "t", true);
    assert_eq!(index.get(&v4).map(|k| k.keys().copied().collect::<Vec<_>>()), Some(vec!["s"]));
    count(&mut index, v4, "s", false);
    assert!(index.get(&v4).is_none() && index.get(&v6).is_some(), "each family apart; an emptied entry goes");
}
