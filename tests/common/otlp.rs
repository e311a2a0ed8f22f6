//! What the OpenTelemetry tests share (`otel.rs`, `otel_env.rs`, `otlp_metrics.rs`): the
//! `oteltap` OTLP/HTTP receiver as a child process, loopback addresses to export to, and this
//! test binary run again as a child process with an environment of its own (environment
//! variables are process-wide, so each case of the `OTEL_*` tests needs a process).

use std::io::BufRead as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;

use super::require_external;

/// A child process, killed when dropped (also when a test fails).
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `oteltap` from PyPI listening on a loopback port: it prints what it receives as OTLP JSON,
/// one object a line, and stops when dropped.
pub struct Oteltap {
    pub child: Child,
    /// Its output, a line at a time (read on a thread of its own).
    pub lines: UnboundedReceiver<String>,
    pub port: u16,
}

impl Oteltap {
    /// Starts oteltap on a free loopback port and waits until it listens, or returns `None`
    /// (after printing why `test` is skipped) when it is not installed and
    /// `TOKENTAP_REQUIRE_EXTERNAL` is not `1`.
    pub async fn start(test: &str) -> Option<Oteltap> {
        let installed = Command::new("python3")
            .args(["-c", "import oteltap"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            assert!(
                !require_external(),
                "{test}: oteltap is required (python3 -m pip install oteltap)"
            );
            println!(
                "skipped: {test} needs the oteltap OTLP/HTTP receiver (python3 -m pip install oteltap)"
            );
            return None;
        }
        let port = free_port().await;
        let mut child = Command::new("python3")
            .args(["-u", "-m", "oteltap", "--port", &port.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("oteltap starts");
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let child = Child(child);
        let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in out.lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = tokio::time::timeout(Duration::from_secs(20), lines.recv())
            .await
            .expect("oteltap says it listens")
            .unwrap_or_default();
        assert!(first.contains("Listening"), "oteltap said {first:?}");
        Some(Oteltap { child, lines, port })
    }

    /// The base URL to export to.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// A loopback port that was free a moment ago.
pub async fn free_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// The URL of a loopback port nothing listens on: an export to it is refused.
pub async fn dead_endpoint() -> String {
    format!("http://127.0.0.1:{}", free_port().await)
}

/// This test binary again, running only the ignored test `test`, with `marker=1` (so that the
/// test knows it is the child) and without any of the variables in `cleared` that the parent
/// may have.
pub fn child_test(test: &str, marker: &str, cleared: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--ignored", "--nocapture"])
        .env(marker, "1");
    for key in cleared {
        cmd.env_remove(key);
    }
    cmd
}

/// Sets a case's variables on `cmd`, with `{collector}` and `{dead}` in their values replaced
/// by those endpoints.
pub fn case_env<'a>(
    cmd: &mut Command,
    env: impl IntoIterator<Item = (&'a str, &'a str)>,
    collector: &str,
    dead: &str,
) {
    for (k, v) in env {
        cmd.env(
            k,
            v.replace("{collector}", collector).replace("{dead}", dead),
        );
    }
}
