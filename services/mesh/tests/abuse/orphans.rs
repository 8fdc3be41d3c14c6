//! No orphans: a `mesh up` that is killed does not leave its services behind.

use std::time::Duration;

use crate::support::{mesh_exe, within};

/// The pids of `parent`'s children (Linux: `/proc/<pid>/task/*/children`).
fn children(parent: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Whether `pid` is a running process (not gone, not a zombie waiting to be reaped).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_owned();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// `mesh up` killed with SIGKILL: its three services are gone within seconds.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_killed_launcher_takes_its_services_with_it() {
    let data = tempfile::tempdir().expect("data");
    let addrs: Vec<String> = (0..3)
        .map(|_| mesh_testkit::free_addr().to_string())
        .collect();
    let mut up = tokio::process::Command::new(mesh_exe())
        .args(["up", "--data-dir"])
        .arg(data.path())
        .args(["--aggregator-listen", &addrs[0]])
        .args(["--auth-listen", &addrs[1]])
        .args(["--users-listen", &addrs[2]])
        .arg("--no-console")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn mesh up");
    let pid = up.id().expect("running");
    let started = within(Duration::from_secs(60), || async {
        children(pid).len() == 3
    })
    .await
    .is_some();
    let services = children(pid);
    assert!(started, "mesh up started {services:?}");
    up.start_kill().expect("SIGKILL");
    let _ = up.wait().await;
    let gone = within(Duration::from_secs(15), || async {
        services.iter().all(|pid| !running(*pid))
    })
    .await;
    let left: Vec<u32> = services.iter().copied().filter(|p| running(*p)).collect();
    // Whatever the outcome, leave nothing behind.
    for pid in &left {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(*pid).unwrap_or(0)),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert!(
        gone.is_some(),
        "services still running after mesh up was killed: {left:?}"
    );
}
