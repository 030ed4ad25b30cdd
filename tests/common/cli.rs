//! Running the `reflinkfs` command line and checking what it says: its
//! exit status, stdout, and the one `reflinkfs: error:` line of a refusal.

use assert_cmd::Command;
use reflinkfs::ErrorClass;
use serde_json::Value;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

/// A `reflinkfs` command with a clean environment: no `$REFLINKFS_POOL` and
/// no `RUST_LOG` from the caller, so stderr holds only what the CLI says.
/// It is killed after two minutes, so a hang fails the test.
pub fn reflinkfs() -> Command {
    let mut c = Command::cargo_bin("reflinkfs").expect("the reflinkfs binary is built");
    c.env_remove("REFLINKFS_POOL")
        .env_remove("RUST_LOG")
        .timeout(Duration::from_secs(120));
    c
}

/// A command's arguments. A `&str` is split at spaces, for the many
/// commands whose words hold none; an array, slice or vector of words is
/// taken as it is, for paths and words with spaces (or none at all).
pub trait Args {
    fn words(&self) -> Vec<String>;
}

impl Args for &str {
    fn words(&self) -> Vec<String> {
        self.split_whitespace().map(str::to_owned).collect()
    }
}

impl<S: AsRef<str>> Args for [S] {
    fn words(&self) -> Vec<String> {
        self.iter().map(|w| w.as_ref().to_owned()).collect()
    }
}

impl<S: AsRef<str>, const N: usize> Args for [S; N] {
    fn words(&self) -> Vec<String> {
        self[..].words()
    }
}

impl<S: AsRef<str>> Args for Vec<S> {
    fn words(&self) -> Vec<String> {
        self[..].words()
    }
}

impl<A: Args + ?Sized> Args for &A {
    fn words(&self) -> Vec<String> {
        (**self).words()
    }
}

/// The words of `template` (split at spaces), each word that is the name
/// of one of `vars` replaced by its value, which may hold spaces or be
/// empty: `argv("volume info VID", &[("VID", vid)])`.
pub fn argv(template: &str, vars: &[(&str, &str)]) -> Vec<String> {
    template
        .split_whitespace()
        .map(|w| {
            vars.iter()
                .find(|(name, _)| *name == w)
                .map_or(w, |(_, value)| value)
                .to_owned()
        })
        .collect()
}

/// `reflinkfs ARGS` with `--pool POOL` after the command's words (`status`,
/// or `GROUP COMMAND`), so that it comes before any `--` among the rest.
pub fn rf_command(pool: &Path, args: impl Args) -> Command {
    let words = args.words();
    let command = words
        .iter()
        .take(2)
        .take_while(|w| !w.starts_with('-'))
        .count();
    let mut c = reflinkfs();
    c.args(&words[..command])
        .arg("--pool")
        .arg(pool)
        .args(&words[command..]);
    c
}

/// Runs `reflinkfs ARGS --pool POOL`; returns its output.
pub fn rf(pool: &Path, args: impl Args) -> Output {
    rf_command(pool, args).output().unwrap()
}

/// Runs `reflinkfs ARGS --pool POOL`, which must succeed; returns stdout.
#[track_caller]
pub fn rf_ok(pool: &Path, args: impl Args) -> String {
    let words = args.words();
    succeeded(&rf(pool, &words), &format!("reflinkfs {}", words.join(" ")))
}

/// Runs `reflinkfs ARGS --json --pool POOL`, which must succeed; returns
/// the JSON it printed.
#[track_caller]
pub fn rf_json(pool: &Path, args: impl Args) -> Value {
    let mut words = args.words();
    words.push("--json".into());
    let out = rf_ok(pool, &words);
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("reflinkfs {}: not JSON ({e}): {out}", words.join(" ")))
}

/// Runs `reflinkfs ARGS --pool POOL`, which must fail as [`failed`] says;
/// returns the error line.
#[track_caller]
pub fn rf_fails(pool: &Path, args: impl Args, class: ErrorClass) -> String {
    let words = args.words();
    failed(
        &rf(pool, &words),
        class,
        &format!("reflinkfs {}", words.join(" ")),
    )
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A command's exit status, stdout and stderr, for failure messages.
pub fn show(out: &Output) -> String {
    format!(
        "exit status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// The exit status of `class`.
pub fn code(class: ErrorClass) -> i32 {
    i32::from(class.exit_code())
}

/// Asserts that `what` succeeded; returns its stdout.
#[track_caller]
pub fn succeeded(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: expected success, got {}",
        show(out)
    );
    text(&out.stdout)
}

/// Asserts the exit status of `class` and exactly one line on stderr, which
/// starts with `reflinkfs: error:` and says something. Returns that line.
#[track_caller]
pub fn failed(out: &Output, class: ErrorClass, what: &str) -> String {
    let line = failed_logged(out, class, what);
    assert_eq!(
        text(&out.stderr).lines().count(),
        1,
        "{what}: expected one line on stderr, got {}",
        show(out)
    );
    line
}

/// Like [`failed`], but log lines (warnings the pool's open prints about a
/// corrupt or planted file) may come before the one error line.
#[track_caller]
pub fn failed_logged(out: &Output, class: ErrorClass, what: &str) -> String {
    assert_eq!(
        out.status.code(),
        Some(code(class)),
        "{what}: expected exit status {} ({}), got {}",
        code(class),
        class.name(),
        show(out)
    );
    let stderr = text(&out.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("reflinkfs: error:"))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "{what}: expected one `reflinkfs: error:` line, got {}",
        show(out)
    );
    assert_eq!(
        stderr.lines().last(),
        Some(errors[0]),
        "{what}: the error must be the last line, got {}",
        show(out)
    );
    assert!(
        errors[0].len() > "reflinkfs: error: ".len() + 10,
        "{what}: the error says nothing: {}",
        show(out)
    );
    errors[0].to_owned()
}
