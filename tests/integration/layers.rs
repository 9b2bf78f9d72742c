//! The house's layering, checked: no two modules of `src/` reach each
//! other through `crate::` or `super::` paths, directly or around a loop.
//! (Test modules are left out: they may use what they test from anywhere.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module name (`engine::pass`) → source, test modules cut off.
fn modules() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    let root = dirs[0].clone();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let rel = path.strip_prefix(&root).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            if parts.last().map(String::as_str) == Some("mod") {
                parts.pop();
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            let code: String = code
                .lines()
                .map(|l| l.split("//").next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join("\n");
            out.insert(parts.join("::"), code);
        }
    }
    out
}

/// The module a `crate::`/`super::` path in `from` names.
fn target(from: &str, path: &str, names: &BTreeSet<String>) -> Option<String> {
    // lib.rs's short paths for the engine's modules.
    const ALIASES: &[(&str, &str)] = &[
        ("decode", "engine::decode"),
        ("diff", "engine::diff"),
        ("guard", "engine::guard"),
        ("pass", "engine::pass"),
        ("rows", "engine::rows"),
        ("upstream", "engine::upstream"),
        ("admin", "api"),
    ];
    let mut segs: Vec<&str> = path.split("::").collect();
    let mut base: Vec<&str> = Vec::new();
    if segs[0] == "crate" {
        segs.remove(0);
        if let Some((_, full)) = ALIASES.iter().find(|(a, _)| Some(a) == segs.first()) {
            let rest = segs.split_off(1);
            segs = full.split("::").chain(rest).collect();
        }
    } else {
        base = from.split("::").collect();
        base.pop();
        segs.remove(0);
        while segs.first() == Some(&"super") {
            base.pop();
            segs.remove(0);
        }
    }
    let all: Vec<&str> = base.into_iter().chain(segs).collect();
    (1..=all.len())
        .rev()
        .map(|i| all[..i].join("::"))
        .find(|n| names.contains(n))
}

#[test]
fn no_module_imports_one_that_imports_it() {
    let mods = modules();
    let names: BTreeSet<String> = mods.keys().cloned().collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, code) in &mods {
        for start in ["crate::", "super::"] {
            for (i, _) in code.match_indices(start) {
                let path: String = code[i..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                let path = path.trim_end_matches(':');
                if let Some(t) = target(m, path, &names) {
                    let nested =
                        m.starts_with(&format!("{t}::")) || t.starts_with(&format!("{m}::"));
                    if t != *m && !nested {
                        edges.entry(m.clone()).or_default().insert(t);
                    }
                }
            }
        }
    }
    // A loop is a module reachable from one of the modules it reaches.
    let mut loops = Vec::new();
    for start in edges.keys() {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<&String> = edges[start].iter().collect();
        while let Some(m) = todo.pop() {
            if m == start {
                loops.push(start.clone());
                break;
            }
            if seen.insert(m.clone()) {
                todo.extend(edges.get(m).into_iter().flatten());
            }
        }
    }
    assert!(
        loops.is_empty(),
        "modules in an import loop: {loops:?}\nedges: {edges:#?}"
    );
}
