//! The crate's layering, checked over its source: the top-level modules of
//! src/ (folders and files) import each other without a cycle, so data
//! flows one way (`net` below `http` below `proxy`; `identity` below `tls`;
//! `policy` below `stepup` below `policy_cmd`). Test code (`#[cfg(test)]`
//! onwards, `*tests.rs`, `testing.rs`) may reach across layers.
//!
//! A reference is a path starting `crate::NAME` (also inside `crate::{...}`)
//! or a `super::` chain that climbs out of a top-level module.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module name → its source files.
fn modules(src: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            let mut files = Vec::new();
            collect(&path, &mut files);
            out.insert(name, files);
        } else if path.extension().is_some_and(|e| e == "rs") && name != "lib" && name != "main" {
            out.insert(name, vec![path]);
        }
    }
    out
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// The non-test text of a source file.
fn production_code(path: &Path) -> String {
    let name = path.file_name().unwrap().to_string_lossy();
    if name.ends_with("tests.rs") || name == "testing.rs" {
        return String::new();
    }
    let text = std::fs::read_to_string(path).unwrap();
    match text.find("#[cfg(test)]") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

/// Names referenced as `crate::NAME` or `crate::{NAME, ...}`.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if c.is_whitespace() => {}
                    _ if start && depth == 0 => {
                        out.insert(ident(&group[i..]));
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mods = modules(&src);
    let mut g = BTreeMap::new();
    for (name, files) in &mods {
        let mut deps = BTreeSet::new();
        for file in files {
            let text = production_code(file);
            let depth = file.strip_prefix(&src).unwrap().components().count();
            // `super::super::...` deeper than the file's own nesting climbs
            // out of the top-level module: not allowed to hide an import.
            let escape = "super::".repeat(depth.max(1));
            assert!(
                depth == 1 || !text.contains(&escape),
                "{}: a super:: chain leaves its top-level module; name it with crate::",
                file.display()
            );
            deps.extend(
                crate_refs(&text)
                    .into_iter()
                    .filter(|d| d != name && mods.contains_key(d)),
            );
        }
        g.insert(name.clone(), deps);
    }
    g
}

/// A cycle through `from`, if there is one.
fn cycle(
    g: &BTreeMap<String, BTreeSet<String>>,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    let here = path.last().unwrap().clone();
    for next in &g[&here] {
        if let Some(at) = path.iter().position(|p| p == next) {
            let mut c = path[at..].to_vec();
            c.push(next.clone());
            return Some(c);
        }
        if done.contains(next) {
            continue;
        }
        path.push(next.clone());
        if let Some(c) = cycle(g, path, done) {
            return Some(c);
        }
        path.pop();
    }
    done.insert(here);
    None
}

#[test]
fn top_level_modules_import_each_other_without_a_cycle() {
    let g = graph();
    let mut done = BTreeSet::new();
    for start in g.keys() {
        let found = cycle(&g, &mut vec![start.clone()], &mut done);
        assert!(
            found.is_none(),
            "import cycle: {}\nthe graph: {g:#?}",
            found.unwrap().join(" -> ")
        );
    }
    // The layers the architecture names, spelled out so a change to them
    // is a decision, not an accident.
    let below = |a: &str, b: &str| !g[a].contains(b);
    assert!(
        below("net", "proxy") && below("net", "http"),
        "net is the bottom"
    );
    assert!(below("http", "proxy"), "http does not know the sidecar");
    assert!(below("policy", "stepup"), "policy does not know step-up");
    assert!(below("identity", "tls"), "identity does not know TLS");
}

#[test]
fn the_checker_sees_grouped_and_plain_references() {
    let refs = crate_refs("use crate::{a::B, c, d::{e, f}};\nfn x() { crate::g::h(); }");
    assert_eq!(
        refs.into_iter().collect::<Vec<_>>(),
        ["a", "c", "d", "g"].map(String::from)
    );
}
