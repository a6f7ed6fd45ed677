//! Sprite-style cache consistency between two nodes mounting the same volume.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;

use common::{Bench, Client, Server};

fn read_at(f: &fs::File, len: usize) -> String {
    let mut buf = vec![0u8; len];
    let n = f.read_at(&mut buf, 0).expect("pread through the mount");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn write_on_one_node_is_read_on_another_while_both_hold_it_open() {
    let bench = Bench::new();
    let _server = Server::start(bench.config(common::SERVER));
    let a = Client::mount(&bench, "ws2");
    let b = Client::mount(&bench, "ws3");
    fs::write(a.vol().join("shared"), b"version-1").unwrap();

    // B opens and reads alone: its pages are cached.
    let fb = fs::File::open(b.vol().join("shared")).unwrap();
    assert_eq!(read_at(&fb, 9), "version-1", "first read on node B");

    // A opens for writing: the file becomes write-shared; B must drop its cache.
    let fa = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(a.vol().join("shared"))
        .unwrap();
    fa.write_all_at(b"version-2", 0).unwrap();
    assert_eq!(
        read_at(&fb, 9),
        "version-2",
        "node B still read its cached pages after node A wrote while both had the file open"
    );

    // Every further write is seen too, while the sharing lasts.
    fa.write_all_at(b"version-3", 0).unwrap();
    assert_eq!(
        read_at(&fb, 9),
        "version-3",
        "second write by A not seen by B"
    );
    drop(fa);
    drop(fb);
}

#[test]
fn open_after_close_sees_the_other_nodes_last_write() {
    let bench = Bench::new();
    let _server = Server::start(bench.config(common::SERVER));
    let a = Client::mount(&bench, "ws2");
    let b = Client::mount(&bench, "ws3");
    fs::write(a.vol().join("c2o"), b"first").unwrap();
    assert_eq!(
        fs::read(b.vol().join("c2o")).unwrap(),
        b"first",
        "B reads A's file"
    );
    // A rewrites it (same size, so only the content differs), then closes.
    fs::write(a.vol().join("c2o"), b"again").unwrap();
    assert_eq!(
        fs::read(b.vol().join("c2o")).unwrap(),
        b"again",
        "B's open after A's close served stale cached pages"
    );
}

#[test]
fn writes_not_yet_closed_are_seen_by_a_node_that_opens_the_file() {
    let bench = Bench::new();
    let _server = Server::start(bench.config(common::SERVER));
    let a = Client::mount(&bench, "ws2");
    let b = Client::mount(&bench, "ws3");
    let data: Vec<u8> = (0..(8u32 << 20))
        .map(|i| (i.wrapping_mul(40503) >> 7) as u8)
        .collect();
    // A writes (queued behind its back, write-behind) and keeps the file open.
    let mut fa = fs::File::create(a.vol().join("streaming")).unwrap();
    std::io::Write::write_all(&mut fa, &data).unwrap();
    // B opens it: A is called back and its queued writes land before B's open is
    // answered.
    let got = fs::read(b.vol().join("streaming")).unwrap();
    assert_eq!(
        got.len(),
        data.len(),
        "B saw a different size while A still had the file open"
    );
    assert!(
        got == data,
        "B read different bytes than A wrote (A has not closed yet)"
    );
    drop(fa);
}

#[test]
fn a_name_created_on_one_node_appears_on_another_that_looked_for_it() {
    let bench = Bench::new();
    let _server = Server::start(bench.config(common::SERVER));
    let a = Client::mount(&bench, "ws2");
    let b = Client::mount(&bench, "ws3");
    let on_b = b.vol().join("late");
    assert!(!on_b.exists(), "name exists before it was created");
    fs::write(a.vol().join("late"), b"here").unwrap();
    // B cached the miss (negative entry); the server's invalidate_entry or the TTL
    // ends it.
    common::wait_for("the name created on ws2 to appear on ws3", || on_b.exists());
    assert_eq!(fs::read(&on_b).unwrap(), b"here", "content seen on ws3");
}

#[test]
fn a_file_has_the_same_inode_number_on_every_node() {
    use std::os::unix::fs::MetadataExt;
    let bench = Bench::new();
    let _server = Server::start(bench.config(common::SERVER));
    let a = Client::mount(&bench, "ws2");
    let b = Client::mount(&bench, "ws3");
    fs::write(a.vol().join("same"), b"x").unwrap();
    let (ia, ib) = (
        fs::metadata(a.vol().join("same")).unwrap().ino(),
        fs::metadata(b.vol().join("same")).unwrap().ino(),
    );
    assert_eq!(
        ia, ib,
        "st_ino differs between nodes: a migrated process would see it change"
    );
}
