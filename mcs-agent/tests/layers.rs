//! The library's modules import each other in one direction only: a small
//! check over the `crate::` paths of every source file (test code left out:
//! after `#[cfg(test)]`, and files named `tests.rs`),
//! so that no import circle creeps back in (`desired` and `locality` had one).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

/// The top-level module a file belongs to (`datapath/ops.rs` -> `datapath`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.trim_end_matches(".rs");
    (name != "main" && name != "lib").then(|| name.to_owned())
}

/// Top-level modules named by `crate::x` paths and `use crate::{x, y::z}` groups.
fn imports(text: &str) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    let mut found = BTreeSet::new();
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Names at the group's first level: after `{` and after each top-level `,`.
            let mut depth = 0;
            let mut expect_name = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => expect_name = true,
                    c if c.is_whitespace() => {}
                    _ if expect_name && depth == 0 => {
                        found.insert(ident(&group[i..]));
                        expect_name = false;
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(rest));
        }
    }
    found
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("reading src") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &all {
        let Some(module) = module_of(&src, file) else { continue };
        // Test modules in files of their own (`desired/tests.rs`).
        if file.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("reading a source file");
        let deps = graph.entry(module.clone()).or_default();
        deps.extend(imports(&text).into_iter().filter(|d| *d != module && d != "self"));
    }
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    assert!(modules.len() > 10, "found the modules: {modules:?}");
    for deps in graph.values_mut() {
        deps.retain(|d| modules.contains(d));
    }
    // Depth-first search with the path on the stack: a module met again on
    // its own path closes a circle.
    fn visit(
        graph: &BTreeMap<String, BTreeSet<String>>,
        node: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Result<(), Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut circle = path[at..].to_vec();
            circle.push(node.to_owned());
            return Err(circle);
        }
        if done.contains(node) {
            return Ok(());
        }
        path.push(node.to_owned());
        for dep in &graph[node] {
            visit(graph, dep, path, done)?;
        }
        path.pop();
        done.insert(node.to_owned());
        Ok(())
    }
    let mut done = BTreeSet::new();
    for module in &modules {
        if let Err(circle) = visit(&graph, module, &mut Vec::new(), &mut done) {
            panic!("an import circle: {}\nthe graph: {graph:#?}", circle.join(" -> "));
        }
    }
    // The bottom of the data flow imports nothing of the crate.
    assert!(graph["model"].is_empty(), "model imports {:?}", graph["model"]);
    assert!(graph["locality"].iter().chain(&graph["maglev"]).all(|d| d == "model"), "locality and maglev: model only");
}

#[test]
fn the_import_reader_sees_groups_and_paths() {
    let text = "use crate::{desired::{A, B}, model, plan::C};\nfn f() { crate::maglev::x(); }\n#[cfg(test)]\nuse crate::inspect;";
    let found: Vec<String> = imports(text).into_iter().collect();
    assert_eq!(found, ["desired", "maglev", "model", "plan"]);
}
