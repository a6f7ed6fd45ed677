//! The "/..." super-root, end to end: real fs-servers and fuse-clients on a local
//! cluster, real programs on the mounts. Needs root.
//!
//! Paths: from any node, `/.../ws1/tmp/...` is ws1's private /tmp, which the host sees
//! at `DIR/ws1/tmp/...`; tests write through one node and check on another, or on
//! the host (the server's disk).

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Stdio};

use ferry_tests::{Cluster, Signal};

/// A cluster with a working super-root (fs-server and fuse-client on every node).
fn fs_cluster(nodes: usize) -> Cluster {
    let c = Cluster::start(nodes);
    c.require(&["fs-server", "fuse-client"]);
    c
}

/// Runs a Python script in a node with `args` as sys.argv[1:]; panics (with its
/// traceback and the node's logs) unless it succeeds. Returns stdout.
fn py(c: &Cluster, node: &str, script: &str, args: &[&str]) -> String {
    let mut argv = vec!["python3", "-c", script];
    argv.extend_from_slice(args);
    c.run_ok(node, &argv)
}

/// ws1's /tmp as the host sees it.
fn ws1_tmp(c: &Cluster) -> PathBuf {
    c.dir().join("ws1/tmp")
}

fn sha256_host(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[test]
fn every_node_sees_every_volume_and_each_node_root_is_that_node() {
    let c = fs_cluster(3);
    for n in c.nodes() {
        let listing = c.sh_ok(&n, "ls /...");
        let mut names: Vec<&str> = listing.lines().collect();
        names.sort();
        assert_eq!(names, ["store", "ws1", "ws2", "ws3"], "/... on {n}");
    }
    for n in c.nodes() {
        c.sh_ok(&n, &format!("echo {n} > /tmp/whoami"));
    }
    for reader in c.nodes() {
        for owner in c.nodes() {
            let got = c.sh_ok(&reader, &format!("cat /.../{owner}/tmp/whoami"));
            assert_eq!(got.trim(), owner, "{reader} reads /.../{owner}/tmp/whoami");
        }
    }
}

// ---------------------------------------------------------------------------------
// POSIX matrix, from ws2 onto ws1's volume

const POSIX_PRELUDE: &str = r#"
import os, sys, stat, errno
base = sys.argv[1]
os.makedirs(base, exist_ok=True)
def expect_errno(code, f, *a):
    try:
        f(*a)
    except OSError as e:
        assert e.errno == code, f"{f.__name__}{a}: errno {e.errno} ({e.strerror}), expected {errno.errorcode[code]}"
        return
    raise AssertionError(f"{f.__name__}{a} succeeded, expected {errno.errorcode[code]}")
"#;

fn posix(c: &Cluster, body: &str) -> String {
    let script = format!("{POSIX_PRELUDE}\n{body}");
    py(c, "ws2", &script, &["/.../ws1/tmp/posix"])
}

#[test]
fn create_write_append_read_back() {
    let c = fs_cluster(2);
    posix(
        &c,
        r#"
p = os.path.join(base, "f")
with open(p, "wb") as f: f.write(b"hello")
with open(p, "ab") as f: f.write(b" world")
with open(p, "rb") as f: assert f.read() == b"hello world", "content after append"
fd = os.open(p, os.O_WRONLY | os.O_APPEND)
os.lseek(fd, 0, os.SEEK_SET)
os.write(fd, b"!")          # O_APPEND writes at the end whatever the offset
os.close(fd)
with open(p, "rb") as f: assert f.read() == b"hello world!", "O_APPEND ignored the offset"
assert os.stat(p).st_size == 12
"#,
    );
    let host = std::fs::read(ws1_tmp(&c).join("posix/f")).unwrap();
    assert_eq!(host, b"hello world!", "ws1's disk holds what ws2 wrote");
}

#[test]
fn o_excl_refuses_an_existing_name() {
    let c = fs_cluster(2);
    posix(
        &c,
        r#"
p = os.path.join(base, "x")
fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644); os.close(fd)
expect_errno(errno.EEXIST, os.open, p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
"#,
    );
}

#[test]
fn truncate_shrinks_and_extends_with_zeros() {
    let c = fs_cluster(2);
    posix(
        &c,
        r#"
p = os.path.join(base, "t")
with open(p, "wb") as f: f.write(b"0123456789")
os.truncate(p, 4)
with open(p, "rb") as f: assert f.read() == b"0123", "shrunk content"
os.truncate(p, 8)
with open(p, "rb") as f: assert f.read() == b"0123\0\0\0\0", "extended content"
with open(p, "r+b") as f:
    f.truncate(2)
with open(p, "rb") as f: assert f.read() == b"01", "ftruncate through an open file"
with open(p, "wb") as f: pass
assert os.stat(p).st_size == 0, "O_TRUNC"
"#,
    );
}

#[test]
fn rename_over_an_existing_file_replaces_it() {
    let c = fs_cluster(2);
    posix(
        &c,
        r#"
a = os.path.join(base, "a"); b = os.path.join(base, "b")
with open(a, "w") as f: f.write("new")
with open(b, "w") as f: f.write("old")
held = open(b)               # an open handle on the replaced file keeps its data
os.rename(a, b)
assert not os.path.exists(a)
with open(b) as f: assert f.read() == "new", "rename did not replace"
assert held.read() == "old", "the replaced file's open handle lost its data"
held.close()
os.mkdir(os.path.join(base, "d"))
os.rename(b, os.path.join(base, "d", "moved"))
with open(os.path.join(base, "d", "moved")) as f: assert f.read() == "new"
"#,
    );
}

#[test]
fn unlinked_open_file_keeps_its_data_until_closed() {
    let c = fs_cluster(2);
    posix(
        &c,
        r#"
p = os.path.join(base, "u")
with open(p, "wb") as f: f.write(b"x" * 100000)
fd = os.open(p, os.O_RDWR)
os.unlink(p)
assert not os.path.exists(p), "unlinked name still there"
assert os.pread(fd, 5, 0) == b"xxxxx", "data gone after unlink"
os.pwrite(fd, b"yy", 0)
assert os.pread(fd, 3, 0) == b"yyx", "write after unlink"
assert os.fstat(fd).st_size == 100000
os.close(fd)
assert p.rsplit("/",1)[1] not in os.listdir(base)
"#,
    );
}

#[test]
fn mkdir_and_rmdir() {
    let c = fs_cluster(2);
    posix(
        &c,
        r#"
d = os.path.join(base, "dir")
os.mkdir(d, 0o750)
assert stat.S_ISDIR(os.stat(d).st_mode)
assert stat.S_IMODE(os.stat(d).st_mode) == 0o750 & ~0o022 or stat.S_IMODE(os.stat(d).st_mode) == 0o750
expect_errno(errno.EEXIST, os.mkdir, d)
open(os.path.join(d, "f"), "w").close()
expect_errno(errno.ENOTEMPTY, os.rmdir, d)
os.unlink(os.path.join(d, "f"))
os.rmdir(d)
assert not os.path.exists(d)
expect_errno(errno.ENOENT, os.rmdir, d)
os.makedirs(os.path.join(base, "p/q/r"))
assert os.path.isdir(os.path.join(base, "p/q/r"))
"#,
    );
}

#[test]
fn symlinks_are_created_read_and_followed() {
    let c = fs_cluster(2);
    posix(
        &c,
        r#"
t = os.path.join(base, "target")
with open(t, "w") as f: f.write("via link")
l = os.path.join(base, "link")
os.symlink("target", l)
assert os.readlink(l) == "target"
assert os.path.islink(l)
with open(l) as f: assert f.read() == "via link", "following a relative symlink"
dangling = os.path.join(base, "dangling")
os.symlink("nowhere/at/all", dangling)
assert os.readlink(dangling) == "nowhere/at/all"
assert not os.path.exists(dangling)
os.unlink(l)
assert os.path.exists(t), "unlinking a symlink removed its target"
"#,
    );
    let host = std::fs::read_link(ws1_tmp(&c).join("posix/dangling")).unwrap();
    assert_eq!(host, PathBuf::from("nowhere/at/all"), "server-side symlink");
}

#[test]
fn hard_links_share_one_inode() {
    let c = fs_cluster(2);
    posix(
        &c,
        r#"
a = os.path.join(base, "orig"); b = os.path.join(base, "alias")
with open(a, "w") as f: f.write("shared")
os.link(a, b)
sa, sb = os.stat(a), os.stat(b)
assert sa.st_ino == sb.st_ino, f"inodes differ: {sa.st_ino} {sb.st_ino}"
assert sa.st_nlink == 2 and sb.st_nlink == 2, f"nlink {sa.st_nlink}"
with open(b, "a") as f: f.write("+more")
with open(a) as f: assert f.read() == "shared+more", "write through one link not seen through the other"
os.unlink(a)
assert os.stat(b).st_nlink == 1
"#,
    );
}

#[test]
fn chmod_and_chown() {
    let c = fs_cluster(2);
    posix(
        &c,
        r#"
p = os.path.join(base, "perm")
open(p, "w").close()
os.chmod(p, 0o640)
assert stat.S_IMODE(os.stat(p).st_mode) == 0o640
os.chmod(p, 0o4755)
assert stat.S_IMODE(os.stat(p).st_mode) == 0o4755
os.chown(p, 1234, 5678)
st = os.stat(p)
assert (st.st_uid, st.st_gid) == (1234, 5678), f"owner {st.st_uid}:{st.st_gid}"
"#,
    );
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(ws1_tmp(&c).join("posix/perm")).unwrap();
    assert_eq!((m.uid(), m.gid()), (1234, 5678), "owner on ws1's disk");
}

#[test]
fn sparse_one_gib_file_stays_sparse() {
    let c = fs_cluster(2);
    posix(
        &c,
        r#"
p = os.path.join(base, "sparse")
GiB = 1 << 30
with open(p, "wb") as f:
    f.seek(GiB - 3)
    f.write(b"end")
st = os.stat(p)
assert st.st_size == GiB, f"size {st.st_size}"
with open(p, "rb") as f:
    f.seek(GiB // 2)
    assert f.read(65536) == bytes(65536), "a hole reads as zeros"
    f.seek(GiB - 3)
    assert f.read() == b"end"
"#,
    );
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(ws1_tmp(&c).join("posix/sparse")).unwrap();
    assert_eq!(m.len(), 1 << 30);
    assert!(
        m.blocks() * 512 < 16 << 20,
        "the 1 GiB file takes {} bytes on ws1's disk; it should stay sparse",
        m.blocks() * 512
    );
}

#[test]
fn directory_of_ten_thousand_entries() {
    let c = fs_cluster(2);
    posix(
        &c,
        r#"
d = os.path.join(base, "many")
os.mkdir(d)
for i in range(10000):
    os.close(os.open(os.path.join(d, f"entry-{i:05d}"), os.O_CREAT | os.O_WRONLY, 0o644))
names = os.listdir(d)
assert len(names) == 10000, f"ws2 lists {len(names)} entries"
assert sorted(names) == [f"entry-{i:05d}" for i in range(10000)], "names differ"
"#,
    );
    let count = c.sh_ok("ws1", "ls /.../ws1/tmp/posix/many | wc -l");
    assert_eq!(
        count.trim(),
        "10000",
        "ws1 through /... lists another count"
    );
    let host = std::fs::read_dir(ws1_tmp(&c).join("posix/many"))
        .unwrap()
        .count();
    assert_eq!(host, 10000, "entries on ws1's disk");
}

// ---------------------------------------------------------------------------------
// Across nodes

#[test]
fn a_file_written_on_one_node_reads_back_identically_on_another() {
    let c = fs_cluster(2);
    c.sh_ok("ws1", "head -c 8388608 /dev/urandom > /tmp/src1");
    c.sh_ok("ws2", "head -c 8388613 /dev/urandom > /tmp/src2");
    // ws1 -> ws2, through ws1's volume.
    c.sh_ok("ws1", "cp /tmp/src1 /.../ws1/tmp/one && sync");
    let a = c.sh_ok("ws1", "sha256sum < /tmp/src1");
    let b = c.sh_ok("ws2", "sha256sum < /.../ws1/tmp/one");
    assert_eq!(a, b, "ws2 reads other bytes than ws1 wrote");
    // ws2 -> ws1, and onto ws2's own volume read from ws1.
    c.sh_ok(
        "ws2",
        "cp /tmp/src2 /.../ws1/tmp/two && cp /tmp/src2 /.../ws2/tmp/three",
    );
    let a = c.sh_ok("ws2", "sha256sum < /tmp/src2");
    for (node, path) in [
        ("ws1", "/tmp/two"),
        ("ws1", "/.../ws1/tmp/two"),
        ("ws1", "/.../ws2/tmp/three"),
    ] {
        let b = c.sh_ok(node, &format!("sha256sum < {path}"));
        assert_eq!(a, b, "{node} reads other bytes at {path} than ws2 wrote");
    }
    // The store, too.
    c.sh_ok("ws2", "cp /tmp/src2 /.../store/s");
    assert_eq!(
        a,
        c.sh_ok("ws1", "sha256sum < /.../store/s"),
        "store volume"
    );
}

const APPENDER: &str = r#"
import os, sys
path, me, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
for i in range(n):
    rec = f"{me} {i:06d} {'x' * 40}\n".encode()
    assert os.write(fd, rec) == len(rec)
os.close(fd)
"#;

#[test]
fn concurrent_appends_from_two_nodes_lose_no_record() {
    let c = fs_cluster(2);
    let n = 3000;
    let path = "/.../ws1/tmp/appended";
    c.sh_ok("ws1", &format!(": > {path}"));
    let spawn = |node: &str| {
        c.command(
            node,
            &["python3", "-c", APPENDER, path, node, &n.to_string()],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
    };
    let (a, b) = (spawn("ws1"), spawn("ws2"));
    for (node, child) in [("ws1", a), ("ws2", b)] {
        let out = child.wait_with_output().unwrap();
        c.expect_success(node, "appender", &out);
    }
    let text = std::fs::read_to_string(ws1_tmp(&c).join("appended")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        2 * n,
        "records in the file (expected {})",
        2 * n
    );
    for node in ["ws1", "ws2"] {
        for i in 0..n {
            let rec = format!("{node} {i:06} {}", "x".repeat(40));
            assert!(lines.contains(&rec.as_str()), "record {rec:?} lost or torn");
        }
    }
}

/// A Python loop serving commands from the test over stdin/stdout.
struct Remote {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Remote {
    fn start(c: &Cluster, node: &str, script: &str, args: &[&str]) -> Remote {
        let mut argv = vec!["python3", "-u", "-c", script];
        argv.extend_from_slice(args);
        let mut child = c
            .command(node, &argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Remote {
            child,
            stdin,
            stdout,
        }
    }

    fn ask(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
        let mut answer = String::new();
        self.stdout.read_line(&mut answer).unwrap();
        answer.trim().to_owned()
    }

    fn finish(mut self) {
        drop(self.stdin);
        let _ = self.child.wait();
    }
}

const SHARED_WRITER: &str = r#"
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
print("open", flush=True)
for line in sys.stdin:
    v = line.strip().encode().ljust(16)
    os.pwrite(fd, v, 0)
    os.pwrite(fd, v, 1 << 20)
    print("written", flush=True)
"#;

const SHARED_READER: &str = r#"
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
print("open", flush=True)
for line in sys.stdin:
    a = os.pread(fd, 16, 0).strip().decode()
    b = os.pread(fd, 16, 1 << 20).strip().decode()
    with open(sys.argv[1], "rb") as f:
        c = f.read(16).strip().decode()
    print(f"{a} {b} {c}", flush=True)
"#;

#[test]
fn a_reader_never_sees_stale_data_while_the_file_is_write_shared() {
    let c = fs_cluster(2);
    let path = "/.../ws1/tmp/shared";
    c.sh_ok("ws1", &format!("printf start > {path}"));
    let mut w = Remote::start(&c, "ws1", SHARED_WRITER, &[path]);
    let mut r = Remote::start(&c, "ws2", SHARED_READER, &[path]);
    let mut opened = String::new();
    w.stdout.read_line(&mut opened).unwrap();
    r.stdout.read_line(&mut opened).unwrap();
    assert_eq!(
        opened, "open\nopen\n",
        "writer and reader did not open the file"
    );
    for i in 0..300 {
        assert_eq!(w.ask(&format!("v{i}")), "written");
        let seen = r.ask("read");
        let want = format!("v{i} v{i} v{i}");
        assert_eq!(
            seen, want,
            "after ws1's write of v{i} completed, ws2 read {seen:?} (pread at 0, at 1 MiB, fresh open)"
        );
    }
    w.finish();
    r.finish();
}

// ---------------------------------------------------------------------------------
// Credentials

const AS_1000: &str = "setpriv --reuid 1000 --regid 1000 --clear-groups";
const AS_1001: &str = "setpriv --reuid 1001 --regid 1001 --clear-groups";

fn make_owned_files(c: &Cluster) {
    c.sh_ok(
        "ws1",
        "mkdir -p /tmp/creds && chmod 755 /tmp/creds && \
         echo secret > /tmp/creds/secret && chown 1001:1001 /tmp/creds/secret && chmod 600 /tmp/creds/secret && \
         echo readable > /tmp/creds/ro && chown 1001:1001 /tmp/creds/ro && chmod 644 /tmp/creds/ro",
    );
}

#[test]
fn a_uid_cannot_read_or_write_what_its_permissions_forbid() {
    let c = fs_cluster(2);
    make_owned_files(&c);
    // Positive controls: the owner reads its file, anyone reads the 0644 one.
    assert_eq!(
        c.sh_ok("ws2", &format!("{AS_1001} cat /.../ws1/tmp/creds/secret"))
            .trim(),
        "secret",
        "uid 1001 cannot read its own file"
    );
    assert_eq!(
        c.sh_ok("ws2", &format!("{AS_1000} cat /.../ws1/tmp/creds/ro"))
            .trim(),
        "readable"
    );
    let read = c.sh("ws2", &format!("{AS_1000} cat /.../ws1/tmp/creds/secret"));
    assert!(
        !read.status.success(),
        "uid 1000 read uid 1001's 0600 file: {:?}",
        String::from_utf8_lossy(&read.stdout)
    );
    let write = c.sh(
        "ws2",
        &format!("{AS_1000} sh -c 'echo x >> /.../ws1/tmp/creds/ro'"),
    );
    assert!(
        !write.status.success(),
        "uid 1000 wrote a file it may only read"
    );
    let create = c.sh("ws2", &format!("{AS_1000} touch /.../ws1/tmp/creds/new"));
    assert!(
        !create.status.success(),
        "uid 1000 created a file in a 0755 root-owned dir"
    );
    assert_eq!(
        std::fs::read_to_string(ws1_tmp(&c).join("creds/ro")).unwrap(),
        "readable\n",
        "the read-only file changed on disk"
    );
    // Files a uid creates are its own on the server.
    c.sh_ok(
        "ws1",
        "mkdir -p /tmp/creds/open && chmod 1777 /tmp/creds/open",
    );
    c.sh_ok(
        "ws2",
        &format!("{AS_1000} touch /.../ws1/tmp/creds/open/mine"),
    );
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(ws1_tmp(&c).join("creds/open/mine")).unwrap();
    assert_eq!(
        (m.uid(), m.gid()),
        (1000, 1000),
        "owner of a file uid 1000 created"
    );
}

#[test]
fn squash_root_denies_root_what_nobody_may_not_do() {
    let c = Cluster::with(2)
        .configure(|cfg| cfg.fs.squash_root = true)
        .start();
    c.require(&["fs-server", "fuse-client"]);
    make_owned_files(&c);
    let read = c.sh("ws2", "cat /.../ws1/tmp/creds/secret");
    assert!(
        !read.status.success(),
        "squashed root read a 0600 file of uid 1001: {:?}",
        String::from_utf8_lossy(&read.stdout)
    );
    let write = c.sh("ws2", "echo x >> /.../ws1/tmp/creds/ro");
    assert!(
        !write.status.success(),
        "squashed root wrote a 0644 file of uid 1001"
    );
    assert_eq!(
        c.sh_ok("ws2", "cat /.../ws1/tmp/creds/ro").trim(),
        "readable",
        "squashed root may still read world-readable files"
    );
}

// ---------------------------------------------------------------------------------
// Bad input

#[test]
fn a_daemon_with_the_wrong_cluster_key_is_refused_and_both_logs_say_so() {
    let c = fs_cluster(2);
    let bad_key = c.dir().join("ws2/wrong.key");
    std::fs::write(&bad_key, b"this is not the cluster's key!!!").unwrap();
    let mut cfg = c.config("ws2");
    cfg.key_file = bad_key;
    cfg.fuse.mountpoint = "/tmp/wrongmnt".into();
    cfg.fuse.reconnect_timeout_secs = 1;
    let cfg_path = c.dir().join("ws2/wrong.toml");
    ferry_tests::up::write_config(&cfg_path, &cfg).unwrap();
    c.sh_ok("ws2", "mkdir -p /tmp/wrongmnt");
    let log_path = c.dir().join("ws2/wrong-fuse-client.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = c
        .command(
            "ws2",
            &["fuse-client", "--config", &cfg_path.to_string_lossy()],
        )
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let server_log = c.log_path("ws1", "fs-server");
    let mentions_key = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .to_lowercase()
            .contains("key")
    };
    // Make it try (a lookup under its mount, once it is mounted) until both sides
    // have logged the refusal.
    let mut ok = false;
    for _ in 0..100 {
        let _ = c.sh("ws2", "timeout 10 ls /tmp/wrongmnt/ws1");
        if mentions_key(&log_path) && mentions_key(&server_log) {
            ok = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGTERM,
    );
    let _ = child.wait();
    assert!(
        ok,
        "a client with the wrong key: the refusal must be logged on both sides\n--- client:\n{}\n--- server:\n{}",
        ferry_tests::up::tail(&log_path, 20),
        c.log_tail("ws1", "fs-server", 20)
    );
    assert!(
        c.has_daemon("ws1", "fs-server"),
        "fs-server died of a wrong key"
    );
    c.sh_ok("ws2", "ls /.../ws1/tmp >/dev/null");
}

const GARBAGE: &str = r#"
import socket, hmac, hashlib, os, struct, sys
key = open(sys.argv[1], "rb").read()
host, port = sys.argv[2], int(sys.argv[3])

def mac(label, parts):
    m = hmac.new(key, label, hashlib.sha256)
    for p in parts:
        m.update(struct.pack("<I", len(p))); m.update(p)
    return m.digest()

def connect():
    s = socket.create_connection((host, port), timeout=30)
    return s

def rx(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("closed")
        b += c
    return b

def handshake():
    s = connect()
    cn = os.urandom(32); name = b"ws2"
    s.sendall(b"FERRY\x01" + cn + bytes([len(name)]) + name)
    sn = rx(s, 32); tag = rx(s, 32); sname = rx(s, rx(s, 1)[0])
    assert hmac.compare_digest(tag, mac(b"srv", [cn, sn, name])), "server proof"
    s.sendall(mac(b"cli", [sn, cn, sname]))
    assert rx(s, 1) == b"\x01", "server refused a correct proof"
    return s

def closed_by_server(s, what):
    try:
        while True:
            if not s.recv(65536):
                break
    except ConnectionResetError:
        pass
    except socket.timeout:
        raise AssertionError(f"{what}: server kept the connection open")
    print(f"refused: {what}", flush=True)

s = connect(); s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"); closed_by_server(s, "not a Ferry handshake")
s = connect(); s.sendall(os.urandom(4096)); closed_by_server(s, "random bytes before the handshake")
s = handshake(); s.sendall(b"\x07"); closed_by_server(s, "unknown channel kind")
s = handshake(); s.sendall(b"\x00" + struct.pack(">I", 0x7fffffff) + b"x" * 65536); closed_by_server(s, "a 2 GiB frame header")
s = handshake(); s.sendall(b"\x00" + struct.pack(">I", 64 << 20)); closed_by_server(s, "a 64 MiB frame header")
s = handshake(); body = os.urandom(200); s.sendall(b"\x00" + struct.pack(">I", len(body)) + body); closed_by_server(s, "a frame of random bytes")
s = handshake(); body = b"\xff" * 4096; s.sendall(b"\x00" + struct.pack(">I", len(body)) + body); closed_by_server(s, "a frame of 0xff")
"#;

#[test]
fn oversized_and_garbage_frames_are_refused_without_crashing_fs_server() {
    let c = fs_cluster(2);
    let pid_before = c.daemon_pid("ws1", "fs-server");
    let key = c.dir().join("cluster.key");
    let port = c.config("ws1").ports.fs.to_string();
    let out = py(
        &c,
        "ws2",
        GARBAGE,
        &[&key.to_string_lossy(), &c.addr("ws1").to_string(), &port],
    );
    assert_eq!(
        out.lines().count(),
        7,
        "not every bad input was refused:\n{out}"
    );
    assert_eq!(
        c.daemon_pid("ws1", "fs-server"),
        pid_before,
        "fs-server died or changed after garbage\n{}",
        c.log_tail("ws1", "fs-server", 30)
    );
    c.sh_ok(
        "ws2",
        "echo still-fine > /.../ws1/tmp/after && cat /.../ws1/tmp/after",
    );
}

#[test]
fn dotdot_and_symlinks_do_not_escape_a_volume() {
    let c = fs_cluster(2);
    // Through the mount: `..` of a volume's root is the super-root, not the directory
    // the volume is exported from.
    let listing = c.sh_ok("ws2", "ls /.../store/..");
    assert!(
        listing.lines().any(|l| l == "ws1") && !listing.lines().any(|l| l == "cluster.key"),
        "/.../store/.. is not the super-root:\n{listing}"
    );
    // A symlink in a volume is resolved by the reading node, never by the server: an
    // absolute target names the reader's own /tmp, not ws1's.
    c.sh_ok("ws1", "echo ws1-private > /tmp/marker");
    c.sh_ok("ws2", "echo ws2-own > /tmp/marker");
    std::os::unix::fs::symlink("/tmp/marker", c.dir().join("store/abs")).unwrap();
    std::os::unix::fs::symlink("../../../../../../../tmp/marker", c.dir().join("store/rel"))
        .unwrap();
    assert_eq!(c.sh_ok("ws2", "cat /.../store/abs").trim(), "ws2-own");
    let rel = c.sh("ws2", "cat /.../store/rel");
    assert_ne!(
        String::from_utf8_lossy(&rel.stdout).trim(),
        "ws1-private",
        "a relative symlink climbed out of the store on the server"
    );

    // Straight at the protocol: the server must not let `..` or a slash climb out.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let key = common::auth::ClusterKey::load(&c.dir().join("cluster.key")).unwrap();
    let addr = SocketAddr::new(IpAddr::V4(c.addr("ws1")), c.config("ws1").ports.fs);
    rt.block_on(async {
        use common::fsproto::{ChannelKind, Creds, FileServiceClient};
        let (transport, _) = common::fsproto::connect_channel(
            addr,
            &key,
            "ws2",
            common::transport::DEFAULT_MAX_FRAME,
            ChannelKind::Requests,
            0,
        )
        .await
        .expect("connect to ws1's fs-server");
        let client = FileServiceClient::new(tarpc::client::Config::default(), transport).spawn();
        let ctx = tarpc::context::current;
        let creds = Creds {
            uid: 0,
            gid: 0,
            groups: vec![],
            pid: 1,
        };
        let _ = client.register(ctx(), "ws2".into(), 0).await;
        let root = client
            .root(ctx(), "store".into())
            .await
            .expect("rpc")
            .expect("store root");
        for name in [
            &b".."[..],
            b"../..",
            b"../cluster.key",
            b"/etc",
            b"a/../../cluster.key",
        ] {
            let r = client
                .lookup(ctx(), creds.clone(), root.handle.clone(), name.to_vec())
                .await
                .expect("rpc");
            if let Ok(e) = r {
                assert_eq!(
                    e.attr.ino,
                    root.attr.ino,
                    "lookup of {:?} in the store's root escaped to another file",
                    String::from_utf8_lossy(name)
                );
            }
        }
    });
}

// ---------------------------------------------------------------------------------
// Restart

const COPIER: &str = r#"
import os, sys
src, dst = sys.argv[1], sys.argv[2]
CH = 1 << 20
fi = os.open(src, os.O_RDONLY)
fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
size = os.fstat(fi).st_size
half = (size // CH // 2) * CH
off = 0
while off < size:
    if off == half:
        os.fsync(fo)
        print("half", half, flush=True)
        sys.stdin.readline()
    b = os.pread(fi, CH, off)
    n = os.pwrite(fo, b, off)
    assert n == len(b), f"short write at {off}"
    off += n
os.fsync(fo)
os.close(fo)
print("done", flush=True)
"#;

#[test]
fn fs_server_killed_mid_copy_restarts_with_fsynced_data_and_the_copy_resumes() {
    let mut c = fs_cluster(2);
    c.sh_ok("ws2", "head -c 67108864 /dev/urandom > /tmp/src");
    let mut copy = Remote::start(&c, "ws2", COPIER, &["/tmp/src", "/.../ws1/tmp/copy"]);
    let mut line = String::new();
    copy.stdout.read_line(&mut line).unwrap();
    let half: usize = line
        .trim()
        .strip_prefix("half ")
        .unwrap_or_else(|| panic!("copier said {line:?}"))
        .parse()
        .unwrap();

    c.kill_daemon("ws1", "fs-server", Signal::SIGKILL);
    // What was fsynced before the crash is on ws1's disk.
    let src = std::fs::read(c.dir().join("ws2/tmp/src")).unwrap();
    let on_disk = std::fs::read(ws1_tmp(&c).join("copy")).unwrap();
    assert!(
        on_disk.len() >= half,
        "only {} of {half} fsynced bytes on disk",
        on_disk.len()
    );
    assert!(
        on_disk[..half] == src[..half],
        "fsynced data differs after the crash"
    );
    c.restart_daemon("ws1", "fs-server");

    assert_eq!(
        copy.ask("go"),
        "done",
        "the copy did not finish after the restart\n{}",
        c.logs("ws2", 20)
    );
    copy.finish();
    assert_eq!(
        sha256_host(&ws1_tmp(&c).join("copy")),
        sha256_host(&c.dir().join("ws2/tmp/src")),
        "the copy differs from its source after the restart"
    );
}

#[test]
fn fs_server_killed_while_cp_streams_and_cp_still_completes_identically() {
    let mut c = fs_cluster(2);
    c.sh_ok("ws2", "head -c 268435456 /dev/urandom > /tmp/big");
    let mut cp = c
        .command("ws2", &["cp", "/tmp/big", "/.../ws1/tmp/streamed"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the copy to be under way on ws1's disk, then crash ws1's fs-server.
    let dst = ws1_tmp(&c).join("streamed");
    let mut under_way = false;
    while cp.try_wait().unwrap().is_none() {
        if std::fs::metadata(&dst).map(|m| m.len()).unwrap_or(0) >= 16 << 20 {
            under_way = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    c.kill_daemon("ws1", "fs-server", Signal::SIGKILL);
    if !under_way || cp.try_wait().unwrap().is_some() {
        eprintln!(
            "note: cp finished before fs-server was killed; the restart is tested on an idle mount"
        );
    }
    c.restart_daemon("ws1", "fs-server");
    let out = cp.wait_with_output().unwrap();
    c.expect_success(
        "ws2",
        "cp /tmp/big /.../ws1/tmp/streamed (fs-server killed and restarted)",
        &out,
    );
    assert_eq!(
        sha256_host(&dst),
        sha256_host(&c.dir().join("ws2/tmp/big")),
        "the copy differs from its source after fs-server was killed mid-stream\n{}",
        c.logs("ws2", 20)
    );
}

// ---------------------------------------------------------------------------------
// Real programs

#[test]
fn tar_extract_and_recreate_is_byte_identical() {
    let c = fs_cluster(2);
    c.sh_ok(
        "ws2",
        r#"set -e
mkdir -p /tmp/tree/a/b/c /tmp/tree/empty
for i in $(seq 1 50); do head -c $((i * 997)) /dev/urandom > /tmp/tree/a/f$i; done
head -c 3000000 /dev/urandom > /tmp/tree/a/b/big
echo small > /tmp/tree/a/b/c/small
ln -s b/c/small /tmp/tree/a/link
ln -s ../nowhere /tmp/tree/a/dangling
ln /tmp/tree/a/f1 /tmp/tree/a/hard
chmod 600 /tmp/tree/a/f2; chmod 755 /tmp/tree/a/f3; chown 1000:1000 /tmp/tree/a/f4
T="tar --sort=name --mtime=@1000000000 --numeric-owner --format=gnu"
$T -cf /tmp/a.tar -C /tmp/tree .
X=$(mktemp -d /.../ws1/tmp/ferry-tar.XXXXXX)
tar -xpf /tmp/a.tar -C $X
$T -cf /tmp/b.tar -C $X .
cmp /tmp/a.tar /tmp/b.tar
diff -r --no-dereference /tmp/tree $X
rm -rf $X
"#,
    );
}

#[test]
fn git_init_add_commit_log_on_the_super_root() {
    let c = fs_cluster(2);
    let log = c.sh_ok(
        "ws2",
        r#"set -e
export HOME=/tmp GIT_AUTHOR_NAME=t GIT_AUTHOR_EMAIL=t@t GIT_COMMITTER_NAME=t GIT_COMMITTER_EMAIL=t@t
mkdir /.../ws1/tmp/repo && cd /.../ws1/tmp/repo
git init -q .
for i in 1 2 3; do echo "line $i" > file$i; git add file$i; git commit -qm "commit $i"; done
git mv file1 renamed && git commit -qm "rename"
git fsck --strict >/dev/null 2>&1
git log --format=%s
"#,
    );
    assert_eq!(log, "rename\ncommit 3\ncommit 2\ncommit 1\n", "git log");
    let other = c.sh_ok(
        "ws1",
        "cd /tmp/repo && HOME=/tmp git -c safe.directory='*' log --format=%s | head -1",
    );
    assert_eq!(
        other.trim(),
        "rename",
        "ws1 sees the repository ws2 committed to"
    );
}

#[test]
fn sqlite_transactions_on_the_super_root() {
    let c = fs_cluster(2);
    let out = c.sh_ok(
        "ws2",
        r#"set -e
db=/.../ws1/tmp/test.db
sqlite3 $db "create table t(id integer primary key, v text);"
sqlite3 $db "begin; $(for i in $(seq 1 1000); do printf "insert into t(v) values('row%d');" $i; done) commit;"
sqlite3 $db "begin; delete from t; rollback;"
sqlite3 $db "pragma integrity_check; select count(*) from t; select v from t where id = 500;"
"#,
    );
    assert_eq!(
        out, "ok\n1000\nrow500\n",
        "sqlite after commit and rollback"
    );
    let local = c.sh_ok("ws1", "sqlite3 /tmp/test.db 'select count(*) from t;'");
    assert_eq!(local.trim(), "1000", "ws1 reads the database ws2 wrote");
}

#[test]
fn sort_of_a_200_mb_file_with_its_temp_dir_on_the_super_root() {
    let c = fs_cluster(2);
    let out = c.sh_ok(
        "ws2",
        r#"set -e
d=/.../ws1/tmp/sort
mkdir -p $d/tmp
python3 -c '
import random, sys
r = random.Random(7)
total = 0
with open(sys.argv[1], "w", buffering=1 << 20) as out:
    while total < 200 * 1024 * 1024:
        line = "%016x %s\n" % (r.getrandbits(64), "y" * r.randrange(10, 100))
        out.write(line); total += len(line)
' $d/big
sort -S 16M -T $d/tmp -o $d/sorted $d/big
sort -c $d/sorted
wc -l < $d/big; wc -l < $d/sorted
ls $d/tmp | wc -l
"#,
    );
    let v: Vec<&str> = out.lines().collect();
    assert_eq!(v.len(), 3, "{out}");
    assert_eq!(v[0], v[1], "sorted has another line count than its input");
    assert_eq!(v[2], "0", "sort left temp files behind");
}
