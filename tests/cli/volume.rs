//! Volumes: create, list, info, resize, set, clone and remove, each on a
//! new pool with the volumes of [`VOLUMES`].

use super::*;

#[test]
fn create_makes_origins_snapshots_of_snapshots_and_volatiles() {
    for (n, (w, said)) in on_each_fs(|fs| Work::with_creates(fs, "cli-create")) {
        assert!(said[1].contains("appvms/work/private"), "[{n}] {}", said[1]);
        // VM:NAME for a new volume of an existing VM.
        assert!(said[5].contains("appvms/work/data"), "[{n}] {}", said[5]);
        assert_eq!(w.info("disp1:root")["type"], "snapshot", "[{n}]");
    }
}

#[test]
fn create_refuses_an_existing_volume_a_new_vm_by_short_name_and_a_volatile_source() {
    for (_, w) in on_each_fs(|fs| Work::new(fs, "cli-create-refused")) {
        w.refused("volume create work:data --size 4K", ErrorClass::Exists);
        let existing = "volume create appvms/work/private --size 1M";
        w.refused(existing, ErrorClass::Exists);
        w.refused(
            "volume create newvm:data --size 4K",
            ErrorClass::InvalidInput,
        );
        let of_volatile = "volume create appvms/x/y --size 1M --snapshot-of appvms/work/volatile";
        w.refused(of_volatile, ErrorClass::Refused);
    }
}

#[test]
fn list_shows_every_volume_with_its_type_size_and_source() {
    for (n, w) in on_each_fs(|fs| Work::new(fs, "cli-list")) {
        let list = w.json("volume list");
        let vids: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["vid"].as_str().unwrap())
            .collect();
        assert_eq!(
            vids,
            [
                "appvms/disp1/root",
                "appvms/work/data",
                "appvms/work/private",
                "appvms/work/root",
                "appvms/work/volatile",
                "vm-templates/tpl/root"
            ],
            "[{n}] {list}"
        );
        // vid, type, size, revisions_to_keep, source (`-` for none).
        for row in [
            "vm-templates/tpl/root origin 1048576 1 -",
            "appvms/work/private origin 1048576 2 -",
            "appvms/work/root snapshot 1048576 0 vm-templates/tpl/root",
            "appvms/work/volatile volatile 524288 0 -",
            "appvms/disp1/root snapshot 1048576 0 appvms/work/root",
            "appvms/work/data origin 4096 1 -",
        ] {
            let c: Vec<&str> = row.split(' ').collect();
            let v = listed(&list, c[0]).unwrap();
            let source = (c[4] != "-").then_some(c[4]);
            let ctx = format!("[{n}] {}: {v}", c[0]);
            assert_eq!(v["type"], c[1], "{ctx}");
            assert_eq!(v["state"], "stopped", "{ctx}");
            assert_eq!(v["size"], c[2].parse::<u64>().unwrap(), "{ctx}");
            assert_eq!(v["rw"], true, "{ctx}");
            assert_eq!(
                v["revisions_to_keep"],
                c[3].parse::<i64>().unwrap(),
                "{ctx}"
            );
            assert_eq!(v["source"].as_str(), source, "{ctx}");
            assert_eq!(v["revisions"], serde_json::json!([]), "{ctx}");
        }
        let text_list = w.ok("volume list");
        for v in list.as_array().unwrap() {
            let vid = v["vid"].as_str().unwrap();
            let line = text_list
                .lines()
                .find(|l| l.split_whitespace().next() == Some(vid))
                .unwrap_or_else(|| panic!("[{n}] volume list has no {vid}:\n{text_list}"));
            assert!(line.contains(v["type"].as_str().unwrap()), "[{n}] {line}");
        }
    }
}

#[test]
fn info_takes_short_ids_and_resolves_snapshots_of_snapshots() {
    for (n, w) in on_each_fs(|fs| Work::new(fs, "cli-info")) {
        let info = w.info("work:private");
        assert_eq!(info["vid"], "appvms/work/private", "[{n}] {info}");
        assert_eq!(info["type"], "origin", "[{n}] {info}");
        let image = s(&w.pool.join("appvms/work/private.img"));
        assert_eq!(info["image"], image.as_str(), "[{n}] {info}");
        assert!(info["usage"].is_object(), "[{n}] info has usage: {info}");
        let disp = w.info("disp1:root");
        assert_eq!(disp["source"], "appvms/work/root", "[{n}] {disp}");
        let resolved = &disp["resolved_source"];
        assert_eq!(resolved, "vm-templates/tpl/root", "[{n}] {disp}");
        let t = w.ok("volume info tpl:root");
        let has =
            |key: &str, value: &str| t.lines().any(|l| l.starts_with(key) && l.ends_with(value));
        assert!(has("vid:", "vm-templates/tpl/root"), "[{n}] {t}");
        assert!(has("type:", "origin"), "[{n}] {t}");
        let revisions = w.ok("volume revisions work:private");
        assert_eq!(revisions, "no revisions\n", "[{n}]");
    }
}

#[test]
fn resize_grows_does_nothing_at_the_same_size_and_shrinks_only_when_allowed() {
    for (n, (w, _)) in on_each_fs(|fs| Work::imported(fs, "cli-resize")) {
        let said = w.ok("volume resize appvms/work/private 2M");
        assert!(said.contains(&(2 * MIB).to_string()), "[{n}] {said}");
        assert_eq!(w.info("appvms/work/private")["size"], 2 * MIB_U, "[{n}]");
        let mut grown = w.b.clone();
        grown.resize(2 * MIB, 0);
        let after = w.export("appvms/work/private", None);
        assert!(after == grown, "[{n}] after growing");
        let before = tree_nodes(&w.dir);
        let said = w.ok("volume resize appvms/work/private 2048K");
        assert!(said.contains("nothing to do"), "[{n}] {said}");
        let what = format!("[{n}] same-size resize");
        assert_same_tree(&before, &tree_nodes(&w.dir), &what);
        let line = w.refused("volume resize appvms/work/private 1M", ErrorClass::Refused);
        assert!(line.contains("--allow-shrink"), "[{n}] {line}");
        w.ok("volume resize appvms/work/private 1M --allow-shrink");
        assert_eq!(w.info("appvms/work/private")["size"], MIB_U, "[{n}]");
        let after = w.export("appvms/work/private", None);
        assert!(after == w.b, "[{n}] after shrinking");
        w.ok("volume resize appvms/work/volatile 1M");
        assert_eq!(w.info("appvms/work/volatile")["size"], MIB_U, "[{n}]");
        let ids = w.revision_ids("appvms/work/private");
        assert_eq!(ids, ["1", "2"], "[{n}] resize adds no revision");
    }
}

#[test]
fn set_changes_rw_and_revisions_to_keep_and_lowering_it_prunes_at_once() {
    for (n, (w, _)) in on_each_fs(|fs| Work::imported(fs, "cli-set")) {
        w.ok("volume set appvms/work/private revisions_to_keep 3");
        let info = w.info("appvms/work/private");
        assert_eq!(info["revisions_to_keep"], 3, "[{n}]");
        w.ok("volume set work:private rw false");
        assert_eq!(w.info("appvms/work/private")["rw"], false, "[{n}]");
        w.refused("volume resize appvms/work/private 2M", ErrorClass::Refused);
        let import = ["volume", "import", "appvms/work/private", &w.a_file];
        w.refused(import, ErrorClass::Refused);
        w.ok("volume set appvms/work/private rw true");
        assert_eq!(w.info("appvms/work/private")["rw"], true, "[{n}]");
        // Lowering revisions_to_keep prunes at once, oldest first.
        w.ok("volume set appvms/work/private revisions_to_keep 1");
        assert_eq!(w.revision_ids("appvms/work/private"), ["2"], "[{n}]");
        assert!(w.export("appvms/work/private", Some("2")) == w.a, "[{n}]");
    }
}

/// A pool where `appvms/work/private` holds `b` grown to 3 MiB (returned),
/// and the template's root holds `a`.
fn three_mib(fs: &TestFs, test: &str) -> (Work, Vec<u8>) {
    let (w, _) = Work::imported(fs, test);
    w.ok("volume resize appvms/work/private 3M");
    w.import_template();
    let mut content = w.b.clone();
    content.resize(3 * MIB, 0);
    (w, content)
}

#[test]
fn clone_within_a_pool_takes_the_source_size_and_keeps_the_old_image_as_a_revision() {
    for (n, (w, content)) in on_each_fs(|fs| three_mib(fs, "cli-clone")) {
        w.ok("volume clone appvms/work/private appvms/work2/private");
        let c = w.info("appvms/work2/private");
        assert_eq!(
            (c["size"].as_u64(), c["type"].as_str()),
            (Some(3 * MIB_U), Some("origin")),
            "[{n}] {c}"
        );
        assert!(
            w.export("appvms/work2/private", None) == content,
            "[{n}] clone"
        );
        w.ok("volume create appvms/work3/private --size 4M");
        w.ok("volume clone work:private appvms/work3/private");
        let size = &w.info("appvms/work3/private")["size"];
        assert_eq!(size, 3 * MIB_U, "[{n}] clone into an existing volume");
        assert!(w.export("appvms/work3/private", None) == content, "[{n}]");
        let ids = w.revision_ids("appvms/work3/private");
        assert_eq!(ids, ["1"], "[{n}] its old image is a revision");
        // A snapshot clones its source's data, at its source's size.
        w.ok("volume clone appvms/work/root appvms/work4/root");
        assert!(w.export("appvms/work4/root", None) == w.a, "[{n}]");
        let onto_itself = "volume clone appvms/work/private appvms/work/private";
        w.refused(onto_itself, ErrorClass::Refused);
        let onto_volatile = "volume clone appvms/work/private appvms/work/volatile";
        w.refused(onto_volatile, ErrorClass::Refused);
    }
}

/// To a second pool, on another filesystem when there is one.
#[test]
fn clone_to_another_pool_makes_or_replaces_the_volume_there_only() {
    for (n, (w, content)) in on_each_fs(|fs| three_mib(fs, "cli-clone-to")) {
        let fs2 = common::other_fs(&w.fs);
        let fx2 = Fx::new(&fs2, "cli-clone-to-second");
        let n = format!("{n} -> {}", fs2.name);
        let to_pool = s(&fx2.pool);
        let to = |src: &str, dst: &str| {
            let args = ["volume", "clone", src, dst, "--to-pool", &to_pool];
            w.ok(args)
        };
        let said = to("appvms/work/private", "appvms/work/private");
        assert!(said.contains(&to_pool), "[{n}] {said}");
        let size = &fx2.info("appvms/work/private")["size"];
        assert_eq!(size, 3 * MIB_U, "[{n}]");
        let there = fx2.export("appvms/work/private", None);
        assert!(there == content, "[{n}] clone to another pool");
        fx2.ok("volume create appvms/other/private --size 8M");
        to("tpl:root", "appvms/other/private");
        assert_eq!(fx2.info("appvms/other/private")["size"], MIB_U, "[{n}]");
        assert!(fx2.export("appvms/other/private", None) == w.a, "[{n}]");
        assert!(
            listed(&w.json("volume list"), "appvms/other/private").is_none(),
            "[{n}] --to-pool created the clone in the source pool"
        );
        assert_eq!(fx2.ok("pool check"), "no problems found\n", "[{n}]");
    }
}

#[test]
fn remove_deletes_files_and_config_and_refuses_a_source_with_dependants() {
    for (n, w) in on_each_fs(|fs| Work::new(fs, "cli-remove")) {
        w.ok("volume clone appvms/work/private appvms/work2/private");
        w.ok("volume remove appvms/work2/private");
        w.refused("volume info appvms/work2/private", ErrorClass::NotFound);
        assert!(
            !w.pool.join("appvms/work2").exists(),
            "[{n}] the empty VM directory stays"
        );
        assert!(
            !w.pool.join(".reflinkfs/volumes/appvms/work2").exists(),
            "[{n}] the config stays"
        );
        w.refused("volume remove appvms/work2/private", ErrorClass::NotFound);
        let line = w.refused("volume remove vm-templates/tpl/root", ErrorClass::Refused);
        assert!(
            line.contains("appvms/work/root"),
            "[{n}] the error should name the dependant: {line}"
        );
        for vid in [
            "appvms/disp1/root",
            "appvms/work/root",
            "vm-templates/tpl/root",
            "appvms/work/private",
        ] {
            w.ok(["volume", "remove", vid]);
        }
        assert!(!w.pool.join("vm-templates/tpl").exists(), "[{n}]");
        let files: Vec<String> = std::fs::read_dir(w.pool.join("appvms/work"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            files.iter().all(|f| f.starts_with("data")),
            "[{n}] remove left {files:?}"
        );
        assert_eq!(w.ok("pool check"), "no problems found\n", "[{n}]");
    }
}

/// Clone into an existing volume is "committed as an import of DST"
/// (SPEC §5), and import refuses a volume with rw=false.
#[test]
fn clone_into_a_read_only_volume_is_refused() {
    for (n, (fx, data)) in on_each_fs(|fs| populated(fs, "cli-clone-ro")) {
        fx.ok("volume create appvms/ro/private --size 1M --read-only");
        assert_eq!(fx.info("appvms/ro/private")["rw"], false, "[{n}]");
        let import = ["volume", "import", "appvms/ro/private", &data];
        fx.refused(import, ErrorClass::Refused);
        let clone = "volume clone appvms/vm/private appvms/ro/private";
        fx.refused(clone, ErrorClass::Refused);
    }
}
