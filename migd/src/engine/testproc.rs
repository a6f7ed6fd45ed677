//! A python3 for the engine's unit tests: it sets itself up, prints `ready`, then on
//! each line of input does what the line says and answers `ok`.

use std::io::{BufRead, Write};
use std::process::{Child, ChildStdout, Command, Stdio};

pub struct Py {
    child: Child,
    out: std::io::BufReader<ChildStdout>,
}

impl Py {
    /// Runs `python3 -c <setup>` followed by a loop that, for each line `l` of input
    /// (stripped), runs `act` (Python statements indented by one space, which see
    /// `l`) and prints `ok`; returns once the setup printed `ready`.
    pub fn start(setup: &str, act: &str) -> Py {
        let prog = format!(
            "{setup}\nimport sys\nprint('ready',flush=True)\nfor l in sys.stdin:\n l=l.strip()\n{act}\n print('ok',flush=True)\n"
        );
        let mut child = Command::new("python3")
            .args(["-c", &prog])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        out.read_line(&mut line).expect("python3's first line");
        assert_eq!(line.trim(), "ready", "python3 did not start: {prog}");
        Py { child, out }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `what` and waits for its `ok`.
    pub fn tell(&mut self, what: &str) {
        writeln!(self.child.stdin.as_mut().expect("piped"), "{what}").expect("python3's stdin");
        let mut line = String::new();
        self.out.read_line(&mut line).expect("python3's answer");
        assert_eq!(line.trim(), "ok", "after {what}");
    }
}

impl Drop for Py {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
