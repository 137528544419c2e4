//! Notify mode's sleep protocol: writers NOTIFY only while a relay sleeps (holds the sleep
//! lock); under load the relay polls and writers skip NOTIFY's commit-time lock. Every test
//! runs its relays with a 30 s `poll_max`, so an event that waited for the timer instead of a
//! wake-up or a poll fails the test's much shorter waits.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use pgrelay::capture::{SLEEP_LOCK, SLEEPER_LOCK};
use serde_json::Value;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::support::{Relay, Role, TestDb, Ws, admin_url, connect, http_get, within};

const ITEMS: &str = "create table items(id serial primary key, name text)";

/// Longer than any test waits for an event: only a wake-up or a poll can deliver in time.
const TIMER: Duration = Duration::from_secs(30);

/// How long an event may take to arrive in these tests.
const PROMPT: Duration = Duration::from_secs(5);

async fn relay(db: &TestDb, busy_rate: u64) -> Relay {
    Relay::start_with(db, &["items"], |c| {
        c.poll_max = TIMER;
        c.notify_busy_rate = busy_rate;
    })
    .await
}

/// Counts the notifications a session LISTENing on `pgrelay` receives.
async fn count_notifications(db: &TestDb) -> (tokio_postgres::Client, Arc<AtomicU64>) {
    let (client, mut connection) = tokio_postgres::connect(&db.url, NoTls).await.unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&count);
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message
                && n.payload().is_empty()
            {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    client.batch_execute("listen pgrelay").await.unwrap();
    (client, count)
}

/// Sessions of this database holding `key` in `mode` (`ExclusiveLock` or `ShareLock`).
async fn holders(db: &TestDb, key: i64, mode: &str) -> i64 {
    let client = db.client().await;
    client
        .query_one(
            "select count(*) from pg_locks
              where locktype = 'advisory' and database = (select oid from pg_database where datname = current_database())
                and classid = ($1::int8 >> 32)::oid and objid = ($1::int8 & 4294967295)::oid
                and objsubid = 1 and mode = $2 and granted",
            &[&key, &mode],
        )
        .await
        .unwrap()
        .get(0)
}

/// Waits until a relay sleeps holding the sleep lock.
async fn wait_asleep(db: &TestDb) {
    within(PROMPT, async {
        while holders(db, SLEEP_LOCK, "ExclusiveLock").await != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

fn name(event: &Value) -> String {
    event["data"]["name"].as_str().unwrap().to_owned()
}

/// Receives `n` events within [`PROMPT`] and returns their names.
async fn receive(ws: &mut Ws, n: usize) -> Vec<String> {
    within(PROMPT, ws.events(n))
        .await
        .iter()
        .map(name)
        .collect()
}

/// `writers` sessions insert `each` rows apiece, as fast as they can, named `{tag}{w}-{i}`.
async fn burst(db: &TestDb, tag: &str, writers: usize, each: usize) {
    let mut tasks = Vec::new();
    for w in 0..writers {
        let client = db.client().await;
        let tag = tag.to_owned();
        tasks.push(tokio::spawn(async move {
            for i in 0..each {
                client
                    .execute(
                        "insert into items(name) values ($1)",
                        &[&format!("{tag}{w}-{i}")],
                    )
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        within(Duration::from_secs(60), task).await.unwrap();
    }
}

/// The next number of a fixed pseudo-random sequence (xorshift32): a test's random moments
/// are the same on every run.
fn xorshift(seed: &mut u32) -> u32 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 17;
    *seed ^= *seed << 5;
    *seed
}

/// Every writer's rows arrived once, in its order.
fn assert_complete(names: &[String], tag: &str, writers: usize, each: usize) {
    assert_eq!(names.len(), writers * each, "{tag}: every row once");
    for w in 0..writers {
        let mine: Vec<usize> = names
            .iter()
            .filter_map(|n| n.strip_prefix(&format!("{tag}{w}-")))
            .map(|i| i.parse().unwrap())
            .collect();
        assert_eq!(
            mine,
            (0..each).collect::<Vec<_>>(),
            "{tag}: writer {w} in order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_notify_a_sleeping_relay_and_skip_notify_while_it_polls_under_load() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let (listener, notifications) = count_notifications(&db).await;
    let relay = relay(&db, 100).await;
    let mut ws = relay.ws("/ws/items").await;
    wait_asleep(&db).await;

    // Asleep: a single write notifies, and the notification delivers it.
    db.exec("insert into items(name) values ('one')").await;
    assert_eq!(receive(&mut ws, 1).await, ["one"]);
    // A round trip on the listening session: a notification sent by now has been read.
    listener.batch_execute("select 1").await.unwrap();
    assert_eq!(
        notifications.load(Ordering::Relaxed),
        1,
        "the write notified"
    );

    // Under load the relay lets go and polls: most writers skip their notification.
    let before = notifications.load(Ordering::Relaxed);
    let (writers, each) = (4, 500);
    burst(&db, "b", writers, each).await;
    let names = receive(&mut ws, writers * each).await;
    assert_complete(&names, "b", writers, each);
    listener.batch_execute("select 1").await.unwrap();
    let notified = notifications.load(Ordering::Relaxed) - before;
    assert!(
        notified < (writers * each / 2) as u64,
        "{notified} of {} transactions notified",
        writers * each
    );
    let (_, metrics) = http_get(relay.addr, "/metrics").await.unwrap();
    let busy: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pgrelay_capture_busy_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(busy >= 1, "the relay let writers skip NOTIFY");

    // Once the writes stop, it sleeps again, and a single write wakes it.
    wait_asleep(&db).await;
    db.exec("insert into items(name) values ('two')").await;
    assert_eq!(receive(&mut ws, 1).await, ["two"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_and_pauses_never_leave_a_write_waiting_for_the_timer() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    // A transaction that wrote before any relay slept, and stays open across rounds: it
    // skipped its notification, so no relay may sleep until it ends, and it must be read
    // once it commits.
    let open = db.client().await;
    open.batch_execute("begin; insert into items(name) values ('open')")
        .await
        .unwrap();
    let relay = relay(&db, 50).await;
    let mut ws = relay.ws("/ws/items").await;
    let mut open = Some(open);
    let mut seed = 0x2545_f491_u32;
    for round in 0..30 {
        let r = xorshift(&mut seed);
        let (writers, each) = (1 + (r % 3) as usize, 1 + (r >> 8) as usize % 40);
        let tag = format!("r{round}w");
        burst(&db, &tag, writers, each).await;
        let mut names = receive(&mut ws, writers * each).await;
        if round == 10 {
            open.take().unwrap().batch_execute("commit").await.unwrap();
            names.extend(receive(&mut ws, 1).await);
            assert_eq!(names.pop().as_deref(), Some("open"));
        }
        assert_complete(&names, &tag, writers, each);
        // A pause of 0-20 ms: the relay may be falling asleep while the next round starts.
        tokio::time::sleep(Duration::from_millis(u64::from(r >> 20) % 21)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_are_both_woken_and_one_that_stops_hands_over() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let a = relay(&db, 50).await;
    let b = relay(&db, 50).await;
    let mut on_a = a.ws("/ws/items").await;
    let mut on_b = b.ws("/ws/items").await;
    for round in 0..20 {
        let (writers, each) = if round % 4 == 3 { (3, 200) } else { (1, 1) };
        let tag = format!("r{round}w");
        burst(&db, &tag, writers, each).await;
        assert_complete(
            &receive(&mut on_a, writers * each).await,
            &tag,
            writers,
            each,
        );
        assert_complete(
            &receive(&mut on_b, writers * each).await,
            &tag,
            writers,
            each,
        );
    }
    // One of them sleeps holding the lock and the other follows it.
    wait_asleep(&db).await;
    within(PROMPT, async {
        while holders(&db, SLEEPER_LOCK, "ExclusiveLock").await != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // Whichever stops, the other still gets single writes at once.
    drop(on_a);
    a.stop().await.unwrap();
    for i in 0..3 {
        let tag = format!("after{i}w");
        burst(&db, &tag, 1, 1).await;
        assert_complete(&receive(&mut on_b, 1).await, &tag, 1, 1);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_takes_the_sleep_locks_delays_events_no_longer_than_poll_max() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let role = Role::create(&db, "locker", "").await;
    let hostile = role.client().await;

    // Holding the sleep lock in share mode, as a writer in flight would: the relay never
    // sleeps, and polls.
    hostile
        .query_one("select pg_advisory_lock_shared($1)", &[&SLEEP_LOCK])
        .await
        .unwrap();
    let poll_max = Duration::from_secs(2);
    let relay = Relay::start_with(&db, &["items"], |c| {
        c.poll_max = poll_max;
        c.notify_busy_rate = 100;
    })
    .await;
    let mut ws = relay.ws("/ws/items").await;
    for i in 0..5 {
        db.exec(&format!("insert into items(name) values ('shared{i}')"))
            .await;
        let started = std::time::Instant::now();
        assert_eq!(receive(&mut ws, 1).await, [format!("shared{i}")]);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "polled, not timed"
        );
    }
    hostile
        .batch_execute("select pg_advisory_unlock_all()")
        .await
        .unwrap();
    wait_asleep(&db).await;

    // Pretending to be a sleeping relay and then vanishing without a word: events wait for
    // the relay's timer at most.
    drop(relay);
    drop(ws);
    within(PROMPT, async {
        while holders(&db, SLEEP_LOCK, "ExclusiveLock").await != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let taken: (bool, bool) = {
        let row = hostile
            .query_one(
                "select pg_try_advisory_lock($1), pg_try_advisory_lock($2)",
                &[&SLEEP_LOCK, &SLEEPER_LOCK],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(taken, (true, true));
    let relay = Relay::start_with(&db, &["items"], |c| {
        c.poll_max = poll_max;
        c.notify_busy_rate = 100;
    })
    .await;
    let mut ws = relay.ws("/ws/items").await;
    db.exec("insert into items(name) values ('followed')").await;
    assert_eq!(receive(&mut ws, 1).await, ["followed"]);
    hostile
        .batch_execute("select pg_advisory_unlock_all()")
        .await
        .unwrap();
    for i in 0..3 {
        db.exec(&format!("insert into items(name) values ('left{i}')"))
            .await;
        let started = std::time::Instant::now();
        assert_eq!(receive(&mut ws, 1).await, [format!("left{i}")]);
        assert!(
            started.elapsed() < poll_max + Duration::from_secs(1),
            "at most poll_max late"
        );
    }
    drop(hostile);
    role.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_commits_while_the_relay_falls_asleep_is_read_at_once() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    // Busy at 20 notifications a second: every run of writes below wakes the relay for good,
    // and it falls asleep again after each.
    let relay = relay(&db, 20).await;
    let mut ws = relay.ws("/ws/items").await;
    let client = db.client().await;
    // The first write after a run lands at a random moment of the relay's turn from reading
    // the run to sleeping (an empty poll, the lock, one more poll): one that commits between
    // the empty poll and the lock is read by that last poll, or it waits for the 30 s timer.
    let mut seed = 0x9e37_79b9_u32;
    let mut next = || xorshift(&mut seed);
    for round in 0..150 {
        let run = 3 + next() as usize % 40;
        for i in 0..run {
            client
                .execute(
                    "insert into items(name) values ($1)",
                    &[&format!("r{round}-{i}")],
                )
                .await
                .unwrap();
        }
        let names = receive(&mut ws, run).await;
        assert_eq!(names.last().cloned(), Some(format!("r{round}-{}", run - 1)));
        tokio::time::sleep(Duration::from_micros(u64::from(next() % 3000))).await;
    }
}

/// The relay's poll count (`pgrelay_capture_polls_total`).
async fn polls(relay: &Relay) -> u64 {
    let (_, metrics) = http_get(relay.addr, "/metrics").await.unwrap();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("pgrelay_capture_polls_total "))
        .unwrap()
        .parse()
        .unwrap()
}

/// Waits until `relay` waits for notifications (it holds the sleep lock or follows a relay
/// that does): it stops polling (an awake relay polls at least every `poll_min * 8`).
async fn wait_quiet(relay: &Relay) {
    within(PROMPT, async {
        loop {
            let before = polls(relay).await;
            tokio::time::sleep(Duration::from_millis(150)).await;
            if polls(relay).await == before {
                return;
            }
        }
    })
    .await;
}

/// Terminates the backend of the relay that holds the sleep lock; returns its pid.
async fn terminate_holder(db: &TestDb) -> i32 {
    let admin = connect(&admin_url()).await;
    let pids: Vec<i32> = admin
        .query(
            "select pid from pg_locks
              where locktype = 'advisory' and database = (select oid from pg_database where datname = $2)
                and classid = ($1::int8 >> 32)::oid and objid = ($1::int8 & 4294967295)::oid
                and objsubid = 1 and mode = 'ExclusiveLock' and granted",
            &[&SLEEP_LOCK, &db.name],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(pids.len(), 1, "one relay holds the sleep lock");
    admin
        .query_one("select pg_terminate_backend($1)", &[&pids[0]])
        .await
        .unwrap();
    pids[0]
}

/// Opens a transaction on `writer` that holds the sleep lock in share mode, as a capture
/// trigger that skipped its notification does (retrying while a relay holds the lock).
async fn begin_skipping(writer: &tokio_postgres::Client) {
    within(PROMPT, async {
        loop {
            writer.batch_execute("begin").await.unwrap();
            let got: bool = writer
                .query_one(
                    "select pg_try_advisory_xact_lock_shared($1)",
                    &[&SLEEP_LOCK],
                )
                .await
                .unwrap()
                .get(0);
            if got {
                return;
            }
            writer.batch_execute("rollback").await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_polls_once_the_holders_capture_connection_drops() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let a = relay(&db, 0).await;
    wait_asleep(&db).await;
    let b = relay(&db, 0).await;
    let mut on_a = a.ws("/ws/items").await;
    let mut on_b = b.ws("/ws/items").await;
    // b follows a: a write notifies, both read it, and b waits for notifications again.
    wait_quiet(&b).await;
    db.exec("insert into items(name) values ('before')").await;
    assert_eq!(receive(&mut on_a, 1).await, ["before"]);
    assert_eq!(receive(&mut on_b, 1).await, ["before"]);
    wait_quiet(&b).await;

    // a's capture connection drops (a reconnects, and says nothing to b). A writer in
    // flight that skipped its notification keeps every relay awake, so a write that commits
    // meanwhile skips its notification too: only polls read it.
    terminate_holder(&db).await;
    let in_flight = db.client().await;
    begin_skipping(&in_flight).await;
    db.exec("insert into items(name) values ('gap')").await;
    assert_eq!(receive(&mut on_a, 1).await, ["gap"]);
    assert_eq!(
        receive(&mut on_b, 1).await,
        ["gap"],
        "b still followed a relay that no longer slept"
    );
    in_flight.batch_execute("rollback").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awake_relays_never_take_each_others_probe_for_a_sleeping_relay() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    // A writer in flight that skipped its notification: no relay may sleep until it commits,
    // so every relay polls on its own and, after each empty poll, tries to sleep: it probes
    // the locks, and another relay's probe must never look like a sleeping relay to it.
    let writer = db.client().await;
    begin_skipping(&writer).await;
    writer
        .batch_execute("insert into items(name) values ('late')")
        .await
        .unwrap();
    let mut relays = Vec::new();
    let mut sockets = Vec::new();
    for _ in 0..4 {
        // Tries every 2 ms (poll_min * 8) rather than 8: more chances for two probes to meet.
        let r = Relay::start_with(&db, &["items"], |c| {
            c.poll_max = TIMER;
            c.notify_busy_rate = 0;
            c.poll_min = Duration::from_micros(250);
        })
        .await;
        sockets.push(r.ws("/ws/items").await);
        relays.push(r);
    }
    // Up to 8 s of probing, or until a relay stops polling (it follows no one: nothing will
    // wake it but its timer).
    let started = std::time::Instant::now();
    let mut quiet = None;
    while quiet.is_none() && started.elapsed() < Duration::from_secs(8) {
        let before = futures_util::future::join_all(relays.iter().map(polls)).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        let after = futures_util::future::join_all(relays.iter().map(polls)).await;
        quiet = (0..relays.len())
            .find(|&i| before[i] == after[i])
            .map(|i| (i, started.elapsed()));
    }
    writer.batch_execute("commit").await.unwrap();
    for (i, ws) in sockets.iter_mut().enumerate() {
        let Ok(events) = tokio::time::timeout(PROMPT, ws.events(1)).await else {
            panic!(
                "relay {i} did not read the write in {PROMPT:?} (relay, time it stopped polling while no relay slept: {quiet:?})"
            );
        };
        assert_eq!(name(&events[0]), "late");
    }
}
