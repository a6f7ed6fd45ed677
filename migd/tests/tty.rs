//! A program whose stdin is a terminal it put in raw mode is dumped, the terminal is
//! reset behind its back, and the restore puts the program's modes and window size back.

mod common;
use common::*;
use std::os::fd::AsFd;
use std::process::{Command, Stdio};

const TTY_C: &str = r#"
#include <stdio.h>
#include <termios.h>
#include <sys/ioctl.h>
#include <unistd.h>
int main(void) {
    struct termios t;
    tcgetattr(0, &t);
    t.c_lflag &= ~(ECHO | ICANON);
    tcsetattr(0, TCSANOW, &t);
    for (int i = 0; i < 300; i++) { usleep(10000); if (i % 50 == 0) { printf("%d\n", i); fflush(stdout); } }
    tcgetattr(0, &t);
    struct winsize ws;
    ioctl(0, TIOCGWINSZ, &ws);
    printf("echo=%d icanon=%d rows=%d cols=%d\n", !!(t.c_lflag & ECHO), !!(t.c_lflag & ICANON), ws.ws_row, ws.ws_col);
    return 0;
}
"#;

#[test]
fn terminal_modes_and_window_size_come_back_with_the_process() {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    let dir = tempdir();
    let exe = compile_c(dir.path(), "tty", TTY_C, &[]);
    let ws = nix::pty::Winsize {
        ws_row: 33,
        ws_col: 77,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&ws), None).unwrap();
    let out = dir.path().join("o");
    let mut child = Command::new(&exe)
        .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
        .stdout(std::fs::File::create(&out).unwrap())
        .spawn()
        .unwrap();
    std::thread::sleep(ms(800));
    let img = dir.path().join("img");
    dump_ok(&child.id().to_string(), &img, "dump failed");
    let _ = child.wait();
    // Behind its back: echo and canonical mode on again.
    let mut t = tcgetattr(pty.slave.as_fd()).unwrap();
    t.local_flags |= LocalFlags::ECHO | LocalFlags::ICANON;
    tcsetattr(pty.slave.as_fd(), SetArg::TCSANOW, &t).unwrap();
    let (r, _) = start_restore(&img);
    let o = r.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "restored process failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        text.ends_with("echo=0 icanon=0 rows=33 cols=77\n"),
        "terminal state not restored; the program ended with: {:?}",
        text.lines().last()
    );
    assert!(
        text.starts_with("0\n50\n100\n150\n200\n250\n"),
        "progress lines differ: {text:?}"
    );
}
