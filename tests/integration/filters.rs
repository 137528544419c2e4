//! Filters: SQL (initial rows) and Rust (live events) agree; filtered copies stay exact.

use std::collections::BTreeSet;

use pgrelay::filter::{self, Filter, Kind};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::support::TestDb;

const PROPERTY_TABLE: &str = "create table p(
    id serial primary key, n int, x numeric, f float8, s text, v varchar(20),
    t timestamptz, ts timestamp, d date, b boolean, u uuid)";

/// Values per column: rows and filters draw from the same pools, so equalities happen.
fn pool(column: &str) -> &'static [&'static str] {
    match column {
        "n" => &["-5", "0", "3", "7", "2147483647", "-2147483648"],
        "x" => &[
            "1.5",
            "1.50",
            "-0",
            "0",
            "1e3",
            "1000",
            "NaN",
            "Infinity",
            "-Infinity",
            "12345678901234567890.1",
        ],
        "f" => &["0.1", "1e300", "-1e-300", "NaN", "Infinity", "3", "-0.5"],
        "s" | "v" => &[
            "a", "B", "it's", "\"q\"", "é", "É", "日本", "a%b", "", "zz", "ab", "Ab", "a_b", "a,b",
            "(x)",
        ],
        "t" => &[
            "2026-01-01T00:00:00Z",
            "2026-01-01 05:00:00+05",
            "2025-12-31T23:59:59.999999+00",
            "infinity",
            "-infinity",
            "2026-06-01 12:00:00-07",
        ],
        "ts" => &[
            "2026-01-01 00:00:00",
            "2026-01-01T00:00:00.5",
            "1999-12-31 23:59:59",
            "infinity",
        ],
        "d" => &["2026-01-01", "2025-06-30", "infinity", "2000-02-29"],
        "b" => &["true", "false"],
        "u" => &[
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A12",
            "00000000-0000-0000-0000-000000000000",
        ],
        _ => &[],
    }
}

const LIKE_PATTERNS: &[&str] = &["*a*", "a%", "_b", "%\\%%", "É*", "*本", "A*", "*", "a\\_b"];

fn list_item(value: &str) -> String {
    if value.contains([',', '"', '(', ')', '\\']) || value.is_empty() {
        format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        value.to_owned()
    }
}

fn random_condition(rng: &mut StdRng, column: &str, kind: Kind) -> String {
    let values = pool(column);
    let one = || (*values.choose(&mut rand::rng()).unwrap()).to_owned();
    let mut ops = vec!["eq", "neq", "in", "is.null"];
    match kind {
        Kind::Bool => ops.extend(["is.true", "is.false"]),
        Kind::Text => ops.extend(["lt", "lte", "gt", "gte", "like", "ilike"]),
        _ => ops.extend(["lt", "lte", "gt", "gte"]),
    }
    match *ops.choose(rng).unwrap() {
        "in" => {
            let n = rng.random_range(1..4);
            let items: Vec<String> = (0..n).map(|_| list_item(&one())).collect();
            format!("in.({})", items.join(","))
        }
        op @ ("is.null" | "is.true" | "is.false") => op.to_owned(),
        op @ ("like" | "ilike") => format!("{op}.{}", LIKE_PATTERNS.choose(rng).unwrap()),
        op => format!("{op}.{}", one()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_and_rust_agree_on_random_filters_over_random_rows() {
    let seed: u64 = std::env::var("PGRELAY_PROPERTY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("property seed {seed} (set PGRELAY_PROPERTY_SEED to replay)");
    let mut rng = StdRng::seed_from_u64(seed);
    let db = TestDb::new().await;
    db.exec(PROPERTY_TABLE).await;
    let client = db.client().await;
    let names = ["n", "x", "f", "s", "v", "t", "ts", "d", "b", "u"];
    let insert =
        "insert into p(n, x, f, s, v, t, ts, d, b, u) values ($1::text::int, $2::text::numeric,
        $3::text::float8, $4, $5, $6::text::timestamptz, $7::text::timestamp, $8::text::date,
        $9::text::boolean, $10::text::uuid)";
    for _ in 0..300 {
        let values: Vec<Option<String>> = names
            .iter()
            .map(|c| {
                (!rng.random_bool(0.15)).then(|| (*pool(c).choose(&mut rng).unwrap()).to_owned())
            })
            .collect();
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = values
            .iter()
            .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        client.execute(insert, &params).await.unwrap();
    }
    // Rows rendered by a session in another time zone, as a writer's trigger could.
    client
        .batch_execute("set timezone = 'Asia/Kolkata'")
        .await
        .unwrap();
    let rows: Vec<(i32, Value)> = client
        .query("select id, to_jsonb(p) from p", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    client.batch_execute("reset timezone").await.unwrap();

    let table = pgrelay::TableName::parse("p").unwrap();
    let info = pgrelay::sql::describe_columns(&client, &table)
        .await
        .unwrap();
    let mut checked = 0;
    for _ in 0..400 {
        let count = rng.random_range(1..=3);
        let mut raw = Vec::new();
        let mut text = Vec::new();
        for _ in 0..count {
            let column = info.choose(&mut rng).unwrap();
            if column.name == "id" {
                continue;
            }
            let expr = random_condition(&mut rng, &column.name, column.kind);
            text.push(format!("{}={expr}", column.name));
            raw.push(filter::parse(&column.name, &expr).unwrap());
        }
        let filter: Filter = match filter::compile(&client, &info, raw).await {
            Ok(f) => f,
            Err(filter::FilterError::BadValue { .. }) => continue,
            Err(e) => panic!("{text:?}: {e}"),
        };
        let mut params = Vec::new();
        let sql = format!("select id from p where {}", filter.to_sql(&mut params));
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let in_sql: BTreeSet<i32> = client
            .query(&sql, &refs)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let in_rust: BTreeSet<i32> = rows
            .iter()
            .filter(|(_, row)| filter.matches(row))
            .map(|(id, _)| *id)
            .collect();
        if in_sql != in_rust {
            let differ: Vec<&Value> = rows
                .iter()
                .filter(|(id, _)| in_sql.contains(id) != in_rust.contains(id))
                .map(|(_, r)| r)
                .take(3)
                .collect();
            panic!("seed {seed}: filter {text:?} disagrees (sql: {sql}); rows: {differ:?}");
        }
        checked += 1;
    }
    assert!(checked > 200, "only {checked} filters were valid");
}
