//! Runs an external tool with a deadline and captures what it printed, so a hung peer fails
//! its test instead of hanging the whole run.

use std::fmt;
use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// What a finished (or killed) command left behind.
pub struct Outcome {
    pub command: String,
    pub status: Option<ExitStatus>,
    pub timed_out: bool,
    pub elapsed: Duration,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn success(&self) -> bool {
        !self.timed_out && self.status.is_some_and(|s| s.success())
    }

    /// Panics with the whole output unless the command exited 0.
    pub fn assert_success(&self) -> &Self {
        assert!(self.success(), "command failed:\n{self}");
        self
    }

    /// Panics with the whole output if the command exited 0 (or hung).
    pub fn assert_failure(&self) -> &Self {
        assert!(
            !self.timed_out && self.status.is_some_and(|s| !s.success()),
            "command should have failed:\n{self}"
        );
        self
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = match (self.timed_out, self.status) {
            (true, _) => "killed after timeout".to_string(),
            (false, Some(s)) => s.to_string(),
            (false, None) => "not waited for".to_string(),
        };
        writeln!(f, "$ {}", self.command)?;
        writeln!(f, "-> {status} in {:.2?}", self.elapsed)?;
        writeln!(f, "--- stdout ---\n{}", self.stdout.trim_end())?;
        write!(f, "--- stderr ---\n{}", self.stderr.trim_end())
    }
}

/// Runs `cmd` (stdin closed) and kills it after `timeout`. Echoes the outcome to the test's
/// captured output, which cargo shows when the test fails.
pub fn run(cmd: &mut Command, timeout: Duration) -> Outcome {
    let command = describe(cmd);
    let start = Instant::now();
    let mut child = match cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!("cannot start `{command}`: {e}"),
    };
    let out = child.stdout.take().map(drain);
    let err = child.stderr.take().map(drain);
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if start.elapsed() >= timeout => {
                timed_out = true;
                let _ = child.kill();
                break child.wait().ok();
            }
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("waiting for `{command}`: {e}"),
        }
    };
    let join =
        |h: Option<thread::JoinHandle<String>>| h.and_then(|h| h.join().ok()).unwrap_or_default();
    let outcome = Outcome {
        command,
        status,
        timed_out,
        elapsed: start.elapsed(),
        stdout: join(out),
        stderr: join(err),
    };
    println!("{outcome}");
    outcome
}

fn drain<R: Read + Send + 'static>(mut r: R) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// The command line as a shell would show it (for messages only).
pub fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_status() {
        let o = run(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(10),
        );
        assert_eq!(o.stdout, "out\n");
        assert_eq!(o.stderr, "err\n");
        assert_eq!(o.status.and_then(|s| s.code()), Some(3));
        assert!(!o.success());
    }

    #[test]
    fn kills_a_command_that_outlives_its_timeout() {
        let o = run(Command::new("sleep").arg("30"), Duration::from_millis(200));
        assert!(o.timed_out);
        assert!(!o.success());
        assert!(o.elapsed < Duration::from_secs(10));
    }
}
