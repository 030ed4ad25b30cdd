//! Volume ids (SPEC §2.1). A [`ValidVid`] can only be built by validation,
//! so every file name derived from one is safe to use under the pool.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Suffixes a volume NAME may not end in: they would collide with the names
/// of the volume's own backing files.
pub const RESERVED_NAME_SUFFIXES: [&str; 5] = ["-dirty", "-import", "-precache", "-cow", ".img"];

/// Longest component: one leading character and up to 63 more.
pub const MAX_COMPONENT_LEN: usize = 64;

/// A validated `CLASS/VM/NAME`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ValidVid {
    class: String,
    vm: String,
    name: String,
}

fn invalid(input: &str, reason: impl Into<String>) -> Error {
    Error::InvalidVid {
        input: input.to_owned(),
        reason: reason.into(),
    }
}

/// Checks one component against `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`, with
/// reasons a person can act on.
pub fn check_component(input: &str, what: &str, c: &str) -> Result<()> {
    if c.is_empty() {
        return Err(invalid(input, format!("the {what} is empty")));
    }
    if c == "." || c == ".." {
        return Err(invalid(input, format!("the {what} may not be {c:?}")));
    }
    if c.len() > MAX_COMPONENT_LEN {
        return Err(invalid(
            input,
            format!(
                "the {what} has {} characters; at most {MAX_COMPONENT_LEN} are allowed",
                c.len()
            ),
        ));
    }
    for ch in ['@', '~', '/', ':'] {
        if c.contains(ch) {
            return Err(invalid(input, format!("the {what} may not contain {ch:?}")));
        }
    }
    let mut chars = c.chars();
    let first = chars.next().expect("non-empty");
    if !first.is_ascii_alphanumeric() {
        return Err(invalid(
            input,
            format!("the {what} must start with a letter or digit, not {first:?}"),
        ));
    }
    if let Some(bad) = chars.find(|ch| !(ch.is_ascii_alphanumeric() || "_.-".contains(*ch))) {
        return Err(invalid(
            input,
            format!("the {what} may only contain letters, digits, '_', '.' and '-', not {bad:?}"),
        ));
    }
    Ok(())
}

impl ValidVid {
    /// Validates the three components.
    pub fn new(class: &str, vm: &str, name: &str) -> Result<ValidVid> {
        let input = format!("{class}/{vm}/{name}");
        check_component(&input, "class", class)?;
        check_component(&input, "VM name", vm)?;
        check_component(&input, "volume name", name)?;
        if let Some(suffix) = RESERVED_NAME_SUFFIXES.iter().find(|s| name.ends_with(*s)) {
            return Err(invalid(
                &input,
                format!("a volume name may not end in {suffix:?}, which reflinkfs uses for its own files"),
            ));
        }
        Ok(ValidVid {
            class: class.to_owned(),
            vm: vm.to_owned(),
            name: name.to_owned(),
        })
    }

    pub fn class(&self) -> &str {
        &self.class
    }
    pub fn vm(&self) -> &str {
        &self.vm
    }
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The stricter rule for a volume that is being made (create, clone,
    /// adopt): its NAME may not contain `.img` anywhere. Such a name is a
    /// valid id, and reflinkfs tells its files apart exactly, but its files
    /// look like another volume's revisions (`p.img.7.img` beside `p`'s
    /// `p.img.7@…`) to people, to globbing tools and to Qubes' own driver.
    /// Volumes of older pools with such names still load and work.
    pub fn check_new(&self) -> Result<()> {
        if self.name.contains(".img") {
            return Err(invalid(
                &self.to_string(),
                "a new volume name may not contain \".img\": its files would look like the revisions of another volume (N.img.K@…)",
            ));
        }
        Ok(())
    }

    /// The first and last possible ids of one VM, for range queries over
    /// sorted ids. Not valid ids themselves: bounds only.
    pub(crate) fn vm_bounds(class: &str, vm: &str) -> (ValidVid, ValidVid) {
        let mk = |name: &str| ValidVid {
            class: class.to_owned(),
            vm: vm.to_owned(),
            name: name.to_owned(),
        };
        // Valid names are ASCII letters, digits and `_.-`, all below DEL.
        (mk(""), mk("\u{7f}"))
    }
}

impl FromStr for ValidVid {
    type Err = Error;
    /// Parses `CLASS/VM/NAME`. (`VM:NAME` is resolved by the pool, which
    /// knows which classes exist.)
    fn from_str(s: &str) -> Result<ValidVid> {
        let parts: Vec<&str> = s.split('/').collect();
        if parts.len() != 3 {
            return Err(invalid(
                s,
                "expected CLASS/VM/NAME (for example appvms/work/private) or VM:NAME",
            ));
        }
        ValidVid::new(parts[0], parts[1], parts[2])
    }
}

impl TryFrom<String> for ValidVid {
    type Error = Error;
    fn try_from(s: String) -> Result<ValidVid> {
        s.parse()
    }
}

impl From<ValidVid> for String {
    fn from(v: ValidVid) -> String {
        v.to_string()
    }
}

impl fmt::Display for ValidVid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.class, self.vm, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_qubes_style_ids() {
        for ok in [
            "appvms/work/private",
            "vm-templates/fedora-40/root",
            "appvms/disp1234/volatile",
            "appvms/a/b.c_d-e",
            "kernels/6.1/modules",
        ] {
            assert!(ok.parse::<ValidVid>().is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_escapes_and_reserved_names() {
        let long = format!("appvms/{}/private", "a".repeat(65));
        let max = format!("appvms/{}/private", "a".repeat(64));
        assert!(max.parse::<ValidVid>().is_ok());
        for bad in [
            "appvms/../private",
            "appvms/./private",
            "../vm/private",
            "appvms/vm/..",
            "appvms/vm",
            "appvms/vm/private/x",
            "/appvms/vm/private",
            "appvms/vm/priv@1",
            "appvms/vm/priv~1",
            "appvms/vm/private-dirty",
            "appvms/vm/private-import",
            "appvms/vm/private-precache",
            "appvms/vm/private-cow",
            "appvms/vm/private.img",
            "appvms/vm/-private",
            "appvms/vm/.private",
            "appvms/vm/pri vate",
            "appvms/vm/privé",
            "appvms//private",
            long.as_str(),
        ] {
            assert!(bad.parse::<ValidVid>().is_err(), "{bad} must be rejected");
        }
    }

    #[test]
    fn new_names_may_not_contain_img() {
        for bad in ["appvms/vm/p.img.7", "appvms/vm/a.img-x", "appvms/vm/x.imgs"] {
            let v: ValidVid = bad.parse().expect("a valid id");
            assert!(v.check_new().is_err(), "{bad}");
        }
        for ok in ["appvms/vm/private", "appvms/vm/img", "appvms/vm/a.im.g"] {
            let v: ValidVid = ok.parse().unwrap();
            assert!(v.check_new().is_ok(), "{ok}");
        }
    }

    #[test]
    fn vm_bounds_enclose_exactly_one_vm() {
        let (lo, hi) = ValidVid::vm_bounds("appvms", "vm");
        let cases = [
            ("appvms/vm/a", true),
            ("appvms/vm/zzz", true),
            ("appvms/vm/9", true),
            ("appvms/vm/A_b-c.d", true),
            ("appvms/vm-2/a", false),
            ("appvms/vl/a", false),
            ("appvms/vm0/a", false),
            ("appvmt/vm/a", false),
        ];
        for (vid, inside) in cases {
            let v: ValidVid = vid.parse().unwrap();
            assert_eq!(lo < v && v < hi, inside, "{vid}");
        }
    }

    #[test]
    fn serde_validates() {
        let v: std::result::Result<ValidVid, _> = serde_json::from_str("\"a/../b\"");
        assert!(v.is_err());
        let v: ValidVid = serde_json::from_str("\"appvms/vm/root\"").unwrap();
        assert_eq!(serde_json::to_string(&v).unwrap(), "\"appvms/vm/root\"");
    }
}
