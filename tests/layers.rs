//! The module layers of `src/` (see `src/lib.rs`): each layer uses only the
//! layers below it. `cli` → `daemon` → `fuse` | `control` → `engine` →
//! `sys` (and `error`, which every layer shares).
#![allow(clippy::unwrap_used)] // in tests, a failed unwrap fails the test

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
