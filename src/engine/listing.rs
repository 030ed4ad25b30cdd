//! Which volumes a pool has, by name: the sorted lookups the mount and the
//! CLI use (a VM's volumes, a class's VMs, `VM:NAME` ids), each a range
//! query of the pool's sorted map, as cheap with 10,000 volumes as with 10.

use super::pool::{Names, Pool};
use super::vid::ValidVid;
use crate::error::{Error, Result};

/// Checks `VM:NAME` the way [`ValidVid::new`] checks a full id, without
/// knowing the class, so a bad short id is refused before any file is
/// touched.
pub fn check_short_vid(input: &str) -> Result<()> {
    let (vm, name) = input.split_once(':').ok_or_else(|| Error::InvalidVid {
        input: input.to_owned(),
        reason: "expected VM:NAME".into(),
    })?;
    ValidVid::new("class", vm, name).map_err(|e| match e {
        Error::InvalidVid { reason, .. } => Error::InvalidVid {
            input: input.to_owned(),
            reason,
        },
        other => other,
    })?;
    Ok(())
}

impl Pool {
    /// The classes that have a volume the mount shows, sorted. Costs one
    /// range query per class, however many volumes there are.
    pub fn shown_classes(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut from: Option<ValidVid> = None;
        loop {
            let next = {
                let vols = self.table.volumes.read();
                let mut range = match &from {
                    Some(f) => vols.range(f.clone()..),
                    None => vols.range(..),
                };
                range.next().map(|(v, _)| v.class().to_owned())
            };
            let Some(class) = next else { break };
            if self.class_shown(&class) {
                out.push(class.clone());
            }
            // Past every key of this class: its VM bound "\u{7f}" sorts
            // after every valid VM name.
            from = Some(ValidVid::vm_bounds(&class, "\u{7f}").0);
        }
        out
    }

    /// The VMs of `class` that have a volume the mount shows, sorted: one
    /// pass over the class's range of the sorted map. A VM with a volume
    /// that is not optional is shown without a look at the disk; only one
    /// with nothing but optional volumes asks [`Pool::is_shown`] (after the
    /// map's lock is let go: the lock order).
    pub fn shown_vms(&self, class: &str) -> Vec<String> {
        let (lo, hi) = (
            ValidVid::vm_bounds(class, "").0,
            ValidVid::vm_bounds(class, "\u{7f}").0,
        );
        // Each VM once, with its optional volumes when it has only those.
        let mut vms: Vec<(String, Vec<ValidVid>)> = Vec::new();
        {
            let vols = self.table.volumes.read();
            let mut sure = false;
            for (vid, vol) in vols.range(lo..hi) {
                if vms.last().is_none_or(|(vm, _)| vm != vid.vm()) {
                    vms.push((vid.vm().to_owned(), Vec::new()));
                    sure = false;
                }
                let optional = &mut vms.last_mut().expect("pushed above").1;
                if sure {
                    continue;
                }
                if vol.config().optional {
                    optional.push(vid.clone());
                } else {
                    sure = true;
                    optional.clear();
                }
            }
        }
        vms.into_iter()
            .filter(|(_, optional)| {
                optional.is_empty() || optional.iter().any(|v| self.is_shown(v))
            })
            .map(|(vm, _)| vm)
            .collect()
    }

    /// Whether a class has a volume the mount shows. Stops at the first
    /// volume that is shown without a look at the disk (all but optional
    /// ones), so it costs the same for a class of ten volumes or ten
    /// thousand.
    pub fn class_shown(&self, class: &str) -> bool {
        let (lo, hi) = (
            ValidVid::vm_bounds(class, "").0,
            ValidVid::vm_bounds(class, "\u{7f}").0,
        );
        let mut optional = Vec::new();
        {
            // The map, then each volume's lock, briefly: the lock order.
            let vols = self.table.volumes.read();
            for (vid, vol) in vols.range(lo..hi) {
                if !vol.config().optional {
                    return true;
                }
                optional.push(vid.clone());
            }
        }
        optional.iter().any(|v| self.is_shown(v))
    }

    /// The volumes of one VM that the mount shows, sorted: one range query.
    pub fn shown_in_vm(&self, class: &str, vm: &str) -> Vec<ValidVid> {
        let (lo, hi) = ValidVid::vm_bounds(class, vm);
        let vids: Vec<ValidVid> = self
            .table
            .volumes
            .read()
            .range(lo..hi)
            .map(|(v, _)| v.clone())
            .collect();
        vids.into_iter().filter(|v| self.is_shown(v)).collect()
    }

    /// Every known volume id, including corrupt ones, sorted.
    pub fn vids(&self) -> Vec<ValidVid> {
        let mut v: Vec<ValidVid> = self.table.volumes.read().keys().cloned().collect();
        v.extend(self.table.corrupt.read().keys().cloned());
        v.sort();
        v.dedup();
        v
    }

    /// Resolves what a person typed: `CLASS/VM/NAME`, or `VM:NAME` when
    /// exactly one known volume matches.
    pub fn resolve_vid(&self, input: &str) -> Result<ValidVid> {
        if let Some((vm, name)) = input.split_once(':') {
            check_short_vid(input)?;
            let matches: Vec<ValidVid> = self
                .vids()
                .into_iter()
                .filter(|v| v.vm() == vm && v.name() == name)
                .collect();
            return match matches.len() {
                1 => Ok(matches.into_iter().next().expect("one")),
                0 => Err(Error::NoSuchVolume(input.to_owned())),
                _ => Err(Error::InvalidVid {
                    input: input.to_owned(),
                    reason: format!(
                        "ambiguous: {}; give CLASS/VM/NAME",
                        matches
                            .iter()
                            .map(|v| v.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                }),
            };
        }
        input.parse()
    }

    /// The other volumes of `vid`'s VM (corrupt ones included), found by a
    /// range query over the sorted ids.
    pub(crate) fn siblings(&self, vid: &ValidVid) -> Vec<ValidVid> {
        let (lo, hi) = ValidVid::vm_bounds(vid.class(), vid.vm());
        let mut out: Vec<ValidVid> = self
            .table
            .volumes
            .read()
            .range(lo.clone()..hi.clone())
            .map(|(v, _)| v.clone())
            .collect();
        out.extend(
            self.table
                .corrupt
                .read()
                .range(lo..hi)
                .map(|(v, _)| v.clone()),
        );
        out.retain(|v| v != vid);
        out
    }

    /// Whether another volume of the same VM owns `file`.
    pub(crate) fn owned_by_sibling(&self, vid: &ValidVid, file: &str) -> bool {
        self.siblings(vid).iter().any(|s| Names::of(s).owns(file))
    }
}
