//! The command-line front end: parses arguments, calls the engine, prints
//! human or `--json` output, and turns errors into one line on stderr and
//! the exit status of their class.

mod adopt_report;
mod args;
mod delta;
mod mount;
pub(crate) mod output;
mod progress;
mod volume;

use crate::control::{self, client, Request, Response};
use crate::daemon::mounts;
use crate::engine::props::check_revisions_to_keep;
use crate::engine::{InitOptions, Pool, ValidVid};
use crate::error::{Error, Result};
use args::{Cli, Command, PoolCommand};
use clap::Parser;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::ExitCode;

/// Parses an optional `revisions_to_keep` given as text.
fn parse_revisions(v: &Option<String>) -> Result<Option<i64>> {
    v.as_ref()
        .map(|s| {
            let n: i64 = s.trim().parse().map_err(|_| Error::InvalidValue {
                property: "revisions_to_keep".into(),
                reason: format!("{s:?} is not an integer"),
            })?;
            check_revisions_to_keep(n)
        })
        .transpose()
}

/// Runs the CLI and returns the process exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Mount { .. }) {
        init_logging(cli.verbose);
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let e = mounts::explain_not_a_pool(e, |pool| {
                let also = match std::env::var_os("REFLINKFS_POOL") {
                    Some(_) => format!(" (or export REFLINKFS_POOL={})", pool.display()),
                    None => String::new(),
                };
                format!("pass --pool {}{also}", pool.display())
            });
            log::debug!("{e:?}");
            eprintln!("reflinkfs: error: {e}");
            ExitCode::from(e.class().exit_code())
        }
    }
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp(None)
        .format_target(false)
        .init();
    crate::engine::failpoint::warn_if_ignored();
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Pool(cmd) => run_pool(cmd),
        Command::Volume(cmd) => volume::run(cmd),
        Command::Mount {
            pool,
            mountpoint,
            options,
            foreground,
        } => crate::daemon::mount(&pool, &mountpoint, &options, foreground, cli.verbose),
        Command::Unmount { mountpoint } => mount::unmount(&mountpoint),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let shell = match shell.as_str() {
                "bash" => clap_complete::Shell::Bash,
                "zsh" => clap_complete::Shell::Zsh,
                _ => clap_complete::Shell::Fish,
            };
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "reflinkfs", &mut buf);
            write_stdout(&buf)
        }
        Command::Manpage => {
            use clap::CommandFactory;
            let mut buf = Vec::new();
            clap_mangen::Man::new(Cli::command())
                .render(&mut buf)
                .map_err(|e| Error::io("writing the man page", e))?;
            write_stdout(&buf)
        }
        Command::Status { pool, json } => dispatch(&pool.pool, Request::Status, None, json.json),
    }
}

fn run_pool(cmd: PoolCommand) -> Result<ExitCode> {
    match cmd {
        PoolCommand::Init {
            pool,
            setup_check,
            revisions_to_keep,
            read_only,
        } => {
            let mut opts = InitOptions {
                setup_check: setup_check == "yes",
                read_only,
                ..InitOptions::default()
            };
            if let Some(n) = parse_revisions(&revisions_to_keep)? {
                if read_only && n != 0 {
                    return Err(Error::InvalidValue {
                        property: "revisions_to_keep".into(),
                        reason: "a read-only pool keeps no revisions; it must be 0".into(),
                    });
                }
                opts.revisions_to_keep = n;
            }
            refuse_mount_for_new_pool(&pool.pool, "make a pool in")?;
            let p = Pool::init(&pool.pool, &opts)?;
            println!(
                "initialised pool {} ({})",
                p.path().display(),
                if p.config().copy_mode {
                    "copy mode"
                } else {
                    "reflink"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        PoolCommand::Adopt {
            pool,
            qubes_xml,
            dry_run,
            setup_check,
            json,
        } => {
            let opts = crate::engine::adopt::AdoptOptions {
                qubes_xml,
                dry_run,
                setup_check: setup_check == "yes",
            };
            refuse_mount_for_new_pool(&pool.pool, "adopt")?;
            let report = crate::engine::adopt::adopt(&pool.pool, &opts)?;
            if json.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("reports serialise")
                );
            } else {
                print!("{}", adopt_report::text(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
        PoolCommand::Info { pool, json } => {
            dispatch(&pool.pool, Request::PoolInfo, None, json.json)
        }
        PoolCommand::Set {
            pool,
            set: args::PropertyArg { property, value },
            json,
        } => {
            crate::engine::PoolProperty::parse(&property, &value)?;
            let req = Request::PoolSet { property, value };
            dispatch(&pool.pool, req, None, json.json)
        }
        PoolCommand::Check { pool, volume, json } => {
            if let Some(v) = &volume {
                precheck_vid(v)?;
            }
            dispatch(&pool.pool, Request::PoolCheck { volume }, None, json.json)
        }
    }
}

/// Refuses a reflinkfs mount, or a directory in one, as the place of a new
/// pool (`pool init`, `pool adopt`), naming the mount's pool, before
/// anything is touched.
fn refuse_mount_for_new_pool(path: &Path, what: &str) -> Result<()> {
    let hint = |pool: &Path| {
        format!(
            "{what} a directory outside any mount, on the filesystem of the images ({} is a pool already)",
            pool.display()
        )
    };
    match mounts::mount_given_as_pool(path, hint) {
        Some(e) => Err(Error::InvalidValue {
            property: "--pool".into(),
            reason: e.to_string(),
        }),
        None => Ok(()),
    }
}

/// Runs a request through the daemon when the pool is mounted, else
/// against the pool opened here; prints the response, as text or JSON.
fn dispatch(pool: &Path, req: Request, fd: Option<File>, json: bool) -> Result<ExitCode> {
    let response = call(pool, req, fd)?;
    Ok(show(&response, json))
}

/// Prints a response, as text or JSON, and gives its exit status.
fn show(response: &Response, json: bool) -> ExitCode {
    if let Some(w) = output::warning(response) {
        eprintln!("reflinkfs: warning: {w}");
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&output::json(response)).expect("values serialise")
        );
    } else {
        print!("{}", output::text(response));
    }
    ExitCode::from(output::exit_code(response))
}

/// The response to a request, online or offline.
fn call(pool: &Path, req: Request, fd: Option<File>) -> Result<Response> {
    match client::connect(pool)? {
        Some(stream) => {
            log::debug!(
                "{} is mounted: sending {req:?} to its daemon",
                pool.display()
            );
            client::call(stream, &req, fd.as_ref().map(|f| f.as_fd()))
        }
        None => {
            let p = Pool::open(pool)?;
            control::execute(&p, req, fd, None, None)
        }
    }
}

/// The info of one volume, online or offline.
fn volume_info(pool: &Path, vid: &str) -> Result<crate::engine::VolumeInfo> {
    match call(
        pool,
        Request::VolumeInfo {
            vid: vid.to_owned(),
            brief: false,
        },
        None,
    )? {
        Response::Volume(v) => Ok(*v),
        other => Err(Error::Protocol {
            reason: format!("the daemon answered volume info with {other:?}"),
        }),
    }
}

/// An export into `file` (`-`: stdout, where `--json` is refused since
/// `what` goes there): `run` gets the open destination and whether it is
/// stdout. A failed export leaves no partial FILE behind.
fn export_into(
    file: &Path,
    json: bool,
    what: &str,
    run: impl FnOnce(File, bool) -> Result<ExitCode>,
) -> Result<ExitCode> {
    let to_stdout = file == Path::new("-");
    if to_stdout && json {
        return Err(Error::InvalidValue {
            property: "--json".into(),
            reason: format!("an export to stdout (-) prints {what} there; give a FILE to get JSON"),
        });
    }
    let result = run(open_output(file)?, to_stdout);
    if result.is_err() && !to_stdout {
        let _ = std::fs::remove_file(file);
    }
    result
}

/// Checks the syntax of a volume id as typed (`CLASS/VM/NAME` or
/// `VM:NAME`) before any file is touched (SPEC §2.1).
fn precheck_vid(input: &str) -> Result<()> {
    if input.contains(':') && !input.contains('/') {
        crate::engine::listing::check_short_vid(input)
    } else {
        input.parse::<ValidVid>().map(drop)
    }
}

/// Writes generated text to stdout; a closed pipe (`| head`) is not an
/// error.
fn write_stdout(buf: &[u8]) -> Result<ExitCode> {
    use std::io::Write;
    match std::io::stdout().write_all(buf) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Error::io("writing to stdout", e))
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// A standard stream as a `File` of its own (`-` on the command line).
fn std_stream(fd: std::os::fd::BorrowedFd<'_>, what: &str) -> Result<File> {
    let own = fd.try_clone_to_owned().map_err(|e| Error::io(what, e))?;
    Ok(File::from(own))
}

fn open_input(path: &Path) -> Result<File> {
    if path == Path::new("-") {
        return std_stream(std::io::stdin().as_fd(), "reading standard input");
    }
    File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))
}

fn open_output(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    if path == Path::new("-") {
        return std_stream(std::io::stdout().as_fd(), "writing standard output");
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::Refused {
                    vid: "export".into(),
                    reason: format!(
                        "{} already exists; remove it or choose another name",
                        path.display()
                    ),
                }
            } else {
                Error::io(format!("creating {}", path.display()), e)
            }
        })
}
