//! The command line: its commands, options and help texts (clap derive).

use crate::error::ErrorClass;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

fn exit_status_help() -> String {
    let mut rows: Vec<(u8, &str)> = ErrorClass::ALL.iter().map(|(_, c, w)| (*c, *w)).collect();
    rows.push((0, "success"));
    rows.push((2, "usage error (unknown command or option)"));
    rows.sort();
    let mut s = String::from("Exit status:\n");
    for (code, what) in rows {
        s.push_str(&format!("  {code:<3} {what}\n"));
    }
    s.push_str("\nThe pool defaults to $REFLINKFS_POOL. Sizes take K, M, G and T suffixes (powers of 1024).\nLogs go to stderr: -v shows every copy, reflink, rename and remove; RUST_LOG overrides.");
    s
}

/// VM disk volumes as image files in a pool, snapshotted by reflink on
/// start and committed on stop.
#[derive(Debug, Parser)]
#[command(name = "reflinkfs", version, after_help = exit_status_help(), propagate_version = true)]
pub struct Cli {
    /// More log output on stderr (-v: every file operation, -vv: debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, inspect and check pools.
    #[command(subcommand, after_help = exit_status_help())]
    Pool(PoolCommand),
    /// Create, inspect and change volumes.
    #[command(subcommand, after_help = exit_status_help())]
    Volume(VolumeCommand),
    /// Mount a pool: each VM directory shows N-dirty.img (opening it starts
    /// the volume, the last close commits), N.img and the revisions.
    /// Detaches once the mount is ready (exit 0) unless -f is given; logs
    /// go to POOL/.reflinkfs/daemon.log.
    #[command(after_help = MOUNT_HELP)]
    Mount {
        /// The pool directory (an empty directory becomes a new pool).
        pool: PathBuf,
        /// The directory to mount the pool on (it must exist).
        mountpoint: PathBuf,
        /// Comma-separated options (see below). May be repeated.
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Stay in the foreground and log to stderr.
        #[arg(short = 'f', long)]
        foreground: bool,
    },
    /// Show whether a pool is mounted, and if so its mountpoint, I/O mode,
    /// running volumes with their open handles, commits in flight, and the
    /// daemon's PID and uptime.
    #[command(after_help = exit_status_help())]
    Status {
        #[command(flatten)]
        pool: PoolArg,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Print a shell completion script (e.g. `reflinkfs completions bash >
    /// /etc/bash_completion.d/reflinkfs`).
    Completions {
        #[arg(value_parser = ["bash", "zsh", "fish"])]
        /// The shell: bash, zsh or fish.
        shell: String,
    },
    /// Print the man page (roff), generated from this command line's
    /// definitions (e.g. `reflinkfs manpage | man -l -`).
    Manpage,
    /// Unmount a pool. Refused while volumes are open; waits until the
    /// daemon has committed and released the pool.
    #[command(after_help = exit_status_help())]
    Unmount {
        /// Where the pool is mounted.
        mountpoint: PathBuf,
    },
}

const MOUNT_HELP: &str = "Options (-o):
  passthrough=on|off  kernel FUSE passthrough for reads and writes (default on;
                      off, or a kernel without it, serves them in the daemon)
  threads=N           worker threads (default 4)
  allow_other         let other users in (file modes still apply: 0600, root)
  ro                  every volume read-only
  setup_check=no      when POOL is an empty directory, make it a copy-mode pool
  noexec, noatime, nosuid, nodev, rw, defaults   the usual mount flags

SIGTERM, SIGINT and SIGHUP unmount when no volume is open.
With mount(8): mount -t reflinkfs POOL MOUNTPOINT -o OPTIONS (mount-helper/).";

#[derive(Debug, Args)]
pub struct PoolArg {
    /// The pool directory.
    #[arg(long, env = "REFLINKFS_POOL", value_name = "PATH")]
    pub pool: PathBuf,
}

/// `set PROPERTY VALUE`, of a pool or a volume.
#[derive(Debug, Args)]
pub struct PropertyArg {
    /// The property (the command's description lists them).
    pub property: String,
    /// Its new value.
    #[arg(allow_negative_numbers = true)]
    pub value: String,
}

#[derive(Debug, Args)]
pub struct JsonArg {
    /// Print stable, machine-readable JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Make a directory a pool. Checks that the filesystem makes reflinks
    /// (XFS with reflink=1, btrfs); elsewhere give --setup-check=no for a
    /// copy-mode pool, where every snapshot is a full sparse copy.
    #[command(after_help = exit_status_help())]
    Init {
        #[command(flatten)]
        pool: PoolArg,
        /// `no` skips the reflink check and records the pool as copy mode.
        #[arg(long, value_name = "yes|no", default_value = "yes", value_parser = ["yes", "no"])]
        setup_check: String,
        /// Default revisions_to_keep of new origin volumes (-1 disables snapshots).
        #[arg(long, value_name = "N", allow_negative_numbers = true)]
        revisions_to_keep: Option<String>,
        /// Kernel-pool mode: every volume is rw=false with revisions_to_keep=0.
        #[arg(long)]
        read_only: bool,
    },
    /// Bring an existing Qubes `file-reflink` or `file` pool directory under
    /// management in place, without copying data: discover its images and
    /// revisions, remove leftover `-cow.img` files of the `file` driver, and
    /// write the volume configs (from qubes.xml when given, else inferred
    /// from the names, with a report of every guess).
    #[command(after_help = exit_status_help())]
    Adopt {
        #[command(flatten)]
        pool: PoolArg,
        /// Take volume properties from this qubes.xml.
        #[arg(long, value_name = "FILE")]
        qubes_xml: Option<PathBuf>,
        /// Show the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// `no` records the pool as copy mode instead of checking reflinks.
        #[arg(long, value_name = "yes|no", default_value = "yes", value_parser = ["yes", "no"])]
        setup_check: String,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Show the pool's mode, defaults and usage.
    #[command(after_help = exit_status_help())]
    Info {
        #[command(flatten)]
        pool: PoolArg,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Set a pool property: revisions_to_keep, the default of new origin
    /// volumes (an integer >= -1; 0 in a read-only pool). Existing volumes
    /// keep their own.
    #[command(after_help = exit_status_help())]
    Set {
        #[command(flatten)]
        pool: PoolArg,
        #[command(flatten)]
        set: PropertyArg,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Check the pool's consistency and report every problem found (exit
    /// status 8 when there is one).
    #[command(after_help = exit_status_help())]
    Check {
        #[command(flatten)]
        pool: PoolArg,
        /// Check only this volume.
        #[arg(long, value_name = "VID")]
        volume: Option<String>,
        #[command(flatten)]
        json: JsonArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume: an origin (default), a snapshot of another volume,
    /// or a volatile one. VID is CLASS/VM/NAME, e.g. appvms/work/private.
    #[command(after_help = exit_status_help())]
    Create(CreateArgs),
    /// List the volumes.
    #[command(after_help = exit_status_help())]
    List {
        #[command(flatten)]
        pool: PoolArg,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Show all properties, derived values and usage of a volume.
    #[command(after_help = exit_status_help())]
    Info(VolumeRef),
    /// List a volume's revisions, oldest first, with their pins.
    /// `volume revisions pin VID K [--note TEXT]` pins revision K: no
    /// commit, revert, revisions_to_keep or recovery prunes it, and it does
    /// not count against revisions_to_keep; `volume revisions unpin VID K`
    /// gives it back to the prunes.
    #[command(after_help = exit_status_help())]
    Revisions {
        #[command(flatten)]
        pool: PoolArg,
        /// VID (CLASS/VM/NAME or VM:NAME) to list its revisions, or `pin VID
        /// K`, or `unpin VID K` (K: a revision number, or a legacy
        /// revision's timestamp).
        #[arg(num_args = 1..=3, required = true, value_name = "VID | pin VID K | unpin VID K")]
        args: Vec<String>,
        /// With `pin`: why the revision is kept (one line), shown by
        /// `volume revisions`.
        #[arg(long)]
        note: Option<String>,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Change a volume's size. Shrinking needs --allow-shrink.
    #[command(after_help = exit_status_help())]
    Resize {
        #[command(flatten)]
        volume: VolumeArg,
        /// The new size in bytes, with an optional K, M, G or T suffix
        /// (powers of 1024).
        #[arg(allow_hyphen_values = true)]
        size: String,
        /// Allow a smaller size (data past the new end is lost).
        #[arg(long)]
        allow_shrink: bool,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Go back to a revision (default: the newest). The current image is
    /// kept as a new revision first, and the revision stays. On a running
    /// volume the revert is queued for its stop, whose writes are then
    /// dropped (`volume cancel-pending` withdraws it).
    #[command(after_help = exit_status_help())]
    Revert {
        #[command(flatten)]
        volume: VolumeArg,
        /// A revision number K, or a timestamp for a legacy revision.
        revision: Option<String>,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Set a property: revisions_to_keep (an integer >= -1), rw (true or
    /// false), or source (of a stopped snapshot volume: the volume id it
    /// starts from, e.g. a new template's root). Lowering
    /// revisions_to_keep prunes at once.
    #[command(after_help = exit_status_help())]
    Set {
        #[command(flatten)]
        volume: VolumeArg,
        #[command(flatten)]
        set: PropertyArg,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Replace a stopped origin volume's data with FILE (`-` for stdin).
    /// The data must be exactly the size, or nothing changes; the previous
    /// image becomes a revision. `--abort` instead drops an import written
    /// in place (qubesd's restore) whose writer died.
    #[command(after_help = exit_status_help())]
    Import {
        #[command(flatten)]
        volume: VolumeArg,
        /// The data: a file, a block device, or - for stdin.
        #[arg(required_unless_present = "abort")]
        file: Option<PathBuf>,
        /// Drop the import in progress on VID that was begun by another
        /// program (`volume_import_begin`, as qubesd's restore does) and
        /// never ended: its file goes, the volume stays as it was. Without
        /// a daemon there is none (opening the pool removes a leftover).
        #[arg(long, conflicts_with_all = ["file", "size"])]
        abort: bool,
        /// The size the data must have (default: the volume's size).
        #[arg(long, allow_hyphen_values = true)]
        size: Option<String>,
        /// FILE is an `rbd diff v1` stream (`volume export --delta`, `rbd
        /// export-diff`): applied onto the committed image whose id it names
        /// as its from-snapshot, or refused with nothing changed.
        #[arg(long, conflicts_with_all = ["size", "abort"])]
        delta: bool,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Copy a volume's committed image (or a revision) to FILE (`-` for
    /// stdout). FILE must not exist.
    #[command(after_help = exit_status_help())]
    Export {
        #[command(flatten)]
        volume: VolumeArg,
        /// Where to write it: a new file, or - for stdout.
        file: PathBuf,
        /// Export revision K instead of the committed image.
        #[arg(long, value_name = "K", conflicts_with_all = ["delta", "since"])]
        revision: Option<String>,
        /// Write an `rbd diff v1` stream (Ceph's `rbd import-diff` reads
        /// it) carrying the image's revision id, instead of the raw image.
        #[arg(long)]
        delta: bool,
        /// Only the changes since revision K (a number or an id): a delta
        /// stream from K's id to the committed image's (implies --delta).
        #[arg(long, value_name = "K")]
        since: Option<String>,
        #[command(flatten)]
        json: JsonArg,
    },
    /// The byte ranges where revision K and the committed image (or
    /// revision K2) differ, from the change maps recorded at commit, or by
    /// comparing data where none joins them.
    #[command(after_help = exit_status_help())]
    Diff {
        #[command(flatten)]
        volume: VolumeArg,
        /// The older revision: a number K or a revision id.
        #[arg(long, value_name = "K")]
        from: String,
        /// The newer one (default: the committed image).
        #[arg(long, value_name = "K2")]
        to: Option<String>,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Copy a volume's committed image into another volume, creating it
    /// if needed, in this pool or in --to-pool.
    #[command(after_help = exit_status_help())]
    Clone {
        #[command(flatten)]
        pool: PoolArg,
        /// The volume to copy: CLASS/VM/NAME or VM:NAME.
        src_vid: String,
        /// The volume to copy into (created if it does not exist).
        dst_vid: String,
        /// The pool of DST_VID (default: the same pool).
        #[arg(long, value_name = "PATH")]
        to_pool: Option<PathBuf>,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Put a loop device straight on a volume's running image, starting the
    /// volume (as a first open on the mount does), for block consumers such
    /// as Xen's phy: or qemu on a device: no FUSE in the data path. Prints
    /// the device (/dev/loopN). Works mounted or not; `volume detach` stops
    /// it again.
    #[command(after_help = exit_status_help())]
    Attach {
        #[command(flatten)]
        volume: VolumeArg,
        /// A read-only device (the volume may be rw=false).
        #[arg(long)]
        read_only: bool,
        /// Direct I/O on the device (default on). The kernel runs buffered
        /// where the file needs a larger alignment than --block-size: on
        /// XFS and btrfs direct I/O needs --block-size 4096.
        #[arg(long, value_name = "on|off", default_value = "on", value_parser = ["on", "off"])]
        direct_io: String,
        /// The device's logical block size in bytes. 512 (the default) is
        /// what disk images are laid out for: partition tables and file
        /// systems with 1 KiB blocks need it. 4096 allows direct I/O on
        /// XFS and btrfs, for images made on 4 KiB-sector disks.
        #[arg(long, value_name = "512|4096", default_value = "512", value_parser = ["512", "4096"])]
        block_size: String,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Remove the loop device of `volume attach`, wait until the kernel has
    /// let go of the image, and stop the volume (commit or discard) unless
    /// the mount still has it open. Refused while the device is in use
    /// (mounted, or a VM's disk), naming the user.
    #[command(after_help = exit_status_help())]
    Detach {
        #[command(flatten)]
        volume: VolumeArg,
        /// Detach even while the device is in use (a VM that crashed and
        /// left it claimed); the kernel clears it at its last close.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        json: JsonArg,
    },
    /// End the running volume's current run without a commit: at its last
    /// close (or detach) its writes are dropped and it is as it was at the
    /// run's start. The VM keeps running until then. Origin volumes only.
    #[command(after_help = exit_status_help())]
    DiscardChanges(VolumeRef),
    /// Withdraw a queued discard-changes or revert before the run ends.
    #[command(after_help = exit_status_help())]
    CancelPending(VolumeRef),
    /// Delete a volume with its images and revisions.
    #[command(after_help = exit_status_help())]
    Remove {
        #[command(flatten)]
        volume: VolumeRef,
        /// Remove it even with pinned revisions, which go with it.
        #[arg(long)]
        force: bool,
    },
}

/// The arguments of `volume create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    pub pool: PoolArg,
    /// The volume: CLASS/VM/NAME (e.g. appvms/work/private).
    pub vid: String,
    /// Size in bytes, with an optional K, M, G or T suffix (powers of
    /// 1024; KiB, MiB, GiB, TiB also work, KB, MB, GB, TB do not).
    #[arg(long, allow_hyphen_values = true)]
    pub size: String,
    /// Make a snapshot volume whose every start copies SRC_VID's
    /// committed image and whose stop discards its writes.
    #[arg(long, value_name = "SRC_VID", conflicts_with = "volatile")]
    pub snapshot_of: Option<String>,
    /// Make a volatile volume: empty at every start, discarded at stop.
    #[arg(long)]
    pub volatile: bool,
    /// Revisions to keep (origin volumes; -1 disables snapshots).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub revisions_to_keep: Option<String>,
    /// Create it with rw=false.
    #[arg(long)]
    pub read_only: bool,
    /// The image may be missing (e.g. a kernel's modules.img).
    #[arg(long)]
    pub optional: bool,
    #[command(flatten)]
    pub json: JsonArg,
}

/// The volume a command acts on: its pool, and its id.
#[derive(Debug, Args)]
pub struct VolumeArg {
    #[command(flatten)]
    pub pool: PoolArg,
    /// The volume: CLASS/VM/NAME (e.g. appvms/work/private), or VM:NAME.
    pub vid: String,
}

/// A command on one volume with no other argument but `--json`.
#[derive(Debug, Args)]
pub struct VolumeRef {
    #[command(flatten)]
    pub volume: VolumeArg,
    #[command(flatten)]
    pub json: JsonArg,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every command and every argument of every command says what it is,
    /// in `--help` and in the man page.
    #[test]
    fn every_command_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name());
            if cmd.get_about().is_none() && !path.ends_with(" help") {
                missing.push(format!("{path}: no about"));
            }
            for a in cmd.get_arguments() {
                let builtin = ["help", "version"].contains(&a.get_id().as_str());
                if a.get_help().is_none() && !builtin {
                    missing.push(format!("{path} <{}>", a.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "", &mut missing);
        assert!(missing.is_empty(), "without help: {missing:#?}");
        let about = Cli::command().get_about().unwrap().to_string();
        assert!(
            !about.starts_with("reflinkfs"),
            "the man page's NAME line repeats the name: {about}"
        );
    }
}
