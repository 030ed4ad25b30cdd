//! The source chain of snapshot volumes (SPEC §2.2): which origin volume
//! a snapshot starts from, and its committed image with its generation.

use super::config::{VolumeConfig, VolumeKind};
use super::fsops::Dir;
use super::lifecycle::open_image;
use super::pool::{Names, Pool};
use super::vid::ValidVid;
use crate::error::{Error, Result};
use std::fs::File;

/// How far a source chain may go before it is called a loop.
const MAX_SOURCE_DEPTH: usize = 32;

impl Pool {
    /// Follows a snapshot volume's source chain down to an origin volume
    /// (SPEC §2.2). The only place sources are resolved.
    pub fn resolve_source(&self, config: &VolumeConfig) -> Result<ValidVid> {
        let mut cur = config.source.clone().ok_or_else(|| Error::Refused {
            vid: config.vid.to_string(),
            reason: format!("a {} volume has no source", config.kind().as_str()),
        })?;
        for _ in 0..MAX_SOURCE_DEPTH {
            if cur == config.vid {
                break;
            }
            let vol = self.volume(&cur).map_err(|e| match e {
                Error::NoSuchVolume(_) => {
                    Error::NoSuchVolume(format!("{cur} (the source of {})", config.vid))
                }
                other => other,
            })?;
            let c = vol.config();
            cur = match c.kind() {
                VolumeKind::Origin => return Ok(cur),
                VolumeKind::Snapshot => c.source.clone().expect("validated"),
                VolumeKind::Volatile => {
                    return Err(Error::Refused {
                        vid: config.vid.to_string(),
                        reason: format!(
                            "its source {cur} is a volatile volume, which has no committed image"
                        ),
                    })
                }
            };
        }
        Err(Error::Refused {
            vid: config.vid.to_string(),
            reason: format!("its source chain is longer than {MAX_SOURCE_DEPTH} or loops"),
        })
    }

    /// Opens the committed image a snapshot volume starts from, with the
    /// generation it has: both are read under the origin's lock, which is
    /// also taken around the rename that replaces that image, so the two
    /// always match.
    pub(crate) fn open_source_image(
        &self,
        vid: &ValidVid,
        config: &VolumeConfig,
    ) -> Result<(ValidVid, u64, Dir, File)> {
        let origin = self.resolve_source(config)?;
        let vol = self.volume(&origin)?;
        let dir = self.vm_dir(&origin, false)?;
        let life = vol.lock();
        if life.run().is_some() && life.config.revisions_to_keep == -1 {
            return Err(Error::Busy {
                vid: vid.to_string(),
                reason: format!("its source {origin} is running with revisions_to_keep=-1, so it has no committed image now"),
            });
        }
        let file = open_image(&dir, &origin, &Names::of(&origin).img(), libc::O_RDONLY)?;
        Ok((origin, life.config.generation, dir, file))
    }
}
