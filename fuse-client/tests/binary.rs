//! The `fuse-client` binary: mounts from a config file, unmounts on SIGTERM, and
//! leaves no dead mount behind when it is killed with SIGKILL.

mod common;

use std::process::{Child, Command, Stdio};

use common::{is_mounted, wait_for, Bench, Server};

fn start(bench: &Bench, node: &str) -> (Child, std::path::PathBuf) {
    let config = bench.config(node);
    let path = bench.dir.path().join(format!("{node}.toml"));
    std::fs::write(&path, toml::to_string(&config).expect("config serialises")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_fuse-client"))
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .spawn()
        .expect("fuse-client starts");
    let mp = config.fuse.mountpoint.clone();
    wait_for("fuse-client to mount", || is_mounted(&mp));
    (child, mp)
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: plain kill(2) on our own child's pid.
    let r = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(r, 0, "kill: {}", std::io::Error::last_os_error());
}

#[test]
fn sigterm_unmounts_and_exits_cleanly() {
    let bench = Bench::new();
    let _server = Server::start(bench.config(common::SERVER));
    let (mut child, mp) = start(&bench, "ws2");
    std::fs::write(mp.join(common::VOLUME).join("f"), b"x")
        .expect("write through the binary's mount");
    signal(&child, libc::SIGTERM);
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "fuse-client exited with {status} on SIGTERM"
    );
    assert!(!is_mounted(&mp), "mount still present after SIGTERM");
}

#[test]
fn sigkill_leaves_no_dead_mount() {
    let bench = Bench::new();
    let _server = Server::start(bench.config(common::SERVER));
    let (mut child, mp) = start(&bench, "ws2");
    signal(&child, libc::SIGKILL);
    let _ = child.wait();
    wait_for(
        "the watcher to detach the mount of the killed fuse-client",
        || !is_mounted(&mp),
    );
    // And a new fuse-client can mount there again.
    let (mut again, _) = start(&bench, "ws2");
    signal(&again, libc::SIGTERM);
    let _ = again.wait();
}
