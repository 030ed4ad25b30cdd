//! The README's worked example really runs: the shell block after
//! `<!-- worked-example -->` is run with bash against a fresh pool on a
//! filesystem with reflinks, with the built `reflinkfs` first on PATH.

use crate::common;

use common::*;
use std::process::Command;

fn worked_example() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let after = readme
        .split_once("<!-- worked-example -->")
        .expect("README has a worked example")
        .1;
    let body = after.split_once("```sh\n").expect("a sh block").1;
    body.split_once("```").expect("the block ends").0.to_owned()
}

#[test]
fn the_readme_worked_example_runs() {
    let script = worked_example();
    assert!(
        script
            .lines()
            .filter(|l| l.starts_with("reflinkfs "))
            .count()
            >= 15,
        "{script}"
    );
    let bin = assert_cmd::cargo::cargo_bin("reflinkfs");
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut ran = 0;
    for fs in filesystems().into_iter().filter(|f| f.reflink) {
        let pool = scratch_dir(&fs, "readme").join("pool");
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .env("PATH", &path)
            .env("REFLINKFS_POOL", &pool)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "[{}] the README example failed: {:?}\nstdout:\n{}\nstderr:\n{}",
            fs.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("no problems found"), "{stdout}");
        assert!(stdout.contains("removed appvms/work2/private"), "{stdout}");
        ran += 1;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        assert!(
            ran > 0,
            "CI=true but no filesystem with reflinks to run the README on"
        );
    }
}
