//! The bench's receiving end: WebSocket subscribers (the relay's and the peers', one receive
//! loop for both), the baseline's plain LISTEN client, and what they saw turned into
//! commit-to-receive latencies, first arrivals and the `PGRELAY_BENCH_TRACE` CSV.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use super::{BASELINE_TABLE, peers};

/// A subscriber's socket.
pub(super) type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The row id in a change frame: the first `"id":` number.
fn frame_id(text: &str) -> Option<usize> {
    let start = text.find("\"id\":")? + 5;
    let digits = text[start..].bytes().take_while(u8::is_ascii_digit).count();
    text[start..start + digits].parse().ok()
}

/// The capture time in a change frame (`"ts":"…"`), as a system time.
fn frame_ts(text: &str) -> Option<SystemTime> {
    let start = text.rfind("\"ts\":\"")? + 6;
    let end = start + text[start..].find('"')?;
    let at = chrono::DateTime::parse_from_rfc3339(&text[start..end]).ok()?;
    let nanos = u64::try_from(at.timestamp_nanos_opt()?).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos))
}

/// What one subscriber saw.
#[derive(Default)]
pub(super) struct Seen {
    /// Times each row id arrived (index = id).
    pub(super) counts: Vec<u8>,
    pub(super) frames: u64,
    /// When the subscriber had every expected row.
    pub(super) complete_at: Option<Instant>,
    /// (row id, capture-to-receive latency in milliseconds) (steady only).
    pub(super) latencies: Vec<(usize, f64)>,
    /// The relay sent a Close frame.
    pub(super) closed: bool,
    /// (row id, when it arrived) for commit-to-receive latency (steady only).
    pub(super) arrivals: Vec<(usize, Instant)>,
}

/// How a subscriber task reads what it receives.
#[derive(Clone)]
pub(super) struct Reader {
    /// Who sends, for messages: "the relay", "peer NAME".
    pub(super) who: Arc<str>,
    /// Where the row id is: `None` in the relay's change frames (the first `"id":`, batches
    /// split); a JSON pointer in a peer's messages.
    pub(super) pointer: Option<Arc<str>>,
    /// Set when a peer's probe row (id ≤ 0) arrived: its subscription is live.
    pub(super) live: Arc<AtomicBool>,
}

impl Reader {
    pub(super) fn relay() -> Self {
        Reader {
            who: "the relay".into(),
            pointer: None,
            live: Arc::default(),
        }
    }
}

pub(super) async fn subscribe(url: &str) -> anyhow::Result<Socket> {
    let (socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    Ok(socket)
}

/// Reads until `expected` distinct rows arrived (or `stop` fires), recording what came.
pub(super) async fn receive(
    mut socket: Socket,
    reader: Reader,
    mut expected: tokio::sync::watch::Receiver<u64>,
    capacity: usize,
    measure_latency: bool,
    stop: tokio_util::sync::CancellationToken,
) -> Seen {
    let mut seen = Seen {
        counts: vec![0; capacity + 1],
        ..Seen::default()
    };
    let mut distinct = 0u64;
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => break,
            // The writes ended: the subscriber may already hold every row.
            _ = expected.changed() => {
                let want = *expected.borrow_and_update();
                if want > 0 && distinct >= want {
                    seen.complete_at = Some(Instant::now());
                    break;
                }
                continue;
            }
            message = socket.next() => message,
        };
        let Some(Ok(message)) = message else { break };
        let text = match message {
            Message::Text(text) => text,
            Message::Close(frame) => {
                seen.closed = true;
                if let Some(frame) = frame {
                    eprintln!(
                        "{} closed a subscriber: {} {}",
                        reader.who,
                        u16::from(frame.code),
                        frame.reason
                    );
                }
                break;
            }
            _ => continue,
        };
        let text = text.as_str();
        const CREATE: &str = "{\"type\":\"create\"";
        // A `batch` frame holds the same messages, one after another.
        let events: Vec<&str> = if reader.pointer.is_some() {
            vec![text]
        } else if text.starts_with("{\"type\":\"batch\"") {
            let starts: Vec<usize> = text.match_indices(CREATE).map(|(i, _)| i).collect();
            starts
                .iter()
                .enumerate()
                .map(|(n, &i)| &text[i..starts.get(n + 1).copied().unwrap_or(text.len())])
                .collect()
        } else if text.starts_with(CREATE) {
            vec![text]
        } else {
            continue;
        };
        if reader.pointer.is_none() {
            seen.frames += 1;
        }
        for event in events {
            let id = match &reader.pointer {
                None => frame_id(event),
                Some(pointer) => match peers::message_id(event, pointer) {
                    Some(probe) if probe <= 0 => {
                        reader.live.store(true, Ordering::Release);
                        continue;
                    }
                    Some(id) => {
                        seen.frames += 1;
                        usize::try_from(id).ok()
                    }
                    None => None,
                },
            };
            // Only the relay's frames carry a capture time.
            if measure_latency
                && reader.pointer.is_none()
                && let Some(ts) = frame_ts(event)
                && let Some(id) = id
            {
                let latency = SystemTime::now().duration_since(ts).unwrap_or_default();
                seen.latencies.push((id, latency.as_secs_f64() * 1000.0));
            }
            if let Some(id) = id {
                if measure_latency {
                    seen.arrivals.push((id, Instant::now()));
                }
                if id >= seen.counts.len() {
                    seen.counts.resize(id + 1, 0);
                }
                seen.counts[id] = seen.counts[id].saturating_add(1);
                if seen.counts[id] == 1 {
                    distinct += 1;
                }
            }
        }
        let want = *expected.borrow();
        if want > 0 && distinct >= want {
            seen.complete_at = Some(Instant::now());
            break;
        }
    }
    seen
}

/// The steady baseline's plain LISTEN client (see [`super::BenchConfig::baseline`]): listens on
/// [`BASELINE_TABLE`]'s channel, then records when each row's notification arrived until
/// `expected` rows did (or `stop` fires). The client is returned to be kept until then
/// (dropping it closes the connection).
pub(super) async fn listen_baseline(
    database_url: &str,
    mut expected: tokio::sync::watch::Receiver<u64>,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<(
    tokio_postgres::Client,
    tokio::task::JoinHandle<Vec<(usize, Instant)>>,
)> {
    let (client, mut connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls)
        .await
        .context("connecting the baseline listener")?;
    let handle = tokio::spawn(async move {
        let mut arrivals = Vec::new();
        loop {
            let message = tokio::select! {
                _ = stop.cancelled() => break,
                changed = expected.changed() => {
                    let want = *expected.borrow_and_update();
                    if changed.is_err() || (want > 0 && arrivals.len() as u64 >= want) {
                        break;
                    }
                    continue;
                }
                message = futures_util::future::poll_fn(|cx| connection.poll_message(cx)) => message,
            };
            match message {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                    let at = Instant::now();
                    if let Some(id) = frame_id(n.payload()) {
                        arrivals.push((id, at));
                    }
                    let want = *expected.borrow();
                    if want > 0 && arrivals.len() as u64 >= want {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            }
        }
        arrivals
    });
    client
        .batch_execute(&format!("listen {BASELINE_TABLE}"))
        .await
        .context("listening for the baseline")?;
    Ok((client, handle))
}

/// Commit-to-receive latencies in milliseconds of `arrivals` (row id, when it arrived), for
/// rows `warm` admits; `commits[id - 1]` is when row `id`'s commit was acknowledged.
pub(super) fn commit_latencies(
    arrivals: &[(usize, Instant)],
    commits: &[Instant],
    warm: impl Fn(usize) -> bool,
) -> Vec<f64> {
    arrivals
        .iter()
        .filter(|(id, _)| warm(*id))
        .filter_map(|(id, at)| {
            let commit = id.checked_sub(1).and_then(|i| commits.get(i))?;
            // The notification can beat the commit's acknowledgement to the writer: 0.
            Some(at.saturating_duration_since(*commit).as_secs_f64() * 1000.0)
        })
        .collect()
}

/// The first arrival of each row (id, when) among `arrivals`, in id order; rows `1..=rows`.
pub(super) fn first_arrivals<'a>(
    arrivals: impl IntoIterator<Item = &'a [(usize, Instant)]>,
    rows: usize,
) -> Vec<(usize, Instant)> {
    let mut first: Vec<Option<Instant>> = vec![None; rows + 1];
    for (id, at) in arrivals.into_iter().flatten() {
        if let Some(slot) = first.get_mut(*id) {
            *slot = Some(slot.map_or(*at, |f| f.min(*at)));
        }
    }
    first
        .iter()
        .enumerate()
        .filter_map(|(id, at)| Some((id, (*at)?)))
        .collect()
}

/// `PGRELAY_BENCH_TRACE`'s CSV: per row, its commit time since `started` and, per column
/// (name, first arrivals in id order), commit to arrival; all milliseconds, empty where the
/// row never arrived.
pub(super) fn trace(
    started: Instant,
    commits: &[Instant],
    columns: &[(String, Vec<(usize, Instant)>)],
) -> String {
    let mut out = String::from("id,commit_ms");
    for (name, _) in columns {
        out.push_str(&format!(",{name}_ms"));
    }
    out.push('\n');
    let mut next: Vec<_> = columns.iter().map(|(_, a)| a.iter().peekable()).collect();
    for (i, commit) in commits.iter().enumerate() {
        let id = i + 1;
        out.push_str(&format!(
            "{id},{:.3}",
            commit.duration_since(started).as_secs_f64() * 1000.0
        ));
        for arrivals in &mut next {
            out.push(',');
            if let Some((_, at)) = arrivals.next_if(|(a, _)| *a == id) {
                let ms = at.saturating_duration_since(*commit).as_secs_f64() * 1000.0;
                out.push_str(&format!("{ms:.3}"));
            }
        }
        out.push('\n');
    }
    out
}

/// What the subscriber tasks `handles` saw, once each has every row or `deadline` passed
/// (then `stop` ends them all, and they return what they have).
pub(super) async fn gather(
    handles: Vec<tokio::task::JoinHandle<Seen>>,
    deadline: tokio::time::Instant,
    stop: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<Vec<Seen>> {
    let mut seen = Vec::with_capacity(handles.len());
    for mut handle in handles {
        let result = match tokio::time::timeout_at(deadline, &mut handle).await {
            Ok(result) => result,
            Err(_) => {
                // Out of time: stop everyone and keep what they have (the rest counts as lost).
                stop.cancel();
                handle.await
            }
        };
        match result {
            Ok(s) => seen.push(s),
            Err(err) => bail!("a subscriber task failed: {err}"),
        }
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_yield_their_id_and_capture_time() {
        let frame = r#"{"type":"create","resource":"pgrelay_bench","id":4217,"data":{"id":4217,"payload":"x"},"seq":9,"ts":"2026-11-27T06:26:31.41497+00:00"}"#;
        assert_eq!(frame_id(frame), Some(4217));
        let ts = frame_ts(frame).unwrap();
        let secs = ts.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(secs, 1_795_760_791);
    }
}
