//! PostgREST compatibility, server side: ranges and counts, single objects and CSV, select
//! with aliases and casts, every operator against what PostgreSQL selects, inserts and
//! upserts with `Prefer`, filtered writes, and policies on every new path.

use std::time::Duration;

use serde_json::{Value, json};

use super::{assert_error, post};
use crate::support::{Relay, TestDb, http, http_as, http_with};

const SCHEMA: &str = "
    create table items(
        id int primary key,
        name text not null,
        price numeric,
        note text,
        ok boolean,
        tags int[],
        span int4range,
        doc jsonb,
        body tsvector);
    create table kv(key text primary key, value text, tenant int not null default 1);";

/// Ten items: id 1..=10, price = id (NULL for 10), tags = {id % 3, id % 5}.
async fn setup_with(tweak: impl FnOnce(&mut pgrelay::Config)) -> (TestDb, Relay) {
    let db = TestDb::new()
        .await
        .with_tables(SCHEMA, &["items", "kv"])
        .await;
    db.exec(
        "insert into items
         select n, 'item ' || n, case when n < 10 then n end,
                case when n % 2 = 0 then 'Even ' || n end,
                case n % 3 when 0 then true when 1 then false end,
                array[n % 3, n % 5], int4range(n, n + 3),
                jsonb_build_object('n', n, 'even', n % 2 = 0),
                to_tsvector('english', case when n % 2 = 0 then 'the cats are running' else 'a dog sleeps' end)
           from generate_series(1, 10) n",
    )
    .await;
    let relay = Relay::start_with(&db, &["items", "kv"], tweak).await;
    (db, relay)
}

async fn setup() -> (TestDb, Relay) {
    setup_with(|_| {}).await
}

fn ids(response: &crate::support::Response) -> Vec<i64> {
    response
        .json
        .as_array()
        .unwrap_or_else(|| panic!("an array: {}", response.text))
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_page_and_count_and_say_so_in_content_range() {
    let (_db, relay) = setup().await;
    let a = relay.addr;
    let get = |path: &str, headers: &[(&str, &str)]| http_with(a, "GET", path, headers, None);

    let all = get("/api/items?select=id", &[]).await;
    assert_eq!((all.status, ids(&all).len()), (200, 10));
    assert_eq!(all.header("content-range").as_deref(), Some("0-9/*"));

    let page = get(
        "/api/items?select=id&order=id&limit=3&offset=2",
        &[("Prefer", "count=exact")],
    )
    .await;
    assert_eq!((page.status, ids(&page)), (206, vec![3, 4, 5]));
    assert_eq!(page.header("content-range").as_deref(), Some("2-4/10"));

    let ranged = get(
        "/api/items?select=id&order=id",
        &[("Range", "8-"), ("Range-Unit", "items")],
    )
    .await;
    assert_eq!(ids(&ranged), vec![9, 10]);
    assert_eq!(ranged.header("content-range").as_deref(), Some("8-9/*"));
    let both = get("/api/items?select=id&order=id&limit=5", &[("Range", "1-2")]).await;
    assert_eq!(
        ids(&both),
        vec![2, 3],
        "the Range header narrows limit/offset"
    );

    let whole = get(
        "/api/items?select=id&price=lt.4",
        &[("Prefer", "count=exact")],
    )
    .await;
    assert_eq!(
        (whole.status, whole.header("content-range").as_deref()),
        (200, Some("0-2/3"))
    );

    // An offset past the total: 416 with PostgREST's error; past the end without a count: empty.
    let beyond = get("/api/items?offset=20", &[("Prefer", "count=exact")]).await;
    assert_error(&beyond, 416, "PGRST103");
    assert!(
        beyond.json["details"]
            .as_str()
            .unwrap()
            .contains("only 10 rows")
    );
    let empty = get("/api/items?offset=20", &[]).await;
    assert_eq!((empty.status, empty.text.as_str()), (200, "[]"));
    assert_eq!(empty.header("content-range").as_deref(), Some("*/*"));
    assert_error(
        &get("/api/items", &[("Range", "5-2")]).await,
        416,
        "PGRST103",
    );

    for prefer in ["count=planned", "count=estimated"] {
        let estimated = get("/api/items?limit=1", &[("Prefer", prefer)]).await;
        let range = estimated.header("content-range").unwrap();
        let total: i64 = range.split('/').nth(1).unwrap().parse().unwrap();
        assert!(total > 0, "{prefer}: {range}");
    }

    // HEAD: the same headers, no body.
    let head = http_with(
        a,
        "HEAD",
        "/api/items?id=lt.4",
        &[("Prefer", "count=exact")],
        None,
    )
    .await;
    assert_eq!((head.status, head.text.as_str()), (200, ""));
    assert_eq!(head.header("content-range").as_deref(), Some("0-2/3"));

    // A configured max-rows cap is visible: 206 and the range served.
    let (_db, capped) = setup_with(|c| c.limits.max_rows = Some(4)).await;
    let cut = http(capped.addr, "GET", "/api/items?select=id&order=id", None).await;
    assert_eq!((cut.status, ids(&cut)), (206, vec![1, 2, 3, 4]));
    assert_eq!(cut.header("content-range").as_deref(), Some("0-3/*"));
    let small = http(capped.addr, "GET", "/api/items?select=id&id=lt.3", None).await;
    assert_eq!(small.status, 200, "a result within the cap is whole");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_objects_csv_and_media_types() {
    let (_db, relay) = setup().await;
    let a = relay.addr;
    let object = [("Accept", "application/vnd.pgrst.object+json")];
    let one = http_with(a, "GET", "/api/items?id=eq.3&select=id,name", &object, None).await;
    assert_eq!(
        (one.status, &one.json),
        (200, &json!({"id": 3, "name": "item 3"}))
    );
    assert!(
        one.header("content-type")
            .unwrap()
            .starts_with("application/vnd.pgrst.object+json")
    );
    for (query, rows) in [("id=eq.99", 0), ("id=lt.3", 2)] {
        let r = http_with(a, "GET", &format!("/api/items?{query}"), &object, None).await;
        assert_error(&r, 406, "PGRST116");
        assert_eq!(
            r.json["details"],
            format!("The result contains {rows} rows")
        );
    }
    let csv = http_with(
        a,
        "GET",
        "/api/items?select=id,note,label:name&id=in.(1,2)&order=id",
        &[("Accept", "text/csv")],
        None,
    )
    .await;
    assert_eq!(csv.status, 200);
    assert_eq!(
        csv.text,
        "id,note,label\n1,,\"item 1\"\n2,\"Even 2\",\"item 2\""
    );
    assert!(csv.header("content-type").unwrap().starts_with("text/csv"));
    let xml = http_with(a, "GET", "/api/items", &[("Accept", "text/xml")], None).await;
    assert_error(&xml, 406, "PGRST107");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_takes_aliases_and_casts_and_refuses_embedding_clearly() {
    let (_db, relay) = setup().await;
    let a = relay.addr;
    let r = http(
        a,
        "GET",
        "/api/items?select=id,cost:price::text,doc,n:id::numeric&id=eq.2",
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.json,
        json!([{"id": 2, "cost": "2", "doc": {"n": 2, "even": true}, "n": 2}])
    );
    let r = http(
        a,
        "GET",
        "/api/items?select=id::character%20varying&id=eq.2",
        None,
    )
    .await;
    assert_eq!(r.json, json!([{"id": "2"}]), "{}", r.text);
    assert_error(
        &http(a, "GET", "/api/items?select=id::nosuchtype", None).await,
        400,
        "42704",
    );
    assert_error(
        &http(a, "GET", "/api/items?select=id::text;drop", None).await,
        400,
        "PGRST100",
    );
    let embedded = http(a, "GET", "/api/items?select=*,kv(*)", None).await;
    assert_error(&embedded, 400, "PGRST200");
    assert!(
        embedded.json["message"]
            .as_str()
            .unwrap()
            .contains("'items' and 'kv'")
    );
    assert_error(
        &http(a, "GET", "/api/items?select=count()", None).await,
        400,
        "PGRST123",
    );
    assert_error(
        &http(a, "GET", "/api/items?select=doc-%3En", None).await,
        400,
        "PGRST100",
    );
    assert_error(
        &http(a, "GET", "/api/items?kv.key=eq.1", None).await,
        400,
        "PGRST108",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operator_selects_what_postgresql_selects() {
    let (db, relay) = setup().await;
    let client = db.client().await;
    let cases: &[(&str, &str)] = &[
        ("price=eq.3", "price = 3"),
        ("price=neq.3", "price <> 3"),
        ("price=gt.7", "price > 7"),
        ("price=gte.7", "price >= 7"),
        ("price=lt.3", "price < 3"),
        ("price=lte.3", "price <= 3"),
        ("id=in.(1,5,99)", "id in (1, 5, 99)"),
        ("id=in.()", "false"),
        ("note=is.null", "note is null"),
        ("note=is.not_null", "note is not null"),
        ("ok=is.true", "ok is true"),
        ("ok=is.false", "ok is false"),
        ("ok=is.unknown", "ok is unknown"),
        ("price=isdistinct.9", "price is distinct from 9"),
        ("name=like.item 1*", "name like 'item 1%'"),
        ("note=ilike.*even 1*", "note ilike '%even 1%'"),
        ("note=match.^Even [24]$", "note ~ '^Even [24]$'"),
        ("note=imatch.^even 1", "note ~* '^even 1'"),
        ("body=fts.cat", "body @@ to_tsquery('cat')"),
        (
            "body=plfts(english).running cats",
            "body @@ plainto_tsquery('english', 'running cats')",
        ),
        (
            "body=phfts(english).cats running",
            "body @@ phraseto_tsquery('english', 'cats running')",
        ),
        (
            "body=wfts(english).dog -cat",
            "body @@ websearch_to_tsquery('english', 'dog -cat')",
        ),
        (
            "name=fts(simple).item",
            "to_tsvector('simple', name) @@ to_tsquery('simple', 'item')",
        ),
        ("tags=cs.{1,2}", "tags @> '{1,2}'"),
        ("tags=cd.{0,1,2,3}", "tags <@ '{0,1,2,3}'"),
        ("tags=ov.{4}", "tags && '{4}'"),
        ("doc=cs.{\"even\":true}", "doc @> '{\"even\": true}'"),
        ("span=ov.[2,4)", "span && '[2,4)'"),
        ("span=sl.[8,9)", "span << '[8,9)'"),
        ("span=sr.[3,4)", "span >> '[3,4)'"),
        ("span=nxr.[1,6)", "span &< '[1,6)'"),
        ("span=nxl.[5,6)", "span &> '[5,6)'"),
        ("span=adj.[1,2)", "span -|- '[1,2)'"),
        ("price=gt(any).{8,100}", "price > any('{8,100}')"),
        ("price=lt(all).{3,5}", "price < all('{3,5}')"),
        ("name=like(any).{*1,*2}", "name like any('{%1,%2}')"),
        ("note=ilike(all).{even*,*4}", "note ilike all('{even%,%4}')"),
        ("price=not.gt.5", "not (price > 5)"),
        ("note=not.like.Even*", "not (note like 'Even%')"),
        (
            "or=(price.lt.2,and(ok.is.true,note.not.is.null))",
            "price < 2 or (ok is true and note is not null)",
        ),
        (
            "not.and=(price.gt.2,price.lt.8)",
            "not (price > 2 and price < 8)",
        ),
        (
            "not.or=(note.is.null,price.eq.4)",
            "not (note is null or price = 4)",
        ),
        (
            "or=(name.eq.\"item 3\",id.in.(1,2))",
            "name = 'item 3' or id in (1, 2)",
        ),
    ];
    for (query, condition) in cases {
        // As a client sends it: the value percent-encoded.
        let (key, value) = query.split_once('=').unwrap();
        let encoded =
            percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC);
        let r = http(
            relay.addr,
            "GET",
            &format!("/api/items?select=id&order=id&{key}={encoded}"),
            None,
        )
        .await;
        assert_eq!(r.status, 200, "{query}: {}", r.text);
        let expected: Vec<i64> = client
            .query(
                &format!("select id::int8 from items where {condition} order by id"),
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        assert_eq!(ids(&r), expected, "{query}");
    }
    // Operators checked against the column's type before any SQL runs.
    for (query, code) in [
        ("price=like.1", "PGRST100"),
        ("tags=sl.{1}", "PGRST100"),
        ("span=cs.[1,2", "22P02"),
        ("body=fts(no_such_config).x", "42704"),
        ("or=(price.gt.1", "PGRST100"),
    ] {
        let r = http(relay.addr, "GET", &format!("/api/items?{query}"), None).await;
        assert_error(&r, 400, code);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserts_and_upserts_answer_as_postgrest() {
    let (db, relay) = setup().await;
    let a = relay.addr;
    let kv = |body: Value, prefer: &str, query: &str| {
        http_with(
            a,
            "POST",
            &format!("/api/kv{query}"),
            &[("Prefer", prefer)],
            Some(&body),
        )
    };
    // Without Prefer: 201 and no body; headers-only: a Location.
    let minimal = http(
        a,
        "POST",
        "/api/kv",
        Some(&json!({"key": "a", "value": "1"})),
    )
    .await;
    assert_eq!((minimal.status, minimal.text.as_str()), (201, ""));
    assert_eq!(minimal.header("content-range").as_deref(), Some("*/*"));
    let located = kv(
        json!({"key": "b c", "value": "2"}),
        "return=headers-only",
        "",
    )
    .await;
    assert_eq!(located.status, 201);
    assert_eq!(
        located.header("location").as_deref(),
        Some("/api/kv?key=eq.b%20c")
    );
    // An object comes back as an array unless one object is asked for.
    let array = kv(
        json!({"key": "c"}),
        "return=representation, count=exact",
        "?select=key,value",
    )
    .await;
    assert_eq!(
        (array.status, &array.json),
        (201, &json!([{"key": "c", "value": null}]))
    );
    assert_eq!(array.header("content-range").as_deref(), Some("*/1"));
    // columns= with missing=default: left-out columns get their default, not NULL.
    let defaulted = kv(
        json!([{"key": "d", "value": "x"}, {"key": "e"}]),
        "return=representation, missing=default",
        "?columns=key,tenant",
    )
    .await;
    assert_eq!(defaulted.status, 201, "{}", defaulted.text);
    assert_eq!(
        defaulted.json,
        json!([{"key": "d", "value": null, "tenant": 1}, {"key": "e", "value": null, "tenant": 1}]),
        "keys outside columns= are ignored"
    );
    // Upserts: merge updates (200 when nothing was inserted), ignore leaves the row.
    let merged = kv(
        json!({"key": "a", "value": "merged"}),
        "return=representation, resolution=merge-duplicates",
        "?on_conflict=key",
    )
    .await;
    assert_eq!(
        (merged.status, &merged.json[0]["value"]),
        (200, &json!("merged"))
    );
    let mixed = kv(
        json!([{"key": "a", "value": "again"}, {"key": "f", "value": "new"}]),
        "return=representation, resolution=merge-duplicates",
        "",
    )
    .await;
    assert_eq!(mixed.status, 201, "one row inserted: {}", mixed.text);
    let ignored = kv(
        json!([{"key": "a", "value": "ignored"}, {"key": "g"}]),
        "return=representation, resolution=ignore-duplicates",
        "",
    )
    .await;
    assert_eq!(
        ignored.json,
        json!([{"key": "g", "value": null, "tenant": 1}])
    );
    let stored: String = db
        .client()
        .await
        .query_one("select value from kv where key = 'a'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, "again");
    assert_error(
        &kv(
            json!({"key": "h"}),
            "resolution=merge-duplicates",
            "?on_conflict=value",
        )
        .await,
        400,
        "42P10",
    );
    assert_error(
        &kv(json!({"key": "h"}), "", "?on_conflict=nope").await,
        400,
        "PGRST204",
    );
    assert_error(&kv(json!({"key": "a"}), "", "").await, 409, "23505");
    // A single object asked for, but two rows written: 406 and nothing is kept.
    let two = http_with(
        a,
        "POST",
        "/api/kv",
        &[
            ("Prefer", "return=representation"),
            ("Accept", "application/vnd.pgrst.object+json"),
        ],
        Some(&json!([{"key": "y"}, {"key": "z"}])),
    )
    .await;
    assert_error(&two, 406, "PGRST116");
    let kept: i64 = db
        .client()
        .await
        .query_one("select count(*) from kv where key in ('y', 'z')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 0);
    let via_post = post(a, "/api/kv", &json!({"key": "obj"})).await;
    assert_eq!(via_post.json["key"], "obj");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_writes_need_a_filter_unless_the_relay_allows_them() {
    let (db, relay) = setup().await;
    let a = relay.addr;
    let count = || async {
        db.client()
            .await
            .query_one("select count(*) from items where note = 'x'", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let patched = http_with(
        a,
        "PATCH",
        "/api/items?id=lte.3&select=id,note&order=id.desc",
        &[("Prefer", "return=representation, count=exact")],
        Some(&json!({"note": "x"})),
    )
    .await;
    assert_eq!(patched.status, 200, "{}", patched.text);
    assert_eq!(
        patched.json,
        json!([{"id": 3, "note": "x"}, {"id": 2, "note": "x"}, {"id": 1, "note": "x"}])
    );
    assert_eq!(patched.header("content-range").as_deref(), Some("0-2/3"));
    let quiet = http(
        a,
        "PATCH",
        "/api/items?id=eq.4",
        Some(&json!({"note": "x"})),
    )
    .await;
    assert_eq!((quiet.status, quiet.text.as_str()), (204, ""));
    assert_eq!(count().await, 4);
    for (method, body) in [("PATCH", Some(json!({"note": "all"}))), ("DELETE", None)] {
        let r = http(a, method, "/api/items", body.as_ref()).await;
        assert_error(&r, 400, "21000");
    }
    assert_eq!(count().await, 4, "nothing changed");
    // max-affected with handling=strict: over the limit, refused and rolled back.
    let strict = http_with(
        a,
        "DELETE",
        "/api/items?note=eq.x",
        &[("Prefer", "handling=strict, max-affected=2")],
        None,
    )
    .await;
    assert_error(&strict, 400, "PGRST124");
    assert_eq!(count().await, 4);
    let deleted = http_with(
        a,
        "DELETE",
        "/api/items?note=eq.x&id=gt.2",
        &[("Prefer", "return=representation")],
        None,
    )
    .await;
    assert_eq!(ids(&deleted).len(), 2);
    assert_eq!(count().await, 2);

    let (db, open) = setup_with(|c| c.rest_allow_unfiltered_writes = true).await;
    let r = http(
        open.addr,
        "PATCH",
        "/api/items",
        Some(&json!({"note": "every"})),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text);
    let every: i64 = db
        .client()
        .await
        .query_one("select count(*) from items where note = 'every'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(every, 10);
}

/// Tenant 1's member: rows with tenant = 1 only; an inserter may only insert.
const POLICY: &str = r#"
[[auth.api_keys]]
sha256 = "MEMBER"
role = "member"
claims = { tenant = 1 }
[[auth.api_keys]]
sha256 = "INSERTER"
role = "inserter"
[[policy]]
tables = ["kv"]
roles = ["member"]
read = true
insert = true
update = true
delete = true
filter = "tenant=eq.{claims.tenant}"
[[policy]]
tables = ["kv"]
roles = ["inserter"]
insert = true
"#;

async fn policy_relay() -> (TestDb, Relay) {
    let toml = POLICY
        .replace(
            "MEMBER",
            &pgrelay::access::auth::api_key_digest("member-key"),
        )
        .replace(
            "INSERTER",
            &pgrelay::access::auth::api_key_digest("inserter-key"),
        );
    let db = TestDb::new()
        .await
        .with_tables(SCHEMA, &["items", "kv"])
        .await;
    db.exec("insert into kv values ('mine', 'm', 1), ('theirs', 't', 2), ('mine2', 'm', 1)")
        .await;
    let relay = Relay::start_with(&db, &["items", "kv"], |c| {
        let mut settings = pgrelay::settings::Settings::from_toml(&toml).unwrap();
        settings.tables = Some(vec!["kv".into()]);
        let parsed = settings.into_config().unwrap();
        c.auth = parsed.auth;
        c.policies = parsed.policies;
        c.auth.auth_timeout = Duration::from_secs(2);
    })
    .await;
    (db, relay)
}

async fn kv_rows(db: &TestDb) -> Vec<(String, Option<String>, i32)> {
    db.client()
        .await
        .query("select key, value, tenant from kv order by key", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_patch_or_delete_cannot_touch_rows_outside_the_callers_policy() {
    let (db, relay) = policy_relay().await;
    let a = relay.addr;
    let member = Some("member-key");
    let before = kv_rows(&db).await;
    // Every row named, the other tenant's included: only the caller's are touched.
    let r = http_as(
        a,
        "PATCH",
        "/api/kv?value=in.(m,t)",
        member,
        Some(&json!({"value": "z"})),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text);
    let after = kv_rows(&db).await;
    assert_eq!(after[2], before[2], "the other tenant's row is untouched");
    assert_eq!(after[0].1.as_deref(), Some("z"));
    let r = http_as(a, "DELETE", "/api/kv?key=eq.theirs", member, None).await;
    assert_eq!(r.status, 204);
    // Moving a row out of one's own rows is refused and rolled back.
    let r = http_as(
        a,
        "PATCH",
        "/api/kv?key=eq.mine",
        member,
        Some(&json!({"tenant": 2})),
    )
    .await;
    assert_error(&r, 403, "42501");
    let r = http_as(a, "GET", "/api/kv?select=key&order=key", member, None).await;
    assert_eq!(r.json, json!([{"key": "mine"}, {"key": "mine2"}]));
    assert_eq!(
        kv_rows(&db).await.len(),
        3,
        "nothing deleted outside the policy"
    );
    assert_eq!(kv_rows(&db).await[0].2, 1);
    // Without a token: not allowed, 401 as PostgREST answers an anonymous caller.
    let r = http_as(
        a,
        "PATCH",
        "/api/kv?key=eq.mine",
        None,
        Some(&json!({"value": "q"})),
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upsert_cannot_overwrite_a_row_the_caller_may_not_update() {
    let (db, relay) = policy_relay().await;
    let a = relay.addr;
    let merge = |key: Option<&'static str>, body: Value| {
        http_with(
            a,
            "POST",
            "/api/kv",
            &[
                ("Prefer", "resolution=merge-duplicates"),
                (
                    "Authorization",
                    match key {
                        Some("member") => "Bearer member-key",
                        _ => "Bearer inserter-key",
                    },
                ),
            ],
            Some(&body),
        )
    };
    let before = kv_rows(&db).await;
    // The other tenant's row conflicts: the upsert may not update it, so nothing is stored.
    let r = merge(
        Some("member"),
        json!([{"key": "new", "tenant": 1}, {"key": "theirs", "value": "stolen", "tenant": 1}]),
    )
    .await;
    assert_error(&r, 403, "42501");
    assert_eq!(kv_rows(&db).await, before);
    // One's own row merges.
    let r = merge(
        Some("member"),
        json!({"key": "mine", "value": "merged", "tenant": 1}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    // Insert right only: a merge would update, so it needs the update right.
    let r = merge(None, json!({"key": "mine", "value": "x", "tenant": 1})).await;
    assert_error(&r, 403, "42501");
    let ignore = http_with(
        a,
        "POST",
        "/api/kv",
        &[
            ("Prefer", "resolution=ignore-duplicates"),
            ("Authorization", "Bearer inserter-key"),
        ],
        Some(&json!([{"key": "mine", "value": "x"}, {"key": "fresh", "value": "y"}])),
    )
    .await;
    assert_eq!(ignore.status, 201, "{}", ignore.text);
    let rows = kv_rows(&db).await;
    assert!(rows.contains(&("mine".into(), Some("merged".into()), 1)));
    assert!(rows.contains(&("theirs".into(), Some("t".into()), 2)));
    assert!(rows.iter().any(|r| r.0 == "fresh"));
    // Reading back what was written needs the read right.
    let r = http_with(
        a,
        "POST",
        "/api/kv",
        &[
            ("Prefer", "return=representation"),
            ("Authorization", "Bearer inserter-key"),
        ],
        Some(&json!({"key": "more"})),
    )
    .await;
    assert_error(&r, 403, "42501");
}
