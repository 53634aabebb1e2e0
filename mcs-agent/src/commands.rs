//! The subcommands besides `run`: `check` (manifests, no kernel),
//! `inspect` (the pinned maps) and `uninstall`. Each returns what to print
//! or writes it to the writers it is given; the binary maps errors to exit
//! codes.

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use thiserror::Error;

use crate::{
    agent::control,
    cli::{InspectArgs, InspectWhat, Output},
    datapath::{self, DatapathError, LayoutDir},
    desired::{self, Policy},
    inspect::{self, AgentInventory, AgentServices, InspectError, ServiceRow},
    source::manifests::{self, ManifestError},
};

#[derive(Debug, Error)]
pub enum CommandError {
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: Box<ManifestError>,
    },
    #[error("{0} object(s) invalid")]
    Invalid(usize),
    #[error(transparent)]
    Inspect(#[from] InspectError),
    #[error("--bpffs {}", path.display())]
    Uninstall {
        path: PathBuf,
        #[source]
        source: Box<DatapathError>,
    },
    #[error("still on this node after uninstalling: {0} (is an agent still running? stop it first)")]
    Remains(String),
    #[error("writing the output")]
    Output(#[from] std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// `rows` as JSON, or as a table of `cells` per row.
fn rows_or_table<T: serde::Serialize>(
    rows: &[T],
    json: bool,
    header: &[&str],
    cells: impl Fn(&T) -> Vec<String>,
) -> Result<String, CommandError> {
    if json {
        return Ok(serde_json::to_string_pretty(rows)?);
    }
    Ok(inspect::table(header, &rows.iter().map(cells).collect::<Vec<_>>()))
}

/// `mcs-agent inspect`: the text to print (JSON ends with a newline).
///
/// `services` asks the running agent first (its control socket in
/// `--state-dir`), whose answer is one generation of tables and names; the
/// pinned maps named by the `state.json` a stopping agent leaves otherwise.
/// The other views read the pinned maps, named the same way (the running
/// agent answers `inventory`).
pub fn inspect(args: &InspectArgs) -> Result<String, CommandError> {
    let json = args.output == Output::Json;
    let end = |text: String| if json { text + "\n" } else { text };
    if matches!(args.what, InspectWhat::Services)
        && let Some(answer) = ask_agent::<AgentServices>(args, "services")
    {
        let note = format!("(from the running agent, generation {})\n", answer.generation);
        return services_text(&answer.rows, json, &note).map(end);
    }
    // Named by the running agent (the generation it answers with), or by the
    // state.json the last one left when it stopped.
    let pinned = || -> Result<inspect::Pinned, CommandError> {
        let pinned = inspect::Pinned::open(&args.bpffs, &args.state_dir)?;
        Ok(match ask_agent::<AgentInventory>(args, "inventory") {
            Some(answer) => pinned.named(Some(answer.inventory)),
            None => pinned,
        })
    };
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
    let text = match &args.what {
        InspectWhat::Services => {
            // The agent did not answer `services`: it would not name them either.
            let pinned = inspect::Pinned::open(&args.bpffs, &args.state_dir)?;
            let note = match pinned.inventory() {
                None => "(no agent answered on --state-dir, and none left a state.json there: services, clusters, zones and tiers unknown)\n".to_owned(),
                Some(left) => format!(
                    "(from the pinned maps, named by the state.json the last agent left when it stopped{}: no agent answered on --state-dir)\n",
                    left.generation.map(|g| format!(" at generation {g}")).unwrap_or_default()
                ),
            };
            services_text(&inspect::services(&pinned), json, &note)?
        }
        InspectWhat::Conntrack { service } => rows_or_table(
            &inspect::conntrack(&pinned()?, service.as_deref()),
            json,
            // New columns go last: scripts may read the first ones by position.
            &["CLIENT", "CLUSTERSET IP", "BACKEND", "PROTO", "SERVICE", "AGE", "STATE", "PATH", "SOURCE NAT"],
            |r| {
                vec![
                    r.client.clone(),
                    r.vip.clone(),
                    r.backend.clone(),
                    r.protocol.to_owned(),
                    opt(&r.service),
                    format!("{:.1}s", r.age_secs),
                    r.state.to_owned(),
                    r.path.to_owned(),
                    opt(&r.snat),
                ]
            },
        )?,
        InspectWhat::Affinity => {
            rows_or_table(&inspect::affinity(&pinned()?), json, &["SERVICE", "CLIENT", "BACKEND", "IDLE"], |r| {
                vec![opt(&r.service), r.client.to_string(), opt(&r.backend), format!("{:.1}s", r.idle_secs)]
            })?
        }
        InspectWhat::Stats => rows_or_table(&inspect::stats(&pinned()?), json, &["EVENT", "PACKETS"], |r| {
            vec![r.event.to_owned(), r.count.to_string()]
        })?,
        InspectWhat::Maps => {
            // The pins alone: no need to map SELECTION or read state.json.
            let dir = LayoutDir::new(&args.bpffs, mcs_common::LAYOUT_VERSION).dir;
            let maps = datapath::memory::pinned_maps(&dir);
            if maps.is_empty() {
                return Err(InspectError::NothingPinned(dir.display().to_string()).into());
            }
            let mut text = rows_or_table(&maps, json, &["MAP", "MAX ENTRIES", "KERNEL MEMORY"], |m| {
                vec![m.map.clone(), m.max_entries.to_string(), mib(m.bytes)]
            })?;
            if !json {
                text.push_str(&format!("total {}\n", mib(maps.iter().map(|m| m.bytes).sum())));
            }
            text
        }
    };
    Ok(end(text))
}

/// Bytes as MiB with one decimal.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// An answer naming the bpffs its agent serves.
trait Served: serde::de::DeserializeOwned {
    fn bpffs(&self) -> Option<&Path>;
}

impl Served for AgentServices {
    fn bpffs(&self) -> Option<&Path> {
        self.bpffs.as_deref()
    }
}

impl Served for AgentInventory {
    fn bpffs(&self) -> Option<&Path> {
        self.bpffs.as_deref()
    }
}

/// The running agent's answer to `what`, unless none answers on
/// `--state-dir` or it serves another bpffs than `--bpffs`.
fn ask_agent<T: Served>(args: &InspectArgs, what: &str) -> Option<T> {
    let answer: T = serde_json::from_str(&control::ask(&args.state_dir, what)?).ok()?;
    let same = |a: &Path, b: &Path| a.canonicalize().ok().zip(b.canonicalize().ok()).is_some_and(|(a, b)| a == b);
    match answer.bpffs() {
        Some(bpffs) if !same(bpffs, &args.bpffs) => None,
        _ => Some(answer),
    }
}

/// Service rows as JSON, or as a table per frontend with `note` under them.
fn services_text(rows: &[ServiceRow], json: bool, note: &str) -> Result<String, CommandError> {
    if json {
        return Ok(serde_json::to_string_pretty(rows)?);
    }
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
    let mut out = String::new();
    for s in rows {
        let affinity = match s.affinity_timeout_secs {
            0 => String::new(),
            t => format!("  ClientIP affinity {t}s"),
        };
        // Flows from outside the node (XDP) only where there were some: a
        // node without --external-interface sees what it always saw.
        let outside = s.xdp_new_connections != 0
            || s.xdp_no_backend_drops != 0
            || s.backends
                .iter()
                .any(|b| b.xdp_new_connections != 0 || b.xdp_packets_to != 0 || b.xdp_packets_from != 0);
        let xdp = if outside {
            format!(
                "; from outside (XDP): {} new connections, {} dropped (no backend)",
                s.xdp_new_connections, s.xdp_no_backend_drops
            )
        } else {
            String::new()
        };
        out.push_str(&format!(
            "{}  {} ({})  table {} slots  {} new connections, {} dropped (no backend){xdp}{affinity}\n",
            s.frontend,
            opt(&s.service),
            opt(&s.port_name),
            s.table_size,
            s.new_connections,
            s.no_backend_drops,
        ));
        let cells: Vec<Vec<String>> = s
            .backends
            .iter()
            .map(|b| {
                let mut cells = vec![
                    format!("  {}", b.address),
                    opt(&b.cluster),
                    opt(&b.zone),
                    opt(&b.tier),
                    b.weight.map_or_else(|| "-".into(), |w| format!("{:.1}%", w * 100.0)),
                    format!("{:.1}%", b.table_share * 100.0),
                    opt(&b.condition),
                    b.new_connections.to_string(),
                    b.packets_to.to_string(),
                    b.packets_from.to_string(),
                ];
                if outside {
                    cells.extend([
                        b.xdp_new_connections.to_string(),
                        b.xdp_packets_to.to_string(),
                        b.xdp_packets_from.to_string(),
                    ]);
                }
                cells
            })
            .collect();
        let mut header = vec![
            "  BACKEND",
            "CLUSTER",
            "ZONE",
            "TIER",
            "WEIGHT",
            "TABLE",
            "STATE",
            "NEW CONNS",
            "PKTS TO",
            "PKTS FROM",
        ];
        if outside {
            header.extend(["XDP CONNS", "XDP PKTS TO", "XDP PKTS FROM"]);
        }
        out.push_str(&inspect::table(&header, &cells));
    }
    out.push_str(note);
    Ok(out)
}

/// `mcs-agent check`: each frontend and its endpoints on `out`, each
/// problem on `err`; an error when any object is invalid.
pub fn check(dir: &Path, policy: &Policy, out: &mut dyn Write, err: &mut dyn Write) -> Result<(), CommandError> {
    let read = manifests::Cache::default()
        .read_dir(dir)
        .map_err(|e| CommandError::Read { path: dir.to_owned(), source: Box::new(e) })?;
    let mut model = desired::Model::default();
    model.replace(read.changes, policy, &desired::Runtime::default());
    let mut problems = read.problems;
    let mut errors: Vec<String> = model.errors().map(ToString::to_string).collect();
    errors.sort();
    problems.extend(errors);
    for (key, frontend) in &model.state().frontends {
        let port = if frontend.port_name.is_empty() { String::new() } else { format!(" ({})", frontend.port_name) };
        let tiers: Vec<String> = frontend.tiers.iter().map(ToString::to_string).collect();
        let affinity = match frontend.affinity_timeout_secs {
            0 => String::new(),
            secs => format!("  ClientIP affinity {secs}s"),
        };
        writeln!(
            out,
            "{key}{port}  {}  {} of {} endpoint(s) serve; tiers {}; table {} slots{affinity}",
            frontend.service,
            frontend.weights.len(),
            frontend.endpoints.len(),
            tiers.join(","),
            frontend.table_size
        )?;
        for endpoint in &frontend.endpoints {
            let share = frontend.weights.iter().find(|w| w.addr == endpoint.addr);
            let (share, tier) = share.map_or(("-".to_owned(), "-".to_owned()), |w| {
                (format!("{:.1}%", w.share * 100.0), frontend.tiers[w.tier()].to_string())
            });
            let l = &endpoint.locality;
            writeln!(
                out,
                "    {:<21} {:>6}  tier={:<7} {:?}  cluster={} zone={} region={}",
                endpoint.addr.to_string(),
                share,
                tier,
                endpoint.condition,
                l.cluster.as_deref().unwrap_or("-"),
                l.zone.as_deref().unwrap_or("-"),
                l.region.as_deref().unwrap_or("-"),
            )?;
        }
    }
    for problem in &problems {
        writeln!(err, "error: {problem}")?;
    }
    if !problems.is_empty() {
        return Err(CommandError::Invalid(problems.len()));
    }
    Ok(())
}

/// What `uninstall --check` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Remains {
    Nothing,
    /// What is left, one line each.
    Left(Vec<String>),
}

/// `mcs-agent uninstall --check`: nothing of mcs-agent left on this node, or what is.
pub fn uninstall_check(bpffs: &Path) -> Remains {
    let left = datapath::remains(bpffs);
    if left.is_empty() { Remains::Nothing } else { Remains::Left(left) }
}

/// `mcs-agent uninstall`: removes every layout's pins and links, and waits
/// (up to 2 s) until nothing is left; says what it removed on `out`.
pub fn uninstall(bpffs: &Path, out: &mut dyn Write) -> Result<(), CommandError> {
    let done = datapath::uninstall(bpffs)
        .map_err(|e| CommandError::Uninstall { path: bpffs.to_owned(), source: Box::new(e) })?;
    writeln!(
        out,
        "removed layout version(s) {:?} ({} pinned link(s)), {} netlink filter(s)",
        done.layouts, done.links, done.netlink_filters
    )?;
    // The kernel detaches an unpinned link from a work queue, a moment later.
    let deadline = Instant::now() + Duration::from_secs(2);
    let left = loop {
        let left = datapath::remains(bpffs);
        if left.is_empty() || Instant::now() > deadline {
            break left;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if !left.is_empty() {
        return Err(CommandError::Remains(left.join("; ")));
    }
    Ok(())
}
