//! Figures, not assertions: `cargo test -p fuse-client --release --test figures --
//! --ignored --nocapture` prints throughput and latency through the mount beside the
//! same work on the exported directory directly, measured in one run.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

use common::{Bench, Client, Server};

const SIZE: usize = 256 << 20;

fn write_file(path: &Path, data: &[u8]) -> f64 {
    let t = Instant::now();
    let mut f = fs::File::create(path).unwrap();
    for chunk in data.chunks(1 << 20) {
        f.write_all(chunk).unwrap();
    }
    f.sync_all().unwrap();
    t.elapsed().as_secs_f64()
}

fn read_file(path: &Path) -> f64 {
    let t = Instant::now();
    let mut f = fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf).unwrap() > 0 {}
    t.elapsed().as_secs_f64()
}

fn per_op_us(n: usize, mut op: impl FnMut(usize)) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        op(i);
    }
    t.elapsed().as_secs_f64() * 1e6 / n as f64
}

#[test]
#[ignore = "prints figures; run with --ignored --nocapture"]
fn figures() {
    let bench = Bench::new();
    let _server = Server::start(bench.config(common::SERVER));
    let data: Vec<u8> = (0..SIZE as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 9) as u8)
        .collect();
    let mb = SIZE as f64 / 1e6;
    let native_w = write_file(&bench.export().join("native"), &data);
    let native_r = read_file(&bench.export().join("native"));

    let client = Client::mount(&bench, "ws2");
    let vol = client.vol();
    let fuse_w = write_file(&vol.join("big"), &data);
    drop(client);
    // A fresh mount: nothing of the file in this client's page cache.
    let client = Client::mount(&bench, "ws2");
    let vol = client.vol();
    let fuse_r_cold = read_file(&vol.join("big"));
    let fuse_r_warm = read_file(&vol.join("big"));

    fs::create_dir(vol.join("small")).unwrap();
    let create = per_op_us(1000, |i| {
        fs::File::create(vol.join("small").join(i.to_string())).unwrap();
    });
    std::thread::sleep(std::time::Duration::from_millis(1100)); // attributes expire
    let stat = per_op_us(1000, |i| {
        fs::metadata(vol.join("small").join(i.to_string())).unwrap();
    });
    let miss = per_op_us(1000, |i| {
        let _ = fs::metadata(vol.join("small").join(format!("x{i}")));
    });
    let native_create = per_op_us(1000, |i| {
        fs::File::create(bench.export().join(format!("n{i}"))).unwrap();
    });

    println!("fuse-client figures (loopback, {} MiB files)", SIZE >> 20);
    println!("| what | through /... | native | ratio |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| sequential write + fsync | {:.0} MB/s | {:.0} MB/s | {:.2} |",
        mb / fuse_w,
        mb / native_w,
        native_w / fuse_w
    );
    println!(
        "| sequential read, client cold | {:.0} MB/s | {:.0} MB/s (warm) | {:.2} |",
        mb / fuse_r_cold,
        mb / native_r,
        native_r / fuse_r_cold
    );
    println!(
        "| re-read, client warm | {:.0} MB/s | | |",
        mb / fuse_r_warm
    );
    println!(
        "| create + close | {create:.0} µs | {native_create:.0} µs | {:.1}x slower |",
        create / native_create
    );
    println!("| stat, attributes expired | {stat:.0} µs | | |");
    println!("| lookup of a missing name | {miss:.0} µs | | |");
}
