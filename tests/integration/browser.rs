//! The JS client (`clients/js`, served at `/client.js`) and the dashboard (`/`) in headless
//! Chromium, driven by `clients/js/test/driver.mjs` (playwright-core, pinned in
//! `clients/js/package-lock.json`). Chromium is Debian's (`/usr/bin/chromium`, or
//! `$CHROMIUM`); `scripts/test.sh` installs it and the npm packages. Without them these tests
//! fail, saying so, rather than skip.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::support::{Cluster, Relay, STEP, TestDb, http_raw, within};

/// One browser command's deadline (a `wait` brings its own, plus this).
const COMMAND: Duration = Duration::from_secs(30);

fn client_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/js")
}

/// Headless Chromium behind `driver.mjs`, one page at a time.
struct Browser {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Browser {
    async fn start() -> Self {
        let dir = client_dir();
        if !dir.join("node_modules/playwright-core").exists() {
            let status = within(
                Duration::from_secs(120),
                tokio::process::Command::new("npm")
                    .args(["ci", "--no-audit", "--no-fund"])
                    .current_dir(&dir)
                    .status(),
            )
            .await
            .expect("npm ci in clients/js (Node.js 20+ with npm is required)");
            assert!(status.success(), "npm ci in clients/js failed");
        }
        let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        assert!(
            Path::new(&chromium).exists(),
            "no Chromium at {chromium}: install Debian's `chromium` package (scripts/test.sh \
             does) or set CHROMIUM"
        );
        let mut child = tokio::process::Command::new("node")
            .arg("test/driver.mjs")
            .current_dir(&dir)
            .env("CHROMIUM", &chromium)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("node (Node.js 20+ is required for the browser tests)");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Browser {
            child,
            stdin,
            lines,
        }
    }

    /// A browser with a blank page of the relay at `addr` open (its origin, for `/client.js`).
    async fn on(addr: SocketAddr) -> Self {
        let mut browser = Self::start().await;
        browser.goto(format!("http://{addr}/healthz")).await;
        browser
    }

    /// Sends one command and returns its value; a failed command fails the test.
    #[track_caller]
    fn call(&mut self, command: Value) -> impl Future<Output = Value> + '_ {
        let caller = std::panic::Location::caller();
        async move {
            let limit = COMMAND + Duration::from_millis(command["ms"].as_u64().unwrap_or(0));
            let line = format!("{command}\n");
            self.stdin.write_all(line.as_bytes()).await.unwrap();
            let answer = tokio::time::timeout(limit, self.lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("{caller}: the browser did not answer {command}"))
                .unwrap()
                .unwrap_or_else(|| panic!("{caller}: the browser driver exited ({command})"));
            let answer: Value = serde_json::from_str(&answer).unwrap();
            if let Some(error) = answer.get("error") {
                panic!("{caller}: {command} failed in the browser: {error}");
            }
            answer["ok"].clone()
        }
    }

    #[track_caller]
    fn goto(&mut self, url: String) -> impl Future<Output = Value> + '_ {
        self.call(json!({ "goto": url }))
    }

    #[track_caller]
    fn eval(&mut self, js: &str) -> impl Future<Output = Value> + '_ {
        self.call(json!({ "eval": js }))
    }

    /// Waits (at most `ms`) until `js` is truthy in the page; returns its value.
    #[track_caller]
    fn wait(&mut self, js: &str, ms: u64) -> impl Future<Output = Value> + '_ {
        self.call(json!({ "wait": js, "ms": ms }))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// JS run in a page of the relay's origin: imports the client and subscribes as `name` to
/// `table` with `options` (a JS object literal); `window.log` records what the client reports.
fn subscribe_js(name: &str, table: &str, options: &str, relay_options: &str) -> String {
    format!(
        r#"(async () => {{
            const {{ Relay }} = await import("/client.js");
            window.log ??= [];
            window.changes ??= 0;
            window.relay ??= (() => {{
              const relay = new Relay({{ {relay_options} }});
              relay.on("status", (s) => log.push(["status", s]));
              relay.on("error", (e) => log.push(["error", e.code, e.closeCode, e.message]));
              return relay;
            }})();
            const s = relay.subscribe({table:?}, {options});
            s.on("change", () => changes++);
            s.on("ready", () => log.push(["ready", {table:?}]));
            s.on("reset", (r) => log.push(["reset", {table:?}, r]));
            s.on("error", (e) => log.push(["suberror", {table:?}, e.code, e.message]));
            window[{name:?}] = s;
            return true;
        }})()"#
    )
}

/// JS that is true once subscription `name`'s rows equal `expected` (JSON text of rows), in
/// any order.
fn rows_equal_js(name: &str, expected: &str) -> String {
    format!(
        r#"(() => {{
            const norm = (rows) => JSON.stringify(rows
              .map((r) => JSON.stringify(r))
              .sort());
            const expected = JSON.parse({expected:?});
            const have = [...window[{name:?}].rows.values()];
            return window[{name:?}].loaded && norm(have) === norm(expected);
        }})()"#
    )
}

/// The rows of `query` (a select of whole rows) as one JSON array text, as `to_json` renders
/// them (what the relay sends).
async fn table_json(db: &TestDb, query: &str) -> String {
    let sql = format!("select coalesce(json_agg(t), '[]')::text from ({query}) t");
    db.client().await.query_one(&sql, &[]).await.unwrap().get(0)
}

/// Waits until the client's copy equals the table, or fails showing both.
async fn assert_rows_equal(browser: &mut Browser, db: &TestDb, name: &str, query: &str) {
    let expected = table_json(db, query).await;
    let js = rows_equal_js(name, &expected);
    let answer = browser
        .call(json!({ "eval": format!(
            r#"new Promise((resolve) => {{
                const deadline = Date.now() + 20000;
                const check = () => {{
                  if ({js}) return resolve(true);
                  if (Date.now() > deadline) return resolve(false);
                  setTimeout(check, 50);
                }};
                check();
            }})"#
        ) }))
        .await;
    if answer != json!(true) {
        let have = browser
            .eval(&format!(
                "JSON.stringify({{loaded: window[{name:?}].loaded, rows: [...window[{name:?}].rows.values()], log: window.log}})"
            ))
            .await;
        panic!(
            "{name}: the page's rows never equalled the table.\nexpected {expected}\nhave {have}"
        );
    }
}

/// The relay binary serving `tables` on `port` with capture installed, once ready.
async fn relay_process(db: &TestDb, port: u16, tables: &str) -> Child {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"))
        .args(["serve", "--install", "--tables", tables])
        .args(["--listen", &addr.to_string(), "--schema-interval-ms", "200"])
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "pgrelay=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    crate::support::wait_ready_at(addr).await;
    child
}

/// A writer of inserts, updates (some of the key), deletes and multi-row transactions, until
/// `stop`; it rides out a restarting server by reconnecting. Counts its commits.
fn spawn_writer(
    url: String,
    stop: Arc<AtomicBool>,
    commits: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut n: i64 = 0;
        while !stop.load(Ordering::Relaxed) {
            let Ok((client, connection)) =
                tokio_postgres::connect(&url, tokio_postgres::NoTls).await
            else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            tokio::spawn(connection);
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let statement = match n % 6 {
                    0 => "update items set id = id + 100000 where id = (select min(id) from items)",
                    1 | 2 => {
                        "insert into items(name, qty) values ('w' || $1::bigint, $1::bigint % 7)"
                    }
                    3 => {
                        "update items set qty = qty + 1, name = name || '+' where id = (select max(id) from items where $1::bigint > 0)"
                    }
                    4 => {
                        "delete from items where id = (select min(id) from items where $1::bigint > 0 and qty = 3)"
                    }
                    _ => {
                        "insert into items(name, qty) select 'a' || $1::bigint || '-' || g, g from generate_series(1, 3) g"
                    }
                };
                let result = if n % 6 == 0 {
                    client.execute(statement, &[]).await
                } else {
                    client.execute(statement, &[&n]).await
                };
                match result {
                    Ok(_) => {
                        commits.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) if client.is_closed() => break,
                    Err(_) => {}
                }
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
        }
    })
}

/// How many entries of the page's `window.log` have `value` at `index`.
fn count_log(log: &Value, index: usize, value: &str) -> usize {
    log.as_array()
        .unwrap()
        .iter()
        .filter(|e| e[index] == value)
        .count()
}

const ITEMS: &str =
    "create table items(id bigserial primary key, name text not null, qty int not null default 0)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_js_clients_rows_equal_the_table_across_a_relay_restart_and_a_postgres_restart_while_a_writer_runs()
 {
    let cluster = Cluster::start().await;
    let db = cluster.database("browser", ITEMS).await;
    db.exec("insert into items(name) select 'seed' || g from generate_series(1, 50) g")
        .await;
    let port = crate::support::free_port();
    let mut relay = relay_process(&db, port, "items").await;
    let mut browser = Browser::start().await;
    browser
        .goto(format!("http://127.0.0.1:{port}/healthz"))
        .await;
    browser
        .eval(&subscribe_js(
            "items",
            "items",
            "{}",
            "heartbeat: 1000, minBackoff: 50, maxBackoff: 400",
        ))
        .await;
    browser.wait("window.items.loaded", 10_000).await;

    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicU64::new(0));
    let writer = spawn_writer(db.url.clone(), Arc::clone(&stop), Arc::clone(&commits));
    let seen = |n: u64| format!("window.changes >= {n}");
    browser.wait(&seen(30), 20_000).await;

    // The relay dies (no close frame) and comes back on the same port: the client reconnects,
    // is told its position cannot be vouched for, and loads the rows again.
    relay.kill().await.unwrap();
    relay.wait().await.unwrap();
    let before = browser.eval("window.changes").await.as_u64().unwrap();
    let _relay = relay_process(&db, port, "items").await;
    browser
        .wait(
            r#"window.log.filter((e) => e[0] === "ready").length >= 2 && window.items.loaded"#,
            20_000,
        )
        .await;
    let resets = browser
        .eval(r#"window.log.filter((e) => e[0] === "reset").map((e) => e[2])"#)
        .await;
    assert_eq!(resets, json!(["history_unavailable"]));
    browser.wait(&seen(before + 30), 20_000).await;

    // PostgreSQL restarts under the relay and the writer: the relay's socket stays up,
    // capture reconnects and catches up from the log.
    let restarted_at = commits.load(Ordering::Relaxed);
    let cluster = Arc::new(cluster);
    let restarting = Arc::clone(&cluster);
    tokio::task::spawn_blocking(move || restarting.restart())
        .await
        .unwrap();
    within(STEP, async {
        while commits.load(Ordering::Relaxed) < restarted_at + 50 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let before = browser.eval("window.changes").await.as_u64().unwrap();
    browser.wait(&seen(before + 30), 20_000).await;

    stop.store(true, Ordering::Relaxed);
    within(STEP, writer).await.unwrap();
    assert_rows_equal(&mut browser, &db, "items", "select * from items").await;
    let log = browser.eval("window.log").await;
    assert_eq!(count_log(&log, 0, "suberror"), 0, "{log}");
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_js_client_keeps_composite_keys_key_changes_truncate_filters_and_select_exact() {
    let db = TestDb::new()
        .await
        .with_tables(
            "create table tags(a int, b text, v text, note text, primary key (a, b));
             insert into tags values (1, 'x', 'shown', 'n1'), (2, 'y', 'hidden', 'n2');",
            &["tags"],
        )
        .await;
    let relay = Relay::start(&db, &["tags"]).await;
    let mut browser = Browser::on(relay.addr).await;
    browser
        .eval(&subscribe_js(
            "shown",
            "tags",
            r#"{ filter: { v: "neq.hidden", or: "(a.lt.100,note.is.null)" }, select: ["a", "b", "v"] }"#,
            "",
        ))
        .await;
    browser.wait("window.shown.loaded", 10_000).await;
    assert_eq!(
        browser.eval("[...window.shown.rows.keys()]").await,
        json!([r#"[1,"x"]"#])
    );
    let query = "select a, b, v from tags where v <> 'hidden' and (a < 100 or note is null)";
    for statement in [
        "insert into tags values (3, 'z', 'shown', null), (4, 'w', 'shown', 'n4')",
        "update tags set a = a + 10 where b in ('x', 'z')",
        "update tags set v = 'hidden' where a = 4",
        "update tags set v = 'back' where a = 2",
        "update tags set a = 200, note = 'out' where a = 13",
        "update tags set note = null where a = 200",
        "delete from tags where a = 11",
    ] {
        db.exec(statement).await;
        assert_rows_equal(&mut browser, &db, "shown", query).await;
    }
    db.exec("truncate tags").await;
    assert_rows_equal(&mut browser, &db, "shown", query).await;
    db.exec("insert into tags values (5, 'q', 'shown', 'after')")
        .await;
    assert_rows_equal(&mut browser, &db, "shown", query).await;
    let log = browser.eval("window.log").await;
    assert!(
        !log.to_string().contains("reset") && !log.to_string().contains("error"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_js_client_resumes_a_dropped_connection_without_reloading_and_reports_refusals() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    db.exec("insert into items(name) values ('one')").await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut browser = Browser::on(relay.addr).await;
    browser
        .eval(&subscribe_js(
            "items",
            "items",
            "{}",
            "minBackoff: 1500, maxBackoff: 1500",
        ))
        .await;
    browser.wait("window.items.loaded", 10_000).await;

    // The connection drops; rows change before the client is back (its backoff is at least
    // 750 ms): it resumes from its position, without a reset or a reload.
    browser.eval("window.relay.socket.close(); true").await;
    db.exec("insert into items(name) values ('while away'); update items set qty = 5 where name = 'one'")
        .await;
    browser
        .wait(
            r#"window.log.filter((e) => e[1] === "open").length >= 2"#,
            10_000,
        )
        .await;
    assert_rows_equal(&mut browser, &db, "items", "select * from items").await;
    let log = browser.eval("window.log").await;
    let readies = count_log(&log, 0, "ready");
    assert_eq!(readies, 1, "{log}");
    assert!(!log.to_string().contains("reset"), "{log}");

    // Refusals reach the caller as errors with the relay's code and message.
    browser
        .eval(&subscribe_js("ghosts", "ghosts", "{}", ""))
        .await;
    let error = browser
        .wait(
            r#"window.log.find((e) => e[0] === "suberror" && e[1] === "ghosts")"#,
            10_000,
        )
        .await;
    assert_eq!(error[2], "not_found", "{error}");
    browser.eval("window.ghosts.unsubscribe(); true").await;
    let rejected = browser
        .eval(
            r#"(async () => {
                const { Relay } = await import("/client.js");
                const other = new Relay();
                const s = other.subscribe("items", { filter: { qty: "gt.lots" } });
                try { await s.ready; return "resolved"; }
                catch (e) { other.close(); return [e.name, e.code, e.resource, e.message]; }
            })()"#,
        )
        .await;
    assert_eq!(rejected[0], "RelayError", "{rejected}");
    assert_eq!(rejected[1], "bad_request", "{rejected}");
    assert_eq!(rejected[2], "items", "{rejected}");
    assert!(rejected[3].as_str().unwrap().contains("qty"), "{rejected}");
}

const SECRET: &str = "browser-test-secret-browser-test-secret";

fn token(ttl: u64) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + ttl;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"role": "reader", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_js_client_sends_its_token_and_refreshes_it_before_it_expires() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start_with(&db, &["items"], |c| {
        c.auth.jwt = Some(crate::support::hmac_jwt(SECRET));
    })
    .await;
    let mut browser = Browser::on(relay.addr).await;
    // The first token lives 3 s, each next one 2 s longer; the client asks its function for
    // the next one before `exp`.
    let tokens: Vec<String> = (0..8).map(|i| token(3 + 2 * i)).collect();
    let tokens = serde_json::to_string(&tokens).unwrap();
    browser
        .eval(&format!("window.tokens = {tokens}; window.asked = 0; true"))
        .await;
    browser
        .eval(&subscribe_js(
            "items",
            "items",
            "{}",
            "token: () => window.tokens[window.asked++]",
        ))
        .await;
    browser.wait("window.items.loaded", 10_000).await;
    // Past the first token's expiry, the same socket still streams.
    browser.wait("window.asked >= 3", 10_000).await;
    db.exec("insert into items(name) values ('after expiry')")
        .await;
    assert_rows_equal(&mut browser, &db, "items", "select * from items").await;
    let log = browser.eval("window.log").await;
    let opens = count_log(&log, 1, "open");
    assert_eq!(opens, 1, "one socket throughout: {log}");
    assert!(!log.to_string().contains("error"), "{log}");

    // Without a token the relay's refusal is final, and says why.
    let refused = browser
        .eval(
            r#"(async () => {
                const { Relay } = await import("/client.js");
                const other = new Relay();
                const s = other.subscribe("items");
                const error = await new Promise((resolve) => other.on("error", (e) => e.closeCode && resolve(e)));
                return [error.code, error.closeCode, other.status];
            })()"#,
        )
        .await;
    assert_eq!(refused, json!(["unauthorized", 4001, "closed"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_row_inserted_with_psql_and_holds_events_under_the_pointer() {
    let db = TestDb::new()
        .await
        .with_tables(
            "create table items(id serial primary key, name text, price numeric);
             create table orders(id serial primary key, status text);
             insert into items(name, price) values ('apple', 1), ('pear', 2);",
            &["items", "orders"],
        )
        .await;
    let relay = Relay::start(&db, &["items", "orders"]).await;
    let mut browser = Browser::start().await;
    browser.goto(format!("http://{}/", relay.addr)).await;
    browser
        .wait(
            r#"document.querySelector('tr[data-table="items"] td:nth-child(2)')?.textContent === "2"
               && document.getElementById("socket").textContent === "open"
               && document.getElementById("subscriptions").textContent === "2""#,
            10_000,
        )
        .await;

    let psql = std::process::Command::new("psql")
        .args([
            &db.url,
            "-qc",
            "insert into items(name, price) values ('<b>fig</b>', 3)",
        ])
        .output()
        .or_else(|_| {
            std::process::Command::new(crate::support::pg_bindir().join("psql"))
                .args([
                    &db.url,
                    "-qc",
                    "insert into items(name, price) values ('<b>fig</b>', 3)",
                ])
                .output()
        })
        .expect("psql");
    assert!(psql.status.success(), "{psql:?}");
    // The value is shown as text, never as markup.
    browser
        .wait(
            r#"[...document.querySelectorAll('#events li[data-table="items"][data-type="create"] code')]
                 .some((c) => c.textContent.includes('"name":"<b>fig</b>"'))
               && !document.querySelector('#events b')
               && document.querySelector('tr[data-table="items"] td:nth-child(2)').textContent === "3"
               && document.querySelector('tr[data-table="items"] td:nth-child(4)').textContent === "1""#,
            10_000,
        )
        .await;
    browser
        .wait(
            r#"document.getElementById("capture").dataset.state === "ok""#,
            10_000,
        )
        .await;
    let artefacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/artifacts");
    std::fs::create_dir_all(&artefacts).unwrap();
    let shot = artefacts.join("dashboard.png");
    browser
        .call(json!({ "screenshot": shot.to_string_lossy() }))
        .await;
    assert!(std::fs::metadata(&shot).unwrap().len() > 1000);

    // Under the pointer the list holds still; new events wait and come when it leaves.
    browser.call(json!({ "hover": "#events" })).await;
    db.exec("update orders set status = 'x'; insert into orders(status) values ('held')")
        .await;
    browser
        .wait(
            r#"document.getElementById("held").textContent === "1"
               && !document.getElementById("paused").hidden"#,
            10_000,
        )
        .await;
    assert_eq!(
        browser
            .eval(r#"document.querySelectorAll('#events li[data-table="orders"]').length"#)
            .await,
        json!(0)
    );
    browser.call(json!({ "unhover": true })).await;
    browser
        .wait(
            r#"document.querySelectorAll('#events li[data-table="orders"]').length === 1
               && document.getElementById("paused").hidden"#,
            10_000,
        )
        .await;
}

#[tokio::test]
async fn the_relay_serves_its_client_its_types_and_the_dashboard_with_a_strict_policy() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let get = |path: &str, accept: &str| {
        http_raw(
            relay.addr,
            format!(
                "GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
            ),
            Vec::new(),
        )
    };
    let client = get("/client.js", "*/*").await.unwrap();
    assert_eq!(client.status, 200);
    assert_eq!(
        client.header("content-type").as_deref(),
        Some("text/javascript; charset=utf-8")
    );
    assert_eq!(
        client.body(),
        std::fs::read_to_string(client_dir().join("pgrelay.js")).unwrap()
    );
    let types = get("/client.d.ts", "*/*").await.unwrap();
    assert!(types.body().contains("export declare class Relay"));
    let page = get("/", "text/html,application/xhtml+xml").await.unwrap();
    assert!(
        page.body()
            .contains("<script type=\"module\" src=\"/dashboard/app.js\">")
    );
    let csp = page.header("content-security-policy").unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert_eq!(
        page.header("x-content-type-options").as_deref(),
        Some("nosniff")
    );
    assert_eq!(page.header("vary").as_deref(), Some("accept"));
    let index: Value =
        serde_json::from_str(get("/", "application/json").await.unwrap().body()).unwrap();
    assert_eq!(index["name"], "pgrelay");
    assert_eq!(
        get("/dashboard/nosuch.js", "*/*").await.unwrap().status,
        404
    );
}

/// JS defining `window.FaultyWebSocket`, a WebSocket whose traffic a test can cut:
/// `window.incoming(message, socket)` and `window.outgoing(message, socket)` (parsed JSON)
/// return false to drop a message.
const FAULTY_WEBSOCKET: &str = r#"(() => {
    window.FaultyWebSocket = class extends WebSocket {
      set onmessage(handler) {
        super.onmessage = handler && ((event) => {
          if (!window.incoming || window.incoming(JSON.parse(event.data), this) !== false) handler(event);
        });
      }
      get onmessage() {
        return super.onmessage;
      }
      send(data) {
        if (!window.outgoing || window.outgoing(JSON.parse(data), this) !== false) super.send(data);
      }
    };
    return true;
})()"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_js_client_reloads_after_a_reset_even_if_the_connection_drops_before_the_new_rows() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    db.exec("insert into items(name) values ('one'), ('two')")
        .await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut browser = Browser::on(relay.addr).await;
    browser.eval(FAULTY_WEBSOCKET).await;
    browser
        .eval(&subscribe_js(
            "items",
            "items",
            "{}",
            "WebSocket: window.FaultyWebSocket, minBackoff: 50, maxBackoff: 100",
        ))
        .await;
    browser.wait("window.items.loaded", 10_000).await;
    // On this socket, the subscribe that follows the reset never reaches the relay: the page
    // keeps receiving events, and the socket drops before any new initial rows come.
    browser
        .eval(
            r#"window.first = window.relay.socket;
               window.outgoing = (m, socket) => !(socket === window.first && m.type === "subscribe");
               true"#,
        )
        .await;
    db.exec("alter table items add column extra int not null default 7")
        .await;
    browser
        .wait(r#"window.log.some((e) => e[0] === "reset")"#, 10_000)
        .await;
    let changes = browser.eval("window.changes").await.as_u64().unwrap();
    db.exec("insert into items(name) values ('three')").await;
    browser
        .wait(&format!("window.changes > {changes}"), 10_000)
        .await;
    browser.eval("window.first.close(); true").await;
    // The copy the reset declared stale is loaded again, not resumed.
    assert_rows_equal(&mut browser, &db, "items", "select * from items").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_js_clients_new_subscription_ignores_what_the_relay_still_sends_for_the_one_it_replaces()
 {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    db.exec("insert into items(name, qty) select 'n' || g, g % 2 from generate_series(1, 20) g")
        .await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut browser = Browser::on(relay.addr).await;
    // Subscribed, unsubscribed and subscribed again with another filter at once: the relay's
    // replies for the first subscription (its initial rows) are still on their way.
    let first = browser
        .eval(
            r#"(async () => {
                const { Relay } = await import("/client.js");
                const relay = new Relay();
                window.relay = relay;
                await new Promise((resolve) => relay.on("status", (s) => s === "open" && resolve()));
                relay.subscribe("items", { filter: { qty: "eq.1" } }).unsubscribe();
                const s = relay.subscribe("items", { filter: { qty: "eq.0" } });
                window.even = s;
                await s.ready;
                return [...s.rows.values()].map((r) => r.qty);
            })()"#,
        )
        .await;
    assert!(
        first.as_array().unwrap().iter().all(|q| q == 0),
        "ready with another subscription's rows: {first}"
    );
    assert_rows_equal(
        &mut browser,
        &db,
        "even",
        "select * from items where qty = 0",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_js_client_keeps_a_connection_whose_initial_rows_are_slow_to_come() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    db.exec("insert into items(name) values ('one'), ('two')")
        .await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut browser = Browser::on(relay.addr).await;
    // The table is locked: the relay's snapshot waits for it, sending nothing meanwhile, for
    // many of the client's heartbeat intervals.
    let locker = db.client().await;
    locker
        .batch_execute("begin; lock table items in access exclusive mode")
        .await
        .unwrap();
    browser
        .eval(&subscribe_js(
            "items",
            "items",
            "{}",
            "heartbeat: 200, minBackoff: 50, maxBackoff: 100",
        ))
        .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    locker.batch_execute("commit").await.unwrap();
    assert_rows_equal(&mut browser, &db, "items", "select * from items").await;
    let log = browser.eval("window.log").await;
    let opens = count_log(&log, 1, "open");
    assert_eq!(opens, 1, "a busy relay is not a dead one: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_js_client_refuses_a_filter_on_a_column_named_like_a_message_key() {
    let db = TestDb::new()
        .await
        .with_tables(
            "create table notes(id int primary key, type text); insert into notes values (1, 'a')",
            &["notes"],
        )
        .await;
    let relay = Relay::start(&db, &["notes"]).await;
    let mut browser = Browser::on(relay.addr).await;
    let answer = browser
        .eval(
            r#"(async () => {
                const { Relay } = await import("/client.js");
                const relay = new Relay();
                try {
                  const s = relay.subscribe("notes", { filter: { type: "eq.a" } });
                  const outcome = await Promise.race([
                    s.ready.then(() => "ready", (e) => [e.code, e.message]),
                    new Promise((resolve) => setTimeout(() => resolve("no answer"), 3000)),
                  ]);
                  return outcome;
                } catch (e) {
                  return [e.code, e.message];
                } finally {
                  relay.close();
                }
            })()"#,
        )
        .await;
    assert_eq!(answer[0], "bad_request", "{answer}");
    assert!(answer[1].as_str().unwrap().contains("type"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browsers_event_source_streams_a_table_and_comes_back_after_a_relay_restart() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    db.exec("insert into items(name) values ('first')").await;
    let port = crate::support::free_port();
    let bind = format!("127.0.0.1:{port}");
    let relay = Relay::spawn_on(&bind, &db, &["items"], |_| {}).await;
    relay.wait_ready().await;
    let mut browser = Browser::on(relay.addr).await;
    browser
        .eval(
            r#"window.messages = [];
               window.source = new EventSource("/sse/items?snapshot=true");
               source.onmessage = (e) => messages.push([e.lastEventId, JSON.parse(e.data)]);
               true"#,
        )
        .await;
    let has = |js: &str| format!("window.messages.some(([id, m]) => {js})");
    browser
        .wait(
            &has(r#"m.type === "initial" && m.done && m.data[0].name === "first" && id === String(m.seq)"#),
            10_000,
        )
        .await;
    db.exec("insert into items(name) values ('second')").await;
    browser
        .wait(
            &has(r#"m.type === "create" && m.data.name === "second" && id === String(m.seq)"#),
            10_000,
        )
        .await;

    // The relay restarts on the same port: the stream ends saying so, the EventSource comes
    // back by itself with Last-Event-ID, and the new relay, which cannot vouch for that
    // position, sends a reset and the rows again.
    relay.stop().await.unwrap();
    browser
        .wait(
            &has(r#"m.type === "error" && m.code === "shutting_down""#),
            10_000,
        )
        .await;
    db.exec("insert into items(name) values ('while away')")
        .await;
    let relay = Relay::spawn_on(&bind, &db, &["items"], |_| {}).await;
    relay.wait_ready().await;
    browser
        .wait(
            &has(r#"m.type === "reset" && m.reason === "history_unavailable""#),
            20_000,
        )
        .await;
    browser
        .wait(
            &has(r#"m.type === "initial" && m.done && m.data.length === 3"#),
            10_000,
        )
        .await;
    db.exec("insert into items(name) values ('after')").await;
    browser
        .wait(
            &has(r#"m.type === "create" && m.data.name === "after""#),
            10_000,
        )
        .await;
    assert_eq!(browser.eval("window.source.readyState").await, json!(1));
}
