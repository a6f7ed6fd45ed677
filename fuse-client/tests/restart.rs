//! Restart tolerance: fs-server dies (as with kill -9) in the middle of a copy
//! through the mount and comes back; the copy completes byte for byte.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::sync::mpsc;
use std::time::Duration;

use common::{Bench, Client, Server};

const SIZE: usize = 64 << 20;
const PAUSE_AT: usize = 16 << 20;

#[test]
fn copy_through_the_mount_survives_an_fs_server_crash_and_restart() {
    let bench = Bench::new();
    let config = bench.config(common::SERVER);
    let server = Server::start(config.clone());
    let client = Client::mount(&bench, "ws2");

    let data: Vec<u8> = (0..SIZE as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    fs::write(bench.export().join("big"), &data).unwrap();

    // The copier stops at PAUSE_AT until the server has been crashed, so the crash
    // falls in the middle of the copy whatever the speeds.
    let (reached, reached_rx) = mpsc::channel::<()>();
    let (go, go_rx) = mpsc::channel::<()>();
    let (src, dst) = (client.vol().join("big"), client.vol().join("big.copy"));
    let copier = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut from = fs::File::open(&src)?;
        let mut to = fs::File::create(&dst)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0usize;
        let mut paused = false;
        loop {
            let n = from.read(&mut buf)?;
            if n == 0 {
                break;
            }
            to.write_all(&buf[..n])?;
            done += n;
            if !paused && done >= PAUSE_AT {
                paused = true;
                reached.send(()).unwrap();
                go_rx.recv().unwrap();
            }
        }
        to.sync_all()?;
        Ok(done as u64)
    });

    reached_rx.recv().expect("copier reached the pause point");
    server.crash();
    go.send(()).unwrap();
    // Let the copier run into the dead server before it comes back.
    std::thread::sleep(Duration::from_millis(500));
    let _server = Server::start(config);

    let copied = copier
        .join()
        .unwrap()
        .expect("the copy failed instead of waiting for the restarted fs-server");
    assert_eq!(copied, SIZE as u64, "copier read a different length");
    let got = fs::read(bench.export().join("big.copy")).unwrap();
    assert_eq!(got.len(), SIZE, "copy has the wrong size on the server");
    let first_diff = got.iter().zip(&data).position(|(a, b)| a != b);
    assert!(
        first_diff.is_none(),
        "copy differs from the source at byte {first_diff:?}"
    );
}

#[test]
fn cached_pages_are_dropped_when_the_server_comes_back() {
    use std::os::unix::fs::FileExt;
    let bench = Bench::new();
    let config = bench.config(common::SERVER);
    let server = Server::start(config.clone());
    let client = Client::mount(&bench, "ws2");
    fs::write(bench.export().join("cached"), b"v1").unwrap();
    let f = fs::File::open(client.vol().join("cached")).unwrap();
    let mut buf = [0u8; 2];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"v1");

    // While the server is away the file changes behind its back; the restarted
    // server cannot know what this client caches.
    server.crash();
    fs::write(bench.export().join("cached"), b"v2").unwrap();
    let _server = Server::start(config);
    common::wait_for("the client to reconnect and drop its cached pages", || {
        f.read_exact_at(&mut buf, 0).is_ok() && &buf == b"v2"
    });
}

#[test]
fn calls_fail_with_eio_when_the_server_stays_away() {
    let bench = Bench::new();
    let server = Server::start(bench.config(common::SERVER));
    let client = Client::mount_with(&bench, "ws2", |c| c.fuse.reconnect_timeout_secs = 2);
    fs::write(client.vol().join("f"), b"x").unwrap();
    server.crash();
    // A name never looked up before must go to the server, which is gone for good.
    let err = fs::metadata(client.vol().join("never-seen"))
        .expect_err("a lookup succeeded without a server");
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EIO),
        "a call without a server ended in {err}, not EIO"
    );
}
