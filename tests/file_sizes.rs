//! Issue 11's size rule, checked over the source: every `.rs` file under
//! src/, ca/, crates/, tests/, benches/ and fuzz/ is at most 600 lines, so
//! that a file stays one concern a reader can hold. A file that grows past
//! it is split by concern (a cohesive piece to a module of its own, a
//! test's rig to a `*_support` module), not cut in the middle.
//!
//! Lines are counted as `wc -l` counts them (newlines). Build output
//! (`target/` folders, e.g. fuzz/target) is not source and is skipped.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::{Path, PathBuf};

/// The most lines a source file may have.
const LIMIT: usize = 600;

/// The folders whose `.rs` files the rule covers (those that exist).
const ROOTS: [&str; 6] = ["src", "ca", "crates", "tests", "benches", "fuzz"];

fn collect(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "target") {
                collect(&path, files);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// Every covered file, relative to the workspace root, with its line count.
fn sizes() -> Vec<(String, usize)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ROOTS.map(|d| root.join(d)).iter().filter(|d| d.is_dir()) {
        collect(dir, &mut files);
    }
    let mut out: Vec<(String, usize)> = files
        .iter()
        .map(|f| {
            let lines = std::fs::read(f)
                .unwrap()
                .iter()
                .filter(|b| **b == b'\n')
                .count();
            let name = f.strip_prefix(root).unwrap().display().to_string();
            (name, lines)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_source_file_is_at_most_600_lines() {
    let sizes = sizes();
    let mut over: Vec<&(String, usize)> = sizes.iter().filter(|(_, n)| *n > LIMIT).collect();
    over.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    let list: Vec<String> = over.iter().map(|(f, n)| format!("  {f}: {n}")).collect();
    assert!(
        over.is_empty(),
        "{} file(s) over {LIMIT} lines (issue 11); split each by concern:\n{}",
        over.len(),
        list.join("\n")
    );
}

#[test]
fn the_walk_sees_every_root_and_counts_like_wc() {
    let sizes = sizes();
    for root in ["src/", "ca/", "tests/", "benches/"] {
        assert!(
            sizes.iter().any(|(f, _)| f.starts_with(root)),
            "no .rs file found under {root}: the walk is broken"
        );
    }
    let me = sizes
        .iter()
        .find(|(f, _)| f == "tests/file_sizes.rs")
        .expect("this file is covered");
    let text = include_str!("file_sizes.rs");
    assert_eq!(me.1, text.matches('\n').count(), "counted as wc -l");
    assert!(
        !sizes.iter().any(|(f, _)| f.contains("/target/")),
        "build output is not source"
    );
}
