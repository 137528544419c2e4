//! TLS: to PostgreSQL (the connection string's `sslmode`, with libpq's meanings, as a rustls
//! connector), and on the listener (`--tls-cert`, `--tls-key`: [`server_config`]).
//!
//! tokio-postgres knows `disable`, `prefer` and `require` but verifies nothing itself; this
//! module reads `sslmode` (`verify-ca` and `verify-full` included), `sslrootcert`, `sslcert`
//! and `sslkey` out of the connection string (URL or key=value form), hands tokio-postgres
//! the rest, and builds the matching certificate verifier:
//!
//! | `sslmode` | TLS | certificate chain | host name |
//! |---|---|---|---|
//! | `disable` | never | - | - |
//! | `prefer` (default) | if the server offers it | not checked | not checked |
//! | `require` | always | not checked | not checked |
//! | `verify-ca` | always | checked against the root certificates | not checked |
//! | `verify-full` | always | checked | must match the host connected to |
//!
//! Root certificates come from `sslrootcert` (a PEM file; `system` for the Mozilla bundle),
//! else `~/.postgresql/root.crt` when it exists, else the Mozilla bundle. `sslcert` and
//! `sslkey` give a client certificate.
//!
//! The listener (see `http::server`) serves the certificate chain and key of two PEM files,
//! HTTP/1.1 only, so that WebSocket upgrades work on every connection; plain HTTP sent to it
//! gets a 400 saying so.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// How a connection uses TLS (libpq's `sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Never.
    Disable,
    /// When the server offers it, unverified.
    Prefer,
    /// Always, unverified.
    Require,
    /// Always; the chain must lead to a trusted root.
    VerifyCa,
    /// Always; trusted chain, and the certificate must name the host.
    VerifyFull,
}

/// A connection string that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// `sslmode` has a value libpq does not know.
    #[error("sslmode must be disable, allow, prefer, require, verify-ca or verify-full, not {0:?}")]
    BadMode(String),
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
    pub tls: MakeRustlsConnect,
    /// The mode asked for.
    pub mode: SslMode,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The config holds the password: never printed.
        f.debug_struct("Target")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
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

/// Splits the TLS settings out of a connection string; returns the rest.
fn split(database_url: &str) -> (String, Settings) {
    let mut settings = Settings::default();
    if database_url.starts_with("postgres://") || database_url.starts_with("postgresql://") {
        let Some((base, query)) = database_url.split_once('?') else {
            return (database_url.to_owned(), settings);
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if OURS.contains(&key) {
                let value = percent_encoding::percent_decode_str(value)
                    .decode_utf8_lossy()
                    .into_owned();
                settings.take(key, value);
            } else {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return (rest, settings);
    }
    // key=value form: values may be single-quoted, with \' and \\ escapes.
    let mut kept = Vec::new();
    let mut chars = database_url.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        if key.is_empty() {
            break;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next_if_eq(&'=').is_none() {
            kept.push(key);
            continue;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '\'' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                value.push(c);
            }
        }
        if OURS.contains(&key.as_str()) {
            settings.take(&key, value);
        } else {
            let quoted = value.replace('\\', "\\\\").replace('\'', "\\'");
            kept.push(format!("{key}='{quoted}'"));
        }
    }
    (kept.join(" "), settings)
}

/// The connection string with its password replaced by `<redacted>` (URL user info,
/// `password=` in a URL's query or in key=value form), for logs and `--print-config`.
pub fn redact(database_url: &str) -> String {
    let text = database_url.trim();
    let mut out = if let Some(rest) = text
        .strip_prefix("postgres://")
        .map(|r| ("postgres://", r))
        .or_else(|| {
            text.strip_prefix("postgresql://")
                .map(|r| ("postgresql://", r))
        }) {
        let (scheme, rest) = rest;
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        match authority.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}{user}:<redacted>@{host}{tail}"),
                None => text.to_owned(),
            },
            None => text.to_owned(),
        }
    } else {
        text.to_owned()
    };
    // `password=…` anywhere: key=value (maybe quoted) or a URL query parameter.
    let mut result = String::with_capacity(out.len());
    while let Some(at) = out.find("password=") {
        let boundary = at == 0 || matches!(out.as_bytes()[at - 1], b' ' | b'?' | b'&' | b'\t');
        let value_start = at + "password=".len();
        result.push_str(&out[..value_start]);
        if !boundary {
            out = out[value_start..].to_owned();
            continue;
        }
        let rest = &out[value_start..];
        let end = if let Some(quoted) = rest.strip_prefix('\'') {
            let mut escaped = false;
            let mut close = rest.len();
            for (i, c) in quoted.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '\'' if !escaped => {
                        close = i + 2;
                        break;
                    }
                    _ => escaped = false,
                }
            }
            close
        } else {
            rest.find([' ', '&', '\t']).unwrap_or(rest.len())
        };
        result.push_str("<redacted>");
        out = rest[end..].to_owned();
    }
    result.push_str(&out);
    result
}

/// Parses a connection string and builds its TLS connector.
pub fn target(database_url: &str) -> Result<Target, TlsError> {
    let (rest, settings) = split(database_url);
    let mut config: tokio_postgres::Config = rest.parse().map_err(TlsError::Parse)?;
    let mode = match settings.mode.as_deref() {
        None | Some("prefer") | Some("allow") => SslMode::Prefer,
        Some("disable") => SslMode::Disable,
        Some("require") => SslMode::Require,
        Some("verify-ca") => SslMode::VerifyCa,
        Some("verify-full") => SslMode::VerifyFull,
        Some(other) => return Err(TlsError::BadMode(other.to_owned())),
    };
    config.ssl_mode(match mode {
        SslMode::Disable => PgSslMode::Disable,
        SslMode::Prefer => PgSslMode::Prefer,
        _ => PgSslMode::Require,
    });
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => {
            Arc::new(Unverified(Arc::clone(&provider)))
        }
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let roots = roots(settings.root_cert.as_deref())?;
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                    .build()
                    .map_err(|e| TlsError::File {
                        what: "root certificates",
                        path: settings.root_cert.clone().unwrap_or_default().into(),
                        reason: e.to_string(),
                    })?;
            if mode == SslMode::VerifyCa {
                Arc::new(AnyName(webpki))
            } else {
                webpki
            }
        }
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::ClientCert)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let client_config = match (&settings.cert, &settings.key) {
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
    Ok(Target {
        config,
        tls: MakeRustlsConnect::new(client_config),
        mode,
    })
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

/// The trusted roots for `verify-ca` / `verify-full`.
fn roots(root_cert: Option<&str>) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    let file = match root_cert {
        Some("system") => None,
        Some(path) => Some(PathBuf::from(path)),
        None => std::env::var_os("HOME")
            .map(|home| Path::new(&home).join(".postgresql/root.crt"))
            .filter(|p| p.exists()),
    };
    match file {
        Some(path) => {
            for cert in certificates(&path, "root certificate")? {
                store.add(cert).map_err(|e| TlsError::File {
                    what: "root certificate",
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            }
        }
        None => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(store)
}

/// `verify-ca`: the chain must lead to a trusted root; the name is not checked.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
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
        );
        assert_eq!(
            rest,
            "postgres://u:p%40ss@db.example.com:5433/app?application_name=x"
        );
        assert_eq!(s.mode.as_deref(), Some("verify-full"));
        assert_eq!(s.root_cert.as_deref(), Some("/etc/ca.pem"));

        let (rest, s) = split(
            "host=db port = 5432 password='a\\'b c' sslmode=verify-ca sslrootcert='/a b/ca.pem' dbname=app",
        );
        assert_eq!(s.mode.as_deref(), Some("verify-ca"));
        assert_eq!(s.root_cert.as_deref(), Some("/a b/ca.pem"));
        let config: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(config.get_dbname(), Some("app"));
        assert_eq!(config.get_ports(), [5432]);
        assert_eq!(config.get_password(), Some(&b"a'b c"[..]));
        assert!(split("postgres://h/db").1 == Settings::default());
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
}
