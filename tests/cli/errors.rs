//! Bad input: volume ids, sizes, revisions and properties that are
//! refused, with a clear message, before anything changes.

use super::*;

/// Volume ids that break SPEC §2.1, with why.
fn bad_vids() -> Vec<(String, &'static str)> {
    let long = "a".repeat(65);
    let mut v: Vec<(String, &'static str)> = [
        ("appvms/../private", "`..` as the VM"),
        ("../vm/private", "`..` as the class"),
        ("appvms/vm/..", "`..` as the name"),
        ("appvms/./private", "`.` as the VM"),
        ("appvms/vm/private/extra", "four components"),
        ("appvms/vm/private/", "a trailing slash"),
        ("/appvms/vm/private", "a leading slash"),
        ("appvms//private", "an empty VM"),
        ("appvms/vm", "two components"),
        ("private", "one component and no colon"),
        ("", "an empty vid"),
        ("appvms/vm/priv@1", "`@` in the name"),
        ("appvms/vm@1/private", "`@` in the VM"),
        (
            "appvms/vm/private.img@2024-01-01T00:00:00Z",
            "a legacy revision name",
        ),
        ("appvms/vm/priv~1", "`~` in the name"),
        ("appvms/vm/private.img~tmp", "a temporary file name"),
        ("appvms/vm/private-dirty", "the reserved suffix -dirty"),
        ("appvms/vm/private-import", "the reserved suffix -import"),
        (
            "appvms/vm/private-precache",
            "the reserved suffix -precache",
        ),
        ("appvms/vm/private-cow", "the reserved suffix -cow"),
        ("appvms/vm/private.img", "the reserved suffix .img"),
        ("appvms/vm/-private", "a name starting with -"),
        ("appvms/vm/.private", "a name starting with ."),
        ("appvms/vm/pri vate", "a space"),
        ("vm:..", "`..` as the name in VM:NAME"),
        ("..:private", "`..` as the VM in VM:NAME"),
        ("vm:priv@1", "`@` in VM:NAME"),
        ("vm:priv~1", "`~` in VM:NAME"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b))
    .collect();
    v.push((format!("appvms/vm/{long}"), "a 65-character name"));
    v.push((format!("appvms/{long}/private"), "a 65-character VM"));
    v.push((format!("{long}/vm/private"), "a 65-character class"));
    v.push((format!("vm:{long}"), "a 65-character name in VM:NAME"));
    v
}

/// Every command that takes a volume id, with `VID` in its place; `DATA`
/// is a file to import and `DEST` where to export.
const VID_COMMANDS: [&str; 16] = [
    "volume create VID --size 1M",
    "volume create VID --size 1M --volatile",
    "volume create VID --size 1M --snapshot-of appvms/vm/private",
    "volume create appvms/vm/snap2 --size 1M --snapshot-of VID",
    "volume info VID",
    "volume info VID --json",
    "volume remove VID",
    "volume revisions VID",
    "volume resize VID 2M",
    "volume revert VID",
    "volume set VID rw false",
    "volume import VID DATA",
    "volume export VID DEST",
    "volume clone VID appvms/vm2/private",
    "volume clone appvms/vm/private VID",
    "pool check --volume VID",
];

#[test]
fn bad_vids_are_refused_and_change_nothing() {
    for (n, (fx, data)) in on_each_fs(|fs| populated(fs, "cli-bad-vids")) {
        let dest = s(&fx.dir.join("export.img"));
        let invalid = ErrorClass::InvalidInput;
        for (vid, why) in bad_vids() {
            let vars = [("VID", vid.as_str()), ("DATA", &data), ("DEST", &dest)];
            for (args, line) in fx.all_refused(&VID_COMMANDS, &vars, invalid) {
                assert!(
                    line.contains("invalid volume id"),
                    "[{n}] {args} ({why}): the message should say the vid is invalid: {line}"
                );
            }
        }
        // Valid vids that name no volume: not found, nothing changes.
        let not_found = [
            "volume info appvms/vm/nosuch",
            "volume remove appvms/vm/nosuch",
            "volume info vm:nosuch",
            "volume remove nosuchvm:private",
            "volume resize appvms/nosuch/private 2M",
            "volume export appvms/vm/nosuch DEST",
            "volume clone appvms/vm/nosuch appvms/vm2/private",
            "volume create appvms/vm/snap2 --size 1M --snapshot-of appvms/vm/nosuch",
        ];
        fx.all_refused(&not_found, &[("DEST", &dest)], ErrorClass::NotFound);
        // The longest allowed component (64 characters) is accepted.
        let max = format!("appvms/{}/{}", "b".repeat(64), "c".repeat(64));
        fx.ok(["volume", "create", &max, "--size", "1M"]);
        assert_eq!(fx.info(&max)["vid"], max.as_str(), "[{n}]");
    }
}

/// `VM:NAME` whose NAME has a reserved suffix is an invalid vid too.
#[test]
fn short_vid_with_reserved_suffix_is_invalid() {
    let commands = [
        "volume info VID",
        "volume remove VID",
        "volume create VID --size 1M",
    ];
    for (_, (fx, _)) in on_each_fs(|fs| populated(fs, "cli-short-reserved")) {
        for name in [
            "private-dirty",
            "private-import",
            "private-precache",
            "private-cow",
            "private.img",
        ] {
            let vid = format!("vm:{name}");
            fx.all_refused(&commands, &[("VID", &vid)], ErrorClass::InvalidInput);
        }
    }
}

/// SPEC §2.1: invalid ids are rejected before any file is touched. A
/// `CLASS/VM/NAME` needs no pool to be checked, so a bad one must be refused
/// as such even when the pool cannot be opened (here: it is locked).
#[test]
fn bad_vid_is_refused_before_the_pool_is_opened() {
    // The commands on one existing volume, from `volume info` to `volume
    // clone`, but for `--json`.
    let commands: Vec<&str> = VID_COMMANDS[4..14]
        .iter()
        .copied()
        .filter(|c| !c.contains("--json"))
        .collect();
    for (_, (fx, data)) in on_each_fs(|fs| populated(fs, "cli-vid-first")) {
        let dest = s(&fx.dir.join("export.img"));
        let _held = reflinkfs::engine::Pool::open(&fx.pool).unwrap();
        for vid in [
            "appvms/../private",
            "appvms/vm/private-dirty",
            "appvms/vm/priv@1",
        ] {
            let vars = [("VID", vid), ("DATA", &data), ("DEST", &dest)];
            fx.all_refused(&commands, &vars, ErrorClass::InvalidInput);
        }
    }
}

const BAD_SIZES: [&str; 10] = [
    "0",
    "100",
    "-1",
    "99999999999999999999999",
    "17179869184T",
    "ten",
    "1.5G",
    "",
    "4X",
    "0x200",
];

/// The commands that take a size, as `EQ` (`--size=SIZE`) or as `SIZE`.
const SIZE_COMMANDS: [&str; 8] = [
    "volume create appvms/vm/new EQ",
    "volume create appvms/vm/new EQ --volatile",
    "volume create appvms/vm/new EQ --snapshot-of appvms/vm/private",
    // The size is checked before the vid and the pool.
    "volume create appvms/vm/private EQ",
    "volume resize appvms/vm/private -- SIZE",
    "volume resize appvms/vm/volatile -- SIZE",
    "volume resize appvms/vm/private --allow-shrink -- SIZE",
    "volume import appvms/vm/private DATA EQ",
];

#[test]
fn bad_sizes_are_refused_and_change_nothing() {
    for (n, (fx, data)) in on_each_fs(|fs| populated(fs, "cli-bad-sizes")) {
        for size in BAD_SIZES {
            let eq = format!("--size={size}");
            let vars = [("EQ", eq.as_str()), ("SIZE", size), ("DATA", &data)];
            let refused = fx.all_refused(&SIZE_COMMANDS, &vars, ErrorClass::InvalidInput);
            for (args, line) in refused {
                assert!(
                    line.contains("invalid size"),
                    "[{n}] {args}: the message should say the size is invalid: {line}"
                );
            }
        }
    }
}

/// A negative size typed the natural way (`--size -1`, `resize VID -1`)
/// must reach the size check, like `--revisions-to-keep -2` does.
#[test]
fn negative_size_without_equals_is_an_invalid_size() {
    let commands = [
        "volume create appvms/vm/new --size -1",
        "volume create appvms/vm/new --size -4K",
        "volume resize appvms/vm/private -1",
        "volume resize appvms/vm/private -1M --allow-shrink",
        "volume import appvms/vm/private DATA --size -1",
    ];
    for (_, (fx, data)) in on_each_fs(|fs| populated(fs, "cli-negative-size")) {
        fx.all_refused(&commands, &[("DATA", &data)], ErrorClass::InvalidInput);
    }
}

#[test]
fn bad_revisions_and_properties_are_refused() {
    let invalid = [
        "volume create appvms/vm/new --size 1M --revisions-to-keep -2",
        "volume create appvms/vm/new --size 1M --revisions-to-keep=-2",
        "volume create appvms/vm/new --size 1M --revisions-to-keep two",
        "volume create appvms/vm/new --size 1M --revisions-to-keep 1.5",
        "volume set appvms/vm/private revisions_to_keep -2",
        "volume set appvms/vm/private revisions_to_keep -100",
        "volume set appvms/vm/private revisions_to_keep three",
        "volume set appvms/vm/private revisions_to_keep 99999999999999999999",
        "volume set appvms/vm/private colour blue",
        "volume set appvms/vm/private size 2M",
        "volume set appvms/vm/private source not/a/v@lid",
        "volume set appvms/vm/private rw maybe",
        "volume set appvms/vm/private rw 2",
        "volume set appvms/vm/private rw EMPTY",
        // Checked before the vid: also for a volume that does not exist.
        "volume set appvms/vm/nosuch revisions_to_keep -2",
    ];
    for (n, (fx, _)) in on_each_fs(|fs| populated(fs, "cli-bad-props")) {
        let refused = fx.all_refused(&invalid, &[("EMPTY", "")], ErrorClass::InvalidInput);
        for (args, line) in refused {
            assert!(
                line.contains("invalid value for"),
                "[{n}] {args}: the message should name the property: {line}"
            );
        }
        // Snapshot and volatile volumes keep no revisions.
        let keep_none = [
            "volume set appvms/vm/root revisions_to_keep 2",
            "volume set appvms/vm/volatile revisions_to_keep 1",
        ];
        fx.all_refused(&keep_none, &[], ErrorClass::Refused);
        let volatile_keeping =
            "volume create appvms/vm/v2 --size 1M --volatile --revisions-to-keep 2";
        fx.refused(volatile_keeping, ErrorClass::InvalidInput);
        // `pool init --revisions-to-keep -2` creates nothing.
        let other = fx.dir.join("pool2");
        let what = "pool init --revisions-to-keep -2";
        let before = tree_nodes(&fx.dir);
        let out = rf(&other, init_args(&fx.fs, &["--revisions-to-keep", "-2"]));
        failed(&out, ErrorClass::InvalidInput, &format!("[{n}] {what}"));
        assert_same_tree(&before, &tree_nodes(&fx.dir), &format!("[{n}] {what}"));
        // The values at the limits are accepted.
        fx.ok("volume set appvms/vm/private revisions_to_keep -1");
        fx.ok("volume set appvms/vm/private revisions_to_keep 0");
        fx.ok("volume set appvms/vm/private rw false");
        assert_eq!(fx.info("appvms/vm/private")["rw"], false, "[{n}]");
    }
}
