//! Locks across sessions and Sprite write-sharing callbacks.

mod util;

use std::os::fd::AsRawFd;

use common::fsproto::{CacheMode, FileServiceClient, Lock, OpenFile};
use util::*;

fn wrlck(start: u64, end: u64) -> Lock {
    Lock {
        start,
        end,
        typ: libc::F_WRLCK,
        pid: 1,
    }
}

async fn open_rw(c: &FileServiceClient, e: &common::fsproto::Entry) -> OpenFile {
    let o = c
        .open(ctx(), root(), e.handle.clone(), libc::O_RDWR)
        .await
        .unwrap()
        .unwrap();
    of(&e.handle, &o, libc::O_RDWR)
}

#[tokio::test]
async fn conflicting_posix_locks_across_sessions_get_eagain_until_flush() {
    let s = TestServer::start().await;
    let a = s.client().await;
    let b = s.client().await;
    let r = s.root_entry(&a).await;
    std::fs::write(s.vol().join("locked"), vec![0u8; 1000]).unwrap();
    let e = a
        .lookup(ctx(), root(), r.handle.clone(), b"locked".to_vec())
        .await
        .unwrap()
        .unwrap();
    let fa = open_rw(&a, &e).await;
    let fb = open_rw(&b, &e).await;

    a.setlk(ctx(), fa.clone(), 1, wrlck(0, 99), false, false)
        .await
        .unwrap()
        .expect("first write lock");
    let err = b
        .setlk(ctx(), fb.clone(), 2, wrlck(50, 60), false, false)
        .await
        .unwrap()
        .expect_err("conflicting write lock granted");
    assert_eq!(err.errno, libc::EAGAIN, "{err}");
    let seen = b
        .getlk(ctx(), fb.clone(), 2, wrlck(50, 60))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        seen.typ,
        libc::F_WRLCK,
        "getlk does not report the conflict: {seen:?}"
    );
    assert_eq!((seen.start, seen.end), (0, 99));
    // A range that does not overlap is free.
    b.setlk(ctx(), fb.clone(), 2, wrlck(100, 199), false, false)
        .await
        .unwrap()
        .expect("non-overlapping lock");

    // The kernel enforces it against local processes too.
    let local = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(s.vol().join("locked"))
        .unwrap();
    // SAFETY: flock is plain old data.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = 10;
    fl.l_len = 1;
    // SAFETY: a valid fd and flock.
    let rc = unsafe { libc::fcntl(local.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    assert_eq!(rc, -1, "a local process got a lock a client holds");

    // A blocked waiter is granted the lock once the holder's fd is closed (flush).
    let waiter = {
        let b = b.clone();
        let fb = fb.clone();
        tokio::spawn(async move { b.setlk(ctx(), fb, 3, wrlck(0, 9), true, false).await })
    };
    a.flush(ctx(), fa.clone(), 1).await.unwrap().unwrap();
    waiter
        .await
        .unwrap()
        .unwrap()
        .expect("waiting lock not granted after the holder flushed");
    // Unlock, then A can lock again.
    b.setlk(
        ctx(),
        fb.clone(),
        3,
        Lock {
            typ: libc::F_UNLCK,
            ..wrlck(0, 9)
        },
        false,
        false,
    )
    .await
    .unwrap()
    .unwrap();
    a.setlk(ctx(), fa.clone(), 1, wrlck(0, 9), false, false)
        .await
        .unwrap()
        .expect("lock after the other owner unlocked");
}

#[tokio::test]
async fn flock_conflicts_across_sessions_and_goes_with_release_or_session_end() {
    let s = TestServer::start().await;
    let a = s.client().await;
    let b = s.client().await;
    let r = s.root_entry(&a).await;
    std::fs::write(s.vol().join("fl"), b"x").unwrap();
    let e = a
        .lookup(ctx(), root(), r.handle.clone(), b"fl".to_vec())
        .await
        .unwrap()
        .unwrap();
    let fa = open_rw(&a, &e).await;
    let fb = open_rw(&b, &e).await;
    a.setlk(ctx(), fa.clone(), 1, wrlck(0, u64::MAX), false, true)
        .await
        .unwrap()
        .expect("flock LOCK_EX");
    let err = b
        .setlk(ctx(), fb.clone(), 2, wrlck(0, u64::MAX), false, true)
        .await
        .unwrap()
        .expect_err("second flock LOCK_EX granted");
    assert_eq!(err.errno, libc::EAGAIN);
    a.release(ctx(), fa.clone(), Some(1))
        .await
        .unwrap()
        .unwrap();
    b.setlk(ctx(), fb.clone(), 2, wrlck(0, u64::MAX), false, true)
        .await
        .unwrap()
        .expect("flock after the holder released");

    // A session that goes away loses its locks.
    let fa2 = open_rw(&a, &e).await;
    let waiter = {
        let a = a.clone();
        tokio::spawn(async move { a.setlk(ctx(), fa2, 1, wrlck(0, u64::MAX), true, true).await })
    };
    drop(fb);
    drop(b);
    waiter
        .await
        .unwrap()
        .unwrap()
        .expect("lock of a closed session was not released");
}

#[tokio::test]
async fn becoming_write_shared_calls_back_the_other_holder_before_the_open_is_answered() {
    let s = TestServer::start().await;
    let (a, ra) = session_with_callbacks(s.addr, "wsa", 11).await;
    let (b, rb) = session_with_callbacks(s.addr, "wsb", 22).await;
    let r = s.root_entry(&a).await;
    std::fs::write(s.vol().join("shared"), b"v1").unwrap();
    let e = a
        .lookup(ctx(), root(), r.handle.clone(), b"shared".to_vec())
        .await
        .unwrap()
        .unwrap();
    let oa = a
        .open(ctx(), root(), e.handle.clone(), libc::O_RDWR)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(oa.cache, CacheMode::Cached { .. }),
        "sole opener must be allowed to cache: {:?}",
        oa.cache
    );
    assert!(ra.0.lock().unwrap().is_empty());
    let ob = b
        .open(ctx(), root(), e.handle.clone(), libc::O_RDONLY)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        ob.cache,
        CacheMode::Uncached,
        "second opener of a written file"
    );
    assert_eq!(
        *ra.0.lock().unwrap(),
        vec![(e.attr.ino, true)],
        "the writer was not called back before the second open was answered"
    );
    assert!(
        rb.0.lock().unwrap().is_empty(),
        "the opener called itself back"
    );

    // While shared, A's write is acknowledged only after B was told to drop pages.
    let fa = of(&e.handle, &oa, libc::O_RDWR);
    a.write(ctx(), root(), fa.clone(), 0, b"v2".to_vec().into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        *rb.0.lock().unwrap(),
        vec![(e.attr.ino, true)],
        "the reader was not called back before the write was acknowledged"
    );
    let fb = of(&e.handle, &ob, libc::O_RDONLY);
    let d = b
        .read(ctx(), root(), fb.clone(), 0, 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&d[..], b"v2");

    // Sharing ends when B closes: A's next open may cache again.
    b.release(ctx(), fb, None).await.unwrap().unwrap();
    let oa2 = a
        .open(ctx(), root(), e.handle.clone(), libc::O_RDONLY)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(oa2.cache, CacheMode::Cached { .. }),
        "after sharing ended: {:?}",
        oa2.cache
    );
    let before = rb.0.lock().unwrap().len();
    a.write(ctx(), root(), fa, 0, b"v3".to_vec().into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        rb.0.lock().unwrap().len(),
        before,
        "a write to an unshared file called back a session that closed it"
    );
}

#[tokio::test]
async fn reopen_keeps_the_cache_only_if_nobody_changed_the_file() {
    let s = TestServer::start().await;
    let (a, _ra) = session_with_callbacks(s.addr, "wsa", 33).await;
    let r = s.root_entry(&a).await;
    std::fs::write(s.vol().join("k"), b"v1").unwrap();
    let e = a
        .lookup(ctx(), root(), r.handle.clone(), b"k".to_vec())
        .await
        .unwrap()
        .unwrap();
    let o1 = a
        .open(ctx(), root(), e.handle.clone(), libc::O_RDONLY)
        .await
        .unwrap()
        .unwrap();
    a.release(ctx(), of(&e.handle, &o1, libc::O_RDONLY), None)
        .await
        .unwrap()
        .unwrap();
    let o2 = a
        .open(ctx(), root(), e.handle.clone(), libc::O_RDONLY)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(o2.cache, CacheMode::Cached { keep: true }, "unchanged file");
    a.release(ctx(), of(&e.handle, &o2, libc::O_RDONLY), None)
        .await
        .unwrap()
        .unwrap();
    std::fs::write(s.vol().join("k"), b"v2 changed").unwrap();
    let o3 = a
        .open(ctx(), root(), e.handle.clone(), libc::O_RDONLY)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        o3.cache,
        CacheMode::Cached { keep: false },
        "file changed behind the client's back"
    );
}

#[tokio::test]
async fn removing_or_renaming_a_name_calls_back_the_other_clients_first() {
    let s = TestServer::start().await;
    let (a, _ra) = session_with_callbacks(s.addr, "wsa", 44).await;
    let (_b, rb) = session_with_callbacks(s.addr, "wsb", 55).await;
    let r = s.root_entry(&a).await;
    std::fs::write(s.vol().join("gone"), b"").unwrap();
    std::fs::write(s.vol().join("moved"), b"").unwrap();
    a.unlink(ctx(), root(), r.handle.clone(), b"gone".to_vec())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        *rb.1.lock().unwrap(),
        vec![(r.attr.ino, b"gone".to_vec())],
        "the other client was not told of the unlink before it was answered"
    );
    a.rename(
        ctx(),
        root(),
        r.handle.clone(),
        b"moved".to_vec(),
        r.handle.clone(),
        b"there".to_vec(),
        0,
    )
    .await
    .unwrap()
    .unwrap();
    let got = rb.1.lock().unwrap().clone();
    assert!(
        got.contains(&(r.attr.ino, b"moved".to_vec()))
            && got.contains(&(r.attr.ino, b"there".to_vec())),
        "rename callbacks: {got:?}"
    );
}

#[tokio::test]
async fn truncating_a_file_calls_back_the_other_holders() {
    let s = TestServer::start().await;
    let (a, _ra) = session_with_callbacks(s.addr, "wsa", 66).await;
    let (b, rb) = session_with_callbacks(s.addr, "wsb", 77).await;
    let r = s.root_entry(&a).await;
    std::fs::write(s.vol().join("t"), b"0123456789").unwrap();
    let e = a
        .lookup(ctx(), root(), r.handle.clone(), b"t".to_vec())
        .await
        .unwrap()
        .unwrap();
    b.open(ctx(), root(), e.handle.clone(), libc::O_RDONLY)
        .await
        .unwrap()
        .unwrap();
    a.setattr(
        ctx(),
        root(),
        e.handle.clone(),
        common::fsproto::SetAttr {
            size: Some(2),
            ..Default::default()
        },
        None,
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        *rb.0.lock().unwrap(),
        vec![(e.attr.ino, true)],
        "the reader was not called back before the truncate was answered"
    );
}

#[tokio::test]
async fn a_waiting_lock_does_not_hold_up_other_requests_of_its_connection() {
    let s = TestServer::start().await;
    let a = s.client().await;
    let b = s.client().await;
    let r = s.root_entry(&a).await;
    std::fs::write(s.vol().join("w"), b"x").unwrap();
    let e = a
        .lookup(ctx(), root(), r.handle.clone(), b"w".to_vec())
        .await
        .unwrap()
        .unwrap();
    let fa = open_rw(&a, &e).await;
    let fb = open_rw(&b, &e).await;
    a.setlk(ctx(), fa.clone(), 1, wrlck(0, 0), false, false)
        .await
        .unwrap()
        .unwrap();
    let waiter = {
        let b = b.clone();
        let fb = fb.clone();
        tokio::spawn(async move { b.setlk(ctx(), fb, 2, wrlck(0, 0), true, false).await })
    };
    // The waiter cannot finish before A flushes; B's other requests are served
    // meanwhile, on the same connection.
    for _ in 0..20 {
        b.getattr(ctx(), e.handle.clone())
            .await
            .unwrap()
            .expect("getattr while a lock waits");
    }
    assert!(
        !waiter.is_finished(),
        "the waiter got a lock that A still holds"
    );
    a.flush(ctx(), fa, 1).await.unwrap().unwrap();
    waiter.await.unwrap().unwrap().expect("granted after flush");
}

#[tokio::test]
async fn creating_a_name_tells_the_other_clients_to_drop_a_negative_entry() {
    let s = TestServer::start().await;
    let (a, ra) = session_with_callbacks(s.addr, "wsa", 88).await;
    let (_b, rb) = session_with_callbacks(s.addr, "wsb", 99).await;
    let r = s.root_entry(&a).await;
    a.mkdir(
        ctx(),
        root(),
        r.handle.clone(),
        b"newdir".to_vec(),
        0o755,
        0,
    )
    .await
    .unwrap()
    .unwrap();
    create(&a, &root(), &r.handle, "newfile", 0o644, libc::O_RDWR).await;
    // Sent in the background: wait for it (bounded), do not time it.
    let want = [
        (r.attr.ino, b"newdir".to_vec()),
        (r.attr.ino, b"newfile".to_vec()),
    ];
    for _ in 0..1000 {
        let got = rb.1.lock().unwrap().clone();
        if want.iter().all(|w| got.contains(w)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let got = rb.1.lock().unwrap().clone();
    assert!(
        want.iter().all(|w| got.contains(w)),
        "the other client was not told of the new names: {got:?}"
    );
    assert!(
        ra.1.lock().unwrap().is_empty(),
        "the creating client was called back about its own names"
    );
}
