//! Bad input and restarts: wrong keys, garbage and oversized frames, a second server
//! instance taking over the handles and opens of the first, durability after kill -9.

mod util;

use std::time::Duration;

use common::auth::{client_handshake, ClusterKey};
use common::fsproto::ChannelKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use util::*;

#[tokio::test]
async fn wrong_key_is_refused_and_the_server_keeps_serving() {
    let s = TestServer::start().await;
    let bad = client_with_key(s.addr, b"not-the-cluster-key-at-all").await;
    let Err(err) = bad else {
        panic!("a client with the wrong key was accepted");
    };
    assert!(
        err.to_string().contains("handshake"),
        "client side error should name the handshake: {err}"
    );
    let c = s.client().await;
    s.root_entry(&c).await;
}

/// Opens an authenticated requests connection and returns the raw stream.
async fn raw_requests_stream(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let mut st = tokio::net::TcpStream::connect(addr).await.unwrap();
    client_handshake(&mut st, &ClusterKey::from_bytes(KEY), "ws2")
        .await
        .unwrap();
    ChannelKind::Requests
        .write_preamble(&mut st, 0)
        .await
        .unwrap();
    st
}

/// Reads until EOF; fails the test if the server keeps the connection open.
async fn expect_closed(mut st: tokio::net::TcpStream, what: &str) {
    let mut buf = [0u8; 1024];
    let r = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match st.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(r.is_ok(), "server kept the connection open after {what}");
}

#[tokio::test]
async fn garbage_and_oversized_frames_close_only_that_connection() {
    let s = TestServer::start().await;
    let c = s.client().await;
    let root_entry = s.root_entry(&c).await;

    // A frame of the right length whose bytes are no tarpc message.
    let mut st = raw_requests_stream(s.addr).await;
    let junk: Vec<u8> = (0..200u32).map(|i| (i * 37 + 11) as u8).collect();
    st.write_all(&(junk.len() as u32).to_be_bytes())
        .await
        .unwrap();
    st.write_all(&junk).await.unwrap();
    expect_closed(st, "a garbage frame").await;

    // A frame announcing 1 GiB, over the cap.
    let mut st = raw_requests_stream(s.addr).await;
    st.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
    st.write_all(&[0u8; 64]).await.unwrap();
    expect_closed(st, "an oversized frame").await;

    // An unknown channel kind.
    let mut st = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    client_handshake(&mut st, &ClusterKey::from_bytes(KEY), "ws2")
        .await
        .unwrap();
    st.write_all(&[7]).await.unwrap();
    expect_closed(st, "an unknown channel kind").await;

    // Not Ferry at all.
    let mut st = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    st.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    expect_closed(st, "an HTTP request").await;

    // The existing client and a new one are still served.
    let a = c.getattr(ctx(), root_entry.handle.clone()).await.unwrap();
    assert!(a.is_ok(), "existing client lost service: {a:?}");
    let c2 = s.client().await;
    s.root_entry(&c2).await;
}

#[tokio::test]
async fn handles_and_open_files_survive_a_server_restart() {
    let s = TestServer::start().await;
    let c = s.client().await;
    let r = s.root_entry(&c).await;
    std::fs::create_dir(s.vol().join("sub")).unwrap();
    let sub = c
        .lookup(ctx(), root(), r.handle.clone(), b"sub".to_vec())
        .await
        .unwrap()
        .unwrap();
    let (e, f, _) = create(&c, &root(), &sub.handle, "kept", 0o644, libc::O_RDWR).await;
    c.write(ctx(), root(), f.clone(), 0, b"first".to_vec().into())
        .await
        .unwrap()
        .unwrap();
    drop(c);
    let (dir, config) = s.stop().await;

    let s2 = TestServer::start_in(dir, config).await;
    let c2 = s2.client().await;
    let a = c2
        .getattr(ctx(), e.handle.clone())
        .await
        .unwrap()
        .expect("old handle refused by the restarted server");
    assert_eq!((a.ino, a.size), (e.attr.ino, 5), "attributes after restart");
    let l = c2
        .lookup(ctx(), root(), sub.handle.clone(), b"kept".to_vec())
        .await
        .unwrap()
        .expect("lookup in an old directory handle");
    assert_eq!(l.attr.ino, e.attr.ino);
    let d = c2
        .read(ctx(), root(), f.clone(), 0, 100)
        .await
        .unwrap()
        .expect("read through the old OpenFile");
    assert_eq!(&d[..], b"first");
    c2.write(ctx(), root(), f.clone(), 5, b"+second".to_vec().into())
        .await
        .unwrap()
        .expect("write through the old OpenFile");
    c2.fsync(ctx(), f.clone(), true).await.unwrap().unwrap();
    c2.release(ctx(), f.clone(), None).await.unwrap().unwrap();
    assert_eq!(
        std::fs::read(s2.vol().join("sub/kept")).unwrap(),
        b"first+second"
    );
}

#[tokio::test]
async fn write_acknowledged_after_fsync_survives_kill_9_of_the_server_process() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("vol")).unwrap();
    std::fs::write(dir.path().join("key"), KEY).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let text = format!(
        "node = \"ws1\"\nkey_file = \"{d}/key\"\n[[nodes]]\nname = \"ws1\"\naddr = \"127.0.0.1\"\n\
         [ports]\nfs = {port}\n[fs]\nexport_root = false\n[[fs.volumes]]\nname = \"vol\"\npath = \"{d}/vol\"\n",
        d = dir.path().display()
    );
    std::fs::write(dir.path().join("node.toml"), text).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fs-server"))
        .arg("--config")
        .arg(dir.path().join("node.toml"))
        .spawn()
        .expect("start the fs-server binary");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = None;
    for _ in 0..200 {
        if let Ok(cl) = client_with_key(addr, KEY).await {
            c = Some(cl);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let Some(c) = c else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("fs-server binary never answered on {addr}");
    };
    let r = c.root(ctx(), "vol".into()).await.unwrap().unwrap();
    let (_, f, _) = create(&c, &root(), &r.handle, "durable", 0o644, libc::O_RDWR).await;
    let data = vec![0x5au8; 256 << 10];
    c.write(ctx(), root(), f.clone(), 0, data.clone().into())
        .await
        .unwrap()
        .unwrap();
    c.fsync(ctx(), f.clone(), false).await.unwrap().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "fs-server should have died of SIGKILL");
    assert!(
        std::fs::read(dir.path().join("vol/durable")).unwrap() == data,
        "acknowledged, fsynced data is not in the file after kill -9"
    );
}

#[tokio::test]
async fn sigterm_stops_the_server_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("vol")).unwrap();
    std::fs::write(dir.path().join("key"), KEY).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let text = format!(
        "node = \"ws1\"\nkey_file = \"{d}/key\"\n[[nodes]]\nname = \"ws1\"\naddr = \"127.0.0.1\"\n\
         [ports]\nfs = {port}\n[fs]\nexport_root = false\n[[fs.volumes]]\nname = \"vol\"\npath = \"{d}/vol\"\n",
        d = dir.path().display()
    );
    std::fs::write(dir.path().join("node.toml"), text).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fs-server"))
        .arg("--config")
        .arg(dir.path().join("node.toml"))
        .spawn()
        .expect("start the fs-server binary");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut up = false;
    for _ in 0..200 {
        if client_with_key(addr, KEY).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(up, "fs-server binary never answered on {addr}");
    assert!(status.success(), "fs-server exit after SIGTERM: {status}");
}
