//! Figures, not assertions: `cargo test -p fs-server --release --test figures --
//! --ignored --nocapture` prints throughput of 1 MiB reads and writes and the rate of
//! small-file creates over loopback, with several requests in flight.

mod util;

use std::time::Instant;

use futures::StreamExt;
use util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints figures; run by hand"]
async fn throughput_figures() {
    let s = TestServer::start().await;
    let c = s.client().await;
    let r = s.root_entry(&c).await;
    let (_, f, _) = create(&c, &root(), &r.handle, "big", 0o644, libc::O_RDWR).await;
    let chunk = vec![0xa5u8; 1 << 20];
    let total: u64 = 512;

    let t = Instant::now();
    futures::stream::iter(0..total)
        .map(|i| {
            let (c, f, d) = (c.clone(), f.clone(), chunk.clone());
            async move {
                c.write(ctx(), root(), f, i << 20, d.into())
                    .await
                    .unwrap()
                    .unwrap()
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    c.fsync(ctx(), f.clone(), false).await.unwrap().unwrap();
    let w = t.elapsed();

    let t = Instant::now();
    futures::stream::iter(0..total)
        .map(|i| {
            let (c, f) = (c.clone(), f.clone());
            async move {
                c.read(ctx(), root(), f, i << 20, 1 << 20)
                    .await
                    .unwrap()
                    .unwrap()
                    .len()
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    let rd = t.elapsed();

    let n = 2000;
    let t = Instant::now();
    for i in 0..n {
        let (_, f, _) = create(
            &c,
            &root(),
            &r.handle,
            &format!("s{i}"),
            0o644,
            libc::O_WRONLY,
        )
        .await;
        c.release(ctx(), f, None).await.unwrap().unwrap();
    }
    let cr = t.elapsed();

    let t = Instant::now();
    let mut fs = Vec::new();
    for i in 0..n {
        let (_, f, _) = create(
            &c,
            &root(),
            &r.handle,
            &format!("t{i}"),
            0o644,
            libc::O_WRONLY,
        )
        .await;
        fs.push(f);
    }
    let c1 = t.elapsed();
    let t = Instant::now();
    for f in fs {
        c.release(ctx(), f, None).await.unwrap().unwrap();
    }
    let c2 = t.elapsed();
    let t = Instant::now();
    for i in 0..n {
        c.mkdir(
            ctx(),
            root(),
            r.handle.clone(),
            format!("d{i}").into_bytes(),
            0o755,
            0,
        )
        .await
        .unwrap()
        .unwrap();
    }
    let c3 = t.elapsed();
    println!(
        "create {:.0} µs, release {:.0} µs, mkdir {:.0} µs",
        c1.as_secs_f64() * 1e6 / n as f64,
        c2.as_secs_f64() * 1e6 / n as f64,
        c3.as_secs_f64() * 1e6 / n as f64
    );
    let t = Instant::now();
    for _ in 0..n {
        c.getattr(ctx(), r.handle.clone()).await.unwrap().unwrap();
    }
    let ga = t.elapsed();
    let t = Instant::now();
    for _ in 0..n {
        c.volumes(ctx()).await.unwrap();
    }
    let vo = t.elapsed();
    println!(
        "getattr: {:.0} µs; volumes (no file system work): {:.0} µs per call",
        ga.as_secs_f64() * 1e6 / n as f64,
        vo.as_secs_f64() * 1e6 / n as f64
    );

    let mb = total as f64;
    println!(
        "write+fsync {total} MiB in 1 MiB requests, 8 in flight: {:.0} MB/s",
        mb * 1.048576 / w.as_secs_f64()
    );
    println!(
        "read {total} MiB (page cache warm), 8 in flight: {:.0} MB/s",
        mb * 1.048576 / rd.as_secs_f64()
    );
    println!(
        "create+release, one at a time: {:.0} µs per file",
        cr.as_secs_f64() * 1e6 / n as f64
    );
}
