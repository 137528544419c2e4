//! Runtime configuration of `pgrelay serve`, validated before anything starts.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A table to expose: `items` means `public.items`, `shop.orders` names the schema.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableName {
    /// Schema name, exactly as in the catalog.
    pub schema: String,
    /// Table name, exactly as in the catalog.
    pub table: String,
}

impl TableName {
    /// Parses `table` or `schema.table`.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let text = text.trim();
        let (schema, table) = match text.split_once('.') {
            Some((schema, table)) => (schema, table),
            None => ("public", text),
        };
        if schema.is_empty() || table.is_empty() {
            return Err(ConfigError::BadTable(text.to_owned()));
        }
        Ok(TableName {
            schema: schema.to_owned(),
            table: table.to_owned(),
        })
    }

    /// The subscriber-facing name (`items`, or `shop.orders`).
    pub fn resource(&self) -> String {
        crate::event::resource_name(&self.schema, &self.table)
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// PostgreSQL connection string (key=value or URL).
    pub database_url: String,
    /// Tables to expose.
    pub tables: Vec<TableName>,
    /// Install capture for `tables` at start.
    pub install: bool,
    /// How often the server pings each WebSocket.
    pub ping_interval: Duration,
    /// A WebSocket silent for this long is closed.
    pub ping_timeout: Duration,
    /// Largest client frame/message accepted, in bytes.
    pub max_client_frame: usize,
    /// Per-connection queue limit in bytes of encoded frames (slow consumer past it).
    pub queue_bytes: u64,
    /// Events kept per table for resume and for subscribers catching up.
    pub history_events: usize,
    /// Bytes of encoded frames kept per table.
    pub history_bytes: usize,
    /// Rows per `initial` message.
    pub snapshot_batch_rows: usize,
    /// Size of the query pool (snapshots, REST).
    pub pool_size: usize,
    /// How long a request waits for a free pooled connection before it gets a 503.
    pub pool_wait_timeout: Duration,
    /// How long opening (or checking) a pooled connection may take before the request gets a
    /// 503: a database that is down answers quickly instead of hanging.
    pub pool_connect_timeout: Duration,
    /// Largest REST request body, in bytes (413 past it).
    pub max_body_bytes: u64,
    /// How capture learns of commits: NOTIFY wake-ups, or polling alone.
    pub capture_mode: crate::capture::Mode,
    /// How often capture reports its progress (`pgrelay status`, retention) and checks its
    /// horizon.
    pub report_interval: Duration,
    /// Shortest wait between polls in poll mode.
    pub poll_min: Duration,
    /// Longest wait between polls: poll mode when idle, and notify mode's safety net.
    pub poll_max: Duration,
    /// Notify mode: notifications per second past which a sleeping relay lets writers skip
    /// NOTIFY and polls until the writes pause (0: never).
    pub notify_busy_rate: u64,
    /// How often the schema watcher reads the catalog.
    pub schema_interval: Duration,
    /// Longest wait between reconnect attempts.
    pub max_backoff: Duration,
    /// How long shutdown waits for tasks before giving up.
    pub shutdown_timeout: Duration,
    /// How much of `pgrelay.changes` to keep.
    pub retention: crate::retention::Retention,
    /// How callers authenticate (none by default).
    pub auth: crate::access::AuthConfig,
    /// What each role may do with each table (everything, when there is no policy).
    pub policies: crate::access::Policies,
    /// Serve without authentication on an address other than loopback.
    pub allow_anonymous: bool,
    /// Run REST requests as the caller's database role, with `request.jwt.claims` set.
    pub rest_set_role: bool,
    /// Let `PATCH`/`DELETE /api/{table}` without a filter touch every row (refused by
    /// default, as pg-safeupdate refuses them for PostgREST).
    pub rest_allow_unfiltered_writes: bool,
    /// What one client may take.
    pub limits: Limits,
    /// Web pages (origins) allowed besides the relay's own.
    pub origins: crate::http::origin::Origins,
    /// `Host` names the relay answers to besides the loopback ones (`*` for any); checked
    /// on a loopback listener always, on others once set. See [`crate::http::host`].
    pub allowed_hosts: Vec<String>,
    /// PEM certificate chain the listener serves HTTPS and WSS with (with `tls_key`); plain
    /// HTTP when neither is set.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

/// What one client may take; each limit trips with a clear error (see the README).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Most open connections; also kept below the file descriptor limit.
    pub max_connections: usize,
    /// Most open connections from one client address.
    pub max_connections_per_ip: usize,
    /// Most subscriptions on one socket.
    pub max_subscriptions: usize,
    /// Client messages per second on one socket (bursts of twice as many pass).
    pub max_message_rate: u32,
    /// Most conditions in one filter.
    pub max_filter_conditions: usize,
    /// Most values in one `in` list.
    pub max_in_values: usize,
    /// Longest `like` pattern, in characters.
    pub max_pattern_length: usize,
    /// Most wildcards in one pattern.
    pub max_pattern_wildcards: usize,
    /// Initial-data reads running at once.
    pub max_snapshots: usize,
    /// How long one subscriber's initial data may take.
    pub snapshot_deadline: Duration,
    /// Most rows one REST read returns (PostgREST's `db-max-rows`); `None`: no cap, as
    /// PostgREST. A capped read says so in `Content-Range` and with 206.
    pub max_rows: Option<i64>,
    /// How long a client may take to send a request's headers.
    pub header_timeout: Duration,
    /// How long a client may take to send a request's body.
    pub body_timeout: Duration,
}

impl Limits {
    /// The defaults, for a query pool of `pool_size` connections.
    pub fn for_pool(pool_size: usize) -> Limits {
        Limits {
            max_connections: 10_000,
            max_connections_per_ip: 1000,
            max_subscriptions: 100,
            max_message_rate: 100,
            max_filter_conditions: 32,
            max_in_values: 1000,
            max_pattern_length: 256,
            max_pattern_wildcards: 16,
            max_snapshots: (pool_size / 2).max(1),
            snapshot_deadline: Duration::from_secs(120),
            max_rows: None,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
        }
    }

    /// The filter limits, for [`crate::filter`].
    pub fn filter(&self) -> crate::filter::FilterLimits {
        crate::filter::FilterLimits {
            max_conditions: self.max_filter_conditions,
            max_in_values: self.max_in_values,
            max_pattern_length: self.max_pattern_length,
            max_pattern_wildcards: self.max_pattern_wildcards,
        }
    }
}

impl Config {
    /// A config with the documented defaults.
    pub fn new(database_url: impl Into<String>, tables: Vec<TableName>) -> Self {
        Config {
            database_url: database_url.into(),
            tables,
            install: false,
            ping_interval: Duration::from_secs(15),
            ping_timeout: Duration::from_secs(45),
            max_client_frame: 64 * 1024,
            queue_bytes: 8 * 1024 * 1024,
            history_events: 250_000,
            history_bytes: 64 * 1024 * 1024,
            snapshot_batch_rows: 1000,
            pool_size: 16,
            pool_wait_timeout: Duration::from_secs(5),
            pool_connect_timeout: Duration::from_secs(5),
            max_body_bytes: 1024 * 1024,
            capture_mode: crate::capture::Mode::Notify,
            report_interval: Duration::from_secs(1),
            poll_min: Duration::from_millis(1),
            poll_max: Duration::from_millis(500),
            notify_busy_rate: 1500,
            schema_interval: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(5),
            retention: crate::retention::Retention {
                max_age: Some(Duration::from_secs(24 * 3600)),
                max_rows: None,
                interval: Duration::from_secs(60),
            },
            auth: crate::access::AuthConfig::default(),
            policies: crate::access::Policies::default(),
            allow_anonymous: false,
            rest_set_role: false,
            rest_allow_unfiltered_writes: false,
            limits: Limits::for_pool(16),
            origins: crate::http::origin::Origins::default(),
            allowed_hosts: Vec::new(),
            tls_cert: None,
            tls_key: None,
        }
    }

    /// The listener's TLS settings, read from `tls_cert` and `tls_key`; `None` for plain HTTP.
    pub fn listener_tls(&self) -> Result<Option<Arc<rustls::ServerConfig>>, ConfigError> {
        match (&self.tls_cert, &self.tls_key) {
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => crate::tls::server_config(cert, key)
                .map(Some)
                .map_err(ConfigError::ListenerTls),
            _ => Err(ConfigError::Invalid(
                "--tls-cert and --tls-key go together: give both or neither",
            )),
        }
    }

    /// Checks the values that would otherwise fail later and less clearly.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.tables.is_empty() {
            return Err(ConfigError::NoTables);
        }
        if let Err(err) = crate::tls::target(&self.database_url) {
            return Err(ConfigError::BadDatabaseUrl(crate::error::chain(&err)));
        }
        if self.ping_timeout <= self.ping_interval {
            return Err(ConfigError::Invalid(
                "the ping timeout must be longer than the ping interval",
            ));
        }
        if self.snapshot_batch_rows == 0 || self.pool_size == 0 || self.history_events == 0 {
            return Err(ConfigError::Invalid(
                "snapshot batch rows, pool size and history events must be positive",
            ));
        }
        if self.max_body_bytes == 0
            || self.pool_wait_timeout.is_zero()
            || self.pool_connect_timeout.is_zero()
        {
            return Err(ConfigError::Invalid(
                "the body limit and the pool timeouts must be positive",
            ));
        }
        if self.ping_interval.is_zero() {
            return Err(ConfigError::Invalid("the ping interval must be positive"));
        }
        if self.poll_min.is_zero() || self.poll_max < self.poll_min {
            return Err(ConfigError::Invalid(
                "the poll intervals must be positive, the longest at least the shortest",
            ));
        }
        let l = &self.limits;
        if l.max_connections == 0
            || l.max_connections_per_ip == 0
            || l.max_subscriptions == 0
            || l.max_message_rate == 0
            || l.max_snapshots == 0
            || l.max_rows.is_some_and(|m| m <= 0)
            || l.snapshot_deadline.is_zero()
            || l.header_timeout.is_zero()
            || l.body_timeout.is_zero()
        {
            return Err(ConfigError::Invalid(
                "connection, subscription, message rate, snapshot and row limits and the timeouts must be positive",
            ));
        }
        if self.report_interval.is_zero() || self.schema_interval.is_zero() {
            return Err(ConfigError::Invalid(
                "the report and schema check intervals must be positive",
            ));
        }
        crate::http::host::Hosts::new(true, &self.allowed_hosts)
            .map_err(|m| ConfigError::Option("allowed_hosts", m))?;
        self.listener_tls()?;
        Ok(())
    }
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No table to expose.
    #[error("No tables to expose: pass --tables items,orders (or set PGRELAY_TABLES)")]
    NoTables,
    /// A table name that is not `table` or `schema.table`.
    #[error("Table name {0:?} is not `table` or `schema.table`")]
    BadTable(String),
    /// The database URL does not parse, or its TLS settings cannot be used.
    #[error("Bad --database-url: {0}")]
    BadDatabaseUrl(String),
    /// Some other value is out of range.
    #[error("Invalid configuration: {0}")]
    Invalid(&'static str),
    /// The settings file cannot be read or parsed.
    #[error("Settings file {0}")]
    File(String),
    /// An option's value is wrong (the message never holds a secret).
    #[error("Invalid setting {0}: {1}")]
    Option(&'static str, String),
    /// The JWT key source cannot be read or used (the message names the file, never a key).
    #[error("Cannot load the JWT keys: {0}")]
    Keys(String),
    /// A `[[policy]]` is wrong.
    #[error("Invalid {0}")]
    Policy(String),
    /// Authentication is off on an address others can reach.
    #[error(
        "Refusing to serve {0} without authentication: configure [auth] (or --jwt-secret-file, --jwks-file), listen on 127.0.0.1, or pass --allow-anonymous"
    )]
    AnonymousExposed(std::net::SocketAddr),
    /// The listener's certificate or key cannot be read or used.
    #[error("Bad --tls-cert/--tls-key: {0}")]
    ListenerTls(#[source] crate::tls::TlsError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_default_to_public() {
        let t = TableName::parse("items").unwrap();
        assert_eq!((t.schema.as_str(), t.table.as_str()), ("public", "items"));
        assert_eq!(t.resource(), "items");
        let t = TableName::parse("shop.orders").unwrap();
        assert_eq!(t.resource(), "shop.orders");
        assert!(TableName::parse(".x").is_err());
        assert!(TableName::parse("").is_err());
    }

    #[test]
    fn validate_rejects_what_cannot_work() {
        let ok = Config::new(
            "postgres://u@h/db",
            vec![TableName::parse("items").unwrap()],
        );
        assert!(ok.validate().is_ok());
        assert!(
            Config {
                tables: vec![],
                ..ok.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            Config {
                database_url: "postgres://h:notaport/x".into(),
                ..ok.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            Config {
                ping_timeout: ok.ping_interval,
                ..ok.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            Config {
                max_body_bytes: 0,
                ..ok.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            Config {
                tls_cert: Some("/etc/pgrelay/cert.pem".into()),
                ..ok.clone()
            }
            .validate()
            .is_err()
        );
        let unreadable = Config {
            tls_cert: Some("/nonexistent/cert.pem".into()),
            tls_key: Some("/nonexistent/key.pem".into()),
            ..ok
        };
        assert!(matches!(
            unreadable.validate(),
            Err(ConfigError::ListenerTls(crate::tls::TlsError::File { .. }))
        ));
    }
}
