//! The module layers of `src/` (see `src/lib.rs`): each layer uses only the
//! layers below it. `cli` → `daemon` → `fuse` | `control` → `engine` →
//! `sys` (and `error`, which every layer shares).

use std::path::{Path, PathBuf};

/// The layers each one may use.
const ALLOWED: &[(&str, &[&str])] = &[
    ("sys", &["error"]),
    ("error", &[]),
    ("engine", &["sys", "error"]),
    ("control", &["engine", "sys", "error"]),
    ("fuse", &["engine", "sys", "error"]),
    ("daemon", &["fuse", "control", "engine", "sys", "error"]),
    (
        "cli",
        &["daemon", "fuse", "control", "engine", "sys", "error"],
    ),
];

const LAYERS: &[&str] = &["cli", "daemon", "fuse", "control", "engine", "sys", "error"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The layer a file of `src/` belongs to.
fn layer_of(src: &Path, file: &Path) -> Option<&'static str> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.trim_end_matches(".rs");
    LAYERS.iter().copied().find(|l| *l == name)
}

#[test]
fn each_layer_uses_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut checked = 0;
    let mut wrong = Vec::new();
    for f in &files {
        let Some(layer) = layer_of(&src, f) else {
            continue;
        };
        let allowed = ALLOWED.iter().find(|(l, _)| *l == layer).unwrap().1;
        let text = std::fs::read_to_string(f).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for other in LAYERS {
                if *other == layer || allowed.contains(other) {
                    continue;
                }
                let uses = [format!("crate::{other}::"), format!("crate::{other}}}")]
                    .iter()
                    .any(|p| code.contains(p.as_str()))
                    || code.contains(&format!("crate::{{{other}"))
                    || code.contains(&format!("crate::{other};"));
                if uses {
                    wrong.push(format!(
                        "{}:{}: {layer} uses {other}: {}",
                        f.display(),
                        n + 1,
                        line.trim()
                    ));
                }
            }
        }
        checked += 1;
    }
    assert!(checked > 30, "found the sources ({checked} files)");
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}

#[test]
fn unsafe_code_lives_in_sys() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (n, line) in lines.iter().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if !code.contains("unsafe ") && !code.contains("unsafe{") {
                continue;
            }
            // Every unsafe block or call says why it is sound, on a line
            // just above it.
            let above = lines[n.saturating_sub(6)..n].join("\n");
            assert!(
                above.contains("SAFETY:") || line.contains("SAFETY:") || code.contains("unsafe fn"),
                "{}:{}: unsafe without a SAFETY comment",
                f.display(),
                n + 1
            );
            if !f.components().any(|c| c.as_os_str() == "sys") {
                assert!(
                    !code.contains("libc::"),
                    "{}:{}: a raw syscall outside src/sys/",
                    f.display(),
                    n + 1
                );
            }
        }
    }
}

/// The engine's modules (the top-level ones: a folder counts as one) and
/// the modules each one names in its code (comments aside).
fn engine_arrows() -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let engine = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/engine");
    let mut files = Vec::new();
    rust_files(&engine, &mut files);
    let top = |f: &Path| -> String {
        let rel = f.strip_prefix(&engine).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_str()
            .unwrap();
        first.trim_end_matches(".rs").to_owned()
    };
    let modules: std::collections::BTreeSet<String> = files.iter().map(|f| top(f)).collect();
    let reexports = engine_reexports(&engine);
    let mut arrows: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    for f in &files {
        let from = top(f);
        let text = std::fs::read_to_string(f).unwrap();
        // A unit test module may use the engine's façade like any client.
        let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
        let code: String = text
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        // `super::m`, `super::super::m`, `crate::engine::m`, and the names
        // inside `super::{a, b::c}`.
        let mut named = Vec::new();
        for prefix in ["super::", "crate::engine::"] {
            for (i, _) in code.match_indices(prefix) {
                let mut rest = &code[i + prefix.len()..];
                while let Some(r) = rest.strip_prefix("super::") {
                    rest = r;
                }
                if let Some(group) = rest.strip_prefix('{') {
                    let group = &group[..group.find('}').unwrap_or(group.len())];
                    named.extend(
                        group
                            .split(',')
                            .map(|s| s.trim().split("::").next().unwrap_or("").to_owned()),
                    );
                } else {
                    let end = rest
                        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .unwrap_or(rest.len());
                    named.push(rest[..end].to_owned());
                }
            }
        }
        for m in named {
            // An item re-exported by `engine/mod.rs` (`super::Pool`) is an
            // arrow to the module that defines it.
            let m = reexports.get(&m).cloned().unwrap_or(m);
            if m != from && modules.contains(&m) {
                arrows.entry(from.clone()).or_default().insert(m);
            }
        }
    }
    arrows
}

/// The items `engine/mod.rs` re-exports (`pub use m::{A, B};`), each with
/// the module that defines it.
fn engine_reexports(engine: &Path) -> std::collections::BTreeMap<String, String> {
    let text = std::fs::read_to_string(engine.join("mod.rs")).unwrap();
    let mut out = std::collections::BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("pub use ") else {
            continue;
        };
        let Some((module, items)) = rest.trim_end_matches(';').split_once("::") else {
            continue;
        };
        let items = items.trim_start_matches('{').trim_end_matches('}');
        for item in items.split(',') {
            out.insert(item.trim().to_owned(), module.to_owned());
        }
    }
    out
}

#[test]
fn the_engines_modules_form_no_cycle() {
    let arrows = engine_arrows();
    assert!(arrows.len() > 15, "found the engine's modules: {arrows:?}");
    let engine = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/engine");
    assert_eq!(
        engine_reexports(&engine).get("Pool").map(String::as_str),
        Some("pool"),
        "read the re-exports of engine/mod.rs"
    );
    // Depth-first search, with the path to tell the cycle.
    fn visit(
        m: &str,
        arrows: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut std::collections::BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut cycle = path[i..].to_vec();
            cycle.push(m.to_owned());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_owned());
        for next in arrows.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, arrows, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_owned());
        None
    }
    let mut done = Default::default();
    for m in arrows.keys() {
        if let Some(cycle) = visit(m, &arrows, &mut Vec::new(), &mut done) {
            panic!("the engine's modules form a cycle: {}", cycle.join(" -> "));
        }
    }
}

/// Files of `src/` stay under 700 lines and functions under 120, so that
/// each can be read in one sitting.
#[test]
fn files_and_functions_stay_small() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut long = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        if lines.len() > 700 {
            long.push(format!(
                "{}: {} lines (at most 700)",
                f.display(),
                lines.len()
            ));
        }
        for (start, len) in function_lengths(&lines) {
            if len > 120 {
                long.push(format!(
                    "{}:{}: a function of {len} lines (at most 120)",
                    f.display(),
                    start + 1
                ));
            }
        }
    }
    assert!(files.len() > 30, "found the sources");
    assert!(long.is_empty(), "too long:\n{}", long.join("\n"));
}

/// The first line and the length of every `fn` with a body, by its braces
/// (string literals and comments aside; good enough for rustfmt'd code).
fn function_lengths(lines: &[&str]) -> Vec<(usize, usize)> {
    let is_fn = |l: &str| {
        let t = l.trim_start();
        let t = t
            .strip_prefix("pub(crate) ")
            .or(t.strip_prefix("pub(super) "))
            .or(t.strip_prefix("pub "))
            .unwrap_or(t);
        let t = t.strip_prefix("const ").unwrap_or(t);
        let t = t.strip_prefix("unsafe ").unwrap_or(t);
        t.starts_with("fn ")
    };
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if !is_fn(l) {
            continue;
        }
        let mut depth = 0i32;
        let mut opened = false;
        for (j, l) in lines.iter().enumerate().skip(i) {
            let code = strip_strings(l.split("//").next().unwrap_or(""));
            for c in code.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            if !opened && code.trim_end().ends_with(';') {
                break;
            }
            if opened && depth == 0 {
                out.push((i, j - i + 1));
                break;
            }
        }
    }
    out
}

/// A line with its string literals emptied (their braces are not code).
fn strip_strings(code: &str) -> String {
    let mut out = String::new();
    let mut in_str = false;
    let mut escaped = false;
    for c in code.chars() {
        match (in_str, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (true, false, '"') => in_str = false,
            (true, false, _) => {}
            (false, _, '"') => in_str = true,
            (false, _, '\'') => out.push(' '),
            (false, _, c) => out.push(c),
        }
    }
    out
}
