//! `reflinkfs pool adopt` (issue 4, item 4): existing Qubes `file-reflink`
//! and `file` pool directories are brought under management in place, from
//! qubes.xml or by inference from the file names, on every scratch
//! filesystem of `REFLINKFS_TEST_FS`. The adopted pools are then used
//! through the CLI and through a real mount, and bad input is shown to
//! change nothing at all.

use crate::common;

use common::cli::*;
use common::mount::{open_rw, require, Mounted};
use common::need;
use common::tree::{assert_same_tree, tree_metadata};
use common::{pattern, s, scratch_dir, TestFs, MIB};
use reflinkfs::engine::adopt::{adopt, AdoptOptions, ConfigFrom, ADOPT_DIR};
use reflinkfs::engine::{Pool, VolumeKind};
use reflinkfs::ErrorClass;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------
// Helpers.

/// `--setup-check=no` where the filesystem has no reflinks.
fn setup_check(fs: &TestFs) -> &'static str {
    if fs.reflink {
        "--setup-check=yes"
    } else {
        "--setup-check=no"
    }
}

/// The words of `pool adopt EXTRA`, with the `--setup-check` of `fs`.
fn adopt_args<'a>(fs: &TestFs, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["pool", "adopt"];
    args.extend(extra);
    args.push(setup_check(fs));
    args
}

/// Writes a file of `size` bytes with `data` at offset 0, mode `mode`.
fn put(path: &Path, size: u64, data: &[u8], mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    f.write_all_at(data, 0).unwrap();
    drop(f);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// An image of `size` bytes that starts with 8 KiB of pattern `tag`.
fn img(path: &Path, size: u64, tag: u8, mode: u32) {
    put(path, size, &pattern(tag, 8192), mode);
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Asserts that nothing below `root` changed since `before`, a
/// [`tree_metadata`] of it.
#[track_caller]
fn assert_unchanged(before: &BTreeMap<String, String>, root: &Path, ctx: &str) {
    assert_same_tree(before, &tree_metadata(root), ctx);
}

fn volume<'a>(report: &'a Value, vid: &str) -> &'a Value {
    report["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vid"] == vid)
        .unwrap_or_else(|| panic!("no volume {vid} in {report:#}"))
}

/// The values of `key` in a JSON array of objects.
fn column<'a>(rows: &'a Value, key: &str) -> Vec<&'a str> {
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| r[key].as_str().unwrap())
        .collect()
}

fn ids(revisions: &Value) -> Vec<&str> {
    column(revisions, "id")
}

// ---------------------------------------------------------------------------
// Synthetic Qubes trees.

const T_ROOT: u8 = 0x11;
const T_ROOT_REV3: u8 = 0x12;
const T_ROOT_LEGACY: u8 = 0x13;
const W_PRIV: u8 = 0x21;
const W_PRIV_REV: u8 = 0x22;
const W_PRIV_DIRTY: u8 = 0x23;
const T_PRIV: u8 = 0x31;

/// A Qubes 4.2 `file-reflink` pool directory: a template `fedora` and an
/// AppVM `work`, with revisions in both name forms, a precache copy, a
/// temporary file of an unfinished Qubes operation, a leftover dirty image
/// of an unclean stop, and Qubes' non-image files.
fn file_reflink_tree(p: &Path) {
    let t = p.join("vm-templates/fedora");
    img(&t.join("root.img"), 4 * MIB, T_ROOT, 0o600);
    let (rev3, legacy) = (
        "root.img.3@2024-01-01T00:00:00Z",
        "root.img@2023-12-01T00:00:00Z",
    );
    img(&t.join(rev3), 4 * MIB, T_ROOT_REV3, 0o600);
    img(&t.join(legacy), 4 * MIB, T_ROOT_LEGACY, 0o600);
    std::fs::copy(t.join("root.img"), t.join("root-precache.img")).unwrap();
    put(&t.join("private.img"), MIB, &pattern(T_PRIV, 4096), 0o600);
    put(&t.join("private.img~a1b2c3"), 4096, b"partial", 0o600);
    let w = p.join("appvms/work");
    img(&w.join("private.img"), 2 * MIB, W_PRIV, 0o664);
    let rev1 = "private.img.1@2024-02-01T00:00:00Z";
    img(&w.join(rev1), 2 * MIB, W_PRIV_REV, 0o600);
    img(&w.join("private-dirty.img"), 2 * MIB, W_PRIV_DIRTY, 0o600);
    put(&w.join("firewall.xml"), 10, b"<firewall/>", 0o644);
}

/// The device-mapper copy-on-write files of [`file_driver_tree`].
const COW_FILES: [&str; 5] = [
    "vm-templates/fedora/root-cow.img",
    "vm-templates/fedora/root-cow.img.old",
    "vm-templates/fedora/private-cow.img",
    "appvms/work/private-cow.img",
    "appvms/work/root-cow.img",
];

/// A Qubes `file` driver pool directory (Qubes 4.0): images with their
/// device-mapper copy-on-write files.
fn file_driver_tree(p: &Path) {
    let t = p.join("vm-templates/fedora");
    img(&t.join("root.img"), 4 * MIB, T_ROOT, 0o664);
    put(&t.join("private.img"), MIB, &pattern(T_PRIV, 4096), 0o664);
    img(&p.join("appvms/work/private.img"), 2 * MIB, W_PRIV, 0o664);
    for cow in COW_FILES {
        put(&p.join(cow), MIB, b"SnAp", 0o664);
    }
    let volatile = p.join("appvms/work/volatile.img");
    put(&volatile, 8 * MIB, b"old volatile data", 0o664);
}

/// A [`file_reflink_tree`] at `p`, with the AppVMs of a [`file_driver_tree`]
/// (made beside it) under the class `class`.
fn both_trees(p: &Path, class: &str) {
    file_reflink_tree(p);
    let other = p.with_file_name(class);
    file_driver_tree(&other);
    std::fs::rename(other.join("appvms"), p.join(class)).unwrap();
}

/// A scratch directory on `fs` and in it the directory `pool`, which
/// `tree` fills.
fn tree_at(fs: &TestFs, test: &str, tree: impl FnOnce(&Path)) -> (PathBuf, PathBuf) {
    let dir = scratch_dir(fs, test);
    let p = dir.join("pool");
    tree(&p);
    (dir, p)
}

/// An [`xml_tree`] with its [`qubes_xml`] beside it, adopted from that;
/// returns the directory, the pool, and the report of the adopt.
fn adopted_from_xml(fs: &TestFs, test: &str) -> (PathBuf, PathBuf, Value) {
    let (dir, p) = tree_at(fs, test, xml_tree);
    let xml = dir.join("qubes.xml");
    std::fs::write(&xml, qubes_xml(&s(&p))).unwrap();
    let report = rf_json(&p, adopt_args(fs, &["--qubes-xml", &s(&xml)]));
    (dir, p, report)
}

// ---------------------------------------------------------------------------
// 1. Inferred configs, both drivers.

#[test]
fn a_file_reflink_tree_is_adopted_in_place_with_revisions_in_both_name_forms() {
    for fs in common::filesystems() {
        let ctx = format!("[{}]", fs.name);
        let (_, p) = tree_at(&fs, "adopt-reflink", file_reflink_tree);
        let t = p.join("vm-templates/fedora");
        let w = p.join("appvms/work");
        let root_ino = std::fs::metadata(t.join("root.img")).unwrap().ino();
        let priv_ino = std::fs::metadata(w.join("private.img")).unwrap().ino();

        let report = rf_json(&p, adopt_args(&fs, &[]));
        assert_eq!(report["dry_run"], false, "{ctx}");
        assert_eq!(report["mode"], if fs.reflink { "reflink" } else { "copy" });

        // The template's root: an origin, by name, with both revisions.
        let root = volume(&report, "vm-templates/fedora/root");
        assert_eq!(root["type"], "origin", "{ctx}");
        assert_eq!(root["from"], "inferred", "{ctx}");
        assert!(root["guess"].as_str().unwrap().contains("template's root"));
        assert_eq!(root["size"], 4 * MIB, "{ctx}");
        assert_eq!(root["next_revision"], 4, "{ctx}: above every K found");
        assert_eq!(
            ids(&root["revisions"]),
            ["@2023-12-01T00:00:00Z", "3"],
            "{ctx}"
        );
        // As many revisions are kept as were found.
        assert_eq!(root["revisions_to_keep"], 2, "{ctx}");
        // private volumes: origins, by name.
        let tp = volume(&report, "vm-templates/fedora/private");
        assert_eq!(tp["type"], "origin");
        assert!(tp["guess"].as_str().unwrap().contains("private"));
        // The AppVM's root has no image of its own: it cannot be inferred.
        let na = report["not_adopted"].as_array().unwrap();
        assert!(
            na.iter().all(|n| n["vid"] != "appvms/work/root"),
            "{ctx}: no file of appvms/work/root exists, so it is not even seen"
        );

        // Removed: the precache copy and the Qubes temp file; recovery
        // committed the dirty image; modes narrowed to 0600.
        let removed = column(&report["removed"], "path");
        assert!(removed
            .iter()
            .any(|r| r.ends_with("fedora/root-precache.img")));
        assert!(removed
            .iter()
            .any(|r| r.ends_with("fedora/private.img~a1b2c3")));
        assert!(!t.join("private.img~a1b2c3").exists());
        // Qubes' precache went; in a reflink pool reflinkfs made its own,
        // recorded in the volume's config (copy mode keeps none).
        let root_cfg: Value = serde_json::from_slice(&read(
            &p.join(".reflinkfs/volumes/vm-templates/fedora/root.json"),
        ))
        .unwrap();
        assert_eq!(t.join("root-precache.img").exists(), fs.reflink, "{ctx}");
        assert_eq!(root_cfg.get("precache").is_some(), fs.reflink, "{ctx}");
        if fs.reflink {
            assert_eq!(
                read(&t.join("root-precache.img")),
                read(&t.join("root.img"))
            );
        }
        assert!(report["recovery"][0]["path"]
            .as_str()
            .unwrap()
            .ends_with("appvms/work/private-dirty.img"));
        assert!(report["problems"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["path"].as_str().unwrap().ends_with("firewall.xml")));
        assert!(
            w.join("firewall.xml").exists(),
            "{ctx}: not ours, left alone"
        );

        // No data was copied: the same inodes, the same bytes.
        assert_eq!(
            std::fs::metadata(t.join("root.img")).unwrap().ino(),
            root_ino
        );
        assert_eq!(
            read(&t.join("root.img"))[..8192],
            pattern(T_ROOT, 8192)[..],
            "{ctx}"
        );
        assert_eq!(
            read(&t.join("root.img.3@2024-01-01T00:00:00Z"))[..8192],
            pattern(T_ROOT_REV3, 8192)[..]
        );
        assert_eq!(
            read(&t.join("root.img@2023-12-01T00:00:00Z"))[..8192],
            pattern(T_ROOT_LEGACY, 8192)[..]
        );
        // The leftover dirty image was committed: its data is the image,
        // and the previous image (same inode) is the new revision 2.
        let w_priv = read(&w.join("private.img"));
        assert_eq!(w_priv.len() as u64, 2 * MIB);
        assert_eq!(w_priv[..8192], pattern(W_PRIV_DIRTY, 8192)[..], "{ctx}");
        assert!(!w.join("private-dirty.img").exists());

        // The CLI sees the adopted pool.
        let list = rf_json(&p, "volume list");
        assert_eq!(
            column(&list, "vid"),
            [
                "appvms/work/private",
                "vm-templates/fedora/private",
                "vm-templates/fedora/root"
            ],
            "{ctx}"
        );
        assert!(list
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["state"] == "stopped"));
        let revs = rf_json(&p, "volume revisions vm-templates/fedora/root");
        assert_eq!(ids(&revs), ["@2023-12-01T00:00:00Z", "3"], "{ctx}");
        let revs = rf_json(&p, "volume revisions work:private");
        assert_eq!(ids(&revs), ["1", "2"], "{ctx}");
        let rev2 = revs[1]["file_name"].as_str().unwrap();
        assert_eq!(
            std::fs::metadata(w.join(rev2)).unwrap().ino(),
            priv_ino,
            "{ctx}: the old image became revision 2 by a link, not a copy"
        );
        assert_eq!(read(&w.join(rev2))[..8192], pattern(W_PRIV, 8192)[..]);
        for f in ["private.img", rev2, "private.img.1@2024-02-01T00:00:00Z"] {
            let mode = std::fs::metadata(w.join(f)).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o600, "{ctx}: {f}");
        }

        // A commit through the engine: K goes on from 4.
        let pool = Pool::open(&p).unwrap();
        let v = common::vid("vm-templates/fedora/root");
        common::write_cycle(&pool, &v, 0, &pattern(0x44, 4096));
        // revisions_to_keep=2 was inferred from the two found; the commit
        // adds 4 and prunes the oldest, the legacy one.
        assert_eq!(common::revision_ids(&pool, &v), ["3", "4"], "{ctx}");
        drop(pool);

        // A second adopt is refused.
        rf_fails(&p, "pool adopt", ErrorClass::Exists);
    }
}

#[test]
fn a_file_driver_tree_loses_its_cow_files_and_nothing_else() {
    for fs in common::filesystems() {
        let ctx = format!("[{}]", fs.name);
        let (_, p) = tree_at(&fs, "adopt-file", file_driver_tree);
        let before: BTreeMap<PathBuf, Vec<u8>> = [
            "vm-templates/fedora/root.img",
            "vm-templates/fedora/private.img",
            "appvms/work/private.img",
        ]
        .iter()
        .map(|f| (PathBuf::from(f), read(&p.join(f))))
        .collect();

        let text = rf_ok(&p, adopt_args(&fs, &[]));
        assert!(text.contains("adopted"), "{ctx}: {text}");
        assert!(
            text.contains("guess: a template's root volume is an origin"),
            "{text}"
        );
        assert!(
            text.contains("appvms/work/root: a root volume outside vm-templates"),
            "{ctx}: the AppVM's root cannot be inferred, and says so: {text}"
        );
        for cow in COW_FILES {
            assert!(!p.join(cow).exists(), "{ctx}: {cow} is removed");
            assert!(
                text.contains(&format!("{cow}: a copy-on-write leftover")),
                "{ctx}: {cow} is reported: {text}"
            );
        }
        // The volatile volume's image of the file driver is dropped too.
        assert!(!p.join("appvms/work/volatile.img").exists());
        for (f, bytes) in &before {
            assert_eq!(&read(&p.join(f)), bytes, "{ctx}: {} unchanged", f.display());
        }

        let list = rf_json(&p, "volume list");
        let got: Vec<(String, String, u64)> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["vid"].as_str().unwrap().to_owned(),
                    v["type"].as_str().unwrap().to_owned(),
                    v["size"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("appvms/work/private".into(), "origin".into(), 2 * MIB),
                ("appvms/work/volatile".into(), "volatile".into(), 8 * MIB),
                ("vm-templates/fedora/private".into(), "origin".into(), MIB),
                ("vm-templates/fedora/root".into(), "origin".into(), 4 * MIB),
            ],
            "{ctx}"
        );
        // The file driver's 0664 images are now 0600, and the pool checks
        // clean.
        let mode = std::fs::metadata(p.join("appvms/work/private.img"))
            .unwrap()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{ctx}");
        rf_ok(&p, "pool check");
    }
}

// ---------------------------------------------------------------------------
// 2. qubes.xml.

/// A qubes.xml modelled on Qubes 4.2's: the file-reflink pool
/// `varlibqubes` at `dir_path`, the kernel pool and an LVM pool, a template
/// `fedora`, an AppVM `work` based on it, a disposable-VM template
/// `fedora-dvm`, a disposable `disp42` (its root's source is the template's
/// root, as Qubes writes it), a qube `chain` whose root's source is a
/// snapshot (work's root), and a qube `elsewhere` in the LVM pool.
fn qubes_xml(dir_path: &str) -> String {
    let volume = |name: &str, pool: &str, vid: &str, size: u64, attrs: &str| {
        format!(
            r#"        <volume name="{name}" pool="{pool}" vid="{vid}" size="{size}" {attrs}/>"#
        )
    };
    // A volume of the file-reflink pool, named by the last part of its vid.
    let l = |vid: &str, size: u64, attrs: &str| {
        let name = vid.rsplit('/').next().unwrap();
        volume(name, "varlibqubes", vid, size, attrs)
    };
    let origin_attrs = |keep: u32| {
        format!(r#"rw="True" save_on_stop="True" snap_on_start="False" revisions_to_keep="{keep}""#)
    };
    let origin = |vid: &str, mib: u64, keep: u32| l(vid, mib * MIB, &origin_attrs(keep));
    let volatile = |vid: &str| {
        let attrs = r#"rw="True" save_on_stop="False" snap_on_start="False" revisions_to_keep="0""#;
        l(vid, 8 * MIB, attrs)
    };
    let snap = |vid: &str, mib: u64, src: &str, keep: u32| {
        let attrs = format!(
            r#"rw="True" save_on_stop="False" snap_on_start="True" source="{src}" revisions_to_keep="{keep}""#
        );
        l(vid, mib * MIB, &attrs)
    };
    let kernel = r#"        <volume name="kernel" pool="linux-kernel" vid="6.6.48-1.fc37" revisions_to_keep="0" rw="False" save_on_stop="False" snap_on_start="False"/>"#;
    let domain = |id: u32, class: &str, name: &str, vols: Vec<String>| {
        format!(
            r#"    <domain id="domain-{id}" class="{class}">
      <properties>
        <property name="qid">{id}</property>
        <property name="name">{name}</property>
        <property name="label" ref="label-1"/>
      </properties>
      <features/>
      <devices class="pci"/>
      <tags/>
      <volume-config>
{}
{kernel}
      </volume-config>
    </domain>
"#,
            vols.join("\n")
        )
    };
    let tpl_root = "vm-templates/fedora/root";
    let fedora = vec![
        origin(tpl_root, 4, 1),
        origin("vm-templates/fedora/private", 1, 0),
        volatile("vm-templates/fedora/volatile"),
    ];
    let work = vec![
        // Qubes' pools default revisions_to_keep applies to the snapshot
        // too; adopt forces it to 0.
        snap("appvms/work/root", 4, tpl_root, 1),
        origin("appvms/work/private", 2, 2),
        volatile("appvms/work/volatile"),
    ];
    let dvm_private =
        r#"rw="False" save_on_stop="True" snap_on_start="False" revisions_to_keep="1""#;
    let fedora_dvm = vec![
        snap("appvms/fedora-dvm/root", 4, tpl_root, 0),
        l("appvms/fedora-dvm/private", MIB, dvm_private),
        volatile("appvms/fedora-dvm/volatile"),
    ];
    let disp42 = vec![
        snap("appvms/disp42/root", 4, tpl_root, 0),
        snap("appvms/disp42/private", 1, "appvms/fedora-dvm/private", 0),
        volatile("appvms/disp42/volatile"),
    ];
    let chain = vec![snap("appvms/chain/root", 4, "appvms/work/root", 0)];
    let lvm_vid = "qubes_dom0/vm-elsewhere-private";
    let elsewhere = vec![volume(
        "private",
        "vm-pool",
        lvm_vid,
        2 * MIB,
        &origin_attrs(2),
    )];
    let domains = [
        domain(1, "TemplateVM", "fedora", fedora),
        domain(2, "AppVM", "work", work),
        domain(3, "AppVM", "fedora-dvm", fedora_dvm),
        domain(4, "DispVM", "disp42", disp42),
        domain(5, "DispVM", "chain", chain),
        domain(6, "AppVM", "elsewhere", elsewhere),
    ]
    .concat();
    format!(
        r#"<?xml version='1.0' encoding='UTF-8'?>
<qubes version="3.0">
  <labels>
    <label id="label-1" color="0xcc0000">red</label>
  </labels>
  <pools>
    <pool dir_path="{dir_path}" driver="file-reflink" name="varlibqubes" revisions_to_keep="1" setup_check="no"/>
    <pool dir_path="/var/lib/qubes/vm-kernels" driver="linux-kernel" name="linux-kernel"/>
    <pool driver="lvm_thin" name="vm-pool" revisions_to_keep="2" thin_pool="vm-pool" volume_group="qubes_dom0"/>
  </pools>
  <properties>
    <property name="default_pool">varlibqubes</property>
  </properties>
  <domains>
    <domain id="domain-0" class="AdminVM">
      <properties>
        <property name="name">dom0</property>
      </properties>
    </domain>
{domains}  </domains>
</qubes>
"#
    )
}

/// The images a stopped Qubes system has for the VMs of [`qubes_xml`].
fn xml_tree(p: &Path) {
    let t = p.join("vm-templates/fedora");
    img(&t.join("root.img"), 4 * MIB, T_ROOT, 0o600);
    let rev7 = "root.img.7@2024-03-01T10:00:00Z";
    img(&t.join(rev7), 4 * MIB, T_ROOT_REV3, 0o600);
    put(&t.join("private.img"), MIB, &pattern(T_PRIV, 4096), 0o600);
    img(&p.join("appvms/work/private.img"), 2 * MIB, W_PRIV, 0o600);
    put(&p.join("appvms/fedora-dvm/private.img"), MIB, b"dvm", 0o600);
    std::fs::create_dir_all(p.join("appvms/disp42")).unwrap();
}

#[test]
fn qubes_xml_gives_the_configs_sources_and_sizes() {
    for fs in common::filesystems() {
        let ctx = format!("[{}]", fs.name);
        let (_, p, report) = adopted_from_xml(&fs, "adopt-xml");
        assert_eq!(report["xml_pools"][0]["name"], "varlibqubes", "{ctx}");
        assert_eq!(report["xml_pools"][0]["matched_by"], "dir_path", "{ctx}");
        assert_eq!(report["revisions_to_keep"], 1);
        assert_eq!(
            column(&report["volumes"], "vid"),
            [
                "appvms/chain/root",
                "appvms/disp42/private",
                "appvms/disp42/root",
                "appvms/disp42/volatile",
                "appvms/fedora-dvm/private",
                "appvms/fedora-dvm/root",
                "appvms/fedora-dvm/volatile",
                "appvms/work/private",
                "appvms/work/root",
                "appvms/work/volatile",
                "vm-templates/fedora/private",
                "vm-templates/fedora/root",
                "vm-templates/fedora/volatile",
            ],
            "{ctx}: every volume of varlibqubes, none of the kernel or LVM pools"
        );
        assert!(report["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["from"] == "qubes-xml" && v["guess"].is_null()));
        assert_eq!(volume(&report, "appvms/work/root")["qube"], "work");
        assert!(volume(&report, "appvms/work/root")["notes"][0]
            .as_str()
            .unwrap()
            .contains("revisions_to_keep=1"));
        assert!(
            report["problems"].as_array().unwrap().is_empty(),
            "{ctx}: {report:#}"
        );

        // vid, type, source, resolved_source, size in MiB, rw,
        // revisions_to_keep; `-` for no source.
        let want = [
            "vm-templates/fedora/root origin - - 4 true 1",
            "vm-templates/fedora/private origin - - 1 true 0",
            "vm-templates/fedora/volatile volatile - - 8 true 0",
            "appvms/work/root snapshot vm-templates/fedora/root vm-templates/fedora/root 4 true 0",
            "appvms/work/private origin - - 2 true 2",
            "appvms/work/volatile volatile - - 8 true 0",
            "appvms/fedora-dvm/root snapshot vm-templates/fedora/root vm-templates/fedora/root 4 true 0",
            "appvms/fedora-dvm/private origin - - 1 false 1",
            "appvms/fedora-dvm/volatile volatile - - 8 true 0",
            "appvms/disp42/root snapshot vm-templates/fedora/root vm-templates/fedora/root 4 true 0",
            "appvms/disp42/private snapshot appvms/fedora-dvm/private appvms/fedora-dvm/private 1 true 0",
            "appvms/disp42/volatile volatile - - 8 true 0",
            // A chain: the source is a snapshot, resolved down to the origin.
            "appvms/chain/root snapshot appvms/work/root vm-templates/fedora/root 4 true 0",
        ];
        for row in want {
            let w: Vec<&str> = row.split(' ').collect();
            let vid = w[0];
            let source = |s: &'static str| (s != "-").then_some(s);
            let info = rf_json(&p, ["volume", "info", vid]);
            let c = format!("{ctx} {vid}");
            assert_eq!(info["type"], w[1], "{c}");
            assert_eq!(info["source"].as_str(), source(w[2]), "{c}");
            assert_eq!(info["resolved_source"].as_str(), source(w[3]), "{c}");
            assert_eq!(info["size"], w[4].parse::<u64>().unwrap() * MIB, "{c}");
            assert_eq!(info["rw"], w[5] == "true", "{c}");
            assert_eq!(
                info["revisions_to_keep"],
                w[6].parse::<i64>().unwrap(),
                "{c}"
            );
            assert_eq!(info["state"], "stopped", "{c}");
        }
        let info = rf_json(&p, "volume info vm-templates/fedora/root");
        assert_eq!(info["next_revision"], 8, "{ctx}");
        assert_eq!(ids(&info["revisions"]), ["7"]);
        // The config file is what the engine writes.
        let cfg: Value =
            serde_json::from_slice(&read(&p.join(".reflinkfs/volumes/appvms/disp42/root.json")))
                .unwrap();
        assert_eq!(cfg["format"], 1);
        assert_eq!(cfg["source"], "vm-templates/fedora/root");
        assert_eq!(cfg["snap_on_start"], true);
        assert_eq!(cfg["save_on_stop"], false);
    }
}

#[test]
fn qubes_xml_of_a_pool_whose_directory_moved_is_matched_by_its_images() {
    let fs = common::filesystems().remove(0);
    let (dir, p) = tree_at(&fs, "adopt-xml-moved", xml_tree);
    let xml = dir.join("qubes.xml");
    std::fs::write(&xml, qubes_xml("/var/lib/qubes")).unwrap();
    let opts = AdoptOptions {
        qubes_xml: Some(xml.clone()),
        dry_run: true,
        setup_check: fs.reflink,
    };
    let before = tree_metadata(&p);
    let report = adopt(&p, &opts).unwrap();
    assert_unchanged(&before, &p, "dry run");
    assert_eq!(report.xml_pools.len(), 1);
    assert_eq!(report.xml_pools[0].name, "varlibqubes");
    assert_eq!(report.xml_pools[0].matched_by, "images");
    assert!(report.warnings[0].contains("no pool in qubes.xml has dir_path"));
    assert_eq!(report.volumes.len(), 13);
    assert!(report
        .volumes
        .iter()
        .all(|v| v.from == ConfigFrom::QubesXml));
    let chain = report
        .volumes
        .iter()
        .find(|v| v.vid == "appvms/chain/root")
        .unwrap();
    assert_eq!(chain.kind, VolumeKind::Snapshot);
    assert_eq!(chain.source.as_deref(), Some("appvms/work/root"));

    // A qubes.xml whose pools have nothing here is refused.
    let other = dir.join("other.xml");
    std::fs::write(
        &other,
        qubes_xml("/var/lib/qubes")
            .replace("vid=\"appvms/", "vid=\"other/")
            .replace("vid=\"vm-templates/", "vid=\"other-templates/"),
    )
    .unwrap();
    let other = s(&other);
    let args = adopt_args(&fs, &["--qubes-xml", &other, "--dry-run"]);
    let out = rf_fails(&p, args, ErrorClass::InvalidInput);
    assert!(out.contains("names no file-reflink or file pool"), "{out}");
    assert_unchanged(&before, &p, "refused");
}

// ---------------------------------------------------------------------------
// 3. The adopted pool mounts, and its volumes start and stop.

#[test]
fn an_adopted_pool_mounts_and_its_volumes_start_and_stop() {
    need!(require(&[]));
    for fs in common::filesystems() {
        let ctx = format!("[{}]", fs.name);
        let (dir, p, _) = adopted_from_xml(&fs, "adopt-mount");
        let m = Mounted::mount(&p, &dir.join("mnt"), "");

        // The AppVM's private volume: write through the mount, close, and a
        // new revision holds the old data.
        let rel = "appvms/work/private-dirty.img";
        let f = open_rw(&m.path(rel));
        assert_eq!(common::read_at(&f, 0, 8192), pattern(W_PRIV, 8192), "{ctx}");
        f.write_all_at(&pattern(0x55, 8192), 0).unwrap();
        drop(f);
        m.wait_stopped(rel);
        let through = File::open(m.path("appvms/work/private.img")).unwrap();
        assert_eq!(
            common::read_at(&through, 0, 8192),
            pattern(0x55, 8192),
            "{ctx}"
        );
        drop(through);
        let revs: Vec<String> = std::fs::read_dir(p.join("appvms/work"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("private.img."))
            .collect();
        assert_eq!(revs.len(), 1, "{ctx}: {revs:?}");
        assert!(revs[0].starts_with("private.img.1@"), "{ctx}: {revs:?}");
        assert_eq!(
            read(&p.join("appvms/work").join(&revs[0]))[..8192],
            pattern(W_PRIV, 8192)[..]
        );

        // The disposable's root: a snapshot of the template's root.
        let rel = "appvms/disp42/root-dirty.img";
        let f = open_rw(&m.path(rel));
        assert_eq!(common::read_at(&f, 0, 8192), pattern(T_ROOT, 8192), "{ctx}");
        f.write_all_at(b"scratch", 0).unwrap();
        drop(f);
        m.wait_stopped(rel);
        assert!(
            !p.join("appvms/disp42/root-dirty.img").exists(),
            "{ctx}: discarded"
        );
        // The chain's root also starts from the template's root.
        let rel = "appvms/chain/root-dirty.img";
        let f = File::open(m.path(rel)).unwrap();
        assert_eq!(common::read_at(&f, 0, 8192), pattern(T_ROOT, 8192), "{ctx}");
        drop(f);
        m.wait_stopped(rel);

        // A volatile volume: empty at every start, discarded at stop.
        let rel = "appvms/work/volatile-dirty.img";
        for _ in 0..2 {
            let f = open_rw(&m.path(rel));
            assert_eq!(f.metadata().unwrap().len(), 8 * MIB, "{ctx}");
            assert_eq!(common::read_at(&f, 0, 4096), vec![0u8; 4096], "{ctx}");
            f.write_all_at(&pattern(0x66, 4096), 0).unwrap();
            drop(f);
            m.wait_stopped(rel);
        }
        m.unmount();
        rf_ok(&p, "pool check");
    }
}

// ---------------------------------------------------------------------------
// 4. Bad input changes nothing.

#[test]
fn a_dry_run_changes_nothing_and_shows_the_plan() {
    for fs in common::filesystems() {
        let ctx = format!("[{}]", fs.name);
        // Both trees in one: the file driver's under another class.
        let (dir, p) = tree_at(&fs, "adopt-dry", |p| both_trees(p, "legacy"));
        let before = tree_metadata(&dir);
        let text = rf_ok(&p, adopt_args(&fs, &["--dry-run"]));
        assert_unchanged(&before, &dir, &ctx);
        assert!(text.starts_with("dry run: "), "{ctx}: {text}");
        assert!(text.contains("nothing was changed"));
        assert!(text.contains("would remove"), "{text}");
        assert!(text.contains("legacy/work/private-cow.img"), "{text}");
        assert!(text.contains("recovery at the first open"), "{text}");
        let report = rf_json(&p, adopt_args(&fs, &["--dry-run"]));
        assert_unchanged(&before, &dir, &ctx);
        assert_eq!(report["dry_run"], true);
        assert_eq!(volume(&report, "legacy/work/private")["type"], "origin");
        assert!(report["problems"].as_array().unwrap().is_empty());
        // The plan is what the real run does.
        let real = rf_json(&p, adopt_args(&fs, &[]));
        assert_eq!(
            real["volumes"].as_array().unwrap().len(),
            report["volumes"].as_array().unwrap().len()
        );
        assert_eq!(real["removed"], report["removed"], "{ctx}");
        assert_eq!(real["not_adopted"], report["not_adopted"], "{ctx}");
    }
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    for fs in common::filesystems() {
        let ctx = format!("[{}]", fs.name);
        // The file driver's AppVMs under a class of their own, x/.
        let (dir, p) = tree_at(&fs, "adopt-bad", |p| both_trees(p, "x"));
        let outside = dir.join("outside.img");
        put(&outside, MIB, b"not in the pool", 0o644);

        // Not XML, not a qubes.xml, a missing file, and a malformed value
        // of a volume in this pool.
        let bad = dir.join("bad.xml");
        std::fs::write(&bad, "this is <not xml").unwrap();
        let html = dir.join("html.xml");
        std::fs::write(&html, "<html><body/></html>").unwrap();
        let broken = dir.join("broken.xml");
        std::fs::write(
            &broken,
            qubes_xml(&s(&p)).replacen(r#"size="2097152""#, r#"size="two megs""#, 1),
        )
        .unwrap();
        let before = tree_metadata(&dir);
        for (xml, class, says) in [
            (&bad, ErrorClass::Corrupt, "not valid XML"),
            (&html, ErrorClass::Corrupt, "not a qubes.xml"),
            (&dir.join("missing.xml"), ErrorClass::NotFound, ""),
            (&broken, ErrorClass::Corrupt, "size=\"two megs\""),
        ] {
            let e = rf_fails(&p, adopt_args(&fs, &["--qubes-xml", &s(xml)]), class);
            assert!(e.contains(says), "{ctx}: {e}");
        }
        assert_unchanged(&before, &dir, &format!("{ctx} bad qubes.xml"));

        // A missing directory, and reflinks where there are none.
        rf_fails(&dir.join("nope"), "pool adopt", ErrorClass::NotFound);
        if !fs.reflink {
            let e = rf_fails(&p, "pool adopt", ErrorClass::Unsupported);
            assert!(e.contains("--setup-check=no"), "{e}");
        }
        assert_unchanged(&before, &dir, &format!("{ctx} refused"));

        // A symlink planted as an image is never followed: refused, and
        // neither the tree nor its target changes.
        let link = p.join("appvms/work/evil.img");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        let before = tree_metadata(&dir);
        let e = rf_fails(&p, adopt_args(&fs, &[]), ErrorClass::Corrupt);
        assert!(
            e.contains("evil.img") && e.contains("never follows"),
            "{ctx}: {e}"
        );
        rf_fails(&p, adopt_args(&fs, &["--dry-run"]), ErrorClass::Corrupt);
        assert_unchanged(&before, &dir, &format!("{ctx} symlinked image"));
        std::fs::remove_file(&link).unwrap();
        // …and a symlink in place of a VM directory.
        std::os::unix::fs::symlink(dir.join("other"), p.join("appvms/linked")).unwrap();
        let before = tree_metadata(&dir);
        let e = rf_fails(&p, adopt_args(&fs, &[]), ErrorClass::Corrupt);
        assert!(e.contains("appvms/linked"), "{ctx}: {e}");
        assert_unchanged(&before, &dir, &format!("{ctx} symlinked VM directory"));
        std::fs::remove_file(p.join("appvms/linked")).unwrap();
        // A symlinked pool directory.
        let plink = dir.join("pool-link");
        std::os::unix::fs::symlink(&p, &plink).unwrap();
        rf_fails(&plink, adopt_args(&fs, &[]), ErrorClass::Corrupt);

        // An existing reflinkfs pool.
        let q = scratch_dir(&fs, "adopt-existing").join("pool");
        rf_ok(&q, ["pool", "init", setup_check(&fs)]);
        rf_ok(&q, "volume create appvms/a/private --size 1M");
        let q_before = tree_metadata(q.parent().unwrap());
        let e = rf_fails(&q, adopt_args(&fs, &[]), ErrorClass::Exists);
        assert!(e.contains("already a reflinkfs pool"), "{e}");
        rf_fails(&q, "pool adopt --dry-run", ErrorClass::Exists);
        let ctx_q = format!("{ctx} existing pool");
        assert_unchanged(&q_before, q.parent().unwrap(), &ctx_q);

        // After all that, the tree still adopts.
        rf_ok(&p, adopt_args(&fs, &[]));
        assert!(!p.join("x/work/private-cow.img").exists());
        assert_eq!(read(&outside)[..15], *b"not in the pool");
    }
}

#[test]
fn an_interrupted_adopt_is_cleaned_up_by_the_next_one() {
    let fs = common::filesystems().remove(0);
    let (_, p) = tree_at(&fs, "adopt-stale", file_driver_tree);
    // What a crash before the final rename leaves.
    let stale = p.join(ADOPT_DIR);
    std::fs::create_dir_all(stale.join("volumes/appvms/work")).unwrap();
    std::fs::write(stale.join("pool.json"), "{}").unwrap();
    std::fs::write(stale.join("lock"), "1\n").unwrap();
    std::fs::write(stale.join("volumes/appvms/work/private.json"), "{").unwrap();

    let opts = AdoptOptions {
        qubes_xml: None,
        dry_run: true,
        setup_check: fs.reflink,
    };
    // While another adopt holds its lock, the directory is not touched.
    {
        use std::os::fd::AsRawFd;
        let held = File::open(stale.join("lock")).unwrap();
        // SAFETY: flock on an open fd has no memory effects.
        assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX) }, 0);
        let before = tree_metadata(&p);
        for dry_run in [true, false] {
            let e = adopt(
                &p,
                &AdoptOptions {
                    dry_run,
                    ..opts.clone()
                },
            )
            .unwrap_err();
            assert_eq!(e.class(), ErrorClass::Busy, "{e}");
            assert!(e.to_string().contains("another adopt (process 1)"), "{e}");
        }
        assert_unchanged(&before, &p, "adopt in progress");
    }
    let report = adopt(&p, &opts).unwrap();
    assert!(stale.exists(), "a dry run leaves it");
    assert!(report.removed[0].reason.contains("interrupted adopt"));
    let report = adopt(
        &p,
        &AdoptOptions {
            dry_run: false,
            ..opts
        },
    )
    .unwrap();
    assert!(!stale.exists());
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let pool = Pool::open(&p).unwrap();
    assert_eq!(pool.vids().len(), 4);
}
