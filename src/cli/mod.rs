//! The command-line front end: parses arguments, calls the engine, prints
//! human or `--json` output, and turns errors into one line on stderr and
//! the exit status of their class.

mod adopt_report;
mod args;
mod delta;
mod mount;
pub(crate) mod output;
mod progress;

use crate::control::{self, client, Request, Response};
use crate::daemon::mounts;
use crate::engine::props::check_revisions_to_keep;
use crate::engine::{parse_size, InitOptions, Pool, Property, ValidVid};
use crate::error::{Error, Result};
use args::{Cli, Command, PoolCommand, VolumeCommand};
use clap::Parser;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
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
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Pool(cmd) => run_pool(cmd),
        Command::Volume(cmd) => run_volume(cmd),
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
            property,
            value,
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

/// The volume ids a command names, as typed.
fn vids_in(cmd: &VolumeCommand) -> Vec<&str> {
    match cmd {
        VolumeCommand::Create(c) => std::iter::once(c.vid.as_str())
            .chain(c.snapshot_of.as_deref())
            .collect(),
        VolumeCommand::List { .. } => Vec::new(),
        VolumeCommand::Info(v)
        | VolumeCommand::DiscardChanges(v)
        | VolumeCommand::CancelPending(v)
        | VolumeCommand::Remove { volume: v, .. } => vec![v.vid.as_str()],
        VolumeCommand::Revisions { args, .. } => match args.as_slice() {
            [_, vid, _] | [vid] => vec![vid.as_str()],
            _ => Vec::new(),
        },
        VolumeCommand::Resize { vid, .. }
        | VolumeCommand::Revert { vid, .. }
        | VolumeCommand::Set { vid, .. }
        | VolumeCommand::Import { vid, .. }
        | VolumeCommand::Export { vid, .. }
        | VolumeCommand::Diff { vid, .. }
        | VolumeCommand::Attach { vid, .. }
        | VolumeCommand::Detach { vid, .. } => vec![vid.as_str()],
        VolumeCommand::Clone {
            src_vid, dst_vid, ..
        } => vec![src_vid.as_str(), dst_vid.as_str()],
    }
}

fn run_volume(cmd: VolumeCommand) -> Result<ExitCode> {
    // Validate all input before the pool is touched.
    for v in vids_in(&cmd) {
        precheck_vid(v)?;
    }
    match cmd {
        VolumeCommand::Create(c) => {
            let req = Request::VolumeCreate {
                size: parse_size(&c.size)?,
                revisions_to_keep: parse_revisions(&c.revisions_to_keep)?,
                vid: c.vid,
                snapshot_of: c.snapshot_of,
                volatile: c.volatile,
                read_only: c.read_only,
                optional: c.optional,
                with_data: false,
            };
            dispatch(&c.pool.pool, req, None, c.json.json)
        }
        VolumeCommand::List { pool, json } => {
            dispatch(&pool.pool, Request::VolumeList, None, json.json)
        }
        VolumeCommand::Info(v) => v.dispatch(|vid| Request::VolumeInfo { vid, brief: false }),
        VolumeCommand::Revisions {
            pool,
            args,
            note,
            json,
        } => {
            let req = revisions_request(&args, note)?;
            dispatch(&pool.pool, req, None, json.json)
        }
        VolumeCommand::DiscardChanges(v) => v.dispatch(|vid| Request::VolumeDiscardChanges { vid }),
        VolumeCommand::CancelPending(v) => v.dispatch(|vid| Request::VolumeCancelPending { vid }),
        VolumeCommand::Resize {
            pool,
            vid,
            size,
            allow_shrink,
            json,
        } => {
            let req = Request::VolumeResize {
                vid,
                size: parse_size(&size)?,
                allow_shrink,
            };
            dispatch(&pool.pool, req, None, json.json)
        }
        VolumeCommand::Revert {
            pool,
            vid,
            revision,
            json,
        } => dispatch(
            &pool.pool,
            Request::VolumeRevert { vid, revision },
            None,
            json.json,
        ),
        VolumeCommand::Set {
            pool,
            vid,
            property,
            value,
            json,
        } => {
            // A source is a volume id, checked like the others (it may be
            // VM:NAME, which only the pool resolves).
            match property.as_str() {
                "source" => precheck_vid(&value).map_err(|e| Error::InvalidValue {
                    property: "source".into(),
                    reason: e.to_string(),
                })?,
                _ => drop(Property::parse(&property, &value)?),
            }
            dispatch(
                &pool.pool,
                Request::VolumeSet {
                    vid,
                    property,
                    value,
                },
                None,
                json.json,
            )
        }
        VolumeCommand::Import {
            pool,
            vid,
            abort: true,
            json,
            ..
        } => dispatch(
            &pool.pool,
            Request::VolumeImportAbort { vid },
            None,
            json.json,
        ),
        VolumeCommand::Import {
            pool,
            vid,
            file: Some(file),
            delta: true,
            json,
            ..
        } => delta::import(&pool.pool, vid, &file, json.json),
        VolumeCommand::Diff {
            pool,
            vid,
            from,
            to,
            json,
        } => dispatch(
            &pool.pool,
            Request::VolumeDiff { vid, from, to },
            None,
            json.json,
        ),
        VolumeCommand::Export {
            pool,
            vid,
            file,
            delta,
            since,
            json,
            ..
        } if delta || since.is_some() => delta::export(&pool.pool, vid, &file, since, json.json),
        VolumeCommand::Import {
            pool,
            vid,
            file,
            size,
            json,
            ..
        } => {
            let file = file.expect("clap requires FILE without --abort");
            let size = size.as_deref().map(parse_size).transpose()?;
            let source = open_input(&file)?;
            let bar = import_progress(&pool.pool, &vid, &file, &source, size);
            let req = Request::VolumeImport {
                vid,
                size,
                source: file.display().to_string(),
            };
            progress::during(bar, || dispatch(&pool.pool, req, Some(source), json.json))
        }
        VolumeCommand::Export {
            pool,
            vid,
            file,
            revision,
            json,
            ..
        } => {
            let to_stdout = file == Path::new("-");
            if to_stdout && json.json {
                return Err(Error::InvalidValue {
                    property: "--json".into(),
                    reason:
                        "an export to stdout (-) prints the image there; give a FILE to get JSON"
                            .into(),
                });
            }
            let dest = open_output(&file)?;
            let bar = match to_stdout {
                true => None,
                false => export_progress(&pool.pool, &vid, &file, &dest),
            };
            let req = Request::VolumeExport {
                vid,
                revision,
                dest: file.display().to_string(),
            };
            let result = progress::during(bar, || dispatch(&pool.pool, req, Some(dest), json.json));
            if result.is_err() && !to_stdout {
                let _ = std::fs::remove_file(&file);
            }
            result
        }
        VolumeCommand::Clone {
            pool,
            src_vid,
            dst_vid,
            to_pool,
            json,
        } => match to_pool {
            Some(tp) if !same_dir(&tp, &pool.pool) => {
                clone_across(&pool.pool, &src_vid, &tp, &dst_vid, json.json)
            }
            _ => dispatch(
                &pool.pool,
                Request::VolumeClone {
                    src: src_vid,
                    dst: dst_vid,
                },
                None,
                json.json,
            ),
        },
        VolumeCommand::Remove { volume, force } => {
            volume.dispatch(|vid| Request::VolumeRemove { vid, force })
        }
        VolumeCommand::Attach {
            pool,
            vid,
            read_only,
            direct_io,
            block_size,
            json,
        } => {
            let req = Request::VolumeAttach {
                vid,
                read_only,
                direct_io: Some(direct_io == "on"),
                block_size: block_size.parse().ok(),
            };
            dispatch(&pool.pool, req, None, json.json)
        }
        VolumeCommand::Detach {
            pool,
            vid,
            force,
            json,
        } => {
            let req = Request::VolumeDetach {
                vid,
                force,
                timeout_ms: None,
            };
            dispatch(&pool.pool, req, None, json.json)
        }
    }
}

impl args::VolumeRef {
    /// Runs the request `make` builds from the volume id.
    fn dispatch(self, make: impl FnOnce(String) -> Request) -> Result<ExitCode> {
        dispatch(&self.pool.pool, make(self.vid), None, self.json.json)
    }
}

/// `volume revisions VID`, `volume revisions pin VID K [--note TEXT]` or
/// `volume revisions unpin VID K`.
fn revisions_request(args: &[String], note: Option<String>) -> Result<Request> {
    let bad = |reason: &str| Error::InvalidValue {
        property: "volume revisions".into(),
        reason: reason.into(),
    };
    match (args, note) {
        ([vid], None) => Ok(Request::VolumeRevisions { vid: vid.clone() }),
        ([op, vid, k], note) if op == "pin" => Ok(Request::VolumePin {
            vid: vid.clone(),
            revision: k.clone(),
            note,
        }),
        ([op, vid, k], None) if op == "unpin" => Ok(Request::VolumeUnpin {
            vid: vid.clone(),
            revision: k.clone(),
        }),
        ([_], Some(_)) | ([_, _, _], Some(_)) => Err(bad("--note goes with `pin` only")),
        _ => Err(bad("give VID, or pin VID K, or unpin VID K")),
    }
}

/// The progress of an import from `file`, shown by the growth of the
/// volume's `N-import.img`, on a terminal.
fn import_progress(
    pool: &Path,
    vid: &str,
    file: &Path,
    source: &File,
    size: Option<u64>,
) -> Option<progress::Progress> {
    if !progress::wanted(false) {
        return None;
    }
    let total = crate::sys::fstat(source.as_fd())
        .ok()
        .filter(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG)
        .map(|st| st.st_blocks as u64 * 512)
        .or(size);
    // N.img -> N-import.img, in the file name only (a directory of the
    // pool's path may have ".img" in it too).
    let image = PathBuf::from(volume_info(pool, vid).ok()?.image);
    let stem = image.file_name()?.to_str()?.strip_suffix(".img")?;
    let target = image
        .with_file_name(format!("{stem}-import.img"))
        .display()
        .to_string();
    let label = format!("importing {}", file.display());
    Some(progress::Progress::start(
        label,
        total,
        progress::Watch::Path(target.into()),
    ))
}

/// The progress of an export to `file`, shown by the growth of `dest`, on
/// a terminal.
fn export_progress(pool: &Path, vid: &str, file: &Path, dest: &File) -> Option<progress::Progress> {
    if !progress::wanted(false) {
        return None;
    }
    let total = volume_info(pool, vid)
        .ok()
        .and_then(|v| v.usage)
        .and_then(|u| u.files.first().map(|f| f.usage.allocated));
    let watch = progress::Watch::Fd(dest.try_clone().ok()?);
    let label = format!("exporting to {}", file.display());
    Some(progress::Progress::start(label, total, watch))
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

/// A clone into another pool, each side online or offline: export the
/// source into a file beside the destination pool (a reflink when the two
/// share a filesystem), then create or import the destination from it.
fn clone_across(
    src_pool: &Path,
    src: &str,
    dst_pool: &Path,
    dst: &str,
    json: bool,
) -> Result<ExitCode> {
    let info = volume_info(src_pool, src)?;
    let size = info.size;
    let src_vid = info.vid.clone();
    let tmp_dir = dst_pool.join(crate::engine::pool::META_DIR);
    if !tmp_dir.is_dir() {
        let e = Error::NotAPool {
            path: dst_pool.to_owned(),
        };
        return Err(mounts::explain_not_a_pool(e, |pool| {
            format!("pass --to-pool {}", pool.display())
        }));
    }
    let tmp = tmp_dir.join(format!("clone~{}.img", std::process::id()));
    let result = (|| -> Result<String> {
        let dest = open_output(&tmp)?;
        call(
            src_pool,
            Request::VolumeExport {
                vid: src_vid.clone(),
                revision: None,
                dest: tmp.display().to_string(),
            },
            Some(dest),
        )?;
        let source =
            File::open(&tmp).map_err(|e| Error::io(format!("opening {}", tmp.display()), e))?;
        // A new volume is created with its data in one step, and an
        // existing one gets it as an import: either way, a clone that fails
        // leaves the destination pool as it was.
        let exists = volume_info(dst_pool, dst).is_ok();
        let req = match exists {
            true => Request::VolumeImport {
                vid: dst.to_owned(),
                size: Some(size),
                source: format!("{src_vid} of {}", src_pool.display()),
            },
            false => Request::VolumeCreate {
                vid: dst.to_owned(),
                size,
                snapshot_of: None,
                volatile: false,
                revisions_to_keep: None,
                read_only: false,
                optional: false,
                with_data: true,
            },
        };
        Ok(match call(dst_pool, req, Some(source))? {
            Response::Imported { vid, .. } | Response::Created { vid, .. } => vid,
            _ => dst.to_owned(),
        })
    })();
    let _ = std::fs::remove_file(&tmp);
    let dst_vid = result?;
    let response = Response::Cloned {
        src: src_vid,
        dst: dst_vid,
        pool: dst_pool.display().to_string(),
    };
    Ok(show(&response, json))
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
