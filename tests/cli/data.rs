//! The data of volumes: import, export, revisions and revert.

use super::*;

#[test]
fn import_and_export_go_through_files_and_stdio() {
    for (n, (w, said)) in on_each_fs(|fs| Work::imported(fs, "cli-import-export")) {
        assert!(said[0].contains("revision 1"), "[{n}] {}", said[0]);
        assert!(said[1].contains("revision 2"), "[{n}] {}", said[1]);
        let exported = w.dir.join("exported.img");
        w.ok(["volume", "export", "appvms/work/private", &s(&exported)]);
        let file = std::fs::read(&exported).unwrap();
        assert!(file == w.b, "[{n}] export to a file");
        let stdout = w.export("appvms/work/private", None);
        assert!(stdout == w.b, "[{n}] export to stdout");
        let second = w.export("work:private", Some("2"));
        assert!(second == w.a, "[{n}] export --revision 2");
        let first = w.export("appvms/work/private", Some("1"));
        assert!(first == zeros(MIB), "[{n}] export --revision 1");
    }
}

#[test]
fn export_refuses_a_destination_that_exists() {
    for (n, (w, _)) in on_each_fs(|fs| Work::imported(fs, "cli-export-exists")) {
        let exported = w.dir.join("exported.img");
        w.ok(["volume", "export", "appvms/work/private", &s(&exported)]);
        let again = ["volume", "export", "appvms/work/private", &s(&exported)];
        let line = w.refused(again, ErrorClass::Refused);
        assert!(line.contains("exists"), "[{n}] {line}");
        assert!(std::fs::read(&exported).unwrap() == w.b, "[{n}]");
    }
}

#[test]
fn revisions_are_listed_with_their_files_in_text_and_json() {
    for (n, (w, _)) in on_each_fs(|fs| Work::imported(fs, "cli-revisions")) {
        let revs = w.json("volume revisions appvms/work/private");
        let ids = w.revision_ids("appvms/work/private");
        assert_eq!(ids, ["1", "2"], "[{n}] {revs}");
        for r in revs.as_array().unwrap() {
            let id = r["id"].as_str().unwrap();
            let file = r["file_name"].as_str().unwrap();
            assert!(file.starts_with(&format!("private.img.{id}@")), "[{n}] {r}");
            let timestamp = r["timestamp"].as_str().unwrap();
            assert!(file.ends_with(timestamp), "[{n}] {r}");
            assert!(w.pool.join("appvms/work").join(file).is_file(), "[{n}] {r}");
        }
        let t = w.ok("volume revisions appvms/work/private");
        assert!(
            t.starts_with("REVISION") && t.lines().count() == 3,
            "[{n}] {t}"
        );
        assert_eq!(w.info("appvms/work/private")["revisions"], revs, "[{n}]");
    }
}

#[test]
fn an_import_of_the_wrong_length_or_into_a_volume_without_data_is_refused() {
    for (n, (w, _)) in on_each_fs(|fs| Work::imported(fs, "cli-import-refused")) {
        let short = s(&w.file("short.img", &pattern(7, MIB - 512)));
        let line = w.refused(
            ["volume", "import", "appvms/work/private", &short],
            ErrorClass::InvalidInput,
        );
        assert!(
            line.contains("1048064"),
            "[{n}] the error should give the length: {line}"
        );
        let stdin = "volume import appvms/work/private -";
        for len in [MIB - 512, 0, MIB + 1, 2 * MIB] {
            let data = pattern(7, len);
            w.refused_with(stdin, Some(&data), ErrorClass::InvalidInput, true);
        }
        let nosuch = s(&w.dir.join("nosuch"));
        for (command, class) in [
            (
                "volume import appvms/work/private A --size 2M",
                ErrorClass::InvalidInput,
            ),
            (
                "volume import appvms/work/private NOSUCH",
                ErrorClass::NotFound,
            ),
            ("volume import appvms/work/volatile A", ErrorClass::Refused),
            ("volume import appvms/work/root A", ErrorClass::Refused),
        ] {
            let args = argv(command, &[("A", &w.a_file), ("NOSUCH", &nosuch)]);
            w.refused(&args, class);
        }
        let after = w.export("appvms/work/private", None);
        assert!(after == w.b, "[{n}] after refused imports");
    }
}

#[test]
fn an_import_with_size_sets_the_new_size() {
    for (n, w) in on_each_fs(|fs| Work::new(fs, "cli-import-size")) {
        let two = pattern(0x77, 2 * MIB);
        let file = s(&w.file("two.img", &two));
        w.ok(["volume", "import", "work:data", &file, "--size", "2M"]);
        assert_eq!(w.info("appvms/work/data")["size"], 2 * MIB_U, "[{n}]");
        assert!(w.export("appvms/work/data", None) == two, "[{n}]");
    }
}

#[test]
fn snapshots_export_their_resolved_source_and_a_volatile_volume_has_no_data() {
    for (n, w) in on_each_fs(|fs| Work::new(fs, "cli-snapshot-data")) {
        assert!(w.export("appvms/work/root", None) == zeros(MIB), "[{n}]");
        w.import_template();
        let root = w.export("appvms/work/root", None);
        assert!(root == w.a, "[{n}] snapshot export");
        let disp = w.export("appvms/disp1/root", None);
        assert!(disp == w.a, "[{n}] snapshot-of-snapshot export");
        for command in [
            "volume export appvms/work/volatile -",
            "volume export appvms/work/root - --revision 1",
            "volume revert appvms/work/volatile",
        ] {
            w.refused(command, ErrorClass::Refused);
        }
    }
}

#[test]
fn revert_names_the_valid_revisions_and_can_itself_be_reverted() {
    for (n, (w, _)) in on_each_fs(|fs| Work::imported(fs, "cli-revert")) {
        // Only revision 2 (`a`) is kept.
        w.ok("volume set appvms/work/private revisions_to_keep 1");
        let line = w.refused("volume revert appvms/work/private 99", ErrorClass::NotFound);
        assert!(
            line.contains("99") && line.contains("valid revisions: 2"),
            "[{n}] {line}"
        );
        let line = w.refused("volume revert appvms/work/private 1", ErrorClass::NotFound);
        assert!(line.contains("valid revisions: 2"), "[{n}] {line}");
        let export_1 = "volume export appvms/work/private - --revision 1";
        w.refused(export_1, ErrorClass::NotFound);
        let said = w.ok("volume revert appvms/work/private");
        assert!(
            said.contains("revision 3"),
            "[{n}] the previous image is saved: {said}"
        );
        let now = w.export("appvms/work/private", None);
        assert!(now == w.a, "[{n}] after revert");
        w.ok("volume revert appvms/work/private 3");
        let now = w.export("appvms/work/private", None);
        assert!(now == w.b, "[{n}] after reverting the revert");
        let line = w.refused("volume revert appvms/work/volatile 1", ErrorClass::Refused);
        assert!(line.contains("volatile"), "[{n}] {line}");
    }
}

/// SPEC §5 revert: "Revision K stays in the list."
#[test]
fn revert_keeps_the_reverted_revision() {
    for (n, (fx, data)) in on_each_fs(|fs| populated(fs, "cli-revert-keeps")) {
        let b = s(&fx.file("b.img", &pattern(0x11, MIB)));
        fx.ok(["volume", "import", "appvms/vm/private", &b]);
        // revisions_to_keep=1: revision 2 holds the data of populated().
        assert_eq!(fx.revision_ids("appvms/vm/private"), ["2"], "[{n}]");
        fx.ok("volume revert appvms/vm/private 2");
        assert_eq!(
            fx.export("appvms/vm/private", None),
            std::fs::read(&data).unwrap(),
            "[{n}]"
        );
        let ids = fx.revision_ids("appvms/vm/private");
        assert!(
            ids.contains(&"2".to_owned()),
            "[{n}] revision 2 is gone after the revert: {ids:?}"
        );
        assert!(
            ids.contains(&"3".to_owned()),
            "[{n}] the image before the revert is not revision 3: {ids:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// stdin and stdout that are regular files.

/// Runs `reflinkfs GROUP COMMAND --pool POOL REST...` with stdin and stdout
/// given as files.
fn run_with_files(
    pool: &Path,
    args: &str,
    stdin: std::process::Stdio,
    stdout: std::process::Stdio,
) -> Output {
    let mut args: Vec<String> = args.words();
    args.splice(2..2, ["--pool".to_owned(), s(pool)]);
    std::process::Command::new(reflinkfs().get_program())
        .args(args)
        .env_remove("REFLINKFS_POOL")
        .env_remove("RUST_LOG")
        .stdin(stdin)
        .stdout(stdout)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap()
}

/// `volume export VID -` with stdout redirected to a file writes at the
/// file's offset, like any program writing to stdout: what was written
/// before (`{ echo header; reflinkfs volume export VID -; } > f`, or
/// `>> f`) must survive.
#[test]
fn export_to_a_regular_file_stdout_keeps_what_was_there() {
    use std::io::Write;
    for (n, (fx, data)) in on_each_fs(|fs| populated(fs, "cli-export-stdout-file")) {
        let image = std::fs::read(&data).unwrap();
        let mut expected = b"HEADER".to_vec();
        expected.extend_from_slice(&image);
        let export = |out: std::fs::File| {
            let null = std::process::Stdio::null();
            run_with_files(
                &fx.pool,
                "volume export appvms/vm/private -",
                null,
                out.into(),
            )
        };

        // `{ printf HEADER; reflinkfs volume export VID -; } > out`
        let out_path = fx.dir.join("out-offset");
        let mut f = std::fs::File::create(&out_path).unwrap();
        f.write_all(b"HEADER").unwrap();
        let out = export(f);
        succeeded(&out, &format!("[{n}] export to a regular file at offset 6"));
        assert!(
            std::fs::read(&out_path).unwrap() == expected,
            "[{n}] export - > file at an offset: the header was lost"
        );

        // `printf HEADER > out; reflinkfs volume export VID - >> out`
        let out_path = fx.dir.join("out-append");
        std::fs::write(&out_path, b"HEADER").unwrap();
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(&out_path)
            .unwrap();
        let out = export(f);
        let got = std::fs::read(&out_path).unwrap();
        assert!(
            got.starts_with(b"HEADER"),
            "[{n}] export - >> file destroyed the file ({} bytes left): {}",
            got.len(),
            show(&out)
        );
        succeeded(&out, &format!("[{n}] export >> file"));
        assert!(got == expected, "[{n}] export - >> file: wrong content");
    }
}

/// `volume import VID -` reads stdin from where it stands, also when stdin
/// is a regular file (`{ read-a-header; reflinkfs volume import VID -; } < f`).
#[test]
fn import_from_a_regular_file_stdin_starts_at_its_offset() {
    use std::io::{Seek, SeekFrom, Write};
    for (n, (fx, _)) in on_each_fs(|fs| populated(fs, "cli-import-stdin-file")) {
        let image = pattern(0x42, MIB);
        let path = fx.dir.join("with-header.img");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&[0xffu8; 512]).unwrap();
        f.write_all(&image).unwrap();
        drop(f);
        let mut f = std::fs::File::open(&path).unwrap();
        f.seek(SeekFrom::Start(512)).unwrap();
        let out = run_with_files(
            &fx.pool,
            "volume import appvms/vm/private -",
            f.into(),
            std::process::Stdio::piped(),
        );
        let what = format!("[{n}] import from a regular-file stdin at offset 512");
        succeeded(&out, &what);
        assert!(
            fx.export("appvms/vm/private", None) == image,
            "[{n}] wrong data imported"
        );
    }
}
