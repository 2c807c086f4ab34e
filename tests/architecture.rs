//! The house's layout, checked: the crates' dependencies point one way, and no module of any
//! crate imports, directly or through others, a module that imports it back.
//!
//! Modules are the crates' source files; an import is a `crate::`, `super::` or `self::` path
//! outside comments (in `use` lists and in code). A path names the deepest module file it
//! reaches. Inline modules (the unit tests at the bottom of a file) belong to their file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Each workspace crate and the crates of ours it may depend on.
const LAYERS: [(&str, &[&str]); 4] = [
    ("engine", &[]),
    ("models", &["flowline-engine"]),
    ("shapes", &["flowline-engine"]),
    ("app", &["flowline-engine", "flowline-models"]),
];

#[test]
fn crate_dependencies_point_one_way() {
    for (name, allowed) in LAYERS {
        let manifest = Path::new(ROOT).join("crates").join(name).join("Cargo.toml");
        let text = std::fs::read_to_string(&manifest).unwrap();
        let dependencies = text
            .split("[dev-dependencies]")
            .next()
            .expect("split yields a first part");
        let ours: Vec<&str> = dependencies
            .lines()
            .filter_map(|line| line.split(['.', ' ', '=']).next())
            .filter(|dependency| dependency.starts_with("flowline-"))
            .collect();
        let stray: Vec<&&str> = ours.iter().filter(|d| !allowed.contains(d)).collect();
        assert!(
            stray.is_empty(),
            "{} depends on {stray:?}; it may depend on {allowed:?} only",
            manifest.display()
        );
    }
}

#[test]
fn no_module_imports_its_way_back_to_itself() {
    let mut crates: Vec<PathBuf> = LAYERS
        .iter()
        .map(|(name, _)| Path::new(ROOT).join("crates").join(name).join("src"))
        .collect();
    crates.push(Path::new(ROOT).join("src"));
    for source in crates {
        let graph = module_graph(&source);
        assert!(
            graph.len() > 1,
            "no modules found under {}",
            source.display()
        );
        if let Some(cycle) = find_cycle(&graph) {
            panic!(
                "import cycle in {}: {}",
                source.display(),
                cycle.join(" → ")
            );
        }
    }
}

/// A module's path from its crate's root, e.g. `["graph", "value"]`.
type Module = Vec<String>;

/// Every module file under `source` and the modules it imports.
fn module_graph(source: &Path) -> BTreeMap<Module, BTreeSet<Module>> {
    let files = rust_files(source);
    let modules: BTreeMap<Module, PathBuf> = files
        .iter()
        .map(|file| (module_of(source, file), file.clone()))
        .collect();
    modules
        .iter()
        .map(|(module, file)| {
            let text = std::fs::read_to_string(file).unwrap();
            let imports = imported_paths(&text)
                .into_iter()
                .filter_map(|(inline, path)| resolve(module, inline, &path, &modules))
                .filter(|target| target != module)
                .collect();
            (module.clone(), imports)
        })
        .collect()
}

fn rust_files(folder: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(folder).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

fn module_of(source: &Path, file: &Path) -> Module {
    let relative = file.strip_prefix(source).unwrap().with_extension("");
    let mut parts: Module = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The `crate::`/`super::`/`self::` paths in `text` outside comments, each with whether it
/// stands inside an inline module (from the first `mod name {` on).
fn imported_paths(text: &str) -> Vec<(bool, Vec<String>)> {
    let mut paths = Vec::new();
    let mut inline = false;
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or_default().trim();
        if code.starts_with("mod ") && code.ends_with('{') {
            inline = true;
        }
        for start in ["crate::", "super::", "self::"] {
            for (at, _) in code.match_indices(start) {
                let preceded_by_word = code[..at]
                    .chars()
                    .next_back()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
                if preceded_by_word {
                    continue;
                }
                let path: Vec<String> = code[at..]
                    .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                    .next()
                    .unwrap_or_default()
                    .split("::")
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect();
                paths.push((inline, path));
            }
        }
        // `use crate::a::{b, c::d}`: each name in the braces continues the path before them.
        if let Some(open) = code.find("::{")
            && (code.starts_with("use ") || code.starts_with("pub use "))
        {
            let prefix: Vec<String> = code[..open]
                .trim_start_matches("pub ")
                .trim_start_matches("use ")
                .split("::")
                .map(str::to_string)
                .collect();
            for name in code[open + 3..].split([',', '}', ' ', ';']) {
                if !name.is_empty() && name.chars().all(|c| c.is_alphanumeric() || c == '_') {
                    let mut path = prefix.clone();
                    path.push(name.to_string());
                    if matches!(path[0].as_str(), "crate" | "super" | "self") {
                        paths.push((inline, path));
                    }
                }
            }
        }
    }
    paths
}

/// The deepest module file that `path`, written in `module`, reaches.
fn resolve(
    module: &Module,
    inline: bool,
    path: &[String],
    modules: &BTreeMap<Module, PathBuf>,
) -> Option<Module> {
    let (first, rest) = path.split_first()?;
    let mut base: Module = match first.as_str() {
        "crate" => Vec::new(),
        "self" => module.clone(),
        "super" if inline => module.clone(),
        "super" => module[..module.len().checked_sub(1)?].to_vec(),
        _ => return None,
    };
    let mut rest = rest.iter().peekable();
    while rest.peek().is_some_and(|s| *s == "super") {
        base.pop();
        rest.next();
    }
    let mut deepest = modules.contains_key(&base).then(|| base.clone());
    for part in rest {
        base.push(part.clone());
        if modules.contains_key(&base) {
            deepest = Some(base.clone());
        } else {
            break;
        }
    }
    deepest
}

/// A cycle in `graph`, as module names from a module back to itself, if there is one.
fn find_cycle(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<String>> {
    fn visit(
        node: &Module,
        graph: &BTreeMap<Module, BTreeSet<Module>>,
        done: &mut BTreeSet<Module>,
        stack: &mut Vec<Module>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|m| m == node) {
            let mut cycle: Vec<String> = stack[at..].iter().map(name).collect();
            cycle.push(name(node));
            return Some(cycle);
        }
        if !done.insert(node.clone()) {
            return None;
        }
        stack.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, done, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        None
    }
    fn name(module: &Module) -> String {
        if module.is_empty() {
            "(crate root)".into()
        } else {
            module.join("::")
        }
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut done, &mut Vec::new()))
}
