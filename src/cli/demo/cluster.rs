//! The throwaway cluster: PostgreSQL's server binaries found, initdb in a temporary
//! directory, a server on a free loopback port, and all of it removed again.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use pgrelay::error::chain;
use pgrelay::sql::quote_ident;

use super::{DEMO_ROLE, connect, say};

/// A PostgreSQL cluster in a temporary directory, stopped and deleted when dropped.
pub(super) struct Throwaway {
    /// The temporary directory: `data/`, `server.log`, the Unix socket.
    pub(super) dir: PathBuf,
    /// Where initdb, pg_ctl and postgres are.
    pub(super) bindir: PathBuf,
    /// The server's port on 127.0.0.1.
    pub(super) port: u16,
    /// Running as root: the tools run as the `postgres` user (initdb refuses root).
    as_postgres: bool,
    /// "PostgreSQL 15.4", for messages.
    pub(super) version: String,
    /// Set once stopped and deleted: [`Drop`] has nothing left to do.
    removed: bool,
}

impl Throwaway {
    /// initdb in a new temporary directory, then pg_ctl start on a free port (loopback and a
    /// socket in the directory only), then the demo's role and database.
    pub(super) async fn start(bindir: PathBuf) -> anyhow::Result<Self> {
        let as_postgres = is_root();
        if as_postgres {
            ensure_postgres_user()?;
        }
        let version = server_version(&bindir);
        let dir = make_temp_dir()?;
        // From here on, dropping `cluster` stops the server and removes `dir`.
        let mut cluster = Throwaway {
            dir,
            bindir,
            port: 0,
            as_postgres,
            version,
            removed: false,
        };
        if as_postgres {
            let status = std::process::Command::new("chown")
                .arg("postgres")
                .arg(&cluster.dir)
                .status()
                .context("running chown")?;
            if !status.success() {
                bail!("chown postgres {} failed", cluster.dir.display());
            }
        }
        let data = cluster.data();
        cluster
            .run_tool(
                "initdb",
                &[
                    "-D".as_ref(),
                    data.as_os_str(),
                    "-U".as_ref(),
                    "postgres".as_ref(),
                    "-A".as_ref(),
                    "trust".as_ref(),
                    "-E".as_ref(),
                    "UTF8".as_ref(),
                    "--no-locale".as_ref(),
                    "--no-sync".as_ref(),
                ],
            )
            .await?;
        cluster.configure()?;
        cluster.start_server().await?;
        cluster.bootstrap().await?;
        Ok(cluster)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// A connection string for `user` on `dbname`.
    pub(super) fn url(&self, user: &str, dbname: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{dbname}", self.port)
    }

    /// A server tool, run as the cluster's owner.
    fn tool(&self, name: &str) -> std::process::Command {
        let path = self.bindir.join(name);
        if self.as_postgres {
            let mut command = std::process::Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            std::process::Command::new(path)
        }
    }

    async fn run_tool(&self, name: &str, args: &[&std::ffi::OsStr]) -> anyhow::Result<()> {
        let mut command = tokio::process::Command::from(self.tool(name));
        let out = command
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .with_context(|| format!("running {}", self.bindir.join(name).display()))?;
        if !out.status.success() {
            bail!(
                "{name} failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Loopback only, the socket in the temporary directory (not the system's, which may not
    /// exist or be writable), and no fsync: nothing here is worth keeping.
    fn configure(&self) -> anyhow::Result<()> {
        use std::io::Write;
        let socket_dir = self.dir.display().to_string().replace('\'', "''");
        let path = self.data().join("postgresql.conf");
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        write!(
            conf,
            "\n# pgrelay demo\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{socket_dir}'\nfsync = off\n"
        )
        .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// `pg_ctl start -w` on a free port; another port if that one was taken in between.
    async fn start_server(&mut self) -> anyhow::Result<()> {
        let data = self.data();
        let log = self.log();
        for _attempt in 0..3 {
            self.port = free_port()?;
            let options = format!("-p {}", self.port);
            let logged_before = std::fs::metadata(&log).map_or(0, |m| m.len());
            let started = self
                .run_tool(
                    "pg_ctl",
                    &[
                        "-D".as_ref(),
                        data.as_os_str(),
                        "-l".as_ref(),
                        log.as_os_str(),
                        "-w".as_ref(),
                        "-t".as_ref(),
                        "60".as_ref(),
                        "-o".as_ref(),
                        options.as_ref(),
                        "start".as_ref(),
                    ],
                )
                .await;
            let Err(err) = started else {
                return Ok(());
            };
            let logged = std::fs::read(&log).unwrap_or_default();
            let logged =
                String::from_utf8_lossy(logged.get(logged_before as usize..).unwrap_or_default())
                    .into_owned();
            if !logged.contains("already in use") {
                bail!("{err:#}\nserver log ({}):\n{logged}", log.display());
            }
        }
        bail!("PostgreSQL could not get a free port in three tries")
    }

    /// The demo's role (not a superuser, a member of `pgrelay_capture` as the README's least
    /// privilege section has it) and its database.
    async fn bootstrap(&self) -> anyhow::Result<()> {
        let admin = connect(&self.url("postgres", "postgres")).await?;
        let role = quote_ident(DEMO_ROLE);
        let statements = [
            "create role pgrelay_capture nologin noinherit".to_owned(),
            format!("create role {role} login"),
            format!("grant pgrelay_capture to {role}"),
            // Its owner may create schemas in it (capture's `pgrelay`) and, as the owner of
            // schema public (PostgreSQL 15+; earlier, everyone may), the demo table.
            format!("create database {role} owner {role}"),
        ];
        for statement in statements {
            admin.batch_execute(&statement).await.map_err(|err| {
                anyhow::anyhow!(
                    "Cannot set up the throwaway cluster: {statement}: {}",
                    chain(&err)
                )
            })?;
        }
        Ok(())
    }

    /// Stops the server (immediate: nothing to keep) and deletes the directory. Idempotent.
    pub(super) fn remove(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        let pid = self.postmaster_pid();
        let data = self.data();
        let stopped = self
            .tool("pg_ctl")
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !stopped && let Some(pid) = pid {
            // pg_ctl could not do it (or there was no server): SIGQUIT is the postmaster's
            // immediate shutdown too.
            let _ = std::process::Command::new("kill")
                .args(["-QUIT", &pid.to_string()])
                .stderr(std::process::Stdio::null())
                .status();
        }
        if let Err(err) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %err, "cannot remove the throwaway cluster's directory");
        }
    }

    /// The postmaster's pid, from `postmaster.pid`.
    fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }
}

impl Drop for Throwaway {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Whether this process runs as root (initdb refuses to).
fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Creates the `postgres` system user when it is missing (as scripts/test.sh does).
fn ensure_postgres_user() -> anyhow::Result<()> {
    let exists = std::process::Command::new("id")
        .arg("postgres")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if exists {
        return Ok(());
    }
    say(
        "pgrelay demo: running as root, and initdb refuses root: creating the system user postgres",
    );
    let status = std::process::Command::new("useradd")
        .args(["--system", "--no-create-home", "postgres"])
        .status()
        .context("running useradd")?;
    if !status.success() {
        bail!(
            "initdb refuses to run as root, and creating a `postgres` user failed: run the demo as another user, or pass --database-url"
        );
    }
    Ok(())
}

/// "PostgreSQL 15.4", from `postgres --version` (just "PostgreSQL" if that fails).
fn server_version(bindir: &Path) -> String {
    std::process::Command::new(bindir.join("postgres"))
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let version = text
                .split("(PostgreSQL)")
                .nth(1)?
                .split_whitespace()
                .next()?
                .to_owned();
            Some(format!("PostgreSQL {version}"))
        })
        .unwrap_or_else(|| "PostgreSQL".to_owned())
}

/// A new directory `pgrelay-demo-XXXXXXXX` in the system's temporary directory, private.
fn make_temp_dir() -> anyhow::Result<PathBuf> {
    let base = std::env::temp_dir();
    for _ in 0..16 {
        let dir = base.join(format!("pgrelay-demo-{:08x}", rand::random::<u32>()));
        let mut builder = std::fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        match builder.create(&dir) {
            Ok(()) => return Ok(dir),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(err) => {
                return Err(err)
                    .with_context(|| format!("creating a directory in {}", base.display()));
            }
        }
    }
    bail!("cannot find a free directory name in {}", base.display())
}

/// A port on 127.0.0.1 that nobody listens on right now.
fn free_port() -> anyhow::Result<u16> {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(probe.local_addr()?.port())
}

/// Whether `dir` holds the server binaries the demo runs.
fn has_server_tools(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|tool| dir.join(tool).is_file())
}

/// `name` in a directory of PATH.
pub(super) fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// `dir/*/bin` (or `dir-*/bin` with `prefix`), newest version first: `/usr/lib/postgresql/15/bin`.
fn versioned_bindirs(parent: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut found: Vec<(Vec<u32>, PathBuf)> = entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let name = entry.file_name().into_string().ok()?;
            let version = name
                .strip_prefix(prefix)?
                .split('.')
                .map(|part| part.parse().ok())
                .collect::<Option<Vec<u32>>>()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    found.sort_by(|a, b| b.0.cmp(&a.0));
    found.into_iter().map(|(_, dir)| dir).collect()
}

/// The PostgreSQL server binaries: `--pgbin`, else the first of `pg_config --bindir`,
/// `initdb` on PATH (symlinks followed), the newest `/usr/lib/postgresql/*/bin` (Debian,
/// Ubuntu) or `/usr/pgsql-*/bin` (PGDG RPMs), `/usr/local/pgsql/bin` (a source build).
pub(super) fn find_bindir(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = explicit {
        if has_server_tools(dir) {
            return Ok(dir.to_owned());
        }
        bail!(
            "--pgbin {}: no initdb, pg_ctl and postgres there; give the directory of PostgreSQL's server binaries (Debian, Ubuntu: /usr/lib/postgresql/<version>/bin)",
            dir.display()
        );
    }
    let mut candidates = Vec::new();
    if let Ok(out) = std::process::Command::new("pg_config")
        .arg("--bindir")
        .stderr(std::process::Stdio::null())
        .output()
        && out.status.success()
    {
        candidates.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    if let Some(initdb) = on_path("initdb") {
        let initdb = std::fs::canonicalize(&initdb).unwrap_or(initdb);
        candidates.extend(initdb.parent().map(Path::to_path_buf));
    }
    candidates.extend(versioned_bindirs(Path::new("/usr/lib/postgresql"), ""));
    candidates.extend(versioned_bindirs(Path::new("/usr"), "pgsql-"));
    candidates.push(PathBuf::from("/usr/local/pgsql/bin"));
    candidates
        .into_iter()
        .find(|dir| has_server_tools(dir))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "No PostgreSQL server binaries found (initdb, pg_ctl, postgres): looked at `pg_config --bindir`, PATH, /usr/lib/postgresql/*/bin, /usr/pgsql-*/bin and /usr/local/pgsql/bin.\n\
                 Install PostgreSQL's server (Debian, Ubuntu: apt-get install postgresql; Fedora: dnf install postgresql-server; macOS: brew install postgresql), \
                 or pass --pgbin DIR (the directory that holds initdb), \
                 or use a database you have with --database-url URL."
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindirs_are_found_newest_version_first() {
        let base = std::env::temp_dir().join(format!("pgrelay-bindirs-{}", rand::random::<u32>()));
        for version in ["9.6", "13", "15", "notaversion"] {
            std::fs::create_dir_all(base.join(version).join("bin")).expect("temp dir is writable");
        }
        let found = versioned_bindirs(&base, "");
        let _ = std::fs::remove_dir_all(&base);
        assert_eq!(
            found,
            ["15", "13", "9.6"]
                .iter()
                .map(|v| base.join(v).join("bin"))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_pgbin_without_initdb_is_refused_with_what_to_do() {
        let err = find_bindir(Some(Path::new("/nonexistent"))).expect_err("no binaries there");
        assert!(err.to_string().contains("--pgbin /nonexistent"), "{err}");
    }
}
