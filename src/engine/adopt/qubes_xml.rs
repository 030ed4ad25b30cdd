//! Phase 1, the configs qubes.xml gives: reading it, and choosing the
//! pools whose volumes are adopted.

use super::scan::{Scan, VolFiles};
use super::{AdoptReport, XmlPool};
use crate::engine::vid::ValidVid;
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// The largest qubes.xml read.
const MAX_XML_BYTES: u64 = 64 << 20;

#[derive(Debug, Clone)]
pub(super) struct XmlPoolDef {
    pub(super) name: String,
    driver: Option<String>,
    dir_path: Option<String>,
    revisions_to_keep: Option<String>,
}

/// A `volume` element, attributes as written.
#[derive(Debug, Clone, Default)]
pub(super) struct XmlVol {
    pub(super) qube: Option<String>,
    pub(super) pool: Option<String>,
    pub(super) vid: Option<String>,
    size: Option<String>,
    rw: Option<String>,
    save_on_stop: Option<String>,
    snap_on_start: Option<String>,
    pub(super) source: Option<String>,
    revisions_to_keep: Option<String>,
}

/// The attributes of a `volume` element that adopt uses, parsed.
#[derive(Debug, Clone)]
pub(super) struct VolAttrs {
    pub(super) rw: bool,
    pub(super) save_on_stop: bool,
    pub(super) snap_on_start: bool,
    pub(super) size: Option<u64>,
    pub(super) revisions_to_keep: Option<i64>,
}

impl XmlVol {
    /// The volume, for messages.
    pub(super) fn who(&self) -> String {
        format!(
            "the volume {} of qube {}",
            self.vid.as_deref().unwrap_or("?"),
            self.qube.as_deref().unwrap_or("?")
        )
    }

    /// The attributes parsed; an error names the volume and the attribute.
    pub(super) fn attrs(&self, xml_path: &Path) -> Result<VolAttrs> {
        let bad = |what: String| xml_error(xml_path, format!("{}: {what}", self.who()));
        // Missing flags take the defaults of Qubes' Volume class.
        let flag = |name: &str, value: &Option<String>| -> Result<bool> {
            match value {
                None => Ok(false),
                Some(s) => {
                    parse_bool(s).ok_or_else(|| bad(format!("{name}={s:?} is not True or False")))
                }
            }
        };
        let rw = flag("rw", &self.rw)?;
        let save_on_stop = flag("save_on_stop", &self.save_on_stop)?;
        let snap_on_start = flag("snap_on_start", &self.snap_on_start)?;
        let size = match &self.size {
            None => None,
            Some(s) => Some(
                s.trim()
                    .parse::<u64>()
                    .map_err(|_| bad(format!("size={s:?} is not a number of bytes")))?,
            ),
        };
        let revisions_to_keep = match &self.revisions_to_keep {
            None => None,
            Some(s) => {
                let n = s
                    .trim()
                    .parse::<i64>()
                    .map_err(|_| bad(format!("revisions_to_keep={s:?} is not an integer")))?;
                if n < -1 {
                    return Err(bad(format!("revisions_to_keep={n} is below -1")));
                }
                Some(n)
            }
        };
        Ok(VolAttrs {
            rw,
            save_on_stop,
            snap_on_start,
            size,
            revisions_to_keep,
        })
    }
}

#[derive(Debug, Default)]
pub(super) struct QubesXml {
    pools: Vec<XmlPoolDef>,
    pub(super) volumes: Vec<XmlVol>,
}

fn xml_error(xml: &Path, reason: impl Into<String>) -> Error {
    Error::CorruptMetadata {
        path: xml.to_owned(),
        reason: reason.into(),
    }
}

pub(super) fn read_qubes_xml(xml: &Path) -> Result<QubesXml> {
    use std::io::Read;
    let f = File::open(xml).map_err(|e| Error::io(format!("opening {}", xml.display()), e))?;
    let mut bytes = Vec::new();
    f.take(MAX_XML_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(format!("reading {}", xml.display()), e))?;
    if bytes.len() as u64 > MAX_XML_BYTES {
        return Err(xml_error(
            xml,
            format!("larger than {} bytes; not a qubes.xml", MAX_XML_BYTES),
        ));
    }
    let text = String::from_utf8(bytes)
        .map_err(|_| xml_error(xml, "not valid XML: the file is not UTF-8"))?;
    parse_qubes_xml(&text, xml)
}

fn child_elements<'a, 'input>(
    node: roxmltree::Node<'a, 'input>,
    tag: &'a str,
) -> impl Iterator<Item = roxmltree::Node<'a, 'input>> + 'a {
    node.children()
        .filter(move |c| c.is_element() && c.tag_name().name() == tag)
}

fn parse_qubes_xml(text: &str, xml: &Path) -> Result<QubesXml> {
    let doc = roxmltree::Document::parse(text)
        .map_err(|e| xml_error(xml, format!("not valid XML: {e}")))?;
    let root = doc.root_element();
    if root.tag_name().name() != "qubes" {
        return Err(xml_error(
            xml,
            format!(
                "not a qubes.xml: the root element is <{}>, not <qubes>",
                root.tag_name().name()
            ),
        ));
    }
    let attr = |n: roxmltree::Node, a: &str| n.attribute(a).map(str::to_owned);
    let mut out = QubesXml::default();
    for pools in child_elements(root, "pools") {
        for p in child_elements(pools, "pool") {
            let Some(name) = attr(p, "name") else {
                return Err(xml_error(xml, "a <pool> element has no name attribute"));
            };
            out.pools.push(XmlPoolDef {
                name,
                driver: attr(p, "driver"),
                dir_path: attr(p, "dir_path").or_else(|| attr(p, "dir")),
                revisions_to_keep: attr(p, "revisions_to_keep"),
            });
        }
    }
    for domains in child_elements(root, "domains") {
        for d in child_elements(domains, "domain") {
            let qube = child_elements(d, "properties")
                .flat_map(|ps| child_elements(ps, "property"))
                .find(|p| p.attribute("name") == Some("name"))
                .and_then(|p| p.text())
                .map(|t| t.trim().to_owned());
            for vc in child_elements(d, "volume-config") {
                for v in child_elements(vc, "volume") {
                    out.volumes.push(XmlVol {
                        qube: qube.clone(),
                        pool: attr(v, "pool"),
                        vid: attr(v, "vid"),
                        size: attr(v, "size"),
                        rw: attr(v, "rw"),
                        save_on_stop: attr(v, "save_on_stop"),
                        snap_on_start: attr(v, "snap_on_start"),
                        source: attr(v, "source"),
                        revisions_to_keep: attr(v, "revisions_to_keep"),
                    });
                }
            }
        }
    }
    Ok(out)
}

/// A Qubes boolean as written in qubes.xml (`True`/`False`; the other
/// spellings `qubes.property.bool` accepts too).
fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Some(true),
        "false" | "no" | "off" | "0" | "" => Some(false),
        _ => None,
    }
}

/// Compares a `dir_path` of qubes.xml with PATH.
fn same_dir(a: &Path, b: &Path) -> bool {
    let norm = |p: &Path| -> PathBuf {
        std::path::absolute(p)
            .unwrap_or_else(|_| p.to_owned())
            .components()
            .collect()
    };
    if norm(a) == norm(b) {
        return true;
    }
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// The pools of qubes.xml whose volumes are adopted.
pub(super) fn choose_pools(
    xml: &QubesXml,
    xml_path: &Path,
    root: &Path,
    scan: &Scan,
    report: &mut AdoptReport,
) -> Result<Vec<XmlPoolDef>> {
    let adoptable = |p: &XmlPoolDef| {
        p.driver
            .as_deref()
            .is_none_or(|d| d == "file-reflink" || d == "file")
    };
    let by_path: Vec<&XmlPoolDef> = xml
        .pools
        .iter()
        .filter(|p| {
            p.dir_path
                .as_deref()
                .is_some_and(|d| same_dir(Path::new(d), root))
        })
        .collect();
    if !by_path.is_empty() {
        if let Some(p) = by_path.iter().find(|p| !adoptable(p)) {
            return Err(Error::InvalidValue {
                property: "qubes.xml".into(),
                reason: format!(
                    "pool {} at {} uses the {} driver; only file-reflink and file pools can be adopted",
                    p.name,
                    root.display(),
                    p.driver.as_deref().unwrap_or("?")
                ),
            });
        }
        for p in &by_path {
            report.xml_pools.push(XmlPool {
                name: p.name.clone(),
                driver: p.driver.clone(),
                dir_path: p.dir_path.clone(),
                matched_by: "dir_path".into(),
            });
        }
        return Ok(by_path.into_iter().cloned().collect());
    }
    // No pool names this directory (a copy, or disks moved): take the pool
    // whose volumes have their files here.
    let mut found: BTreeMap<&str, usize> = BTreeMap::new();
    for v in &xml.volumes {
        let (Some(pool), Some(vid)) = (&v.pool, &v.vid) else {
            continue;
        };
        if let Ok(vid) = vid.parse::<ValidVid>() {
            if scan.vols.get(&vid).is_some_and(VolFiles::has_any_image) {
                *found.entry(pool.as_str()).or_default() += 1;
            }
        }
    }
    found.retain(|name, _| xml.pools.iter().all(|p| p.name != *name || adoptable(p)));
    match found.len() {
        0 => Err(Error::InvalidValue {
            property: "qubes.xml".into(),
            reason: format!(
                "{} names no file-reflink or file pool at {}, and none of its volumes has an image there",
                xml_path.display(),
                root.display()
            ),
        }),
        1 => {
            let (name, n) = found.into_iter().next().expect("one");
            let def = xml.pools.iter().find(|p| p.name == name).cloned();
            let def = def.unwrap_or(XmlPoolDef {
                name: name.to_owned(),
                driver: None,
                dir_path: None,
                revisions_to_keep: None,
            });
            report.warnings.push(format!(
                "no pool in qubes.xml has dir_path {}; using pool {} ({n} of its volumes have images here{})",
                root.display(),
                def.name,
                def.dir_path
                    .as_deref()
                    .map(|d| format!("; its dir_path is {d}"))
                    .unwrap_or_default()
            ));
            report.xml_pools.push(XmlPool {
                name: def.name.clone(),
                driver: def.driver.clone(),
                dir_path: def.dir_path.clone(),
                matched_by: "images".into(),
            });
            Ok(vec![def])
        }
        _ => Err(Error::InvalidValue {
            property: "qubes.xml".into(),
            reason: format!(
                "no pool in it names {}, and the images here belong to volumes of several pools ({}); adopt needs one",
                root.display(),
                found.keys().copied().collect::<Vec<_>>().join(", ")
            ),
        }),
    }
}

/// The pool's default `revisions_to_keep`: the last one the chosen pools
/// give, else 1.
pub(super) fn default_keep(pools: &[XmlPoolDef], xml_path: &Path) -> Result<i64> {
    let mut keep = 1;
    for p in pools {
        if let Some(s) = &p.revisions_to_keep {
            match s.trim().parse::<i64>() {
                Ok(n) if n >= -1 => keep = n,
                _ => {
                    return Err(xml_error(
                        xml_path,
                        format!(
                            "pool {}: revisions_to_keep={s:?} is not an integer of at least -1",
                            p.name
                        ),
                    ))
                }
            }
        }
    }
    Ok(keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qubes_xml() {
        let text = r#"<?xml version='1.0' encoding='UTF-8'?>
<qubes version="3.0">
  <pools>
    <pool dir_path="/var/lib/qubes" driver="file-reflink" name="varlibqubes" revisions_to_keep="2"/>
    <pool dir_path="/var/lib/qubes/vm-kernels" driver="linux-kernel" name="linux-kernel"/>
  </pools>
  <domains>
    <domain class="TemplateVM" id="domain-1">
      <properties><property name="name">fedora</property></properties>
      <volume-config>
        <volume name="root" pool="varlibqubes" vid="vm-templates/fedora/root" size="1048576" rw="True" save_on_stop="True" snap_on_start="False" revisions_to_keep="1"/>
        <volume name="kernel" pool="linux-kernel" vid="6.1" rw="False"/>
      </volume-config>
    </domain>
  </domains>
</qubes>"#;
        let x = parse_qubes_xml(text, Path::new("q.xml")).unwrap();
        assert_eq!(x.pools.len(), 2);
        assert_eq!(x.pools[0].dir_path.as_deref(), Some("/var/lib/qubes"));
        assert_eq!(x.volumes.len(), 2);
        assert_eq!(x.volumes[0].qube.as_deref(), Some("fedora"));
        assert_eq!(
            x.volumes[0].vid.as_deref(),
            Some("vm-templates/fedora/root")
        );
        assert!(parse_qubes_xml("not xml", Path::new("q.xml")).is_err());
        assert!(parse_qubes_xml("<other/>", Path::new("q.xml")).is_err());
        assert_eq!(parse_bool("True"), Some(true));
        assert_eq!(parse_bool("False"), Some(false));
        assert_eq!(parse_bool("maybe"), None);
    }
}
