//! Benchmark of the "/..." super-root against the native file system and sshfs.
//!
//! Starts a two-node local cluster. Every figure is taken on ws2, on three targets that
//! hold the same files:
//! - native: ws2's own /tmp (the machine's disk, no network);
//! - ferry: `/.../ws1/tmp/...`, ws1's /tmp through fuse-client and fs-server over the veth;
//! - sshfs: ws1's /tmp through Debian's sshfs over the same veth.
//!
//! It prints each figure and the ratios to native and to sshfs, all measured in this
//! one run. There are no pass/fail thresholds: the machines are shared and noisy.
//!
//! Usage: `bench-superroot [--mib 1024] [--files 10000]` (root; run `scripts/setup.sh`
//! first, or `scripts/bench.sh` which does).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use ferry_tests::Cluster;

#[derive(Parser)]
#[command(about = "Measure /... against native and sshfs on a local cluster")]
struct Args {
    /// Size of the sequential write and read, in MiB.
    #[arg(long, default_value_t = 1024)]
    mib: u64,
    /// Number of small files to create and stat.
    #[arg(long, default_value_t = 10_000)]
    files: u64,
}

/// The measurements, done by one python3 script inside the node so that the time of
/// entering the node is not counted. Each op prints its elapsed seconds.
const OPS: &str = r#"
import os, sys, time
op, root = sys.argv[1], sys.argv[2]
n = int(sys.argv[3])
t = time.perf_counter()
if op == "write":
    buf = os.urandom(1 << 20)
    fd = os.open(root + "/big", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for _ in range(n):
        os.write(fd, buf)
    os.fsync(fd)
    os.close(fd)
elif op == "read":
    fd = os.open(root + "/big", os.O_RDONLY)
    total = 0
    while True:
        b = os.read(fd, 1 << 20)
        if not b:
            break
        total += len(b)
    os.close(fd)
    assert total == n << 20, (total, n)
elif op == "create":
    for i in range(n):
        d = "%s/tree/d%03d" % (root, i % 100)
        if i < 100:
            os.makedirs(d, exist_ok=True)
        fd = os.open("%s/f%05d" % (d, i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"x" * 100)
        os.close(fd)
elif op == "stat":
    for i in range(n):
        os.stat("%s/tree/d%03d/f%05d" % (root, i % 100, i))
else:
    raise SystemExit("unknown op " + op)
print(time.perf_counter() - t)
"#;

struct Target {
    name: &'static str,
    /// Directory as seen from ws2.
    path: String,
}

fn main() -> Result<()> {
    common::logging::init("bench-superroot");
    let args = Args::parse();
    let started = Instant::now();
    eprintln!("starting a 2-node cluster ...");
    let cluster = Cluster::start(2);
    let ws1 = cluster.addr("ws1");

    eprintln!("starting sshd on ws1 and mounting it with sshfs on ws2 ...");
    let ssh = start_sshfs(&cluster, &ws1.to_string())?;

    cluster.sh_ok("ws2", "mkdir -p /tmp/native");
    cluster.sh_ok("ws1", "mkdir -p /tmp/ferry /tmp/sshfs-export");
    cluster.sh_ok("ws2", &format!("cat > /tmp/ops.py <<'PY'\n{OPS}\nPY"));
    let targets = [
        Target {
            name: "native",
            path: "/tmp/native".into(),
        },
        Target {
            name: "ferry",
            path: "/.../ws1/tmp/ferry".into(),
        },
        Target {
            name: "sshfs",
            path: ssh.clone(),
        },
    ];

    let mut rows: Vec<(String, &str, Vec<f64>)> = Vec::new();
    let mib = args.mib;
    let mut seq = |label: &str, op: &str, n: u64, unit: &'static str, per: f64| -> Result<()> {
        let mut figures = Vec::new();
        for t in &targets {
            if op == "read" || op == "stat" || op == "find" {
                drop_caches(&cluster)?;
            }
            let secs = if op == "find" {
                let t0 = Instant::now();
                let out = cluster.sh_ok("ws2", &format!("find {}/tree | wc -l", t.path));
                let secs = t0.elapsed().as_secs_f64();
                let count: u64 = out.trim().parse().context("find output")?;
                if count != n + 101 {
                    bail!(
                        "find on {} saw {count} entries, expected {}",
                        t.name,
                        n + 101
                    );
                }
                secs
            } else {
                let out = cluster.sh_ok("ws2", &format!("python3 /tmp/ops.py {op} {} {n}", t.path));
                out.trim()
                    .parse::<f64>()
                    .with_context(|| format!("{op} output {out:?}"))?
            };
            eprintln!("  {label:<28} {:<7} {secs:>8.3} s", t.name);
            figures.push(per / secs);
        }
        rows.push((label.to_string(), unit, figures));
        Ok(())
    };

    let mb = (mib << 20) as f64 / 1e6;
    seq(
        &format!("sequential write {mib} MiB"),
        "write",
        mib,
        "MB/s",
        mb,
    )?;
    seq(
        &format!("sequential read {mib} MiB"),
        "read",
        mib,
        "MB/s",
        mb,
    )?;
    let files = args.files;
    seq(
        &format!("create {files} files"),
        "create",
        files,
        "files/s",
        files as f64,
    )?;
    seq(
        &format!("stat {files} files"),
        "stat",
        files,
        "stats/s",
        files as f64,
    )?;
    seq(
        &format!("find over {} entries", files + 101),
        "find",
        files,
        "entries/s",
        (files + 101) as f64,
    )?;

    println!();
    println!(
        "# /... (ferry) against native and sshfs, from ws2 to ws1 over veth; higher is better"
    );
    println!(
        "{:<30} {:>10} {:>12} {:>12} {:>12} {:>9} {:>9}",
        "figure", "unit", "native", "ferry", "sshfs", "f/native", "f/sshfs"
    );
    for (label, unit, f) in &rows {
        println!(
            "{label:<30} {unit:>10} {:>12.0} {:>12.0} {:>12.0} {:>9.2} {:>9.2}",
            f[0],
            f[1],
            f[2],
            f[1] / f[0],
            f[1] / f[2]
        );
    }
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
    cluster.sh("ws2", &format!("fusermount3 -u {ssh}"));
    Ok(())
}

fn drop_caches(cluster: &Cluster) -> Result<()> {
    // Page caches are global: dropping them on one node drops them for all, the
    // client's (FUSE) pages and the server's alike.
    cluster.sh_ok("ws1", "sync; echo 3 > /proc/sys/vm/drop_caches");
    Ok(())
}

/// Runs sshd in ws1 (its own keys and config in the cluster directory, listening on
/// ws1's address only) and mounts ws1:/tmp/sshfs-export on ws2 at /tmp/sshfs.
fn start_sshfs(cluster: &Cluster, ws1_addr: &str) -> Result<String> {
    for bin in ["/usr/sbin/sshd", "/usr/bin/sshfs", "/usr/bin/ssh-keygen"] {
        if !std::path::Path::new(bin).exists() {
            bail!("{bin} is missing: run scripts/setup.sh (it installs openssh-server and sshfs)");
        }
    }
    let dir = cluster.dir().join("ssh");
    let d = dir.display();
    std::fs::create_dir_all(&dir)?;
    let script = format!(
        r#"set -e
ssh-keygen -q -t ed25519 -N '' -f {d}/host_key
ssh-keygen -q -t ed25519 -N '' -f {d}/client_key
cp {d}/client_key.pub {d}/authorized_keys
chmod 600 {d}/authorized_keys
cat > {d}/sshd_config <<EOF
ListenAddress {ws1_addr}
Port 22
HostKey {d}/host_key
AuthorizedKeysFile {d}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
PidFile {d}/sshd.pid
EOF
"#
    );
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .output()?;
    if !out.status.success() {
        bail!("preparing sshd: {}", String::from_utf8_lossy(&out.stderr));
    }
    cluster.sh_ok(
        "ws1",
        &format!("mkdir -p /run/sshd /tmp/sshfs-export && /usr/sbin/sshd -f {d}/sshd_config -E {d}/sshd.log"),
    );
    cluster.sh_ok(
        "ws2",
        &format!(
            "mkdir -p /tmp/sshfs && for i in 1 2 3 4 5 6 7 8 9 10; do \
             sshfs -o IdentityFile={d}/client_key,StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes \
             root@{ws1_addr}:/tmp/sshfs-export /tmp/sshfs && exit 0; sleep 0.5; done; exit 1"
        ),
    );
    Ok("/tmp/sshfs".into())
}
