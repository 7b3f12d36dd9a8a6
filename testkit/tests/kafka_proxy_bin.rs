//! The `kafka-proxy` command line: bad arguments are a usage error, not a panic.

use std::process::Command;
use std::time::Duration;

/// `--every inf` (or any interval no `Duration` holds) once reached
/// `Duration::from_secs_f64` in the reporting loop and panicked there, after the proxy
/// had started; it is refused with the usage line before anything starts.
#[test]
fn an_interval_no_duration_holds_is_a_usage_error() {
    for every in ["inf", "1e30"] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kafka-proxy"))
            .args(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--every", every])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run kafka-proxy: {e}"));
        // A proxy that accepted the interval would run until killed.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap_or_else(|e| panic!("wait: {e}")) {
                break status;
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                panic!("--every {every}: the proxy kept running");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        if let Some(mut err) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut err, &mut stderr);
        }
        assert_eq!(status.code(), Some(2), "--every {every}: {stderr}");
        assert!(!stderr.contains("panicked"), "--every {every}: {stderr}");
    }
}
