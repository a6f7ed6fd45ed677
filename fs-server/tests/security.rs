//! Credentials and confinement: fs-server acts with the caller's rights and never
//! resolves a name outside its volume.

mod util;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::fsproto::{FileHandle, FileKind, SetAttr};
use util::*;

fn chown(p: &std::path::Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
}

fn write_mode(p: &std::path::Path, data: &[u8], mode: u32, uid: u32) {
    std::fs::write(p, data).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    chown(p, uid, uid);
}

#[tokio::test]
async fn uid_1000_cannot_read_a_0600_file_of_uid_1001() {
    let s = TestServer::start().await;
    let c = s.client().await;
    let r = s.root_entry(&c).await;
    write_mode(&s.vol().join("secret"), b"s3cret", 0o600, 1001);
    let e = c
        .lookup(ctx(), user(1000), r.handle.clone(), b"secret".to_vec())
        .await
        .unwrap()
        .unwrap();
    let err = c
        .open(ctx(), user(1000), e.handle.clone(), libc::O_RDONLY)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(
        err.errno,
        libc::EACCES,
        "uid 1000 opened uid 1001's 0600 file: {err}"
    );
    // The owner can; and a member of no group cannot sneak in through groups.
    let o = c
        .open(ctx(), user(1001), e.handle.clone(), libc::O_RDONLY)
        .await
        .unwrap()
        .expect("owner opens its own file");
    let f = of(&e.handle, &o, libc::O_RDONLY);
    let d = c.read(ctx(), user(1001), f, 0, 100).await.unwrap().unwrap();
    assert_eq!(&d[..], b"s3cret");
    // Root (not squashed) reads anything.
    c.open(ctx(), root(), e.handle.clone(), libc::O_RDONLY)
        .await
        .unwrap()
        .expect("root opens any file");
}

#[tokio::test]
async fn a_file_one_may_only_read_is_not_writable() {
    let s = TestServer::start().await;
    let c = s.client().await;
    let r = s.root_entry(&c).await;
    write_mode(&s.vol().join("ro"), b"data", 0o644, 1001);
    let e = c
        .lookup(ctx(), user(1000), r.handle.clone(), b"ro".to_vec())
        .await
        .unwrap()
        .unwrap();
    let err = c
        .open(ctx(), user(1000), e.handle.clone(), libc::O_RDWR)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(
        err.errno,
        libc::EACCES,
        "read-only file opened for writing: {err}"
    );
    let err = c
        .setattr(
            ctx(),
            user(1000),
            e.handle.clone(),
            SetAttr {
                size: Some(0),
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.errno, libc::EACCES, "read-only file truncated: {err}");
    let err = c
        .setattr(
            ctx(),
            user(1000),
            e.handle.clone(),
            SetAttr {
                mode: Some(0o666),
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.errno, libc::EPERM, "non-owner changed the mode: {err}");
    let err = c
        .setattr(
            ctx(),
            user(1001),
            e.handle.clone(),
            SetAttr {
                uid: Some(1000),
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.errno, libc::EPERM, "non-root gave a file away: {err}");
    let t = common::fsproto::Time { secs: 1, nanos: 0 };
    let err = c
        .setattr(
            ctx(),
            user(1000),
            e.handle.clone(),
            SetAttr {
                mtime: Some(common::fsproto::SetTime::At(t)),
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(
        err.errno,
        libc::EPERM,
        "non-owner set an explicit mtime: {err}"
    );
    let md = std::fs::metadata(s.vol().join("ro")).unwrap();
    assert_eq!(
        (md.uid(), md.mode() & 0o7777),
        (1001, 0o644),
        "refusals changed the file"
    );
    // Another user cannot write in a directory it does not own (0755).
    let d = s.vol().join("d");
    std::fs::create_dir(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    chown(&d, 1001, 1001);
    let dh = c
        .lookup(ctx(), user(1000), r.handle.clone(), b"d".to_vec())
        .await
        .unwrap()
        .unwrap();
    let err = c
        .create(
            ctx(),
            user(1000),
            dh.handle.clone(),
            b"x".to_vec(),
            0o644,
            0,
            libc::O_RDWR,
        )
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(
        err.errno,
        libc::EACCES,
        "created in another user's 0755 dir: {err}"
    );
    assert_eq!(std::fs::read(s.vol().join("ro")).unwrap(), b"data");
    // Files a user creates are the user's.
    let (ne, _, _) = create(&c, &user(1000), &r.handle, "mine", 0o640, libc::O_RDWR).await;
    assert_eq!((ne.attr.uid, ne.attr.gid), (1000, 1000));
    let md = std::fs::metadata(s.vol().join("mine")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1000, 1000));
}

#[tokio::test]
async fn squash_root_makes_root_nobody() {
    let s = TestServer::start_with(|c| c.fs.squash_root = true).await;
    let c = s.client().await;
    let r = s.root_entry(&c).await;
    write_mode(&s.vol().join("secret"), b"s", 0o600, 1001);
    let e = c
        .lookup(ctx(), root(), r.handle.clone(), b"secret".to_vec())
        .await
        .unwrap()
        .unwrap();
    let err = c
        .open(ctx(), root(), e.handle.clone(), libc::O_RDONLY)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(
        err.errno,
        libc::EACCES,
        "squashed root read a 0600 file: {err}"
    );
    let (ne, _, _) = create(&c, &root(), &r.handle, "byroot", 0o644, libc::O_RDWR).await;
    assert_eq!(
        (ne.attr.uid, ne.attr.gid),
        (65534, 65534),
        "squashed root's file owner"
    );
}

#[tokio::test]
async fn dotdot_and_multi_component_names_are_refused() {
    let s = TestServer::start().await;
    let c = s.client().await;
    let r = s.root_entry(&c).await;
    std::fs::create_dir(s.vol().join("sub")).unwrap();
    let sub = c
        .lookup(ctx(), root(), r.handle.clone(), b"sub".to_vec())
        .await
        .unwrap()
        .unwrap();
    for (dir, name, errno) in [
        (&r.handle, &b".."[..], libc::EPERM),
        (&sub.handle, &b".."[..], libc::EPERM),
        (&r.handle, &b"sub/.."[..], libc::EINVAL),
        (&r.handle, &b"../vol"[..], libc::EINVAL),
        (&r.handle, &b"/etc"[..], libc::EINVAL),
        (&r.handle, &b""[..], libc::EINVAL),
        (&r.handle, &b"."[..], libc::EINVAL),
        (&r.handle, &b"a\0b"[..], libc::EINVAL),
    ] {
        let e = c
            .lookup(ctx(), root(), dir.clone(), name.to_vec())
            .await
            .unwrap()
            .expect_err(&format!(
                "lookup {:?} was answered",
                String::from_utf8_lossy(name)
            ));
        assert_eq!(
            e.errno,
            errno,
            "lookup {:?}: {e}",
            String::from_utf8_lossy(name)
        );
        let e = c
            .mkdir(ctx(), root(), dir.clone(), name.to_vec(), 0o755, 0)
            .await
            .unwrap()
            .expect_err("mkdir with a bad name");
        assert!(e.errno == errno || e.errno == libc::EINVAL, "mkdir {e}");
    }
    // Nothing was made outside the volume.
    assert!(!s.dir.path().join("vol2").exists());
}

#[tokio::test]
async fn a_symlink_pointing_outside_is_never_followed_by_the_server() {
    let s = TestServer::start().await;
    let c = s.client().await;
    let r = s.root_entry(&c).await;
    let outside = s.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"outside data").unwrap();
    std::os::unix::fs::symlink(&outside, s.vol().join("out")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), s.vol().join("outfile")).unwrap();

    let l = c
        .lookup(ctx(), root(), r.handle.clone(), b"out".to_vec())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        l.attr.kind,
        FileKind::Symlink,
        "lookup followed the symlink"
    );
    let text = c
        .readlink(ctx(), root(), l.handle.clone())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(text, outside.as_os_str().as_encoded_bytes());
    let e = c
        .lookup(ctx(), root(), l.handle.clone(), b"secret".to_vec())
        .await
        .unwrap()
        .expect_err("lookup through a symlink to outside the volume");
    assert_eq!(e.errno, libc::ENOTDIR, "{e}");
    let e = c
        .readdir(ctx(), root(), l.handle.clone(), 0, 10, false)
        .await
        .unwrap()
        .expect_err("readdir through a symlink");
    assert_eq!(e.errno, libc::ENOTDIR, "{e}");
    let e = c
        .create(
            ctx(),
            root(),
            l.handle.clone(),
            b"new".to_vec(),
            0o644,
            0,
            libc::O_RDWR,
        )
        .await
        .unwrap()
        .expect_err("create through a symlink");
    assert_eq!(e.errno, libc::ENOTDIR, "{e}");
    assert!(!outside.join("new").exists());

    let lf = c
        .lookup(ctx(), root(), r.handle.clone(), b"outfile".to_vec())
        .await
        .unwrap()
        .unwrap();
    let e = c
        .open(ctx(), root(), lf.handle.clone(), libc::O_RDONLY)
        .await
        .unwrap()
        .expect_err("open of a symlink to a file outside");
    assert_eq!(e.errno, libc::ELOOP, "{e}");
    // Creating over the symlink name does not write through it either.
    let e = c
        .create(
            ctx(),
            root(),
            r.handle.clone(),
            b"outfile".to_vec(),
            0o644,
            0,
            libc::O_RDWR | libc::O_TRUNC,
        )
        .await
        .unwrap()
        .expect_err("create over a symlink");
    assert_eq!(e.errno, libc::ELOOP, "{e}");
    assert_eq!(
        std::fs::read(outside.join("secret")).unwrap(),
        b"outside data"
    );
}

#[tokio::test]
async fn forged_or_modified_handles_are_refused() {
    let s = TestServer::start().await;
    let c = s.client().await;
    let r = s.root_entry(&c).await;
    std::fs::write(s.vol().join("f"), b"x").unwrap();
    let e = c
        .lookup(ctx(), root(), r.handle.clone(), b"f".to_vec())
        .await
        .unwrap()
        .unwrap();
    for i in [0, 3, e.handle.0.len() / 2, e.handle.0.len() - 1] {
        let mut bad = e.handle.clone();
        bad.0[i] ^= 1;
        let err = c.getattr(ctx(), bad).await.unwrap().unwrap_err();
        assert!(
            err.errno == libc::EBADF || err.errno == libc::ESTALE,
            "handle with byte {i} flipped: {err}"
        );
    }
    let err = c
        .getattr(ctx(), FileHandle(b"garbage".to_vec()))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.errno, libc::EBADF, "{err}");
    // A handle signed with another key, naming the same kernel object.
    let other = common::auth::ClusterKey::from_bytes(b"another-cluster-key-00");
    let d =
        fs_server::handle::decode(&common::auth::ClusterKey::from_bytes(KEY), &e.handle).unwrap();
    let forged = fs_server::handle::encode(&other, &d.volume, d.mount_id, &d.kernel);
    let err = c.getattr(ctx(), forged).await.unwrap().unwrap_err();
    assert_eq!(err.errno, libc::EBADF, "{err}");
    // A removed file's handle is stale.
    std::fs::remove_file(s.vol().join("f")).unwrap();
    let err = c
        .getattr(ctx(), e.handle.clone())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.errno, libc::ESTALE, "{err}");
}

/// Mounts `fstype` at `at` for the life of the guard.
struct Mount(std::path::PathBuf);

impl Mount {
    fn new(fstype: &str, at: &std::path::Path) -> Mount {
        std::fs::create_dir_all(at).unwrap();
        nix::mount::mount(
            Some(fstype),
            at,
            Some(fstype),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("mount {fstype} at {}: {e}", at.display()));
        Mount(at.to_owned())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[tokio::test]
async fn proc_mounts_are_never_entered_and_others_only_with_cross_mounts() {
    for cross in [true, false] {
        let s = TestServer::start_with(|c| c.fs.cross_mounts = cross).await;
        let pm = Mount::new("proc", &s.vol().join("p"));
        let tm = Mount::new("tmpfs", &s.vol().join("t"));
        let c = s.client().await;
        let r = s.root_entry(&c).await;
        let e = c
            .lookup(ctx(), root(), r.handle.clone(), b"p".to_vec())
            .await
            .unwrap()
            .expect_err("lookup entered /proc");
        assert_eq!(e.errno, libc::ENOENT, "{e}");
        let t = c
            .lookup(ctx(), root(), r.handle.clone(), b"t".to_vec())
            .await
            .unwrap();
        let names: Vec<String> = c
            .readdir(ctx(), root(), r.handle.clone(), 0, 100, false)
            .await
            .unwrap()
            .unwrap()
            .iter()
            .map(|e| String::from_utf8_lossy(&e.name).into_owned())
            .collect();
        assert!(
            !names.contains(&"p".to_string()),
            "readdir shows the proc mount: {names:?}"
        );
        if cross {
            let t = t.expect("cross_mounts: tmpfs entered");
            let (_, f, _) = create(&c, &root(), &t.handle, "in-tmpfs", 0o644, libc::O_RDWR).await;
            c.write(ctx(), root(), f, 0, b"t".to_vec().into())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(std::fs::read(s.vol().join("t/in-tmpfs")).unwrap(), b"t");
            assert!(names.contains(&"t".to_string()), "{names:?}");
        } else {
            assert_eq!(
                t.expect_err("tmpfs entered without cross_mounts").errno,
                libc::ENOENT
            );
            assert!(!names.contains(&"t".to_string()), "{names:?}");
        }
        drop(c);
        drop(tm);
        drop(pm);
        s.stop().await;
    }
}

#[tokio::test]
async fn supplementary_groups_of_the_caller_are_used() {
    let s = TestServer::start().await;
    let c = s.client().await;
    let r = s.root_entry(&c).await;
    let p = s.vol().join("grp");
    std::fs::write(&p, b"group data").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(&p, Some(1001), Some(2000)).unwrap();
    let e = c
        .lookup(ctx(), user(1000), r.handle.clone(), b"grp".to_vec())
        .await
        .unwrap()
        .unwrap();
    let mut member = user(1000);
    member.groups = vec![5, 2000];
    c.open(ctx(), member, e.handle.clone(), libc::O_RDONLY)
        .await
        .unwrap()
        .expect("a member of the file's group may read it");
    let err = c
        .open(ctx(), user(1000), e.handle.clone(), libc::O_RDONLY)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(
        err.errno,
        libc::EACCES,
        "a non-member read a 0640 file: {err}"
    );
    // The worker threads went back to root: root still reads everything.
    for _ in 0..8 {
        c.open(ctx(), root(), e.handle.clone(), libc::O_RDONLY)
            .await
            .unwrap()
            .expect("root after user requests");
    }
}

#[tokio::test]
async fn the_root_export_hides_proc_sys_and_dev() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config::NodeConfig {
        fs: Default::default(),
        ..config_for(dir.path())
    };
    config.fs.export_root = true;
    let s = TestServer::start_in(dir, config).await;
    let c = s.client().await;
    let r = c
        .root(ctx(), "ws1".into())
        .await
        .unwrap()
        .expect("root export named after the node");
    for name in ["proc", "sys", "dev"] {
        let e = c
            .lookup(ctx(), root(), r.handle.clone(), name.as_bytes().to_vec())
            .await
            .unwrap()
            .expect_err(&format!("/{name} was entered"));
        assert_eq!(e.errno, libc::ENOENT, "/{name}: {e}");
    }
    let names: Vec<String> = c
        .readdir(ctx(), root(), r.handle.clone(), 0, 4096, true)
        .await
        .unwrap()
        .unwrap()
        .iter()
        .map(|e| String::from_utf8_lossy(&e.name).into_owned())
        .collect();
    for name in ["proc", "sys", "dev"] {
        assert!(
            !names.contains(&name.to_string()),
            "readdir / shows {name}: {names:?}"
        );
    }
    assert!(
        names.contains(&"tmp".to_string()),
        "readdir / lacks tmp: {names:?}"
    );
    let tmp = c
        .lookup(ctx(), root(), r.handle.clone(), b"tmp".to_vec())
        .await
        .unwrap()
        .expect("/tmp");
    let d = s
        .dir
        .path()
        .file_name()
        .unwrap()
        .as_encoded_bytes()
        .to_vec();
    let td = c
        .lookup(ctx(), root(), tmp.handle.clone(), d)
        .await
        .unwrap()
        .expect("the test's temp dir through the root export");
    assert_eq!(td.attr.kind, common::fsproto::FileKind::Dir);
}

#[tokio::test]
async fn a_file_moved_out_of_the_volume_is_no_longer_reachable_by_its_handle() {
    let s = TestServer::start().await;
    let c = s.client().await;
    let r = s.root_entry(&c).await;
    std::fs::create_dir(s.vol().join("d")).unwrap();
    std::fs::write(s.vol().join("d/f"), b"inside").unwrap();
    let d = c
        .lookup(ctx(), root(), r.handle.clone(), b"d".to_vec())
        .await
        .unwrap()
        .unwrap();
    let f = c
        .lookup(ctx(), root(), d.handle.clone(), b"f".to_vec())
        .await
        .unwrap()
        .unwrap();
    // A local process moves the directory out of the volume.
    std::fs::rename(s.vol().join("d"), s.dir.path().join("d-out")).unwrap();
    for (h, what) in [(&d.handle, "directory"), (&f.handle, "file")] {
        let e = c
            .getattr(ctx(), h.clone())
            .await
            .unwrap()
            .expect_err(&format!("{what} moved out of the volume still reachable"));
        assert_eq!(e.errno, libc::ESTALE, "{what}: {e}");
    }
    let e = c
        .create(
            ctx(),
            root(),
            d.handle.clone(),
            b"new".to_vec(),
            0o644,
            0,
            libc::O_RDWR,
        )
        .await
        .unwrap()
        .expect_err("create in a directory moved out of the volume");
    assert_eq!(e.errno, libc::ESTALE, "{e}");
    assert!(!s.dir.path().join("d-out/new").exists());
    // Moved back, the same handles work again.
    std::fs::rename(s.dir.path().join("d-out"), s.vol().join("d")).unwrap();
    c.getattr(ctx(), f.handle.clone())
        .await
        .unwrap()
        .expect("handle after the file came back");
}

/// A FUSE file system whose daemon never answers lookup or getattr: anything that
/// asked it would hang.
struct HungFs(std::sync::Mutex<Vec<Box<dyn Send>>>);

impl fuser::Filesystem for HungFs {
    fn lookup(
        &self,
        _: &fuser::Request,
        _: fuser::INodeNo,
        _: &std::ffi::OsStr,
        reply: fuser::ReplyEntry,
    ) {
        self.0.lock().unwrap().push(Box::new(reply));
    }
    fn getattr(
        &self,
        _: &fuser::Request,
        _: fuser::INodeNo,
        _: Option<fuser::FileHandle>,
        reply: fuser::ReplyAttr,
    ) {
        self.0.lock().unwrap().push(Box::new(reply));
    }
}

#[tokio::test]
async fn fuse_mounts_are_never_entered_nor_asked_even_when_their_daemon_hangs() {
    let s = TestServer::start().await;
    let mp = s.vol().join("fusemnt");
    std::fs::create_dir(&mp).unwrap();
    let mp2 = mp.clone();
    let session = tokio::task::spawn_blocking(move || {
        let mut cfg = fuser::Config::default();
        cfg.mount_options = vec![fuser::MountOption::FSName("hung".into())];
        fuser::Session::new(HungFs(Default::default()), &mp2, &cfg).and_then(|s| s.spawn())
    })
    .await
    .unwrap()
    .expect("mount a FUSE file system for the test");
    let c = s.client().await;
    let r = s.root_entry(&c).await;
    let e = c
        .lookup(ctx(), root(), r.handle.clone(), b"fusemnt".to_vec())
        .await
        .unwrap()
        .expect_err("lookup entered a FUSE mount");
    assert_eq!(e.errno, libc::ENOENT, "{e}");
    for plus in [false, true] {
        let names: Vec<Vec<u8>> = c
            .readdir(ctx(), root(), r.handle.clone(), 0, 100, plus)
            .await
            .unwrap()
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert!(
            !names.contains(&b"fusemnt".to_vec()),
            "readdir (plus: {plus}) lists the FUSE mount point"
        );
    }
    drop(c);
    tokio::task::spawn_blocking(move || drop(session))
        .await
        .unwrap();
    let _ = nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH);
}
