//! Who is asking: JWTs (HMAC secrets, PEM public keys, a JWKS file) and API keys, turned into
//! a [`Principal`] (a role and claims) that [`super::policy`] decides on.
//!
//! Verification is `jsonwebtoken`'s: the header's `alg` must be one the configuration allows
//! for the key it selects (no `none`, no HMAC with a public key), `exp` and `nbf` are checked
//! with a small leeway, `aud` and `iss` when configured. API keys are stored as SHA-256
//! digests; a presented key is hashed and looked up. Tokens never reach a log or an error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// A secret read from the configuration: shown as `<redacted>` in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where JWT verification keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// An HMAC secret (HS256/384/512).
    Secret(Secret),
    /// A file holding an HMAC secret (reloaded when it changes).
    SecretFile(PathBuf),
    /// A PEM public key: RSA (RS*, PS*), EC (ES256/384) or Ed25519 (EdDSA).
    PublicKeyFile(PathBuf),
    /// A JWKS document (`{"keys":[…]}`), keys chosen by `kid` (reloaded when it changes).
    JwksFile(PathBuf),
}

impl KeySource {
    fn path(&self) -> Option<&Path> {
        match self {
            KeySource::Secret(_) => None,
            KeySource::SecretFile(p) | KeySource::PublicKeyFile(p) | KeySource::JwksFile(p) => {
                Some(p)
            }
        }
    }
}

/// JWT settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtConfig {
    /// The verification keys.
    pub keys: KeySource,
    /// Algorithms accepted; empty means every algorithm of the key's family.
    pub algorithms: Vec<Algorithm>,
    /// Accepted audiences (`aud` must name one); `None` skips the check.
    pub audience: Option<Vec<String>>,
    /// Accepted issuers; `None` skips the check.
    pub issuer: Option<Vec<String>>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// Refuse tokens without `exp`.
    pub require_exp: bool,
}

/// An API key: its SHA-256 digest, and who presenting it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// SHA-256 of the key.
    pub sha256: [u8; 32],
    /// The role it acts as.
    pub role: String,
    /// Claims policies can bind to (`{claims.tenant_id}`).
    pub claims: Map<String, Value>,
}

/// How callers authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// JWT verification, if enabled.
    pub jwt: Option<JwtConfig>,
    /// API keys.
    pub api_keys: Vec<ApiKey>,
    /// The claim holding the role: a dotted path (`role`, `app_metadata.role`).
    pub role_claim: String,
    /// The role of a token without the role claim.
    pub default_role: String,
    /// The role of requests without a token; `None` refuses them (when auth is enabled).
    pub anonymous_role: Option<String>,
    /// How long a socket may take to send its `auth` message when it connected without a token.
    pub auth_timeout: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            jwt: None,
            api_keys: Vec::new(),
            role_claim: "role".to_owned(),
            default_role: "authenticated".to_owned(),
            anonymous_role: None,
            auth_timeout: Duration::from_secs(10),
        }
    }
}

impl AuthConfig {
    /// Whether callers must authenticate (JWT or API keys configured).
    pub fn enabled(&self) -> bool {
        self.jwt.is_some() || !self.api_keys.is_empty()
    }
}

/// Who a request or socket acts for.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    /// The role policies are chosen by.
    pub role: String,
    /// The token's claims (an API key's configured claims; empty when anonymous).
    pub claims: Map<String, Value>,
    /// When the token expires (seconds since the epoch).
    pub expires_at: Option<u64>,
    /// No token was presented.
    pub anonymous: bool,
}

impl Principal {
    /// How long until the token expires (zero when it has), or `None` if it never does.
    pub fn expires_in(&self) -> Option<Duration> {
        let exp = self.expires_at?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Some(Duration::from_secs(exp).saturating_sub(now))
    }
}

/// Why a token was refused. The messages name the reason, never the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token, and anonymous access is off. (Where a token may come from depends on the
    /// route: REST and WebSocket say so in their own messages.)
    #[error("Authentication required")]
    Missing,
    /// The token has expired.
    #[error("The token has expired")]
    Expired,
    /// Anything else: bad signature, unknown key, wrong algorithm, audience, issuer, format.
    #[error("Invalid token: {0}")]
    Invalid(&'static str),
}

/// Keys as last loaded.
#[derive(Default)]
struct KeySet {
    /// Keys with a `kid`.
    by_kid: HashMap<String, (DecodingKey, Vec<Algorithm>)>,
    /// Every key, each with the algorithms it may verify.
    all: Vec<(DecodingKey, Vec<Algorithm>)>,
}

/// Verifies tokens; its keys can be reloaded while it serves.
pub struct Authenticator {
    config: AuthConfig,
    keys: RwLock<Arc<KeySet>>,
    api_keys: HashMap<[u8; 32], (String, Map<String, Value>)>,
    /// (modified time, length) of the key file as last loaded.
    loaded: RwLock<Option<(SystemTime, u64)>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").finish_non_exhaustive()
    }
}

/// The shortest HMAC secret accepted (`--jwt-secret` and `--jwt-secret-file` alike): as long
/// as HS256's hash, so a secret cannot be guessed faster than a key.
pub const MIN_SECRET_BYTES: usize = 32;

const HMAC: [Algorithm; 3] = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
const RSA: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// Parses an algorithm name (`HS256`, `RS256`, `ES256`, `EdDSA`, …).
pub fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    Algorithm::from_str(name.trim()).map_err(|_| {
        format!(
            "unknown JWT algorithm {name:?} (HS256/384/512, RS256/384/512, PS256/384/512, ES256/384, EdDSA)"
        )
    })
}

/// The SHA-256 of an API key, as the configuration stores it (lowercase hex).
pub fn api_key_digest(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a 64-digit hex SHA-256.
pub fn parse_digest(text: &str) -> Result<[u8; 32], String> {
    let text = text.trim();
    if text.len() != 64 || !text.is_ascii() {
        return Err("an API key's sha256 must be 64 hex digits".to_owned());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
            .map_err(|_| "an API key's sha256 must be 64 hex digits".to_owned())?;
    }
    Ok(out)
}

impl Authenticator {
    /// Loads the keys; errors name the file and what is wrong with it.
    pub fn new(config: AuthConfig) -> Result<Self, String> {
        let api_keys = config
            .api_keys
            .iter()
            .map(|k| (k.sha256, (k.role.clone(), k.claims.clone())))
            .collect();
        let auth = Authenticator {
            config,
            keys: RwLock::new(Arc::new(KeySet::default())),
            api_keys,
            loaded: RwLock::new(None),
        };
        auth.reload()?;
        Ok(auth)
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// Reads the key source again. On error the keys in use stay.
    pub fn reload(&self) -> Result<(), String> {
        let Some(jwt) = &self.config.jwt else {
            return Ok(());
        };
        let stamp = jwt.keys.path().and_then(file_stamp);
        let set = load_keys(jwt)?;
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
        *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = stamp;
        Ok(())
    }

    /// Reloads the key file when it changed since it was loaded.
    fn reload_if_changed(&self) {
        let Some(path) = self.config.jwt.as_ref().and_then(|j| j.keys.path()) else {
            return;
        };
        let now = file_stamp(path);
        let loaded = *self.loaded.read().unwrap_or_else(|e| e.into_inner());
        if now.is_some() && now != loaded {
            match self.reload() {
                Ok(()) => tracing::info!(file = %path.display(), "JWT keys reloaded"),
                Err(err) => {
                    // Keep serving with the keys in use; try again when the file changes.
                    *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = now;
                    tracing::error!(error = %err, "JWT keys not reloaded; the previous keys stay in use");
                }
            }
        }
    }

    /// Watches the key file (and SIGHUP) until `token` is cancelled.
    pub async fn watch(self: Arc<Self>, token: CancellationToken) {
        if self
            .config
            .jwt
            .as_ref()
            .and_then(|j| j.keys.path())
            .is_none()
        {
            return;
        }
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let hangup = async {
                match hup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hangup = std::future::pending::<()>();
            tokio::select! {
                _ = token.cancelled() => return,
                _ = hangup => {
                    if let Err(err) = self.reload() {
                        tracing::error!(error = %err, "JWT keys not reloaded on SIGHUP; the previous keys stay in use");
                    } else {
                        tracing::info!("JWT keys reloaded on SIGHUP");
                    }
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => self.reload_if_changed(),
            }
        }
    }

    /// The principal of a request that presented `token` (or none).
    pub fn authenticate(&self, token: Option<&str>) -> Result<Principal, AuthError> {
        let token = token.map(str::trim).filter(|t| !t.is_empty());
        let Some(token) = token else {
            return self.anonymous();
        };
        if !self.config.enabled() {
            // Nothing to check a token against: everyone is the anonymous caller.
            return self.anonymous();
        }
        if token.split('.').count() == 3
            && let Some(jwt) = &self.config.jwt
        {
            return self.verify_jwt(jwt, token);
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        match self.api_keys.get(&digest) {
            Some((role, claims)) => Ok(Principal {
                role: role.clone(),
                claims: claims.clone(),
                expires_at: None,
                anonymous: false,
            }),
            None => Err(AuthError::Invalid("unknown API key or malformed token")),
        }
    }

    fn anonymous(&self) -> Result<Principal, AuthError> {
        let role = if self.config.enabled() {
            self.config
                .anonymous_role
                .clone()
                .ok_or(AuthError::Missing)?
        } else {
            self.config
                .anonymous_role
                .clone()
                .unwrap_or_else(|| "anon".to_owned())
        };
        Ok(Principal {
            role,
            claims: Map::new(),
            expires_at: None,
            anonymous: true,
        })
    }

    fn verify_jwt(&self, jwt: &JwtConfig, token: &str) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Invalid("malformed token"))?;
        let keys = Arc::clone(&self.keys.read().unwrap_or_else(|e| e.into_inner()));
        let candidates: Vec<&(DecodingKey, Vec<Algorithm>)> = match &header.kid {
            Some(kid) if !keys.by_kid.is_empty() => keys.by_kid.get(kid).into_iter().collect(),
            _ => keys.all.iter().collect(),
        };
        let mut validation = Validation::new(header.alg);
        validation.leeway = jwt.leeway.as_secs();
        validation.validate_nbf = true;
        validation.required_spec_claims.clear();
        if jwt.require_exp {
            validation.required_spec_claims.insert("exp".to_owned());
        }
        validation.validate_aud = jwt.audience.is_some();
        if let Some(aud) = &jwt.audience {
            validation.set_audience(aud);
        }
        if let Some(iss) = &jwt.issuer {
            validation.set_issuer(iss);
        }
        let mut error = AuthError::Invalid("no key for this token's algorithm or key id");
        for (key, algorithms) in candidates {
            if !algorithms.contains(&header.alg) {
                continue;
            }
            match jsonwebtoken::decode::<Value>(token, key, &validation) {
                Ok(data) => return self.principal_of(data.claims),
                Err(err) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    error = match err.kind() {
                        K::ExpiredSignature => return Err(AuthError::Expired),
                        K::ImmatureSignature => {
                            return Err(AuthError::Invalid("token not valid yet (nbf)"));
                        }
                        K::InvalidAudience => return Err(AuthError::Invalid("wrong audience")),
                        K::InvalidIssuer => return Err(AuthError::Invalid("wrong issuer")),
                        K::MissingRequiredClaim(_) => {
                            return Err(AuthError::Invalid("token has no exp"));
                        }
                        K::InvalidSignature => AuthError::Invalid("bad signature"),
                        _ => AuthError::Invalid("token cannot be verified"),
                    };
                }
            }
        }
        Err(error)
    }

    fn principal_of(&self, claims: Value) -> Result<Principal, AuthError> {
        let Value::Object(claims) = claims else {
            return Err(AuthError::Invalid("claims are not an object"));
        };
        let role = match claim(&claims, &self.config.role_claim) {
            None | Some(Value::Null) => self.config.default_role.clone(),
            Some(Value::String(role)) if !role.is_empty() => role.clone(),
            Some(_) => return Err(AuthError::Invalid("the role claim is not a string")),
        };
        let expires_at = claims.get("exp").and_then(Value::as_u64);
        Ok(Principal {
            role,
            claims,
            expires_at,
            anonymous: false,
        })
    }
}

/// The claim at a dotted path (`app_metadata.role`).
pub fn claim<'a>(claims: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut value = claims.get(parts.next()?)?;
    for part in parts {
        value = value.as_object()?.get(part)?;
    }
    Some(value)
}

fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn allowed(jwt: &JwtConfig, family: &[Algorithm]) -> Vec<Algorithm> {
    family
        .iter()
        .copied()
        .filter(|a| jwt.algorithms.is_empty() || jwt.algorithms.contains(a))
        .collect()
}

fn load_keys(jwt: &JwtConfig) -> Result<KeySet, String> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    let mut set = KeySet::default();
    match &jwt.keys {
        KeySource::Secret(secret) => set.all.push((
            DecodingKey::from_secret(secret.0.as_bytes()),
            allowed(jwt, &HMAC),
        )),
        KeySource::SecretFile(path) => {
            let bytes = read(path)?;
            let text = String::from_utf8(bytes)
                .map_err(|_| format!("{} is not UTF-8 text", path.display()))?;
            // One trailing line break (what `echo` and editors add) is not part of the secret.
            let secret = text
                .strip_suffix("\r\n")
                .or_else(|| text.strip_suffix('\n'))
                .unwrap_or(&text);
            if secret.len() < MIN_SECRET_BYTES {
                return Err(format!(
                    "--jwt-secret-file {}: the secret must be at least {MIN_SECRET_BYTES} bytes \
                     (HMAC keys shorter than the hash are guessable)",
                    path.display()
                ));
            }
            set.all.push((
                DecodingKey::from_secret(secret.as_bytes()),
                allowed(jwt, &HMAC),
            ));
        }
        KeySource::PublicKeyFile(path) => {
            let pem = read(path)?;
            let key = if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                (key, allowed(jwt, &RSA))
            } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                (key, allowed(jwt, &[Algorithm::ES256, Algorithm::ES384]))
            } else if let Ok(key) = DecodingKey::from_ed_pem(&pem) {
                (key, allowed(jwt, &[Algorithm::EdDSA]))
            } else {
                return Err(format!(
                    "{} is not a PEM RSA, EC or Ed25519 public key",
                    path.display()
                ));
            };
            set.all.push(key);
        }
        KeySource::JwksFile(path) => {
            let doc: Value = serde_json::from_slice(&read(path)?)
                .map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
            let Some(list) = doc.get("keys").and_then(Value::as_array) else {
                return Err(format!("{} has no \"keys\" array", path.display()));
            };
            for (i, item) in list.iter().enumerate() {
                let parsed = serde_json::from_value::<Jwk>(item.clone())
                    .map_err(|e| e.to_string())
                    .and_then(|jwk| {
                        let key = DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())?;
                        Ok((jwk, key))
                    });
                let (jwk, key) = match parsed {
                    Ok(parsed) => parsed,
                    Err(err) => {
                        tracing::warn!(file = %path.display(), index = i, error = %err, "skipping a JWKS key pgrelay cannot use");
                        continue;
                    }
                };
                let family: Vec<Algorithm> = match key.family() {
                    AlgorithmFamily::Hmac => HMAC.to_vec(),
                    AlgorithmFamily::Rsa => RSA.to_vec(),
                    AlgorithmFamily::Ec => vec![Algorithm::ES256, Algorithm::ES384],
                    AlgorithmFamily::Ed => vec![Algorithm::EdDSA],
                };
                // A key that names its algorithm verifies that one only.
                let named = jwk
                    .common
                    .key_algorithm
                    .and_then(|a| Algorithm::from_str(&format!("{a:?}")).ok());
                let mut algorithms = allowed(jwt, &family);
                if let Some(named) = named {
                    algorithms.retain(|a| *a == named);
                }
                if let Some(kid) = &jwk.common.key_id {
                    set.by_kid
                        .insert(kid.clone(), (key.clone(), algorithms.clone()));
                }
                set.all.push((key, algorithms));
            }
            if set.all.is_empty() {
                return Err(format!("{} holds no usable key", path.display()));
            }
        }
    }
    Ok(set)
}

/// The token a request carries: `Authorization: Bearer …`, else an `apikey` header (what
/// Supabase's clients send).
pub fn bearer(authorization: Option<&str>, apikey: Option<&str>) -> Option<String> {
    if let Some(value) = authorization {
        let value = value.trim();
        if let Some((scheme, token)) = value.split_once(' ')
            && scheme.eq_ignore_ascii_case("bearer")
        {
            return Some(token.trim().to_owned());
        }
    }
    apikey.map(|k| k.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn hs(secret: &str) -> Authenticator {
        Authenticator::new(AuthConfig {
            jwt: Some(JwtConfig {
                keys: KeySource::Secret(Secret(secret.into())),
                algorithms: vec![],
                audience: Some(vec!["pgrelay".into()]),
                issuer: None,
                leeway: Duration::from_secs(5),
                require_exp: true,
            }),
            ..AuthConfig::default()
        })
        .unwrap()
    }

    fn token(alg: Algorithm, secret: &str, claims: Value) -> String {
        encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn hmac_tokens_are_verified_with_their_claims() {
        let auth = hs("s3cret");
        let t = token(
            Algorithm::HS384,
            "s3cret",
            json!({"exp": now() + 60, "aud": "pgrelay", "role": "member", "tenant": 7}),
        );
        let p = auth.authenticate(Some(&t)).unwrap();
        assert_eq!(p.role, "member");
        assert_eq!(p.claims["tenant"], 7);
        assert!(p.expires_in().unwrap() > Duration::from_secs(50));
        let no_role = token(
            Algorithm::HS256,
            "s3cret",
            json!({"exp": now() + 60, "aud": "pgrelay"}),
        );
        assert_eq!(
            auth.authenticate(Some(&no_role)).unwrap().role,
            "authenticated"
        );
    }

    #[test]
    fn bad_tokens_are_refused_for_a_reason() {
        let auth = hs("s3cret");
        let claims = json!({"exp": now() + 60, "aud": "pgrelay"});
        assert_eq!(
            auth.authenticate(Some(&token(Algorithm::HS256, "other", claims.clone()))),
            Err(AuthError::Invalid("bad signature"))
        );
        let expired = json!({"exp": now() - 60, "aud": "pgrelay"});
        assert_eq!(
            auth.authenticate(Some(&token(Algorithm::HS256, "s3cret", expired))),
            Err(AuthError::Expired)
        );
        let wrong_aud = json!({"exp": now() + 60, "aud": "other"});
        assert_eq!(
            auth.authenticate(Some(&token(Algorithm::HS256, "s3cret", wrong_aud))),
            Err(AuthError::Invalid("wrong audience"))
        );
        let no_exp = json!({"aud": "pgrelay"});
        assert!(
            auth.authenticate(Some(&token(Algorithm::HS256, "s3cret", no_exp)))
                .is_err()
        );
        let future = json!({"exp": now() + 600, "nbf": now() + 300, "aud": "pgrelay"});
        assert!(
            auth.authenticate(Some(&token(Algorithm::HS256, "s3cret", future)))
                .is_err()
        );
        // alg: none, hand-made.
        let b64 = |v: &Value| {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let none = format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "JWT"})),
            b64(&json!({"exp": now() + 60, "aud": "pgrelay", "role": "admin"}))
        );
        assert!(auth.authenticate(Some(&none)).is_err());
        assert_eq!(auth.authenticate(None), Err(AuthError::Missing));
        assert!(auth.authenticate(Some("garbage")).is_err());
    }

    #[test]
    fn api_keys_are_found_by_digest() {
        let auth = Authenticator::new(AuthConfig {
            api_keys: vec![ApiKey {
                sha256: parse_digest(&api_key_digest("k-123")).unwrap(),
                role: "service".into(),
                claims: json!({"tenant_id": 3}).as_object().unwrap().clone(),
            }],
            anonymous_role: Some("anon".into()),
            ..AuthConfig::default()
        })
        .unwrap();
        let p = auth.authenticate(Some("k-123")).unwrap();
        assert_eq!(
            (p.role.as_str(), p.claims["tenant_id"].as_i64()),
            ("service", Some(3))
        );
        assert!(auth.authenticate(Some("k-124")).is_err());
        let anon = auth.authenticate(None).unwrap();
        assert!(anon.anonymous);
        assert_eq!(anon.role, "anon");
        assert!(parse_digest("abc").is_err());
    }

    #[test]
    fn claims_are_found_by_path_and_tokens_in_headers() {
        let claims = json!({"app": {"role": "x"}}).as_object().unwrap().clone();
        assert_eq!(claim(&claims, "app.role"), Some(&json!("x")));
        assert_eq!(claim(&claims, "app.none"), None);
        assert_eq!(bearer(Some("Bearer abc"), None).as_deref(), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc "), None).as_deref(), Some("abc"));
        assert_eq!(bearer(Some("Basic abc"), Some("k")).as_deref(), Some("k"));
        assert_eq!(bearer(None, None), None);
        assert_eq!(format!("{:?}", Secret("x".into())), "<redacted>");
    }
}
