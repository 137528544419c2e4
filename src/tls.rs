//! TLS: to PostgreSQL (the connection string's `sslmode`, with libpq's meanings, as a rustls
//! connector), and on the listener (`--tls-cert`, `--tls-key`: [`server_config`]).
//!
//! tokio-postgres knows `disable`, `prefer` and `require` but verifies nothing itself; this
//! module reads `sslmode` (`verify-ca` and `verify-full` included), `sslrootcert`, `sslcert`
//! and `sslkey` out of the connection string (URL or key=value form, the latter read as libpq
//! reads it: values unquoted or in single quotes, a backslash taking the next character as
//! it is), hands tokio-postgres the rest, and builds the matching certificate verifier:
//!
//! | `sslmode` | TLS | certificate chain | host name |
//! |---|---|---|---|
//! | `disable` | never | - | - |
//! | `prefer` (default) | if the server offers it | not checked | not checked |
//! | `require` | always | checked if there is a root certificate file (see below), else not | not checked |
//! | `verify-ca` | always | checked against the root certificates | not checked |
//! | `verify-full` | always | checked | must match the host connected to |
//!
//! Root certificates come from `sslrootcert` (a PEM file; `system` for the Mozilla bundle),
//! else `~/.postgresql/root.crt` when it exists, else (`verify-*` only) the Mozilla bundle.
//! As in libpq, `require` with a root certificate file, given as `sslrootcert` or the default
//! `~/.postgresql/root.crt` when it exists, checks the chain as `verify-ca` does. Unlike libpq,
//! an `sslrootcert` file that cannot be read is an error with `require` (libpq silently checks
//! nothing then), and `prefer` never checks (libpq checks when a root file exists and falls back
//! to an unencrypted connection when the check fails; pgrelay stays encrypted and unchecked).
//! `sslrootcert=system` needs `verify-full`, which it implies when `sslmode` is not given
//! (libpq 16's rule). `sslcert` and `sslkey` give a client certificate.
//!
//! A Unix-socket host (a `host` starting with `/`, in either form) never uses TLS, whatever
//! `sslmode` says, as in libpq (PostgreSQL refuses TLS on Unix sockets): no TLS is attempted
//! and no certificate file is read. A host list mixing Unix sockets and TCP hosts works with
//! `disable` and `prefer`; with `require` or stricter it is refused, because tokio-postgres
//! has one `sslmode` for every host.
//!
//! A certificate that fails a check gives the reason: not signed by a trusted root (and which
//! roots), does not name the host (and the names it has), expired, not yet valid.
//!
//! The listener (see `http::server`) serves the certificate chain and key of two PEM files,
//! HTTP/1.1 only, so that WebSocket upgrades work on every connection; plain HTTP sent to it
//! gets a 400 saying so.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::TryFutureExt;
use futures_util::future::{Either, MapErr, Ready, ready};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::config::{Host, SslMode as PgSslMode};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres_rustls::MakeRustlsConnect;

/// How a connection uses TLS (libpq's `sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Never.
    Disable,
    /// When the server offers it, unverified.
    Prefer,
    /// Always; the chain is checked only when there is a root certificate file.
    Require,
    /// Always; the chain must lead to a trusted root.
    VerifyCa,
    /// Always; trusted chain, and the certificate must name the host.
    VerifyFull,
}

impl SslMode {
    fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// What is checked of the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// No TLS at all (`disable`, or only Unix-socket hosts).
    NoTls,
    /// Encrypted, certificate not checked.
    Unchecked,
    /// The chain must lead to a trusted root.
    Chain,
    /// Trusted chain, and the certificate must name the host.
    ChainAndHost,
}

/// A connection string that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// `sslmode` has a value libpq does not know.
    #[error("sslmode must be disable, allow, prefer, require, verify-ca or verify-full, not {0:?}")]
    BadMode(String),
    /// `sslrootcert=system` with a mode weaker than `verify-full`.
    #[error(
        "sslrootcert=system needs sslmode=verify-full (as in libpq: any publicly trusted certificate would do otherwise), not sslmode={0}"
    )]
    WeakModeForSystem(&'static str),
    /// Unix sockets and TCP hosts in one list, with a mode that requires TLS.
    #[error(
        "sslmode={0} cannot apply to a host list that mixes Unix sockets (which never use TLS) and TCP hosts; list one kind, or use sslmode=prefer"
    )]
    MixedHosts(&'static str),
    /// A key=value connection string that does not parse (values are never shown).
    #[error("The connection string does not parse: {what} at character {at}")]
    Syntax {
        /// What is wrong.
        what: &'static str,
        /// Where (1-based, in characters), the start of the parameter concerned.
        at: usize,
    },
    /// A certificate or key file cannot be read.
    #[error("Cannot read {what} {path:?}: {reason}")]
    File {
        /// Which file.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
    /// The connection string does not parse.
    #[error("The database URL is not a valid PostgreSQL connection string: {0}")]
    Parse(#[source] tokio_postgres::Error),
    /// The client certificate and key do not go together.
    #[error("The client certificate cannot be used: {0}")]
    ClientCert(#[source] rustls::Error),
    /// The listener's certificate and key do not go together (or cannot be used).
    #[error("The certificate cannot be served: {0}")]
    ServerCert(#[source] rustls::Error),
}

/// A parsed connection string and the TLS connector it asks for.
#[derive(Clone)]
pub struct Target {
    /// Everything but the TLS settings, with tokio-postgres's `sslmode`.
    pub config: tokio_postgres::Config,
    /// The connector (used whatever the mode: with `disable`, tokio-postgres never calls it).
    pub tls: Connector,
    /// The mode asked for.
    pub mode: SslMode,
    /// What is checked of the server's certificate.
    pub verification: Verification,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The config holds the password: never printed.
        f.debug_struct("Target")
            .field("mode", &self.mode)
            .field("verification", &self.verification)
            .finish_non_exhaustive()
    }
}

/// The TLS connector handed to tokio-postgres: rustls, except that it accepts the empty host
/// name tokio-postgres passes for a Unix socket (rustls would refuse it, failing every
/// connection before a byte is sent, even with `sslmode=disable`). TLS is never negotiated on
/// a Unix socket: PostgreSQL answers no to it there.
#[derive(Clone)]
pub struct Connector(MakeRustlsConnect);

impl<S> MakeTlsConnect<S> for Connector
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = <MakeRustlsConnect as MakeTlsConnect<S>>::Stream;
    type TlsConnect = Connect<<MakeRustlsConnect as MakeTlsConnect<S>>::TlsConnect>;
    type Error = <MakeRustlsConnect as MakeTlsConnect<S>>::Error;

    fn make_tls_connect(&mut self, hostname: &str) -> Result<Self::TlsConnect, Self::Error> {
        if hostname.is_empty() {
            return Ok(Connect(None));
        }
        MakeTlsConnect::<S>::make_tls_connect(&mut self.0, hostname).map(|c| Connect(Some(c)))
    }
}

/// One connection's TLS handshake; `None` when there is no host name (a Unix socket).
pub struct Connect<T>(Option<T>);

impl<S, T> TlsConnect<S> for Connect<T>
where
    T: TlsConnect<S, Error = std::io::Error>,
{
    type Stream = T::Stream;
    type Error = std::io::Error;
    type Future = Either<
        MapErr<T::Future, fn(std::io::Error) -> std::io::Error>,
        Ready<std::io::Result<T::Stream>>,
    >;

    fn connect(self, stream: S) -> Self::Future {
        match self.0 {
            Some(connect) => Either::Left(connect.connect(stream).map_err(refused as fn(_) -> _)),
            None => Either::Right(ready(Err(std::io::Error::other(
                "no host name to check the server's certificate against",
            )))),
        }
    }
}

/// A handshake error, with a refused certificate's reason as its whole message (rustls shows
/// it wrapped in debug output: `Other(OtherError(…))`).
fn refused(error: std::io::Error) -> std::io::Error {
    let reason = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(reason);
    match reason {
        Some(reason) => std::io::Error::new(error.kind(), Refused(reason)),
        None => error,
    }
}

/// Why the certificate was refused, in words, if that is the error.
fn reason(error: &rustls::Error) -> Option<String> {
    match error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(other))) => {
            other.downcast_ref::<Refused>().map(|r| r.0.clone())
        }
        rustls::Error::InvalidCertificate(other) => {
            Some(format!("the server's certificate was refused: {other}"))
        }
        _ => None,
    }
}

/// The TLS settings taken out of a connection string.
#[derive(Debug, Default, PartialEq, Eq)]
struct Settings {
    mode: Option<String>,
    root_cert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

const OURS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// libpq's parameters whose values are no secret: [`redact`] shows these only (a password,
/// or an unknown key, which may be a piece of a mistyped password, is not shown).
const SHOWN: [&str; 40] = [
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "options",
    "application_name",
    "fallback_application_name",
    "connect_timeout",
    "client_encoding",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "replication",
    "gssencmode",
    "sslmode",
    "sslnegotiation",
    "sslcompression",
    "sslcert",
    "sslkey",
    "sslcertmode",
    "sslrootcert",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "requirepeer",
    "require_auth",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
    "service",
    "target_session_attrs",
    "load_balance_hosts",
    "channel_binding",
    "passfile",
    "sslkeylogfile",
];

const REDACTED: &str = "<redacted>";

impl Settings {
    fn take(&mut self, key: &str, value: String) {
        match key {
            "sslmode" => self.mode = Some(value),
            "sslrootcert" => self.root_cert = Some(value),
            "sslcert" => self.cert = Some(value),
            _ => self.key = Some(value),
        }
    }
}

fn url_scheme(text: &str) -> Option<usize> {
    ["postgres://", "postgresql://"]
        .into_iter()
        .find(|scheme| text.starts_with(scheme))
        .map(str::len)
}

fn decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

/// One `key = value` of a key=value connection string, read as libpq reads it.
#[derive(Debug, PartialEq, Eq)]
struct Param {
    key: String,
    value: String,
    /// Where the value is written (quotes included), in bytes.
    raw: Range<usize>,
}

/// Why a key=value string stops parsing: what, and the byte where the parameter starts.
#[derive(Debug, PartialEq, Eq)]
struct SyntaxError {
    what: &'static str,
    at: usize,
}

/// libpq's `isspace` (ASCII, vertical tab included).
fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
}

/// Reads a key=value connection string as libpq's `conninfo_parse` does: blanks around `=`
/// are skipped; a value is either unquoted (up to the next blank) or in single quotes; in
/// both, a backslash takes the next character as it is. Returns the parameters read, and why
/// it stopped if it did not reach the end.
fn scan(text: &str) -> (Vec<Param>, Option<SyntaxError>) {
    let mut params = Vec::new();
    let mut chars = text.char_indices().peekable();
    let skip_blanks = |chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while chars.next_if(|&(_, c)| is_space(c)).is_some() {}
        chars.peek().map_or(text.len(), |&(i, _)| i)
    };
    loop {
        let start = skip_blanks(&mut chars);
        if start == text.len() {
            return (params, None);
        }
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|&(_, c)| c != '=' && !is_space(c)) {
            key.push(c);
        }
        skip_blanks(&mut chars);
        let fail = |what| Some(SyntaxError { what, at: start });
        if chars.next_if(|&(_, c)| c == '=').is_none() {
            return (params, fail("missing \"=\" after a parameter name"));
        }
        if key.is_empty() {
            return (params, fail("a parameter has no name"));
        }
        let value_start = skip_blanks(&mut chars);
        let mut value = String::new();
        if chars.next_if(|&(_, c)| c == '\'').is_some() {
            loop {
                match chars.next() {
                    Some((_, '\\')) => value.extend(chars.next().map(|(_, c)| c)),
                    Some((_, '\'')) => break,
                    Some((_, c)) => value.push(c),
                    None => return (params, fail("unterminated quoted value")),
                }
            }
        } else {
            while let Some((_, c)) = chars.next_if(|&(_, c)| !is_space(c)) {
                match c {
                    '\\' => value.extend(chars.next().map(|(_, c)| c)),
                    c => value.push(c),
                }
            }
        }
        let value_end = chars.peek().map_or(text.len(), |&(i, _)| i);
        params.push(Param {
            key,
            value,
            raw: value_start..value_end,
        });
    }
}

/// Splits the TLS settings out of a connection string; returns the rest, for tokio-postgres.
fn split(database_url: &str) -> Result<(String, Settings), TlsError> {
    let mut settings = Settings::default();
    if url_scheme(database_url).is_some() {
        let Some((base, query)) = database_url.split_once('?') else {
            return Ok((database_url.to_owned(), settings));
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = decode(key);
            if OURS.contains(&key.as_str()) {
                settings.take(&key, decode(value));
            } else {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, settings));
    }
    let (params, error) = scan(database_url);
    if let Some(SyntaxError { what, at }) = error {
        let at = database_url[..at].chars().count() + 1;
        return Err(TlsError::Syntax { what, at });
    }
    // Every value goes to tokio-postgres quoted, with its own escapes: nothing is re-read.
    let mut kept = Vec::new();
    for Param { key, value, .. } in params {
        if OURS.contains(&key.as_str()) {
            settings.take(&key, value);
        } else {
            let quoted = value.replace('\\', "\\\\").replace('\'', "\\'");
            kept.push(format!("{key}='{quoted}'"));
        }
    }
    Ok((kept.join(" "), settings))
}

/// The connection string with its password replaced by `<redacted>` (URL user info,
/// `password=` in a URL's query or in key=value form, read as [`target`] reads it), for logs
/// and `--print-config`. The values of unknown keys and what cannot be parsed are not shown
/// either.
pub fn redact(database_url: &str) -> String {
    let text = database_url.trim();
    match url_scheme(text) {
        Some(scheme) => redact_url(text, scheme),
        None => redact_key_values(text),
    }
}

fn redact_key_values(text: &str) -> String {
    let (params, error) = scan(text);
    let mut out = String::with_capacity(text.len());
    let mut shown = 0;
    for param in params.iter().filter(|p| !SHOWN.contains(&p.key.as_str())) {
        out.push_str(&text[shown..param.raw.start]);
        out.push_str(REDACTED);
        shown = param.raw.end;
    }
    match error {
        // The rest may hold anything (a quote left open swallows what follows it).
        Some(error) => {
            out.push_str(&text[shown..error.at]);
            out.push_str(REDACTED);
        }
        None => out.push_str(&text[shown..]),
    }
    out
}

fn redact_url(text: &str, scheme: usize) -> String {
    let (scheme, rest) = text.split_at(scheme);
    let mut out = scheme.to_owned();
    // The user info ends at the last `@` before the query (so a password with a raw `/` or
    // `@` is covered), else at the first `@` (where tokio-postgres ends it).
    let head = &rest[..rest.find('?').unwrap_or(rest.len())];
    let mut tail = rest;
    if let Some(at) = head.rfind('@').or_else(|| rest.find('@')) {
        let userinfo = &rest[..at];
        match userinfo.find(':') {
            Some(colon) => {
                out.push_str(&redact_params(&userinfo[..=colon]));
                out.push_str(REDACTED);
            }
            None => out.push_str(&redact_params(userinfo)),
        }
        tail = &rest[at..];
    }
    out.push_str(&redact_params(tail));
    out
}

/// Redacts the values of secret `key=value` pairs among `?`- and `&`-separated pieces.
fn redact_params(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (i, piece) in text.split(['?', '&']).enumerate() {
        if i > 0 {
            // The separator before this piece (one ASCII byte).
            out.push(char::from(text.as_bytes()[at]));
            at += 1;
        }
        at += piece.len();
        match piece.split_once('=') {
            Some((key, _)) if !SHOWN.contains(&decode(key).as_str()) => {
                out.push_str(key);
                out.push('=');
                out.push_str(REDACTED);
            }
            _ => out.push_str(piece),
        }
    }
    out
}

/// Where the root certificates come from.
enum Roots {
    /// `sslrootcert=<path>`.
    Given(PathBuf),
    /// `~/.postgresql/root.crt`, which exists.
    Home(PathBuf),
    /// `sslrootcert=system`.
    System,
    /// No `sslrootcert` and no `~/.postgresql/root.crt` (`verify-*` only).
    Mozilla,
}

impl Roots {
    /// Said in errors: which roots the chain did not lead to.
    fn describe(&self) -> String {
        match self {
            Roots::Given(path) => format!("sslrootcert={}", path.display()),
            Roots::Home(path) => format!("the default sslrootcert {}", path.display()),
            Roots::System => "sslrootcert=system: the Mozilla root certificates".to_owned(),
            Roots::Mozilla => {
                "no sslrootcert and no ~/.postgresql/root.crt: the Mozilla root certificates"
                    .to_owned()
            }
        }
    }

    fn store(&self) -> Result<RootCertStore, TlsError> {
        let mut store = RootCertStore::empty();
        match self {
            Roots::Given(path) | Roots::Home(path) => {
                for cert in certificates(path, "root certificate")? {
                    store.add(cert).map_err(|e| TlsError::File {
                        what: "root certificate",
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                }
            }
            Roots::System | Roots::Mozilla => {
                store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned())
            }
        }
        Ok(store)
    }
}

/// `~/.postgresql/root.crt`, if it exists (libpq's default `sslrootcert`).
fn home_root_cert() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .map(|home| Path::new(&home).join(".postgresql/root.crt"))
        .filter(|p| p.exists())
}

/// Parses a connection string and builds its TLS connector.
pub fn target(database_url: &str) -> Result<Target, TlsError> {
    target_with(database_url, home_root_cert())
}

/// [`target`], with `default_root` standing for `~/.postgresql/root.crt` (`None`: absent).
fn target_with(database_url: &str, default_root: Option<PathBuf>) -> Result<Target, TlsError> {
    build(database_url, default_root).map(|(target, _)| target)
}

/// [`target_with`], and the certificate verifier in its connector.
fn build(
    database_url: &str,
    default_root: Option<PathBuf>,
) -> Result<(Target, Arc<dyn ServerCertVerifier>), TlsError> {
    let (rest, settings) = split(database_url)?;
    let mut config: tokio_postgres::Config = rest.parse().map_err(TlsError::Parse)?;
    // An empty value is no value (libpq).
    let root_cert = settings.root_cert.filter(|s| !s.is_empty());
    let system = root_cert.as_deref() == Some("system");
    let mode = match settings.mode.as_deref() {
        None if system => SslMode::VerifyFull,
        None | Some("prefer") | Some("allow") => SslMode::Prefer,
        Some("disable") => SslMode::Disable,
        Some("require") => SslMode::Require,
        Some("verify-ca") => SslMode::VerifyCa,
        Some("verify-full") => SslMode::VerifyFull,
        Some(other) => return Err(TlsError::BadMode(other.to_owned())),
    };
    if system && mode != SslMode::VerifyFull {
        return Err(TlsError::WeakModeForSystem(mode.name()));
    }

    // A host is a Unix socket when it is a path and no hostaddr sends it over TCP instead.
    let hostaddrs = config.get_hostaddrs().len();
    let sockets = config
        .get_hosts()
        .iter()
        .enumerate()
        .filter(|(i, host)| matches!(host, Host::Unix(_)) && *i >= hostaddrs)
        .count();
    let only_sockets = sockets > 0 && sockets == config.get_hosts().len();
    if sockets > 0 && !only_sockets && !matches!(mode, SslMode::Disable | SslMode::Prefer) {
        return Err(TlsError::MixedHosts(mode.name()));
    }

    let roots = match mode {
        _ if only_sockets => None,
        SslMode::Disable | SslMode::Prefer => None,
        SslMode::Require => match root_cert.clone() {
            Some(path) => Some(Roots::Given(path.into())),
            None => default_root.map(Roots::Home),
        },
        SslMode::VerifyCa | SslMode::VerifyFull => Some(match root_cert.clone() {
            Some(path) if path == "system" => Roots::System,
            Some(path) => Roots::Given(path.into()),
            None => default_root.map_or(Roots::Mozilla, Roots::Home),
        }),
    };
    let verification = match (mode, &roots) {
        _ if only_sockets => Verification::NoTls,
        (SslMode::Disable, _) => Verification::NoTls,
        (SslMode::VerifyFull, _) => Verification::ChainAndHost,
        (_, Some(_)) => Verification::Chain,
        (_, None) => Verification::Unchecked,
    };
    config.ssl_mode(match (mode, only_sockets) {
        (SslMode::Disable, _) | (_, true) => PgSslMode::Disable,
        (SslMode::Prefer, false) => PgSslMode::Prefer,
        _ => PgSslMode::Require,
    });

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match roots {
        None => Arc::new(Unverified(Arc::clone(&provider))),
        Some(roots) => {
            let store = roots.store()?;
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(store), Arc::clone(&provider))
                    .build()
                    .map_err(|e| TlsError::File {
                        what: "root certificates",
                        path: root_cert.clone().unwrap_or_default().into(),
                        reason: e.to_string(),
                    })?;
            Arc::new(Checked {
                webpki,
                host_name: verification == Verification::ChainAndHost,
                roots: roots.describe(),
            })
        }
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::ClientCert)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::clone(&verifier));
    let client_config = match (&settings.cert, &settings.key) {
        // No TLS, no client certificate to read.
        _ if verification == Verification::NoTls => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let chain = certificates(Path::new(cert), "client certificate")?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::File {
                what: "client key",
                path: key.into(),
                reason: e.to_string(),
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(TlsError::ClientCert)?
        }
        _ => builder.with_no_client_auth(),
    };
    let target = Target {
        config,
        tls: Connector(MakeRustlsConnect::new(client_config)),
        mode,
        verification,
    };
    Ok((target, verifier))
}

/// The listener's TLS: the certificate chain in `cert` (PEM, the server's certificate first)
/// and its private key in `key` (PEM: PKCS#8, PKCS#1 or SEC1).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates(cert, "certificate")?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::File {
        what: "private key",
        path: key.to_owned(),
        reason: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::ServerCert)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(TlsError::ServerCert)?;
    // WebSocket upgrades are HTTP/1.1: a client that negotiated h2 could not open one.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn certificates(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let error = |reason: String| TlsError::File {
        what,
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(e.to_string()))?;
    if certs.is_empty() {
        return Err(error("no certificate in it".into()));
    }
    Ok(certs)
}

/// `verify-ca`, `verify-full` and `require` with root certificates: the chain must lead to a
/// trusted root; the host name is checked only if `host_name`. A certificate that fails says
/// why in words (and which roots, which names), not as a bare error code.
#[derive(Debug)]
struct Checked {
    webpki: Arc<WebPkiServerVerifier>,
    host_name: bool,
    /// Which roots, for the error saying the chain does not lead to them.
    roots: String,
}

/// The reason a certificate was refused, in words.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

impl Checked {
    fn explain(&self, error: CertificateError, server_name: &ServerName<'_>) -> CertificateError {
        let date = |time: &UnixTime| {
            i64::try_from(time.as_secs())
                .ok()
                .and_then(|secs| chrono::DateTime::from_timestamp(secs, 0))
                .map_or_else(
                    || format!("{} (UNIX time)", time.as_secs()),
                    |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
                )
        };
        let host = server_name.to_str();
        let why = match &error {
            CertificateError::UnknownIssuer => format!(
                "the server's certificate is not signed by a trusted root ({})",
                self.roots
            ),
            CertificateError::NotValidForNameContext { presented, .. } => {
                // rustls gives the names in debug form: `DnsName("localhost")`.
                let plain = |name: &String| {
                    name.strip_suffix(')')
                        .and_then(|n| n.split_once('('))
                        .map_or(name.as_str(), |(_, inner)| inner.trim_matches('"'))
                        .to_owned()
                };
                let names = if presented.is_empty() {
                    "no host names".to_owned()
                } else {
                    presented.iter().map(plain).collect::<Vec<_>>().join(", ")
                };
                format!("the server's certificate does not name host {host} (it names {names})")
            }
            CertificateError::NotValidForName => {
                format!("the server's certificate does not name host {host}")
            }
            CertificateError::ExpiredContext { not_after, .. } => format!(
                "the server's certificate chain has expired: not valid after {}",
                date(not_after)
            ),
            CertificateError::Expired => "the server's certificate chain has expired".to_owned(),
            CertificateError::NotValidYetContext { not_before, .. } => format!(
                "the server's certificate chain is not valid yet: not before {}",
                date(not_before)
            ),
            CertificateError::NotValidYet => {
                "the server's certificate chain is not valid yet".to_owned()
            }
            CertificateError::BadSignature => {
                "the server's certificate chain has a bad signature".to_owned()
            }
            _ => return error,
        };
        CertificateError::Other(OtherError(Arc::new(Refused(why))))
    }
}

impl ServerCertVerifier for Checked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            // The name is checked last, once the chain is known good.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.host_name => Ok(ServerCertVerified::assertion()),
            Err(rustls::Error::InvalidCertificate(error)) => Err(
                rustls::Error::InvalidCertificate(self.explain(error, server_name)),
            ),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// `prefer` / `require`: encrypted, certificate not checked (libpq's meaning). The handshake
/// signatures are still checked, so the peer holds the key of the certificate it sent.
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_settings_are_taken_out_of_both_forms() {
        let (rest, s) = split(
            "postgres://u:p%40ss@db.example.com:5433/app?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://u:p%40ss@db.example.com:5433/app?application_name=x"
        );
        assert_eq!(s.mode.as_deref(), Some("verify-full"));
        assert_eq!(s.root_cert.as_deref(), Some("/etc/ca.pem"));

        let (rest, s) = split(
            "host=db port = 5432 password='a\\'b c' sslmode=verify-ca sslrootcert='/a b/ca.pem' dbname=app",
        )
        .unwrap();
        assert_eq!(s.mode.as_deref(), Some("verify-ca"));
        assert_eq!(s.root_cert.as_deref(), Some("/a b/ca.pem"));
        let config: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(config.get_dbname(), Some("app"));
        assert_eq!(config.get_ports(), [5432]);
        assert_eq!(config.get_password(), Some(&b"a'b c"[..]));
        assert!(split("postgres://h/db").unwrap().1 == Settings::default());
    }

    #[test]
    fn modes_map_to_what_tokio_postgres_enforces() {
        let t = target("postgres://u@h/db?sslmode=require").unwrap();
        assert_eq!(t.config.get_ssl_mode(), PgSslMode::Require);
        let t = target("host=h sslmode=verify-full sslrootcert=system").unwrap();
        assert_eq!(
            (t.mode, t.config.get_ssl_mode()),
            (SslMode::VerifyFull, PgSslMode::Require)
        );
        assert_eq!(target("host=h").unwrap().mode, SslMode::Prefer);
        assert!(matches!(
            target("host=h sslmode=sometimes"),
            Err(TlsError::BadMode(_))
        ));
        let missing = target("host=h sslmode=verify-ca sslrootcert=/nonexistent/ca.pem");
        assert!(matches!(missing, Err(TlsError::File { .. })));
        // The password never shows in the debug form.
        let t = target("postgres://u:secret@h/db").unwrap();
        assert!(!format!("{t:?}").contains("secret"));
    }

    #[test]
    fn passwords_are_redacted_in_every_form() {
        for (url, hidden) in [
            ("postgres://app:hunter2@db:5432/x", "hunter2"),
            (
                "postgresql://app:hun%40ter2@db/x?sslmode=require",
                "hun%40ter2",
            ),
            (
                "postgres://app@db/x?password=hunter2&sslmode=require",
                "hunter2",
            ),
            ("host=db user=app password=hunter2 dbname=x", "hunter2"),
            ("host=db password='hun ter\\'2' dbname=x", "ter"),
        ] {
            let shown = redact(url);
            assert!(!shown.contains(hidden), "{url} -> {shown}");
            assert!(shown.contains("<redacted>"), "{url} -> {shown}");
        }
        assert_eq!(redact("host=db user=app"), "host=db user=app");
        assert!(redact("host=db dbname=x password=p sslmode=require").ends_with("sslmode=require"));
    }

    #[test]
    fn the_listener_serves_a_certificate_only_with_its_own_key() {
        let dir = std::env::temp_dir().join(format!(
            "pgrelay-tls-unit-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let issued = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = write("cert.pem", issued.cert.pem());
        let key = write("key.pem", issued.key_pair.serialize_pem());
        let other = write(
            "other.pem",
            rcgen::KeyPair::generate().unwrap().serialize_pem(),
        );

        let config = server_config(&cert, &key).unwrap();
        assert_eq!(config.alpn_protocols, [b"http/1.1".to_vec()]);
        assert!(matches!(
            server_config(&cert, &other),
            Err(TlsError::ServerCert(_))
        ));
        assert!(matches!(
            server_config(&cert, &dir.join("missing.pem")),
            Err(TlsError::File { .. })
        ));
        // A key where the certificate should be: no certificate in it.
        assert!(matches!(
            server_config(&key, &key),
            Err(TlsError::File { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The password tokio-postgres would use, from a key=value string as `target` reads it.
    fn password_of(conninfo: &str) -> Option<String> {
        let t = target_with(conninfo, None).unwrap();
        t.config
            .get_password()
            .map(|p| String::from_utf8(p.to_vec()).unwrap())
    }

    #[test]
    fn key_value_strings_are_read_as_libpq_reads_them() {
        // A backslash takes the next character as it is, quoted or not.
        assert_eq!(password_of(r"host=h password=a\ b").as_deref(), Some("a b"));
        assert_eq!(
            password_of(r"host=h password=a\\b").as_deref(),
            Some(r"a\b")
        );
        assert_eq!(password_of(r"host=h password=a\'b").as_deref(), Some("a'b"));
        assert_eq!(
            password_of(r"host=h password=it's").as_deref(),
            Some("it's")
        );
        assert_eq!(
            password_of(r"host=h password='a\\b c'").as_deref(),
            Some(r"a\b c")
        );
        // Blanks around "=" are skipped; a trailing backslash escapes nothing.
        assert_eq!(password_of("host=h password = \tp").as_deref(), Some("p"));
        assert_eq!(password_of(r"host=h password=p\").as_deref(), Some("p"));
        assert_eq!(password_of("host=h password=''").as_deref(), Some(""));
        // An escaped blank keeps what follows inside the value: not a setting of its own.
        let t = target_with(r"host=h password=x\ sslmode=disable", None).unwrap();
        assert_eq!(t.mode, SslMode::Prefer);
        assert_eq!(t.config.get_password(), Some(&b"x sslmode=disable"[..]));

        let (rest, s) =
            split(r"host=h sslrootcert='/path/with \'quote' sslcert=/a\ b/c.pem dbname=d\ b")
                .unwrap();
        assert_eq!(s.root_cert.as_deref(), Some("/path/with 'quote"));
        assert_eq!(s.cert.as_deref(), Some("/a b/c.pem"));
        let config: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(config.get_dbname(), Some("d b"));

        // What libpq refuses is refused, saying where, never showing a value.
        for (text, what, at) in [
            (
                "host=h password='k3y s3cr3t",
                "unterminated quoted value",
                8,
            ),
            (
                "host=h password=k3y s3cr3t",
                "missing \"=\" after a parameter name",
                21,
            ),
            ("host=h =s3cr3t", "a parameter has no name", 8),
        ] {
            let err = target_with(text, None).unwrap_err();
            let shown = err.to_string();
            assert!(
                matches!(&err, TlsError::Syntax { what: w, at: a } if *w == what && *a == at),
                "{text}: {shown}"
            );
            assert!(
                !shown.contains("k3y") && !shown.contains("s3cr3t"),
                "{shown}"
            );
        }
    }

    #[test]
    fn redaction_reads_the_string_as_the_connection_does() {
        for (text, hidden) in [
            (r"host=db password=a\ secret dbname=x", "secret"),
            ("host=db password = secret dbname=x", "secret"),
            ("host=db password= secret dbname=x", "secret"),
            ("host=db password=\tsecret", "secret"),
            ("host=db password='unterminated secret", "secret"),
            ("host=db password=x y=secret", "secret"),
            ("host=db sslpassword=secret", "secret"),
            ("postgres://u:sec/ret@db/x", "ret"),
            ("postgres://u:sec@ret@db/x", "ret"),
            ("postgres://u:sec?ret@db/x", "ret"),
            ("postgres://u@db/x?pass%77ord=secret", "secret"),
            (
                "postgres://db/x?application_name=a:b@c&password=secret",
                "secret",
            ),
        ] {
            let shown = redact(text);
            assert!(!shown.contains(hidden), "{text} -> {shown}");
            assert!(shown.contains("<redacted>"), "{text} -> {shown}");
        }
        assert_eq!(
            redact(r"host=db password=a\ b dbname='x y'"),
            "host=db password=<redacted> dbname='x y'"
        );
        assert_eq!(
            redact("postgres://u:p@db/x?sslmode=require&password=q"),
            "postgres://u:<redacted>@db/x?sslmode=require&password=<redacted>"
        );
        assert_eq!(redact("postgres://u@db/x"), "postgres://u@db/x");
    }

    #[test]
    fn unix_socket_hosts_never_use_tls() {
        // libpq ignores sslmode on a Unix socket; so no certificate file is read either.
        for text in [
            "host=/var/run/postgresql dbname=d sslmode=require",
            "host=/tmp sslmode=verify-full sslrootcert=/nonexistent/ca.pem",
            "postgres:///d?host=/tmp&sslmode=require",
            "postgres://%2Fvar%2Frun%2Fpostgresql/d?sslmode=verify-ca",
            "host=/tmp,/var/run/postgresql sslmode=require sslcert=/no.pem sslkey=/no.key",
        ] {
            let t = target_with(text, None).unwrap();
            assert_eq!(t.config.get_ssl_mode(), PgSslMode::Disable, "{text}");
            assert_eq!(t.verification, Verification::NoTls, "{text}");
        }
        // A path host sent to an address by hostaddr is TCP: TLS applies.
        let t = target_with("host=/tmp hostaddr=127.0.0.1 sslmode=require", None).unwrap();
        assert_eq!(t.config.get_ssl_mode(), PgSslMode::Require);
        // Mixed lists: fine when TLS is optional, refused when one mode cannot cover both.
        let t = target_with("host=/tmp,db sslmode=prefer", None).unwrap();
        assert_eq!(t.config.get_ssl_mode(), PgSslMode::Prefer);
        assert!(matches!(
            target_with("host=/tmp,db sslmode=require", None),
            Err(TlsError::MixedHosts("require"))
        ));

        // tokio-postgres asks for a connector with an empty host name on a Unix socket:
        // rustls alone refuses it (failing every socket connection, whatever the mode).
        let t = target_with("host=/tmp", None).unwrap();
        let mut plain = t.tls.0.clone();
        assert!(
            MakeTlsConnect::<tokio::net::UnixStream>::make_tls_connect(&mut plain, "").is_err()
        );
        let mut ours = t.tls.clone();
        assert!(MakeTlsConnect::<tokio::net::UnixStream>::make_tls_connect(&mut ours, "").is_ok());
    }

    /// A directory of the test's own with a CA, a certificate it signed for `localhost`, and an
    /// unrelated CA, as PEM files.
    struct Certs {
        dir: PathBuf,
        ca: PathBuf,
        other_ca: PathBuf,
        ca_key: rcgen::KeyPair,
        ca_cert: rcgen::Certificate,
    }

    impl Certs {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!(
                "pgrelay-tls-roots-{}-{}",
                std::process::id(),
                rand::random::<u32>()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let ca = |name: &str| {
                let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
                params
                    .distinguished_name
                    .push(rcgen::DnType::CommonName, name);
                params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
                let key = rcgen::KeyPair::generate().unwrap();
                let cert = params.self_signed(&key).unwrap();
                (key, cert)
            };
            let (ca_key, ca_cert) = ca("unit CA");
            let (_, other) = ca("other unit CA");
            let ca = dir.join("ca.pem");
            std::fs::write(&ca, ca_cert.pem()).unwrap();
            let other_ca = dir.join("other.pem");
            std::fs::write(&other_ca, other.pem()).unwrap();
            Certs {
                dir,
                ca,
                other_ca,
                ca_key,
                ca_cert,
            }
        }

        /// A server certificate for `localhost`, valid from year `from` to the end of `to`.
        fn issue(&self, from: i32, to: i32) -> CertificateDer<'static> {
            let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
            params.not_before = rcgen::date_time_ymd(from, 1, 1);
            params.not_after = rcgen::date_time_ymd(to, 12, 31);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.ca_cert, &self.ca_key).unwrap();
            cert.der().clone()
        }
    }

    impl Drop for Certs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Why the connector of `conninfo` refuses `cert` from a server called `host`, if it does.
    fn refusal(
        conninfo: &str,
        default_root: Option<PathBuf>,
        cert: &CertificateDer<'_>,
        host: &str,
    ) -> Option<String> {
        let (_, verifier) = build(conninfo, default_root).unwrap();
        let name = ServerName::try_from(host.to_owned()).unwrap();
        verifier
            .verify_server_cert(cert, &[], &name, &[], UnixTime::now())
            .err()
            .map(|e| reason(&e).unwrap_or_else(|| e.to_string()))
    }

    #[test]
    fn require_checks_the_chain_when_there_is_a_root_file() {
        let certs = Certs::new();
        let good = certs.issue(2020, 2100);
        let ca = certs.ca.display().to_string();
        let other = certs.other_ca.display().to_string();

        // sslrootcert given: checked as verify-ca (chain, not the name).
        let with_ca = format!("host=h sslmode=require sslrootcert={ca}");
        assert_eq!(
            target_with(&with_ca, None).unwrap().verification,
            Verification::Chain
        );
        assert_eq!(refusal(&with_ca, None, &good, "localhost"), None);
        assert_eq!(refusal(&with_ca, None, &good, "127.0.0.1"), None);
        let with_other = format!("host=h sslmode=require sslrootcert={other}");
        let why = refusal(&with_other, None, &good, "localhost").unwrap();
        assert!(
            why.contains(&format!(
                "the server's certificate is not signed by a trusted root (sslrootcert={other})"
            )),
            "{why}"
        );
        // ~/.postgresql/root.crt, when it exists, counts as given (libpq does the same).
        let home = Some(certs.other_ca.clone());
        let t = target_with("host=h sslmode=require", home.clone()).unwrap();
        assert_eq!(t.verification, Verification::Chain);
        let why = refusal("host=h sslmode=require", home.clone(), &good, "localhost").unwrap();
        assert!(
            why.contains(&format!("the default sslrootcert {other}")),
            "{why}"
        );
        // No root file: encrypted, unchecked (libpq's require).
        assert_eq!(
            target_with("host=h sslmode=require", None)
                .unwrap()
                .verification,
            Verification::Unchecked
        );
        assert_eq!(
            refusal("host=h sslmode=require", None, &good, "localhost"),
            None
        );
        // prefer never checks, root file or not.
        let t = target_with(&format!("host=h sslrootcert={other}"), home).unwrap();
        assert_eq!(t.verification, Verification::Unchecked);
        // A given root file that cannot be read is an error, not a silent "unchecked".
        assert!(matches!(
            target_with(
                "host=h sslmode=require sslrootcert=/nonexistent/ca.pem",
                None
            ),
            Err(TlsError::File { .. })
        ));
        // An empty sslrootcert is none.
        assert_eq!(
            target_with("host=h sslmode=require sslrootcert=''", None)
                .unwrap()
                .verification,
            Verification::Unchecked
        );
        // sslrootcert=system: verify-full only, and the default mode then (libpq 16).
        let t = target_with("host=h sslrootcert=system", None).unwrap();
        assert_eq!(t.mode, SslMode::VerifyFull);
        for mode in ["disable", "prefer", "require", "verify-ca"] {
            assert!(
                matches!(
                    target_with(&format!("host=h sslmode={mode} sslrootcert=system"), None),
                    Err(TlsError::WeakModeForSystem(m)) if m == mode
                ),
                "{mode}"
            );
        }
    }

    #[test]
    fn certificate_failures_say_why() {
        let certs = Certs::new();
        let good = certs.issue(2020, 2100);
        let expired = certs.issue(2019, 2020);
        let ca = certs.ca.display().to_string();
        let other = certs.other_ca.display().to_string();

        let full = format!("host=h sslmode=verify-full sslrootcert={ca}");
        assert_eq!(refusal(&full, None, &good, "localhost"), None);
        let why = refusal(&full, None, &good, "db.example.com").unwrap();
        assert!(
            why.contains(
                "the server's certificate does not name host db.example.com (it names localhost)"
            ),
            "{why}"
        );
        let why = refusal(&full, None, &expired, "localhost").unwrap();
        assert!(
            why.contains("the server's certificate chain has expired: not valid after "),
            "{why}"
        );
        assert!(why.contains("2020-12-31"), "{why} names the day it expired");
        let why = refusal(
            &format!("host=h sslmode=verify-ca sslrootcert={other}"),
            None,
            &good,
            "localhost",
        )
        .unwrap();
        assert!(
            why.contains(&format!(
                "not signed by a trusted root (sslrootcert={other})"
            )),
            "{why}"
        );
        // verify-ca lets a good chain for another name through.
        let ca_only = format!("host=h sslmode=verify-ca sslrootcert={ca}");
        assert_eq!(refusal(&ca_only, None, &good, "127.0.0.1"), None);
    }
}
