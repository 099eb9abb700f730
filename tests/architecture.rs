//! The shape of the source tree, checked: module dependencies run one way (the order written in
//! `src/lib.rs`), no source file outgrows a reader, no function outgrows a screen.
//!
//! Reads the sources as text; needs nothing but the checkout.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Lines a source file may have, not counting its test module or `*tests.rs` siblings.
const MAX_FILE_LINES: usize = 600;
/// Lines a non-test function may have, signature to closing brace.
const MAX_FN_LINES: usize = 100;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `src/` except the binaries' own (`main.rs`, `bin/`).
fn library_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if path.file_name().unwrap() != "bin" {
                    walk(&path, out);
                }
            } else if path.extension().is_some_and(|e| e == "rs") && path.file_name().unwrap() != "main.rs" {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&src(), &mut out);
    out.sort();
    out
}

/// The dependency order from `src/lib.rs`: the `//! N. layer: `a`, `b`` lines under
/// `## Dependency order`, flattened. A module may use only modules listed before it.
fn declared_order() -> Vec<(String, String)> {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let mut order = Vec::new();
    let mut inside = false;
    for line in lib.lines() {
        let Some(doc) = line.strip_prefix("//!") else { break };
        let doc = doc.trim();
        if doc.starts_with("## ") {
            inside = doc == "## Dependency order";
            continue;
        }
        let Some((number, rest)) = doc.split_once(". ") else { continue };
        if !inside || number.parse::<u32>().is_err() {
            continue;
        }
        let (layer, modules) = rest.split_once(':').expect("a layer line reads `N. layer: `a`, `b``");
        for module in modules.split(',') {
            let module = module.trim().trim_matches(|c| c == '`' || c == '.');
            order.push((module.to_owned(), layer.trim().to_owned()));
        }
    }
    assert!(!order.is_empty(), "src/lib.rs has no `## Dependency order` list");
    order
}

/// The top-level module a file belongs to, and its module path (`config/compile.rs` →
/// `["config", "compile"]`; `config/mod.rs` → `["config"]`).
fn module_path(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src()).unwrap();
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_owned());
    }
    parts
}

/// Source without comments (line comments, doc comments, block comments) and without the
/// contents of string literals, so prose and messages that mention `crate::x` are not edges.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if b[i] == b'r' && (b[i..].starts_with(b"r\"") || b[i..].starts_with(b"r#")) && !ident_before(b, i) {
            // Raw string: r"…", r#"…"#, r##"…"##.
            let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
            if b.get(i + 1 + hashes) != Some(&b'"') {
                out.push('r');
                i += 1;
                continue;
            }
            let close: Vec<u8> = std::iter::once(b'"').chain(std::iter::repeat_n(b'#', hashes)).collect();
            i += 2 + hashes;
            while i < b.len() && !b[i..].starts_with(&close) {
                if b[i] == b'\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += close.len();
            out.push_str("\"\"");
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                if b.get(i) == Some(&b'\n') {
                    out.push('\n');
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && b.get(i + 2) == Some(&b'\'') {
            // A char literal like '"' (lifetimes have no closing quote two bytes on).
            out.push_str("' '");
            i += 3;
        } else if b[i..].starts_with(b"'\\") {
            let end = b[i + 2..].iter().position(|&c| c == b'\'').map_or(b.len(), |p| i + 3 + p);
            out.push_str("' '");
            i = end;
        } else {
            let ch = text[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

fn ident_before(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')
}

fn ident_at(s: &str) -> &str {
    let end = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(s.len());
    &s[..end]
}

/// The top-level modules a file's code names: `crate::x`, `crate::{x, y::z}`, and `super::`
/// chains that climb out of the file's own top-level module.
fn used_modules(file: &Path) -> Vec<(String, usize)> {
    used_modules_in(&std::fs::read_to_string(file).unwrap(), &module_path(file))
}

fn used_modules_in(text: &str, path: &[String]) -> Vec<(String, usize)> {
    let code = code_only(text);
    let mut used = Vec::new();
    for (n, line) in code.lines().enumerate() {
        let mut rest = line;
        while let Some(at) = rest.find("crate::").or_else(|| rest.find("super::")) {
            let (first, after) = if rest[at..].starts_with("crate::") {
                let crate_at = rest.find("crate::").unwrap();
                let super_at = rest.find("super::").unwrap_or(usize::MAX);
                if super_at < crate_at {
                    (super_at, "super")
                } else {
                    (crate_at, "crate")
                }
            } else {
                (at, "super")
            };
            if ident_before(rest.as_bytes(), first) {
                rest = &rest[first + 7..];
                continue;
            }
            let mut tail = &rest[first..];
            let names: Vec<&str> = if after == "crate" {
                tail = &tail["crate::".len()..];
                if let Some(group) = tail.strip_prefix('{') {
                    top_level_names(group)
                } else {
                    vec![ident_at(tail)]
                }
            } else {
                let mut climbs = 0;
                while let Some(t) = tail.strip_prefix("super::") {
                    climbs += 1;
                    tail = t;
                }
                if climbs < path.len() {
                    vec![]
                } else {
                    vec![ident_at(tail)]
                }
            };
            used.extend(names.into_iter().filter(|m| !m.is_empty()).map(|m| (m.to_owned(), n + 1)));
            rest = &rest[first + 7..];
        }
    }
    used
}

/// `a, b::c, d::{e, f}}` → `[a, b, d]`: the first name of each item of a `use crate::{…}` group.
fn top_level_names(group: &str) -> Vec<&str> {
    let mut names = vec![ident_at(group.trim_start())];
    let mut depth = 0;
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => names.push(ident_at(group[i + 1..].trim_start())),
            _ => {}
        }
    }
    names
}

#[test]
fn modules_depend_only_on_modules_before_them_in_the_order_lib_rs_declares() {
    let order = declared_order();
    let rank = |m: &str| order.iter().position(|(name, _)| name == m);
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let declared: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod ").or_else(|| l.strip_prefix("mod ")))
        .map(|l| l.trim_end_matches(';'))
        .collect();
    let unplaced: Vec<&&str> = declared.iter().filter(|m| rank(m).is_none()).collect();
    assert!(unplaced.is_empty(), "modules missing from the dependency order in src/lib.rs: {unplaced:?}");

    let mut against = String::new();
    let mut edges = BTreeMap::<(String, String), usize>::new();
    for file in library_files() {
        let path = module_path(&file);
        let Some(from) = path.first() else { continue };
        for (to, line) in used_modules(&file) {
            // `super::x` from inside an inline module can name an item, not a module: only
            // top-level modules are edges.
            if &to == from || !declared.contains(&to.as_str()) {
                continue;
            }
            *edges.entry((from.clone(), to.clone())).or_default() += 1;
            let (Some(f), Some(t)) = (rank(from), rank(&to)) else { continue };
            if t >= f {
                writeln!(
                    against,
                    "{}:{line}: {from} ({}) → {to} ({}): `{to}` is not before `{from}`",
                    file.strip_prefix(src()).unwrap().display(),
                    order[f].1,
                    order[t].1
                )
                .unwrap();
            }
        }
    }
    assert!(edges.len() > 10, "found only {} edges: is the parser reading the sources? {edges:?}", edges.len());
    assert!(against.is_empty(), "edges against the dependency order in src/lib.rs:\n{against}");
}

/// Non-test lines of a file: everything before a trailing `#[cfg(test)]` module; 0 for the
/// test siblings (`tests.rs`, `*_tests.rs`).
fn non_test_lines(file: &Path) -> usize {
    let name = file.file_name().unwrap().to_string_lossy();
    if name == "tests.rs" || name.ends_with("_tests.rs") {
        return 0;
    }
    let text = std::fs::read_to_string(file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let cut = lines
        .windows(2)
        .position(|w| w[0].trim() == "#[cfg(test)]" && w[1].starts_with("mod tests"))
        .unwrap_or(lines.len());
    cut
}

#[test]
fn no_source_file_is_longer_than_a_reader_can_hold() {
    let long: Vec<String> = library_files()
        .iter()
        .map(|f| (f, non_test_lines(f)))
        .filter(|(_, n)| *n > MAX_FILE_LINES)
        .map(|(f, n)| format!("{}: {n} lines", f.strip_prefix(src()).unwrap().display()))
        .collect();
    assert!(
        long.is_empty(),
        "source files above {MAX_FILE_LINES} non-test lines (split along a seam):\n{}",
        long.join("\n")
    );
}

/// `(name, first line, length)` of every non-test function: `fn` at the start of a line, its
/// body ending at the first line that closes it at the same indentation (rustfmt's layout).
fn functions(file: &Path) -> Vec<(String, usize, usize)> {
    let text = std::fs::read_to_string(file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let end = non_test_lines(file).min(lines.len());
    let mut out = Vec::new();
    for (i, line) in lines[..end].iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let sig = ["pub(crate) ", "pub(super) ", "pub ", ""]
            .iter()
            .find_map(|v| trimmed.strip_prefix(v))
            .map(|s| s.strip_prefix("async ").unwrap_or(s));
        let Some(after) = sig.and_then(|s| s.strip_prefix("fn ")) else { continue };
        let name = ident_at(after).to_owned();
        let close = " ".repeat(indent) + "}";
        let Some(len) = lines[i..end].iter().position(|l| *l == close || l.starts_with(&(close.clone() + " "))) else {
            continue; // a declaration without a body (trait method)
        };
        out.push((name, i + 1, len + 1));
    }
    out
}

#[test]
fn no_function_is_longer_than_a_screen() {
    let mut long = Vec::new();
    for file in library_files() {
        for (name, line, len) in functions(&file) {
            if len > MAX_FN_LINES {
                long.push(format!("{}:{line}: fn {name}: {len} lines", file.strip_prefix(src()).unwrap().display()));
            }
        }
    }
    assert!(long.is_empty(), "functions above {MAX_FN_LINES} lines (split into named steps):\n{}", long.join("\n"));
}

#[test]
fn the_checks_themselves_see_what_they_claim_to() {
    // The parsers above read real code; prove they find what a human sees, and only that.
    let code = "//! mentions crate::cli in prose\n/* and crate::envoy here */\n\
                use crate::{vocab::Key, config::{self, Snapshot}};\n\
                fn f() { let s = \"crate::extproc\"; let c = '\"'; crate::auth::x(); super::super::telemetry::y(); }\n\
                fn g() { super::sibling(); mycrate::other(); }\n";
    let path = ["inject".to_owned(), "query".to_owned()];
    let found: Vec<(String, usize)> = used_modules_in(code, &path);
    let names: Vec<&str> = found.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(names, ["vocab", "config", "auth", "telemetry"], "{found:?}");
    assert_eq!(found[2].1, 4, "edges carry the line they are on");
    assert_eq!(module_path(&src().join("config").join("compile.rs")), ["config", "compile"]);
    assert_eq!(module_path(&src().join("config").join("mod.rs")), ["config"]);
    assert_eq!(module_path(&src().join("target.rs")), ["target"]);
}

#[test]
fn every_source_path_the_readme_and_docs_link_exists() {
    // "Where things are" is how a newcomer finds a room; a split must not leave it pointing at
    // a file that moved.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut docs = vec![root.join("README.md"), root.join("certs/README.md"), root.join("proto/README.md")];
    docs.extend(std::fs::read_dir(root.join("docs")).unwrap().map(|e| e.unwrap().path()));
    let mut missing = Vec::new();
    let mut seen = 0;
    for doc in docs.iter().filter(|d| d.extension().is_some_and(|e| e == "md")) {
        let text = std::fs::read_to_string(doc).unwrap();
        for (i, _) in text.match_indices("](") {
            let target = &text[i + 2..];
            let target = &target[..target.find(')').unwrap_or(0)];
            let target = target.split('#').next().unwrap_or("");
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            seen += 1;
            let base = doc.parent().unwrap();
            if !base.join(target).exists() {
                missing.push(format!("{}: {target}", doc.strip_prefix(root).unwrap().display()));
            }
        }
    }
    assert!(seen > 20, "found only {seen} relative links: is the parser reading the docs?");
    assert!(missing.is_empty(), "links to paths that do not exist:\n{}", missing.join("\n"));
}

#[test]
fn the_top_level_layout_is_the_one_the_project_was_specified_with() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let missing: Vec<&str> =
        ["Cargo.toml", "src", "proto/README.md", "manifests", "certs/README.md", "tests", "benches", "docs"]
            .into_iter()
            .filter(|p| !root.join(p).exists())
            .collect();
    assert!(missing.is_empty(), "missing from the top level: {missing:?}");
    // `keyswap certs` writes under certs/ by default: its output must never be committed.
    let ignore = std::fs::read_to_string(root.join(".gitignore")).unwrap();
    assert!(ignore.lines().any(|l| l.trim() == "/certs/*"), "certs/ contents are not ignored");
    assert!(ignore.lines().any(|l| l.trim() == "!/certs/README.md"), "certs/README.md is ignored");
}
