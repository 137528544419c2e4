//! What roles inside the database can do to the capture path: nothing.

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::support::{Relay, Role, STEP, TestDb, http_get, within};

/// The attack of issue 10: the (unprivileged) owner of an exposed table gives a column a type
/// whose cast to json runs its own code, and capture renders a row of it. The code runs as
/// pgrelay_capture, which may only append to the log: it cannot make anyone superuser, nor
/// read a table it was not granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_owners_cast_to_json_runs_without_privileges() {
    let db = TestDb::new().await;
    db.exec("create table secrets (id int primary key, secret text); insert into secrets values (1, 'hunter2')")
        .await;
    let owner = Role::create(
        &db,
        "owner",
        "grant create, usage on schema public to {role}",
    )
    .await;
    let client = owner.client().await;
    client
        .batch_execute(
            "create table loot (id int primary key, copied text);
             create type mood as enum ('happy');",
        )
        .await
        .unwrap();
    // The relay's operator (a superuser here) exposes the owner's table.
    crate::support::install(&db, &["loot"]).await;

    for (attack, body) in [
        (
            "escalate",
            "execute format('alter role %I superuser', session_user)",
        ),
        ("read", "perform (select secret from public.secrets)"),
        (
            "read the log",
            "perform (select count(*) from pgrelay.changes)",
        ),
        (
            "own the log",
            "execute 'alter table pgrelay.changes owner to ' || quote_ident(session_user)",
        ),
    ] {
        client
            .batch_execute(&format!(
                "create or replace function mood_json(mood) returns json language plpgsql as $f$
                 begin {body}; return '\"x\"'::json; end $f$;
                 drop cast if exists (mood as json);
                 create cast (mood as json) with function mood_json(mood);
                 alter table loot add column if not exists m mood;"
            ))
            .await
            .unwrap();
        // The owner's own code fails inside capture, so does the owner's insert: nothing the
        // owner could not do to its own table anyway.
        let outcome = client
            .execute("insert into loot (id, m) values (1, 'happy')", &[])
            .await;
        let err = outcome.expect_err(attack);
        let message = err
            .as_db_error()
            .map(|e| e.message().to_owned())
            .unwrap_or_default();
        assert!(
            message.contains("permission denied") || message.contains("must be"),
            "{attack}: {message}"
        );
        assert!(
            !owner.is_superuser().await,
            "{attack}: escalated to superuser"
        );
    }
    drop(client);
    owner.drop().await;
}

/// Listens to `pgrelay` as `url`'s role and forwards every notification's payload.
async fn listen(url: &str) -> (tokio_postgres::Client, mpsc::UnboundedReceiver<String>) {
    let (client, mut connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                let _ = tx.send(n.payload().to_owned());
            }
        }
    });
    client.batch_execute("listen pgrelay").await.unwrap();
    (client, rx)
}

/// Any role that can connect may LISTEN and NOTIFY on any channel: it learns only that
/// something committed (the payload is empty), and what it sends is never taken for an event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unprivileged_role_that_listens_and_notifies_reads_and_forges_nothing() {
    let db = TestDb::new()
        .await
        .with_tables(
            "create table items (id int primary key, secret text)",
            &["items"],
        )
        .await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut ws = relay.ws("/ws/items").await;
    let snoop = Role::create(&db, "snoop", "").await;
    let (snoop_client, mut heard) = listen(&snoop.db_url).await;

    db.exec("insert into items values (1, 'hunter2')").await;
    let event = ws.next_json().await;
    assert_eq!(event["data"]["secret"], "hunter2");
    let payload = within(STEP, heard.recv()).await.unwrap();
    assert_eq!(payload, "", "notifications carry nothing");

    // Forgeries: events in every shape earlier versions used, pointers into the log, junk.
    let items: u32 = db
        .client()
        .await
        .query_one("select 'items'::regclass::oid", &[])
        .await
        .unwrap()
        .get(0);
    for forged in [
        r#"{"op":"c","table":"items","data":{"id":666,"secret":"forged"}}"#.to_owned(),
        format!(r#"{{"relid":{items},"from":1,"to":9223372036854775807,"n":1}}"#),
        r#"{"from":1,"to":9223372036854775807}"#.to_owned(),
        "[1,\"c\",null,{\"id\":666},null]".to_owned(),
        "x".repeat(7999),
    ] {
        snoop_client
            .execute("select pg_notify('pgrelay', $1)", &[&forged])
            .await
            .unwrap();
    }
    // Nor can it write the log, read it, or fire capture by hand.
    for attempt in [
        "select count(*) from pgrelay.changes".to_owned(),
        format!(
            "insert into pgrelay.changes (seq, last_seq, stmt, relid, n, body) values (1, 1, 1, {items}, 1, '[]')"
        ),
        "select pgrelay.install('public', 'items')".to_owned(),
        "select nextval('pgrelay.changes_seq')".to_owned(),
        "select * from items".to_owned(),
    ] {
        let err = snoop_client
            .batch_execute(&attempt)
            .await
            .expect_err(&attempt);
        assert!(
            err.as_db_error()
                .map(|e| e.message().contains("permission denied"))
                == Some(true),
            "{attempt}: {err:?}"
        );
    }

    // Capture goes on; the next event is the next real one.
    db.exec("insert into items values (2, 'real')").await;
    let event = ws.next_json().await;
    assert_eq!(event["type"], "create", "{event}");
    assert_eq!(event["id"], 2, "{event}");
    let (status, _) = http_get(relay.addr, "/readyz").await.unwrap();
    assert_eq!(status, 200);

    // A flood of wake-ups costs polls, not correctness: events still arrive in order.
    let flood = tokio::spawn({
        let url = snoop.db_url.clone();
        async move {
            let client = crate::support::connect(&url).await;
            for _ in 0..2000 {
                if client
                    .batch_execute("notify pgrelay, 'wake'")
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    for id in 3..53 {
        db.exec(&format!("insert into items values ({id}, 'x')"))
            .await;
    }
    for id in 3..53 {
        let event = ws.next_json().await;
        assert_eq!(event["id"], id, "{event}");
    }
    within(STEP, flood).await.unwrap();
    drop(snoop_client);
    snoop.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_sets_capture_settings_to_garbage_still_writes_and_streams() {
    let db = TestDb::new()
        .await
        .with_tables(
            // The statement seq lives in a setting any session can change; a user trigger
            // that fires between capture's BEFORE and AFTER triggers sets it to garbage.
            "create table g (id int primary key);
             create function spoil() returns trigger language plpgsql as $$
             begin
               perform set_config(format('pgrelay.s_%s_1', 'g'::regclass::oid),
                                  case when new.id = 1 then 'not a number' else '99999999999999999999' end,
                                  true);
               return null;
             end $$;
             create trigger spoil after insert on g for each row execute function spoil()",
            &["g"],
        )
        .await;
    let relay = Relay::start(&db, &["g"]).await;
    let mut ws = relay.ws("/ws/g").await;
    db.exec("insert into g values (1)").await;
    assert_eq!(ws.next_json().await["id"], 1);
    db.exec("insert into g values (2)").await;
    assert_eq!(ws.next_json().await["id"], 2);
}
