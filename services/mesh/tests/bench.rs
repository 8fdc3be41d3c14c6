//! Smoke tests of `mesh bench`: every scenario runs for about a second with tiny settings
//! through the real binary and writes its report. Nothing here looks at speed: the figures of
//! a debug build on a shared machine mean nothing; only that each scenario completes, measures
//! something and writes a well-formed JSON result, Markdown report and plot.

use std::process::Command;

/// Runs `mesh bench <scenario>` with tiny settings into a fresh results folder and returns
/// the parsed JSON result.
fn run(scenario: &str, extra: &[&str]) -> serde_json::Value {
    let results = tempfile::tempdir().expect("results dir");
    let output = Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args(["bench", scenario])
        .args(["--duration", "1s", "--warmup", "0s"])
        .args(["--concurrency", "2", "--connections", "1"])
        .args(["--server-threads", "1"])
        .arg("--results")
        .arg(results.path())
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .expect("mesh bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "mesh bench {scenario} failed:\n{stdout}\n{stderr}"
    );
    let json = std::fs::read_to_string(results.path().join(format!("{scenario}.json")))
        .unwrap_or_else(|e| panic!("{scenario}.json: {e}\n{stdout}\n{stderr}"));
    let md = std::fs::read_to_string(results.path().join(format!("{scenario}.md")))
        .expect("Markdown report");
    assert!(md.starts_with(&format!("# mesh bench {scenario}")), "{md}");
    assert!(
        md.contains(&format!("![latency by percentile]({scenario}.svg)")),
        "{md}"
    );
    let svg =
        std::fs::read_to_string(results.path().join(format!("{scenario}.svg"))).expect("plot");
    assert!(svg.starts_with("<svg"), "{svg}");
    // The table printed is the one in the report.
    assert!(stdout.contains("| measurement | calls/s |"), "{stdout}");
    let value: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
    assert_eq!(value["schema"], "mesh-bench/1");
    assert_eq!(value["scenario"], scenario);
    // The baseline comes first in every run, and it measured calls.
    let measurements = value["measurements"].as_array().expect("measurements");
    assert!(
        measurements[0]["name"]
            .as_str()
            .is_some_and(|n| n.contains("baseline")),
        "{value}"
    );
    for m in measurements {
        assert!(m["calls"].as_u64().is_some(), "{m}");
        assert!(m["latency_ms"]["p99"].as_f64().is_some(), "{m}");
    }
    assert!(measurements[0]["calls"].as_u64() > Some(0), "{value}");
    value
}

/// The names of the measurements of a result.
fn names(value: &serde_json::Value) -> Vec<String> {
    value["measurements"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["name"].as_str().map(str::to_owned))
        .collect()
}

/// A figure's value by (the start of) its name.
fn figure(value: &serde_json::Value, name: &str) -> f64 {
    value["figures"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|f| f["name"].as_str().is_some_and(|n| n.starts_with(name)))
        .and_then(|f| f["value"].as_f64())
        .unwrap_or_else(|| panic!("no figure `{name}` in {value}"))
}

/// `echo`: the baseline alone.
#[test]
fn echo() {
    let value = run("echo", &["--payload", "16"]);
    assert_eq!(names(&value).len(), 1);
}

/// `get-user`: users' GetUser measured beside the baseline, every call answered.
#[test]
fn get_user() {
    let value = run("get-user", &[]);
    let m = &value["measurements"][1];
    assert!(m["calls"].as_u64() > Some(0), "{value}");
    assert_eq!(m["errors"], 0, "{value}");
    assert!(figure(&value, "GetUser / echo throughput") > 0.0);
}

/// `get-me`: a direct GetUser and GetMe through the aggregator, over native gRPC and over
/// gRPC-Web, with the ratios.
#[test]
fn get_me() {
    let value = run("get-me", &[]);
    assert_eq!(
        names(&value)[1..],
        [
            "users GetUser, direct",
            "GetMe over gRPC-Web (HTTP/1.1)",
            "GetMe through the aggregator",
        ],
        "{value}"
    );
    for m in &value["measurements"].as_array().expect("list")[1..] {
        assert!(m["calls"].as_u64() > Some(0), "{m}");
        assert_eq!(m["errors"], 0, "{m}");
    }
    assert!(figure(&value, "GetMe / echo throughput") > 0.0);
    assert!(figure(&value, "GetMe p99 / p50") >= 1.0);
    assert!(figure(&value, "GetMe gRPC-Web / native gRPC throughput") > 0.0);
}

/// `get-me --tls`: GetMe with TLS everywhere beside plaintext, and new connections of both
/// kinds; every call of every measurement succeeds.
#[test]
fn get_me_tls() {
    let value = run("get-me", &["--tls"]);
    assert_eq!(
        names(&value)[1..],
        [
            "users GetUser, direct",
            "GetMe over gRPC-Web (HTTP/1.1)",
            "GetMe through the aggregator",
            "GetMe, TLS everywhere",
            "new plaintext connections to auth",
            "new mutual-TLS connections to auth",
        ],
        "{value}"
    );
    for m in &value["measurements"].as_array().expect("list")[1..] {
        assert!(m["calls"].as_u64() > Some(0), "{m}");
        assert_eq!(m["errors"], 0, "{m}");
    }
    assert!(figure(&value, "GetMe TLS / plaintext throughput") > 0.0);
    assert!(figure(&value, "new mutual-TLS connections per second") > 0.0);
}

/// `get-me-delay`: the delayed GetMe and the echo through the same relay take at least the
/// delay; the figure of what GetMe adds is read from them.
#[test]
fn get_me_delay() {
    let value = run("get-me-delay", &["--delay", "30ms"]);
    assert_eq!(
        names(&value)[1..],
        [
            "GetMe, downstreams on loopback",
            "GetMe, both downstreams 30 ms away",
            "two echoes at once, 64 B, each 30 ms away (the relays alone)",
        ],
        "{value}"
    );
    for m in &value["measurements"].as_array().expect("list")[1..] {
        assert!(m["calls"].as_u64() > Some(0), "{m}");
        assert_eq!(m["errors"], 0, "{m}");
    }
    for delayed in [&value["measurements"][2], &value["measurements"][3]] {
        assert!(
            delayed["latency_ms"]["p50"].as_f64() >= Some(30.0),
            "{value}"
        );
    }
    let added = figure(
        &value,
        "delayed GetMe p50 − two relayed echoes p50 (the hop and both reads)",
    );
    let expected = value["measurements"][2]["latency_ms"]["p50"]
        .as_f64()
        .expect("p50")
        - value["measurements"][3]["latency_ms"]["p50"]
            .as_f64()
            .expect("p50");
    assert!((added - expected).abs() < 1e-6, "{value}");
}

/// `get-profiles`: every call streams all the ids asked for.
#[test]
fn get_profiles() {
    let value = run("get-profiles", &["--profiles", "150"]);
    let m = &value["measurements"][1];
    assert!(m["calls"].as_u64() > Some(0), "{value}");
    assert_eq!(m["errors"], 0, "{value}");
    let per_second = figure(&value, "profiles streamed per second");
    let calls_per_second = m["per_second"].as_f64().expect("rate");
    // Each successful call streamed all 150 profiles (a little slack for the warm-up).
    assert!(per_second >= calls_per_second * 149.0, "{value}");
}

/// `watch`: a few subscribers, each change reaching every one of them.
#[test]
fn watch() {
    let value = run(
        "watch",
        &[
            "--subscribers",
            "30",
            "--streams-per-connection",
            "10",
            "--events",
            "2",
        ],
    );
    // Two timed changes (after an untimed first one) to each of 30 subscribers, two bare
    // broadcast messages to each of 30 echo streams; then two more changes to 30 native and
    // 30 gRPC-Web subscribers side by side.
    for k in 1..=4 {
        assert_eq!(value["measurements"][k]["calls"], 60, "{k}: {value}");
    }
    assert!(
        figure(&value, "change to all, WatchProfiles / bare broadcast, p99") > 0.0,
        "{value}"
    );
    assert!(figure(&value, "bare tonic broadcast to as many streams, p99") > 0.0);
    assert!(
        figure(
            &value,
            "change to all, gRPC-Web / native gRPC subscribers, p99"
        ) > 0.0
    );
    assert!(figure(&value, "aggregator RSS per WatchProfiles subscriber") >= 0.0);
}

/// `login`: the raw hash rate, the Login rate against it and health during the storm.
#[test]
fn login() {
    let value = run("login", &[]);
    assert!(figure(&value, "raw Argon2id verifications per second") > 0.0);
    // Logins and token checks are measured, not refused.
    for m in value["measurements"].as_array().expect("measurements") {
        let name = m["name"].as_str().unwrap_or_default();
        if name.starts_with("Login") || name == "ValidateToken" {
            assert_eq!(m["errors"], 0, "{m}");
            assert!(m["calls"].as_u64() > Some(0), "{m}");
        }
    }
    let names = names(&value);
    assert!(names.iter().any(|n| n.starts_with("Login")), "{names:?}");
    assert!(
        names.iter().any(|n| n.contains("during the login storm")),
        "{names:?}"
    );
}

/// `users`: GetUser at several concurrencies, BatchGetUsers, writes and the watcher.
#[test]
fn users() {
    let value = run("users", &[]);
    let names = names(&value);
    assert!(
        names.iter().any(|n| n.starts_with("GetUser, 64")),
        "{names:?}"
    );
    let seen = figure(&value, "WatchUsers events seen");
    let committed = figure(&value, "UpdateUser calls committed");
    assert!(committed > 0.0 && seen >= committed, "{value}");
}

/// `tracing`: GetMe through `mesh up` with tracing off, at 100 % and at 10 %; a traced GetMe
/// exports its five spans, and 10 % sampling exports fewer.
#[test]
fn tracing() {
    let value = run("tracing", &[]);
    assert_eq!(names(&value).len(), 4, "{value}");
    for m in &value["measurements"].as_array().expect("list")[1..] {
        assert!(m["calls"].as_u64() > Some(0), "{m}");
    }
    let all = figure(&value, "spans exported per GetMe, 100 %");
    let tenth = figure(&value, "spans exported per GetMe, 10 %");
    assert!((4.5..8.0).contains(&all), "{value}");
    assert!(tenth < all / 2.0, "{value}");
    // Each service's idle memory was read, in both modes.
    for service in ["auth", "users", "aggregator"] {
        for mode in ["tracing off", "exporting"] {
            let rss = figure(&value, &format!("{service} idle RSS, {mode}"));
            assert!((1.0..1024.0).contains(&rss), "{service} {mode}: {rss} MiB");
        }
    }
}

/// `replicas`: two users replicas on one PostgreSQL (a fresh database); every timed change
/// reached the subscribers of both. PostgreSQL only: skipped, loudly, outside CI without one.
#[test]
fn replicas() {
    let Some(admin) = mesh_testkit::databases()
        .into_iter()
        .find_map(|database| match database {
            mesh_testkit::Database::Postgres(url) => Some(url),
            mesh_testkit::Database::Sqlite => None,
        })
    else {
        return;
    };
    let url = tokio::runtime::Runtime::new().expect("runtime").block_on(
        mesh_store::testing::fresh_database(&admin, "bench", "replicas"),
    );
    let value = run("replicas", &["--database-url", &url]);
    assert_eq!(
        names(&value)[1..],
        [
            "UpdateUser sent → event on the same replica's WatchUsers",
            "UpdateUser sent → event on the other replica's WatchUsers",
        ],
        "{value}"
    );
    for m in &value["measurements"].as_array().expect("list")[1..] {
        assert!(m["calls"].as_u64() > Some(200), "{m}");
        assert_eq!(m["errors"], 0, "{m}");
    }
    assert!(figure(&value, "other replica: UpdateUser sent → event, p99") > 0.0);
}

/// `overload`: at 5× the limit most calls are shed, and nothing fails with another code.
#[test]
fn overload() {
    let value = run("overload", &["--limit", "2"]);
    // The baseline, then accepted and shed rows for each of the three loads.
    assert_eq!(names(&value).len(), 7, "{value}");
    for m in &value["measurements"].as_array().expect("list")[1..] {
        assert_eq!(m["errors"], 0, "{m}");
    }
    assert!(
        value["measurements"][1]["calls"].as_u64() > Some(0),
        "{value}"
    );
    assert!(
        figure(&value, "5× the limit: share of calls shed") > 0.0,
        "{value}"
    );
}

/// `abuse`: every attack class runs beside the well-behaved client, which is measured in each
/// (its success and the processes' peak RSS reported).
#[test]
fn abuse() {
    let value = run("abuse", &[]);
    // The baseline, then Login and GetMe with no attack and during each of the seven attacks.
    assert_eq!(names(&value).len(), 1 + 2 * 8, "{value}");
    for m in &value["measurements"].as_array().expect("list")[1..] {
        assert!(m["calls"].as_u64() > Some(0), "{m}");
    }
    assert!(figure(&value, "well-behaved success during slowloris") > 0.0);
    assert!(figure(&value, "aggregator peak RSS during slowloris") > 0.0);
}
