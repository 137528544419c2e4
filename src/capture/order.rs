//! Per-row order inside one transaction, checked against the rows themselves.
//!
//! The log orders a transaction's events by (statement, seq), where a statement's number is
//! drawn when it starts. That is the order things happened in for every statement that runs
//! after the one that fired it (AFTER triggers, FK actions, a later statement), but not for
//! writes made *while* a statement changes its rows: a BEFORE trigger that deletes the row an
//! INSERT is about to replace, or a volatile function in RETURNING that updates the row just
//! written. The log cannot tell those apart, but the rows can: each event names the row it
//! found (`old`) and the row it left (`data`), so in the true order each event of a row
//! starts from where the previous one left it.
//!
//! [`repair`] checks that chain for every row a transaction touches more than once and, where
//! it is broken, finds the order (among that row's events) that keeps it, putting the row's
//! events back into the positions they held, so nothing else moves. A row whose events admit
//! no consistent order (or too many to search) is reported, and its table's subscribers are
//! reset. [`Tracker`] does the checking part for a transaction too large to hold, which is
//! published as it is read: a break there resets the table.
//!
//! One case the rows cannot show: a BEFORE trigger that deletes a row *identical* to the one
//! the INSERT then writes (same key, same values) reads the same as an AFTER trigger deleting
//! the row just inserted; both are kept in the log's order, which is right for the AFTER
//! trigger.

use std::collections::HashMap;

/// A row's state before or after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State<'a> {
    /// No row with this key.
    Absent,
    /// The row, as JSON text.
    Row(&'a str),
    /// Not known (an update whose old row was over PostgreSQL's size limit).
    Any,
}

impl State<'_> {
    /// Whether an event that expects `self` can follow one that left `prev`.
    fn follows(self, prev: State<'_>) -> bool {
        match (self, prev) {
            (State::Any, _) | (_, State::Any) => true,
            (State::Absent, State::Absent) => true,
            (State::Row(a), State::Row(b)) => a == b,
            _ => false,
        }
    }
}

/// One event as the chain sees it.
#[derive(Debug, Clone, Copy)]
pub struct Link<'a> {
    /// The table.
    pub relid: u32,
    /// The row's key (the wire `id`).
    pub id: &'a str,
    /// What the event found.
    pub before: State<'a>,
    /// What it left.
    pub after: State<'a>,
    /// A truncate of `relid`: every row's history starts over after it.
    pub barrier: bool,
}

/// Rows with more events than this are not searched: their order is taken from the log if it
/// is consistent, else their table is reset.
const SEARCH_LIMIT: usize = 8;

/// Checks the chain of every row touched more than once and returns the publishing order
/// (a permutation of `0..links.len()`), and the tables whose order could not be made
/// consistent (their subscribers must start over).
pub fn repair(links: &[Link<'_>]) -> (Vec<usize>, Vec<u32>) {
    let mut order: Vec<usize> = (0..links.len()).collect();
    let mut unresolved: Vec<u32> = Vec::new();
    // (table, truncate segment, key) -> positions of its events.
    let mut rows: HashMap<(u32, u32, &str), Vec<usize>> = HashMap::new();
    let mut segments: HashMap<u32, u32> = HashMap::new();
    for (i, link) in links.iter().enumerate() {
        let segment = segments.entry(link.relid).or_insert(0);
        if link.barrier {
            *segment += 1;
            continue;
        }
        rows.entry((link.relid, *segment, link.id))
            .or_default()
            .push(i);
    }
    for ((relid, _, _), positions) in rows {
        if positions.len() < 2 || consistent(links, &positions) {
            continue;
        }
        match search(links, &positions) {
            Some(found) => {
                for (slot, event) in positions.iter().zip(found) {
                    order[*slot] = event;
                }
            }
            None => {
                if !unresolved.contains(&relid) {
                    unresolved.push(relid);
                }
            }
        }
    }
    (order, unresolved)
}

fn consistent(links: &[Link<'_>], events: &[usize]) -> bool {
    events
        .windows(2)
        .all(|w| links[w[1]].before.follows(links[w[0]].after))
}

/// A consistent order of `events` (positions into `links`), preferring the log's order.
fn search(links: &[Link<'_>], events: &[usize]) -> Option<Vec<usize>> {
    if events.len() > SEARCH_LIMIT {
        return None;
    }
    fn go(links: &[Link<'_>], left: &mut Vec<usize>, path: &mut Vec<usize>) -> bool {
        if left.is_empty() {
            return true;
        }
        for i in 0..left.len() {
            let next = left[i];
            if let Some(&prev) = path.last()
                && !links[next].before.follows(links[prev].after)
            {
                continue;
            }
            left.remove(i);
            path.push(next);
            if go(links, left, path) {
                return true;
            }
            path.pop();
            left.insert(i, next);
        }
        false
    }
    let mut left = events.to_vec();
    let mut path = Vec::with_capacity(events.len());
    go(links, &mut left, &mut path).then_some(path)
}

/// Most rows a [`Tracker`] remembers per transaction; past it, the rest of the transaction
/// is not checked (and a warning says so).
const TRACK_LIMIT: usize = 1 << 20;

/// Checks the chain of a transaction published as it is read: remembers, per row, a hash of
/// the state the last event left.
#[derive(Debug, Default)]
pub struct Tracker {
    states: HashMap<(u32, u64), u64, foldhash::fast::RandomState>,
    full: bool,
    /// Tables already found broken in this transaction.
    broken: Vec<u32>,
}

/// Row states and keys are hashed with foldhash (seeded per process): SipHash over every
/// row of a large transaction was a tenth of the relay's CPU in a bulk load.
fn hash(text: &str) -> u64 {
    use std::hash::BuildHasher;
    static SEED: std::sync::OnceLock<foldhash::fast::RandomState> = std::sync::OnceLock::new();
    SEED.get_or_init(foldhash::fast::RandomState::default)
        .hash_one(text)
}

/// A hash per state; `None` for [`State::Any`].
fn state_hash(state: State<'_>) -> Option<u64> {
    match state {
        State::Absent => Some(0),
        State::Row(text) => Some(hash(text) | 1),
        State::Any => None,
    }
}

impl Tracker {
    /// Checks one event; `false` when it does not start where the row's previous event left
    /// it and is the first such event of its table in this transaction.
    pub fn check(&mut self, link: &Link<'_>) -> bool {
        if link.barrier {
            self.states.retain(|(relid, _), _| *relid != link.relid);
            return true;
        }
        let key = (link.relid, hash(link.id));
        let ok = match (self.states.get(&key), state_hash(link.before)) {
            (Some(prev), Some(before)) => *prev == before || *prev == u64::MAX,
            _ => true,
        };
        let after = state_hash(link.after).unwrap_or(u64::MAX);
        if self.states.len() < TRACK_LIMIT || self.states.contains_key(&key) {
            self.states.insert(key, after);
        } else if !self.full {
            self.full = true;
            tracing::warn!(
                rows = TRACK_LIMIT,
                "a transaction touches too many rows to check their order; the rest is taken as logged"
            );
        }
        if ok || self.broken.contains(&link.relid) {
            return true;
        }
        self.broken.push(link.relid);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create<'a>(id: &'a str, row: &'a str) -> Link<'a> {
        Link {
            relid: 1,
            id,
            before: State::Absent,
            after: State::Row(row),
            barrier: false,
        }
    }
    fn update<'a>(id: &'a str, old: &'a str, new: &'a str) -> Link<'a> {
        Link {
            relid: 1,
            id,
            before: State::Row(old),
            after: State::Row(new),
            barrier: false,
        }
    }
    fn delete<'a>(id: &'a str, old: &'a str) -> Link<'a> {
        Link {
            relid: 1,
            id,
            before: State::Row(old),
            after: State::Absent,
            barrier: false,
        }
    }

    #[test]
    fn a_consistent_transaction_keeps_the_log_order() {
        // An AFTER trigger deleting the row just inserted; an update of another row between.
        let links = [create("1", "a"), update("2", "x", "y"), delete("1", "a")];
        assert_eq!(repair(&links), (vec![0, 1, 2], vec![]));
    }

    #[test]
    fn a_before_trigger_replacing_a_row_is_put_back_in_order() {
        // BEFORE INSERT deleted the old row 1, logged after the insert that replaced it.
        let links = [
            create("1", "new"),
            update("2", "x", "y"),
            delete("1", "old"),
        ];
        assert_eq!(repair(&links), (vec![2, 1, 0], vec![]));
    }

    #[test]
    fn an_update_inside_returning_comes_after_the_outer_update() {
        let links = [update("3", "b", "bumped"), update("3", "a", "b")];
        assert_eq!(repair(&links).0, vec![1, 0]);
    }

    #[test]
    fn a_row_with_no_consistent_order_resets_its_table() {
        let links = [update("1", "a", "b"), update("1", "c", "d")];
        assert_eq!(repair(&links).1, vec![1]);
    }

    #[test]
    fn a_truncate_starts_every_row_over() {
        let mut t = create("1", "a");
        t.barrier = true;
        let links = [create("1", "a"), t, create("1", "b")];
        assert_eq!(repair(&links), (vec![0, 1, 2], vec![]));
    }

    #[test]
    fn the_tracker_finds_a_break() {
        let mut tracker = Tracker::default();
        assert!(tracker.check(&create("1", "new")));
        assert!(tracker.check(&update("2", "x", "y")));
        assert!(!tracker.check(&delete("1", "old")));
        // Once per table.
        assert!(tracker.check(&delete("2", "nothing")));
        let mut fresh = Tracker::default();
        assert!(fresh.check(&create("1", "a")));
        assert!(fresh.check(&update("1", "a", "b")));
        assert!(fresh.check(&delete("1", "b")));
    }
}
