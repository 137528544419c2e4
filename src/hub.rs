//! Fan-out: one bounded, shared ring of encoded events per table, read by cursors.
//!
//! Each event is encoded to its wire frame once, when the capture task publishes it, and
//! every subscriber of the table reads the same `Arc<Entry>`.
//!
//! Why a ring and cursors rather than a queue per subscriber: the producer (the capture
//! task) only appends under a short lock and bumps a `watch` counter; it never waits on, or
//! even visits, a subscriber. Memory is bounded by the ring, whatever the number of
//! subscribers, and the ring doubles as the recent history that resumes replay from.
//!
//! A subscriber is a slow consumer (closed with 4008, resumable with `since`; DESIGN.md
//! guarantee 5) when either
//! - the ring has evicted entries its cursor has not read (it fell behind the history), or
//! - it is more than the queue limit (default 8 MiB) behind the head *while its socket is not
//!   taking writes* ([`Cursor::overflowed`] races the socket write in `http::ws`).
//!
//! A subscriber that is behind only because a burst arrived faster than any socket drains
//! (a 200,000-row statement) but keeps reading is not closed: its backlog is the shared ring,
//! which costs nothing extra per subscriber.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::event::{ChangeEvent, Op};

/// Limits of the per-table rings.
#[derive(Debug, Clone, Copy)]
pub struct HubLimits {
    /// Most events a table's ring keeps.
    pub ring_events: usize,
    /// Most bytes of encoded frames a table's ring keeps.
    pub ring_bytes: usize,
    /// Most bytes a subscriber may lag behind the head before it is a slow consumer.
    pub queue_bytes: u64,
}

/// One published event and its encoded frame, shared by every subscriber of the table.
#[derive(Debug)]
pub struct Entry {
    /// The decoded event (for filters and snapshot visibility); a placeholder for a gap.
    pub event: ChangeEvent,
    /// Events of this table were lost here (log rows gone before capture read them): every
    /// subscriber gets `frame`, a `reset` message, whatever its filter or snapshot.
    pub gap: bool,
    /// The JSON text frame, encoded once; cloning it shares the bytes.
    pub frame: Utf8Bytes,
    /// The table's subscriber-facing name.
    pub resource: Arc<str>,
    /// Frames for other shapes (type as sent, projection key), encoded on first use.
    shaped: Mutex<Vec<(Op, u64, Utf8Bytes)>>,
    /// Bytes published on this table up to and including this entry.
    end_offset: u64,
}

impl Entry {
    /// The frame for a (type as sent, projection) shape: encoded by the first subscriber that
    /// needs it, shared by the rest.
    pub fn shaped_frame(
        &self,
        sent: Op,
        select_key: u64,
        encode: impl FnOnce() -> String,
    ) -> Utf8Bytes {
        // Poisoning leaves the cache consistent (a push either happened or not).
        let mut shaped = self.shaped.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, _, frame)) = shaped
            .iter()
            .find(|(op, key, _)| *op == sent && *key == select_key)
        {
            return frame.clone();
        }
        let frame = Utf8Bytes::from(encode());
        shaped.push((sent, select_key, frame.clone()));
        frame
    }
}

/// Why a cursor cannot go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Overflow {
    /// The subscriber fell further behind than its queue allows.
    #[error("Subscriber fell more than its queue limit behind")]
    Lagged,
    /// The ring evicted events the subscriber had not read.
    #[error("Subscriber fell behind the retained history")]
    Evicted,
    /// The hub is gone (the relay is shutting down).
    #[error("The hub closed")]
    Closed,
}

#[derive(Debug, Default)]
struct Ring {
    entries: VecDeque<Arc<Entry>>,
    /// Position of `entries[0]`; positions count every event ever published on the table.
    first: u64,
    /// Sum of the frame sizes in `entries`.
    held_bytes: usize,
    /// Bytes ever published on the table.
    published_bytes: u64,
}

impl Ring {
    fn next(&self) -> u64 {
        self.first + self.entries.len() as u64
    }
}

/// The ring of one table and the counter that wakes its readers.
#[derive(Debug)]
pub struct Topic {
    resource: Arc<str>,
    ring: Mutex<Ring>,
    /// Bumped after every publish; cursors wait on it. Dropped with the hub.
    head_tx: watch::Sender<u64>,
    limits: HubLimits,
}

impl Topic {
    fn lock(&self) -> MutexGuard<'_, Ring> {
        // A panic while holding this lock leaves the ring consistent (every mutation is a
        // single push/pop with its counters), so a poisoned lock is still safe to use.
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The subscriber-facing table name.
    pub fn resource(&self) -> &str {
        &self.resource
    }

    fn publish(&self, event: ChangeEvent) {
        let frame = Utf8Bytes::from(event.to_frame(&self.resource));
        self.push(event, frame, false);
    }

    /// Records that events of this table were lost (see [`Entry::gap`]).
    fn publish_gap(&self) {
        let (schema, table) = match self.resource.split_once('.') {
            Some((schema, table)) => (schema.to_owned(), table.to_owned()),
            None => ("public".to_owned(), self.resource.to_string()),
        };
        let placeholder = ChangeEvent {
            seq: 0,
            xid: 0,
            ts: String::new(),
            schema,
            table,
            op: Op::Create,
            id: serde_json::Value::Null,
            data: None,
            old: None,
        };
        let frame = Utf8Bytes::from(crate::event::control::reset(
            &self.resource,
            "events_missing",
        ));
        self.push(placeholder, frame, true);
    }

    fn push(&self, event: ChangeEvent, frame: Utf8Bytes, gap: bool) {
        let mut ring = self.lock();
        ring.published_bytes += frame.len() as u64;
        ring.held_bytes += frame.len();
        let end_offset = ring.published_bytes;
        ring.entries.push_back(Arc::new(Entry {
            event,
            gap,
            frame,
            resource: Arc::clone(&self.resource),
            shaped: Mutex::new(Vec::new()),
            end_offset,
        }));
        while ring.entries.len() > 1
            && (ring.entries.len() > self.limits.ring_events
                || ring.held_bytes > self.limits.ring_bytes)
        {
            if let Some(old) = ring.entries.pop_front() {
                ring.held_bytes -= old.frame.len();
                ring.first += 1;
            }
        }
        let next = ring.next();
        drop(ring);
        self.head_tx.send_replace(next);
    }

    /// A cursor at the head: it reads what is published from now on.
    pub fn subscribe(self: &Arc<Self>) -> Cursor {
        let ring = self.lock();
        let (pos, offset) = (ring.next(), ring.published_bytes);
        drop(ring);
        Cursor {
            topic: Arc::clone(self),
            pos,
            offset,
            base: offset,
            head_rx: self.head_tx.subscribe(),
        }
    }

    /// A cursor just after the retained event with this seq, or `None` when the ring no
    /// longer (or never) held it.
    pub fn subscribe_after_seq(self: &Arc<Self>, seq: i64) -> Option<Cursor> {
        let ring = self.lock();
        let index = ring
            .entries
            .iter()
            .rposition(|e| !e.gap && e.event.seq == seq)?;
        let entry = &ring.entries[index];
        let (pos, offset, base) = (
            ring.first + index as u64 + 1,
            entry.end_offset,
            ring.published_bytes,
        );
        drop(ring);
        Some(Cursor {
            topic: Arc::clone(self),
            pos,
            offset,
            base,
            head_rx: self.head_tx.subscribe(),
        })
    }
}

/// A subscriber's read position in one table's ring.
#[derive(Debug)]
pub struct Cursor {
    topic: Arc<Topic>,
    /// Position of the next entry to read.
    pos: u64,
    /// `end_offset` of the last entry read.
    offset: u64,
    /// Bytes published when the cursor was created or rebased: a backlog that existed then
    /// (a resume's replay, what came during initial data) is bounded by the ring and does
    /// not count against the queue limit; only what is published after it does.
    base: u64,
    head_rx: watch::Receiver<u64>,
}

impl Cursor {
    /// The table this cursor reads.
    pub fn topic(&self) -> &Arc<Topic> {
        &self.topic
    }

    /// Stops counting what is published up to now against the queue limit (see `base`).
    pub fn rebase(&mut self) {
        self.base = self.topic.lock().published_bytes;
    }

    /// Waits for published entries and appends up to `max` of them to `out`.
    ///
    /// Cancel safe: nothing is consumed unless it returns.
    pub async fn next_batch(
        &mut self,
        out: &mut Vec<Arc<Entry>>,
        max: usize,
    ) -> Result<(), Overflow> {
        loop {
            // Mark the counter seen before looking, so a publish after the look wakes us.
            self.head_rx.borrow_and_update();
            {
                let ring = self.topic.lock();
                self.check_evicted(&ring)?;
                if self.pos < ring.next() {
                    let start = (self.pos - ring.first) as usize;
                    let end = ring.entries.len().min(start + max);
                    out.extend(ring.entries.range(start..end).cloned());
                    self.pos = ring.first + end as u64;
                    self.offset = ring.entries[end - 1].end_offset;
                    return Ok(());
                }
            }
            self.head_rx.changed().await.map_err(|_| Overflow::Closed)?;
        }
    }

    /// Resolves once the cursor is evicted or more than the queue limit behind (to race
    /// against a socket write that is not completing).
    pub async fn overflowed(&mut self) -> Overflow {
        {
            let ring = self.topic.lock();
            if let Err(overflow) = self.check(&ring) {
                return overflow;
            }
        }
        loop {
            if self.head_rx.changed().await.is_err() {
                return Overflow::Closed;
            }
            let ring = self.topic.lock();
            if let Err(overflow) = self.check(&ring) {
                return overflow;
            }
        }
    }

    fn check_evicted(&self, ring: &Ring) -> Result<(), Overflow> {
        if self.pos < ring.first {
            return Err(Overflow::Evicted);
        }
        Ok(())
    }

    fn check(&self, ring: &Ring) -> Result<(), Overflow> {
        self.check_evicted(ring)?;
        if ring.published_bytes - self.offset.max(self.base) > self.topic.limits.queue_bytes {
            return Err(Overflow::Lagged);
        }
        Ok(())
    }
}

/// Per-table topics for the exposed tables.
#[derive(Debug)]
pub struct Hub {
    /// schema -> table -> topic; looked up by `&str` without allocating.
    topics: HashMap<String, HashMap<String, Arc<Topic>>>,
    by_resource: HashMap<String, Arc<Topic>>,
}

impl Hub {
    /// A hub with one topic per `(schema, table)`.
    pub fn new(tables: &[(String, String)], limits: HubLimits) -> Self {
        let mut topics: HashMap<String, HashMap<String, Arc<Topic>>> = HashMap::new();
        let mut by_resource = HashMap::new();
        for (schema, table) in tables {
            let resource = crate::event::resource_name(schema, table);
            let topic = Arc::new(Topic {
                resource: resource.as_str().into(),
                ring: Mutex::new(Ring::default()),
                head_tx: watch::channel(0).0,
                limits,
            });
            topics
                .entry(schema.clone())
                .or_default()
                .insert(table.clone(), Arc::clone(&topic));
            by_resource.insert(resource, topic);
        }
        Hub {
            topics,
            by_resource,
        }
    }

    /// The topic of an exposed table, by its resource name.
    pub fn topic(&self, resource: &str) -> Option<&Arc<Topic>> {
        self.by_resource.get(resource)
    }

    /// Tells the subscribers of a table (or, with `None`, of every table) that events were
    /// lost: they get a `reset` in stream order.
    pub fn publish_gap(&self, table: Option<(&str, &str)>) {
        match table {
            Some((schema, table)) => {
                if let Some(topic) = self.topics.get(schema).and_then(|t| t.get(table)) {
                    topic.publish_gap();
                }
            }
            None => self
                .by_resource
                .values()
                .for_each(|topic| topic.publish_gap()),
        }
    }

    /// Publishes an event to its table's subscribers. Returns false when the table is not
    /// exposed by this relay (the event is dropped).
    pub fn publish(&self, event: ChangeEvent) -> bool {
        match self
            .topics
            .get(&event.schema)
            .and_then(|t| t.get(&event.table))
        {
            Some(topic) => {
                topic.publish(event);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Op;
    use serde_json::json;

    fn event(seq: i64, table: &str, size: usize) -> ChangeEvent {
        ChangeEvent {
            seq,
            xid: 1,
            ts: String::new(),
            schema: "public".into(),
            table: table.into(),
            op: Op::Create,
            id: json!(seq),
            data: Some(json!({"pad": "x".repeat(size)})),
            old: None,
        }
    }

    fn hub(ring_events: usize, ring_bytes: usize, queue_bytes: u64) -> Hub {
        let tables = [("public".into(), "a".into()), ("public".into(), "b".into())];
        Hub::new(
            &tables,
            HubLimits {
                ring_events,
                ring_bytes,
                queue_bytes,
            },
        )
    }

    #[tokio::test]
    async fn cursor_reads_events_of_its_table_in_publish_order() {
        let hub = hub(100, 1 << 20, 1 << 20);
        let mut cursor = hub.topic("a").unwrap().subscribe();
        for seq in 1..=3 {
            assert!(hub.publish(event(seq, "a", 1)));
            assert!(hub.publish(event(seq + 100, "b", 1)));
        }
        assert!(!hub.publish(event(9, "other", 1)));
        let mut out = Vec::new();
        cursor.next_batch(&mut out, 2).await.unwrap();
        cursor.next_batch(&mut out, 10).await.unwrap();
        let seqs: Vec<i64> = out.iter().map(|e| e.event.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
    }

    #[tokio::test]
    async fn waiting_cursor_wakes_on_publish() {
        let hub = Arc::new(hub(100, 1 << 20, 1 << 20));
        let mut cursor = hub.topic("a").unwrap().subscribe();
        let publisher = Arc::clone(&hub);
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            publisher.publish(event(7, "a", 1));
        });
        let mut out = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            cursor.next_batch(&mut out, 10),
        )
        .await
        .expect("cursor woke")
        .unwrap();
        assert_eq!(out[0].event.seq, 7);
    }

    #[tokio::test]
    async fn a_cursor_past_its_queue_limit_overflows_only_while_not_reading() {
        let hub = hub(1000, 1 << 20, 4096);
        let mut cursor = hub.topic("a").unwrap().subscribe();
        for seq in 1..=10 {
            hub.publish(event(seq, "a", 1000));
        }
        // A writer racing its socket against `overflowed` learns it is too far behind…
        assert_eq!(cursor.overflowed().await, Overflow::Lagged);
        // …but a reader that keeps reading drains the burst from the shared ring.
        let mut out = Vec::new();
        cursor.next_batch(&mut out, 100).await.unwrap();
        assert_eq!(out.len(), 10);
    }

    #[tokio::test]
    async fn a_lagged_subscriber_can_resume_from_its_last_seq() {
        let hub = hub(1000, 1 << 20, 4096);
        let topic = hub.topic("a").unwrap();
        let mut cursor = topic.subscribe();
        for seq in 1..=10 {
            hub.publish(event(seq, "a", 1000));
        }
        let mut out = Vec::new();
        assert_eq!(cursor.overflowed().await, Overflow::Lagged);
        // The backlog it resumes into is in the ring; only new events count against it.
        let mut resumed = topic.subscribe_after_seq(2).unwrap();
        resumed.next_batch(&mut out, 100).await.unwrap();
        assert_eq!(out.len(), 8);
        for seq in 11..=20 {
            hub.publish(event(seq, "a", 1000));
        }
        assert_eq!(resumed.overflowed().await, Overflow::Lagged);
    }

    #[tokio::test]
    async fn a_cursor_behind_the_ring_is_evicted_and_resume_finds_retained_seqs() {
        let hub = hub(3, 1 << 20, 1 << 20);
        let topic = hub.topic("a").unwrap();
        let mut cursor = topic.subscribe();
        for seq in 1..=5 {
            hub.publish(event(seq, "a", 1));
        }
        let mut out = Vec::new();
        assert_eq!(
            cursor.next_batch(&mut out, 10).await,
            Err(Overflow::Evicted)
        );
        assert!(topic.subscribe_after_seq(1).is_none());
        let mut resumed = topic.subscribe_after_seq(3).unwrap();
        resumed.next_batch(&mut out, 10).await.unwrap();
        let seqs: Vec<i64> = out.iter().map(|e| e.event.seq).collect();
        assert_eq!(seqs, [4, 5]);
    }
}
