//! `deploy/systemd/berth.service`: `systemd-analyze verify` passes on it without a single
//! warning, and its sandboxing keeps `systemd-analyze security` at "OK" exposure.
//!
//! verify checks that ExecStart's binary exists, so the unit is verified as a copy whose
//! ExecStart names the binary this test run built; nothing else in it changes.

use std::process::Command;

use super::tools::{berth_binary, deploy, have, output_ok};

/// `systemd-analyze security` exposure the unit must stay under, in tenths of the 0-10 scale
/// it prints (20 is "2.0 OK"; the unit scores 1.4).
const MAX_EXPOSURE: &str = "20";

#[tokio::test]
async fn systemd_analyze_verifies_the_unit_without_warnings() {
    let test = "systemd_analyze_verifies_the_unit_without_warnings";
    if !have(test, &["systemd-analyze"]) {
        return;
    }
    let shipped = std::fs::read_to_string(deploy("systemd/berth.service")).unwrap();
    for required in [
        "DynamicUser=yes",
        "CacheDirectory=berth",
        "LoadCredential=",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "LimitNOFILE=",
        "Restart=on-failure",
    ] {
        assert!(
            shipped.lines().any(|l| l.starts_with(required)),
            "no {required}"
        );
    }
    assert!(!shipped.lines().any(|l| l.starts_with("ExecReload=")));
    let installed = "ExecStart=/usr/local/bin/berth ";
    assert!(shipped.contains(installed));
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("berth.service");
    let here = format!("ExecStart={} ", berth_binary().display());
    std::fs::write(&unit, shipped.replace(installed, &here)).unwrap();

    let mut verify = Command::new("systemd-analyze");
    verify.arg("verify").arg(&unit);
    let verified = output_ok(verify).await;
    let warnings = String::from_utf8_lossy(&verified.stderr);
    assert!(
        warnings.trim().is_empty(),
        "systemd-analyze verify warned:\n{warnings}"
    );

    let mut security = Command::new("systemd-analyze");
    security
        .args(["security", "--offline=true", "--no-pager"])
        .arg(format!("--threshold={MAX_EXPOSURE}"))
        .arg(&unit);
    output_ok(security).await;
}
