//! Fan-out: one bounded, shared ring of encoded events per table, read by cursors, and the
//! batch log that lets a client resume on any relay.
//!
//! Each event is encoded to its wire frame once, when capture publishes it, and every
//! subscriber of the table reads the same frame: an [`Entry`] is its frame (shared bytes) and
//! a few numbers, stored inline in the ring and copied out by readers; filters and
//! projections read the row back out of the frame when they need it.
//!
//! Why a ring and cursors rather than a queue per subscriber: the producer (capture) only
//! appends under a short lock and bumps a `watch` counter; it never waits on, or even visits,
//! a subscriber. Memory is bounded by the ring (frames, shaped frames and per-entry overhead
//! all count against `ring_bytes`), whatever the number of subscribers, and the ring doubles
//! as the recent history that resumes replay from.
//!
//! A subscriber is a slow consumer (closed with 4008, resumable with `since`; DESIGN.md
//! guarantee 5) when either
//! - the ring has evicted entries its cursor has not read (it fell behind the history), or
//! - it is more than the queue limit (default 8 MiB) behind the head *while its socket is not
//!   taking writes* ([`Cursor::overflowed`] races the socket write in `http::ws`).
//!
//! # Resuming on any relay
//!
//! Capture publishes in *batches*: everything one poll of the log found (see `capture`).
//! Within a batch, transactions are ordered by their last seq, which keeps every row's changes
//! in commit order but may differ from another relay's order, whose polls cut the stream
//! elsewhere. A client that saw seq `N` (on any relay) may have missed, on this relay, only
//! events that this relay put at or after the first batch holding a seq `>= N`: an event the
//! other relay sent after `N` either committed after `N`'s transaction (so it is in `N`'s
//! batch here or later) or was ordered after it inside a batch (so it has a seq above `N`).
//! [`Hub::resume`] therefore replays from the start of that batch: at-least-once, never a gap.
//! The batch log keeps, per batch, the highest seq published so far (a non-decreasing list,
//! searched by bisection), so finding that batch costs O(log n) and no scan of a ring.
//! A relay cannot vouch for seqs at or below `start_seq` (written before it listened).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use serde_json::value::RawValue;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::event::{ChangeParts, Op, change_frame, control};
use crate::row::{Fields, changed_columns};

/// What a retained frame of `len` bytes costs (an entry's, or a shaped frame's): its text
/// and what it takes besides. A small frame: its share of the block it was copied into (the
/// block's allocation and shared header, see [`Arena::intern`]; the room a block had left is
/// counted apart, [`Arena::wasted`]). A large one: its allocation's header and rounding, and
/// the shared header `Bytes` allocates. Counted against the history budget, so that it
/// bounds memory, not just frame bytes (`hub::tests::what_the_history_counts_*` measure it).
fn frame_cost(len: usize) -> usize {
    len + if len > ARENA_FRAME_MAX { 64 } else { 32 }
}

/// Bytes of one ring slot: an entry is stored inline (an `Arc` and an allocation per entry
/// cost more than the frame of a typical row).
const SLOT: usize = std::mem::size_of::<Entry>();

// What a retained event costs besides its frame (BENCHMARKS.md, 0f): a field more makes every
// history hold fewer events.
const _: () = assert!(SLOT <= 80, "an entry grew past 80 bytes");

/// Frames up to this size are copied into shared blocks of [`ARENA_BLOCK`] bytes (see
/// [`Arena::intern`]); larger ones keep an allocation of their own.
const ARENA_FRAME_MAX: usize = 1024;

/// Size of a block that small frames share. Small: a frame keeps its whole block alive, and
/// a socket's write batch (up to 256 frames, of a filtered subscription perhaps each from a
/// different block) may hold its frames after the ring let them go.
const ARENA_BLOCK: usize = 4096;

/// What a block that small shaped frames share costs while it lives: its bytes, its
/// allocation's header, the shared header `bytes` allocates when it is first split, and its
/// place in [`Arena::tails`].
const BLOCK_COST: usize = ARENA_BLOCK + 96;

/// What a cached shaped frame costs besides its text: its key and value in the cache's
/// B-tree, whose nodes are about two-thirds full, and their share of its inner nodes
/// (`hub::tests::what_the_history_counts_of_shaped_frames_is_what_they_allocate`).
const SHAPE_SLOT: usize = 104;

/// What a cached shaped frame costs. A small one's text is counted with its block
/// ([`Arena::whole_blocks`]): shapes are cached out of offset order (readers at different
/// places of the history), and a block outlives the frames of older entries it holds for as
/// long as the newest of its frames is kept.
fn shape_cost(len: usize) -> usize {
    SHAPE_SLOT
        + if len > ARENA_FRAME_MAX {
            frame_cost(len)
        } else {
            0
        }
}

/// Most projected frames cached per entry; more distinct shapes are encoded for each reader.
const MAX_SHAPES: usize = 8;

/// Limits of the per-table rings.
#[derive(Debug, Clone, Copy)]
pub struct HubLimits {
    /// Most events a table's ring keeps.
    pub ring_events: usize,
    /// Most bytes (frames, shaped frames, overhead) a table's ring keeps.
    pub ring_bytes: usize,
    /// Most bytes a subscriber may lag behind the head before it is a slow consumer.
    pub queue_bytes: u64,
}

/// What an entry is.
#[derive(Debug, Clone)]
pub enum EntryKind {
    /// A row change; filters and projections apply.
    Change(Op),
    /// The table was truncated (`{"type":"truncate",…}`).
    Truncate,
    /// Every subscriber's copy is stale: the frame is a `reset` (its reason is in the frame).
    Reset,
    /// Columns changed: subscriptions that name a changed column end; the others get the
    /// frame, a `reset` (`table_changed`).
    Columns(Arc<ColumnsChanged>),
}

/// Columns of a table were added, dropped, renamed or retyped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ColumnsChanged {
    /// Names (as subscriptions know them) that no longer mean what they did (dropped,
    /// renamed or retyped; empty when columns were only added).
    pub columns: Vec<String>,
}

/// One published event and its encoded frame. The ring holds it inline; a reader takes a
/// copy, which shares the frame's bytes.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Log position (0 for entries that are not log events).
    pub seq: i64,
    /// The writer's transaction, for snapshot handoff; 0 (never a transaction id) for
    /// entries every subscriber gets whatever its initial data holds (see [`Entry::xid`]).
    xid: u64,
    /// The capture batch it was published in (see the module docs).
    pub batch: u64,
    /// What it is.
    pub kind: EntryKind,
    /// The JSON text frame, encoded once; cloning it shares the bytes.
    pub frame: Utf8Bytes,
    /// Bytes published on this table up to and including this entry (also names the entry
    /// in its topic's cache of shaped frames).
    end_offset: u64,
}

/// Frames for other shapes (type as sent, projection) of a topic's entries, encoded by the
/// first subscriber that needs one and shared by the rest. Kept beside the ring rather than
/// in each entry: most entries never have one.
#[derive(Debug)]
struct Shapes {
    /// By the entry's `end_offset`, then the shape's key.
    frames: std::collections::BTreeMap<(u64, u64), Utf8Bytes>,
    /// Where small shaped frames are copied to.
    arena: Arena,
}

impl Entry {
    /// The writer's transaction, for snapshot handoff; `None` for entries every subscriber
    /// gets whatever its initial data holds.
    pub fn xid(&self) -> Option<u64> {
        (self.xid != 0).then_some(self.xid)
    }

    /// The frame for a shape (`key` identifies type as sent and projection): encoded by the
    /// first subscriber that needs it, shared by the rest, counted against the history.
    /// `topic` is the entry's own.
    pub fn shaped_frame(
        &self,
        topic: &Topic,
        key: u64,
        encode: impl FnOnce() -> String,
    ) -> Utf8Bytes {
        if let Some(frame) = topic.shapes().frames.get(&(self.end_offset, key)) {
            return frame.clone();
        }
        // Encoded outside the lock: readers of other entries need not wait for it (two
        // readers may both encode a new shape; the first one's is kept).
        let text = encode();
        let mut shapes = topic.shapes();
        let entry = (self.end_offset, 0)..=(self.end_offset, u64::MAX);
        if let Some(kept) = shapes.frames.get(&(self.end_offset, key)) {
            return kept.clone();
        }
        // An entry already evicted is not cached (nothing would remove it).
        if self.end_offset <= topic.evicted_offset.load(Ordering::Acquire)
            || shapes.frames.range(entry).count() >= MAX_SHAPES
        {
            return Utf8Bytes::from(text);
        }
        let wasted = shapes.arena.wasted;
        let frame = shapes.arena.intern(text, self.end_offset);
        let wasted = shapes.arena.wasted - wasted;
        shapes.frames.insert((self.end_offset, key), frame.clone());
        topic
            .shaped_bytes
            .fetch_add(shape_cost(frame.len()) + wasted, Ordering::Release);
        frame
    }

    fn cost(&self) -> usize {
        frame_cost(self.frame.len())
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
    entries: VecDeque<Entry>,
    /// Position of `entries[0]`; positions count every event ever published on the table.
    first: u64,
    /// Sum of the entries' frame costs (slots are counted by capacity in [`Ring::held`],
    /// shaped frames in the topic).
    held_bytes: usize,
    /// Bytes ever published on the table.
    published_bytes: u64,
    /// Highest batch of an evicted entry: a resume into that batch or earlier is impossible.
    evicted_batch: Option<u64>,
    /// Position of the last `reset` or column change (so a resume need not scan the ring
    /// under its lock to find one).
    last_control: Option<u64>,
    /// Where small frames are copied to.
    arena: Arena,
}

impl Ring {
    fn next(&self) -> u64 {
        self.first + self.entries.len() as u64
    }

    /// Bytes the ring holds: its frames and their overhead, and every slot it has allocated,
    /// used or not.
    fn held(&self) -> usize {
        self.held_bytes + self.entries.capacity() * SLOT + self.arena.wasted
    }

    /// Position, offset and base of a cursor that reads from `entries[index]` on (a replay:
    /// what is published up to now does not count against its queue limit).
    fn cursor_fields(&self, index: usize) -> (u64, u64, u64) {
        let pos = self.first + index as u64;
        let offset = match index {
            0 => self.entries.front().map_or(self.published_bytes, |e| {
                e.end_offset - e.frame.len() as u64
            }),
            i => self.entries[i - 1].end_offset,
        };
        (pos, offset, self.published_bytes)
    }
}

/// Where small frames are copied to: a block of [`ARENA_BLOCK`] bytes that they share.
#[derive(Debug, Default)]
struct Arena {
    block: bytes::BytesMut,
    /// Highest offset (the `end_offset` of the entry a frame belongs to) of the frames in
    /// `block`.
    last: u64,
    /// Blocks no longer written to: the highest offset of their frames, and what they hold
    /// beyond their frames' own costs, allocated until the last of those frames goes. (In
    /// the order they were started: a shapes' block whose newest frame is older than an
    /// earlier block's is counted a little longer than it lives, never shorter.)
    tails: VecDeque<(u64, usize)>,
    /// What `tails` and `block` hold beyond their frames' own costs: counted against the
    /// history.
    wasted: usize,
    /// Whether a block is counted whole, from when it is started until its frames go (see
    /// [`Arena::whole_blocks`]), rather than its frames each and the room it had left.
    whole: bool,
    /// What `block` is counted for in `wasted`.
    block_cost: usize,
}

impl Arena {
    /// An arena whose blocks are counted whole ([`BLOCK_COST`]), their frames not at all:
    /// for frames that come out of offset order (shapes), which a block keeps for as long as
    /// the newest of them is kept. (Entries' frames come in order: a block holds at most one
    /// block's worth of frames already gone, so they count each, and the room left.)
    fn whole_blocks() -> Arena {
        Arena {
            whole: true,
            ..Arena::default()
        }
    }

    /// The frame (of the entry at `offset`) as shared bytes. A small frame is copied into
    /// the current block, which it then shares with its neighbours: a retained frame costs
    /// its bytes and no allocation of its own (which, with its header, rounding and spare
    /// capacity, cost more than the frame of a typical row). A block is freed when the last
    /// of its frames goes (and no socket still holds it); until then, what its frames' costs
    /// leave out (the room it had left when the next one was started, or the whole block) is
    /// [`Arena::wasted`]. A large frame keeps its own allocation, without spare capacity.
    fn intern(&mut self, mut text: String, offset: u64) -> Utf8Bytes {
        if text.len() > ARENA_FRAME_MAX {
            text.shrink_to_fit();
            return Utf8Bytes::from(text);
        }
        if self.block.capacity() < text.len() {
            // Counted from now until its last frame goes: the whole block, or its room.
            let held = if self.whole {
                self.block_cost
            } else {
                self.block.capacity()
            };
            if self.last > 0 {
                self.tails.push_back((self.last, held));
                self.wasted += held - self.block_cost;
            } else {
                // A block no frame was copied into (the first one): nothing keeps it.
                self.wasted -= self.block_cost;
            }
            self.block = bytes::BytesMut::with_capacity(ARENA_BLOCK);
            self.last = 0;
            self.block_cost = if self.whole { BLOCK_COST } else { 0 };
            self.wasted += self.block_cost;
        }
        self.last = self.last.max(offset);
        self.block.extend_from_slice(text.as_bytes());
        match Utf8Bytes::try_from(self.block.split().freeze()) {
            Ok(frame) => frame,
            // Cannot happen (the bytes are a copy of a `str`); the frame is still right.
            Err(_) => Utf8Bytes::from(text),
        }
    }

    /// The frames up to `offset` are gone: the blocks they filled are counted no more.
    /// Returns the bytes no longer counted.
    fn release(&mut self, offset: u64) -> usize {
        let mut released = 0;
        while let Some(&(last, held)) = self.tails.front() {
            if last > offset {
                break;
            }
            self.tails.pop_front();
            released += held;
        }
        self.wasted -= released;
        released
    }
}

/// The ring of one table and the counter that wakes its readers.
#[derive(Debug)]
pub struct Topic {
    resource: Arc<str>,
    /// `resource` as a JSON string literal, for frames.
    resource_json: String,
    ring: Mutex<Ring>,
    /// Shaped frames of the ring's entries. Locked after `ring` when both are.
    shapes: Mutex<Shapes>,
    /// Bytes of the shaped frames (with their overhead), readable without the lock.
    shaped_bytes: AtomicUsize,
    /// `end_offset` of the last entry evicted from the ring (shapes of entries at or below
    /// it are dropped).
    evicted_offset: AtomicU64,
    /// Bumped after every publish; cursors wait on it. Dropped with the hub.
    head_tx: watch::Sender<u64>,
    /// Entries were appended that `head_tx` has not announced yet.
    unwoken: AtomicBool,
    limits: HubLimits,
}

impl Topic {
    fn new(resource: &str, limits: HubLimits) -> Self {
        Topic {
            resource: resource.into(),
            resource_json: serde_json::Value::from(resource).to_string(),
            ring: Mutex::new(Ring::default()),
            shapes: Mutex::new(Shapes {
                frames: std::collections::BTreeMap::new(),
                arena: Arena::whole_blocks(),
            }),
            shaped_bytes: AtomicUsize::new(0),
            evicted_offset: AtomicU64::new(0),
            head_tx: watch::channel(0).0,
            unwoken: AtomicBool::new(false),
            limits,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        // A panic while holding this lock leaves the ring consistent (every mutation is a
        // single push/pop with its counters), so a poisoned lock is still safe to use.
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn shapes(&self) -> MutexGuard<'_, Shapes> {
        // Every mutation is one insert or split with its counter: poisoning leaves it usable.
        self.shapes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The subscriber-facing table name.
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// The subscriber-facing table name as a JSON string literal.
    pub fn resource_json(&self) -> &str {
        &self.resource_json
    }

    /// Appends an entry and wakes the readers.
    fn push(&self, seq: i64, xid: Option<u64>, batch: u64, kind: EntryKind, frame: String) {
        self.append(seq, xid, batch, kind, frame);
        self.wake();
    }

    /// Wakes the readers if entries were appended since the last wake-up.
    fn wake(&self) {
        if self.unwoken.swap(false, Ordering::AcqRel) {
            let next = self.lock().next();
            self.head_tx.send_replace(next);
        }
    }

    /// Appends an entry without waking the readers: capture appends a transaction's events,
    /// then wakes them once ([`Hub::wake`]; a wake-up per event was a tenth of the relay's
    /// CPU in a bulk load, the readers it woke included).
    fn append(&self, seq: i64, xid: Option<u64>, batch: u64, kind: EntryKind, frame: String) {
        let mut ring = self.lock();
        ring.published_bytes += frame.len() as u64;
        let end_offset = ring.published_bytes;
        let frame = ring.arena.intern(frame, end_offset);
        // Batches never go back along a ring (resume bisects on them): an entry published
        // by another task (a reset) after capture opened a newer batch takes that batch.
        let batch = ring
            .entries
            .back()
            .map_or(batch, |last| last.batch.max(batch));
        let entry = Entry {
            seq,
            xid: xid.unwrap_or(0),
            batch,
            kind,
            frame,
            end_offset,
        };
        ring.held_bytes += entry.cost();
        if matches!(entry.kind, EntryKind::Reset | EntryKind::Columns(_)) {
            ring.last_control = Some(ring.next());
        }
        // A full deque doubles its slots to take one more entry, and evicting never gives
        // slots back: when the doubled deque would not fit the budget (or the ring holds its
        // most events already), the oldest entry goes first and the new one takes its slot.
        // Growing anyway would evict a share of the history to pay for empty slots (all but
        // one entry when frames are smaller than a slot), and keep it that small.
        let (len, capacity) = (ring.entries.len(), ring.entries.capacity());
        if len > 1
            && len == capacity
            && (len >= self.limits.ring_events
                || ring.held() + capacity * SLOT + self.shaped_bytes.load(Ordering::Relaxed)
                    > self.limits.ring_bytes)
        {
            self.evict_front(&mut ring);
        }
        ring.entries.push_back(entry);
        loop {
            // Slots a burst of small entries grew stay empty once larger ones fill the budget:
            // give most of them back, for frames (amortized: at most once per halving).
            let (len, capacity) = (ring.entries.len(), ring.entries.capacity());
            if capacity > 64 && len * 4 < capacity {
                ring.entries.shrink_to(len * 2);
            }
            let held = ring.held() + self.shaped_bytes.load(Ordering::Relaxed);
            if ring.entries.len() <= 1
                || (ring.entries.len() <= self.limits.ring_events && held <= self.limits.ring_bytes)
            {
                break;
            }
            self.evict_front(&mut ring);
        }
        drop(ring);
        self.unwoken.store(true, Ordering::Release);
    }

    /// Evicts the oldest entry (and its shaped frames).
    fn evict_front(&self, ring: &mut Ring) {
        let Some(old) = ring.entries.pop_front() else {
            return;
        };
        ring.held_bytes -= old.cost();
        ring.arena.release(old.end_offset);
        ring.first += 1;
        ring.evicted_batch = Some(ring.evicted_batch.map_or(old.batch, |b| b.max(old.batch)));
        // The shapes of what is evicted go too (their bytes count; looked for only when
        // there are any: most tables have none). A shape a reader caches while its entry
        // is being evicted stays until the next eviction, which drops everything up to it.
        self.evicted_offset.store(old.end_offset, Ordering::Release);
        if self.shaped_bytes.load(Ordering::Acquire) > 0 {
            self.evict_shapes(old.end_offset);
        }
    }

    /// Drops the shaped frames of entries up to `end_offset` (called with the ring locked).
    fn evict_shapes(&self, end_offset: u64) {
        let mut shapes = self.shapes();
        let kept = shapes.frames.split_off(&(end_offset + 1, 0));
        let gone = std::mem::replace(&mut shapes.frames, kept);
        let released = shapes.arena.release(end_offset);
        drop(shapes);
        let bytes: usize = gone.values().map(|f| shape_cost(f.len())).sum();
        self.shaped_bytes
            .fetch_sub(bytes + released, Ordering::Relaxed);
    }

    /// A cursor at the head: it reads what is published from now on.
    pub fn subscribe(self: &Arc<Self>) -> Cursor {
        let ring = self.lock();
        let (pos, offset) = (ring.next(), ring.published_bytes);
        drop(ring);
        self.cursor_at(pos, offset, offset)
    }

    fn cursor_at(self: &Arc<Self>, pos: u64, offset: u64, base: u64) -> Cursor {
        Cursor {
            topic: Arc::clone(self),
            pos,
            offset,
            base,
            head_rx: self.head_tx.subscribe(),
        }
    }

    /// Bytes held by this ring (frames, slots, overhead, shaped frames), for tests and
    /// metrics.
    pub fn held_bytes(&self) -> usize {
        self.lock().held() + self.shaped_bytes.load(Ordering::Relaxed)
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

    /// Whether the cursor has read everything published on its table so far.
    pub fn caught_up(&self) -> bool {
        self.pos >= self.topic.lock().next()
    }

    /// Whether what the cursor has still to read holds a `reset` or a column change (or is
    /// already evicted): a subscription resumed from here would end in it again.
    pub fn backlog_ends(&self) -> bool {
        let ring = self.topic.lock();
        self.pos < ring.first || ring.last_control.is_some_and(|last| last >= self.pos)
    }

    /// Stops counting what is published up to now against the queue limit (see `base`).
    pub fn rebase(&mut self) {
        self.base = self.topic.lock().published_bytes;
    }

    /// Waits for published entries and appends copies of up to `max` of them to `out`.
    ///
    /// Cancel safe: nothing is consumed unless it returns.
    pub async fn next_batch(&mut self, out: &mut Vec<Entry>, max: usize) -> Result<(), Overflow> {
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

/// Per batch, the highest seq published up to and including it.
#[derive(Debug)]
struct BatchLog {
    /// Id of `maxes[0]`.
    first: u64,
    /// Prefix maxima of the ended batches, non-decreasing.
    maxes: VecDeque<i64>,
    /// Prefix maximum of the batches dropped from the front (`i64::MIN` while none).
    pruned_max: i64,
    /// The batch being published, if any (always `first + maxes.len()`).
    open: Option<u64>,
    /// Most batches remembered.
    capacity: usize,
}

impl BatchLog {
    /// Ends the next batch, whose highest seq was `max_seq`.
    fn end(&mut self, max_seq: i64) {
        self.open = None;
        let max = self.last_max().max(max_seq);
        self.maxes.push_back(max);
        while self.maxes.len() > self.capacity {
            if let Some(dropped) = self.maxes.pop_front() {
                self.pruned_max = dropped;
                self.first += 1;
            }
        }
    }

    fn next_id(&self) -> u64 {
        self.first + self.maxes.len() as u64
    }

    fn last_max(&self) -> i64 {
        self.maxes.back().copied().unwrap_or(self.pruned_max)
    }
}

/// Where a resume starts.
#[derive(Debug)]
pub enum Resume {
    /// Replay from this cursor.
    From(Cursor),
    /// This relay cannot prove it holds everything after that seq: send `reset`.
    Reset,
    /// Every seq this relay published is below it: it may be a seq another relay has
    /// published and this one has not yet (fine), or no seq at all; the caller checks the
    /// database before resuming from this cursor.
    Ahead(Cursor),
}

/// Per-table topics for the exposed tables, and the batch log.
#[derive(Debug)]
pub struct Hub {
    /// Topics by resource name.
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    /// Topics by the table's oid, as capture routes log rows (changes when a table is dropped
    /// and re-created).
    by_relid: RwLock<HashMap<u32, Arc<Topic>>>,
    batches: Mutex<BatchLog>,
    /// The highest seq allocated before this relay first listened: it cannot vouch for
    /// events at or below it. `i64::MAX` until capture starts.
    start_seq: AtomicI64,
    limits: HubLimits,
    /// Random per hub: names this hub's batches in exact positions.
    epoch: u64,
    /// The last ended batch, announced to those waiting for a position to move on.
    ended_tx: watch::Sender<u64>,
}

impl Hub {
    /// A hub with one topic per `(relid, resource)`.
    pub fn new(tables: &[(u32, String)], limits: HubLimits) -> Self {
        let mut topics = HashMap::new();
        let mut by_relid = HashMap::new();
        for (relid, resource) in tables {
            let topic = Arc::new(Topic::new(resource, limits));
            topics.insert(resource.clone(), Arc::clone(&topic));
            by_relid.insert(*relid, topic);
        }
        Hub {
            topics: RwLock::new(topics),
            by_relid: RwLock::new(by_relid),
            batches: Mutex::new(BatchLog {
                first: 1,
                maxes: VecDeque::new(),
                pruned_max: i64::MIN,
                open: None,
                capacity: limits.ring_events.saturating_mul(2).max(1024),
            }),
            start_seq: AtomicI64::new(i64::MAX),
            limits,
            epoch: std::hash::BuildHasher::hash_one(
                &std::collections::hash_map::RandomState::new(),
                std::time::SystemTime::now(),
            ),
            ended_tx: watch::channel(0).0,
        }
    }

    fn batch_log(&self) -> MutexGuard<'_, BatchLog> {
        self.batches.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The topic of an exposed table, by its resource name.
    pub fn topic(&self, resource: &str) -> Option<Arc<Topic>> {
        let topics = self.topics.read().unwrap_or_else(PoisonError::into_inner);
        topics.get(resource).cloned()
    }

    /// Per table, for `/metrics`: its resource name, the cursors reading it now (one per
    /// subscription) and the entries published to it since the relay started.
    pub fn topic_stats(&self) -> Vec<(String, usize, u64)> {
        let topics = self.topics.read().unwrap_or_else(PoisonError::into_inner);
        let mut stats: Vec<_> = topics
            .iter()
            .map(|(name, topic)| {
                let readers = topic.head_tx.receiver_count();
                (name.to_string(), readers, topic.lock().next())
            })
            .collect();
        stats.sort();
        stats
    }

    /// The resource names of every topic.
    pub fn resources(&self) -> Vec<String> {
        let topics = self.topics.read().unwrap_or_else(PoisonError::into_inner);
        topics.keys().map(|k| k.to_string()).collect()
    }

    /// The topic capture routes a table's rows to.
    pub fn topic_by_relid(&self, relid: u32) -> Option<Arc<Topic>> {
        let by_relid = self.by_relid.read().unwrap_or_else(PoisonError::into_inner);
        by_relid.get(&relid).cloned()
    }

    /// The oids whose rows capture reads.
    pub fn relids(&self) -> Vec<u32> {
        let by_relid = self.by_relid.read().unwrap_or_else(PoisonError::into_inner);
        by_relid.keys().copied().collect()
    }

    /// Routes a table oid to a resource (a table re-created or renamed under that name).
    pub fn route(&self, relid: u32, resource: &str) {
        let mut by_relid = self
            .by_relid
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(topic) = self.topic(resource) {
            by_relid.insert(relid, topic);
        }
    }

    /// Stops routing a table oid to `resource` (the table went from that name). Only there:
    /// the table may already have been routed to the name it was renamed to (two exposed
    /// tables that swapped names), and must stay routed there.
    pub fn unroute(&self, relid: u32, resource: &str) {
        let mut by_relid = self
            .by_relid
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if by_relid
            .get(&relid)
            .is_some_and(|topic| topic.resource() == resource)
        {
            by_relid.remove(&relid);
        }
    }

    /// Records the highest seq allocated before capture first listened.
    pub fn set_start_seq(&self, seq: i64) {
        self.start_seq.store(seq, Ordering::Relaxed);
    }

    /// Opens the next batch (capture only; batches never overlap).
    pub fn begin_batch(&self) -> u64 {
        let mut log = self.batch_log();
        let id = log.next_id();
        log.open = Some(id);
        id
    }

    /// Closes the open batch, whose highest seq was `max_seq`.
    pub fn end_batch(&self, batch: u64, max_seq: i64) {
        let mut log = self.batch_log();
        debug_assert_eq!(log.open, Some(batch));
        log.end(max_seq);
        self.ended_tx.send_replace(batch);
    }

    /// Changes whenever a batch ends: a subscriber that wrote events of a batch still open
    /// (so was not given a position covering them) waits on it to be given one.
    pub fn batches_ended(&self) -> watch::Receiver<u64> {
        self.ended_tx.subscribe()
    }

    /// Appends an entry that is not a log event (a `reset`, a column change) to `topic`, in
    /// the open batch, else in a batch of its own. Under the batch log's lock, so that a
    /// position taken from the log ([`Hub::exact_position`]) never covers an entry that is
    /// not in its ring yet.
    fn publish_control(&self, topic: &Topic, kind: EntryKind, frame: String) {
        let mut log = self.batch_log();
        match log.open {
            Some(batch) => topic.push(0, None, batch, kind, frame),
            None => {
                let batch = log.next_id();
                topic.push(0, None, batch, kind, frame);
                log.end(i64::MIN);
                self.ended_tx.send_replace(batch);
            }
        }
    }

    /// The position a client holds once it has read every entry published so far: the
    /// highest seq of the ended batches and the last ended batch (`None` before any ended).
    /// [`Hub::resume_after`] on this relay resumes right after that batch.
    pub fn exact_position(&self) -> Option<(i64, u64)> {
        let log = self.batch_log();
        let last = log.next_id().checked_sub(1).filter(|b| *b >= 1)?;
        Some((log.last_max(), last)).filter(|(max, _)| *max != i64::MIN)
    }

    /// This hub's identity (random per process): a position from [`Hub::exact_position`]
    /// names batches of this hub only.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Where a subscriber of `topic` that has read every entry of the batches up to `batch`
    /// (of this hub: see [`Hub::exact_position`]) resumes: right after it, exactly once.
    pub fn resume_after(&self, topic: &Arc<Topic>, batch: u64) -> Resume {
        let from_batch = batch.saturating_add(1);
        if from_batch > self.batch_log().next_id() {
            // Not a batch this hub has ended.
            return Resume::Reset;
        }
        let ring = topic.lock();
        if ring
            .evicted_batch
            .is_some_and(|evicted| evicted >= from_batch)
        {
            return Resume::Reset;
        }
        let index = ring.entries.partition_point(|e| e.batch < from_batch);
        let (pos, offset, base) = ring.cursor_fields(index);
        drop(ring);
        Resume::From(topic.cursor_at(pos, offset, base))
    }

    /// The position a subscriber holds once it has the initial data of a snapshot taken
    /// after now: the highest seq of the ended batches (`None` before capture published
    /// anything).
    pub fn position(&self) -> Option<i64> {
        let log = self.batch_log();
        Some(log.last_max()).filter(|m| *m != i64::MIN)
    }

    /// The highest seq this relay has published (ended batches), or `i64::MIN`.
    pub fn max_published(&self) -> i64 {
        self.batch_log().last_max()
    }

    /// Where a subscriber of `topic` that has seen seq `since` (on this relay or another one)
    /// resumes (see the module docs).
    pub fn resume(&self, topic: &Arc<Topic>, since: i64) -> Resume {
        if since <= self.start_seq.load(Ordering::Relaxed) {
            return Resume::Reset;
        }
        let (from_batch, pruned, ahead) = {
            let log = self.batch_log();
            if log.pruned_max >= since {
                (log.first, true, false)
            } else {
                let index = log.maxes.partition_point(|m| *m < since);
                let ahead = index == log.maxes.len();
                (log.first + index as u64, false, ahead)
            }
        };
        let ring = topic.lock();
        if let Some(evicted) = ring.evicted_batch
            && (pruned || evicted >= from_batch)
        {
            return Resume::Reset;
        }
        let index = if pruned {
            0
        } else {
            ring.entries.partition_point(|e| e.batch < from_batch)
        };
        let (pos, offset, base) = ring.cursor_fields(index);
        drop(ring);
        // The whole tail from that batch's start: a replay must be a suffix of the stream
        // (skipping anything in it, even events the client surely has, could leave a later
        // change of a row out while an earlier one is sent again).
        let cursor = topic.cursor_at(pos, offset, base);
        if ahead {
            Resume::Ahead(cursor)
        } else {
            Resume::From(cursor)
        }
    }

    /// Publishes a row change of table `relid` in `batch`. Returns false when the table is
    /// not exposed (the event is dropped).
    pub fn publish_change(
        &self,
        relid: u32,
        batch: u64,
        xid: u64,
        ts: &str,
        change: &Change<'_>,
    ) -> bool {
        let Some(topic) = self.topic_by_relid(relid) else {
            return false;
        };
        let frame = encode_change(&topic, ts, change);
        let kind = EntryKind::Change(change.op);
        topic.append(change.seq, Some(xid), batch, kind, frame);
        true
    }

    /// Wakes the readers of every table that capture appended events to since the last
    /// call: capture calls it after each transaction it publishes.
    pub fn wake(&self) {
        for topic in self
            .by_relid
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            topic.wake();
        }
    }

    /// Publishes a truncate of table `relid` (or, with `partition`, of one of its partitions:
    /// subscribers start over).
    pub fn publish_truncate(
        &self,
        relid: u32,
        batch: u64,
        xid: u64,
        ts: &str,
        seq: i64,
        partition: bool,
    ) -> bool {
        let Some(topic) = self.topic_by_relid(relid) else {
            return false;
        };
        let (kind, frame) = if partition {
            (
                EntryKind::Reset,
                control::reset(&topic.resource, "table_changed"),
            )
        } else {
            (
                EntryKind::Truncate,
                control::truncate(&topic.resource, seq, ts),
            )
        };
        topic.push(seq, Some(xid), batch, kind, frame);
        true
    }

    /// Tells a table's subscribers their copy is stale, in stream order, whatever their
    /// filter or initial data (`reason`: `events_missing`, `table_dropped`, …).
    pub fn publish_reset(&self, resource: &str, reason: &'static str) {
        if let Some(topic) = self.topic(resource) {
            let frame = control::reset(&topic.resource, reason);
            self.publish_control(&topic, EntryKind::Reset, frame);
        }
    }

    /// Like [`Hub::publish_reset`], for a table capture knows by oid.
    pub fn publish_reset_relid(&self, relid: u32, reason: &'static str) {
        if let Some(topic) = self.topic_by_relid(relid) {
            self.publish_reset(topic.resource.as_ref(), reason);
        }
    }

    /// Tells a table's subscriptions that columns changed (they end if they name one, and
    /// start over otherwise).
    pub fn publish_columns_changed(&self, resource: &str, change: ColumnsChanged) {
        if let Some(topic) = self.topic(resource) {
            let frame = control::reset(&topic.resource, "table_changed");
            let kind = EntryKind::Columns(Arc::new(change));
            self.publish_control(&topic, kind, frame);
        }
    }

    /// Limits the rings were built with.
    pub fn limits(&self) -> HubLimits {
        self.limits
    }
}

/// A row change ready to publish: its type as logged, key and rows as JSON text.
#[derive(Debug, Clone, Copy)]
pub struct Change<'a> {
    /// Create, update or delete.
    pub op: Op,
    /// Log position.
    pub seq: i64,
    /// The key, as the wire's `id`.
    pub id: &'a str,
    /// New row.
    pub data: Option<&'a RawValue>,
    /// Old row.
    pub old: Option<&'a RawValue>,
}

/// The full frame of a change event.
fn encode_change(topic: &Topic, ts: &str, change: &Change<'_>) -> String {
    let changed = match (change.op, change.old, change.data) {
        (Op::Update, Some(old), Some(new)) => {
            match (Fields::parse(old.get()), Fields::parse(new.get())) {
                (Ok(old), Ok(new)) => Some(changed_columns(&old, &new)),
                _ => Some(Vec::new()),
            }
        }
        (Op::Update, _, _) => Some(Vec::new()),
        _ => None,
    };
    change_frame(&ChangeParts {
        op: change.op,
        resource: &topic.resource_json,
        id: change.id,
        data: change.data.map(RawValue::get),
        old: change.old.map(RawValue::get),
        changed: changed.as_deref(),
        seq: change.seq,
        ts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(ring_events: usize, ring_bytes: usize, queue_bytes: u64) -> Hub {
        let tables = [(1, "a".to_owned()), (2, "b".to_owned())];
        Hub::new(
            &tables,
            HubLimits {
                ring_events,
                ring_bytes,
                queue_bytes,
            },
        )
    }

    fn body(seq: i64, pad: usize) -> String {
        format!(
            r#"[[{seq}, "c", null, {{"id":{seq},"pad":"{}"}}, null]]"#,
            "x".repeat(pad)
        )
    }

    fn create(hub: &Hub, relid: u32, batch: u64, xid: u64, seq: i64, pad: usize) -> bool {
        let text = body(seq, pad);
        let events = crate::event::parse_body(&text).unwrap();
        let id = seq.to_string();
        let change = Change {
            op: Op::Create,
            seq,
            id: &id,
            data: events[0].data,
            old: None,
        };
        let published = hub.publish_change(relid, batch, xid, "t", &change);
        // As capture does after each transaction.
        hub.wake();
        published
    }

    /// Publishes one create of `relid` with `seq` in its own batch.
    fn publish(hub: &Hub, relid: u32, seq: i64, pad: usize) -> bool {
        let batch = hub.begin_batch();
        let published = create(hub, relid, batch, seq as u64, seq, pad);
        hub.end_batch(batch, seq);
        published
    }

    async fn seqs(cursor: &mut Cursor) -> Vec<i64> {
        let mut out = Vec::new();
        cursor.next_batch(&mut out, 100).await.unwrap();
        out.iter().map(|e| e.seq).collect()
    }

    #[tokio::test]
    async fn cursor_reads_events_of_its_table_in_publish_order() {
        let hub = hub(100, 1 << 20, 1 << 20);
        let mut cursor = hub.topic("a").unwrap().subscribe();
        for seq in 1..=3 {
            assert!(publish(&hub, 1, seq, 1));
            assert!(publish(&hub, 2, seq + 100, 1));
        }
        assert!(!publish(&hub, 9, 9, 1));
        assert_eq!(seqs(&mut cursor).await, [1, 2, 3]);
    }

    #[tokio::test]
    async fn waiting_cursor_wakes_on_publish() {
        let hub = Arc::new(hub(100, 1 << 20, 1 << 20));
        let mut cursor = hub.topic("a").unwrap().subscribe();
        let publisher = Arc::clone(&hub);
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            publish(&publisher, 1, 7, 1);
        });
        let mut out = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            cursor.next_batch(&mut out, 10),
        )
        .await
        .expect("cursor woke")
        .unwrap();
        assert_eq!(out[0].seq, 7);
    }

    #[tokio::test]
    async fn a_cursor_past_its_queue_limit_overflows_only_while_not_reading() {
        let hub = hub(1000, 1 << 20, 4096);
        let mut cursor = hub.topic("a").unwrap().subscribe();
        for seq in 1..=10 {
            publish(&hub, 1, seq, 1000);
        }
        // A writer racing its socket against `overflowed` learns it is too far behind…
        assert_eq!(cursor.overflowed().await, Overflow::Lagged);
        // …but a reader that keeps reading drains the burst from the shared ring.
        assert_eq!(seqs(&mut cursor).await.len(), 10);
    }

    #[tokio::test]
    async fn resume_replays_from_the_first_batch_holding_a_higher_seq() {
        let hub = hub(1000, 1 << 20, 1 << 20);
        hub.set_start_seq(0);
        let topic = hub.topic("a").unwrap();
        // One batch whose transactions were ordered 5, 3 (a late committer took seq 3):
        // another relay may have sent 3 before 5, so a client that saw 3 gets 5 again.
        let batch = hub.begin_batch();
        for (xid, seq) in [(20, 5), (10, 3), (10, 4)] {
            create(&hub, 1, batch, xid, seq, 1);
        }
        hub.end_batch(batch, 5);
        publish(&hub, 1, 8, 1);
        // The whole batch again, 3 included: a replay is a suffix of the stream.
        let Resume::From(mut cursor) = hub.resume(&topic, 3) else {
            panic!("resumable")
        };
        assert_eq!(seqs(&mut cursor).await, [5, 3, 4, 8]);
        let Resume::From(mut cursor) = hub.resume(&topic, 6) else {
            panic!("resumable")
        };
        assert_eq!(seqs(&mut cursor).await, [8]);
        assert!(matches!(hub.resume(&topic, 9), Resume::Ahead(_)));
        hub.set_start_seq(4);
        assert!(matches!(hub.resume(&topic, 3), Resume::Reset));
    }

    #[tokio::test]
    async fn a_cursor_behind_the_ring_is_evicted_and_resume_into_evicted_batches_resets() {
        let hub = hub(3, 1 << 20, 1 << 20);
        hub.set_start_seq(0);
        let topic = hub.topic("a").unwrap();
        let mut cursor = topic.subscribe();
        for seq in 1..=5 {
            publish(&hub, 1, seq, 1);
        }
        let mut out = Vec::new();
        assert_eq!(
            cursor.next_batch(&mut out, 10).await,
            Err(Overflow::Evicted)
        );
        assert!(matches!(hub.resume(&topic, 1), Resume::Reset));
        // (From seq 3's batch, which holds seq 3 itself: at least once.)
        let Resume::From(mut resumed) = hub.resume(&topic, 3) else {
            panic!("resumable")
        };
        assert_eq!(seqs(&mut resumed).await, [3, 4, 5]);
    }

    #[tokio::test]
    async fn an_exact_position_resumes_right_after_its_batch_and_covers_only_what_is_in_the_ring() {
        let hub = hub(1000, 1 << 20, 1 << 20);
        hub.set_start_seq(0);
        let topic = hub.topic("a").unwrap();
        assert_eq!(hub.exact_position(), None);
        let batch = hub.begin_batch();
        for (xid, seq) in [(20, 5), (10, 3)] {
            create(&hub, 1, batch, xid, seq, 1);
        }
        hub.end_batch(batch, 5);
        let (seq, through) = hub.exact_position().expect("a batch ended");
        assert_eq!((seq, through), (5, batch));
        // A late committer with a lower seq, in a later batch: a seq alone must replay the
        // batch that holds 5 (another relay may order them differently); the exact position
        // skips just what the client has.
        publish(&hub, 1, 4, 1);
        let Resume::From(mut cursor) = hub.resume_after(&topic, through) else {
            panic!("resumable")
        };
        assert_eq!(seqs(&mut cursor).await, [4]);
        let Resume::From(mut cursor) = hub.resume(&topic, seq) else {
            panic!("resumable")
        };
        assert_eq!(seqs(&mut cursor).await, [5, 3, 4]);
        // A reset published outside a capture batch takes a batch of its own, so a position
        // taken before it is in the ring never covers it.
        let (_, before_reset) = hub.exact_position().unwrap();
        hub.publish_reset("a", "table_dropped");
        let (_, after_reset) = hub.exact_position().unwrap();
        assert_eq!(after_reset, before_reset + 1);
        let Resume::From(cursor) = hub.resume_after(&topic, before_reset) else {
            panic!("resumable")
        };
        assert!(cursor.backlog_ends());
        let Resume::From(cursor) = hub.resume_after(&topic, after_reset) else {
            panic!("resumable")
        };
        assert!(!cursor.backlog_ends() && cursor.caught_up());
        // Batches this hub never ended are not resumed from.
        assert!(matches!(
            hub.resume_after(&topic, after_reset + 5),
            Resume::Reset
        ));
    }

    #[test]
    fn a_backlog_ends_only_when_a_reset_or_column_change_is_at_or_after_the_cursor() {
        let hub = hub(1000, 1 << 20, 1 << 20);
        hub.set_start_seq(0);
        let topic = hub.topic("a").unwrap();
        publish(&hub, 1, 1, 1);
        let before = topic.subscribe();
        hub.publish_columns_changed("a", ColumnsChanged::default());
        let at = topic.subscribe();
        publish(&hub, 1, 2, 1);
        assert!(before.backlog_ends());
        assert!(!at.backlog_ends() && !topic.subscribe().backlog_ends());
        assert!(!hub.topic("b").unwrap().subscribe().backlog_ends());
    }

    #[tokio::test]
    async fn an_exact_position_whose_next_batch_was_evicted_resets() {
        let hub = hub(2, 1 << 20, 1 << 20);
        hub.set_start_seq(0);
        let topic = hub.topic("a").unwrap();
        publish(&hub, 1, 1, 1);
        let (_, through) = hub.exact_position().unwrap();
        for seq in 2..=4 {
            publish(&hub, 1, seq, 1);
        }
        assert!(matches!(hub.resume_after(&topic, through), Resume::Reset));
        let (_, now) = hub.exact_position().unwrap();
        let Resume::From(mut cursor) = hub.resume_after(&topic, now - 1) else {
            panic!("resumable")
        };
        assert_eq!(seqs(&mut cursor).await, [4]);
    }

    #[test]
    fn shaped_frames_count_against_the_history_and_are_capped() {
        let hub = hub(1000, 1 << 20, 1 << 20);
        publish(&hub, 1, 1, 10);
        let topic = hub.topic("a").unwrap();
        let before = topic.held_bytes();
        let entry = topic.lock().entries[0].clone();
        for key in 0..20u64 {
            entry.shaped_frame(&topic, key, || "x".repeat(100));
        }
        let after = topic.held_bytes();
        // (Their text is in one block, counted whole.)
        assert_eq!(after - before, MAX_SHAPES * shape_cost(100) + BLOCK_COST);
    }

    #[test]
    fn evicting_an_entry_drops_its_shaped_frames_and_their_bytes() {
        let hub = hub(2, 1 << 20, 1 << 20);
        let topic = hub.topic("a").unwrap();
        publish(&hub, 1, 1, 10);
        let first = topic.lock().entries[0].clone();
        first.shaped_frame(&topic, 7, || "x".repeat(100));
        publish(&hub, 1, 2, 10);
        let second = topic.lock().entries[1].clone();
        second.shaped_frame(&topic, 7, || "y".repeat(100));
        assert_eq!(topic.shapes().frames.len(), 2);

        // The third entry evicts the first (two entries at most): its shape goes with it.
        publish(&hub, 1, 3, 10);
        assert_eq!(topic.shapes().frames.len(), 1);
        // (The block their text shares is kept by the second's.)
        assert_eq!(
            topic.shaped_bytes.load(Ordering::Relaxed),
            shape_cost(100) + BLOCK_COST
        );
        // A reader still holding the evicted entry is served, and nothing is cached for it.
        assert_eq!(first.shaped_frame(&topic, 7, || "z".repeat(3)), "zzz");
        assert_eq!(topic.shapes().frames.len(), 1);
        // The kept entry's shape is shared, not encoded again.
        assert_eq!(second.shaped_frame(&topic, 7, || unreachable!()).len(), 100);
    }

    #[test]
    fn the_history_budget_counts_every_slot_the_ring_allocated() {
        let hub = hub(1000, 1 << 20, 1 << 20);
        let topic = hub.topic("a").unwrap();
        for seq in 1..=100 {
            publish(&hub, 1, seq, 10);
        }
        let ring = topic.lock();
        let frames: usize = ring.entries.iter().map(|e| frame_cost(e.frame.len())).sum();
        assert!(ring.entries.capacity() >= 100);
        assert!(ring.arena.wasted > 0, "100 frames fill more than one block");
        assert_eq!(
            ring.held(),
            frames + ring.entries.capacity() * SLOT + ring.arena.wasted
        );
    }

    /// Heap bytes `f` allocated on this thread and did not free, as glibc's malloc holds them
    /// (a block's header and rounding: 16 bytes each on average).
    fn heap(f: impl FnOnce()) -> f64 {
        let info = allocation_counter::measure(f);
        (info.bytes_current + 16 * info.count_current) as f64
    }

    /// A frame as the encoders build one: grown piece by piece, so with spare capacity.
    fn grown(len: usize) -> String {
        let mut text = String::new();
        for _ in 0..len {
            text.push('s');
        }
        text
    }

    #[test]
    fn what_the_history_counts_is_what_its_entries_allocate() {
        // Frames of a typical row (231 bytes), frames that leave much room in a block (681
        // and 861: 15% of each block was left uncounted before), large frames (1,581).
        for pad in [150, 600, 780, 1500] {
            let hub = hub(100_000, 1 << 30, 1 << 30);
            let topic = hub.topic("a").unwrap();
            // Settle the ring's first allocations, then measure 4,000 more entries.
            for seq in 1..=8 {
                publish(&hub, 1, seq, pad);
            }
            let before = topic.held_bytes();
            let allocated = heap(|| {
                for seq in 9..=4008 {
                    publish(&hub, 1, seq, pad);
                }
            });
            let counted = (topic.held_bytes() - before) as f64;
            assert!(
                counted >= allocated && counted <= 1.25 * allocated,
                "frames of {pad}: counted {counted}, allocated {allocated}"
            );
        }
    }

    #[test]
    fn what_the_history_counts_of_shaped_frames_is_what_they_allocate() {
        // Readers cache shapes as they read: entry by entry, each of their shapes.
        for (len, shapes) in [(60, 1), (150, 1), (150, 3), (780, 1), (1500, 1), (1500, 2)] {
            let hub = hub(100_000, 1 << 30, 1 << 30);
            let topic = hub.topic("a").unwrap();
            for seq in 1..=4000 {
                publish(&hub, 1, seq, 10);
            }
            let entries: Vec<Entry> = topic.lock().entries.iter().cloned().collect();
            let before = topic.held_bytes();
            let allocated = heap(|| {
                for entry in &entries {
                    for key in 0..shapes {
                        entry.shaped_frame(&topic, key, || grown(len));
                    }
                }
            });
            let counted = (topic.held_bytes() - before) as f64;
            assert!(
                counted >= allocated && counted <= 1.25 * allocated,
                "{shapes} shapes of {len} bytes: counted {counted}, allocated {allocated}"
            );
        }
    }

    #[test]
    fn what_the_history_counts_of_shapes_cached_out_of_order_is_what_they_allocate() {
        // A reader at the head and one a history behind it (a replay, a steady but late
        // reader), each with its own projection: their shapes share blocks, and a block
        // lives as long as the newest of its frames.
        for (len, behind) in [(150, 1999), (150, 1000), (600, 1999)] {
            let hub = hub(2000, 1 << 30, 1 << 30);
            let topic = hub.topic("a").unwrap();
            for seq in 1..=2000 {
                publish(&hub, 1, seq, 10);
            }
            let before = topic.held_bytes();
            let allocated = heap(|| {
                for seq in 2001..=6000 {
                    publish(&hub, 1, seq, 10);
                    let ring = topic.lock();
                    let (head, late) = (
                        ring.entries[1999].clone(),
                        ring.entries[1999 - behind].clone(),
                    );
                    drop(ring);
                    head.shaped_frame(&topic, 1, || grown(len));
                    late.shaped_frame(&topic, 2, || grown(len));
                }
            });
            let counted = (topic.held_bytes() - before) as f64;
            // (Less a block or two: the ring's oldest block, partly gone, counts only the
            // frames it still has.)
            let slack = 2.0 * BLOCK_COST as f64;
            assert!(
                counted + slack >= allocated && counted <= 1.25 * allocated,
                "shapes of {len} bytes {behind} behind: counted {counted}, allocated {allocated}"
            );
        }
    }

    /// The cost of one more entry of the size `publish(.., pad)` makes.
    fn entry_cost(pad: usize) -> usize {
        let hub = hub(10, 1 << 20, 1 << 20);
        publish(&hub, 1, 10_000, pad);
        let topic = hub.topic("a").unwrap();
        let ring = topic.lock();
        frame_cost(ring.entries[0].frame.len())
    }

    #[test]
    fn one_more_event_of_the_same_size_evicts_at_most_one() {
        // Events of one size, a budget that holds 1,024 of them with their slots (a power of
        // two: the deque is full when the 1,025th comes). Publishing one more must evict one
        // (or none), not most of the history because the deque doubled its capacity.
        let pad = 100;
        let cost = entry_cost(pad);
        let budget = 1024 * (cost + SLOT) + cost / 2;
        let hub = hub(1_000_000, budget, 1 << 30);
        let topic = hub.topic("a").unwrap();
        let mut most = 0;
        // Seqs of five digits: every frame is the same size.
        for seq in 10_000..=13_000 {
            publish(&hub, 1, seq, pad);
            let ring = topic.lock();
            let len = ring.entries.len();
            assert!(
                len + 1 >= most,
                "after event {seq}: {len} retained, {most} before (capacity {}, budget {budget}, \
                 held {})",
                ring.entries.capacity(),
                ring.held()
            );
            most = most.max(len);
            assert!(ring.held() <= budget);
        }
    }

    #[test]
    fn frames_smaller_than_a_slot_do_not_shrink_the_history_to_one_event() {
        // Frames smaller than the slot an entry takes (short control frames, say): a budget
        // for 1,024 of them with their slots; when the deque doubles, its empty slots alone
        // exceed the budget. The ring must not fall to one entry for good.
        let frame = "{\"type\":\"truncate\"}";
        let budget = 1024 * (frame_cost(frame.len()) + SLOT) + 10;
        let hub = hub(1_000_000, budget, 1 << 30);
        let topic = hub.topic("a").unwrap();
        for seq in 1..=3000 {
            topic.push(seq, None, seq as u64, EntryKind::Truncate, frame.to_owned());
        }
        let ring = topic.lock();
        assert!(
            ring.entries.len() >= 1000,
            "{} retained (capacity {}, held {}, budget {budget})",
            ring.entries.len(),
            ring.entries.capacity(),
            ring.held()
        );
    }

    #[test]
    fn after_a_burst_of_small_events_the_budget_still_holds_larger_ones() {
        // A burst of small events grows the deque; larger events later must still get most of
        // the budget (at least half of what a ring that never saw the burst retains).
        let budget = 1 << 20;
        let fresh = {
            let hub = hub(1_000_000, budget, 1 << 30);
            for seq in 1..=5000 {
                publish(&hub, 1, seq, 900);
            }
            hub.topic("a").unwrap().lock().entries.len()
        };
        let hub = hub(1_000_000, budget, 1 << 30);
        let topic = hub.topic("a").unwrap();
        for seq in 1..=20_000 {
            publish(&hub, 1, seq, 0);
        }
        for seq in 20_001..=25_000 {
            publish(&hub, 1, seq, 900);
        }
        let ring = topic.lock();
        assert!(
            ring.entries.len() * 2 >= fresh,
            "{} retained after the burst, {fresh} without it (capacity {})",
            ring.entries.len(),
            ring.entries.capacity()
        );
    }

    #[test]
    fn shapes_cached_while_entries_are_evicted_stay_bounded_and_counted() {
        // Readers cache shapes of entries while capture evicts them (a ring of 4 entries):
        // the cache never holds more than the ring's entries' shapes plus the few raced in,
        // and `shaped_bytes` is exactly what the cache holds once capture evicts again.
        use std::sync::atomic::AtomicBool;
        let hub = Arc::new(hub(4, 1 << 20, 1 << 30));
        let topic = hub.topic("a").unwrap();
        publish(&hub, 1, 1, 10);
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..3)
            .map(|r| {
                let (topic, stop) = (Arc::clone(&topic), Arc::clone(&stop));
                std::thread::spawn(move || {
                    let mut cached = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let entries: Vec<Entry> = topic.lock().entries.iter().cloned().collect();
                        // The oldest entry (the next evicted), and now and then all of them: the
                        // cache is empty most of the time, so capture often skips looking.
                        let all = cached.is_multiple_of(64);
                        for entry in entries.iter().take(if all { 4 } else { 1 }) {
                            entry.shaped_frame(&topic, r, || "s".repeat(50));
                            cached += 1;
                        }
                    }
                    cached
                })
            })
            .collect();
        let mut most = 0;
        for seq in 2..=20_000 {
            publish(&hub, 1, seq, 10);
            most = most.max(topic.shapes().frames.len());
        }
        stop.store(true, Ordering::Relaxed);
        for reader in readers {
            reader.join().unwrap();
        }
        // Another eviction drops whatever raced in.
        publish(&hub, 1, 20_001, 10);
        let shapes = topic.shapes();
        let counted: usize = shapes.frames.values().map(|f| shape_cost(f.len())).sum();
        let evicted = topic.evicted_offset.load(Ordering::Relaxed);
        assert!(shapes.frames.keys().all(|(offset, _)| *offset > evicted));
        // Blocks are counted until their frames go, and no longer.
        assert!(
            shapes
                .arena
                .tails
                .front()
                .is_none_or(|(last, _)| *last > evicted)
        );
        let blocks: usize = shapes
            .arena
            .tails
            .iter()
            .map(|(_, held)| held)
            .sum::<usize>();
        let blocks = blocks + BLOCK_COST;
        assert_eq!(shapes.arena.wasted, blocks);
        assert_eq!(topic.shaped_bytes.load(Ordering::Relaxed), counted + blocks);
        assert!(most <= 8 * 3, "{most} shapes cached at once");
    }
}
