//! A slow subscriber never slows the others (DESIGN.md guarantee 5).

use std::time::Duration;

use crate::support::{RelayProcess, TestDb, Ws, http_get, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_and_the_others_get_everything() {
    let db = TestDb::new()
        .await
        .with_tables(
            "create table docs(id serial primary key, body text)",
            &["docs"],
        )
        .await;
    let relay = RelayProcess::start(&db.url, "docs", &[]).await;
    let url = format!("ws://{}/ws/docs", relay.addr);

    // The stalled client: a tiny receive buffer, a completed handshake, then no reads.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(relay.addr).await.unwrap();
    let (stalled, _) = tokio_tungstenite::client_async(url.as_str(), stream)
        .await
        .unwrap();

    let (healthy, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    let mut healthy = Ws { socket: healthy };

    // 20,000 events of about 2 kB each, in statements of 1,000 rows.
    let writer = db.client().await;
    let write = tokio::spawn(async move {
        for _ in 0..20 {
            writer
                .batch_execute(
                    "insert into docs(body) select repeat('x', 2000) from generate_series(1, 1000)",
                )
                .await
                .unwrap();
        }
    });
    let mut received = 0;
    while received < 20_000 {
        let e = healthy.next_json().await;
        assert_eq!(e["type"], "create");
        received += 1;
    }
    within(Duration::from_secs(60), write).await.unwrap();

    // The stalled client was closed as a slow consumer; only the healthy one is left.
    within(Duration::from_secs(20), async {
        loop {
            let (_, metrics) = http_get(relay.addr, "/metrics").await.unwrap();
            if metrics.contains("pgrelay_slow_consumers_total 1")
                && metrics.contains("pgrelay_ws_connections 1")
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let peak = relay.peak_rss();
    eprintln!(
        "relay peak RSS with a stalled client and 40 MB of events: {} MiB",
        peak >> 20
    );
    assert!(
        peak < 256 << 20,
        "relay peak RSS {} MiB exceeds 256 MiB",
        peak >> 20
    );
    drop(stalled);
}
