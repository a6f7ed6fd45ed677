//! Small readers of /proc/PID files. Parsing is pure and unit-tested.

use super::image::MmFields;

/// The last value of an "NSpid:"/"NStgid:"-style line of /proc/PID/status: the id as
/// the innermost pid namespace sees it.
pub fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':').map(str::trim))
}

pub fn innermost_id(status: &str, key: &str) -> Option<i32> {
    status_field(status, key)?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

pub fn id_triple(status: &str, key: &str) -> Option<[u32; 3]> {
    let v: Vec<u32> = status_field(status, key)?
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    (v.len() >= 3).then(|| [v[0], v[1], v[2]])
}

/// mm fields from /proc/PID/stat (brk and auxv are filled by the caller).
pub fn parse_stat_mm(stat: &str) -> Option<MmFields> {
    let rest = &stat[stat.rfind(')')? + 2..];
    // rest starts at field 3 (state).
    let f: Vec<&str> = rest.split_whitespace().collect();
    let g = |n: usize| -> Option<u64> { f.get(n - 3)?.parse().ok() };
    Some(MmFields {
        start_code: g(26)?,
        end_code: g(27)?,
        start_stack: g(28)?,
        start_data: g(45)?,
        end_data: g(46)?,
        start_brk: g(47)?,
        arg_start: g(48)?,
        arg_end: g(49)?,
        env_start: g(50)?,
        env_end: g(51)?,
        brk: 0,
        auxv: Vec::new(),
    })
}

/// Parent pid from /proc/PID/stat (field 4).
pub fn parse_stat_ppid(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Pids of the processes whose parent is `pid` (scanning /proc).
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
            if parse_stat_ppid(&stat) == Some(pid) {
                out.push(p);
            }
        }
    }
    out
}

/// auxv words up to and including AT_NULL.
pub fn parse_auxv(bytes: &[u8]) -> Vec<u64> {
    let mut out = Vec::new();
    for pair in bytes.chunks_exact(16) {
        let k = u64::from_ne_bytes(pair[..8].try_into().unwrap());
        let v = u64::from_ne_bytes(pair[8..].try_into().unwrap());
        out.push(k);
        out.push(v);
        if k == 0 {
            break;
        }
    }
    out
}

/// One block of /proc/PID/timers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcTimer {
    pub id: i32,
    pub signo: i32,
    pub sival: u64,
    /// SIGEV_* value (SIGEV_THREAD_ID bit included).
    pub notify: i32,
    /// The pid or tid to notify, as the reader's pid namespace sees it.
    pub target: i32,
    pub clockid: i32,
}

/// Parses /proc/PID/timers; None for a notify kind it does not know.
pub fn parse_timers(text: &str) -> Option<Vec<ProcTimer>> {
    let mut out: Vec<ProcTimer> = Vec::new();
    for line in text.lines() {
        let (k, v) = line.split_once(':')?;
        let v = v.trim();
        match k {
            "ID" => out.push(ProcTimer {
                id: v.parse().ok()?,
                signo: 0,
                sival: 0,
                notify: 0,
                target: 0,
                clockid: 0,
            }),
            "signal" => {
                let (s, p) = v.split_once('/')?;
                let t = out.last_mut()?;
                t.signo = s.parse().ok()?;
                t.sival = u64::from_str_radix(p, 16).ok()?;
            }
            "notify" => {
                let (kind, who) = v.split_once('/')?;
                let (pt, n) = who.split_once('.')?;
                let base = match kind {
                    "signal" => libc::SIGEV_SIGNAL,
                    "none" => libc::SIGEV_NONE,
                    "thread" => libc::SIGEV_THREAD,
                    _ => return None,
                };
                let t = out.last_mut()?;
                t.notify = base
                    | if pt == "tid" {
                        crate::sys::kabi::SIGEV_THREAD_ID
                    } else {
                        0
                    };
                t.target = n.parse().ok()?;
            }
            "ClockID" => out.last_mut()?.clockid = v.parse().ok()?,
            _ => {}
        }
    }
    Some(out)
}

/// (soft, hard) per resource, in RLIMIT_* order, from /proc/PID/limits.
pub fn parse_limits(text: &str) -> Vec<(u64, u64)> {
    let val = |s: &str| {
        if s == "unlimited" {
            Some(u64::MAX)
        } else {
            s.parse().ok()
        }
    };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let rest = l.get(26..)?;
            let mut w = rest.split_whitespace();
            Some((val(w.next()?)?, val(w.next()?)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn posix_timers_are_parsed_with_their_notification() {
        let t = "ID: 1\nsignal: 0/0000000000000000\nnotify: none/pid.8869\nClockID: 0\nID: 0\nsignal: 12/0000000000001234\nnotify: signal/tid.8870\nClockID: 1\n";
        let v = parse_timers(t).unwrap();
        assert_eq!(
            v[0],
            ProcTimer {
                id: 1,
                signo: 0,
                sival: 0,
                notify: libc::SIGEV_NONE,
                target: 8869,
                clockid: 0
            }
        );
        assert_eq!(
            v[1],
            ProcTimer {
                id: 0,
                signo: 12,
                sival: 0x1234,
                notify: libc::SIGEV_SIGNAL | 4,
                target: 8870,
                clockid: 1
            }
        );
        assert_eq!(parse_timers("ID: 3\nnotify: weird/pid.1\n"), None);
    }

    #[test]
    fn limits_file_gives_soft_and_hard_in_order() {
        let t = "Limit                     Soft Limit           Hard Limit           Units     \n\
Max cpu time              unlimited            unlimited            seconds   \n\
Max core file size        0                    unlimited            bytes     \n\
Max open files            1024                 524288               files     \n";
        assert_eq!(
            parse_limits(t),
            vec![(u64::MAX, u64::MAX), (0, u64::MAX), (1024, 524288)]
        );
    }

    #[test]
    fn status_ids_take_the_innermost_namespace() {
        let s = "Name:\tx\nUmask:\t0022\nNSpid:\t4242\t17\nUid:\t1\t2\t3\t4\n";
        assert_eq!(innermost_id(s, "NSpid"), Some(17));
        assert_eq!(id_triple(s, "Uid"), Some([1, 2, 3]));
        assert_eq!(status_field(s, "Umask"), Some("0022"));
    }

    #[test]
    fn stat_mm_fields_survive_a_comm_with_spaces_and_parens() {
        let mut fields = vec!["S".to_string()];
        for i in 4..=52 {
            fields.push(i.to_string());
        }
        let stat = format!("12 (a (b) c) {}", fields.join(" "));
        let m = parse_stat_mm(&stat).unwrap();
        assert_eq!(m.start_code, 26);
        assert_eq!(m.start_stack, 28);
        assert_eq!(m.env_end, 51);
        assert_eq!(parse_stat_ppid(&stat), Some(4));
    }
}
