//! The options of `reflinkfs mount -o`.

use crate::error::{Error, Result};

/// Options of `reflinkfs mount -o`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOpts {
    pub passthrough: bool,
    pub threads: usize,
    pub allow_other: bool,
    pub read_only: bool,
    pub setup_check: bool,
    pub noexec: bool,
    pub noatime: bool,
}

impl Default for MountOpts {
    fn default() -> Self {
        MountOpts {
            passthrough: true,
            threads: 4,
            allow_other: false,
            read_only: false,
            setup_check: true,
            noexec: false,
            noatime: false,
        }
    }
}

fn bad_option(opt: &str, reason: &str) -> Error {
    Error::InvalidValue {
        property: format!("mount option {opt:?}"),
        reason: reason.to_owned(),
    }
}

impl MountOpts {
    /// Parses comma-separated `-o` lists. Unknown options are refused.
    pub fn parse<S: AsRef<str>>(lists: &[S]) -> Result<MountOpts> {
        let mut o = MountOpts::default();
        for list in lists {
            for opt in list
                .as_ref()
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
            {
                let (key, value) = match opt.split_once('=') {
                    Some((k, v)) => (k, Some(v)),
                    None => (opt, None),
                };
                match (key, value) {
                    ("passthrough", Some("on")) => o.passthrough = true,
                    ("passthrough", Some("off")) => o.passthrough = false,
                    ("passthrough", _) => return Err(bad_option(opt, "use passthrough=on or passthrough=off")),
                    ("threads", Some(n)) => {
                        o.threads = n
                            .parse()
                            .ok()
                            .filter(|n| (1..=64).contains(n))
                            .ok_or_else(|| bad_option(opt, "threads must be a number from 1 to 64"))?
                    }
                    ("setup_check", Some("no")) => o.setup_check = false,
                    ("setup_check", Some("yes")) => o.setup_check = true,
                    ("setup_check", _) => return Err(bad_option(opt, "use setup_check=no or setup_check=yes")),
                    ("allow_other", None) => o.allow_other = true,
                    ("ro", None) => o.read_only = true,
                    ("rw", None) => o.read_only = false,
                    ("noexec", None) => o.noexec = true,
                    ("exec", None) => o.noexec = false,
                    ("noatime", None) => o.noatime = true,
                    ("atime" | "relatime" | "nosuid" | "nodev" | "defaults" | "async", None) => {}
                    ("suid" | "dev", None) => {
                        return Err(bad_option(opt, "reflinkfs always mounts nosuid,nodev"))
                    }
                    _ => {
                        return Err(bad_option(
                            opt,
                            "unknown option; known: passthrough=on|off, threads=N, allow_other, ro, rw, setup_check=no, and the flags noexec, noatime, nosuid, nodev",
                        ))
                    }
                }
            }
        }
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_options() {
        let o = MountOpts::parse(&["passthrough=off,threads=8", "allow_other,ro"]).unwrap();
        assert!(!o.passthrough && o.threads == 8 && o.allow_other && o.read_only);
        assert!(!MountOpts::parse(&["setup_check=no"]).unwrap().setup_check);
        for bad in [
            "passthrough=maybe",
            "threads=0",
            "threads=x",
            "bogus",
            "suid",
            "allow_other=1",
        ] {
            assert!(MountOpts::parse(&[bad]).is_err(), "{bad}");
        }
        assert_eq!(MountOpts::parse::<&str>(&[]).unwrap(), MountOpts::default());
    }
}
