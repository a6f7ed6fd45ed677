//! Registers as stored in the image (user_regs_struct as 27 words), and the fix-ups a
//! thread frozen inside a system call needs before it runs again.

use crate::sys::Regs;

macro_rules! regs_fields {
    ($m:ident) => {
        $m!(
            r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi, orig_rax, rip,
            cs, eflags, rsp, ss, fs_base, gs_base, ds, es, fs, gs
        )
    };
}

pub fn to_words(r: &Regs) -> Vec<u64> {
    macro_rules! w { ($($f:ident),*) => { vec![$(r.$f),*] } }
    regs_fields!(w)
}

pub fn from_words(w: &[u64]) -> Option<Regs> {
    if w.len() != 27 {
        return None;
    }
    // SAFETY: user_regs_struct is plain integers; all-zero is a valid value.
    let mut r: Regs = unsafe { std::mem::zeroed() };
    let mut i = 0;
    macro_rules! s { ($($f:ident),*) => { $( r.$f = w[i]; i += 1; )* } }
    regs_fields!(s);
    let _ = i;
    Some(r)
}

const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;
const ERESTART_RESTARTBLOCK: i64 = 516;

/// Prepares registers saved at a freeze for running in a new process: an interrupted
/// restartable call is re-issued (rax = orig_rax, rip -= 2), a call that needed the
/// lost restart block returns -EINTR, and orig_rax = -1 so that the kernel does not
/// rewind rip again.
pub fn fix_for_restore(r: &mut Regs) {
    if (r.orig_rax as i64) >= 0 {
        let rax = r.rax as i64;
        if rax == -ERESTARTSYS || rax == -ERESTARTNOINTR || rax == -ERESTARTNOHAND {
            r.rax = r.orig_rax;
            r.rip -= 2;
        } else if rax == -ERESTART_RESTARTBLOCK {
            r.rax = (-(libc::EINTR as i64)) as u64;
        }
    }
    r.orig_rax = u64::MAX;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip() {
        let w: Vec<u64> = (0..27).collect();
        let r = from_words(&w).unwrap();
        assert_eq!(r.rip, 16);
        assert_eq!(r.fs_base, 21);
        assert_eq!(to_words(&r), w);
    }

    #[test]
    fn interrupted_syscall_is_reissued_and_restartblock_becomes_eintr() {
        let mut r = from_words(&[0; 27]).unwrap();
        r.orig_rax = 34; // pause
        r.rax = (-514i64) as u64;
        r.rip = 0x1002;
        fix_for_restore(&mut r);
        assert_eq!((r.rax, r.rip, r.orig_rax), (34, 0x1000, u64::MAX));
        r.orig_rax = 35; // nanosleep
        r.rax = (-516i64) as u64;
        r.rip = 0x2002;
        fix_for_restore(&mut r);
        assert_eq!((r.rax as i64, r.rip), (-4, 0x2002));
    }
}
