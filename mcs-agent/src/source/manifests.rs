//! Standalone mode: Kubernetes YAML files in a directory.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;

use crate::{
    desired::{Group, ImportEntry, ObjectError, ServiceRef, SliceEntry},
    model::{MCS_GROUP, Origin, ServiceImport, Snapshot},
};

#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{origin}: invalid YAML: {message}")]
    Yaml { origin: Origin, message: String },
    #[error("{origin}: invalid JSON: {message}")]
    Json { origin: Origin, message: String },
    #[error(transparent)]
    Object(#[from] ObjectError),
}

/// Files the agent reads: `*.yaml`, `*.yml` and `*.json`, skipping hidden
/// and editor backup files.
pub fn is_manifest(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    !name.starts_with('.') && [".yaml", ".yml", ".json"].iter().any(|ext| name.ends_with(ext))
}

fn is_json(path: &Path) -> bool {
    path.extension().is_some_and(|ext| ext == "json")
}

/// What identifies a file's content without reading it: an atomic rename
/// (how editors, kubectl-like tools and the tests write) changes the inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    inode: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

/// One manifest file, parsed and checked.
#[derive(Debug)]
struct File {
    stamp: Stamp,
    imports: Vec<Arc<ImportEntry>>,
    slices: Vec<Arc<SliceEntry>>,
    /// Problems with the file itself (YAML, schema), as text.
    errors: Vec<String>,
}

impl File {
    fn services(&self) -> BTreeSet<ServiceRef> {
        self.imports.iter().map(|i| i.service()).chain(self.slices.iter().filter_map(|s| s.service())).collect()
    }
}

/// What a read found: the services whose objects changed, with all their
/// objects now (empty: the service is gone), and the files' own problems.
#[derive(Debug, Default)]
pub struct Read {
    pub changes: Vec<(ServiceRef, Group)>,
    pub problems: Vec<String>,
    /// Files parsed (not found unchanged).
    pub parsed: usize,
}

/// Parsed files, so a change to one manifest of thousands re-parses one file,
/// and the services each file contributes to, so it recomputes only those.
#[derive(Debug, Default)]
pub struct Cache {
    files: HashMap<PathBuf, File>,
    by_service: HashMap<ServiceRef, BTreeSet<PathBuf>>,
    /// Files with problems of their own.
    broken: BTreeMap<PathBuf, Vec<String>>,
}

fn stamp_of(path: &Path) -> Result<Option<Stamp>, ManifestError> {
    use std::os::unix::fs::MetadataExt as _;
    match fs::metadata(path) {
        Ok(m) => Ok(Some(Stamp { inode: m.ino(), len: m.len(), modified: m.modified().ok() })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ManifestError::Read { path: path.to_owned(), source }),
    }
}

/// The manifest files of a directory with their stamps: a walk that reads
/// no file, for the periodic resync off the agent's loop.
#[derive(Debug, Default)]
pub struct Scan(BTreeMap<PathBuf, Stamp>);

impl Scan {
    pub fn of(dir: &Path) -> Result<Self, ManifestError> {
        let entries = fs::read_dir(dir).map_err(|source| ManifestError::Read { path: dir.to_owned(), source })?;
        let mut files = BTreeMap::new();
        for path in entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| is_manifest(p)) {
            if let Ok(Some(stamp)) = stamp_of(&path) {
                files.insert(path, stamp);
            }
        }
        Ok(Self(files))
    }

    /// Files that appeared, vanished or changed since `earlier`.
    pub fn changed_since(&self, earlier: &Scan) -> Vec<PathBuf> {
        let changed = self.0.iter().filter(|(p, s)| earlier.0.get(*p) != Some(s)).map(|(p, _)| p.clone());
        let vanished = earlier.0.keys().filter(|p| !self.0.contains_key(*p)).cloned();
        changed.chain(vanished).collect()
    }
}

/// Reads and parses one file; `None` when it vanished meanwhile.
fn parse_file(path: &Path, stamp: Stamp) -> Option<File> {
    let (snapshot, errors) = match fs::read_to_string(path) {
        Ok(text) => {
            let origin = Origin(path.display().to_string());
            let (part, errs) = if is_json(path) { parse_json(&origin, &text) } else { parse_documents(&origin, &text) };
            (part, errs.iter().map(ToString::to_string).collect())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(source) => (Snapshot::default(), vec![ManifestError::Read { path: path.to_owned(), source }.to_string()]),
    };
    Some(File {
        stamp,
        imports: snapshot.imports.iter().map(|(o, i)| Arc::new(ImportEntry::new(o, i))).collect(),
        slices: snapshot.slices.iter().map(|(o, s)| Arc::new(SliceEntry::new(o, s))).collect(),
        errors,
    })
}

impl Cache {
    /// Reads every manifest in `dir` (not recursive), re-parsing only files
    /// whose inode, size or mtime changed since the last read, in parallel.
    pub fn read_dir(&mut self, dir: &Path) -> Result<Read, ManifestError> {
        let entries = fs::read_dir(dir).map_err(|source| ManifestError::Read { path: dir.to_owned(), source })?;
        let present: BTreeSet<PathBuf> =
            entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| is_manifest(p)).collect();
        let vanished: Vec<PathBuf> = self.files.keys().filter(|p| !present.contains(*p)).cloned().collect();
        let mut paths: Vec<PathBuf> = present.into_iter().collect();
        paths.extend(vanished);
        Ok(self.read_paths(&paths))
    }

    /// Re-reads these files only (what the file watcher named): changed ones
    /// are parsed again, vanished ones forgotten.
    pub fn read_paths(&mut self, paths: &[PathBuf]) -> Read {
        let mut read = Read::default();
        let mut stale = Vec::new();
        let mut affected: BTreeSet<ServiceRef> = BTreeSet::new();
        for path in paths.iter().filter(|p| is_manifest(p)) {
            match stamp_of(path) {
                Ok(Some(stamp)) if self.files.get(path).is_some_and(|f| f.stamp == stamp) => {}
                Ok(Some(stamp)) => stale.push((path.clone(), stamp)),
                Ok(None) => {
                    if let Some(old) = self.forget(path) {
                        affected.extend(old.services());
                    }
                }
                Err(e) => {
                    self.broken.insert(path.clone(), vec![e.to_string()]);
                }
            }
        }
        read.parsed = stale.len();
        for (path, parsed) in parse_all(stale) {
            let Some(file) = parsed else {
                if let Some(old) = self.forget(&path) {
                    affected.extend(old.services());
                }
                continue;
            };
            if let Some(old) = self.forget(&path) {
                affected.extend(old.services());
            }
            let services = file.services();
            for service in &services {
                self.by_service.entry(service.clone()).or_default().insert(path.clone());
            }
            affected.extend(services);
            if file.errors.is_empty() {
                self.broken.remove(&path);
            } else {
                self.broken.insert(path.clone(), file.errors.clone());
            }
            self.files.insert(path, file);
        }
        read.changes = affected.into_iter().map(|service| (service.clone(), self.group(&service))).collect();
        read.problems = self.broken.values().flatten().cloned().collect();
        read
    }

    fn forget(&mut self, path: &Path) -> Option<File> {
        let old = self.files.remove(path)?;
        self.broken.remove(path);
        for service in old.services() {
            if let Some(files) = self.by_service.get_mut(&service) {
                files.remove(path);
                if files.is_empty() {
                    self.by_service.remove(&service);
                }
            }
        }
        Some(old)
    }

    /// Every object of `service`, over the files that have some, in file order.
    fn group(&self, service: &ServiceRef) -> Group {
        let mut group = Group::default();
        for path in self.by_service.get(service).into_iter().flatten() {
            let file = &self.files[path];
            group.imports.extend(file.imports.iter().filter(|i| i.service() == *service).cloned());
            group.slices.extend(file.slices.iter().filter(|s| s.service().as_ref() == Some(service)).cloned());
        }
        group.sort();
        group
    }
}

/// Parses files on every CPU: at cold start there can be tens of thousands.
fn parse_all(stale: Vec<(PathBuf, Stamp)>) -> Vec<(PathBuf, Option<File>)> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    if stale.len() < 64 || workers == 1 {
        return stale
            .into_iter()
            .map(|(path, stamp)| {
                let file = parse_file(&path, stamp);
                (path, file)
            })
            .collect();
    }
    let chunk = stale.len().div_ceil(workers);
    std::thread::scope(|scope| {
        let handles: Vec<_> = stale
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter().map(|(path, stamp)| (path.clone(), parse_file(path, *stamp))).collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("a parser thread panicked")).collect()
    })
}

/// Parses a multi-document YAML text. Documents of other kinds are ignored;
/// a `List` (as `kubectl get -o yaml` prints) is unpacked.
///
/// Each document is read twice, both times straight into typed structs: its
/// head (apiVersion, kind, metadata) to know what it is, then the whole of it
/// as that type, so an error names the field's path. No YAML tree is built.
pub fn parse_documents(file: &Origin, text: &str) -> (Snapshot, Vec<ManifestError>) {
    parse_documents_with(file, text, true)
}

/// [`parse_documents`], with or without [`scan_head`] (the tests compare).
fn parse_documents_with(file: &Origin, text: &str, scan: bool) -> (Snapshot, Vec<ManifestError>) {
    let mut snapshot = Snapshot::default();
    let mut errors = Vec::new();
    for (index, document) in split_documents(text).into_iter().enumerate() {
        let origin = Origin(format!("{file} (document {})", index + 1));
        if scan
            && let Some(head) = scan_head(document)
            && add_scanned(&origin, document, &head, &mut snapshot)
        {
            continue;
        }
        match serde_saphyr::from_str::<Option<Head>>(document) {
            Ok(Some(head)) => add_document(&origin, Document::Yaml(document), head, &mut snapshot, &mut errors),
            Ok(None) => {}
            Err(e) => {
                errors.push(ManifestError::Yaml { origin, message: yaml_message(&e) });
                // As kubectl: what follows a broken document is not applied.
                break;
            }
        }
    }
    (snapshot, errors)
}

/// Parses a JSON file: one object (a `List`, as `kubectl get -o json` prints,
/// is unpacked). JSON is YAML too, but its own parser reads it in a fraction
/// of the time.
pub fn parse_json(file: &Origin, text: &str) -> (Snapshot, Vec<ManifestError>) {
    let mut snapshot = Snapshot::default();
    let mut errors = Vec::new();
    match serde_json::from_str::<Value>(text) {
        Ok(value) => {
            if let Ok(Some(head)) = Option::<Head>::deserialize(&value) {
                add_document(file, Document::Item(&value), head, &mut snapshot, &mut errors);
            }
        }
        Err(e) => errors.push(ManifestError::Json { origin: file.clone(), message: e.to_string() }),
    }
    (snapshot, errors)
}

/// What a document is, read before the rest of it.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Head {
    #[serde(rename = "apiVersion")]
    api_version: String,
    kind: String,
    metadata: HeadMeta,
}

/// A document's `apiVersion` and `kind` from its text, when each is a plain
/// top-level key on a line of its own (`kind: ServiceImport` at column 0, as
/// every tool writes them). A line at column 0 of a block mapping is one of
/// its keys: block scalars and nested values are indented. Anything else
/// (flow style, quotes, a key twice) is left to the parser. Reading the
/// head with the parser tokenised each document twice; this halves the
/// parsing of a directory of manifests.
fn scan_head(document: &str) -> Option<Head> {
    let (mut api_version, mut kind) = (None, None);
    for line in document.lines() {
        let (slot, rest) = if let Some(rest) = line.strip_prefix("apiVersion:") {
            (&mut api_version, rest)
        } else if let Some(rest) = line.strip_prefix("kind:") {
            (&mut kind, rest)
        } else {
            continue;
        };
        let value = rest.split(" #").next().unwrap_or_default().trim();
        let plain = !value.is_empty() && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"./-_".contains(&b));
        if !plain || slot.replace(value).is_some() {
            return None;
        }
    }
    Some(Head { api_version: api_version?.to_owned(), kind: kind?.to_owned(), metadata: HeadMeta::default() })
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct HeadMeta {
    name: Option<String>,
    namespace: Option<String>,
}

/// A `List`'s items: rare (kubectl's output), so each item is kept as a JSON
/// value and dispatched like a document of its own.
#[derive(Debug, Deserialize)]
struct ListItems {
    #[serde(default)]
    items: Vec<Value>,
}

/// Where a document's typed objects are read from: its YAML text, or a
/// `List` item already held as a value.
enum Document<'a> {
    Yaml(&'a str),
    Item(&'a Value),
}

impl Document<'_> {
    /// The document as `T`; an error comes back as (field path, message).
    fn typed<T: serde::de::DeserializeOwned>(&self) -> Result<T, (String, String)> {
        match self {
            Document::Yaml(text) => {
                let mut path = None;
                serde_saphyr::with_deserializer_from_str(text, |de| {
                    serde_path_to_error::deserialize(de).map_err(|e| {
                        path = Some(e.path().to_string());
                        e.into_inner()
                    })
                })
                .map_err(|e| (path.unwrap_or_else(|| ".".into()), yaml_message(&e)))
            }
            Document::Item(value) => {
                serde_path_to_error::deserialize(*value).map_err(|e| (e.path().to_string(), e.inner().to_string()))
            }
        }
    }
}

/// The parser's message on one line, without the source snippet it can draw
/// (the origin already names the file and document).
fn yaml_message(e: &serde_saphyr::Error) -> String {
    let text = e.without_snippet().to_string();
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Splits a YAML stream into its documents at the markers YAML defines: a line
/// that starts with `---` (a new document; the line may carry content) or
/// `...` (the end of one), each followed by whitespace or the line's end. Such
/// a line cannot occur inside a document, not even in a block scalar, so the
/// split is exact. A preamble of comments, blank lines or directives belongs
/// to the document after it and is not a document of its own.
fn split_documents(text: &str) -> Vec<&str> {
    fn is_marker(line: &str, marker: &str) -> bool {
        line.strip_prefix(marker).is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace))
    }
    fn has_content(chunk: &str) -> bool {
        chunk.lines().any(|l| {
            let l = l.trim();
            !l.is_empty() && !l.starts_with('#') && !l.starts_with('%')
        })
    }
    let mut documents = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let line_start = offset;
        offset += line.len();
        if is_marker(line, "---") {
            let chunk = &text[start..line_start];
            if chunk.starts_with("---") || has_content(chunk) {
                documents.push(chunk);
                start = line_start;
            }
        } else if is_marker(line, "...") {
            documents.push(&text[start..offset]);
            start = offset;
        }
    }
    let rest = &text[start..];
    if rest.starts_with("---") || has_content(rest) {
        documents.push(rest);
    }
    documents
}

/// A document whose head [`scan_head`] found: `true` when it is taken (or
/// not ours). Anything else (an error to report with the object's name, a
/// `List`, a type that disagrees with the scan) is left to [`add_document`]
/// with the head read in full.
fn add_scanned(origin: &Origin, document: &str, head: &Head, snapshot: &mut Snapshot) -> bool {
    let document = Document::Yaml(document);
    match (head.api_version.as_str(), head.kind.as_str()) {
        ("multicluster.x-k8s.io/v1beta1" | "multicluster.x-k8s.io/v1alpha1", "ServiceImport") => {
            match document.typed::<ServiceImport>() {
                Ok(import) if import.api_version == head.api_version && import.kind == head.kind => {
                    snapshot.imports.push((origin.clone(), import));
                    true
                }
                _ => false,
            }
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => match document.typed::<EndpointSlice>() {
            Ok(slice) => {
                snapshot.slices.push((origin.clone(), slice));
                true
            }
            Err(_) => false,
        },
        (_, "List") => false,
        (version, "ServiceImport") => !version.starts_with(&format!("{MCS_GROUP}/")),
        _ => true,
    }
}

fn add_document(
    origin: &Origin,
    document: Document<'_>,
    head: Head,
    snapshot: &mut Snapshot,
    errors: &mut Vec<ManifestError>,
) {
    let object_error = |kind: &'static str, field: String, message: String| ObjectError {
        origin: format!("{origin}: "),
        kind,
        object: format!(
            "{}/{}",
            head.metadata.namespace.as_deref().unwrap_or("default"),
            head.metadata.name.as_deref().unwrap_or_default()
        ),
        field,
        message,
    };
    match (head.api_version.as_str(), head.kind.as_str()) {
        (_, "List") => match document.typed::<ListItems>() {
            Ok(list) => {
                for (i, item) in list.items.iter().enumerate() {
                    let origin = Origin(format!("{origin} items[{i}]"));
                    // An item that is not an object (null, a scalar) is not ours, as before.
                    if let Ok(Some(head)) = Option::<Head>::deserialize(item) {
                        add_document(&origin, Document::Item(item), head, snapshot, errors);
                    }
                }
            }
            Err((_, message)) => errors.push(ManifestError::Yaml { origin: origin.clone(), message }),
        },
        (version, "ServiceImport") if version.starts_with(&format!("{MCS_GROUP}/")) => {
            if version != "multicluster.x-k8s.io/v1beta1" && version != "multicluster.x-k8s.io/v1alpha1" {
                let message = format!("{version} is not v1beta1 or v1alpha1");
                errors.push(object_error("ServiceImport", "apiVersion".into(), message).into());
                return;
            }
            match document.typed::<ServiceImport>() {
                Ok(import) => snapshot.imports.push((origin.clone(), import)),
                Err((field, message)) => errors.push(object_error("ServiceImport", field, message).into()),
            }
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => match document.typed::<EndpointSlice>() {
            Ok(slice) => snapshot.slices.push((origin.clone(), slice)),
            Err((field, message)) => errors.push(object_error("EndpointSlice", field, message).into()),
        },
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
    fn a_scanned_head_reads_as_the_parser_does() {
        let import = |head: &str| {
            format!(
                "{head}\nmetadata: {{name: web, namespace: demo}}\nspec: {{type: ClusterSetIP, ips: [\"10.96.0.1\"]}}\n"
            )
        };
        let plain = "apiVersion: multicluster.x-k8s.io/v1beta1\nkind: ServiceImport";
        let documents = [
            import(plain),
            import("kind: ServiceImport # a comment\napiVersion: multicluster.x-k8s.io/v1alpha1"),
            import("apiVersion: \"multicluster.x-k8s.io/v1beta1\"\nkind: 'ServiceImport'"),
            import("apiVersion: multicluster.x-k8s.io/v2\nkind: ServiceImport"),
            import("apiVersion: example.com/v1\nkind: ServiceImport"),
            import(&format!("{plain}\nkind: ServiceImport")),
            "{apiVersion: multicluster.x-k8s.io/v1beta1, kind: ServiceImport, metadata: {name: flow}}\n".to_owned(),
            // Only keys at column 0 are the document's own.
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata:\n  x: |\n    kind: ServiceImport\n".to_owned(),
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nendpoints: []\n"
                .to_owned(),
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: [\n".to_owned(),
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata: {name: i}\n  addressType: IPv4\n  endpoints: []\n".to_owned(),
        ];
        for document in &documents {
            let origin = Origin("f.yaml".into());
            let (scanned, scanned_errors) = parse_documents_with(&origin, document, true);
            let (parsed, parsed_errors) = parse_documents_with(&origin, document, false);
            assert_eq!(scanned.imports, parsed.imports, "{document}");
            assert_eq!(scanned.slices, parsed.slices, "{document}");
            let text = |errors: &[ManifestError]| errors.iter().map(ToString::to_string).collect::<Vec<_>>();
            assert_eq!(text(&scanned_errors), text(&parsed_errors), "{document}");
        }
        assert!(scan_head(&documents[0]).is_some() && scan_head(&documents[1]).is_some());
        for unscanned in [2, 5, 6] {
            assert!(scan_head(&documents[unscanned]).is_none(), "{}", documents[unscanned]);
        }
        let stream = [&documents[0], &documents[1], &documents[2], &documents[8], &documents[10]].map(String::as_str);
        let (taken, errors) = parse_documents(&Origin("f.yaml".into()), &stream.join("---\n"));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!((taken.imports.len(), taken.slices.len()), (3, 2));
    }

    #[test]
    fn json_files_read_as_their_yaml_would() {
        let yaml = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: multicluster.x-k8s.io/v1beta1\n  kind: ServiceImport\n  metadata: {name: web, namespace: demo}\n  spec: {type: ClusterSetIP, ips: [\"10.96.0.1\"], ports: [{name: http, port: 80}]}\n- apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata: {name: web-a, namespace: demo}\n  addressType: IPv4\n  endpoints: [{addresses: [\"10.0.0.1\"]}]\n";
        let value: Value = serde_saphyr::from_str(yaml).unwrap();
        let (from_json, errors) = parse_json(&Origin("w.json".into()), &value.to_string());
        assert!(errors.is_empty(), "{errors:?}");
        let (from_yaml, _) = parse_documents(&Origin("w.yaml".into()), yaml);
        assert_eq!(
            from_json.imports.iter().map(|(_, i)| i).collect::<Vec<_>>(),
            from_yaml.imports.iter().map(|(_, i)| i).collect::<Vec<_>>()
        );
        assert_eq!(
            from_json.slices.iter().map(|(_, s)| s).collect::<Vec<_>>(),
            from_yaml.slices.iter().map(|(_, s)| s).collect::<Vec<_>>()
        );
        assert_eq!(from_json.imports.len() + from_json.slices.len(), 2);

        let (_, errors) = parse_json(
            &Origin("w.json".into()),
            r#"{"apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceImport", "metadata": {"name": "web"}, "spec": {"ports": [{"port": "x"}]}}"#,
        );
        assert!(
            errors[0].to_string().starts_with("w.json: ServiceImport default/web: spec.ports[0].port: "),
            "{}",
            errors[0]
        );
        let (_, errors) = parse_json(&Origin("w.json".into()), "{\"kind\": ");
        assert!(errors[0].to_string().starts_with("w.json: invalid JSON: "), "{}", errors[0]);
    }

    #[test]
    fn documents_split_at_yaml_markers_only() {
        let text =
            "# preamble\n%YAML 1.2\n---\na: 1\n---\nb: |\n  ---\n  not a marker\n...\n--- {c: 3}\n---x: not a marker\n";
        let docs = split_documents(text);
        assert_eq!(
            docs,
            [
                "# preamble\n%YAML 1.2\n---\na: 1\n",
                "---\nb: |\n  ---\n  not a marker\n...\n",
                "--- {c: 3}\n---x: not a marker\n"
            ]
        );
        assert_eq!(split_documents("a: 1\n---\nb: 2"), ["a: 1\n", "---\nb: 2"]);
        assert!(split_documents("# only a comment\n\n").is_empty());
        // An explicit empty document still counts, so later documents keep their numbers.
        assert_eq!(split_documents("---\n---\nb: 2\n").len(), 2);
    }

    #[test]
    fn error_messages_are_one_line_with_the_parsers_reason() {
        let yaml = "apiVersion: multicluster.x-k8s.io/v1beta1\nkind: ServiceImport\nmetadata: {name: web, namespace: demo}\nspec:\n  ports:\n  - port: eighty\n";
        let (_, errors) = parse_documents(&Origin("w.yaml".into()), yaml);
        let text = errors[0].to_string();
        assert!(!text.contains('\n'), "{text}");
        assert!(text.starts_with("w.yaml (document 1): ServiceImport demo/web: spec.ports[0].port: "), "{text}");
        assert!(text.contains("line 6"), "the message says where the bad value is: {text}");
        let (_, errors) = parse_documents(&Origin("s.yaml".into()), "kind: [unclosed\n");
        let text = errors[0].to_string();
        assert!(!text.contains('\n') && text.starts_with("s.yaml (document 1): invalid YAML: "), "{text}");
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
        assert!(is_manifest(Path::new("/d/web.json")));
        assert!(!is_manifest(Path::new("/d/.web.yaml.swp")));
        assert!(!is_manifest(Path::new("/d/.hidden.yaml")));
        assert!(!is_manifest(Path::new("/d/README.md")));
    }

    #[test]
    fn a_scan_names_files_that_appeared_changed_or_vanished() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            // As tools write: a new file renamed over the old one.
            let tmp = dir.path().join(format!(".{name}.tmp"));
            fs::write(&tmp, text).unwrap();
            fs::rename(&tmp, dir.path().join(name)).unwrap();
        };
        write("a.yaml", "a");
        write("b.yaml", "b");
        write("c.yaml", "c");
        fs::write(dir.path().join("notes.txt"), "not a manifest").unwrap();
        let before = Scan::of(dir.path()).unwrap();
        assert!(Scan::of(dir.path()).unwrap().changed_since(&before).is_empty(), "nothing changed");
        write("b.yaml", "b, edited");
        write("d.yaml", "d");
        fs::remove_file(dir.path().join("c.yaml")).unwrap();
        let mut changed = Scan::of(dir.path()).unwrap().changed_since(&before);
        changed.sort();
        let names: Vec<&str> = changed.iter().map(|p| p.file_name().unwrap().to_str().unwrap()).collect();
        assert_eq!(names, ["b.yaml", "c.yaml", "d.yaml"]);
    }
}
