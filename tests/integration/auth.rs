//! Authentication and policies, end to end: two tenants, tokens refused for every reason,
//! tokens in headers, query strings and messages, expiry and refresh, keys of every family,
//! and REST under the database's own row-level security.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use pgrelay::Config;
use pgrelay::settings::Settings;
use serde_json::{Value, json};

use crate::support::{Relay, Response, STEP, TestDb, http_as, http_raw, within};

const SECRET: &str = "a-test-secret-that-is-long-enough-for-hs256";

const DOCS: &str =
    "create table docs (id int primary key, tenant_id int not null, title text, secret text);
    create table other (id int primary key);";

/// Policies for `docs`: admins do anything, members read and write their tenant's rows
/// without the secret column, viewers read their tenant's rows.
const POLICIES: &str = r#"
[auth]
jwt_audience = ["pgrelay"]
[[auth.api_keys]]
sha256 = "SHA"
role = "member"
claims = { tenant_id = 2 }

[[policy]]
tables = ["docs", "other"]
roles = ["admin"]
read = true
insert = true
update = true
delete = true

[[policy]]
tables = ["docs"]
roles = ["member"]
read = true
insert = true
update = true
delete = true
filter = "tenant_id=eq.{claims.tenant_id}"
columns = ["tenant_id", "title"]

[[policy]]
tables = ["docs"]
roles = ["viewer"]
read = true
filter = "tenant_id=eq.{claims.tenant_id}"
"#;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hs256(claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn token(role: &str, tenant: i64, ttl: u64) -> String {
    hs256(json!({"role": role, "tenant_id": tenant, "aud": "pgrelay", "exp": now() + ttl}))
}

/// Applies `[auth]`, `[[policy]]`, `[limits]` and `rest_set_role` from TOML to a test config.
fn apply(config: &mut Config, toml: &str) {
    let mut settings = Settings::from_toml(toml).unwrap();
    settings.tables = Some(vec!["docs".into()]);
    let parsed = settings.into_config().unwrap();
    config.auth = parsed.auth;
    config.policies = parsed.policies;
    config.rest_set_role = parsed.rest_set_role;
    config.limits = parsed.limits;
}

const API_KEY: &str = "pgr_test_key_for_tenant_two";

async fn docs_relay(db: &TestDb) -> Relay {
    let toml = POLICIES.replace("SHA", &pgrelay::access::auth::api_key_digest(API_KEY));
    Relay::start_with(db, &["docs", "other"], |c| {
        apply(c, &toml);
        c.auth.jwt = Some(pgrelay::access::auth::JwtConfig {
            keys: pgrelay::access::auth::KeySource::Secret(pgrelay::access::auth::Secret(
                SECRET.into(),
            )),
            algorithms: vec![],
            audience: Some(vec!["pgrelay".into()]),
            issuer: None,
            leeway: Duration::from_secs(0),
            require_exp: true,
        });
        c.auth.auth_timeout = Duration::from_secs(2);
    })
    .await
}

fn ids(rows: &[Value]) -> BTreeSet<i64> {
    rows.iter().map(|r| r["id"].as_i64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_tenants_see_and_change_only_their_own_rows() {
    let db = TestDb::new()
        .await
        .with_tables(DOCS, &["docs", "other"])
        .await;
    db.exec(
        "insert into docs select n, 1 + n % 2, 'doc ' || n, 'secret ' || n from generate_series(1, 10) n",
    )
    .await;
    let relay = docs_relay(&db).await;
    let (one, two) = (token("member", 1, 600), token("member", 2, 600));

    // Initial data: each tenant's rows, without the hidden column.
    let mut a = relay
        .ws(&format!("/ws/docs?snapshot=true&access_token={one}"))
        .await;
    let mut b = relay.ws_as("/ws/docs?snapshot=true", &two).await;
    let a_rows = a.initial_rows().await;
    let b_rows = b.initial_rows().await;
    assert_eq!(ids(&a_rows), [2, 4, 6, 8, 10].into());
    assert_eq!(ids(&b_rows), [1, 3, 5, 7, 9].into());
    for row in a_rows.iter().chain(&b_rows) {
        assert!(row.get("secret").is_none(), "{row}");
        assert!(row.get("title").is_some(), "{row}");
    }

    // Live, two writers at once: each subscriber gets its own tenant's changes only.
    let writers: Vec<_> = (1..=2)
        .map(|tenant: i32| {
            let url = db.url.clone();
            tokio::spawn(async move {
                let client = crate::support::connect(&url).await;
                for n in 0..20 {
                    let id = 1000 * tenant + n;
                    client
                        .execute(
                            "insert into docs values ($1, $2, 'live', 'hidden')",
                            &[&id, &tenant],
                        )
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        within(STEP, w).await.unwrap();
    }
    let a_live = a.events(20).await;
    let b_live = b.events(20).await;
    assert!(
        a_live
            .iter()
            .all(|e| e["data"]["tenant_id"] == 1 && e["data"].get("secret").is_none()),
        "{a_live:?}"
    );
    assert!(
        b_live.iter().all(|e| e["data"]["tenant_id"] == 2),
        "{b_live:?}"
    );
    let resume_from = a_live[14]["seq"].as_i64().unwrap();

    // Move-out: a's row moves to tenant 2. a gets a delete carrying the key only; b a create.
    db.exec("update docs set tenant_id = 2 where id = 2").await;
    let out = a.next_json().await;
    assert_eq!(out["type"], "delete", "{out}");
    assert_eq!(out["old"], json!({"id": 2}), "{out}");
    assert_eq!(out["id"], 2);
    let moved_in = b.next_json().await;
    assert_eq!(moved_in["type"], "create", "{moved_in}");
    assert_eq!(
        moved_in["data"],
        json!({"id": 2, "tenant_id": 2, "title": "doc 2"})
    );

    // Resume: a replays from before the move and sees only its own events.
    drop(a);
    let mut a = relay
        .ws(&format!("/ws/docs?since={resume_from}&access_token={one}"))
        .await;
    // (A resume may repeat events at its edge; applying them again changes nothing.)
    let mut replay = Vec::new();
    while replay.len() < 30 {
        let e = a.next_json().await;
        let done = e["type"] == "delete";
        replay.push(e);
        if done {
            break;
        }
    }
    let (delete, creates) = replay.split_last().unwrap();
    assert_eq!(delete["old"], json!({"id": 2}), "{replay:?}");
    assert!(
        creates
            .iter()
            .all(|e| e["type"] == "create" && e["data"]["tenant_id"] == 1),
        "{replay:?}"
    );
    let replayed = ids(&creates
        .iter()
        .map(|e| e["data"].clone())
        .collect::<Vec<_>>());
    assert!(
        replayed.is_superset(&(1015..1020).collect()),
        "{replayed:?}"
    );

    // REST reads: own rows only, hidden column unknown, other tenant's row not found.
    let list = http_as(relay.addr, "GET", "/api/docs?limit=1000", Some(&one), None).await;
    assert_eq!(list.status, 200);
    let listed = list.json.as_array().unwrap();
    assert!(
        listed
            .iter()
            .all(|r| r["tenant_id"] == 1 && r.get("secret").is_none())
    );
    assert_eq!(listed.len(), 4 + 20);
    let foreign = http_as(relay.addr, "GET", "/api/docs/1", Some(&one), None).await;
    assert_eq!(foreign.status, 404);
    for hidden in [
        "/api/docs?select=secret",
        "/api/docs?secret=eq.x",
        "/api/docs?order=secret",
    ] {
        let r = http_as(relay.addr, "GET", hidden, Some(&one), None).await;
        assert_eq!(
            (r.status, r.json["code"].as_str()),
            (400, Some("42703")),
            "{hidden}"
        );
    }
    let mut sub = relay
        .ws(&format!("/ws/docs?secret=eq.x&access_token={one}"))
        .await;
    assert_eq!(sub.next_json().await["code"], "bad_request");
    assert_eq!(sub.expect_close().await, Some(4400));

    // REST writes: only rows of one's own tenant, before and after.
    let other_tenant = json!({"id": 500, "tenant_id": 2, "title": "x"});
    let r = http_as(
        relay.addr,
        "POST",
        "/api/docs",
        Some(&one),
        Some(&other_tenant),
    )
    .await;
    assert_eq!(r.status, 403, "{:?}", r.json);
    let r = http_as(
        relay.addr,
        "POST",
        "/api/docs",
        Some(&one),
        Some(&json!({"id": 501, "tenant_id": 1, "title": "mine"})),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.json);
    assert_eq!(r.body(), "", "PostgREST returns nothing unless asked");
    let r = http_as(
        relay.addr,
        "POST",
        "/api/docs",
        Some(&one),
        Some(&json!({"id": 502, "tenant_id": 1, "secret": "s"})),
    )
    .await;
    assert_eq!((r.status, r.json["code"].as_str()), (400, Some("PGRST204")));
    let r = http_as(
        relay.addr,
        "PATCH",
        "/api/docs/1",
        Some(&one),
        Some(&json!({"title": "mine now"})),
    )
    .await;
    assert_eq!(r.status, 404);
    let r = http_as(
        relay.addr,
        "PATCH",
        "/api/docs/4",
        Some(&one),
        Some(&json!({"tenant_id": 2})),
    )
    .await;
    assert_eq!(r.status, 403);
    let r = http_as(
        relay.addr,
        "PATCH",
        "/api/docs/4",
        Some(&one),
        Some(&json!({"title": "renamed"})),
    )
    .await;
    assert_eq!((r.status, &r.json["title"]), (200, &json!("renamed")));
    let r = http_as(relay.addr, "DELETE", "/api/docs/3", Some(&one), None).await;
    assert_eq!(r.status, 404);
    let r = http_as(
        relay.addr,
        "PUT",
        "/api/docs/4",
        Some(&one),
        Some(&json!({"tenant_id": 1})),
    )
    .await;
    assert_eq!(r.status, 403, "PUT would reset the hidden column");
    let client = db.client().await;
    let stored: Vec<(i32, i32, Option<String>)> = client
        .query("select id, tenant_id, secret from docs where id in (1, 3, 4, 500, 501, 502) order by id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        stored,
        vec![
            (1, 2, Some("secret 1".into())),
            (3, 2, Some("secret 3".into())),
            (4, 1, Some("secret 4".into())),
            (501, 1, None),
        ]
    );

    // An API key acts as its role with its claims.
    let r = http_as(relay.addr, "GET", "/api/docs/3", Some(API_KEY), None).await;
    assert_eq!((r.status, &r.json["tenant_id"]), (200, &json!(2)));
    // A table no policy grants this role is not there; a viewer may not write.
    let r = http_as(relay.addr, "GET", "/api/other", Some(&one), None).await;
    assert_eq!(r.status, 404);
    let mut ws = relay.ws(&format!("/ws/other?access_token={one}")).await;
    assert_eq!(ws.next_json().await["code"], "not_found");
    assert_eq!(ws.expect_close().await, Some(4004));
    let viewer = token("viewer", 1, 600);
    let r = http_as(relay.addr, "DELETE", "/api/docs/4", Some(&viewer), None).await;
    assert_eq!((r.status, r.json["code"].as_str()), (403, Some("42501")));
    // An admin sees everything.
    let admin = token("admin", 0, 600);
    let r = http_as(relay.addr, "GET", "/api/docs/1", Some(&admin), None).await;
    assert_eq!(r.json["secret"], "secret 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_before_anything_is_read_or_written() {
    let db = TestDb::new()
        .await
        .with_tables(DOCS, &["docs", "other"])
        .await;
    db.exec("insert into docs values (1, 1, 't', 's')").await;
    let relay = docs_relay(&db).await;
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &json!({"role": "admin", "aud": "pgrelay", "exp": now() + 60}),
        &EncodingKey::from_secret(b"some-other-secret-some-other-secret"),
    )
    .unwrap();
    let expired = hs256(json!({"role": "admin", "aud": "pgrelay", "exp": now() - 10}));
    let wrong_aud = hs256(json!({"role": "admin", "aud": "elsewhere", "exp": now() + 60}));
    let no_exp = hs256(json!({"role": "admin", "aud": "pgrelay"}));
    let alg_none = {
        use base64::Engine;
        let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.",
            b64(json!({"alg": "none", "typ": "JWT"})),
            b64(json!({"role": "admin", "aud": "pgrelay", "exp": now() + 60}))
        )
    };
    // HS256 signed with the RSA public key's PEM as the secret: algorithm confusion.
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &json!({"role": "admin", "aud": "pgrelay", "exp": now() + 60}),
        &EncodingKey::from_secret(include_bytes!("../fixtures/jwt_rsa.pub.pem")),
    )
    .unwrap();
    let cases = [
        ("no token", None, "unauthorized"),
        ("bad signature", Some(forged.as_str()), "unauthorized"),
        ("expired", Some(expired.as_str()), "token_expired"),
        ("wrong audience", Some(wrong_aud.as_str()), "unauthorized"),
        ("no exp", Some(no_exp.as_str()), "unauthorized"),
        ("alg none", Some(alg_none.as_str()), "unauthorized"),
        (
            "algorithm confusion",
            Some(confused.as_str()),
            "unauthorized",
        ),
        ("garbage", Some("not-a-token"), "unauthorized"),
    ];
    for (what, token, code) in cases {
        let r = http_as(relay.addr, "GET", "/api/docs", token, None).await;
        // REST answers with PostgREST's codes, sockets with their own.
        let rest_code = match code {
            _ if token.is_none() => "PGRST302",
            "token_expired" => "PGRST303",
            _ => "PGRST301",
        };
        assert_eq!(
            (r.status, r.json["code"].as_str()),
            (401, Some(rest_code)),
            "{what}: {:?}",
            r.json
        );
        let r = http_as(relay.addr, "DELETE", "/api/docs/1", token, None).await;
        assert_eq!(r.status, 401, "{what}");
        if let Some(token) = token {
            // After the upgrade: an error message, then 4001.
            let mut ws = relay.ws(&format!("/ws/docs?access_token={token}")).await;
            let error = ws.next_json().await;
            assert_eq!(error["code"], code, "{what}: {error}");
            assert_eq!(ws.expect_close().await, Some(4001), "{what}");
            let mut ws = relay.ws("/ws").await;
            ws.send_json(json!({"type": "auth", "token": token})).await;
            assert_eq!(ws.next_json().await["code"], code, "{what}");
            assert_eq!(ws.expect_close().await, Some(4001), "{what}");
        }
    }
    let count: i64 = db
        .client()
        .await
        .query_one("select count(*) from docs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1, "nothing was deleted");

    // A socket without a token may only authenticate: anything else, or silence, closes it.
    let mut ws = relay.ws("/ws").await;
    ws.send_json(json!({"type": "subscribe", "resource": "docs"}))
        .await;
    assert_eq!(ws.next_json().await["code"], "unauthorized");
    assert_eq!(ws.expect_close().await, Some(4001));
    let mut ws = relay.ws("/ws/docs").await;
    assert_eq!(ws.next_json().await["code"], "unauthorized");
    assert_eq!(ws.expect_close().await, Some(4001));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_authenticates_in_band_refreshes_and_closes_when_its_token_expires() {
    let db = TestDb::new()
        .await
        .with_tables(DOCS, &["docs", "other"])
        .await;
    let relay = docs_relay(&db).await;

    // Token in the first message (browsers cannot set headers on a WebSocket), living 8 s.
    let first_exp = now() + 8;
    let first =
        hs256(json!({"role": "member", "tenant_id": 1, "aud": "pgrelay", "exp": first_exp}));
    let mut ws = relay.ws("/ws/docs").await;
    ws.send_json(json!({"type": "auth", "token": first})).await;
    let ok = ws.next_json().await;
    assert_eq!(ok["type"], "authenticated", "{ok}");
    assert_eq!(ok["role"], "member");
    db.exec("insert into docs values (1, 1, 'a', 's'), (2, 2, 'b', 's')")
        .await;
    let e = ws.next_json().await;
    assert_eq!(
        (e["type"].as_str(), e["id"].as_i64()),
        (Some("create"), Some(1)),
        "{e}"
    );

    // Refreshed before exp with a token for the same access: the socket stays past the first exp.
    ws.send_json(json!({"type": "auth", "token": token("member", 1, 600)}))
        .await;
    assert_eq!(ws.next_json().await["type"], "authenticated");
    tokio::time::sleep(Duration::from_secs((first_exp + 1).saturating_sub(now()))).await;
    db.exec("insert into docs values (3, 1, 'c', 's')").await;
    let e = ws.next_json().await;
    assert_eq!(e["id"], 3, "{e}");

    // A token for other rows is refused: the client reconnects with it.
    ws.send_json(json!({"type": "auth", "token": token("member", 2, 600)}))
        .await;
    assert_eq!(ws.next_json().await["code"], "auth_changed");
    assert_eq!(ws.expect_close().await, Some(4001));

    // Not refreshed: closed at exp with 4001 (not at the next ping timeout, 45 s, nor after the
    // default leeway, 30 s; the margin is for a loaded CI machine).
    let exp = now() + 2;
    let mut ws = relay.ws_as("/ws/docs", &token("member", 1, 2)).await;
    let error = ws.next_json().await;
    assert_eq!(error["code"], "token_expired", "{error}");
    assert_eq!(ws.expect_close().await, Some(4001));
    let closed = now();
    assert!(
        closed >= exp && closed <= exp + 10,
        "exp {exp}, closed at {closed}"
    );
}

/// EC and Ed25519 keys in a JWKS file (chosen by `kid`, reloaded when the file changes), and an
/// RSA public key file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_every_family_verify_and_a_jwks_file_is_reloaded() {
    use jsonwebtoken::jwk::{Jwk, JwkSet};
    let db = TestDb::new().await.with_tables(DOCS, &["docs"]).await;
    db.exec("insert into docs values (1, 1, 't', 's')").await;
    let dir = std::env::temp_dir().join(format!(
        "pgrelay-jwks-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let keypair =
        |alg: &'static rcgen::SignatureAlgorithm| rcgen::KeyPair::generate_for(alg).unwrap();
    let ec = keypair(&rcgen::PKCS_ECDSA_P256_SHA256);
    let ed = keypair(&rcgen::PKCS_ED25519);
    let ec_key = EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap();
    let ed_key = EncodingKey::from_ed_pem(ed.serialize_pem().as_bytes()).unwrap();
    let jwk = |key: &EncodingKey, alg, kid: &str| {
        let mut jwk = Jwk::from_encoding_key(key, alg).unwrap();
        jwk.common.key_id = Some(kid.into());
        jwk
    };
    // (jsonwebtoken cannot make an OKP JWK from a key: written out by hand.)
    let ed_jwk = |pair: &rcgen::KeyPair, kid: &str| -> Jwk {
        use base64::Engine;
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pair.public_key_raw());
        serde_json::from_value(
            json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA"}),
        )
        .unwrap()
    };
    let jwks_path = dir.join("jwks.json");
    let write_jwks = |keys: Vec<Jwk>| {
        let text = serde_json::to_string(&JwkSet { keys }).unwrap();
        let tmp = dir.join("jwks.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &jwks_path).unwrap();
    };
    write_jwks(vec![jwk(&ec_key, Algorithm::ES256, "ec-1")]);
    let signed = |alg, kid: &str, key: &EncodingKey| {
        let mut header = Header::new(alg);
        header.kid = Some(kid.into());
        encode(&header, &json!({"role": "r", "exp": now() + 600}), key).unwrap()
    };
    let relay = Relay::start_with(&db, &["docs"], |c| {
        c.auth.jwt = Some(pgrelay::access::auth::JwtConfig {
            keys: pgrelay::access::auth::KeySource::JwksFile(jwks_path.clone()),
            algorithms: vec![],
            audience: None,
            issuer: None,
            leeway: Duration::from_secs(5),
            require_exp: true,
        });
    })
    .await;
    let ec_token = signed(Algorithm::ES256, "ec-1", &ec_key);
    let ed_token = signed(Algorithm::EdDSA, "ed-1", &ed_key);
    let get = |t: String| async move {
        http_as(relay.addr, "GET", "/api/docs/1", Some(&t), None)
            .await
            .status
    };
    assert_eq!(get(ec_token.clone()).await, 200);
    assert_eq!(get(ed_token.clone()).await, 401, "not in the file yet");
    // An HMAC token naming the EC key's kid (algorithm confusion): refused.
    let hmac = EncodingKey::from_secret(ec.public_key_pem().as_bytes());
    assert_eq!(get(signed(Algorithm::HS256, "ec-1", &hmac)).await, 401);

    // Rotation: the file now holds the Ed25519 key only.
    write_jwks(vec![ed_jwk(&ed, "ed-1")]);
    within(STEP, async {
        while get(ed_token.clone()).await != 200 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(
        get(ec_token).await,
        401,
        "the rotated-out key no longer verifies"
    );
    // A broken file keeps the keys in use.
    std::fs::write(&jwks_path, "{not json").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(get(ed_token).await, 200);
    drop(relay);

    // RS256 with a PEM public key.
    let rsa_pub = dir.join("rsa.pub.pem");
    std::fs::write(&rsa_pub, include_bytes!("../fixtures/jwt_rsa.pub.pem")).unwrap();
    let relay = Relay::start_with(&db, &["docs"], |c| {
        c.auth.jwt = Some(pgrelay::access::auth::JwtConfig {
            keys: pgrelay::access::auth::KeySource::PublicKeyFile(rsa_pub.clone()),
            algorithms: vec![Algorithm::RS256],
            audience: None,
            issuer: None,
            leeway: Duration::from_secs(5),
            require_exp: true,
        });
    })
    .await;
    let rsa = EncodingKey::from_rsa_pem(include_bytes!("../fixtures/jwt_rsa.pem")).unwrap();
    let claims = json!({"role": "r", "exp": now() + 600});
    let rs256 = encode(&Header::new(Algorithm::RS256), &claims, &rsa).unwrap();
    let rs512 = encode(&Header::new(Algorithm::RS512), &claims, &rsa).unwrap();
    let r = http_as(relay.addr, "GET", "/api/docs/1", Some(&rs256), None).await;
    assert_eq!(r.status, 200);
    let r = http_as(relay.addr, "GET", "/api/docs/1", Some(&rs512), None).await;
    assert_eq!(
        r.status, 401,
        "RS512 is not among the configured algorithms"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// PostgREST's model: REST runs as the token's database role with `request.jwt.claims` set,
/// so the database's own grants and row-level security decide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_can_run_as_the_callers_database_role_under_row_level_security() {
    let db = TestDb::new().await.with_tables(DOCS, &["docs"]).await;
    let role = format!("app_user_{}_{}", std::process::id(), rand::random::<u16>());
    db.exec(&format!(
        "insert into docs values (1, 1, 'one', 's'), (2, 2, 'two', 's');
         create role {role} nologin;
         grant select, insert, update on docs to {role};
         alter table docs enable row level security;
         create policy tenant on docs to {role}
           using (tenant_id = (current_setting('request.jwt.claims', true)::json->>'tenant_id')::int)
           with check (tenant_id = (current_setting('request.jwt.claims', true)::json->>'tenant_id')::int);"
    ))
    .await;
    let relay = Relay::start_with(&db, &["docs"], |c| {
        c.rest_set_role = true;
        c.auth.jwt = Some(pgrelay::access::auth::JwtConfig {
            keys: pgrelay::access::auth::KeySource::Secret(pgrelay::access::auth::Secret(
                SECRET.into(),
            )),
            algorithms: vec![],
            audience: None,
            issuer: None,
            leeway: Duration::from_secs(5),
            require_exp: true,
        });
    })
    .await;
    let t = hs256(json!({"role": role, "tenant_id": 1, "exp": now() + 600}));
    let list = http_as(relay.addr, "GET", "/api/docs", Some(&t), None).await;
    assert_eq!(list.status, 200);
    assert_eq!(
        list.json,
        json!([{"id": 1, "tenant_id": 1, "title": "one", "secret": "s"}])
    );
    let refused = http_as(
        relay.addr,
        "POST",
        "/api/docs",
        Some(&t),
        Some(&json!({"id": 3, "tenant_id": 2})),
    )
    .await;
    assert_eq!(refused.status, 403, "{:?}", refused.json);
    let allowed = http_as(
        relay.addr,
        "POST",
        "/api/docs",
        Some(&t),
        Some(&json!({"id": 4, "tenant_id": 1})),
    )
    .await;
    assert_eq!(allowed.status, 201, "{:?}", allowed.json);
    let denied = http_as(relay.addr, "DELETE", "/api/docs/1", Some(&t), None).await;
    assert_eq!(denied.status, 403, "no DELETE grant: {:?}", denied.json);
    let unknown_role = hs256(json!({"role": "no_such_role_here", "exp": now() + 600}));
    let r = http_as(relay.addr, "GET", "/api/docs", Some(&unknown_role), None).await;
    assert_eq!(r.status, 403);
    let ids: Vec<i32> = db
        .client()
        .await
        .query("select id from docs order by id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, vec![1, 2, 4]);
    drop(relay);
    db.exec(&format!("drop owned by {role}; drop role {role}"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_without_auth_refuses_to_listen_beyond_loopback_unless_told() {
    let db = TestDb::new().await.with_tables(DOCS, &["docs"]).await;
    let config = Config::new(
        db.url.clone(),
        vec![pgrelay::TableName::parse("docs").unwrap()],
    );
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let err = pgrelay::run(config.clone(), listener, std::future::pending())
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("--allow-anonymous"), "{err}");
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let allowed = Config {
        allow_anonymous: true,
        ..config
    };
    let server = tokio::spawn(pgrelay::run(allowed, listener, async {
        let _ = rx.await;
    }));
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    within(STEP, async {
        while !matches!(
            crate::support::http_get(addr, "/readyz").await,
            Ok((200, _))
        ) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let _ = tx.send(());
    within(STEP, server).await.unwrap().unwrap();
}

/// A request with extra header lines (each ending in `\r\n`).
async fn request_with(relay: &Relay, method: &str, path: &str, headers: &str) -> Response {
    let a = relay.addr;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\n{headers}Content-Length: 0\r\n"
    );
    within(STEP, http_raw(a, head, Vec::new())).await.unwrap()
}

/// Without a token nothing tells an exposed table from one that is not: a socket to any of
/// them waits for its `auth` message (a ping is answered), and learns only after it that
/// the table is unknown or forbidden (4004, the same message); plain HTTP and REST answer 401
/// before looking at the table or its query keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_exposed_tables_cannot_be_told_from_unknown_ones() {
    let db = TestDb::new()
        .await
        .with_tables(DOCS, &["docs", "other"])
        .await;
    let relay = docs_relay(&db).await;
    let member = token("member", 1, 600);
    // docs: exposed and readable; other: exposed, no right for members; nosuch: not exposed.
    let mut not_found = Vec::new();
    for table in ["docs", "other", "nosuch"] {
        let mut ws = relay.ws(&format!("/ws/{table}?snapshot=true")).await;
        ws.send_json(json!({"type": "ping"})).await;
        let pong = ws.next_json().await;
        assert_eq!(pong["type"], "pong", "{table}: {pong}");
        ws.send_json(json!({"type": "auth", "token": member})).await;
        let ok = ws.next_json().await;
        assert_eq!(ok["type"], "authenticated", "{table}: {ok}");
        let next = ws.next_json().await;
        if table == "docs" {
            assert_eq!(next["type"], "initial", "{next}");
            continue;
        }
        assert_eq!(next["code"], "not_found", "{table}: {next}");
        not_found.push(
            next["message"]
                .as_str()
                .unwrap()
                .replace(&format!("{table:?}"), "T"),
        );
        assert_eq!(ws.expect_close().await, Some(4004), "{table}");
    }
    assert_eq!(
        not_found[0], not_found[1],
        "forbidden and unknown read alike"
    );

    // A bad key without a token: refused alike, before anything about the table.
    for table in ["docs", "nosuch"] {
        let mut ws = relay.ws(&format!("/ws/{table}?since=abc")).await;
        assert_eq!(ws.next_json().await["code"], "bad_request", "{table}");
        assert_eq!(ws.expect_close().await, Some(4400), "{table}");
    }

    // Plain HTTP and REST: 401 with the same body, whatever the table and the query.
    let mut bodies = Vec::new();
    for table in ["docs", "other", "nosuch"] {
        for (method, path, headers) in [
            ("GET", format!("/ws/{table}"), ""),
            ("GET", format!("/ws/{table}?since=abc&select="), ""),
            ("GET", format!("/api/{table}"), ""),
            ("GET", format!("/api/{table}?limit=abc&nosuch=eq.1"), ""),
            ("GET", format!("/api/{table}/1?select=nosuch"), ""),
            (
                "POST",
                format!("/api/{table}"),
                "Content-Type: text/plain\r\n",
            ),
            ("DELETE", format!("/api/{table}/1"), ""),
        ] {
            let r = request_with(&relay, method, &path, headers).await;
            assert_eq!(r.status, 401, "{method} {path}: {}", r.body());
            bodies.push((path.starts_with("/ws"), r.body().to_owned()));
        }
    }
    for (ws, body) in &bodies {
        let first = bodies.iter().find(|(w, _)| w == ws).unwrap();
        assert_eq!(&first.1, body);
    }
    let r = request_with(&relay, "GET", "/ws", "").await;
    assert_eq!(r.status, 401, "{}", r.body());
}

/// REST takes its token from exactly the headers its 401 names (as PostgREST and Supabase's
/// clients send it), never from the query string; sockets also take `?access_token=`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_reads_the_token_where_its_401_says_and_nowhere_else() {
    let db = TestDb::new()
        .await
        .with_tables(DOCS, &["docs", "other"])
        .await;
    db.exec("insert into docs values (1, 1, 't', 's')").await;
    let relay = docs_relay(&db).await;
    let member = token("member", 1, 600);

    let r = request_with(
        &relay,
        "GET",
        &format!("/api/docs?access_token={member}"),
        "",
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.body());
    let message = r.json["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("Authorization: Bearer") && message.contains("apikey header"),
        "{message}"
    );
    assert!(
        message.contains("does not read ?access_token="),
        "the message must not suggest a query token: {message}"
    );
    assert!(!message.contains(&member));
    for headers in [
        format!("Authorization: Bearer {member}\r\n"),
        format!("apikey: {member}\r\n"),
        format!("Authorization: Bearer {member}\r\napikey: not-a-key\r\n"),
    ] {
        let r = request_with(&relay, "GET", "/api/docs", &headers).await;
        assert_eq!(r.status, 200, "{headers}: {}", r.body());
        assert_eq!(r.json.as_array().unwrap().len(), 1);
    }

    // A socket's message names every way it may authenticate.
    let r = request_with(&relay, "GET", "/ws/docs", "").await;
    let message = r.json["message"].as_str().unwrap();
    assert!(
        message.contains("auth") && message.contains("?access_token="),
        "{message}"
    );
    let mut ws = relay.ws(&format!("/ws/docs?access_token={member}")).await;
    db.exec("insert into docs values (2, 1, 'u', 's')").await;
    assert_eq!(ws.next_json().await["id"], 2);
}

/// `--jwt-secret-file` holds a secret to the same rule as `--jwt-secret`: 32 bytes at least,
/// after one trailing line break; the error names the file, never the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_secret_file_is_refused_like_a_short_secret() {
    let db = TestDb::new().await.with_tables(DOCS, &["docs"]).await;
    let dir = std::env::temp_dir().join(format!(
        "pgrelay-secret-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let secret_file = |name: &str, contents: &str| {
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        pgrelay::access::auth::JwtConfig {
            keys: pgrelay::access::auth::KeySource::SecretFile(path),
            algorithms: vec![],
            audience: None,
            issuer: None,
            leeway: Duration::from_secs(5),
            require_exp: true,
        }
    };
    let thirty_one = "s".repeat(31);
    for (name, contents) in [
        ("five", "hunt2\n".to_owned()),
        ("thirty-one", format!("{thirty_one}\n")),
        ("thirty-one-crlf", format!("{thirty_one}\r\n")),
        ("empty", String::new()),
    ] {
        let jwt = secret_file(name, &contents);
        let relay = Relay::spawn_with(&db, &["docs"], |c| c.auth.jwt = Some(jwt)).await;
        let err = relay.stop().await.expect_err(name).to_string();
        assert!(
            err.contains("--jwt-secret-file")
                && err.contains(&dir.join(name).display().to_string())
                && err.contains("at least 32 bytes"),
            "{name}: {err}"
        );
        let secret = contents.trim_end();
        assert!(secret.is_empty() || !err.contains(secret), "{name}: {err}");
    }
    // 32 bytes and one newline: the newline is not part of the secret.
    let secret = "0123456789abcdef0123456789abcdef";
    let jwt = secret_file("ok", &format!("{secret}\n"));
    let relay = Relay::start_with(&db, &["docs"], |c| c.auth.jwt = Some(jwt)).await;
    let signed = encode(
        &Header::new(Algorithm::HS256),
        &json!({"role": "r", "exp": now() + 600}),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let r = http_as(relay.addr, "GET", "/api/docs", Some(&signed), None).await;
    assert_eq!(r.status, 200, "{}", r.body());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `/api` lists the tables the caller may use, as its policies shape them; `/` names no table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_index_lists_only_what_the_caller_may_use() {
    let db = TestDb::new()
        .await
        .with_tables(DOCS, &["docs", "other"])
        .await;
    let relay = docs_relay(&db).await;
    let names = |body: &Value| -> Vec<String> {
        body["tables"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let index = async |role: &str| -> Value {
        let r = http_as(relay.addr, "GET", "/api", Some(&token(role, 1, 600)), None).await;
        assert_eq!(r.status, 200, "{}", r.body());
        serde_json::from_str(r.body()).unwrap()
    };
    assert_eq!(names(&index("admin").await), ["docs", "other"]);
    let member = index("member").await;
    assert_eq!(names(&member), ["docs"]);
    assert_eq!(
        member["tables"][0]["columns"],
        json!(["id", "tenant_id", "title"]),
        "the hidden column is not listed"
    );
    assert_eq!(member["tables"][0]["key"], json!(["id"]));
    assert_eq!(
        index("viewer").await["tables"][0]["rights"],
        json!({"read": true, "insert": false, "update": false, "delete": false})
    );
    assert_eq!(names(&index("nobody").await), Vec::<String>::new());
    let anonymous = http_as(relay.addr, "GET", "/api", None, None).await;
    assert_eq!(anonymous.status, 401);
    let root = http_as(relay.addr, "GET", "/", None, None).await;
    assert_eq!(root.status, 200);
    let root: Value = serde_json::from_str(root.body()).unwrap();
    assert_eq!(root["name"], "pgrelay");
    assert!(!root.to_string().contains("docs"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_key_change_a_policy_limited_socket_sees_the_new_key_and_not_the_old_one() {
    // A member sees tenant_id, title and the key. Once `title` is the key, `id` is a hidden
    // column: a socket that goes on without subscribing again must not see it.
    let db = TestDb::new()
        .await
        .with_tables(DOCS, &["docs", "other"])
        .await;
    let relay = docs_relay(&db).await;
    let mut ws = relay.ws_as("/ws/docs", &token("member", 1, 600)).await;
    db.exec("insert into docs values (1, 1, 'a', 's')").await;
    assert_eq!(
        ws.next_json().await["data"],
        json!({"id": 1, "tenant_id": 1, "title": "a"})
    );

    db.exec("alter table docs drop constraint docs_pkey, add primary key (title)")
        .await;
    assert_eq!(ws.next_json().await["reason"], "table_changed");
    db.exec("insert into docs values (2, 1, 'b', 's')").await;
    let event = ws.next_json().await;
    assert_eq!(event["id"], "b", "{event}");
    assert_eq!(event["data"], json!({"tenant_id": 1, "title": "b"}));
}

/// The subscription of a `/ws/{table}` socket that authenticates in band is in place before
/// `authenticated` is sent: a change committed right after it arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_committed_right_after_authenticated_reaches_the_socket() {
    let db = TestDb::new()
        .await
        .with_tables(DOCS, &["docs", "other"])
        .await;
    let relay = docs_relay(&db).await;
    let member = token("member", 1, 600);
    let writer = db.client().await;
    for id in 0..20 {
        let mut ws = relay.ws("/ws/docs").await;
        ws.send_json(json!({"type": "auth", "token": member})).await;
        assert_eq!(ws.next_json().await["type"], "authenticated");
        writer
            .execute("insert into docs values ($1, 1, 't', 's')", &[&id])
            .await
            .unwrap();
        let e = ws.next_json().await;
        assert_eq!(
            (e["type"].as_str(), e["id"].as_i64()),
            (Some("create"), Some(i64::from(id))),
            "{e}"
        );
    }
}
