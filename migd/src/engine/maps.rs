//! Parsing of /proc/PID/smaps: the address-space layout with each area's mmap flags
//! (from `VmFlags`). Pure: tested without a process.

use serde::{Deserialize, Serialize};

/// One line of /proc/PID/maps plus the `VmFlags` of its smaps block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapArea {
    pub start: u64,
    pub end: u64,
    /// PROT_* bits.
    pub prot: i32,
    pub shared: bool,
    pub offset: u64,
    pub dev: String,
    pub inode: u64,
    /// The path or pseudo-name (`[heap]`, `[stack]`, `[vdso]`, ...), empty for anonymous.
    pub name: String,
    /// Two-letter VmFlags (e.g. "gd", "dc").
    pub vmflags: Vec<String>,
}

impl MapArea {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
    pub fn has_flag(&self, f: &str) -> bool {
        self.vmflags.iter().any(|v| v == f)
    }
    /// True for an area backed by a file (a path, possibly "(deleted)").
    pub fn is_file(&self) -> bool {
        self.inode != 0 && !self.name.starts_with('[')
    }

    /// True if `other` has the same line in /proc/PID/maps: range, protection,
    /// sharing, offset, file and name (the VmFlags are not compared).
    pub fn same_place(&self, other: &MapArea) -> bool {
        self.start == other.start
            && self.end == other.end
            && self.prot == other.prot
            && self.shared == other.shared
            && self.offset == other.offset
            && self.dev == other.dev
            && self.inode == other.inode
            && self.name == other.name
    }
}

/// `layout` (read from /proc/PID/maps, so without VmFlags) with the VmFlags of the
/// same areas in `earlier` (an smaps read before); `None` if some area of `layout`
/// is not in `earlier` as it is now (the layout changed: read smaps instead).
pub fn flags_from(layout: &[MapArea], earlier: &[MapArea]) -> Option<Vec<MapArea>> {
    let by_start: std::collections::HashMap<u64, &MapArea> =
        earlier.iter().map(|e| (e.start, e)).collect();
    layout
        .iter()
        .map(|a| {
            let e = by_start.get(&a.start)?;
            e.same_place(a).then(|| MapArea {
                vmflags: e.vmflags.clone(),
                ..a.clone()
            })
        })
        .collect()
}

/// The first difference between the areas a dump went by (`used`) and the address
/// space as smaps shows it (`now`): an area added, gone, moved, or with other
/// VmFlags. `None` if they are the same.
pub fn first_difference(used: &[MapArea], now: &[MapArea]) -> Option<String> {
    let show = |a: &MapArea| format!("{:#x}-{:#x} {}", a.start, a.end, a.name);
    for (u, n) in used.iter().zip(now) {
        if !u.same_place(n) {
            return Some(format!("area {} is now {}", show(u), show(n)));
        }
        if u.vmflags != n.vmflags {
            return Some(format!(
                "area {}: VmFlags [{}] are now [{}]",
                show(u),
                u.vmflags.join(" "),
                n.vmflags.join(" ")
            ));
        }
    }
    match used.len().cmp(&now.len()) {
        std::cmp::Ordering::Equal => None,
        std::cmp::Ordering::Less => Some(format!("area {} is new", show(&now[used.len()]))),
        std::cmp::Ordering::Greater => Some(format!("area {} is gone", show(&used[now.len()]))),
    }
}

/// Errors in /proc/PID/smaps text.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MapsError {
    #[error("smaps line {line}: cannot parse {what}: {text:?}")]
    Parse {
        line: usize,
        what: &'static str,
        text: String,
    },
}

fn parse_header(line_no: usize, line: &str) -> Result<MapArea, MapsError> {
    let err = |what| MapsError::Parse {
        line: line_no,
        what,
        text: line.to_string(),
    };
    let mut it = line.splitn(6, ' ');
    let range = it.next().ok_or_else(|| err("range"))?;
    let perms = it.next().ok_or_else(|| err("perms"))?;
    let offset = it.next().ok_or_else(|| err("offset"))?;
    let dev = it.next().ok_or_else(|| err("dev"))?;
    let inode = it.next().ok_or_else(|| err("inode"))?;
    let name = it.next().unwrap_or("").trim_start().to_string();
    let (s, e) = range.split_once('-').ok_or_else(|| err("range"))?;
    let start = u64::from_str_radix(s, 16).map_err(|_| err("start"))?;
    let end = u64::from_str_radix(e, 16).map_err(|_| err("end"))?;
    let p = perms.as_bytes();
    if p.len() != 4 {
        return Err(err("perms"));
    }
    let mut prot = 0;
    if p[0] == b'r' {
        prot |= libc::PROT_READ;
    }
    if p[1] == b'w' {
        prot |= libc::PROT_WRITE;
    }
    if p[2] == b'x' {
        prot |= libc::PROT_EXEC;
    }
    Ok(MapArea {
        start,
        end,
        prot,
        shared: p[3] == b's',
        offset: u64::from_str_radix(offset, 16).map_err(|_| err("offset"))?,
        dev: dev.to_string(),
        inode: inode.parse().map_err(|_| err("inode"))?,
        name,
        vmflags: Vec::new(),
    })
}

fn is_header(line: &str) -> bool {
    // Headers start with "hex-hex "; field lines start with "Name:".
    match line.split_once(' ') {
        Some((first, _)) => first.contains('-') && !first.ends_with(':'),
        None => false,
    }
}

/// Parses /proc/PID/smaps (or /proc/PID/maps, which then has no VmFlags).
pub fn parse_smaps(text: &str) -> Result<Vec<MapArea>, MapsError> {
    let mut out: Vec<MapArea> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        if is_header(line) {
            out.push(parse_header(i + 1, line)?);
        } else if let Some(rest) = line.strip_prefix("VmFlags:") {
            if let Some(last) = out.last_mut() {
                last.vmflags = rest.split_whitespace().map(str::to_string).collect();
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55d0c8a00000-55d0c8a02000 r--p 00000000 08:01 1234                       /usr/bin/cat
Size:                  8 kB
VmFlags: rd mr mw me dw sd
7ffd1c000000-7ffd1c021000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
VmFlags: rd wr mr mw me gd ac
7f0000000000-7f0000001000 rw-s 00000000 00:01 99                         /dev/zero (deleted)
VmFlags: rd wr sh mr mw me ms sd
7f0000002000-7f0000003000 ---p 00000000 00:00 0 
VmFlags: mr mw me
";

    #[test]
    fn smaps_headers_and_vmflags_are_parsed() {
        let m = parse_smaps(SAMPLE).unwrap();
        assert_eq!(m.len(), 4, "expected four areas, got {m:?}");
        assert_eq!(m[0].start, 0x55d0c8a00000);
        assert_eq!(m[0].prot, libc::PROT_READ);
        assert_eq!(m[0].name, "/usr/bin/cat");
        assert_eq!(m[0].inode, 1234);
        assert!(m[0].is_file());
        assert_eq!(m[1].name, "[stack]");
        assert!(
            m[1].has_flag("gd"),
            "stack must carry gd: {:?}",
            m[1].vmflags
        );
        assert_eq!(m[1].prot, libc::PROT_READ | libc::PROT_WRITE);
        assert!(m[2].shared);
        assert_eq!(m[2].name, "/dev/zero (deleted)");
        assert_eq!(m[3].prot, 0);
        assert_eq!(m[3].name, "");
        assert!(!m[3].is_file());
    }

    #[test]
    fn flags_come_from_the_earlier_read_only_where_the_layout_is_the_same() {
        let earlier = parse_smaps(SAMPLE).unwrap();
        let maps: String = SAMPLE
            .lines()
            .filter(|l| !l.starts_with("VmFlags") && !l.starts_with("Size"))
            .map(|l| format!("{l}\n"))
            .collect();
        let layout = parse_smaps(&maps).unwrap();
        assert!(layout.iter().all(|a| a.vmflags.is_empty()));
        let with = flags_from(&layout, &earlier).expect("same layout");
        assert_eq!(with, earlier);
        assert_eq!(first_difference(&with, &earlier), None);

        // An area that grew, or one the earlier read did not see: no flags to take.
        let mut grown = layout.clone();
        grown[1].end += 4096;
        assert_eq!(flags_from(&grown, &earlier), None);
        let mut moved = layout.clone();
        moved[3].start -= 4096;
        assert_eq!(flags_from(&moved, &earlier), None);
        let mut renamed = layout;
        renamed[0].name = "/usr/bin/dog".into();
        assert_eq!(flags_from(&renamed, &earlier), None);
    }

    #[test]
    fn a_flag_changed_or_an_area_added_is_a_difference_naming_the_area() {
        let used = parse_smaps(SAMPLE).unwrap();
        let mut now = used.clone();
        now[1].vmflags.push("dd".into());
        let d = first_difference(&used, &now).expect("a difference");
        assert!(d.contains("0x7ffd1c000000") && d.contains("dd"), "{d}");
        let mut more = used.clone();
        more.push(MapArea {
            start: 0x7f0000004000,
            end: 0x7f0000005000,
            ..used[3].clone()
        });
        let d = first_difference(&used, &more).expect("a difference");
        assert!(d.contains("is new"), "{d}");
        let d = first_difference(&more, &used).expect("a difference");
        assert!(d.contains("is gone"), "{d}");
    }

    #[test]
    fn garbage_header_is_an_error_naming_the_line() {
        let e = parse_smaps("zz-10 rw-p 0 00:00 0\n").unwrap_err();
        assert!(matches!(e, MapsError::Parse { line: 1, .. }), "got {e:?}");
    }
}
