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
    fn garbage_header_is_an_error_naming_the_line() {
        let e = parse_smaps("zz-10 rw-p 0 00:00 0\n").unwrap_err();
        assert!(matches!(e, MapsError::Parse { line: 1, .. }), "got {e:?}");
    }
}
