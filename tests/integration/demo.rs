//! `pgrelay demo`, run as a newcomer runs it: the binary, its printed lines, Ctrl-C.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;

use crate::support::{STEP, TestDb, Ws, admin_url, connect, http, pg_bindir, signal, within};

/// How long the demo may take to print its dashboard line (initdb and a relay build-up
/// included, on a busy machine).
const START: Duration = Duration::from_secs(120);

/// A running `pgrelay demo`; stopped with SIGINT (then killed) if the test fails first.
struct Demo {
    child: tokio::process::Child,
    /// Lines of stdout, as they come.
    lines_rx: mpsc::UnboundedReceiver<String>,
    /// Everything printed so far, stdout and stderr, for failure messages.
    output: Arc<Mutex<String>>,
    /// Where the dashboard is.
    addr: SocketAddr,
    /// The throwaway cluster's directory, if it printed one.
    temp_dir: Option<PathBuf>,
}

/// Copies `stream`'s lines into `output` (and to `lines_tx`, if given).
fn drain(
    stream: impl AsyncRead + Unpin + Send + 'static,
    output: Arc<Mutex<String>>,
    lines_tx: Option<mpsc::UnboundedSender<String>>,
) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            {
                let mut output = output.lock().unwrap();
                output.push_str(&line);
                output.push('\n');
            }
            if let Some(tx) = &lines_tx {
                let _ = tx.send(line);
            }
        }
    });
}

impl Demo {
    /// Starts `pgrelay demo ARGS` and waits for its dashboard line.
    async fn start(args: &[&str]) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"))
            .arg("demo")
            .args(args)
            // Never read by the demo: only --database-url chooses a database.
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/nowhere")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start pgrelay demo");
        let output = Arc::new(Mutex::new(String::new()));
        let (lines_tx, lines_rx) = mpsc::unbounded_channel();
        drain(
            child.stdout.take().unwrap(),
            Arc::clone(&output),
            Some(lines_tx),
        );
        drain(child.stderr.take().unwrap(), Arc::clone(&output), None);
        let mut demo = Demo {
            child,
            lines_rx,
            output,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            temp_dir: None,
        };
        let url = demo
            .wait_for_line("pgrelay demo: dashboard at ", START)
            .await;
        demo.addr = url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .unwrap_or_else(|e| panic!("bad dashboard URL {url:?}: {e}"));
        demo.wait_for_line("Ctrl-C to stop.", STEP).await;
        demo.temp_dir = demo
            .printed()
            .lines()
            .find_map(|l| {
                l.split_once(" started in ")
                    .map(|(_, rest)| rest.to_owned())
            })
            .and_then(|rest| rest.split_once(',').map(|(dir, _)| PathBuf::from(dir)));
        demo
    }

    /// Everything printed so far.
    fn printed(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Waits for a stdout line starting with `prefix`; returns the rest of it.
    async fn wait_for_line(&mut self, prefix: &str, limit: Duration) -> String {
        let found = tokio::time::timeout(limit, async {
            while let Some(line) = self.lines_rx.recv().await {
                if let Some(rest) = line.strip_prefix(prefix) {
                    return Some(rest.to_owned());
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(rest)) => rest,
            Ok(None) => panic!(
                "the demo exited before printing {prefix:?}:\n{}",
                self.printed()
            ),
            Err(_) => panic!(
                "no {prefix:?} within {limit:?}; the demo printed:\n{}",
                self.printed()
            ),
        }
    }

    /// A WebSocket on `path`.
    async fn ws(&self, path: &str) -> Ws {
        let url = format!("ws://{}{}", self.addr, path);
        let (socket, _) = within(STEP, tokio_tungstenite::connect_async(url.as_str()))
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        Ws { socket }
    }

    /// Ctrl-C: SIGINT, then waits for the process to exit successfully and for its last line.
    async fn interrupt(mut self) -> String {
        signal("INT", self.child.id().expect("running") as i32);
        let status = within(Duration::from_secs(30), self.child.wait())
            .await
            .unwrap();
        self.wait_for_line("pgrelay demo: stopped", STEP).await;
        let printed = self.printed();
        assert!(status.success(), "{status}; the demo printed:\n{printed}");
        printed
    }
}

impl Drop for Demo {
    /// A failed test still lets the demo clean up after itself: SIGINT, then up to 30 s.
    fn drop(&mut self) {
        let Some(pid) = self.child.id() else {
            return;
        };
        let _ = std::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status();
        for _ in 0..300 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.start_kill();
    }
}

/// Waits for the first change event (create, update, delete) on `ws`.
async fn next_change(ws: &mut Ws) -> Value {
    loop {
        let message = ws.next_json().await;
        if ["create", "update", "delete"].contains(&message["type"].as_str().unwrap_or("")) {
            return message;
        }
    }
}

/// Whether process `pid` is gone (a zombie no init has reaped yet counts as gone).
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// The postmaster's pid from a data directory.
fn postmaster_pid(dir: &Path) -> u32 {
    let text = std::fs::read_to_string(dir.join("data").join("postmaster.pid"))
        .unwrap_or_else(|e| panic!("postmaster.pid in {}: {e}", dir.display()));
    text.lines().next().unwrap().trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_without_a_url_runs_its_own_cluster_and_removes_it_on_ctrl_c() {
    let pgbin = pg_bindir();
    let demo = Demo::start(&[
        "--listen",
        "127.0.0.1:0",
        "--rate",
        "20",
        "--pgbin",
        pgbin.to_str().unwrap(),
    ])
    .await;
    let printed = demo.printed();
    let dir = demo
        .temp_dir
        .clone()
        .unwrap_or_else(|| panic!("no temporary directory printed:\n{printed}"));
    assert!(dir.join("data").is_dir(), "{}", dir.display());
    let postmaster = postmaster_pid(&dir);
    assert!(!process_gone(postmaster));
    assert!(
        printed.contains("Ctrl-C to stop.")
            && printed.contains(&format!("curl http://{}/api/items", demo.addr))
            && printed.contains("psql -h 127.0.0.1 -p ")
            && printed.contains(" tail --url "),
        "{printed}"
    );

    // REST lists the demo table's rows (seeded, then changed by the writer).
    let listed = http(demo.addr, "GET", "/api/items", None).await;
    assert_eq!(listed.status, 200, "{}", listed.text);
    let rows = listed.json.as_array().expect("a list of rows");
    assert!(!rows.is_empty(), "{}", listed.text);
    for row in rows {
        assert!(row["name"].is_string() && row["id"].is_number(), "{row}");
    }

    // The writer's changes stream to a WebSocket subscriber.
    let mut ws = demo.ws("/ws/items").await;
    let change = next_change(&mut ws).await;
    assert_eq!(change["resource"], "items", "{change}");
    assert!(change["seq"].is_number(), "{change}");
    let change = next_change(&mut ws).await;
    assert_eq!(change["resource"], "items", "{change}");

    let printed = demo.interrupt().await;
    assert!(
        printed.contains(&format!(
            "removed the throwaway PostgreSQL ({})",
            dir.display()
        )),
        "{printed}"
    );
    assert!(!dir.exists(), "{} is still there", dir.display());
    within(STEP, async {
        while !process_gone(postmaster) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_with_a_url_uses_a_schema_of_its_own_and_leaves_the_server_running() {
    let db = TestDb::new().await;
    // The database's own `items` is never touched.
    db.exec(
        "create table items(id int primary key, note text); insert into items values (1, 'mine')",
    )
    .await;
    let demo = Demo::start(&[
        "--database-url",
        &db.url,
        "--listen",
        "127.0.0.1:0",
        "--rate",
        "20",
    ])
    .await;
    let printed = demo.printed();
    assert!(
        printed.contains("created table pgrelay_demo.items") && demo.temp_dir.is_none(),
        "{printed}"
    );

    let listed = http(demo.addr, "GET", "/api/pgrelay_demo.items", None).await;
    assert_eq!(listed.status, 200, "{}", listed.text);
    assert!(
        !listed.json.as_array().unwrap().is_empty(),
        "{}",
        listed.text
    );
    let mut ws = demo.ws("/ws/pgrelay_demo.items").await;
    let change = next_change(&mut ws).await;
    assert_eq!(change["resource"], "pgrelay_demo.items", "{change}");
    // A write of one's own arrives too.
    db.exec("insert into pgrelay_demo.items(name, price) values ('fig', 3)")
        .await;
    within(STEP, async {
        loop {
            let change = next_change(&mut ws).await;
            if change["type"] == "create" && change["data"]["name"] == "fig" {
                return;
            }
        }
    })
    .await;

    let printed = demo.interrupt().await;
    assert!(printed.contains("pgrelay_demo.items"), "{printed}");
    // The server runs on, the demo's table stays, the database's own table is as it was.
    let client = connect(&admin_url()).await;
    client.query_one("select 1", &[]).await.unwrap();
    let client = db.client().await;
    let demo_rows: i64 = client
        .query_one("select count(*) from pgrelay_demo.items", &[])
        .await
        .unwrap()
        .get(0);
    assert!(demo_rows > 0);
    let mine: Vec<(i32, String)> = client
        .query("select id, note from public.items", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(mine, [(1, "mine".to_owned())]);
    let triggers: i64 = client
        .query_one(
            "select count(*) from pg_trigger where tgrelid = 'public.items'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(triggers, 0);

    // A second run uses the table the first one left.
    let demo = Demo::start(&["--database-url", &db.url, "--listen", "127.0.0.1:0"]).await;
    assert!(
        demo.printed()
            .contains("using the existing table pgrelay_demo.items"),
        "{}",
        demo.printed()
    );
    demo.interrupt().await;
}
