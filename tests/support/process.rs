//! The real `berth` binary as a child process, for tests that need signals: SIGKILL mid-fill
//! (crash safety) and SIGTERM (graceful shutdown).
//!
//! Owns: writing the config file, spawning the binary, learning its address from the
//! `listen=` log line, collecting its log lines so a test can wait for one, and killing it on
//! drop. Does not own: the upstream (tests pass a config naming one) or assertions.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The lines `child` writes to its (piped) stderr, read by a thread of their own.
pub fn stderr_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    lines
}

/// Blocks until `lines` brings one containing `needle` and returns it; fails the test, showing
/// what `who` logged instead, when none comes within `timeout` of the previous line.
pub fn wait_line(
    lines: &mpsc::Receiver<String>,
    needle: &str,
    timeout: Duration,
    who: &str,
) -> String {
    let mut seen = Vec::new();
    loop {
        match lines.recv_timeout(timeout) {
            Ok(line) if line.contains(needle) => return line,
            Ok(line) => seen.push(line),
            Err(_) => panic!("{who} never logged {needle:?}; it logged {seen:#?}"),
        }
    }
}

/// A finished command's status, stdout and stderr, for an assertion message.
pub fn output_text(output: &std::process::Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// How long to wait for a log line or an exit before failing the test.
const WAIT: Duration = Duration::from_secs(30);

pub struct BerthProcess {
    child: Child,
    pub addr: String,
    lines: mpsc::Receiver<String>,
}

impl BerthProcess {
    /// Writes `config_toml` next to the cache and starts `berth serve` on it. Unless the config
    /// names one, the admin listener takes a free port: the default (9090) would collide
    /// between tests running at once.
    pub fn start(config_toml: &str, work: &Path) -> BerthProcess {
        let mut process = BerthProcess::spawn(config_toml, work);
        let line = process.wait_line("listen=");
        let rest = line.split("listen=").nth(1).unwrap();
        process.addr = rest.split_whitespace().next().unwrap().to_string();
        process
    }

    /// Like `start`, without waiting for the API listener (`addr` stays empty): for tests of
    /// what berth does before it serves.
    pub fn spawn(config_toml: &str, work: &Path) -> BerthProcess {
        BerthProcess::spawn_env(config_toml, work, &[])
    }

    /// `spawn`, with these environment variables set for berth.
    pub fn spawn_env(config_toml: &str, work: &Path, env: &[(&str, &str)]) -> BerthProcess {
        let config_path = work.join("berth.toml");
        let config = if config_toml.contains("admin_listen") {
            config_toml.to_string()
        } else {
            format!("admin_listen = \"127.0.0.1:0\"\n{config_toml}")
        };
        std::fs::write(&config_path, config).unwrap();
        let config_path = config_path.display().to_string();
        BerthProcess::spawn_args_env(&["serve", "--config", &config_path], env)
    }

    /// Runs `berth ARGS...` with its log collected (`wait_line`); `addr` stays empty.
    pub fn spawn_args(args: &[&str]) -> BerthProcess {
        BerthProcess::spawn_args_env(args, &[])
    }

    /// `spawn_args`, with these environment variables set for berth.
    pub fn spawn_args_env(args: &[&str], env: &[(&str, &str)]) -> BerthProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn berth");
        let lines = stderr_lines(&mut child);
        BerthProcess {
            child,
            addr: String::new(),
            lines,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Blocks until a log line containing `needle` appears; returns it.
    pub fn wait_line(&mut self, needle: &str) -> String {
        wait_line(&self.lines, needle, WAIT, "berth")
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal}");
    }

    /// SIGKILL and reap.
    pub fn kill9(mut self) {
        self.signal("KILL");
        let _ = self.child.wait();
    }

    /// Waits for the process to exit on its own, at most `WAIT`.
    pub fn wait_exit(&mut self) -> ExitStatus {
        for _ in 0..(WAIT.as_millis() / 20) {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("berth did not exit within {WAIT:?}");
    }
}

impl Drop for BerthProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last lines a child process (the registry, containerd) logged, shared with the thread
/// that reads its stderr, for a failing test's message.
#[derive(Clone, Default)]
pub struct LogTail(std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<String>>>);

impl LogTail {
    /// How many lines it keeps for a failure message (the registry logs a line per request).
    const LINES: usize = 200;

    /// Reads `stderr` to EOF, keeping the last lines, and sends what `found` makes of the
    /// first line it recognizes (the process's "ready" line) through `tx`.
    pub fn follow<T>(
        self,
        stderr: std::process::ChildStderr,
        found: impl Fn(&str) -> Option<T>,
        tx: tokio::sync::oneshot::Sender<T>,
    ) {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(value) = found(&line) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(value);
                }
            }
            let mut lines = self.0.lock().unwrap();
            if lines.len() == LogTail::LINES {
                lines.pop_front();
            }
            lines.push_back(line);
        }
    }

    pub fn text(&self) -> String {
        let lines = self.0.lock().unwrap();
        lines
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    }
}
