//! The official PostgREST clients, unchanged, against the relay: postgrest-js (npm, pinned in
//! `clients/postgrest/package-lock.json`, run by Node's own test runner) and postgrest-py
//! (PyPI, pinned in `clients/postgrest/python/requirements.txt`); and supabase-js (npm, pinned
//! in `clients/supabase/package-lock.json`) over `/rest/v1` and `/realtime/v1`. Each suite
//! gets a fresh database with its `schema.sql` and a `pgrelay serve` process, finds it in
//! `PGRELAY_URL`, and must exit 0 within its deadline.
//!
//! The clients' packages are installed by `scripts/test.sh`; run alone, these tests install
//! them (npm ci; a venv under `target/`) when missing. Node and Python are required: without
//! them the tests fail, saying so, rather than skip.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::support::{RelayProcess, TestDb, within};

/// How long a whole client suite may take.
const SUITE: Duration = Duration::from_secs(180);

const SCHEMA: &str = include_str!("../../clients/postgrest/schema.sql");

fn suite_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/postgrest")
}

fn supabase_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/supabase")
}

/// Runs `program args` in `dir` to the end (or the deadline), failing the test with its
/// output unless it exits 0.
async fn run(dir: &Path, program: &str, args: &[&str], env: &[(&str, &str)]) {
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    let child = command.spawn().unwrap_or_else(|err| {
        panic!(
            "cannot run {program} ({err}): the PostgREST client suites need Node.js 20+ and \
             Python 3 with venv (scripts/test.sh installs their packages)"
        )
    });
    let output = within(SUITE, child.wait_with_output())
        .await
        .unwrap_or_else(|err| panic!("{program} {args:?}: {err}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    eprintln!("{stdout}");
}

/// Runs Node test files of `dir` against `url` (installing the suite's packages first
/// when they are missing).
async fn node_suite(dir: &Path, package: &str, files: &[&str], url: &str) {
    node_suite_with(dir, package, files, 20_000, &[("PGRELAY_URL", url)]).await;
}

/// Like [`node_suite`], with a per-test timeout (ms) and the suite's environment.
async fn node_suite_with(
    dir: &Path,
    package: &str,
    files: &[&str],
    timeout_ms: u32,
    env: &[(&str, &str)],
) {
    if !dir.join("node_modules").join(package).exists() {
        run(dir, "npm", &["ci", "--no-audit", "--no-fund"], &[]).await;
    }
    let timeout = format!("--test-timeout={timeout_ms}");
    let mut args = vec!["--test", "--test-concurrency=1", timeout.as_str()];
    args.extend_from_slice(files);
    run(dir, "node", &args, env).await;
}

/// A fresh database with the suite's tables and a relay process serving them.
async fn relay() -> (TestDb, RelayProcess) {
    let db = TestDb::new()
        .await
        .with_tables(SCHEMA, &["items", "kv"])
        .await;
    let relay = RelayProcess::start(&db.url, "items,kv", &[]).await;
    (db, relay)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgrest_js_passes_its_suite_against_the_relay() {
    let dir = suite_dir();
    if !dir.join("node_modules/@supabase/postgrest-js").exists() {
        run(&dir, "npm", &["ci", "--no-audit", "--no-fund"], &[]).await;
    }
    let (_db, relay) = relay().await;
    let url = format!("http://{}", relay.addr);
    run(
        &dir,
        "node",
        &[
            "--test",
            "--test-concurrency=1",
            "--test-timeout=20000",
            "test/",
        ],
        &[("PGRELAY_URL", &url)],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgrest_py_passes_its_suite_against_the_relay() {
    let dir = suite_dir().join("python");
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/postgrest-py-venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        run(
            &dir,
            "python3",
            &["-m", "venv", &venv.to_string_lossy()],
            &[],
        )
        .await;
        run(
            &dir,
            &python.to_string_lossy(),
            &["-m", "pip", "install", "-q", "-r", "requirements.txt"],
            &[],
        )
        .await;
    }
    let (_db, relay) = relay().await;
    let url = format!("http://{}", relay.addr);
    run(
        &dir,
        &python.to_string_lossy(),
        &["-m", "unittest", "-v", "test_postgrest_py"],
        &[("PGRELAY_URL", &url)],
    )
    .await;
}

/// A fresh database with the supabase-js suite's table and a relay process serving it.
async fn supabase_relay() -> (TestDb, RelayProcess) {
    let db = TestDb::new()
        .await
        .with_tables(SUPABASE_SCHEMA, &["items"])
        .await;
    let relay = RelayProcess::start(&db.url, "items", &[]).await;
    (db, relay)
}

const SUPABASE_SCHEMA: &str = include_str!("../../clients/supabase/schema.sql");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supabase_js_reads_and_writes_through_rest_v1() {
    let (_db, relay) = supabase_relay().await;
    let url = format!("http://{}", relay.addr);
    node_suite(
        &supabase_dir(),
        "@supabase/supabase-js",
        &["test/rest.test.mjs"],
        &url,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supabase_js_receives_postgres_changes_over_realtime_v1() {
    let (_db, relay) = supabase_relay().await;
    let url = format!("http://{}", relay.addr);
    node_suite(
        &supabase_dir(),
        "@supabase/supabase-js",
        &["test/realtime.test.mjs"],
        &url,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supabase_js_realtime_applies_tokens_and_policies() {
    let db = TestDb::new()
        .await
        .with_tables(SUPABASE_SCHEMA, &["items"])
        .await;
    let dir = supabase_dir();
    let secret = "supabase-js-suite-secret-of-at-least-32-bytes";
    let config = dir.join("policies.toml");
    let relay = RelayProcess::start(
        &db.url,
        "items",
        &[
            "--config",
            &config.to_string_lossy(),
            "--jwt-secret",
            secret,
        ],
    )
    .await;
    let url = format!("http://{}", relay.addr);
    node_suite_with(
        &dir,
        "@supabase/supabase-js",
        &["test/tokens.test.mjs"],
        20_000,
        &[("PGRELAY_URL", &url), ("PGRELAY_JWT_SECRET", secret)],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supabase_js_realtime_resumes_after_a_dropped_connection_and_starts_afresh_after_a_relay_restart()
 {
    let (db, relay) = supabase_relay().await;
    let url = format!("http://{}", relay.addr);
    node_suite_with(
        &supabase_dir(),
        "@supabase/supabase-js",
        &["test/restart.test.mjs"],
        40_000,
        &[
            ("PGRELAY_URL", &url),
            ("PGRELAY_BIN", env!("CARGO_BIN_EXE_pgrelay")),
            ("PGRELAY_DATABASE_URL", &db.url),
        ],
    )
    .await;
}
