//! TLS to PostgreSQL: `sslmode` with libpq's meanings, against a cluster of the test's own that
//! serves TLS with a certificate for `localhost` signed by a CA made in the test. TLS on the
//! listener: HTTPS and WSS with a certificate from such a CA, real rustls clients.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::support::{Cluster, Relay, STEP, TestDb, connect, http_get, install, within};

const ITEMS: &str = "create table items(id serial primary key, name text)";

/// The password in every relay's connection string (the cluster trusts every local connection,
/// so any password works): it must never show in an error or a log line.
const PASSWORD: &str = "pw-8c1f-never-printed";

/// A certificate authority made for one test.
struct Ca {
    cert: Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A server certificate for `names` (host names or IP addresses) and its key, as PEM.
    fn issue(&self, names: &[&str]) -> (String, String) {
        self.issue_with(names, |_| {})
    }

    /// [`Ca::issue`], with `adjust` applied to the certificate's parameters.
    fn issue_with(
        &self,
        names: &[&str],
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        adjust(&mut params);
        params
            .distinguished_name
            .push(DnType::CommonName, &names[0]);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }
}

/// A cluster with `ssl = on` and a certificate naming only `localhost`, signed by `ca.pem`;
/// `other-ca.pem` signed nothing it serves. Database `tls` has `items` captured.
struct TlsCluster {
    cluster: Cluster,
    db: TestDb,
    ca: PathBuf,
    other_ca: PathBuf,
}

impl TlsCluster {
    async fn start() -> Self {
        Self::start_serving(|ca| ca.issue(&["localhost"])).await
    }

    /// [`TlsCluster::start`], serving the certificate (and key) `issue` makes with the CA.
    async fn start_serving(issue: impl FnOnce(&Ca) -> (String, String)) -> Self {
        let cluster = Cluster::start().await;
        let ca = Ca::new("pgrelay test CA");
        let (cert, key) = issue(&ca);
        let cert = cluster.write_file("server.crt", cert.as_bytes(), 0o644);
        let key = cluster.write_file("server.key", key.as_bytes(), 0o600);
        let ca_file = cluster.write_file("ca.pem", ca.pem().as_bytes(), 0o644);
        let other = Ca::new("another CA").pem();
        let other_ca = cluster.write_file("other-ca.pem", other.as_bytes(), 0o644);
        let admin = connect(&cluster.url("postgres")).await;
        // One statement at a time: ALTER SYSTEM cannot run in a (multi-statement) transaction.
        for sql in [
            format!("alter system set ssl_cert_file = '{}'", cert.display()),
            format!("alter system set ssl_key_file = '{}'", key.display()),
            "alter system set ssl = on".to_owned(),
            "select pg_reload_conf()".to_owned(),
        ] {
            within(STEP, admin.batch_execute(&sql)).await.unwrap();
        }
        let db = cluster.database("tls", ITEMS).await;
        install(&db, &["items"]).await;
        let tls = TlsCluster {
            cluster,
            db,
            ca: ca_file,
            other_ca,
        };
        // The reload is asynchronous: wait until the server speaks TLS.
        let url = tls.url("127.0.0.1", "sslmode=require");
        within(STEP, async {
            while pgrelay::sql::connect(&url).await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        tls
    }

    /// A URL for database `tls` on `host`, with the password and the query `query`.
    fn url(&self, host: &str, query: &str) -> String {
        format!(
            "postgres://postgres:{PASSWORD}@{host}:{}/tls?{query}",
            self.cluster.port
        )
    }

    /// A relay on `database_url`, started and ready.
    async fn relay(&self, database_url: String) -> Relay {
        Relay::start_with(&self.db, &["items"], |c| c.database_url = database_url).await
    }

    /// Why a relay on `database_url` refuses to start (fails if it starts).
    async fn refusal(&self, database_url: String) -> String {
        let relay = Relay::spawn_with(&self.db, &["items"], |c| c.database_url = database_url);
        match relay.await.stop().await {
            Ok(()) => panic!("the relay started"),
            Err(err) => pgrelay::error::chain(&err),
        }
    }

    /// Whether each of the relay's connections (capture and pool) uses TLS, by
    /// `application_name`, once both kinds are connected (read from `pg_stat_ssl`).
    async fn relay_connections(&self) -> Vec<(String, bool)> {
        let admin = connect(&self.cluster.url("postgres")).await;
        within(STEP, async {
            loop {
                let rows: Vec<(String, bool)> = admin
                    .query(
                        "select a.application_name, s.ssl
                           from pg_stat_activity a join pg_stat_ssl s using (pid)
                          where a.datname = 'tls' and a.application_name like 'pgrelay%'
                          order by 1",
                        &[],
                    )
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| (r.get(0), r.get(1)))
                    .collect();
                let has = |name: &str| rows.iter().any(|(n, _)| n == name);
                if has("pgrelay capture") && has("pgrelay") {
                    return rows;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }

    /// An insert reaches a subscriber of `relay`.
    async fn assert_streams(&self, relay: &Relay, name: &str) {
        let mut ws = relay.ws("/ws/items").await;
        self.db
            .exec(&format!("insert into items(name) values ('{name}')"))
            .await;
        assert_eq!(ws.next_json().await["data"]["name"], name);
    }
}

fn assert_all_tls(connections: &[(String, bool)]) {
    assert!(
        connections.iter().all(|(_, ssl)| *ssl),
        "every relay connection uses TLS: {connections:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_the_right_ca_streams_and_every_connection_uses_tls() {
    let tls = TlsCluster::start().await;
    let query = format!("sslmode=verify-full&sslrootcert={}", tls.ca.display());
    let relay = tls.relay(tls.url("localhost", &query)).await;
    tls.assert_streams(&relay, "over tls").await;
    assert_all_tls(&tls.relay_connections().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_from_another_ca_is_refused_at_start() {
    let tls = TlsCluster::start().await;
    for mode in ["verify-full", "verify-ca"] {
        let query = format!("sslmode={mode}&sslrootcert={}", tls.other_ca.display());
        let why = tls.refusal(tls.url("localhost", &query)).await;
        let reason = format!(
            "error performing TLS handshake: the server's certificate is not signed by a trusted root (sslrootcert={})",
            tls.other_ca.display()
        );
        assert!(why.contains(&reason), "{mode}: {why}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_ca_accepts_a_certificate_for_another_host_name_and_verify_full_does_not() {
    let tls = TlsCluster::start().await;
    // The certificate names only localhost; the relay connects to 127.0.0.1.
    let query = format!("sslmode=verify-ca&sslrootcert={}", tls.ca.display());
    let relay = tls.relay(tls.url("127.0.0.1", &query)).await;
    tls.assert_streams(&relay, "chain checked").await;
    assert_all_tls(&tls.relay_connections().await);
    relay.stop().await.unwrap();

    let query = format!("sslmode=verify-full&sslrootcert={}", tls.ca.display());
    let why = tls.refusal(tls.url("127.0.0.1", &query)).await;
    assert!(
        why.contains("the server's certificate does not name host 127.0.0.1 (it names localhost)"),
        "{why}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_encrypts_without_checking_the_certificate() {
    let tls = TlsCluster::start().await;
    // No root certificate the server's chain leads to, and a host name it does not carry.
    let relay = tls.relay(tls.url("127.0.0.1", "sslmode=require")).await;
    tls.assert_streams(&relay, "encrypted").await;
    assert_all_tls(&tls.relay_connections().await);
    relay.stop().await.unwrap();

    // The check above can tell: with sslmode=disable the same server sees plain connections.
    let relay = tls.relay(tls.url("127.0.0.1", "sslmode=disable")).await;
    tls.assert_streams(&relay, "plain").await;
    let connections = tls.relay_connections().await;
    assert!(connections.iter().all(|(_, ssl)| !ssl), "{connections:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_with_sslrootcert_checks_the_chain_as_verify_ca_does() {
    let tls = TlsCluster::start().await;
    // A root the server's chain does not lead to: refused, saying so (libpq does the same).
    let query = format!("sslmode=require&sslrootcert={}", tls.other_ca.display());
    let why = tls.refusal(tls.url("localhost", &query)).await;
    let reason = format!(
        "the server's certificate is not signed by a trusted root (sslrootcert={})",
        tls.other_ca.display()
    );
    assert!(why.contains(&reason), "{why}");

    // The right root: accepted, and the host name is not checked (as with verify-ca).
    let query = format!("sslmode=require&sslrootcert={}", tls.ca.display());
    let relay = tls.relay(tls.url("127.0.0.1", &query)).await;
    tls.assert_streams(&relay, "require, chain checked").await;
    assert_all_tls(&tls.relay_connections().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_checks_the_chain_against_root_crt_in_the_home_directory() {
    let tls = TlsCluster::start().await;
    let home = std::env::temp_dir().join(format!(
        "pgrelay-home-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(home.join(".postgresql")).unwrap();
    let root_crt = home.join(".postgresql/root.crt");
    // `pgrelay status` connects once and exits: it says why it cannot.
    let status = |home: &std::path::Path| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"))
            .args(["status", "--database-url"])
            .arg(tls.url("127.0.0.1", "sslmode=require"))
            .env("HOME", home)
            .kill_on_drop(true)
            .output()
    };

    std::fs::copy(&tls.other_ca, &root_crt).unwrap();
    let output = within(STEP, status(&home)).await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    let reason = format!(
        "the server's certificate is not signed by a trusted root (the default sslrootcert {})",
        root_crt.display()
    );
    assert!(stderr.contains(&reason), "{stderr}");
    assert!(!stderr.contains(PASSWORD), "{stderr}");

    std::fs::copy(&tls.ca, &root_crt).unwrap();
    let output = within(STEP, status(&home)).await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stdout.contains("items"), "{stdout}");

    // No root.crt: require encrypts without checking, as before.
    std::fs::remove_file(&root_crt).unwrap();
    let output = within(STEP, status(&home)).await.unwrap();
    assert!(output.status.success());
    std::fs::remove_dir_all(&home).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_hosts_connect_without_tls_whatever_the_sslmode() {
    // The cluster serves TLS on TCP; on its Unix socket PostgreSQL never does.
    let tls = TlsCluster::start().await;
    let dir = tls.cluster.socket_dir().display().to_string();
    let port = tls.cluster.port;

    // A relay on the socket with sslmode=require: every connection works, none uses TLS.
    let url = format!(
        "host={dir} port={port} user=postgres password={PASSWORD} dbname=tls sslmode=require"
    );
    let relay = tls.relay(url).await;
    tls.assert_streams(&relay, "over the socket").await;
    let connections = tls.relay_connections().await;
    assert!(connections.iter().all(|(_, ssl)| !ssl), "{connections:?}");
    relay.stop().await.unwrap();

    // Both URL forms, every mode, and certificate files that do not exist (libpq reads none).
    let encoded = dir.replace('/', "%2F");
    for url in [
        format!("postgres:///tls?host={dir}&port={port}&user=postgres&sslmode=require"),
        format!("postgres://postgres@{encoded}:{port}/tls?sslmode=prefer"),
        format!(
            "postgres://postgres@{encoded}:{port}/tls?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"
        ),
        format!("host={dir} port={port} user=postgres dbname=tls sslmode=verify-ca"),
        format!("host={dir} port={port} user=postgres dbname=tls"),
    ] {
        let client = within(STEP, pgrelay::sql::connect(&url))
            .await
            .unwrap_or_else(|e| panic!("{url}: {}", pgrelay::error::chain(&e)));
        let row = within(
            STEP,
            client.query_one(
                "select ssl, (select client_addr is null from pg_stat_activity
                               where pid = pg_backend_pid())
                   from pg_stat_ssl where pid = pg_backend_pid()",
                &[],
            ),
        )
        .await
        .unwrap();
        let (ssl, local): (bool, bool) = (row.get(0), row.get(1));
        assert!(!ssl && local, "{url}: ssl {ssl}, over the socket {local}");
    }

    // A list mixing a socket and a TCP host cannot have one mode mean both: refused.
    let mixed =
        format!("host={dir},localhost port={port} user=postgres dbname=tls sslmode=require");
    let Err(err) = pgrelay::sql::connect(&mixed).await else {
        panic!("a mixed host list with sslmode=require connected")
    };
    let why = pgrelay::error::chain(&err);
    assert!(why.contains("mixes Unix sockets"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_value_escapes_reach_postgresql_intact() {
    let tls = TlsCluster::start().await;
    // A role that must give its password over TCP, one with a blank, a quote and a backslash.
    let admin = connect(&tls.cluster.url("postgres")).await;
    let create = admin.batch_execute(
        r"create role esc login password 'sp ace''q\x';
          grant connect on database tls to esc",
    );
    within(STEP, create).await.unwrap();
    let hba = "host all esc 127.0.0.1/32 scram-sha-256\n\
               host all esc ::1/128 scram-sha-256\n\
               local all all trust\n\
               host all all 127.0.0.1/32 trust\n\
               host all all ::1/128 trust\n";
    tls.cluster
        .write_file("data/pg_hba.conf", hba.as_bytes(), 0o600);
    within(STEP, admin.batch_execute("select pg_reload_conf()"))
        .await
        .unwrap();
    // The root certificate at a path with a blank and a quote in it.
    let ca = tls
        .cluster
        .write_file("it's a ca.pem", &std::fs::read(&tls.ca).unwrap(), 0o644);
    let ca_quoted = ca
        .display()
        .to_string()
        .replace('\\', r"\\")
        .replace('\'', r"\'");
    let port = tls.cluster.port;
    let base = format!("host=localhost port={port} user=esc dbname=tls sslmode=verify-full");
    let forms = [
        format!(r"{base} password=sp\ ace\'q\\x sslrootcert='{ca_quoted}' application_name=a\ b"),
        format!(
            r"{base} password = 'sp ace\'q\\x' sslrootcert='{ca_quoted}' application_name='a b'"
        ),
    ];

    // The reload is asynchronous: wait until the role's password is asked for.
    let wrong = format!(r"{base} password=sp\ ace sslrootcert='{ca_quoted}'");
    within(STEP, async {
        while pgrelay::sql::connect(&wrong).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let Err(err) = pgrelay::sql::connect(&wrong).await else {
        panic!("a wrong password was accepted")
    };
    let why = pgrelay::error::chain(&err);
    assert!(why.contains("password authentication failed"), "{why}");
    assert!(!why.contains("sp ace"), "{why}");

    for url in forms {
        let client = within(STEP, pgrelay::sql::connect(&url))
            .await
            .unwrap_or_else(|e| panic!("{}", pgrelay::error::chain(&e)));
        let row = within(
            STEP,
            client.query_one(
                "select current_user::text, current_setting('application_name'), ssl
                   from pg_stat_ssl where pid = pg_backend_pid()",
                &[],
            ),
        )
        .await
        .unwrap();
        let got: (String, String, bool) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(got, ("esc".to_owned(), "a b".to_owned(), true));
        // And the string as shown (--print-config) hides the password, read the same way.
        let shown = pgrelay::tls::redact(&url);
        assert!(!shown.contains("ace"), "{shown}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_server_certificate_is_refused_saying_when_it_expired() {
    let tls = TlsCluster::start_serving(|ca| {
        ca.issue_with(&["localhost"], |params| {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 6, 30);
        })
    })
    .await;
    for mode in ["verify-full", "verify-ca", "require"] {
        let query = format!("sslmode={mode}&sslrootcert={}", tls.ca.display());
        let why = tls.refusal(tls.url("localhost", &query)).await;
        assert!(
            why.contains("the server's certificate chain has expired: not valid after 2020-06-30"),
            "{mode}: {why}"
        );
    }
}

/// Log lines written while a test runs (every level), on the test's own thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

// One thread: the relay's tasks run where the test's log subscriber is the default.
#[tokio::test]
async fn the_password_shows_in_no_error_and_no_log_line() {
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
        .with_ansi(false)
        .with_writer({
            let logs = logs.clone();
            move || logs.clone()
        })
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);

    let tls = TlsCluster::start().await;
    let ca = tls.ca.display().to_string();
    let mut errors = Vec::new();

    // A relay that runs, loses its connections and gets them back.
    let query = format!("sslmode=verify-full&sslrootcert={ca}");
    let relay = tls.relay(tls.url("localhost", &query)).await;
    tls.assert_streams(&relay, "before").await;
    let admin = connect(&tls.cluster.url("postgres")).await;
    let terminate = admin.batch_execute(
        "select pg_terminate_backend(pid) from pg_stat_activity
          where datname = 'tls' and application_name like 'pgrelay%'",
    );
    within(STEP, terminate).await.unwrap();
    tls.assert_streams(&relay, "after").await;
    relay.stop().await.unwrap();

    // Relays that refuse to start, for every kind of reason.
    let refused = [
        tls.url(
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={}", tls.other_ca.display()),
        ),
        tls.url(
            "127.0.0.1",
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ),
        tls.url(
            "localhost",
            "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        ),
        tls.url("localhost", "sslmode=sometimes"),
        format!("postgres://postgres:{PASSWORD}@localhost:notaport/tls"),
    ];
    for url in refused {
        errors.push(tls.refusal(url).await);
    }
    // A database that is not there (yet) is waited for, with a warning per attempt.
    let waiting = Relay::spawn_with(&tls.db, &["items"], |c| {
        c.database_url =
            format!("host=localhost port=1 user=postgres password={PASSWORD} dbname=tls")
    })
    .await;
    within(STEP, async {
        while !logs.text().contains("the database is not reachable yet") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    waiting.stop().await.unwrap();

    // The binary, logging everything, prints why it stops.
    let url = tls.url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", tls.other_ca.display()),
    );
    let output = within(
        STEP,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"))
            .args(["serve", "--tables", "items", "--listen", "127.0.0.1:0"])
            .env("DATABASE_URL", &url)
            .env("RUST_LOG", "trace")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        stderr.contains("the server's certificate is not signed by a trusted root"),
        "{stderr}"
    );
    errors.push(stderr);

    for error in &errors {
        assert!(!error.contains(PASSWORD), "the password shows in: {error}");
    }
    let logs = logs.text();
    assert!(logs.contains("serving"), "the relay's logs were captured");
    assert!(
        !logs.contains(PASSWORD),
        "the password shows in the logs:\n{logs}"
    );
}

/// A certificate for `localhost` from a fresh CA, in files of a directory of the test's own
/// (removed on drop), and a client that trusts that CA.
struct ListenerCert {
    dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    client: TlsConnector,
}

impl ListenerCert {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "pgrelay-listener-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = Ca::new("pgrelay listener test CA");
        let (cert_pem, key_pem) = ca.issue(&["localhost"]);
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert.der().clone()).unwrap();
        ListenerCert {
            dir,
            cert,
            key,
            client: client(roots),
        }
    }

    fn configure(&self, config: &mut pgrelay::Config) {
        config.tls_cert = Some(self.cert.clone());
        config.tls_key = Some(self.key.clone());
    }
}

impl Drop for ListenerCert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn client(roots: rustls::RootCertStore) -> TlsConnector {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// A TLS connection to `addr` as `localhost`.
async fn tls_connect(
    client: &TlsConnector,
    addr: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    client.connect(name, tcp).await
}

/// GET over HTTPS: (status, body).
async fn https_get(
    client: &TlsConnector,
    addr: SocketAddr,
    path: &str,
) -> std::io::Result<(u16, String)> {
    let mut stream = tls_connect(client, addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    match stream.read_to_end(&mut response).await {
        Ok(_) => {}
        // A server that closes without close_notify: what came before is the answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
        Err(e) => return Err(e),
    }
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, body.to_owned()))
}

/// Waits until `/readyz` answers 200 over HTTPS.
async fn wait_ready_https(client: &TlsConnector, addr: SocketAddr) {
    within(Duration::from_secs(30), async {
        while !matches!(https_get(client, addr, "/readyz").await, Ok((200, _))) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_serves_https_and_wss_and_answers_plain_http_with_a_400() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let cert = ListenerCert::new();
    let relay = Relay::spawn_with(&db, &["items"], |c| cert.configure(c)).await;
    let addr = relay.addr;
    wait_ready_https(&cert.client, addr).await;

    let (status, body) = within(STEP, https_get(&cert.client, addr, "/healthz"))
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));

    let stream = within(STEP, tls_connect(&cert.client, addr)).await.unwrap();
    let url = format!("wss://localhost:{}/ws/items", addr.port());
    let (mut ws, _) = within(STEP, tokio_tungstenite::client_async(url.as_str(), stream))
        .await
        .unwrap();
    db.exec("insert into items(name) values ('over wss')").await;
    let event = within(STEP, async {
        loop {
            if let Some(Ok(Message::Text(text))) = ws.next().await {
                return serde_json::from_str::<serde_json::Value>(text.as_str()).unwrap();
            }
        }
    })
    .await;
    assert_eq!(event["data"]["name"], "over wss");

    // Plain HTTP and ws:// get a 400 that says what to use; the relay goes on.
    let (status, body) = within(STEP, http_get(addr, "/healthz")).await.unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("https://"), "{body}");
    let plain = format!("ws://{addr}/ws/items");
    let err = within(STEP, tokio_tungstenite::connect_async(plain.as_str()))
        .await
        .expect_err("no plain upgrade");
    assert!(err.to_string().contains("400"), "{err}");
    // A client that does not trust the CA refuses the certificate.
    let stranger = client(rustls::RootCertStore::empty());
    assert!(within(STEP, tls_connect(&stranger, addr)).await.is_err());
    let (status, _) = within(STEP, https_get(&cert.client, addr, "/healthz"))
        .await
        .unwrap();
    assert_eq!(status, 200);

    // Shutdown closes the secure socket with 1001 and returns.
    relay.stop().await.unwrap();
    let close = within(STEP, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                other => panic!("no close frame: {other:?}"),
            }
        }
    })
    .await;
    assert_eq!(close, Some(1001));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_tls_from_its_flags_and_wants_both() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let cert = ListenerCert::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let serve = |extra: &[&str]| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"));
        command
            .args(["serve", "--tables", "items", "--listen", &listen])
            .args(extra)
            .env("DATABASE_URL", &db.url)
            .kill_on_drop(true);
        command
    };
    let cert_file = cert.cert.to_str().unwrap();
    let key_file = cert.key.to_str().unwrap();

    let output = within(STEP, serve(&["--tls-cert", cert_file]).output())
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--tls-key"), "{stderr}");

    let mut child = serve(&[])
        .env("PGRELAY_TLS_CERT", cert_file)
        .env("PGRELAY_TLS_KEY", key_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr: SocketAddr = listen.parse().unwrap();
    wait_ready_https(&cert.client, addr).await;
    let (status, _) = within(STEP, https_get(&cert.client, addr, "/healthz"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    child.kill().await.unwrap();
}
