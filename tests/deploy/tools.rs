//! Finding the external tools, running them, and the repository paths the tests read.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root (where `deploy/` is).
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn deploy(path: &str) -> PathBuf {
    repo().join("deploy").join(path)
}

/// The berth binary this test run built.
pub fn berth_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_berth"))
}

/// Whether every tool is on PATH; if one is not, says loudly which and why the test is skipped.
pub fn have(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| which(t).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    eprintln!(
        "\n!!! SKIPPED {test}: {} NOT INSTALLED (CI installs it: see .ci/run) !!!\n",
        missing.join(", ").to_uppercase()
    );
    false
}

/// A tool on PATH, or a PyPI tool in python3's scripts directory (pip installs hadolint and
/// kubernetes-validate there, which need not be on PATH).
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file());
    found.or_else(|| {
        let script = "import sysconfig; print(sysconfig.get_path('scripts'))";
        let output = Command::new("python3").args(["-c", script]).output().ok()?;
        let dir = String::from_utf8(output.stdout).ok()?;
        Some(Path::new(dir.trim()).join(tool)).filter(|candidate| candidate.is_file())
    })
}

/// A command for `tool`, found as `which` finds it (`have` has checked it is there).
pub fn tool(tool: &str) -> Command {
    Command::new(which(tool).unwrap_or_else(|| PathBuf::from(tool)))
}

/// Runs a command to completion on the blocking pool.
pub async fn output(mut command: Command) -> Output {
    let shown = format!("{command:?}");
    tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("command thread")
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"))
}

/// `output`, failing the test with both streams unless the command exits 0.
pub async fn output_ok(command: Command) -> Output {
    tokio::task::spawn_blocking(move || run_ok(command))
        .await
        .expect("command thread")
}

/// Runs a command to completion, failing the test with both streams unless it exits 0.
pub fn run_ok(mut command: Command) -> Output {
    let shown = format!("{command:?}");
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    assert_ok(&shown, &output);
    output
}

pub fn assert_ok(what: &str, output: &Output) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `BERTH_ADDR` replaced by berth's `host:port` in a shipped node config.
pub fn with_address(path: &Path, addr: &str) -> String {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert!(
        text.contains("BERTH_ADDR"),
        "{} has no BERTH_ADDR placeholder",
        path.display()
    );
    text.replace("BERTH_ADDR", addr)
}
