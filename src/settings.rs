//! `serve`'s settings as given: command-line flags, environment variables and a TOML file,
//! layered (flag > environment > file > default) into a checked [`Config`].
//!
//! One struct serves both sources: clap fills it from flags and environment, serde from the
//! file (the same names, snake_case; `[auth]`, `[[auth.api_keys]]`, `[[policy]]` and
//! `[limits]` exist only in the file or, for the common cases, as flags). Every field is
//! optional, so a layer says only what it sets. Errors name the option, never a secret's value.

// The fields' doc comments are also `--help` texts, where `[default: …]` says a default
// (as clap's own do): rustdoc must not read it as a link.
#![allow(rustdoc::broken_intra_doc_links)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::access::auth::{self, ApiKey, AuthConfig, JwtConfig, KeySource, Secret};
use crate::access::policy::{Policies, Policy, PolicySetting};
use crate::config::{Config, ConfigError, Limits, TableName};

/// Everything `serve` can be told.
#[derive(Debug, Clone, Default, Args, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// A TOML file with any of these settings (flags and environment override it).
    #[arg(long, env = "PGRELAY_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Print the settings in effect (secrets redacted) as TOML and exit.
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
    /// PostgreSQL connection string [default: postgres://postgres@127.0.0.1:5432/postgres].
    #[arg(long, env = "DATABASE_URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "PGRELAY_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Tables to expose, comma separated: `items,shop.orders`.
    #[arg(long, env = "PGRELAY_TABLES", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tables: Option<Vec<String>>,
    /// Install capture for the tables at start (idempotent), and again if its triggers go
    /// missing while the relay runs.
    #[arg(long, env = "PGRELAY_INSTALL", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub install: Option<bool>,
    /// How capture learns of commits: `notify` (wake-ups from the triggers' NOTIFY) or `poll`
    /// (poll the log; use with triggers installed with `--capture poll`) [default: notify].
    #[arg(long, env = "PGRELAY_CAPTURE", value_parser = ["notify", "poll"])]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capture: Option<String>,
    /// Longest wait between polls of the log, in milliseconds (poll mode when idle; in notify
    /// mode, the safety net for a missed wake-up) [default: 500].
    #[arg(long, env = "PGRELAY_POLL_MAX_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub poll_max_ms: Option<u64>,
    /// Notify mode: notifications per second past which a sleeping relay stops asking writers
    /// to NOTIFY (their commits then skip NOTIFY's cluster-wide lock) and polls until the
    /// writes pause; 0 never [default: 1500].
    #[arg(long, env = "PGRELAY_NOTIFY_BUSY_RATE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notify_busy_rate: Option<u64>,
    /// Milliseconds between checks of the exposed tables' catalog entries [default: 1000].
    #[arg(long, env = "PGRELAY_SCHEMA_INTERVAL_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema_interval_ms: Option<u64>,
    /// Seconds between server pings [default: 15].
    #[arg(long, env = "PGRELAY_PING_INTERVAL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ping_interval: Option<u64>,
    /// Seconds of silence after which a socket is closed [default: 45].
    #[arg(long, env = "PGRELAY_PING_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ping_timeout: Option<u64>,
    /// Largest client frame, in bytes [default: 65536].
    #[arg(long, env = "PGRELAY_MAX_FRAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_frame: Option<usize>,
    /// Per-connection queue limit in bytes; a subscriber further behind is closed with 4008
    /// [default: 8388608].
    #[arg(long, env = "PGRELAY_QUEUE_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_bytes: Option<u64>,
    /// Events kept per table for catching up [default: 250000].
    #[arg(long, env = "PGRELAY_HISTORY_EVENTS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history_events: Option<usize>,
    /// Bytes kept per table for catching up [default: 67108864].
    #[arg(long, env = "PGRELAY_HISTORY_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history_bytes: Option<usize>,
    /// Query pool size (initial data, REST) [default: 16].
    #[arg(long, env = "PGRELAY_POOL_SIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_size: Option<usize>,
    /// Seconds a request waits for a free pooled connection before answering 503 [default: 5].
    #[arg(long, env = "PGRELAY_POOL_WAIT_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_wait_timeout: Option<u64>,
    /// Seconds opening a pooled connection may take before the request answers 503
    /// [default: 5].
    #[arg(long, env = "PGRELAY_POOL_CONNECT_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_connect_timeout: Option<u64>,
    /// Largest REST request body, in bytes; larger gets 413 [default: 1048576].
    #[arg(long, env = "PGRELAY_MAX_BODY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body: Option<u64>,
    /// Prune log events older than this many seconds (0: never by age) [default: 86400].
    #[arg(long, env = "PGRELAY_RETENTION_SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention_secs: Option<u64>,
    /// Keep at most this many log events (the newest).
    #[arg(long, env = "PGRELAY_RETENTION_ROWS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention_rows: Option<i64>,
    /// Serve without authentication on an address other than loopback.
    #[arg(long, env = "PGRELAY_ALLOW_ANONYMOUS", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_anonymous: Option<bool>,
    /// Run each REST request as the caller's database role (`SET LOCAL ROLE`, with
    /// `request.jwt.claims` set), so the database's grants and row-level security apply.
    #[arg(long, env = "PGRELAY_REST_SET_ROLE", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rest_set_role: Option<bool>,
    /// Let `PATCH` and `DELETE /api/{table}` without any filter change every row (refused
    /// by default with 400, code 21000).
    #[arg(long, env = "PGRELAY_REST_ALLOW_UNFILTERED_WRITES", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rest_allow_unfiltered_writes: Option<bool>,
    /// Web pages allowed to use the relay from a browser besides its own origin, comma
    /// separated (`https://app.example,http://localhost:3000`; `*` for any).
    #[arg(long, env = "PGRELAY_ALLOWED_ORIGINS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_origins: Option<Vec<String>>,
    /// Host names the relay answers to besides `localhost`, `127.0.0.1` and `[::1]`, comma
    /// separated (`relay.test`, `relay.test:8080`; `*` for any); other names get 421 (DNS
    /// rebinding). Checked on a loopback listener always, on others once this is set.
    #[arg(long, env = "PGRELAY_ALLOWED_HOSTS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_hosts: Option<Vec<String>>,
    /// Serve HTTPS and WSS with this PEM certificate chain (needs --tls-key).
    #[arg(long, env = "PGRELAY_TLS_CERT", requires = "tls_key")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "PGRELAY_TLS_KEY", requires = "tls_cert")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// Authentication.
    #[command(flatten)]
    #[serde(default)]
    pub auth: AuthSettings,
    /// Policies (file only): `[[policy]]`.
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy: Vec<PolicySetting>,
    /// Limits.
    #[command(flatten)]
    #[serde(default)]
    pub limits: LimitSettings,
}

/// `[auth]`.
#[derive(Debug, Clone, Default, Args, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// HMAC secret for HS256/384/512 JWTs (prefer --jwt-secret-file or the environment).
    #[arg(long, env = "PGRELAY_JWT_SECRET", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_secret: Option<String>,
    /// File holding the HMAC secret (reloaded when it changes, and on SIGHUP).
    #[arg(long, env = "PGRELAY_JWT_SECRET_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_secret_file: Option<PathBuf>,
    /// PEM public key for RS*/PS*/ES256/ES384/EdDSA JWTs.
    #[arg(long, env = "PGRELAY_JWT_PUBLIC_KEY_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// JWKS file (`{"keys":[…]}`), keys chosen by `kid` (reloaded when it changes, and on
    /// SIGHUP).
    #[arg(long, env = "PGRELAY_JWKS_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
    /// Accepted JWT algorithms, comma separated [default: every one of the key's family].
    #[arg(long, env = "PGRELAY_JWT_ALGORITHMS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_algorithms: Option<Vec<String>>,
    /// Accepted audiences (`aud`), comma separated.
    #[arg(long, env = "PGRELAY_JWT_AUDIENCE", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_audience: Option<Vec<String>>,
    /// Accepted issuers (`iss`), comma separated.
    #[arg(long, env = "PGRELAY_JWT_ISSUER", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_issuer: Option<Vec<String>>,
    /// Seconds of clock skew allowed on `exp` and `nbf` [default: 30].
    #[arg(long, env = "PGRELAY_JWT_LEEWAY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_leeway: Option<u64>,
    /// Refuse JWTs without `exp` [default: true].
    #[arg(long, env = "PGRELAY_JWT_REQUIRE_EXP", value_parser = clap::builder::BoolishValueParser::new())]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_require_exp: Option<bool>,
    /// The claim naming the caller's role, a dotted path [default: role].
    #[arg(long, env = "PGRELAY_ROLE_CLAIM")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role_claim: Option<String>,
    /// Role of a token without the role claim [default: authenticated].
    #[arg(long, env = "PGRELAY_DEFAULT_ROLE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_role: Option<String>,
    /// Role of requests without a token; without it they are refused when auth is on.
    #[arg(long, env = "PGRELAY_ANONYMOUS_ROLE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anonymous_role: Option<String>,
    /// Seconds a socket that connected without a token has to send its `auth` message
    /// [default: 10].
    #[arg(long, env = "PGRELAY_AUTH_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_timeout: Option<u64>,
    /// API keys (file only): `[[auth.api_keys]]` with `sha256`, `role`, `claims`.
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_keys: Vec<ApiKeySetting>,
}

/// `[[auth.api_keys]]`: a key is stored as its SHA-256 (`pgrelay api-key` makes one).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiKeySetting {
    /// SHA-256 of the key, 64 hex digits.
    pub sha256: String,
    /// The role the key acts as.
    pub role: String,
    /// Claims policies can bind to.
    #[serde(default)]
    pub claims: serde_json::Map<String, serde_json::Value>,
}

/// `[limits]`: what one client may take.
#[derive(Debug, Clone, Default, Args, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// Most open connections (HTTP and WebSocket); also kept below the process's file
    /// descriptor limit [default: 10000].
    #[arg(long, env = "PGRELAY_MAX_CONNECTIONS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Most open connections from one client address [default: 1000].
    #[arg(long, env = "PGRELAY_MAX_CONNECTIONS_PER_IP")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections_per_ip: Option<usize>,
    /// Most subscriptions on one socket [default: 100].
    #[arg(long, env = "PGRELAY_MAX_SUBSCRIPTIONS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_subscriptions: Option<usize>,
    /// Client messages per second on one socket (bursts of twice as many pass) [default: 100].
    #[arg(long, env = "PGRELAY_MAX_MESSAGE_RATE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_message_rate: Option<u32>,
    /// Most conditions in one filter [default: 32].
    #[arg(long, env = "PGRELAY_MAX_FILTER_CONDITIONS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_filter_conditions: Option<usize>,
    /// Most values in one `in` list [default: 1000].
    #[arg(long, env = "PGRELAY_MAX_IN_VALUES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_in_values: Option<usize>,
    /// Longest `like`/`ilike` pattern, in characters [default: 256].
    #[arg(long, env = "PGRELAY_MAX_PATTERN_LENGTH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_pattern_length: Option<usize>,
    /// Most wildcards (`*`, `%`, `_`) in one pattern [default: 16].
    #[arg(long, env = "PGRELAY_MAX_PATTERN_WILDCARDS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_pattern_wildcards: Option<usize>,
    /// Initial-data reads running at once; more wait for a turn [default: half the pool].
    #[arg(long, env = "PGRELAY_MAX_SNAPSHOTS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_snapshots: Option<usize>,
    /// Seconds one subscriber's initial data may take before it is closed (4008)
    /// [default: 120].
    #[arg(long, env = "PGRELAY_SNAPSHOT_DEADLINE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_deadline: Option<u64>,
    /// Most rows one REST read returns, as PostgREST's db-max-rows (0: no cap) [default: 0].
    #[arg(long, env = "PGRELAY_MAX_ROWS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rows: Option<i64>,
    /// Seconds a client has to send a request's headers [default: 10].
    #[arg(long, env = "PGRELAY_HEADER_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_timeout: Option<u64>,
    /// Seconds a client has to send a request's body [default: 30].
    #[arg(long, env = "PGRELAY_BODY_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_timeout: Option<u64>,
}

macro_rules! layer {
    ($top:expr, $under:expr; $($field:ident),* $(,)?) => {
        $( if $top.$field.is_none() { $top.$field = $under.$field.take(); } )*
    };
}

impl Settings {
    /// Reads a TOML settings file; errors name the file and the offending key.
    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::File(format!("cannot read {}: {e}", path.display())))?;
        Settings::from_toml(&text)
            .map_err(|e| ConfigError::File(format!("{}: {e}", path.display())))
    }

    /// Parses TOML settings.
    pub fn from_toml(text: &str) -> Result<Settings, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// These settings over `under`: what `self` leaves unset, `under` fills.
    pub fn over(mut self, mut under: Settings) -> Settings {
        layer!(self, under; database_url, listen, tables, install, capture, poll_max_ms,
            notify_busy_rate,
            schema_interval_ms, ping_interval, ping_timeout, max_frame, queue_bytes,
            history_events, history_bytes, pool_size, pool_wait_timeout, pool_connect_timeout,
            max_body, retention_secs, retention_rows, allow_anonymous, rest_set_role, rest_allow_unfiltered_writes, tls_cert,
            tls_key, allowed_origins, allowed_hosts);
        layer!(self.auth, under.auth; jwt_secret, jwt_secret_file, jwt_public_key_file,
            jwks_file, jwt_algorithms, jwt_audience, jwt_issuer, jwt_leeway, jwt_require_exp,
            role_claim, default_role, anonymous_role, auth_timeout);
        if self.auth.api_keys.is_empty() {
            self.auth.api_keys = std::mem::take(&mut under.auth.api_keys);
        }
        if self.policy.is_empty() {
            self.policy = std::mem::take(&mut under.policy);
        }
        layer!(self.limits, under.limits; max_connections, max_connections_per_ip,
            max_subscriptions, max_message_rate, max_filter_conditions, max_in_values,
            max_pattern_length, max_pattern_wildcards, max_snapshots, snapshot_deadline,
            max_rows, header_timeout, body_timeout);
        self
    }

    /// Flags and environment (`self`) over the file they name, if any.
    pub fn with_file(self) -> Result<Settings, ConfigError> {
        match self.config.clone() {
            Some(path) => Ok(self.over(Settings::from_file(&path)?)),
            None => Ok(self),
        }
    }

    /// The address to listen on.
    pub fn listen(&self) -> String {
        self.listen
            .clone()
            .unwrap_or_else(|| "127.0.0.1:8080".to_owned())
    }

    /// Every setting at its default value (what `--print-config` shows for unset ones).
    pub fn defaults() -> Settings {
        let d = Config::new("postgres://postgres@127.0.0.1:5432/postgres", Vec::new());
        let secs = |d: Duration| Some(d.as_secs());
        let auth = AuthConfig::default();
        let l = Limits::for_pool(d.pool_size);
        Settings {
            database_url: Some(d.database_url.clone()),
            listen: Some("127.0.0.1:8080".to_owned()),
            tables: Some(Vec::new()),
            install: Some(d.install),
            capture: Some(d.capture_mode.name().to_owned()),
            poll_max_ms: Some(d.poll_max.as_millis() as u64),
            notify_busy_rate: Some(d.notify_busy_rate),
            schema_interval_ms: Some(d.schema_interval.as_millis() as u64),
            ping_interval: secs(d.ping_interval),
            ping_timeout: secs(d.ping_timeout),
            max_frame: Some(d.max_client_frame),
            queue_bytes: Some(d.queue_bytes),
            history_events: Some(d.history_events),
            history_bytes: Some(d.history_bytes),
            pool_size: Some(d.pool_size),
            pool_wait_timeout: secs(d.pool_wait_timeout),
            pool_connect_timeout: secs(d.pool_connect_timeout),
            max_body: Some(d.max_body_bytes),
            retention_secs: Some(d.retention.max_age.map_or(0, |a| a.as_secs())),
            retention_rows: None,
            allow_anonymous: Some(false),
            rest_set_role: Some(false),
            rest_allow_unfiltered_writes: Some(false),
            allowed_origins: Some(Vec::new()),
            allowed_hosts: Some(Vec::new()),
            auth: AuthSettings {
                jwt_leeway: Some(30),
                jwt_require_exp: Some(true),
                role_claim: Some(auth.role_claim),
                default_role: Some(auth.default_role),
                auth_timeout: secs(auth.auth_timeout),
                ..AuthSettings::default()
            },
            limits: LimitSettings {
                max_connections: Some(l.max_connections),
                max_connections_per_ip: Some(l.max_connections_per_ip),
                max_subscriptions: Some(l.max_subscriptions),
                max_message_rate: Some(l.max_message_rate),
                max_filter_conditions: Some(l.max_filter_conditions),
                max_in_values: Some(l.max_in_values),
                max_pattern_length: Some(l.max_pattern_length),
                max_pattern_wildcards: Some(l.max_pattern_wildcards),
                max_snapshots: Some(l.max_snapshots),
                snapshot_deadline: secs(l.snapshot_deadline),
                max_rows: Some(l.max_rows.unwrap_or(0)),
                header_timeout: secs(l.header_timeout),
                body_timeout: secs(l.body_timeout),
            },
            ..Settings::default()
        }
    }

    /// The settings in effect as TOML (defaults filled in), secrets redacted
    /// (`--print-config`).
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        if shown.limits.max_snapshots.is_none() {
            let pool = shown.pool_size.unwrap_or(16);
            shown.limits.max_snapshots = Some(Limits::for_pool(pool).max_snapshots);
        }
        let mut shown = shown.over(Settings::defaults());
        if let Some(url) = &shown.database_url {
            shown.database_url = Some(crate::tls::redact(url));
        }
        if shown.auth.jwt_secret.is_some() {
            shown.auth.jwt_secret = Some("<redacted>".to_owned());
        }
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot show the settings: {e}\n"))
    }

    /// The checked configuration.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let database_url = self
            .database_url
            .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        let tables = self
            .tables
            .unwrap_or_default()
            .iter()
            .filter(|n| !n.trim().is_empty())
            .map(|n| TableName::parse(n))
            .collect::<Result<Vec<_>, _>>()?;
        let mut config = Config::new(database_url, tables);
        let secs = Duration::from_secs;
        let ms = Duration::from_millis;
        config.install = self.install.unwrap_or(false);
        if let Some(mode) = self.capture {
            config.capture_mode = crate::capture::Mode::parse(&mode)
                .ok_or_else(|| ConfigError::Option("capture", "must be notify or poll".into()))?;
        }
        set(&mut config.poll_max, self.poll_max_ms.map(ms));
        set(&mut config.notify_busy_rate, self.notify_busy_rate);
        set(&mut config.schema_interval, self.schema_interval_ms.map(ms));
        set(&mut config.ping_interval, self.ping_interval.map(secs));
        set(&mut config.ping_timeout, self.ping_timeout.map(secs));
        set(&mut config.max_client_frame, self.max_frame);
        set(&mut config.queue_bytes, self.queue_bytes);
        set(&mut config.history_events, self.history_events);
        set(&mut config.history_bytes, self.history_bytes);
        set(&mut config.pool_size, self.pool_size);
        set(
            &mut config.pool_wait_timeout,
            self.pool_wait_timeout.map(secs),
        );
        set(
            &mut config.pool_connect_timeout,
            self.pool_connect_timeout.map(secs),
        );
        set(&mut config.max_body_bytes, self.max_body);
        if let Some(age) = self.retention_secs {
            config.retention.max_age = (age > 0).then(|| secs(age));
        }
        config.retention.max_rows = self.retention_rows;
        config.allow_anonymous = self.allow_anonymous.unwrap_or(false);
        config.rest_set_role = self.rest_set_role.unwrap_or(false);
        config.rest_allow_unfiltered_writes = self.rest_allow_unfiltered_writes.unwrap_or(false);
        config.origins.allowed = self.allowed_origins.unwrap_or_default();
        config.allowed_hosts = self.allowed_hosts.unwrap_or_default();
        config.tls_cert = self.tls_cert;
        config.tls_key = self.tls_key;
        config.auth = self.auth.into_auth()?;
        config.policies = Policies {
            list: self
                .policy
                .iter()
                .enumerate()
                .map(|(i, p)| Policy::from_setting(p, i))
                .collect::<Result<_, _>>()
                .map_err(ConfigError::Policy)?,
        };
        config.limits = self.limits.into_limits(config.pool_size);
        config.validate()?;
        Ok(config)
    }
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *slot = value;
    }
}

impl AuthSettings {
    fn into_auth(self) -> Result<AuthConfig, ConfigError> {
        let bad = |option: &'static str, m: String| ConfigError::Option(option, m);
        let sources = [
            self.jwt_secret.is_some(),
            self.jwt_secret_file.is_some(),
            self.jwt_public_key_file.is_some(),
            self.jwks_file.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() > 1 {
            return Err(bad(
                "jwt_secret",
                "give one of jwt_secret, jwt_secret_file, jwt_public_key_file, jwks_file".into(),
            ));
        }
        let keys = if let Some(secret) = self.jwt_secret {
            if secret.len() < auth::MIN_SECRET_BYTES {
                return Err(bad(
                    "jwt_secret",
                    format!(
                        "must be at least {} bytes (HMAC keys shorter than the hash are guessable)",
                        auth::MIN_SECRET_BYTES
                    ),
                ));
            }
            Some(KeySource::Secret(Secret(secret)))
        } else if let Some(path) = self.jwt_secret_file {
            Some(KeySource::SecretFile(path))
        } else if let Some(path) = self.jwt_public_key_file {
            Some(KeySource::PublicKeyFile(path))
        } else {
            self.jwks_file.map(KeySource::JwksFile)
        };
        let algorithms = self
            .jwt_algorithms
            .unwrap_or_default()
            .iter()
            .map(|a| auth::parse_algorithm(a))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|m| bad("jwt_algorithms", m))?;
        let jwt = keys.map(|keys| JwtConfig {
            keys,
            algorithms,
            audience: self.jwt_audience,
            issuer: self.jwt_issuer,
            leeway: Duration::from_secs(self.jwt_leeway.unwrap_or(30)),
            require_exp: self.jwt_require_exp.unwrap_or(true),
        });
        let api_keys = self
            .api_keys
            .into_iter()
            .map(|k| {
                Ok(ApiKey {
                    sha256: auth::parse_digest(&k.sha256).map_err(|m| bad("api_keys", m))?,
                    role: k.role,
                    claims: k.claims,
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let defaults = AuthConfig::default();
        Ok(AuthConfig {
            jwt,
            api_keys,
            role_claim: self.role_claim.unwrap_or(defaults.role_claim),
            default_role: self.default_role.unwrap_or(defaults.default_role),
            anonymous_role: self.anonymous_role,
            auth_timeout: self
                .auth_timeout
                .map_or(defaults.auth_timeout, Duration::from_secs),
        })
    }
}

impl LimitSettings {
    fn into_limits(self, pool_size: usize) -> Limits {
        let d = Limits::for_pool(pool_size);
        Limits {
            max_connections: self.max_connections.unwrap_or(d.max_connections),
            max_connections_per_ip: self
                .max_connections_per_ip
                .unwrap_or(d.max_connections_per_ip),
            max_subscriptions: self.max_subscriptions.unwrap_or(d.max_subscriptions),
            max_message_rate: self.max_message_rate.unwrap_or(d.max_message_rate),
            max_filter_conditions: self
                .max_filter_conditions
                .unwrap_or(d.max_filter_conditions),
            max_in_values: self.max_in_values.unwrap_or(d.max_in_values),
            max_pattern_length: self.max_pattern_length.unwrap_or(d.max_pattern_length),
            max_pattern_wildcards: self
                .max_pattern_wildcards
                .unwrap_or(d.max_pattern_wildcards),
            max_snapshots: self.max_snapshots.unwrap_or(d.max_snapshots),
            snapshot_deadline: self
                .snapshot_deadline
                .map_or(d.snapshot_deadline, Duration::from_secs),
            max_rows: match self.max_rows {
                None => d.max_rows,
                Some(0) => None,
                Some(rows) => Some(rows),
            },
            header_timeout: self
                .header_timeout
                .map_or(d.header_timeout, Duration::from_secs),
            body_timeout: self
                .body_timeout
                .map_or(d.body_timeout, Duration::from_secs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_the_file_overrides_defaults() {
        let file = Settings::from_toml(
            r#"
            database_url = "postgres://u:pw@db/app"
            tables = ["items", "shop.orders"]
            ping_interval = 5
            ping_timeout = 20
            [auth]
            jwt_secret = "0123456789abcdef0123456789abcdef-file"
            jwt_audience = ["app"]
            [[auth.api_keys]]
            sha256 = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
            role = "service"
            claims = { tenant_id = 4 }
            [[policy]]
            tables = ["items"]
            roles = ["*"]
            read = true
            filter = "tenant_id=eq.{claims.tenant_id}"
            [limits]
            max_subscriptions = 7
            "#,
        )
        .unwrap();
        let flags = Settings {
            ping_interval: Some(6),
            ..Settings::default()
        };
        let config = flags.over(file).into_config().unwrap();
        assert_eq!(config.ping_interval, Duration::from_secs(6));
        assert_eq!(config.ping_timeout, Duration::from_secs(20));
        assert_eq!(config.tables.len(), 2);
        assert_eq!(config.auth.api_keys[0].role, "service");
        assert_eq!(
            config.auth.jwt.unwrap().audience,
            Some(vec!["app".to_owned()])
        );
        assert_eq!(config.policies.list.len(), 1);
        assert_eq!(config.limits.max_subscriptions, 7);
        assert_eq!(config.limits.max_in_values, 1000);
    }

    #[test]
    fn mistakes_name_the_option() {
        let err = Settings::from_toml("ping_intervall = 5").unwrap_err();
        assert!(err.contains("ping_intervall"), "{err}");
        let short = Settings {
            tables: Some(vec!["items".into()]),
            auth: AuthSettings {
                jwt_secret: Some("tiny".into()),
                ..AuthSettings::default()
            },
            ..Settings::default()
        };
        let err = short.into_config().unwrap_err().to_string();
        assert!(err.contains("jwt_secret") && !err.contains("tiny"), "{err}");
        let policy = Settings::from_toml(
            "tables = [\"items\"]\n[[policy]]\ntables = [\"items\"]\nroles = [\"*\"]\nfilter = \"x\"",
        )
        .unwrap();
        let err = policy.into_config().unwrap_err().to_string();
        assert!(err.contains("policy 1"), "{err}");
    }

    #[test]
    fn allowed_hosts_come_from_the_file_and_bad_ones_are_named() {
        let file =
            Settings::from_toml("tables = [\"items\"]\nallowed_hosts = [\"relay.test\"]").unwrap();
        assert_eq!(file.into_config().unwrap().allowed_hosts, ["relay.test"]);
        let bad = Settings::from_toml("tables = [\"items\"]\nallowed_hosts = [\"a/b\"]").unwrap();
        let err = bad.into_config().unwrap_err().to_string();
        assert!(
            err.contains("allowed_hosts") && err.contains("a/b"),
            "{err}"
        );
    }

    #[test]
    fn printed_settings_hide_secrets() {
        let settings = Settings {
            database_url: Some("postgres://app:hunter2@db/app".into()),
            auth: AuthSettings {
                jwt_secret: Some("0123456789abcdef0123456789abcdef".into()),
                ..AuthSettings::default()
            },
            ..Settings::default()
        };
        let text = settings.to_redacted_toml();
        assert!(
            !text.contains("hunter2") && !text.contains("0123456789"),
            "{text}"
        );
        assert!(text.contains("<redacted>"), "{text}");
        assert!(Settings::from_toml(&text).is_ok(), "{text}");
    }
}
