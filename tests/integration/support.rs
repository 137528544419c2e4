//! Test support: a fresh database per test, an in-process relay, WebSocket and HTTP clients,
//! and timeouts that fail with the caller's location instead of hanging.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::panic::Location;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pgrelay::{Config, TableName};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_postgres::NoTls;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single remote step may take before the test fails.
pub const STEP: Duration = Duration::from_secs(20);

/// The server the tests use (`DATABASE_URL`, as the README's test command sets it).
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Awaits `fut`, failing the test at the caller's line if it takes longer than `limit`.
#[track_caller]
pub fn within<F: Future>(limit: Duration, fut: F) -> impl Future<Output = F::Output> {
    let caller = Location::caller();
    async move {
        match tokio::time::timeout(limit, fut).await {
            Ok(v) => v,
            Err(_) => panic!("timed out after {limit:?} at {caller}"),
        }
    }
}

/// Connects and drives a plain client.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A uniquely named database, dropped (with its connections) when this is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
    /// False for a database the test does not own (nothing is dropped).
    owned: bool,
}

/// Logs of the relays under test, shown for failing tests (`RUST_LOG` filters; default: warn).
fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

impl TestDb {
    pub async fn new() -> Self {
        init_logs();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "pgrelay_test_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        let admin = connect(&admin_url()).await;
        admin
            .batch_execute(&format!("create database {name}"))
            .await
            .expect("create database");
        let mut config: tokio_postgres::Config = admin_url().parse().expect("DATABASE_URL parses");
        config.dbname(&name);
        let url = config_to_url(&config);
        TestDb {
            name,
            url,
            owned: true,
        }
    }

    /// A database somewhere else (e.g. in a test's own cluster), left alone on drop.
    pub fn external(url: String) -> Self {
        init_logs();
        TestDb {
            name: String::new(),
            url,
            owned: false,
        }
    }

    /// A client on this database.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }

    /// Runs SQL on a fresh connection.
    pub async fn exec(&self, sql: &str) {
        self.client()
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    /// Creates tables and installs capture on them.
    pub async fn with_tables(self, ddl: &str, tables: &[&str]) -> Self {
        self.exec(ddl).await;
        install(&self, tables).await;
        self
    }
}

fn config_to_url(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "127.0.0.1".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres");
    let db = config.get_dbname().unwrap_or("postgres");
    format!("host={host} port={port} user={user} dbname={db}")
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let name = self.name.clone();
        // Drop cannot await; a short-lived runtime on its own thread can.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok((client, connection)) = tokio_postgres::connect(&admin_url(), NoTls).await
                {
                    tokio::spawn(connection);
                    let _ = client
                        .batch_execute(&format!("drop database if exists {name} with (force)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// A relay running in this process.
pub struct Relay {
    pub addr: SocketAddr,
    shutdown_tx: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<pgrelay::Result<()>>>,
}

impl Relay {
    /// Starts a relay with default settings for `tables` and waits until it is ready.
    pub async fn start(db: &TestDb, tables: &[&str]) -> Self {
        Self::start_with(db, tables, |_| {}).await
    }

    /// Starts a relay after `tweak` adjusts its config, and waits until it is ready.
    pub async fn start_with(db: &TestDb, tables: &[&str], tweak: impl FnOnce(&mut Config)) -> Self {
        let relay = Self::spawn_with(db, tables, tweak).await;
        relay.wait_ready().await;
        relay
    }

    /// Starts a relay after `tweak` adjusts its config, without waiting for it: for relays
    /// that must refuse to start ([`Relay::stop`] returns why) or that are not plain HTTP.
    pub async fn spawn_with(db: &TestDb, tables: &[&str], tweak: impl FnOnce(&mut Config)) -> Self {
        Self::spawn_on("127.0.0.1:0", db, tables, tweak).await
    }

    /// [`Relay::spawn_with`] listening on `bind` (e.g. `0.0.0.0:0`); `addr` is its port on
    /// 127.0.0.1.
    pub async fn spawn_on(
        bind: &str,
        db: &TestDb,
        tables: &[&str],
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let names = tables
            .iter()
            .map(|t| TableName::parse(t).unwrap())
            .collect();
        let mut config = Config::new(db.url.clone(), names);
        config.pool_size = 4;
        config.report_interval = Duration::from_millis(200);
        config.schema_interval = Duration::from_millis(200);
        config.max_backoff = Duration::from_millis(500);
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(pgrelay::run(config, listener, async {
            let _ = shutdown_rx.await;
        }));
        Relay {
            addr,
            shutdown_tx: Some(shutdown_tx),
            handle: Some(handle),
        }
    }

    /// Waits until `/readyz` answers 200.
    #[track_caller]
    pub fn wait_ready(&self) -> impl Future<Output = ()> + '_ {
        within(STEP, async move {
            loop {
                if let Ok((200, _)) = http_get(self.addr, "/readyz").await {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    }

    /// `ws://addr/path`, connected.
    pub async fn ws(&self, path: &str) -> Ws {
        let url = format!("ws://{}{}", self.addr, path);
        let (socket, _) = within(STEP, tokio_tungstenite::connect_async(url.as_str()))
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        Ws { socket }
    }

    /// `ws://addr/path` with `Authorization: Bearer <token>`, connected.
    pub async fn ws_as(&self, path: &str, token: &str) -> Ws {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = format!("ws://{}{}", self.addr, path);
        let mut request = url.as_str().into_client_request().unwrap();
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let (socket, _) = within(STEP, tokio_tungstenite::connect_async(request))
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        Ws { socket }
    }

    /// Shuts the relay down and returns what `run` returned.
    pub async fn stop(mut self) -> pgrelay::Result<()> {
        if let Some(tx) = self.shutdown_tx.take() {
            let _ = tx.send(());
        }
        let handle = self.handle.take().expect("not stopped yet");
        within(STEP, handle).await.expect("relay task panicked")
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown_tx.take() {
            let _ = tx.send(());
        }
    }
}

/// A minimal HTTP GET: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    Ok(status_and_body(&response))
}

/// The status code and body of a raw HTTP/1.1 response.
fn status_and_body(response: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A WebSocket test client.
pub struct Ws {
    pub socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What the next data frame was.
#[derive(Debug)]
pub enum Frame {
    Json(Value),
    Closed(Option<CloseFrame>),
}

impl Ws {
    /// The next text or close frame (pings are answered by the client library).
    pub async fn next_frame(&mut self) -> Frame {
        loop {
            match self.socket.next().await {
                Some(Ok(Message::Text(t))) => {
                    return Frame::Json(
                        serde_json::from_str(t.as_str()).expect("server sent JSON"),
                    );
                }
                Some(Ok(Message::Close(frame))) => return Frame::Closed(frame),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Frame::Closed(None),
            }
        }
    }

    /// The next text frame as it came (for values too deep for a JSON tree); fails on close.
    #[track_caller]
    pub fn next_text(&mut self) -> impl Future<Output = String> + '_ {
        let caller = Location::caller();
        async move {
            within(STEP, async {
                loop {
                    match self.socket.next().await {
                        Some(Ok(Message::Text(t))) => return t.as_str().to_owned(),
                        Some(Ok(Message::Close(f))) => panic!("closed ({f:?}) at {caller}"),
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => panic!("socket error {e} at {caller}"),
                        None => panic!("socket ended at {caller}"),
                    }
                }
            })
            .await
        }
    }

    /// The next JSON message; fails on close or after [`STEP`].
    #[track_caller]
    pub fn next_json(&mut self) -> impl Future<Output = Value> + '_ {
        let caller = Location::caller();
        async move {
            match within(STEP, self.next_frame()).await {
                Frame::Json(v) => v,
                Frame::Closed(f) => panic!("socket closed ({f:?}) while waiting at {caller}"),
            }
        }
    }

    /// The close frame's code; fails if a JSON message or nothing comes first.
    #[track_caller]
    pub fn expect_close(&mut self) -> impl Future<Output = Option<u16>> + '_ {
        let caller = Location::caller();
        async move {
            match within(STEP, self.next_frame()).await {
                Frame::Closed(f) => f.map(|f| u16::from(f.code)),
                Frame::Json(v) => panic!("expected close, got {v} at {caller}"),
            }
        }
    }

    /// Collects `n` change events (skipping nothing else: any other message fails).
    #[track_caller]
    pub fn events(&mut self, n: usize) -> impl Future<Output = Vec<Value>> + '_ {
        let caller = Location::caller();
        async move {
            let mut out = Vec::with_capacity(n);
            while out.len() < n {
                let v = match within(STEP, self.next_frame()).await {
                    Frame::Json(v) => v,
                    Frame::Closed(f) => panic!(
                        "closed ({f:?}) after {} of {n} events at {caller}",
                        out.len()
                    ),
                };
                out.push(v);
            }
            out
        }
    }

    /// Reads `initial` messages until `done`, returning all their rows.
    pub async fn initial_rows(&mut self) -> Vec<Value> {
        let mut rows = Vec::new();
        loop {
            let v = self.next_json().await;
            assert_eq!(v["type"], "initial", "expected initial data, got {v}");
            rows.extend(
                v["data"]
                    .as_array()
                    .expect("initial data is an array")
                    .iter()
                    .cloned(),
            );
            if v["done"] == true {
                return rows;
            }
        }
    }

    pub async fn send_text(&mut self, text: &str) {
        within(STEP, self.socket.send(Message::text(text)))
            .await
            .expect("send");
    }

    pub async fn send_json(&mut self, value: Value) {
        self.send_text(&value.to_string()).await;
    }
}

/// Seconds to wait for a relay process to become ready.
const PROCESS_START: Duration = Duration::from_secs(30);

/// A `pgrelay serve` child process (killed when dropped).
pub struct RelayProcess {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
}

impl RelayProcess {
    /// Starts the binary on a free port and waits for `/readyz`.
    pub async fn start(db_url: &str, tables: &str, extra: &[&str]) -> Self {
        Self::start_limited(db_url, tables, extra, None).await
    }

    /// [`RelayProcess::start`] with the open-file limit (soft and hard) set to `fds`.
    pub async fn start_limited(
        db_url: &str,
        tables: &str,
        extra: &[&str],
        fds: Option<u32>,
    ) -> Self {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let listen = format!("127.0.0.1:{port}");
        let mut command = match fds {
            None => tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay")),
            Some(fds) => {
                let mut sh = tokio::process::Command::new("sh");
                sh.args([
                    "-c",
                    &format!("ulimit -n {fds} && exec \"$0\" \"$@\""),
                    env!("CARGO_BIN_EXE_pgrelay"),
                ]);
                sh
            }
        };
        let child = command
            .args(["serve", "--tables", tables, "--listen", &listen])
            .args(extra)
            .env("DATABASE_URL", db_url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start pgrelay");
        let addr: SocketAddr = listen.parse().unwrap();
        within(PROCESS_START, async {
            while !matches!(http_get(addr, "/readyz").await, Ok((200, _))) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        RelayProcess { child, addr }
    }

    /// Peak resident memory of the process, in bytes (Linux `VmHWM`).
    pub fn peak_rss(&self) -> u64 {
        let pid = self.child.id().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .expect("VmHWM");
        let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kb * 1024
    }
}

/// A throwaway PostgreSQL cluster of the test's own, for faults that need the whole
/// server (a restart). Stopped and deleted when dropped.
pub struct Cluster {
    dir: std::path::PathBuf,
    bindir: std::path::PathBuf,
    pub port: u16,
    as_root: bool,
    /// Extra `-c` settings.
    settings: String,
}

/// The PostgreSQL server binaries: `PGRELAY_TEST_PGBIN`, `pg_config --bindir`, `initdb` on PATH,
/// or the newest `/usr/lib/postgresql/*/bin`.
pub fn pg_bindir() -> std::path::PathBuf {
    if let Ok(dir) = std::env::var("PGRELAY_TEST_PGBIN") {
        return dir.into();
    }
    if let Ok(out) = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
    {
        let dir = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    if let Ok(out) = std::process::Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
    {
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !path.is_empty() {
            return std::path::Path::new(&path).parent().unwrap().to_path_buf();
        }
    }
    let mut dirs: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL binaries (set PGRELAY_TEST_PGBIN)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    dirs.sort();
    dirs.pop()
        .expect("PostgreSQL binaries (set PGRELAY_TEST_PGBIN)")
}

impl Cluster {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// A cluster started with extra server settings (`-c name=value` each).
    pub async fn start_with(settings: &[&str]) -> Self {
        let bindir = pg_bindir();
        let dir = std::env::temp_dir().join(format!(
            "pgrelay-cluster-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let as_root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let cluster = Cluster {
            dir,
            bindir,
            port,
            as_root,
            settings: settings.iter().map(|s| format!(" -c {s}")).collect(),
        };
        if as_root {
            // initdb refuses to run as root: the cluster belongs to the postgres user.
            cluster.run_plain("chown", &["postgres", cluster.dir.to_str().unwrap()]);
        }
        let data = cluster.data();
        cluster.run_pg("initdb", &["-D", &data, "-U", "postgres", "-A", "trust"]);
        cluster.pg_ctl("start");
        cluster
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn run_plain(&self, program: &str, args: &[&str]) {
        let status = std::process::Command::new(program)
            .args(args)
            .status()
            .unwrap();
        assert!(status.success(), "{program} {args:?}");
    }

    fn run_pg(&self, tool: &str, args: &[&str]) {
        let tool = self.bindir.join(tool).display().to_string();
        let mut command = if self.as_root {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--", &tool]);
            c
        } else {
            std::process::Command::new(&tool)
        };
        let out = command.args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn pg_ctl(&self, action: &str) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_prepared_transactions=5{}",
            self.port,
            self.dir.display(),
            self.settings
        );
        let log = self.dir.join("server.log").display().to_string();
        let data = self.data();
        self.run_pg(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-w", "-m", "fast", "-o", &options, action,
            ],
        );
    }

    /// `pg_ctl restart -m fast`: every connection is closed, the server comes back.
    pub fn restart(&self) {
        self.pg_ctl("restart");
    }

    /// Stops the server (`pg_ctl stop -m fast`).
    pub fn stop(&self) {
        self.pg_ctl("stop");
    }

    /// Starts the server again after [`Cluster::stop`].
    pub fn start_again(&self) {
        self.pg_ctl("start");
    }

    /// Stops the server, copies its data directory aside, and starts it again.
    pub fn backup(&self) {
        self.pg_ctl("stop");
        let backup = self.dir.join("backup").display().to_string();
        self.run_plain("cp", &["-a", &self.data(), &backup]);
        self.pg_ctl("start");
    }

    /// Stops the server and puts the copy [`Cluster::backup`] made back in place: the
    /// database as it was then (its transaction ids and sequences too), started again.
    pub fn restore(&self) {
        self.pg_ctl("stop");
        let backup = self.dir.join("backup").display().to_string();
        self.run_plain("rm", &["-rf", &self.data()]);
        self.run_plain("cp", &["-a", &backup, &self.data()]);
        self.pg_ctl("start");
    }

    /// Writes `name` into the cluster's directory with `mode`, owned by the server's user
    /// (PostgreSQL refuses a key file others can read); returns its path.
    pub fn write_file(&self, name: &str, contents: &[u8], mode: u32) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.join(name);
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        if self.as_root {
            self.run_plain("chown", &["postgres", path.to_str().unwrap()]);
        }
        path
    }

    /// The directory of the cluster's Unix socket (`host=` this, with [`Cluster::port`]).
    pub fn socket_dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// The connection string of a database in this cluster.
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={dbname}",
            self.port
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.data();
        let tool = self.bindir.join("pg_ctl").display().to_string();
        let mut command = if self.as_root {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--", &tool]);
            c
        } else {
            std::process::Command::new(&tool)
        };
        let _ = command
            .args(["-D", &data, "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Terminates every backend of the relay (capture and pool) on `db`; returns how many.
pub async fn terminate_relay_connections(db: &TestDb) -> i64 {
    let admin = connect(&admin_url()).await;
    admin
        .query_one(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity
              where datname = $1 and application_name like 'pgrelay%'",
            &[&db.name],
        )
        .await
        .unwrap()
        .get(0)
}

/// An HTTP response: status and body (parsed as JSON when it is JSON, else `Value::Null`).
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub text: String,
    pub json: Value,
    /// Header lines as sent (`name: value`).
    pub head: String,
}

impl Response {
    /// The value of a response header (the first, if repeated).
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }

    /// The body.
    pub fn body(&self) -> &str {
        &self.text
    }
}

/// Sends one HTTP/1.1 request (`head` without the final blank line) and reads the response.
/// The body is written while the response is read, so a server that answers early (413)
/// and closes is seen answering, not as a broken pipe.
pub async fn http_raw(addr: SocketAddr, head: String, body: Vec<u8>) -> std::io::Result<Response> {
    let stream = TcpStream::connect(addr).await?;
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        write.write_all(head.as_bytes()).await?;
        write.write_all(b"\r\n").await?;
        write.write_all(&body).await?;
        write.flush().await?;
        Ok::<_, std::io::Error>(write)
    });
    let mut response = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match read.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&buf[..n]),
            // The server may reset a connection whose body it did not read; what it sent
            // before is the answer.
            Err(_) if !response.is_empty() => break,
            Err(e) => return Err(e),
        }
        if complete(&response) {
            break;
        }
    }
    writer.abort();
    let (status, body) = status_and_body(&response);
    let json = serde_json::from_str(&body).unwrap_or(Value::Null);
    let text = String::from_utf8_lossy(&response);
    let head = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(h, _)| h.to_owned());
    Ok(Response {
        status,
        text: body,
        json,
        head,
    })
}

/// Whether `response` holds the whole head and a body of its `content-length`.
fn complete(response: &[u8]) -> bool {
    let text = String::from_utf8_lossy(response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    if head.starts_with("HTTP/1.1 101") {
        // Switched protocols: the rest is the WebSocket's.
        return true;
    }
    head.lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())
                .flatten()
        })
        .is_some_and(|length| body.len() >= length)
}

/// One request with an optional JSON body; fails the test after [`STEP`].
#[track_caller]
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> impl Future<Output = Response> + use<> {
    http_as(addr, method, path, None, body)
}

/// [`http`] with `Authorization: Bearer <token>`.
#[track_caller]
pub fn http_as(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> impl Future<Output = Response> + use<> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    http_with(addr, method, path, &headers, body)
}

/// [`http`] with extra headers (`Prefer`, `Accept`, `Range`, …).
#[track_caller]
pub fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> impl Future<Output = Response> + use<> {
    let caller = Location::caller();
    let body = body.map(|b| b.to_string().into_bytes());
    let method = method.to_owned();
    let path = path.to_owned();
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    async move {
        let body = body.unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}\
             Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        match tokio::time::timeout(STEP, http_raw(addr, head, body)).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => panic!("{method} {path}: {e} at {caller}"),
            Err(_) => panic!("{method} {path}: timed out at {caller}"),
        }
    }
}

/// Waits until `/metrics` contains every one of `needles` (e.g. `"pgrelay_slow_consumers_total 1"`).
#[track_caller]
pub fn wait_for_metrics<'a>(
    addr: SocketAddr,
    needles: &'a [&'a str],
) -> impl Future<Output = ()> + 'a {
    within(STEP, async move {
        loop {
            let (_, metrics) = http_get(addr, "/metrics").await.unwrap();
            if needles.iter().all(|n| metrics.contains(n)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// Runs `statement` in a transaction and commits it while capture is held back: a session
/// queues for an exclusive lock on the log behind the writer, so it gets the lock the moment
/// the writer commits, before capture can read the rows the notification points to. Returns
/// that session, inside its transaction; commit (or roll back) on it to let capture go on.
pub async fn commit_with_capture_held_back(db: &TestDb, statement: &str) -> tokio_postgres::Client {
    let writer = db.client().await;
    writer
        .batch_execute(&format!("begin; {statement}"))
        .await
        .unwrap();
    let locker = db.client().await;
    let locker_pid: i32 = locker
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let lock = tokio::spawn(async move {
        locker
            .batch_execute("begin; lock table pgrelay.changes in access exclusive mode")
            .await
            .unwrap();
        locker
    });
    let observer = db.client().await;
    within(STEP, async {
        loop {
            let waiting: i64 = observer
                .query_one(
                    "select count(*) from pg_locks where pid = $1 and not granted",
                    &[&locker_pid],
                )
                .await
                .unwrap()
                .get(0);
            if waiting > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    writer.batch_execute("commit").await.unwrap();
    within(STEP, lock).await.unwrap()
}

/// A client that completes the handshake with a tiny receive buffer (and then reads only if
/// the test makes it).
pub async fn stalled_client(addr: SocketAddr, path: &str) -> WebSocketStream<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let url = format!("ws://{addr}{path}");
    tokio_tungstenite::client_async(url.as_str(), stream)
        .await
        .unwrap()
        .0
}

impl Cluster {
    /// A fresh database in this cluster, as a [`TestDb`] (the cluster is dropped with it).
    pub async fn database(&self, name: &str, ddl: &str) -> TestDb {
        connect(&self.url("postgres"))
            .await
            .batch_execute(&format!("create database {name}"))
            .await
            .unwrap();
        let db = TestDb::external(self.url(name));
        db.exec(ddl).await;
        db
    }

    /// The pid of the relay's capture backend on database `dbname`.
    pub async fn capture_pid(&self, dbname: &str) -> i32 {
        let admin = connect(&self.url("postgres")).await;
        within(STEP, async {
            loop {
                let rows = admin
                    .query(
                        "select pid from pg_stat_activity
                          where datname = $1 and application_name = 'pgrelay capture'",
                        &[&dbname],
                    )
                    .await
                    .unwrap();
                if let [row] = rows.as_slice() {
                    return row.get(0);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }
}

/// Sends a signal (`STOP`, `CONT`) to a process of this test's own cluster.
pub fn signal(name: &str, pid: i32) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

/// Installs capture on `tables` of a database the test created itself.
pub async fn install(db: &TestDb, tables: &[&str]) {
    install_mode(db, tables, "notify").await;
}

/// Installs capture on `tables` in `mode` (`notify` or `poll`).
pub async fn install_mode(db: &TestDb, tables: &[&str], mode: &str) {
    let mut client = db.client().await;
    let names: Vec<TableName> = tables
        .iter()
        .map(|t| TableName::parse(t).unwrap())
        .collect();
    pgrelay::sql::install(&mut client, &names, mode)
        .await
        .expect("install capture");
}

/// JWT verification with an HMAC `secret`: no audience or issuer check, no leeway, `exp`
/// required.
pub fn hmac_jwt(secret: &str) -> pgrelay::access::auth::JwtConfig {
    use pgrelay::access::auth::{JwtConfig, KeySource, Secret};
    JwtConfig {
        keys: KeySource::Secret(Secret(secret.into())),
        algorithms: vec![],
        audience: None,
        issuer: None,
        leeway: Duration::from_secs(0),
        require_exp: true,
    }
}

/// A TCP port free on 127.0.0.1 just now (for a relay that must come back on the same port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `/readyz` at `addr` answers 200.
pub async fn wait_ready_at(addr: SocketAddr) {
    within(STEP, async {
        while !matches!(http_get(addr, "/readyz").await, Ok((200, _))) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Sets `config`'s policies from `[[policy]]` TOML, and JWTs signed with `secret`.
pub fn with_policies(config: &mut Config, policies: &str, secret: &str) {
    let mut settings = pgrelay::settings::Settings::from_toml(policies).unwrap();
    // (Settings need tables to become a Config; the relay's tables are the test's own.)
    settings.tables = Some(vec!["unused".into()]);
    config.policies = settings.into_config().unwrap().policies;
    config.auth.jwt = Some(hmac_jwt(secret));
}

/// A login role without any privilege, created for one test and dropped after.
pub struct Role {
    pub name: String,
    pub db_url: String,
    admin: tokio_postgres::Client,
}

impl Role {
    pub async fn create(db: &TestDb, prefix: &str, grants: &str) -> Role {
        let name = format!("{prefix}_{}_{}", std::process::id(), rand::random::<u32>());
        let admin = db.client().await;
        admin
            .batch_execute(&format!(
                "create role {name} login; {}",
                grants.replace("{role}", &name)
            ))
            .await
            .unwrap();
        Role {
            db_url: format!("{} user={name}", db.url),
            name,
            admin,
        }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        crate::support::connect(&self.db_url).await
    }

    pub async fn is_superuser(&self) -> bool {
        self.admin
            .query_one(
                "select rolsuper from pg_roles where rolname = $1",
                &[&self.name],
            )
            .await
            .unwrap()
            .get(0)
    }

    pub async fn drop(self) {
        let _ = self
            .admin
            .batch_execute(&format!(
                "drop owned by {0} cascade; drop role {0}",
                self.name
            ))
            .await;
    }
}
