//! Revision names (SPEC §3): `N.img.K@YYYY-MM-DDTHH:MM:SSZ`, and the legacy
//! Qubes form `N.img@YYYY-MM-DDTHH:MM:SSZ`.

use super::config::{Pending, VolumeConfig};
use super::vid::ValidVid;
use crate::error::Error;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::cmp::Ordering;
use std::fmt;

/// Which revision: the per-volume counter K, or a legacy name that has only
/// a timestamp. Legacy revisions sort before numbered ones, by timestamp.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RevisionId {
    Legacy(String),
    Numbered(u64),
}

impl Ord for RevisionId {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (RevisionId::Legacy(a), RevisionId::Legacy(b)) => a.cmp(b),
            (RevisionId::Legacy(_), RevisionId::Numbered(_)) => Ordering::Less,
            (RevisionId::Numbered(_), RevisionId::Legacy(_)) => Ordering::Greater,
            (RevisionId::Numbered(a), RevisionId::Numbered(b)) => a.cmp(b),
        }
    }
}

impl PartialOrd for RevisionId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for RevisionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RevisionId::Numbered(k) => write!(f, "{k}"),
            RevisionId::Legacy(ts) => write!(f, "@{ts}"),
        }
    }
}

impl Serialize for RevisionId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for RevisionId {
    /// The form [`fmt::Display`] gives: `K`, or `@TIMESTAMP` for a legacy
    /// revision.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.strip_prefix('@') {
            Some(ts) => Ok(RevisionId::Legacy(ts.to_owned())),
            None => s
                .parse()
                .map(RevisionId::Numbered)
                .map_err(|_| serde::de::Error::custom(format!("not a revision id: {s:?}"))),
        }
    }
}

/// A revision found on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revision {
    pub id: RevisionId,
    /// UTC commit time of this content, as in the file name.
    pub timestamp: String,
    pub file_name: String,
    /// Set when it is pinned (`volume revisions pin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<super::config::Pin>,
    /// For a pinned revision, with usage: the bytes only it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclusive: Option<u64>,
    /// Its revision id (doc/DELTA.md), when it has one: what `volume
    /// export --delta` streams name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev_id: Option<String>,
}

impl Revision {
    /// Whether `wanted` (as typed by a person) names this revision: the
    /// number K, the timestamp (with or without `@`), or the file name.
    pub fn matches(&self, wanted: &str) -> bool {
        let w = wanted.trim();
        w == self.id.to_string()
            || w == self.file_name
            || w == self.timestamp
            || w.strip_prefix('@') == Some(self.timestamp.as_str())
    }
}

/// The file name of revision K of volume name `name`.
pub fn revision_file_name(name: &str, k: u64, timestamp: &str) -> String {
    format!("{name}.img.{k}@{timestamp}")
}

/// Result of looking at a directory entry that may be a revision of `name`.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a revision name of this volume at all.
    NotOurs,
    /// Looks like one of ours but does not parse; warn and ignore.
    Malformed,
    Revision(Revision),
}

/// Parses `file` as a revision of the volume called `name`. Exact: volume
/// `priv` never claims `private.img.1@…`.
pub fn parse_revision_name(name: &str, file: &str) -> Parsed {
    let Some(rest) = file.strip_prefix(name).and_then(|r| r.strip_prefix(".img")) else {
        return Parsed::NotOurs;
    };
    let (id, ts) = if let Some(ts) = rest.strip_prefix('@') {
        (RevisionId::Legacy(ts.to_owned()), ts)
    } else if let Some(r) = rest.strip_prefix('.') {
        let Some((k, ts)) = r.split_once('@') else {
            return Parsed::Malformed;
        };
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_digit()) || k.starts_with('0') {
            return Parsed::Malformed;
        }
        match k.parse::<u64>() {
            Ok(k) => (RevisionId::Numbered(k), ts),
            Err(_) => return Parsed::Malformed,
        }
    } else {
        // `N.img`, `N.img~tmp` and the like: not revisions.
        return Parsed::NotOurs;
    };
    if parse_utc(ts).is_none() {
        return Parsed::Malformed;
    }
    Parsed::Revision(Revision {
        id,
        timestamp: ts.to_owned(),
        file_name: file.to_owned(),
        pin: None,
        exclusive: None,
        rev_id: None,
    })
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time.
pub fn format_utc(secs: i64) -> String {
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// Parses exactly `YYYY-MM-DDTHH:MM:SSZ`.
pub fn parse_utc(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'Z'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = &s[r];
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    Some(days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se)
}

/// The current time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    format_utc(secs)
}

/// Whether a revision is pinned in `cfg`.
pub(crate) fn is_pinned(cfg: &VolumeConfig, r: &Revision) -> bool {
    cfg.pins.contains_key(&r.id.to_string())
}

/// Revisions no prune may take: pinned ones, and the target of a queued
/// revert. Neither counts against `revisions_to_keep`.
pub(crate) fn is_protected(cfg: &VolumeConfig, r: &Revision) -> bool {
    is_pinned(cfg, r)
        || matches!(&cfg.pending, Some(Pending::Revert { revision }) if *revision == r.file_name)
}

/// The one revision that may be the leftover of a commit interrupted
/// between its link of `N.img` and its rename (recovery removes it, `check`
/// reports it, when it is `N.img`'s file): the newest numbered revision,
/// unless it is protected or the last revert's target, which share `N.img`'s
/// file by design (reverts link).
pub(crate) fn half_made_commit_candidate(
    cfg: &VolumeConfig,
    revs: impl IntoIterator<Item = Revision>,
) -> Option<Revision> {
    revs.into_iter()
        .filter_map(|r| match r.id {
            RevisionId::Numbered(k) => Some((k, r)),
            RevisionId::Legacy(_) => None,
        })
        .max_by_key(|(k, _)| *k)
        .map(|(_, r)| r)
        .filter(|r| {
            !is_protected(cfg, r) && cfg.kept_by_revert.as_deref() != Some(r.file_name.as_str())
        })
}

/// Finds a revision by what a person typed, or says which ones exist. A
/// timestamp shared by several revisions is refused as ambiguous.
pub(crate) fn pick_revision<'a>(
    vid: &ValidVid,
    revs: &'a [Revision],
    which: Option<&str>,
) -> crate::error::Result<&'a Revision> {
    let valid = || {
        if revs.is_empty() {
            "none".to_owned()
        } else {
            revs.iter()
                .map(|r| r.id.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let Some(w) = which else {
        return revs.last().ok_or_else(|| Error::UnknownRevision {
            vid: vid.to_string(),
            wanted: "newest".to_owned(),
            valid: valid(),
        });
    };
    let found: Vec<&Revision> = revs.iter().filter(|r| r.matches(w)).collect();
    match found.as_slice() {
        [one] => Ok(one),
        [] => Err(Error::UnknownRevision {
            vid: vid.to_string(),
            wanted: w.to_owned(),
            valid: valid(),
        }),
        many => Err(Error::InvalidValue {
            property: "revision".into(),
            reason: format!(
                "{w:?} matches revisions {} of {vid}; give the revision number",
                many.iter()
                    .map(|r| r.id.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_round_trip() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_700_000_000), "2023-11-14T22:13:20Z");
        for t in [0, 1, 86_399, 951_782_400, 1_700_000_000, 4_102_444_800] {
            assert_eq!(parse_utc(&format_utc(t)), Some(t));
        }
        assert_eq!(parse_utc("2023-13-01T00:00:00Z"), None);
        assert_eq!(parse_utc("2023-11-14 22:13:20Z"), None);
        assert_eq!(parse_utc("2023-11-14T22:13:20"), None);
    }

    #[test]
    fn parses_both_forms_exactly() {
        let ts = "2024-05-06T07:08:09Z";
        match parse_revision_name("private", &format!("private.img.12@{ts}")) {
            Parsed::Revision(r) => {
                assert_eq!(r.id, RevisionId::Numbered(12));
                assert!(r.matches("12") && r.matches(ts) && r.matches(&format!("@{ts}")));
            }
            other => panic!("{other:?}"),
        }
        match parse_revision_name("private", &format!("private.img@{ts}")) {
            Parsed::Revision(r) => assert_eq!(r.id, RevisionId::Legacy(ts.into())),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_revision_name("priv", &format!("private.img.1@{ts}")),
            Parsed::NotOurs
        );
        assert_eq!(
            parse_revision_name("private", "private.img"),
            Parsed::NotOurs
        );
        assert_eq!(
            parse_revision_name("private", "private.img~tmp"),
            Parsed::NotOurs
        );
        assert_eq!(
            parse_revision_name("private", "private-dirty.img"),
            Parsed::NotOurs
        );
        for bad in [
            "private.img.x@2024-05-06T07:08:09Z",
            "private.img.1@yesterday",
            "private.img.01@2024-05-06T07:08:09Z",
            "private.img.1",
            "private.img@",
        ] {
            assert_eq!(
                parse_revision_name("private", bad),
                Parsed::Malformed,
                "{bad}"
            );
        }
    }

    #[test]
    fn ordering_puts_legacy_first() {
        let mut ids = [
            RevisionId::Numbered(10),
            RevisionId::Legacy("2020-01-01T00:00:00Z".into()),
            RevisionId::Numbered(2),
        ];
        ids.sort();
        assert_eq!(ids[0], RevisionId::Legacy("2020-01-01T00:00:00Z".into()));
        assert_eq!(ids[2], RevisionId::Numbered(10));
    }
}
