//! Odd states on disk: a corrupt config, planted symlinks and missing
//! images are reported, never followed or rewritten, and break nothing
//! but their own volume.

use super::*;
use std::os::unix::fs::MetadataExt;

#[test]
fn corrupt_metadata_is_reported_and_never_rewritten() {
    for (n, (fx, data)) in on_each_fs(|fs| populated(fs, "cli-corrupt")) {
        fx.ok("volume create appvms/vm/other --size 1M");
        let meta = fx.pool.join(".reflinkfs/volumes/appvms/vm/private.json");
        let garbage: &[u8] = b"{ \"format\": 1, this is not JSON \x00\xff\n";
        std::fs::write(&meta, garbage).unwrap();
        let meta_md = std::fs::symlink_metadata(&meta).unwrap();
        let image = fx.pool.join("appvms/vm/private.img");
        let image_bytes = std::fs::read(&image).unwrap();
        let meta_shown = s(&meta);

        // Its own operations fail with exit 8 and name the file.
        let dest = s(&fx.dir.join("export.img"));
        for command in [
            "volume info appvms/vm/private",
            "volume info appvms/vm/private --json",
            "volume info vm:private",
            "volume revisions appvms/vm/private",
            "volume resize appvms/vm/private 2M",
            "volume revert appvms/vm/private",
            "volume set appvms/vm/private rw false",
            "volume set appvms/vm/private revisions_to_keep 3",
            "volume import appvms/vm/private DATA",
            "volume export appvms/vm/private DEST",
            "volume export appvms/vm/private -",
            "volume clone appvms/vm/private appvms/vm2/private",
            "volume clone appvms/vm/other appvms/vm/private",
            // A snapshot of it cannot read its source.
            "volume export appvms/vm/root -",
            "volume clone appvms/vm/root appvms/vm2/root",
        ] {
            let args = argv(command, &[("DATA", &data), ("DEST", &dest)]);
            let line = fx.refused_with(&args, None, ErrorClass::Corrupt, false);
            assert!(
                line.contains(&meta_shown),
                "[{n}] {command}: the error should name {meta_shown}: {line}"
            );
        }
        // Removing it: refused while a snapshot depends on it, then refused
        // because its config cannot be read.
        let remove = "volume remove appvms/vm/private";
        let out = fx.refused_with(remove, None, ErrorClass::Refused, false);
        assert!(out.contains("appvms/vm/root"), "[{n}] {out}");
        fx.ok("volume remove appvms/vm/root");
        let line = fx.refused_with(remove, None, ErrorClass::Corrupt, false);
        assert!(line.contains(&meta_shown), "[{n}] volume remove: {line}");
        // Creating it again is refused (it exists, though unreadable).
        let out = fx.run("volume create appvms/vm/private --size 1M");
        let refusals = [ErrorClass::Exists, ErrorClass::Corrupt].map(code);
        assert!(
            out.status.code().is_some_and(|c| refusals.contains(&c)),
            "[{n}] volume create over a corrupt config must be refused, got {}",
            show(&out)
        );
        // `pool check` reports it.
        fx.check_finds(&meta_shown);

        // The pool still works: list shows it as corrupt, others work.
        let out = fx.ok("volume list");
        let row = out
            .lines()
            .find(|l| l.starts_with("appvms/vm/private "))
            .unwrap_or_else(|| panic!("[{n}] volume list: no row for the corrupt volume:\n{out}"));
        assert!(row.contains("corrupt"), "[{n}] volume list: {row}");
        let list = fx.json("volume list");
        let entry = listed(&list, "appvms/vm/private")
            .unwrap_or_else(|| panic!("[{n}] volume list --json: no corrupt volume: {list}"));
        assert_eq!(entry["state"], "corrupt", "[{n}] {entry}");
        assert!(
            entry["problem"]
                .as_str()
                .unwrap_or("")
                .contains(&meta_shown),
            "[{n}] the problem should name the file: {entry}"
        );
        let other = fx.info("appvms/vm/other");
        assert_eq!(other["state"], "stopped", "[{n}]");
        fx.ok("volume create appvms/vm/third --size 1M");
        fx.ok(["volume", "import", "appvms/vm/other", &data]);
        let exported = fx.export("appvms/vm/other", None);
        assert!(exported == std::fs::read(&data).unwrap(), "[{n}]");
        fx.ok("volume remove appvms/vm/third");

        // After all that, the corrupt file is exactly as it was written.
        let now = std::fs::symlink_metadata(&meta).unwrap();
        assert_eq!(
            std::fs::read(&meta).unwrap(),
            garbage,
            "[{n}] {meta_shown} was rewritten"
        );
        assert_eq!(
            (now.ino(), now.mtime(), now.mtime_nsec()),
            (meta_md.ino(), meta_md.mtime(), meta_md.mtime_nsec()),
            "[{n}] {meta_shown} was replaced"
        );
        assert!(
            std::fs::read(&image).unwrap() == image_bytes,
            "[{n}] the corrupt volume's image changed"
        );
    }
}

// ---------------------------------------------------------------------------
// Planted symlinks.

/// A file outside the pool that a planted symlink points at, which must
/// never change.
struct Outside {
    path: PathBuf,
    bytes: Vec<u8>,
    md: std::fs::Metadata,
}

impl Outside {
    fn new(fx: &Fx, tag: u8) -> Outside {
        let bytes = pattern(tag, MIB);
        let path = fx.file("outside.img", &bytes);
        let md = std::fs::symlink_metadata(&path).unwrap();
        Outside { path, bytes, md }
    }

    #[track_caller]
    fn intact(&self, n: &str, what: &str) {
        let now = std::fs::symlink_metadata(&self.path).unwrap();
        assert!(
            std::fs::read(&self.path).unwrap() == self.bytes,
            "[{n}] {what}: the file outside the pool was written"
        );
        assert_eq!(
            (now.mtime(), now.mtime_nsec(), now.ino()),
            (self.md.mtime(), self.md.mtime_nsec(), self.md.ino()),
            "[{n}] {what}: the file outside the pool was touched"
        );
    }
}

/// Plants a symlink named `name` in the VM directory of `appvms/vm/private`
/// pointing at `target`, in place of whatever was there.
fn plant_symlink(fx: &Fx, name: &str, target: &Path) -> PathBuf {
    let link = fx.pool.join("appvms/vm").join(name);
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(target, &link).unwrap();
    link
}

#[track_caller]
fn assert_symlink(n: &str, link: &Path) {
    let md = std::fs::symlink_metadata(link).unwrap();
    assert!(md.file_type().is_symlink(), "[{n}]");
}

#[test]
fn symlink_planted_as_image_is_never_followed() {
    for (n, (fx, data)) in on_each_fs(|fs| populated(fs, "cli-symlink-img")) {
        let outside = Outside::new(&fx, 0xee);
        let link = plant_symlink(&fx, "private.img", &outside.path);
        let dest = fx.dir.join("export.img");
        let dest_s = s(&dest);
        let stdin = pattern(1, MIB);

        for command in [
            "volume resize appvms/vm/private 2M",
            "volume resize appvms/vm/private 512K --allow-shrink",
            "volume revert appvms/vm/private",
            "volume revert appvms/vm/private 1",
            "volume export appvms/vm/private DEST",
            "volume export appvms/vm/private -",
            "volume import appvms/vm/private DATA",
            "volume import appvms/vm/private -",
            "volume clone appvms/vm/private appvms/vm2/private",
            "volume clone appvms/vm/private appvms/vm/copy",
            // Into it: the new data must not land in (or through) the link.
            "volume clone appvms/vm/volatile appvms/vm/private",
            "volume clone appvms/vm/root appvms/vm/private",
            // A snapshot of it reads the source image.
            "volume export appvms/vm/root -",
        ] {
            let args = argv(command, &[("DATA", &data), ("DEST", &dest_s)]);
            let input = command.ends_with("import appvms/vm/private -");
            let out = fx.fails_unchanged(&args, input.then_some(&stdin[..]));
            let stderr = text(&out.stderr);
            let line = stderr.lines().last().unwrap_or("");
            let what = format!("[{n}] {command}");
            assert!(
                line.starts_with("reflinkfs: error:"),
                "{what}: {}",
                show(&out)
            );
            assert!(
                out.stdout.is_empty(),
                "{what}: wrote {} bytes to stdout",
                out.stdout.len()
            );
            outside.intact(&n, command);
            assert!(!dest.exists(), "{what}: left {dest_s}");
            if !command.contains("volatile") {
                assert_eq!(
                    out.status.code(),
                    Some(code(ErrorClass::Corrupt)),
                    "{what}: a planted symlink is exit 8, got {}",
                    show(&out)
                );
                assert!(
                    line.contains("private.img"),
                    "{what}: the error should name the file: {line}"
                );
            }
        }
        // `pool check` reports it; info says what is wrong.
        fx.check_finds(&s(&link));
        let out = fx.run("pool check --json");
        let problems: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            problems
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["path"] == s(&link).as_str()),
            "[{n}] pool check --json: {problems}"
        );
        let info = fx.info("appvms/vm/private");
        assert_ne!(info["state"], "stopped", "[{n}] {info}");
        // Still a symlink, and the outside file is as it was.
        assert_symlink(&n, &link);
        outside.intact(&n, "after every command");
        // Removing the volume removes the link, never its target.
        let _ = fx.run("volume remove appvms/vm/root");
        let _ = fx.run("volume remove appvms/vm/private");
        outside.intact(&n, "volume remove");
    }
}

#[test]
fn symlinks_planted_as_dirty_image_revision_or_directory_are_never_followed() {
    for (n, (fx, data)) in on_each_fs(|fs| populated(fs, "cli-symlink-other")) {
        let outside = Outside::new(&fx, 0xdd);
        let image = fx.pool.join("appvms/vm/private.img");
        let committed = std::fs::read(&image).unwrap();

        // A dirty image: recovery on open must not commit the outside file.
        let link = plant_symlink(&fx, "private-dirty.img", &outside.path);
        for command in [
            "volume resize appvms/vm/private 2M",
            "volume revert appvms/vm/private 1",
            "volume import appvms/vm/private DATA",
        ] {
            fx.fails_unchanged(argv(command, &[("DATA", &data)]), None);
        }
        let now = fx.export("appvms/vm/private", None);
        assert!(now == committed, "[{n}] dirty symlink");
        fx.check_finds("private-dirty.img");
        assert_symlink(&n, &link);
        assert!(std::fs::read(&image).unwrap() == committed, "[{n}]");
        std::fs::remove_file(&link).unwrap();

        // A revision: revert and export of it must not read the outside file.
        let revisions = fx.json("volume revisions appvms/vm/private");
        let rev = revisions[0]["file_name"].as_str().unwrap();
        let link = plant_symlink(&fx, rev, &outside.path);
        let dest = fx.dir.join("export.img");
        for command in [
            "volume revert appvms/vm/private 1",
            "volume revert appvms/vm/private",
            "volume export appvms/vm/private - --revision 1",
            "volume export appvms/vm/private DEST --revision 1",
        ] {
            let args = argv(command, &[("DEST", &s(&dest))]);
            let what = format!("[{n}] {command}");
            let before = tree_nodes(&fx.dir);
            let out = fx.run(&args);
            failed_logged(&out, ErrorClass::Corrupt, &what);
            assert!(
                out.stdout.is_empty(),
                "{what}: wrote {} bytes to stdout",
                out.stdout.len()
            );
            assert_same_tree(&before, &tree_nodes(&fx.dir), &what);
            assert!(!dest.exists(), "{what}: left the export file");
        }
        let now = fx.export("appvms/vm/private", None);
        assert!(now == committed, "[{n}] revision symlink");
        assert_symlink(&n, &link);

        // A VM directory: nothing is created through it.
        let outside_dir = fx.dir.join("outside-dir");
        std::fs::create_dir(&outside_dir).unwrap();
        std::os::unix::fs::symlink(&outside_dir, fx.pool.join("appvms/evil")).unwrap();
        for command in [
            "volume create appvms/evil/private --size 1M",
            "volume create appvms/evil/volatile --size 1M --volatile",
            "volume clone appvms/vm/private appvms/evil/private",
        ] {
            fx.fails_unchanged(command, None);
        }
        assert_eq!(
            std::fs::read_dir(&outside_dir).unwrap().count(),
            0,
            "[{n}] something was created through the link"
        );
        outside.intact(&n, "after every command");
    }
}

// ---------------------------------------------------------------------------
// Missing images and directories.

/// SPEC §1.4: a volume whose files are missing is listed as `missing`, its
/// own operations fail clearly, and every other volume works. A missing
/// optional image is not listed and is not an error (§1.3).
#[test]
fn missing_images_do_not_break_the_pool() {
    for (n, (fx, data)) in on_each_fs(|fs| populated(fs, "cli-missing")) {
        fx.ok("volume create appvms/k/modules --size 1M --optional");
        fx.ok("volume create appvms/vm2/private --size 1M");
        let optional = &fx.info("appvms/k/modules")["optional"];
        assert_eq!(optional, true, "[{n}]");
        std::fs::remove_file(fx.pool.join("appvms/k/modules.img")).unwrap();
        std::fs::remove_file(fx.pool.join("appvms/vm2/private.img")).unwrap();

        let list = fx.json("volume list");
        let state = |vid: &str| listed(&list, vid).map(|v| v["state"].as_str().unwrap());
        let missing = state("appvms/vm2/private");
        assert_eq!(missing, Some("missing"), "[{n}] {list}");
        assert_eq!(
            state("appvms/k/modules"),
            None,
            "[{n}] a missing optional image is listed: {list}"
        );
        let present = state("appvms/vm/private");
        assert_eq!(present, Some("stopped"), "[{n}] {list}");
        let info = fx.info("appvms/vm2/private");
        assert_eq!(info["state"], "missing", "[{n}]");
        for command in [
            "volume export appvms/vm2/private -",
            "volume resize appvms/vm2/private 2M",
            "volume clone appvms/vm2/private appvms/vm3/private",
        ] {
            let line = fx.refused(command, ErrorClass::NotFound);
            assert!(line.contains("vm2/private.img"), "[{n}] {command}: {line}");
        }
        // The other volumes work.
        fx.ok(["volume", "import", "appvms/vm/private", &data]);
        let exported = fx.export("appvms/vm/private", None);
        assert!(exported == std::fs::read(&data).unwrap(), "[{n}]");
        fx.ok("volume create appvms/vm3/private --size 1M");
        // check reports the missing image, not the optional one.
        let report = fx.check_finds("vm2/private.img");
        assert!(!report.contains("modules"), "[{n}] {report}");
    }
}

/// A planted symlink in place of a VM directory makes that VM's volumes
/// fail, but must not take `volume list` and `pool info` down with it.
#[test]
fn a_symlinked_vm_directory_does_not_break_the_pool() {
    for (n, (fx, _)) in on_each_fs(|fs| populated(fs, "cli-symlink-vmdir")) {
        fx.ok("volume create appvms/other/private --size 1M");
        let outside = fx.dir.join("outside-vm");
        std::fs::rename(fx.pool.join("appvms/vm"), &outside).unwrap();
        std::os::unix::fs::symlink(&outside, fx.pool.join("appvms/vm")).unwrap();
        let before = tree_nodes(&outside);

        fx.check_finds(&s(&fx.pool.join("appvms/vm")));
        let export = "volume export appvms/vm/private -";
        fx.refused_with(export, None, ErrorClass::Corrupt, false);
        let other = fx.info("appvms/other/private");
        assert_eq!(other["state"], "stopped", "[{n}]");

        let out = fx.run("volume list --json");
        let what = format!("[{n}] volume list with a symlinked VM directory");
        let list: Value = serde_json::from_str(&succeeded(&out, &what)).unwrap();
        let other = listed(&list, "appvms/other/private").map(|v| &v["state"]);
        assert_eq!(other, Some(&"stopped".into()), "[{n}] {list}");
        let vm = listed(&list, "appvms/vm/private")
            .unwrap_or_else(|| panic!("[{n}] not listed: {list}"));
        assert_ne!(vm["state"], "stopped", "[{n}] {vm}");
        let out = fx.run("pool info");
        succeeded(
            &out,
            &format!("[{n}] pool info with a symlinked VM directory"),
        );
        let what = format!("[{n}] the directory outside the pool");
        assert_same_tree(&before, &tree_nodes(&outside), &what);
    }
}
