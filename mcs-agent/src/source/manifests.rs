//! Standalone mode: Kubernetes YAML files in a directory.

use std::{
    fs,
    path::{Path, PathBuf},
};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;
use serde_yaml::Value;
use thiserror::Error;

use crate::{
    desired::ObjectError,
    model::{MCS_GROUP, Origin, ServiceImport, Snapshot},
};

#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{origin}: invalid YAML: {message}")]
    Yaml { origin: Origin, message: String },
    #[error(transparent)]
    Object(#[from] ObjectError),
}

/// Files the agent reads: `*.yaml` and `*.yml`, skipping hidden and editor backup files.
pub fn is_manifest(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"))
}

/// What identifies a file's content without reading it: an atomic rename
/// (how editors, kubectl-like tools and the tests write) changes the inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    inode: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

/// Parsed files, so a change to one manifest of thousands re-parses one file.
#[derive(Debug, Default)]
pub struct Cache {
    files: std::collections::HashMap<PathBuf, (Stamp, Snapshot, Vec<String>)>,
}

impl Cache {
    /// Reads every manifest in `dir` (not recursive), in name order,
    /// re-parsing only files whose inode, size or mtime changed since the last
    /// call; the problems come back as text.
    pub fn read_dir(&mut self, dir: &Path) -> Result<(Snapshot, Vec<String>), ManifestError> {
        use std::os::unix::fs::MetadataExt as _;
        let entries = fs::read_dir(dir).map_err(|source| ManifestError::Read { path: dir.to_owned(), source })?;
        let mut files: Vec<PathBuf> =
            entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| is_manifest(p)).collect();
        files.sort();
        let mut seen = std::collections::HashSet::with_capacity(files.len());
        let mut snapshot = Snapshot::default();
        let mut errors = Vec::new();
        for path in files {
            let stamp = match fs::metadata(&path) {
                Ok(m) => Stamp { inode: m.ino(), len: m.len(), modified: m.modified().ok() },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    errors.push(ManifestError::Read { path, source }.to_string());
                    continue;
                }
            };
            let fresh = self.files.get(&path).is_some_and(|(cached, _, _)| *cached == stamp);
            if !fresh {
                let parsed = match fs::read_to_string(&path) {
                    Ok(text) => {
                        let (part, errs) = parse_documents(&Origin(path.display().to_string()), &text);
                        (part, errs.iter().map(ToString::to_string).collect())
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(source) => {
                        (Snapshot::default(), vec![ManifestError::Read { path: path.clone(), source }.to_string()])
                    }
                };
                self.files.insert(path.clone(), (stamp, parsed.0, parsed.1));
            }
            let (_, part, errs) = &self.files[&path];
            snapshot.imports.extend(part.imports.iter().cloned());
            snapshot.slices.extend(part.slices.iter().cloned());
            errors.extend(errs.iter().cloned());
            seen.insert(path);
        }
        self.files.retain(|path, _| seen.contains(path));
        Ok((snapshot, errors))
    }
}

/// Parses a multi-document YAML text. Documents of other kinds are ignored;
/// a `List` (as `kubectl get -o yaml` prints) is unpacked.
pub fn parse_documents(file: &Origin, text: &str) -> (Snapshot, Vec<ManifestError>) {
    let mut snapshot = Snapshot::default();
    let mut errors = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let origin = Origin(format!("{file} (document {})", index + 1));
        match Value::deserialize(document) {
            Ok(value) => add_object(&origin, value, &mut snapshot, &mut errors),
            Err(e) => {
                errors.push(ManifestError::Yaml { origin, message: e.to_string() });
                // The parser cannot resynchronise after a syntax error.
                break;
            }
        }
    }
    (snapshot, errors)
}

fn add_object(origin: &Origin, value: Value, snapshot: &mut Snapshot, errors: &mut Vec<ManifestError>) {
    if value.is_null() {
        return;
    }
    let text = |key: &str| value.get(key).and_then(Value::as_str).unwrap_or_default().to_owned();
    let (api_version, kind) = (text("apiVersion"), text("kind"));
    let meta = |key: &str| value.get("metadata").and_then(|m| m.get(key)).and_then(Value::as_str).map(str::to_owned);
    let object_error = |field: String, message: String| ObjectError {
        origin: format!("{origin}: "),
        kind: if kind == "ServiceImport" { "ServiceImport" } else { "EndpointSlice" },
        object: format!(
            "{}/{}",
            meta("namespace").unwrap_or_else(|| "default".into()),
            meta("name").unwrap_or_default()
        ),
        field,
        message,
    };
    match (api_version.as_str(), kind.as_str()) {
        (_, "List") => {
            if let Some(items) = value.get("items").and_then(Value::as_sequence) {
                for (i, item) in items.iter().enumerate() {
                    let origin = Origin(format!("{origin} items[{i}]"));
                    add_object(&origin, item.clone(), snapshot, errors);
                }
            }
        }
        (version, "ServiceImport") if version.starts_with(&format!("{MCS_GROUP}/")) => {
            if version != "multicluster.x-k8s.io/v1beta1" && version != "multicluster.x-k8s.io/v1alpha1" {
                errors.push(object_error("apiVersion".into(), format!("{version} is not v1beta1 or v1alpha1")).into());
                return;
            }
            match serde_path_to_error::deserialize::<_, ServiceImport>(value.clone()) {
                Ok(import) => snapshot.imports.push((origin.clone(), import)),
                Err(e) => errors.push(object_error(e.path().to_string(), e.inner().to_string()).into()),
            }
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            match serde_path_to_error::deserialize::<_, EndpointSlice>(value.clone()) {
                Ok(slice) => snapshot.slices.push((origin.clone(), slice)),
                Err(e) => errors.push(object_error(e.path().to_string(), e.inner().to_string()).into()),
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_errors_name_the_file_object_and_field() {
        let yaml = r#"
apiVersion: multicluster.x-k8s.io/v1beta1
kind: ServiceImport
metadata: {name: web, namespace: demo}
spec: {type: ClusterSetIP, ips: ["10.96.0.1"], ports: [{port: "eighty"}]}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, namespace: demo}
addressType: IPv4
endpoints: []
"#;
        let (snapshot, errors) = parse_documents(&Origin("dir/web.yaml".into()), yaml);
        assert_eq!(errors.len(), 1);
        let text = errors[0].to_string();
        assert!(text.starts_with("dir/web.yaml (document 1): ServiceImport demo/web: spec.ports[0].port:"), "{text}");
        assert_eq!(snapshot.imports.len(), 0);
        assert_eq!(snapshot.slices.len(), 1);
    }

    #[test]
    fn syntax_errors_are_reported_with_the_document() {
        let yaml = "kind: ServiceImport\n---\nkind: [unclosed\n";
        let (_, errors) = parse_documents(&Origin("x.yaml".into()), yaml);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().starts_with("x.yaml (document 2): invalid YAML"), "{}", errors[0]);
    }

    #[test]
    fn lists_are_unpacked_and_unknown_versions_rejected() {
        let yaml = r#"
apiVersion: v1
kind: List
items:
- apiVersion: multicluster.x-k8s.io/v1alpha1
  kind: ServiceImport
  metadata: {name: a}
  spec: {type: ClusterSetIP, ports: []}
- apiVersion: multicluster.x-k8s.io/v2
  kind: ServiceImport
  metadata: {name: b}
  spec: {type: ClusterSetIP, ports: []}
"#;
        let (snapshot, errors) = parse_documents(&Origin("l.yaml".into()), yaml);
        assert_eq!(snapshot.imports.len(), 1);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("l.yaml (document 1) items[1]: ServiceImport default/b: apiVersion"));
    }

    #[test]
    fn only_yaml_files_that_are_not_hidden_are_read() {
        assert!(is_manifest(Path::new("/d/web.yaml")));
        assert!(is_manifest(Path::new("/d/web.yml")));
        assert!(!is_manifest(Path::new("/d/.web.yaml.swp")));
        assert!(!is_manifest(Path::new("/d/.hidden.yaml")));
        assert!(!is_manifest(Path::new("/d/README.md")));
    }
}
