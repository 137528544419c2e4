//! The soak: every kind of write, schema changes, connection kills and a PostgreSQL restart,
//! with subscribers that resume and start over as the README tells clients to; at the end
//! every subscriber's copy equals the table, column for column (issue 9, "Done when").
//!
//! A short run is part of the test suite. The long one:
//! `PGRELAY_SOAK_SECS=300 cargo test --release --test integration soak::long -- --ignored --nocapture`

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_postgres::NoTls;

use crate::model::{Copy, Next, table_rows};
use crate::support::{Cluster, Frame, Relay, TestDb, Ws, connect, within};

const SCHEMA: &str = "
    create table items(id int primary key, grp int not null, name text, n int not null default 0);
    create table lines(order_id int, line int, qty int, primary key (order_id, line))";

/// One subscriber: where it subscribes and what its copy must equal.
#[derive(Clone)]
struct Plan {
    path: &'static str,
    table: &'static str,
    keys: &'static [&'static str],
    filter_sql: &'static str,
}

const PLANS: [Plan; 4] = [
    Plan {
        path: "/ws/items",
        table: "items",
        keys: &["id"],
        filter_sql: "true",
    },
    Plan {
        path: "/ws/items",
        table: "items",
        keys: &["id"],
        filter_sql: "true",
    },
    Plan {
        path: "/ws/items?grp=lt.3",
        table: "items",
        keys: &["id"],
        filter_sql: "grp < 3",
    },
    Plan {
        path: "/ws/lines",
        table: "lines",
        keys: &["order_id", "line"],
        filter_sql: "true",
    },
];

/// What the subscribers went through, for the report.
#[derive(Default)]
struct Counters {
    reconnects: AtomicU64,
    resumes: AtomicU64,
    resets: AtomicU64,
    messages: AtomicU64,
}

async fn writer_client(url: &str) -> tokio_postgres::Client {
    loop {
        if let Ok((client, connection)) = tokio_postgres::connect(url, NoTls).await {
            tokio::spawn(connection);
            return client;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One random write (or transaction); errors a concurrent writer can cause are fine.
async fn write_once(
    client: &tokio_postgres::Client,
    rng: &mut StdRng,
    next_id: &AtomicI64,
) -> Result<(), tokio_postgres::Error> {
    let id = || next_id.fetch_add(1, Ordering::Relaxed) as i32;
    let grp: i32 = rng.random_range(0..6);
    match rng.random_range(0..100) {
        0..20 => {
            client
                .execute(
                    "insert into items(id, grp, name) values ($1, $2, 'single')",
                    &[&id(), &grp],
                )
                .await?;
        }
        20..28 => {
            let first = next_id.fetch_add(200, Ordering::Relaxed) as i32;
            let n: i32 = rng.random_range(2..200);
            client
                .execute(
                    "insert into items(id, grp, name) select $1 + g, g % 6, 'bulk' from generate_series(0, $2 - 1) g",
                    &[&first, &n],
                )
                .await?;
        }
        28..45 => {
            let m: i32 = rng.random_range(0..13);
            client
                .execute("update items set n = n + 1, name = md5(random()::text), grp = (grp + 1) % 6 where id % 13 = $1", &[&m])
                .await?;
        }
        45..55 => {
            client
                .execute("delete from items where id in (select id from items order by random() limit 3)", &[])
                .await?;
        }
        55..63 => {
            // Upsert: a new row or an update of an existing one.
            let target = if rng.random_bool(0.5) {
                id()
            } else {
                rng.random_range(0..next_id.load(Ordering::Relaxed) as i32 + 1)
            };
            client
                .execute(
                    "insert into items(id, grp, name) values ($1, $2, 'upsert') on conflict (id) do update set n = items.n + 10, name = 'upserted'",
                    &[&target, &grp],
                )
                .await?;
        }
        63..70 => {
            // MERGE: updates, deletes and inserts in one statement.
            let base = next_id.fetch_add(20, Ordering::Relaxed) as i32;
            client
                .execute(
                    "merge into items t
                     using (select s.id, s.id % 6 as grp from (select id from items order by random() limit 10) s
                            union all select $1 + g, g % 6 from generate_series(0, 9) g) s
                        on t.id = s.id
                      when matched and t.n % 2 = 0 then update set n = t.n + 1, name = 'merged'
                      when matched then delete
                      when not matched then insert (id, grp, name) values (s.id, s.grp, 'merge')",
                    &[&base],
                )
                .await?;
        }
        70..78 => {
            // Key updates: one row, or a range shifted together (new keys are fresh).
            let base = next_id.fetch_add(1000, Ordering::Relaxed) as i32;
            client
                .execute(
                    "update items set id = $1 + (id % 1000) where id in (select id from items order by random() limit 5)",
                    &[&base],
                )
                .await?;
        }
        78..86 => {
            // Savepoints: the rolled-back part is never sent.
            client
                .batch_execute(&format!(
                    "begin;
                     insert into items(id, grp, name) values ({}, {grp}, 'kept');
                     savepoint s;
                     update items set name = 'rolled back' where id % 7 = 0;
                     insert into items(id, grp, name) values ({}, {grp}, 'rolled back');
                     rollback to savepoint s;
                     update items set n = n + 100 where id % 11 = 0;
                     commit",
                    id(),
                    id()
                ))
                .await?;
        }
        86..97 => {
            let order: i32 = rng.random_range(0..50);
            let line: i32 = rng.random_range(0..5);
            client
                .batch_execute(&format!(
                    "insert into lines values ({order}, {line}, 1) on conflict (order_id, line) do update set qty = lines.qty + 1;
                     update lines set line = line + 10 where order_id = {} and line < 5 and not exists
                        (select 1 from lines l where l.order_id = lines.order_id and l.line = lines.line + 10);
                     delete from lines where order_id = {} and line >= 10",
                    (order + 1) % 50,
                    (order + 2) % 50
                ))
                .await?;
        }
        _ => {
            if rng.random_bool(0.3) {
                client.batch_execute("truncate items").await?;
            } else {
                client
                    .batch_execute("begin; truncate lines; insert into lines select g, 0, g from generate_series(1, 20) g; commit")
                    .await?;
            }
        }
    }
    Ok(())
}

/// A subscriber that behaves like the README's client: resume with the last seq after a
/// disconnect, start over (`subscribe` with initial data) after a `reset`.
async fn subscribe_loop(
    addr: std::net::SocketAddr,
    plan: Plan,
    seed: u64,
    counters: Arc<Counters>,
    mut finish_rx: watch::Receiver<Option<Arc<BTreeMap<String, Value>>>>,
) -> Copy {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut copy = Copy::new(plan.keys);
    // Once told what to hold, a subscriber has this long to get there (then it returns its
    // copy for the test to show the difference).
    let mut give_up: Option<Instant> = None;
    loop {
        let separator = if plan.path.contains('?') { '&' } else { '?' };
        let path = match copy.seq {
            Some(seq) => {
                counters.resumes.fetch_add(1, Ordering::Relaxed);
                format!("{}{separator}since={seq}&snapshot=true", plan.path)
            }
            None => format!("{}{separator}snapshot=true", plan.path),
        };
        let url = format!("ws://{addr}{path}");
        let Ok(Ok((socket, _))) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(url.as_str()),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut ws = Ws { socket };
        loop {
            let expected = finish_rx.borrow_and_update().clone();
            if let Some(expected) = &expected {
                let deadline =
                    *give_up.get_or_insert_with(|| Instant::now() + Duration::from_secs(30));
                if &copy.rows == expected.as_ref() || Instant::now() > deadline {
                    return copy;
                }
            }
            let frame = tokio::select! {
                frame = ws.next_frame() => frame,
                _ = finish_rx.changed() => continue,
                _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
            };
            match frame {
                Frame::Json(message) => {
                    counters.messages.fetch_add(1, Ordering::Relaxed);
                    if let Next::Resubscribe(reason) = copy.apply(&message) {
                        if reason == "unavailable" {
                            // The database is restarting: try again in a moment.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        counters.resets.fetch_add(1, Ordering::Relaxed);
                        // Start over: the subscription's initial data supersedes the copy.
                        copy.seq = None;
                        ws.send_json(json!({"type": "subscribe"})).await;
                    }
                    // Now and then the client drops its connection, to resume.
                    if expected.is_none() && rng.random_ratio(1, 3000) {
                        break;
                    }
                }
                Frame::Closed(_) => break,
            }
        }
        counters.reconnects.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(rng.random_range(10..100))).await;
    }
}

async fn soak(duration: Duration) {
    let seed: u64 = std::env::var("PGRELAY_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("soak: seed {seed} (PGRELAY_SOAK_SEED replays the writers' choices), {duration:?}");
    let cluster = Arc::new(Cluster::start().await);
    connect(&cluster.url("postgres"))
        .await
        .batch_execute("create database soak")
        .await
        .unwrap();
    let url = cluster.url("soak");
    connect(&url).await.batch_execute(SCHEMA).await.unwrap();
    let db = TestDb::external(url.clone());
    let relay = Relay::start_with(&db, &["items", "lines"], |c| {
        c.install = true;
        c.schema_interval = Duration::from_millis(200);
        c.history_events = 20_000;
    })
    .await;

    let counters = Arc::new(Counters::default());
    let mut subscribers = Vec::new();
    for (i, plan) in PLANS.iter().enumerate() {
        // Each subscriber is told, at the end, what its copy must hold.
        let (finish_tx, finish_rx) = watch::channel(None);
        let task = tokio::spawn(subscribe_loop(
            relay.addr,
            plan.clone(),
            seed ^ (i as u64 + 1),
            Arc::clone(&counters),
            finish_rx,
        ));
        subscribers.push((finish_tx, task));
    }

    let deadline = Instant::now() + duration;
    let next_id = Arc::new(AtomicI64::new(1));
    let writes = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..2u64 {
        let url = url.clone();
        let next_id = Arc::clone(&next_id);
        let writes = Arc::clone(&writes);
        let stop = Arc::clone(&stop);
        writers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(w));
            let mut client = writer_client(&url).await;
            while !stop.load(Ordering::Relaxed) {
                match write_once(&client, &mut rng, &next_id).await {
                    Ok(()) => {
                        writes.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(err) if err.is_closed() || err.code().is_none() => {
                        client = writer_client(&url).await;
                    }
                    Err(err) => {
                        // Concurrent writers: deadlocks, unique violations, aborted blocks.
                        let _ = client.batch_execute("rollback").await;
                        let code = err.code().map(|c| c.code().to_owned()).unwrap_or_default();
                        assert!(
                            ["40P01", "23505", "40001", "25P02", "57P01", "08006"]
                                .contains(&code.as_str()),
                            "a write failed: {err:?}"
                        );
                    }
                }
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..4))).await;
            }
        }));
    }

    // The chaos, spread over the run.
    let at = |fraction: f64| deadline - duration.mul_f64(1.0 - fraction);
    let admin = writer_client(&url).await;
    let kill = "select count(pg_terminate_backend(pid)) from pg_stat_activity
                 where datname = 'soak' and application_name like 'pgrelay%'";
    let steps: Vec<(f64, &str)> = vec![
        (0.15, "alter table items add column extra text default 'x'"),
        (0.3, "kill"),
        (0.5, "restart"),
        (0.65, "kill"),
        (0.75, "alter table items drop column extra"),
        (0.85, "kill"),
    ];
    for (fraction, step) in steps {
        tokio::time::sleep_until(at(fraction).into()).await;
        match step {
            "kill" => {
                let admin = writer_client(&url).await;
                admin.execute(kill, &[]).await.unwrap();
            }
            "restart" => {
                let cluster = Arc::clone(&cluster);
                tokio::task::spawn_blocking(move || cluster.restart())
                    .await
                    .unwrap();
            }
            ddl => {
                let admin = writer_client(&url).await;
                admin.batch_execute(ddl).await.unwrap();
            }
        }
        eprintln!(
            "soak: {step} at {:.0}% ({} writes so far)",
            fraction * 100.0,
            writes.load(Ordering::Relaxed)
        );
    }
    drop(admin);
    tokio::time::sleep_until(deadline.into()).await;
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        within(Duration::from_secs(30), writer).await.unwrap();
    }

    // Every copy must end equal to its rows of the table, column for column.
    relay.wait_ready().await;
    let mut expected = Vec::new();
    for plan in PLANS.iter() {
        let all = table_rows(&db, plan.table, plan.keys).await;
        let client = writer_client(&url).await;
        let keep: std::collections::BTreeSet<String> = client
            .query(
                &format!(
                    "select to_json(t.*)::text from {} t where {}",
                    plan.table, plan.filter_sql
                ),
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| {
                let row: Value = serde_json::from_str(r.get::<_, &str>(0)).unwrap();
                crate::model::key_of(
                    &plan
                        .keys
                        .iter()
                        .map(|k| (*k).to_owned())
                        .collect::<Vec<_>>(),
                    &row,
                )
            })
            .collect();
        expected.push(Arc::new(
            all.into_iter()
                .filter(|(k, _)| keep.contains(k))
                .collect::<BTreeMap<_, _>>(),
        ));
    }
    // Each subscriber finishes once its copy equals what it should hold.
    let mut failures = Vec::new();
    for (i, ((finish_tx, task), expected)) in subscribers.into_iter().zip(&expected).enumerate() {
        finish_tx.send_replace(Some(Arc::clone(expected)));
        let copy = match within(Duration::from_secs(60), task).await {
            Ok(copy) => copy,
            Err(e) => panic!("subscriber {i} ({}) failed: {e}", PLANS[i].path),
        };
        if copy.rows != **expected {
            let missing: Vec<_> = expected
                .keys()
                .filter(|k| !copy.rows.contains_key(*k))
                .take(5)
                .collect();
            let extra: Vec<_> = copy
                .rows
                .keys()
                .filter(|k| !expected.contains_key(*k))
                .take(5)
                .collect();
            let differ: Vec<_> = copy
                .rows
                .iter()
                .filter(|(k, v)| expected.get(*k).is_some_and(|e| e != *v))
                .take(5)
                .map(|(k, v)| format!("{k}: copy {v} table {}", expected[k]))
                .collect();
            failures.push(format!(
                "subscriber {i} ({}) differs from the table: {} rows vs {}, position {:?}; missing {missing:?}; extra {extra:?}; different {differ:?}",
                PLANS[i].path,
                copy.rows.len(),
                expected.len(),
                copy.seq,
            ));
        }
    }
    if !failures.is_empty() {
        let (_, metrics) = crate::support::http_get(relay.addr, "/metrics")
            .await
            .unwrap();
        panic!("seed {seed}:\n{}\n{metrics}", failures.join("\n"));
    }
    eprintln!(
        "soak: {} writes; subscribers: {} messages, {} reconnects, {} resumes, {} resets; every copy equals the table",
        writes.load(Ordering::Relaxed),
        counters.messages.load(Ordering::Relaxed),
        counters.reconnects.load(Ordering::Relaxed),
        counters.resumes.load(Ordering::Relaxed),
        counters.resets.load(Ordering::Relaxed),
    );
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_short_soak_ends_with_every_copy_equal_to_the_table() {
    soak(Duration::from_secs(15)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "minutes long: PGRELAY_SOAK_SECS=300 cargo test --release --test integration soak::long -- --ignored --nocapture"]
async fn long() {
    let secs = std::env::var("PGRELAY_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(180);
    soak(Duration::from_secs(secs)).await;
}
