//! The few changes allowed through the mount: growing an image
//! (truncate), deleting a revision (unlink) and reverting to one (rename
//! onto `N.img`).
//!
//! Each claims its volume (waiting for a start, a commit or an operation in
//! progress) and copies or fsyncs, so each checks what it can at once and,
//! without `may_wait`, returns [`TryError::WouldWait`] before it reaches the
//! engine: the adapter does it again on the waiting pool.

use super::*;

impl<B: Send + Sync + 'static> ReflinkFs<B> {
    /// setattr: only a size change of a volume's image is allowed, which is
    /// a resize (§5). Growing only; shrinking goes through the CLI.
    pub fn set_size(&self, ino: u64, size: u64, may_wait: bool) -> Result<Attr, TryError> {
        let node = self.node(ino)?;
        let vid = match &node {
            Node::Dirty(v, _) | Node::Img(v, _, _) => v.clone(),
            Node::Revision(..) => return Err(libc::EROFS.into()),
            _ => return Err(libc::EISDIR.into()),
        };
        let view = self.view(&vid)?;
        if matches!(node, Node::Img(..)) && view.snap.running {
            return Err(fail(
                libc::EBUSY,
                format_args!(
                    "{vid}: truncate of N.img refused while the volume runs; truncate its -dirty.img"
                ),
            )
            .into());
        }
        let current = if view.snap.running {
            view.dirty.map(|d| d.size).unwrap_or(view.nominal_size)
        } else {
            view.nominal_size
        };
        if size < current {
            return Err(refuse(
                &format!("shrinking {vid} from {current} to {size} bytes through the mount"),
                &format!("reflinkfs volume resize {vid} {size} --allow-shrink"),
            )
            .into());
        }
        if !may_wait {
            return Err(TryError::WouldWait(vid));
        }
        self.pool
            .resize(&vid, size, false)
            .map_err(|e| errno_of("resize", &e))?;
        let node = match node {
            Node::Img(v, inc, _) => {
                let g = self.view(&v)?.generation();
                Node::Img(v, inc, g)
            }
            other => other,
        };
        let ino = self.ino_of(&node);
        Ok(self.attr_of(ino, &node)?)
    }

    /// unlink: deletes a revision; everything else is refused.
    pub fn unlink(&self, parent: u64, name: &str, may_wait: bool) -> Result<(), TryError> {
        let parent = self.node(parent)?;
        match self.child(&parent, name)? {
            Node::Revision(vid, _, _) if !may_wait => Err(TryError::WouldWait(vid)),
            Node::Revision(vid, _, file) => Ok(self
                .pool
                .remove_revision(&vid, &file)
                .map_err(|e| errno_of("unlink", &e))?),
            Node::Dirty(vid, _) | Node::Img(vid, _, _) => Err(refuse(
                &format!("unlink of {name}"),
                &format!("reflinkfs volume remove {vid}"),
            )
            .into()),
            _ => Err(libc::EISDIR.into()),
        }
    }

    /// rename: a revision renamed onto `N.img` of its volume reverts to it;
    /// everything else is refused.
    pub fn rename(
        &self,
        parent: u64,
        name: &str,
        newparent: u64,
        newname: &str,
        flags: u32,
        may_wait: bool,
    ) -> Result<(), TryError> {
        let p = self.node(parent)?;
        if parent == newparent && flags == 0 {
            if let Node::Revision(vid, _, file) = self.child(&p, name)? {
                if newname == crate::engine::Names::of(&vid).img() {
                    if !may_wait {
                        return Err(TryError::WouldWait(vid));
                    }
                    return self
                        .pool
                        .revert(&vid, Some(&file))
                        .map(drop)
                        .map_err(|e| errno_of("revert", &e).into());
                }
            }
        }
        Err(refuse(
            &format!("rename of {name} to {newname}"),
            "reflinkfs volume revert VID REVISION",
        )
        .into())
    }
}
