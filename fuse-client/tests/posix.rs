//! POSIX operations through a real mount of the super-root, checked against the
//! exported directory on the server side.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};

use common::{Bench, Client, Server, VOLUME};

#[test]
fn super_root_lists_the_volume_and_refuses_changes() {
    let bench = Bench::new();
    let _server = Server::start(bench.config(common::SERVER));
    let client = Client::mount(&bench, "ws2");

    let names: Vec<String> = fs::read_dir(&client.root)
        .expect("super-root lists")
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        names.contains(&VOLUME.to_string()),
        "super-root listing {names:?} lacks {VOLUME}"
    );
    let md = fs::metadata(client.vol()).expect("volume root stats");
    assert!(md.is_dir(), "/.../{VOLUME} is not a directory");
    assert!(
        fs::metadata(client.root.join("no-such-volume")).is_err(),
        "a missing volume must not resolve"
    );
    let err =
        fs::create_dir(client.root.join("new")).expect_err("mkdir in the super-root must fail");
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EPERM),
        "mkdir in the super-root: {err}"
    );
}

#[test]
fn files_and_directories_behave_as_posix_says() {
    let bench = Bench::new();
    let _server = Server::start(bench.config(common::SERVER));
    let client = Client::mount(&bench, "ws2");
    let vol = client.vol();
    let export = bench.export();

    // create, write, read back, and the server's tree agrees
    fs::write(vol.join("a.txt"), b"hello ferry").expect("create+write");
    assert_eq!(
        fs::read(vol.join("a.txt")).unwrap(),
        b"hello ferry",
        "read back through the mount"
    );
    assert_eq!(
        fs::read(export.join("a.txt")).unwrap(),
        b"hello ferry",
        "server-side file content"
    );

    // overwrite in the middle, extend, truncate
    {
        let mut f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(vol.join("a.txt"))
            .unwrap();
        f.seek(SeekFrom::Start(6)).unwrap();
        f.write_all(b"FERRY!!").unwrap();
        f.sync_all().expect("fsync");
        let mut s = String::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello FERRY!!", "pwrite in the middle then read");
        f.set_len(5).expect("ftruncate");
    }
    assert_eq!(
        fs::read(vol.join("a.txt")).unwrap(),
        b"hello",
        "after truncate"
    );
    assert_eq!(
        fs::metadata(vol.join("a.txt")).unwrap().len(),
        5,
        "size after truncate"
    );

    // O_APPEND appends at the server's end of file
    {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(vol.join("a.txt"))
            .unwrap();
        f.write_all(b" world").unwrap();
    }
    assert_eq!(
        fs::read(export.join("a.txt")).unwrap(),
        b"hello world",
        "append"
    );

    // O_EXCL on an existing name
    let err = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(vol.join("a.txt"))
        .expect_err("O_EXCL on an existing file must fail");
    assert_eq!(err.raw_os_error(), Some(libc::EEXIST), "O_EXCL: {err}");

    // chmod, and mode on create
    fs::set_permissions(vol.join("a.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(
        fs::metadata(export.join("a.txt")).unwrap().mode() & 0o777,
        0o640,
        "chmod"
    );
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(vol.join("private"))
        .unwrap();
    assert_eq!(
        fs::metadata(vol.join("private")).unwrap().mode() & 0o777,
        0o600,
        "create mode"
    );

    // directories: mkdir, listing, rename, rmdir of non-empty and empty
    fs::create_dir(vol.join("d")).unwrap();
    for i in 0..300 {
        fs::write(vol.join("d").join(format!("f{i:03}")), format!("{i}")).unwrap();
    }
    let mut names: Vec<String> = fs::read_dir(vol.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let want: Vec<String> = (0..300).map(|i| format!("f{i:03}")).collect();
    assert_eq!(
        names, want,
        "a 300-entry directory lists every entry exactly once"
    );
    assert_eq!(fs::read_to_string(vol.join("d/f123")).unwrap(), "123");
    let err = fs::remove_dir(vol.join("d")).expect_err("rmdir of a non-empty dir must fail");
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOTEMPTY),
        "rmdir non-empty: {err}"
    );
    fs::rename(vol.join("d"), vol.join("e")).unwrap();
    assert!(
        export.join("e/f299").exists(),
        "rename moved the directory on the server"
    );
    assert!(!vol.join("d").exists(), "old name gone after rename");
    fs::remove_dir_all(vol.join("e")).unwrap();
    assert!(
        !export.join("e").exists(),
        "rm -r removed the tree on the server"
    );

    // symlinks and hard links
    std::os::unix::fs::symlink("a.txt", vol.join("link")).unwrap();
    assert_eq!(
        fs::read_link(vol.join("link")).unwrap().to_str(),
        Some("a.txt"),
        "readlink"
    );
    assert_eq!(
        fs::read(vol.join("link")).unwrap(),
        b"hello world",
        "read through a symlink"
    );
    fs::hard_link(vol.join("a.txt"), vol.join("hard")).unwrap();
    let (a, h) = (
        fs::metadata(vol.join("a.txt")).unwrap(),
        fs::metadata(vol.join("hard")).unwrap(),
    );
    assert_eq!(a.ino(), h.ino(), "hard links share an inode number");
    assert_eq!(a.nlink(), 2, "nlink after link");

    // rename over an existing file, unlink
    fs::write(vol.join("b.txt"), b"bbb").unwrap();
    fs::rename(vol.join("b.txt"), vol.join("hard")).unwrap();
    assert_eq!(
        fs::read(vol.join("hard")).unwrap(),
        b"bbb",
        "rename replaced the target"
    );
    assert_eq!(
        fs::metadata(vol.join("a.txt")).unwrap().nlink(),
        1,
        "nlink after replace"
    );
    fs::remove_file(vol.join("hard")).unwrap();
    let err = fs::metadata(vol.join("hard")).expect_err("unlinked name must be gone");
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT));

    // an unlinked file that is still open keeps its data
    {
        let mut f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(vol.join("tmp"))
            .unwrap();
        f.write_all(b"still here").unwrap();
        fs::remove_file(vol.join("tmp")).unwrap();
        let mut s = String::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "still here", "data of an unlinked open file");
    }

    // statfs
    // SAFETY: `st` is a valid statvfs buffer and the path a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let p = std::ffi::CString::new(vol.to_str().unwrap()).unwrap();
    // SAFETY: see above.
    let r = unsafe { libc::statvfs(p.as_ptr(), &mut st) };
    assert_eq!(
        r,
        0,
        "statvfs on the volume: {}",
        std::io::Error::last_os_error()
    );
    assert!(
        st.f_blocks > 0,
        "statvfs reports the server file system's size"
    );
}

#[test]
fn large_file_round_trips_byte_for_byte() {
    let bench = Bench::new();
    let _server = Server::start(bench.config(common::SERVER));
    let client = Client::mount(&bench, "ws2");
    let data: Vec<u8> = (0..(24u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(client.vol().join("big"), &data).unwrap();
    assert!(
        fs::read(bench.export().join("big")).unwrap() == data,
        "server copy differs from what was written"
    );
    assert!(
        fs::read(client.vol().join("big")).unwrap() == data,
        "read back through the mount differs"
    );
}

#[test]
fn posix_locks_conflict_between_owners() {
    let bench = Bench::new();
    let _server = Server::start(bench.config(common::SERVER));
    let a = Client::mount(&bench, "ws2");
    let b = Client::mount(&bench, "ws3");
    fs::write(a.vol().join("lockme"), b"x").unwrap();
    let fa = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(a.vol().join("lockme"))
        .unwrap();
    let fb = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(b.vol().join("lockme"))
        .unwrap();
    let lock = |f: &fs::File, typ: i32, cmd: i32| -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: zeroed flock is valid; fields set below.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = typ as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        // SAFETY: valid fd and flock pointer.
        let r = unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    lock(&fa, libc::F_WRLCK, libc::F_SETLK).expect("first write lock is granted");
    let err = lock(&fb, libc::F_WRLCK, libc::F_SETLK)
        .expect_err("a second node's write lock must conflict");
    assert!(
        matches!(err.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)),
        "conflicting lock: {err}"
    );
    // A blocking lock on the other node is granted once the first is released.
    let waiter = std::thread::spawn(move || lock(&fb, libc::F_WRLCK, libc::F_SETLKW).map(|_| fb));
    std::thread::sleep(std::time::Duration::from_millis(200));
    lock(&fa, libc::F_UNLCK, libc::F_SETLK).expect("unlock");
    let fb = waiter
        .join()
        .unwrap()
        .expect("blocking lock granted after the unlock");
    drop(fb);
    drop(fa);
}

#[test]
fn rewrites_of_the_same_bytes_land_in_order() {
    let bench = Bench::new();
    let _server = Server::start(bench.config(common::SERVER));
    let client = Client::mount(&bench, "ws2");
    let path = client.vol().join("rewritten");
    {
        use std::os::unix::fs::FileExt;
        let f = fs::File::create(&path).unwrap();
        for round in 0..200u32 {
            let block = vec![(round % 251) as u8; 64 << 10];
            // Two overlapping ranges per round, the second shifted by half a block.
            f.write_all_at(&block, 0).unwrap();
            f.write_all_at(&block, 32 << 10).unwrap();
        }
    }
    let got = fs::read(bench.export().join("rewritten")).unwrap();
    assert_eq!(got.len(), 96 << 10, "file size after overlapping rewrites");
    let last = 199u8; // round 199 wrote 199 % 251
    let wrong = got.iter().position(|&b| b != last);
    assert!(
        wrong.is_none(),
        "byte {wrong:?} is from an older write than the last one"
    );
}

#[test]
fn inodes_the_kernel_forgets_leave_the_table() {
    let bench = Bench::new();
    let _server = Server::start(bench.config(common::SERVER));
    let client = Client::mount(&bench, "ws2");
    fs::create_dir(client.vol().join("many")).unwrap();
    for i in 0..200 {
        fs::write(client.vol().join("many").join(i.to_string()), b"x").unwrap();
    }
    let held = client.known_inodes();
    assert!(
        held >= 200,
        "only {held} inodes known after creating 200 files"
    );
    // Ask the kernel to evict unused dentries and inodes: it sends FORGETs.
    fs::write("/proc/sys/vm/drop_caches", b"2").expect("drop_caches (needs root)");
    common::wait_for("forgets to empty the inode table", || {
        client.known_inodes() < 10
    });
}

#[test]
fn shared_mapping_of_an_append_only_open_writes_in_place() {
    use std::os::fd::AsRawFd;
    let bench = Bench::new();
    let _server = Server::start(bench.config(common::SERVER));
    let client = Client::mount(&bench, "ws2");
    let path = client.vol().join("mapped");
    let mut f = fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(&path)
        .unwrap();
    f.write_all(&[b'a'; 8192]).unwrap();
    // SAFETY: mapping 8192 bytes of an open file we own; unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "shared mmap of an O_APPEND open: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: p maps 8192 writable bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(b"HELLO".as_ptr(), p.cast::<u8>(), 5);
        assert_eq!(libc::msync(p, 8192, libc::MS_SYNC), 0, "msync");
        libc::munmap(p, 8192);
    }
    drop(f);
    let got = fs::read(bench.export().join("mapped")).unwrap();
    assert_eq!(
        got.len(),
        8192,
        "write-back of the mapping was appended instead of written in place"
    );
    assert_eq!(&got[..6], b"HELLOa", "mapped change not on the server");
}

#[test]
fn flock_works_on_read_only_descriptors_and_excludes_across_nodes() {
    use std::os::fd::AsRawFd;
    let bench = Bench::new();
    let _server = Server::start(bench.config(common::SERVER));
    let a = Client::mount(&bench, "ws2");
    let b = Client::mount(&bench, "ws3");
    fs::write(a.vol().join("flocked"), b"x").unwrap();
    // Read-only opens, as flock(1) makes them: two on node a, one on node b.
    let f1 = fs::File::open(a.vol().join("flocked")).unwrap();
    let f2 = fs::File::open(a.vol().join("flocked")).unwrap();
    let f3 = fs::File::open(b.vol().join("flocked")).unwrap();
    // SAFETY: flock(2) on open descriptors we own.
    let flock = |f: &fs::File, op: i32| unsafe { libc::flock(f.as_raw_fd(), op) };
    assert_eq!(
        flock(&f1, libc::LOCK_EX | libc::LOCK_NB),
        0,
        "flock on a read-only descriptor: {}",
        std::io::Error::last_os_error()
    );
    assert_eq!(
        flock(&f2, libc::LOCK_EX | libc::LOCK_NB),
        -1,
        "a second open's flock on the same node must conflict"
    );
    assert_eq!(
        flock(&f3, libc::LOCK_SH | libc::LOCK_NB),
        -1,
        "a flock on another node must conflict with the held exclusive flock"
    );
    drop(f1);
    // The flock goes with the close, but FUSE sends that unlock with the RELEASE of the
    // file, which the kernel queues after close(2) returns: wait for it, bounded.
    let mut taken = false;
    for _ in 0..500 {
        if flock(&f3, libc::LOCK_SH | libc::LOCK_NB) == 0 {
            taken = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(
        taken,
        "the flock did not go with its close: the other node still cannot lock after 5 s"
    );
    assert_eq!(
        flock(&f2, libc::LOCK_EX | libc::LOCK_NB),
        -1,
        "an exclusive flock must wait for the other node's shared one"
    );
    assert_eq!(flock(&f3, libc::LOCK_UN), 0, "unlock on node b");
    assert_eq!(
        flock(&f2, libc::LOCK_EX | libc::LOCK_NB),
        0,
        "after node b unlocked, node a may lock: {}",
        std::io::Error::last_os_error()
    );
}
