//! The operation matrix against a real fs-server over a temporary volume.

mod util;

use std::os::unix::fs::MetadataExt;

use common::fsproto::{FileKind, SetAttr, SetTime, Time};
use util::*;

const RW: i32 = libc::O_RDWR;

#[tokio::test]
async fn create_write_read_back_and_lookup() {
    let s = TestServer::start().await;
    let c = s.client().await;
    let vols = c.volumes(ctx()).await.unwrap();
    assert_eq!(vols.len(), 1, "volumes: {vols:?}");
    assert_eq!(
        (vols[0].name.as_str(), vols[0].node.as_str()),
        ("vol", "ws1")
    );
    let top = s.root_entry(&c).await;
    assert_eq!(top.attr.kind, FileKind::Dir);

    let (e, f, _) = create(&c, &root(), &top.handle, "a.txt", 0o644, RW).await;
    let n = c
        .write(ctx(), root(), f.clone(), 0, b"hello world".to_vec().into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 11);
    let data = c
        .read(ctx(), root(), f.clone(), 6, 100)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&data[..], b"world", "read back differs");
    assert_eq!(
        std::fs::read(s.vol().join("a.txt")).unwrap(),
        b"hello world",
        "the file on disk differs from what was written"
    );
    let l = c
        .lookup(ctx(), root(), top.handle.clone(), b"a.txt".to_vec())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(l.attr.ino, e.attr.ino, "lookup and create disagree on ino");
    assert_eq!(l.attr.size, 11);
    assert_eq!(l.attr.perm, 0o644);
    let a = c.getattr(ctx(), l.handle.clone()).await.unwrap().unwrap();
    assert_eq!(a.size, 11);
    assert!(a.ino > 1, "ino must avoid 0 and 1");
    c.release(ctx(), f, None).await.unwrap().unwrap();
    let miss = c
        .lookup(ctx(), root(), top.handle.clone(), b"nope".to_vec())
        .await
        .unwrap();
    assert_eq!(miss.unwrap_err().errno, libc::ENOENT);
}

fn root_creds() -> common::fsproto::Creds {
    util::root()
}

#[tokio::test]
async fn append_writes_land_at_the_real_end_of_file() {
    let s = TestServer::start().await;
    let c = s.client().await;
    let r = s.root_entry(&c).await;
    let (_, f, _) = create(
        &c,
        &root_creds(),
        &r.handle,
        "log",
        0o644,
        libc::O_WRONLY | libc::O_APPEND,
    )
    .await;
    c.write(ctx(), root_creds(), f.clone(), 0, b"one\n".to_vec().into())
        .await
        .unwrap()
        .unwrap();
    // Someone else grows the file behind the client's back.
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(s.vol().join("log"))
        .unwrap()
        .write_all(b"local\n")
        .unwrap();
    // The client still thinks the end is at 4.
    c.write(ctx(), root_creds(), f.clone(), 4, b"two\n".to_vec().into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(s.vol().join("log")).unwrap(),
        "one\nlocal\ntwo\n"
    );
}

#[tokio::test]
async fn o_excl_create_of_an_existing_name_fails() {
    let s = TestServer::start().await;
    let c = s.client().await;
    let r = s.root_entry(&c).await;
    std::fs::write(s.vol().join("x"), b"old").unwrap();
    let e = c
        .create(
            ctx(),
            root_creds(),
            r.handle.clone(),
            b"x".to_vec(),
            0o644,
            0,
            RW | libc::O_EXCL,
        )
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.errno, libc::EEXIST, "O_EXCL over an existing file: {e}");
    // Without O_EXCL but with O_TRUNC the file is opened and emptied.
    let (e2, _, _) = create(&c, &root_creds(), &r.handle, "x", 0o644, RW | libc::O_TRUNC).await;
    assert_eq!(e2.attr.size, 0);
    assert_eq!(std::fs::read(s.vol().join("x")).unwrap(), b"");
}

#[tokio::test]
async fn truncate_and_sparse_one_gib_file() {
    let s = TestServer::start().await;
    let c = s.client().await;
    let r = s.root_entry(&c).await;
    let (e, f, _) = create(&c, &root_creds(), &r.handle, "sparse", 0o644, RW).await;
    let gib = 1u64 << 30;
    let a = c
        .setattr(
            ctx(),
            root_creds(),
            e.handle.clone(),
            SetAttr {
                size: Some(gib),
                ..Default::default()
            },
            Some(f.clone()),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.size, gib);
    c.write(
        ctx(),
        root_creds(),
        f.clone(),
        gib - 3,
        b"end".to_vec().into(),
    )
    .await
    .unwrap()
    .unwrap();
    let md = std::fs::metadata(s.vol().join("sparse")).unwrap();
    assert_eq!(md.len(), gib);
    assert!(
        md.blocks() * 512 < 1 << 20,
        "the file is not sparse: {} blocks",
        md.blocks()
    );
    let data = c
        .read(ctx(), root_creds(), f.clone(), gib - 3, 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&data[..], b"end");
    let mid = c
        .read(ctx(), root_creds(), f.clone(), 1 << 20, 4)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&mid[..], &[0, 0, 0, 0], "hole must read as zeros");
    // Truncate by path (no open file).
    let a = c
        .setattr(
            ctx(),
            root_creds(),
            e.handle.clone(),
            SetAttr {
                size: Some(5),
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.size, 5);
}

#[tokio::test]
async fn large_writes_and_reads_of_one_mib_go_through() {
    let s = TestServer::start().await;
    let c = s.client().await;
    let r = s.root_entry(&c).await;
    let (_, f, _) = create(&c, &root_creds(), &r.handle, "big", 0o644, RW).await;
    let data: Vec<u8> = (0..(1usize << 20)).map(|i| (i * 7 % 251) as u8).collect();
    let n = c
        .write(ctx(), root_creds(), f.clone(), 0, data.clone().into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n as usize, data.len());
    c.fsync(ctx(), f.clone(), false).await.unwrap().unwrap();
    let back = c
        .read(ctx(), root_creds(), f.clone(), 0, 1 << 20)
        .await
        .unwrap()
        .unwrap();
    assert!(back[..] == data[..], "1 MiB read back differs");
}

#[tokio::test]
async fn rename_over_unlink_open_mkdir_rmdir() {
    let s = TestServer::start().await;
    let c = s.client().await;
    let r = s.root_entry(&c).await;
    let (_, fa, _) = create(&c, &root_creds(), &r.handle, "a", 0o644, RW).await;
    c.write(ctx(), root_creds(), fa.clone(), 0, b"AAA".to_vec().into())
        .await
        .unwrap()
        .unwrap();
    std::fs::write(s.vol().join("b"), b"BBB").unwrap();
    // rename over an existing target
    c.rename(
        ctx(),
        root_creds(),
        r.handle.clone(),
        b"a".to_vec(),
        r.handle.clone(),
        b"b".to_vec(),
        0,
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(std::fs::read(s.vol().join("b")).unwrap(), b"AAA");
    assert!(!s.vol().join("a").exists());
    // RENAME_NOREPLACE refuses
    std::fs::write(s.vol().join("c"), b"C").unwrap();
    let e = c
        .rename(
            ctx(),
            root_creds(),
            r.handle.clone(),
            b"c".to_vec(),
            r.handle.clone(),
            b"b".to_vec(),
            libc::RENAME_NOREPLACE,
        )
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.errno, libc::EEXIST);
    // RENAME_EXCHANGE swaps
    c.rename(
        ctx(),
        root_creds(),
        r.handle.clone(),
        b"c".to_vec(),
        r.handle.clone(),
        b"b".to_vec(),
        libc::RENAME_EXCHANGE,
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(std::fs::read(s.vol().join("c")).unwrap(), b"AAA");
    // unlink while open: the data stays readable through the open file
    c.unlink(ctx(), root_creds(), r.handle.clone(), b"c".to_vec())
        .await
        .unwrap()
        .unwrap();
    assert!(!s.vol().join("c").exists());
    let d = c
        .read(ctx(), root_creds(), fa.clone(), 0, 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&d[..], b"AAA", "unlinked open file lost its data");
    // fstat and ftruncate of the unlinked open file still work.
    let a = c
        .getattr(ctx(), fa.handle.clone())
        .await
        .unwrap()
        .expect("getattr of an unlinked file the session holds open");
    assert_eq!((a.nlink, a.size), (0, 3));
    let a = c
        .setattr(
            ctx(),
            root_creds(),
            fa.handle.clone(),
            SetAttr {
                size: Some(1),
                ..Default::default()
            },
            Some(fa.clone()),
        )
        .await
        .unwrap()
        .expect("ftruncate of an unlinked open file");
    assert_eq!(a.size, 1);
    c.release(ctx(), fa, None).await.unwrap().unwrap();
    // mkdir / rmdir
    let d = c
        .mkdir(
            ctx(),
            root_creds(),
            r.handle.clone(),
            b"d".to_vec(),
            0o755,
            0o022,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.attr.kind, FileKind::Dir);
    assert_eq!(d.attr.perm, 0o755);
    std::fs::write(s.vol().join("d/f"), b"").unwrap();
    let e = c
        .rmdir(ctx(), root_creds(), r.handle.clone(), b"d".to_vec())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.errno, libc::ENOTEMPTY);
    std::fs::remove_file(s.vol().join("d/f")).unwrap();
    c.rmdir(ctx(), root_creds(), r.handle.clone(), b"d".to_vec())
        .await
        .unwrap()
        .unwrap();
    assert!(!s.vol().join("d").exists());
}

#[tokio::test]
async fn symlink_hardlink_chmod_chown_utimes_mknod() {
    let s = TestServer::start().await;
    let c = s.client().await;
    let r = s.root_entry(&c).await;
    let l = c
        .symlink(
            ctx(),
            root_creds(),
            r.handle.clone(),
            b"ln".to_vec(),
            b"/etc/passwd".to_vec(),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(l.attr.kind, FileKind::Symlink);
    let t = c
        .readlink(ctx(), root_creds(), l.handle.clone())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t, b"/etc/passwd");
    assert_eq!(
        std::fs::read_link(s.vol().join("ln")).unwrap().to_str(),
        Some("/etc/passwd")
    );

    std::fs::write(s.vol().join("f"), b"x").unwrap();
    let f = c
        .lookup(ctx(), root_creds(), r.handle.clone(), b"f".to_vec())
        .await
        .unwrap()
        .unwrap();
    let h = c
        .link(
            ctx(),
            root_creds(),
            f.handle.clone(),
            r.handle.clone(),
            b"f2".to_vec(),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(h.attr.ino, f.attr.ino, "hard link has another ino");
    assert_eq!(h.attr.nlink, 2);

    let a = c
        .setattr(
            ctx(),
            root_creds(),
            f.handle.clone(),
            SetAttr {
                mode: Some(0o600),
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.perm, 0o600);
    let a = c
        .setattr(
            ctx(),
            root_creds(),
            f.handle.clone(),
            SetAttr {
                uid: Some(1234),
                gid: Some(4321),
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!((a.uid, a.gid), (1234, 4321));
    let md = std::fs::metadata(s.vol().join("f")).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o7777),
        (1234, 4321, 0o600)
    );
    let t = Time {
        secs: 1_000_000_000,
        nanos: 5,
    };
    let a = c
        .setattr(
            ctx(),
            root_creds(),
            f.handle.clone(),
            SetAttr {
                mtime: Some(SetTime::At(t)),
                atime: Some(SetTime::Now),
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.mtime, t);

    let n = c
        .mknod(
            ctx(),
            root_creds(),
            r.handle.clone(),
            b"fifo".to_vec(),
            libc::S_IFIFO | 0o644,
            0,
            0,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n.attr.kind, FileKind::Fifo);
    let st = c.statfs(ctx(), r.handle.clone()).await.unwrap().unwrap();
    assert!(st.blocks > 0 && st.bsize > 0, "statfs: {st:?}");
}

#[tokio::test]
async fn readdir_pages_through_ten_thousand_entries() {
    let s = TestServer::start().await;
    let c = s.client().await;
    let r = s.root_entry(&c).await;
    let d = s.vol().join("many");
    std::fs::create_dir(&d).unwrap();
    for i in 0..10_000 {
        std::fs::write(d.join(format!("f{i:05}")), b"").unwrap();
    }
    let dh = c
        .lookup(ctx(), root_creds(), r.handle.clone(), b"many".to_vec())
        .await
        .unwrap()
        .unwrap();
    let mut names = std::collections::BTreeSet::new();
    let mut cookie = 0;
    let mut pages = 0;
    loop {
        let batch = c
            .readdir(
                ctx(),
                root_creds(),
                dh.handle.clone(),
                cookie,
                700,
                pages % 2 == 1,
            )
            .await
            .unwrap()
            .unwrap();
        if batch.is_empty() {
            break;
        }
        assert!(
            batch.len() <= 700,
            "page longer than asked: {}",
            batch.len()
        );
        pages += 1;
        for e in &batch {
            assert_eq!(e.kind, FileKind::File);
            assert_eq!(
                e.entry.is_some(),
                pages % 2 == 0,
                "plus entries only in readdirplus"
            );
            assert!(
                names.insert(e.name.clone()),
                "{:?} listed twice",
                String::from_utf8_lossy(&e.name)
            );
        }
        cookie = batch.last().unwrap().cookie;
    }
    assert_eq!(
        names.len(),
        10_000,
        "listed {} of 10000 names over {pages} pages",
        names.len()
    );
    assert!(pages >= 15);
}
