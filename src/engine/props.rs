//! Properties: `volume set` of a volume's, and `pool set` of the pool's
//! defaults.

use super::config::{check_pool_constraints, VolumeConfig, VolumeKind};
use super::failpoint;
use super::pool::Pool;
use super::vid::ValidVid;
use super::volume::{OpName, Volume};
use crate::error::{busy, refused};
use crate::error::{Cause, Error, Result};
use std::sync::Arc;

/// A property `volume set` can change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Property {
    RevisionsToKeep(i64),
    Rw(bool),
    /// The volume a stopped snapshot volume starts from (qubesd changes
    /// it when an AppVM moves to another template).
    Source(ValidVid),
}

impl Property {
    /// Parses `PROPERTY VALUE` as typed on the command line.
    pub fn parse(name: &str, value: &str) -> Result<Property> {
        let invalid = |reason: String| Error::InvalidValue {
            property: name.to_owned(),
            reason,
        };
        match name {
            "revisions_to_keep" | "revisions-to-keep" => {
                let n: i64 = value
                    .trim()
                    .parse()
                    .map_err(|_| invalid(format!("{value:?} is not an integer")))?;
                check_revisions_to_keep(n)?;
                Ok(Property::RevisionsToKeep(n))
            }
            "rw" => match value.trim().to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" | "1" => Ok(Property::Rw(true)),
                "false" | "no" | "off" | "0" => Ok(Property::Rw(false)),
                _ => Err(invalid(format!(
                    "{value:?} is not a boolean (true or false)"
                ))),
            },
            "source" => value
                .trim()
                .parse::<ValidVid>()
                .map(Property::Source)
                .map_err(|e| invalid(format!("{value:?} is not a volume id: {e}"))),
            "size" => Err(invalid("use `volume resize` to change the size".into())),
            _ => Err(invalid(
                "unknown property; the settable properties are revisions_to_keep, rw and source"
                    .into(),
            )),
        }
    }
}

/// A property `pool set` can change: the pool's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolProperty {
    /// `revisions_to_keep` of new origin volumes.
    RevisionsToKeep(i64),
}

impl PoolProperty {
    /// Parses `PROPERTY VALUE` as typed on the command line.
    pub fn parse(name: &str, value: &str) -> Result<PoolProperty> {
        match name {
            "revisions_to_keep" | "revisions-to-keep" => match Property::parse(name, value)? {
                Property::RevisionsToKeep(n) => Ok(PoolProperty::RevisionsToKeep(n)),
                _ => unreachable!("parsed as revisions_to_keep"),
            },
            _ => Err(Error::InvalidValue {
                property: name.to_owned(),
                reason: "unknown pool property; the settable one is revisions_to_keep (the default of new origin volumes)".into(),
            }),
        }
    }

    /// The property's name and value, as shown.
    pub fn shown(&self) -> (&'static str, String) {
        match self {
            PoolProperty::RevisionsToKeep(n) => ("revisions_to_keep", n.to_string()),
        }
    }
}

/// Validates a `revisions_to_keep` value (SPEC §2.2).
pub fn check_revisions_to_keep(n: i64) -> Result<i64> {
    if n < -1 {
        return Err(Error::InvalidValue {
            property: "revisions_to_keep".into(),
            reason: format!(
                "{n} is below the minimum of -1 (-1 disables snapshots, 0 keeps no revisions)"
            ),
        });
    }
    Ok(n)
}

impl Pool {
    /// Sets a property (SPEC §5). Lowering `revisions_to_keep` prunes at once.
    pub fn set(&self, vid: &ValidVid, prop: Property) -> Result<()> {
        let claim = self.volume(vid)?.claim(OpName::Set, |_| Ok(()))?;
        let running = claim.lock().run().is_some();
        // Checked and changed on the config as it is now: an attach or a
        // commit meanwhile is never undone by this write.
        let (old, cfg) = self.update_config(&claim.volume, |cfg| {
            let old = cfg.clone();
            self.apply_property(vid, &prop, running, cfg)?;
            Ok((old, cfg.clone()))
        })?;
        failpoint::hit!("set.stored");
        log::info!("{vid}: set {prop:?}");
        if cfg.revisions_to_keep < old.revisions_to_keep {
            if let Some(dir) = self.vm_dir_if_exists(vid)? {
                self.prune_revisions(&cfg, &dir)?;
            }
        }
        // -1 keeps no precache; back from it, the volume gets one.
        if (cfg.revisions_to_keep == -1) != (old.revisions_to_keep == -1) {
            if let Some(dir) = self.vm_dir_if_exists(vid)? {
                self.refresh_precache(&claim.volume, &dir);
            }
        }
        Ok(())
    }

    /// Checks `prop` against the volume's config `cfg` (of a running
    /// volume when `running`) and sets it there.
    fn apply_property(
        &self,
        vid: &ValidVid,
        prop: &Property,
        running: bool,
        cfg: &mut VolumeConfig,
    ) -> Result<()> {
        match prop {
            Property::Rw(rw) => {
                if running {
                    return Err(busy(vid, "rw cannot change while it is running"));
                }
                cfg.rw = *rw;
            }
            Property::Source(src) => {
                if cfg.kind() != VolumeKind::Snapshot {
                    return Err(refused(
                        vid,
                        format!(
                            "a {} volume has no source; only a snapshot volume's can be set",
                            cfg.kind().as_str()
                        ),
                    ));
                }
                if running {
                    return Err(Error::because(
                        vid,
                        Cause::Running,
                        "its source cannot change while it is running; stop it first",
                    ));
                }
                cfg.source = Some(src.clone());
                cfg.validate(&self.config()).map_err(|r| refused(vid, r))?;
                // The new source must exist, and its chain end at an origin
                // volume without coming back here.
                self.volume(src)
                    .map_err(|_| Error::NoSuchVolume(format!("{src} (the new source of {vid})")))?;
                self.resolve_source(cfg)?;
            }
            Property::RevisionsToKeep(n) => {
                let n = *n;
                check_revisions_to_keep(n)?;
                if cfg.kind() != VolumeKind::Origin && n != 0 {
                    return Err(refused(
                        vid,
                        format!("a {} volume keeps no revisions", cfg.kind().as_str()),
                    ));
                }
                if (n == -1) != (cfg.revisions_to_keep == -1) {
                    if running {
                        return Err(busy(
                            vid,
                            "revisions_to_keep cannot change to or from -1 while it is running",
                        ));
                    }
                    // With -1 the committed image itself runs: a snapshot
                    // started from it must not see it change form (Qubes
                    // refuses it while a VM of the template runs).
                    if let Some(s) = self.running_snapshots_of(vid).first() {
                        return Err(busy(
                            vid,
                            format!(
                                "revisions_to_keep cannot change to or from -1 while its snapshot {s} runs; stop it first"
                            ),
                        ));
                    }
                }
                cfg.revisions_to_keep = n;
            }
        }
        check_pool_constraints(&self.config(), cfg.rw, cfg.revisions_to_keep)
            .map_err(|r| refused(vid, r))
    }

    /// The running snapshot volumes whose chain ends at `origin`. Each
    /// volume is looked at alone (never two volumes' locks at once).
    fn running_snapshots_of(&self, origin: &ValidVid) -> Vec<ValidVid> {
        let all: Vec<Arc<Volume>> = self.table.all();
        all.iter()
            .filter(|v| {
                let snap = v.snapshot();
                snap.running
                    && snap.config.kind() == VolumeKind::Snapshot
                    && self.resolve_source(&snap.config).ok().as_ref() == Some(origin)
            })
            .map(|v| v.vid.clone())
            .collect()
    }

    /// Sets a pool property (its defaults) in `pool.json`. A read-only pool
    /// keeps no revisions: only 0 is allowed there.
    pub fn set_pool(&self, prop: PoolProperty) -> Result<()> {
        let _one_at_a_time = self.setting.lock();
        let mut cfg = self.config();
        match prop {
            PoolProperty::RevisionsToKeep(n) => {
                check_revisions_to_keep(n)?;
                if cfg.read_only && n != 0 {
                    return Err(Error::PoolRefused {
                        pool: self.path().to_owned(),
                        reason: format!(
                            "it is read-only (a kernel pool): its volumes keep no revisions, so revisions_to_keep must stay 0, not {n}"
                        ),
                    });
                }
                cfg.revisions_to_keep = n;
            }
        }
        self.store_pool_config(&cfg)?;
        *self.config.write() = cfg;
        log::info!("pool {}: set {prop:?}", self.path().display());
        Ok(())
    }
}
