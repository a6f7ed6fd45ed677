//! Rebuilding the address space inside the seized child: drop what it inherited from
//! migd, move the vDSO block to its old place, map every area at its old address with
//! its old protection, fill the saved pages, and set the mm fields.

use super::{Ctx, RestoreError};
use crate::engine::image::{Area, AreaKind, Manifest};
use crate::engine::maps::{parse_smaps, MapArea};
use crate::sys::{self, kabi};

fn vdso_kind(name: &str) -> Option<AreaKind> {
    match name {
        "[vvar]" => Some(AreaKind::Vvar),
        "[vvar_vclock]" => Some(AreaKind::VvarVclock),
        "[vdso]" => Some(AreaKind::Vdso),
        _ => None,
    }
}

/// The vDSO block of the image must have the layout this kernel makes.
pub fn check_vdso_layout(m: &Manifest) -> Result<(), RestoreError> {
    let own = parse_smaps(&std::fs::read_to_string("/proc/self/maps").unwrap_or_default())
        .unwrap_or_default();
    for kind in [AreaKind::Vvar, AreaKind::VvarVclock, AreaKind::Vdso] {
        let img = m
            .areas
            .iter()
            .find(|a| a.kind == kind)
            .map(|a| a.end - a.start);
        let here = own
            .iter()
            .find(|a| vdso_kind(&a.name).as_ref() == Some(&kind))
            .map(|a| a.len());
        if img != here {
            return Err(RestoreError::Refused {
                what: format!("vDSO layout differs: {kind:?} is {img:?} bytes in the image, {here:?} here (different kernel?)"),
            });
        }
    }
    Ok(())
}

fn smaps_of(pid: i32) -> Result<Vec<MapArea>, RestoreError> {
    let p = format!("/proc/{pid}/smaps");
    let t = std::fs::read_to_string(&p).map_err(|source| RestoreError::Io { path: p, source })?;
    parse_smaps(&t).map_err(|e| RestoreError::Other {
        what: e.to_string(),
    })
}

pub fn rebuild(ctx: &Ctx, m: &Manifest, pages: &[u8]) -> Result<(), RestoreError> {
    let mut ph = crate::phases::Phases::new("memory");
    let t = &ctx.leader;
    // 1. The stub's rseq registration points into memory about to go away.
    let conf = t.rseq()?;
    if conf.rseq_abi_pointer != 0 {
        ctx.ok(
            t,
            libc::SYS_rseq,
            &[
                conf.rseq_abi_pointer,
                conf.rseq_abi_size as u64,
                kabi::RSEQ_FLAG_UNREGISTER,
                conf.signature as u64,
            ],
            "rseq(unregister)",
        )?;
    }
    // 2. No fd of migd survives, except those handed in with --inherit-fd.
    let mut keep: Vec<u64> = ctx.inherit.iter().map(|(fd, _)| *fd as u64).collect();
    keep.sort();
    keep.dedup();
    let mut from = 0u64;
    for k in keep
        .iter()
        .copied()
        .chain(std::iter::once(u32::MAX as u64 + 1))
    {
        if k > from {
            ctx.ok(t, kabi::SYS_CLOSE_RANGE, &[from, k - 1, 0], "close_range")?;
        }
        from = k + 1;
    }
    // 3. Unmap everything inherited except the gadget and the vDSO block: one
    // munmap per span of areas between two kept ones (the gaps inside a span are
    // unmapped already, which munmap allows), not one per area.
    let own = smaps_of(ctx.pid)?;
    let kept = |a: &MapArea| {
        a.name == "[vsyscall]"
            || vdso_kind(&a.name).is_some()
            || (a.start >= ctx.gadget && a.end <= ctx.gadget + ctx.gadget_len)
    };
    for (start, end) in spans_between(&own, kept) {
        ctx.ok(
            t,
            libc::SYS_munmap,
            &[start, end - start],
            &format!("munmap({start:#x}-{end:#x})"),
        )?;
    }
    ph.mark("unmap");
    create_memfds(ctx, m, pages)?;
    // 4. vDSO block to its old place.
    move_vdso(ctx, m, &own)?;
    // 5. Map the areas; each file is opened once for all its areas (an open of a
    // home file goes to the home's fs-server).
    let mut opened = std::collections::BTreeMap::new();
    let mapped = m
        .areas
        .iter()
        .try_for_each(|a| map_area(ctx, a, &mut opened));
    for fd in opened.into_values() {
        ctx.ok(t, libc::SYS_close, &[fd as u64], "close")?;
    }
    mapped?;
    ph.mark("map");
    // 6. Fill.
    for a in &m.areas {
        for &(addr, n, off) in &a.runs {
            let len = (n * sys::page_size()) as usize;
            let src =
                pages
                    .get(off as usize..off as usize + len)
                    .ok_or_else(|| RestoreError::Other {
                        what: format!("area {:#x}: page run beyond pages.img", a.start),
                    })?;
            let mut done = 0;
            while done < len {
                let w = sys::vm_write(ctx.pid, addr + done as u64, &src[done..]).map_err(|e| {
                    RestoreError::Other {
                        what: format!("writing pages at {:#x}: {e}", addr + done as u64),
                    }
                })?;
                if w == 0 {
                    return Err(RestoreError::Other {
                        what: format!("writing pages at {:#x}: short write", addr + done as u64),
                    });
                }
                done += w;
            }
        }
    }
    ph.mark("fill");
    let filled: u64 = m.areas.iter().flat_map(|a| &a.runs).map(|r| r.1).sum();
    tracing::debug!(
        bytes = filled * sys::page_size(),
        "pages filled before the process runs"
    );
    // 7. Final protections and madvise bits.
    for a in &m.areas {
        if is_vdso(a) {
            continue;
        }
        if fill_prot(a) != a.prot {
            ctx.ok(
                t,
                libc::SYS_mprotect,
                &[a.start, a.end - a.start, a.prot as u64],
                &format!("mprotect({:#x})", a.start),
            )?;
        }
        for f in &a.madv {
            let advice = match f.as_str() {
                "dc" => libc::MADV_DONTFORK,
                "dd" => libc::MADV_DONTDUMP,
                "wf" => libc::MADV_WIPEONFORK,
                "hg" => libc::MADV_HUGEPAGE,
                "nh" => libc::MADV_NOHUGEPAGE,
                _ => continue,
            };
            ctx.ok(
                t,
                libc::SYS_madvise,
                &[a.start, a.end - a.start, advice as u64],
                &format!("madvise({:#x}, {f})", a.start),
            )?;
        }
    }
    ph.mark("protections");
    // 8. mm fields, auxv and exe.
    set_mm(ctx, m)?;
    ph.mark("mm");
    ph.log();
    Ok(())
}

/// The address ranges covering the areas of `own` (in address order) that are not
/// `kept`, each as wide as it can be without taking in a kept area.
fn spans_between(own: &[MapArea], kept: impl Fn(&MapArea) -> bool) -> Vec<(u64, u64)> {
    let mut spans: Vec<(u64, u64)> = Vec::new();
    let mut open = false;
    for a in own {
        if kept(a) {
            open = false;
        } else if open {
            spans.last_mut().expect("an open span").1 = a.end;
        } else {
            spans.push((a.start, a.end));
            open = true;
        }
    }
    spans
}

fn is_vdso(a: &Area) -> bool {
    matches!(
        a.kind,
        AreaKind::Vvar | AreaKind::VvarVclock | AreaKind::Vdso
    )
}

fn fill_prot(a: &Area) -> i32 {
    if a.runs.is_empty() {
        a.prot
    } else {
        a.prot | libc::PROT_READ | libc::PROT_WRITE
    }
}

fn move_vdso(ctx: &Ctx, m: &Manifest, own: &[MapArea]) -> Result<(), RestoreError> {
    let t = &ctx.leader;
    let cur: Vec<&MapArea> = own
        .iter()
        .filter(|a| vdso_kind(&a.name).is_some())
        .collect();
    let want: Vec<&Area> = m.areas.iter().filter(|a| is_vdso(a)).collect();
    if want.is_empty() {
        for a in cur {
            ctx.ok(t, libc::SYS_munmap, &[a.start, a.len()], "munmap(vdso)")?;
        }
        return Ok(());
    }
    let (cs, ce) = (
        cur.iter().map(|a| a.start).min().unwrap_or(0),
        cur.iter().map(|a| a.end).max().unwrap_or(0),
    );
    let (ws, we) = (
        want.iter().map(|a| a.start).min().unwrap_or(0),
        want.iter().map(|a| a.end).max().unwrap_or(0),
    );
    if cs == ws && ce == we {
        return Ok(());
    }
    let mremap = |from: u64, len: u64, to: u64| {
        ctx.ok(
            t,
            libc::SYS_mremap,
            &[
                from,
                len,
                len,
                (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                to,
            ],
            &format!("mremap(vdso {from:#x} -> {to:#x})"),
        )
    };
    let mut base = cs;
    if cs < we && ws < ce {
        // Overlap: go through a free hole first.
        let hole = super::free_hole(
            &m.areas,
            ce - cs,
            &[(ctx.gadget, ctx.gadget + ctx.gadget_len), (ws, we)],
        )?;
        for a in &cur {
            mremap(a.start, a.len(), hole + (a.start - cs))?;
        }
        base = hole;
    }
    for a in &cur {
        let kind = vdso_kind(&a.name);
        let w = want
            .iter()
            .find(|w| Some(&w.kind) == kind.as_ref())
            .ok_or_else(|| RestoreError::Refused {
                what: format!("{} exists here but not in the image", a.name),
            })?;
        mremap(base + (a.start - cs), a.len(), w.start)?;
    }
    Ok(())
}

/// Maps area `a` in the process; a file is opened there (once: `opened` keeps the
/// fds by path and mode, for the caller to close).
fn map_area(
    ctx: &Ctx,
    a: &Area,
    opened: &mut std::collections::BTreeMap<(String, i32), i32>,
) -> Result<(), RestoreError> {
    let t = &ctx.leader;
    let len = a.end - a.start;
    let prot = fill_prot(a) as u64;
    let mut flags = libc::MAP_FIXED
        | if a.shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
    if a.growsdown {
        flags |= libc::MAP_GROWSDOWN;
    }
    let what = format!("mmap({:#x}-{:#x} {})", a.start, a.end, a.name);
    match &a.kind {
        AreaKind::Vvar | AreaKind::VvarVclock | AreaKind::Vdso => Ok(()),
        AreaKind::Anon | AreaKind::DeletedFile { .. } => {
            flags |= libc::MAP_ANONYMOUS;
            ctx.ok(
                t,
                libc::SYS_mmap,
                &[a.start, len, prot, flags as u64, u64::MAX, 0],
                &what,
            )
            .map(drop)
        }
        AreaKind::Memfd { ino, .. } => {
            let fd = *ctx
                .memfds
                .borrow()
                .get(ino)
                .ok_or_else(|| RestoreError::Other {
                    what: format!("{what}: memfd {ino} missing"),
                })?;
            flags = libc::MAP_FIXED | libc::MAP_SHARED;
            ctx.ok(
                t,
                libc::SYS_mmap,
                &[a.start, len, prot, flags as u64, fd as u64, a.offset],
                &what,
            )
            .map(drop)
        }
        AreaKind::SharedMem { .. } => {
            flags = libc::MAP_FIXED | libc::MAP_SHARED | libc::MAP_ANONYMOUS;
            ctx.ok(
                t,
                libc::SYS_mmap,
                &[a.start, len, prot, flags as u64, u64::MAX, 0],
                &what,
            )
            .map(drop)
        }
        AreaKind::File { path, .. } => {
            let mode = if a.shared && a.prot & libc::PROT_WRITE != 0 {
                libc::O_RDWR
            } else {
                libc::O_RDONLY
            };
            let fd = match opened.get(&(path.clone(), mode)) {
                Some(&fd) => fd,
                None => {
                    let fd = ctx.open(t, path, mode | libc::O_CLOEXEC, 0)?;
                    opened.insert((path.clone(), mode), fd);
                    fd
                }
            };
            ctx.ok(
                t,
                libc::SYS_mmap,
                &[a.start, len, prot, flags as u64, fd as u64, a.offset],
                &what,
            )
            .map(drop)
        }
    }
}

fn set_mm(ctx: &Ctx, m: &Manifest) -> Result<(), RestoreError> {
    let t = &ctx.leader;
    let exe_fd = ctx
        .open(t, &m.exe, libc::O_RDONLY | libc::O_CLOEXEC, 0)
        .ok();
    let mm = &m.mm;
    let auxv_bytes: Vec<u8> = mm.auxv.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let auxv_addr = ctx.put(2048, &auxv_bytes)?;
    let map = kabi::PrctlMmMap {
        start_code: mm.start_code,
        end_code: mm.end_code,
        start_data: mm.start_data,
        end_data: mm.end_data,
        start_brk: mm.start_brk,
        brk: mm.brk,
        start_stack: mm.start_stack,
        arg_start: mm.arg_start,
        arg_end: mm.arg_end,
        env_start: mm.env_start,
        env_end: mm.env_end,
        auxv: auxv_addr,
        auxv_size: auxv_bytes.len() as u32,
        exe_fd: exe_fd.map(|f| f as u32).unwrap_or(u32::MAX),
    };
    // SAFETY-free byte view: PrctlMmMap is repr(C) integers; copy field by field.
    let bytes = mm_map_bytes(&map);
    let addr = ctx.put(0, &bytes)?;
    ctx.ok(
        t,
        libc::SYS_prctl,
        &[
            kabi::PR_SET_MM as u64,
            kabi::PR_SET_MM_MAP,
            addr,
            bytes.len() as u64,
            0,
        ],
        "prctl(PR_SET_MM_MAP)",
    )?;
    if let Some(fd) = exe_fd {
        ctx.ok(t, libc::SYS_close, &[fd as u64], "close")?;
    }
    Ok(())
}

fn mm_map_bytes(m: &kabi::PrctlMmMap) -> Vec<u8> {
    let mut v = Vec::with_capacity(104);
    for w in [
        m.start_code,
        m.end_code,
        m.start_data,
        m.end_data,
        m.start_brk,
        m.brk,
        m.start_stack,
        m.arg_start,
        m.arg_end,
        m.env_start,
        m.env_end,
        m.auxv,
    ] {
        v.extend_from_slice(&w.to_ne_bytes());
    }
    v.extend_from_slice(&m.auxv_size.to_ne_bytes());
    v.extend_from_slice(&m.exe_fd.to_ne_bytes());
    v
}

/// Recreates each memfd of the image once (by inode), sized and filled, at an fd above
/// every number the process will use.
fn create_memfds(ctx: &Ctx, m: &Manifest, pages: &[u8]) -> Result<(), RestoreError> {
    use crate::engine::image::FdKind;
    use std::collections::BTreeMap;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let t = &ctx.leader;
    // ino -> (name, size, data range in pages.img)
    type Want = (String, u64, Option<(u64, u64)>);
    let mut want: BTreeMap<u64, Want> = BTreeMap::new();
    for a in &m.areas {
        if let AreaKind::Memfd { name, ino, size } = &a.kind {
            want.entry(*ino).or_insert((name.clone(), *size, None));
        }
    }
    for f in &m.fds {
        if let FdKind::Memfd {
            name,
            ino,
            data_off,
            len,
            ..
        } = &f.kind
        {
            if f.dup_of.is_none() {
                let e = want.entry(*ino).or_insert((name.clone(), *len, None));
                e.1 = e.1.max(*len);
                e.2 = Some((*data_off, *len));
            }
        }
    }
    if want.is_empty() {
        return Ok(());
    }
    let high = m.fds.iter().map(|f| f.fd).max().unwrap_or(2) as u64 + 2 * m.fds.len() as u64 + 64;
    let pidfd = sys::pidfd_open(ctx.pid).map_err(|e| RestoreError::Other {
        what: format!("pidfd_open: {e}"),
    })?;
    for (ino, (name, size, data)) in want {
        let mut b = name.as_bytes().to_vec();
        b.truncate(249);
        b.push(0);
        let a = ctx.put(1024, &b)?;
        let flags = (libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) as u64;
        let low = ctx.ok(
            t,
            libc::SYS_memfd_create,
            &[a, flags],
            &format!("memfd_create({name})"),
        )?;
        let fd = ctx.ok(
            t,
            libc::SYS_fcntl,
            &[low as u64, libc::F_DUPFD_CLOEXEC as u64, high],
            "fcntl(F_DUPFD_CLOEXEC)",
        )?;
        ctx.ok(t, libc::SYS_close, &[low as u64], "close")?;
        ctx.ok(
            t,
            libc::SYS_ftruncate,
            &[fd as u64, size],
            &format!("ftruncate(memfd {name})"),
        )?;
        if let Some((off, len)) = data {
            let ours = sys::pidfd_getfd(pidfd.as_raw_fd(), fd as i32).map_err(|e| {
                RestoreError::Other {
                    what: format!("memfd {name}: pidfd_getfd: {e}"),
                }
            })?;
            let src = pages
                .get(off as usize..(off + len) as usize)
                .ok_or_else(|| RestoreError::Other {
                    what: format!("memfd {name}: data beyond pages.img"),
                })?;
            std::fs::File::from(ours)
                .write_all_at(src, 0)
                .map_err(|source| RestoreError::Io {
                    path: format!("memfd:{name}"),
                    source,
                })?;
        }
        ctx.memfds.borrow_mut().insert(ino, fd as i32);
    }
    Ok(())
}

/// Re-adds memfd seals and closes the engine's own references.
pub fn finish_memfds(ctx: &Ctx, m: &Manifest) -> Result<(), RestoreError> {
    use crate::engine::image::FdKind;
    let t = &ctx.leader;
    for (ino, fd) in ctx.memfds.borrow().iter() {
        let seals = m.fds.iter().find_map(|f| match &f.kind {
            FdKind::Memfd { ino: i, seals, .. } if i == ino => Some(*seals),
            _ => None,
        });
        if let Some(s) = seals.filter(|s| *s != 0) {
            // F_SEAL_WRITE is refused while a writable shared mapping exists; the
            // original had it only if it had none, so a failure here is not fatal.
            let r = ctx.inj.call(
                t,
                libc::SYS_fcntl,
                &[*fd as u64, libc::F_ADD_SEALS as u64, s as u64],
            )?;
            if r.ret < 0 {
                tracing::warn!(
                    ino,
                    seals = s,
                    errno = -r.ret,
                    "could not re-add memfd seals"
                );
            }
        }
        ctx.ok(t, libc::SYS_close, &[*fd as u64], "close(memfd)")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area(start: u64, end: u64, name: &str) -> MapArea {
        MapArea {
            start,
            end,
            prot: libc::PROT_READ,
            shared: false,
            offset: 0,
            dev: "00:00".into(),
            inode: 0,
            name: name.into(),
            vmflags: Vec::new(),
        }
    }

    /// Spans run across gaps and stop at every kept area; nothing kept is in one.
    #[test]
    fn spans_between_kept_areas_cover_the_rest_and_no_kept_area() {
        let own = [
            area(0x1000, 0x2000, "a"),
            area(0x5000, 0x6000, "b"),
            area(0x6000, 0x8000, "[vdso]"),
            area(0x9000, 0xa000, "c"),
            area(0xa000, 0xb000, "d"),
            area(0xc000, 0xd000, "[vvar]"),
            area(0xf000, 0x10000, "e"),
            area(0xffff_ffff_ff60_0000, 0xffff_ffff_ff60_1000, "[vsyscall]"),
        ];
        let kept = |a: &MapArea| a.name.starts_with("[v");
        assert_eq!(
            spans_between(&own, kept),
            vec![(0x1000, 0x6000), (0x9000, 0xb000), (0xf000, 0x10000)]
        );
        assert_eq!(spans_between(&own[2..3], kept), vec![]);
    }
}
