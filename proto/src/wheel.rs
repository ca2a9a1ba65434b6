//! A hashed timing wheel (Varghese & Lauck, scheme 4) of connection keys, with
//! lazy re-arm (sans-IO: ticks are plain numbers).
//!
//! A heartbeat never touches the wheel: the connection only stores the tick it
//! was last heard in. When the slot of an entry's deadline comes due, the
//! owner looks at that tick and either expires the connection or re-arms it
//! at its new deadline, so the wheel touches a live connection once per
//! timeout, not once per heartbeat. Entries carry the slab generation: a
//! stale entry of a closed connection whose key was reused is recognised and
//! dropped by the owner ([`Entry::gen`]), never resurrected.
//!
//! The wheel has at least `horizon + 1` slots, so every deadline within
//! `horizon` ticks of the cursor has a slot of its own in the current turn.
//! An entry further out (possible only while the cursor catches up after a
//! stall) waits in the last slot of the turn and moves on from there: an
//! entry is never returned before its deadline.

/// One scheduled connection: its slab key, the generation it had when armed,
/// and the tick it is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Entry {
    pub key: u32,
    pub gen: u32,
    pub deadline: u64,
}

#[derive(Debug)]
pub struct Wheel {
    slots: Vec<Vec<Entry>>,
    /// One bit per slot: set while the slot holds entries, so that the next
    /// occupied slot is found a word (64 slots) at a time.
    occupied: Vec<u64>,
    mask: u64,
    /// The next tick whose slot has not been fully drained.
    cursor: u64,
    len: usize,
}

/// Largest horizon a wheel accepts (2^20 slots: 24 MiB of empty Vecs).
pub const MAX_HORIZON: u64 = (1 << 20) - 1;

impl Wheel {
    /// A wheel for deadlines at most `horizon` ticks ahead, starting at tick `now`.
    pub fn new(horizon: u64, now: u64) -> Wheel {
        assert!(
            (1..=MAX_HORIZON).contains(&horizon),
            "wheel horizon {horizon} outside 1..={MAX_HORIZON}"
        );
        let n = (horizon + 1).next_power_of_two();
        Wheel {
            slots: (0..n).map(|_| Vec::new()).collect(),
            occupied: vec![0; n.div_ceil(64) as usize],
            mask: n - 1,
            cursor: now,
            len: 0,
        }
    }

    /// Schedules `entry` for tick `entry.deadline` (a passed deadline is due
    /// at once).
    pub fn insert(&mut self, entry: Entry) {
        self.place(entry, self.cursor);
        self.len += 1;
    }

    fn place(&mut self, entry: Entry, earliest: u64) {
        let tick = entry.deadline.clamp(earliest, self.cursor + self.mask);
        let slot = (tick & self.mask) as usize;
        self.slots[slot].push(entry);
        self.occupied[slot / 64] |= 1 << (slot % 64);
    }

    /// Takes one entry whose deadline is at or before tick `now`, or `None`.
    /// Call in a loop with a budget: each call is O(1) amortised, and a long
    /// catch-up may be split across calls at any point.
    pub fn pop_due(&mut self, now: u64) -> Option<Entry> {
        while self.cursor <= now {
            let slot = (self.cursor & self.mask) as usize;
            while let Some(e) = self.slots[slot].pop() {
                if e.deadline > self.cursor {
                    // Parked beyond the horizon: move on, to a later slot.
                    self.place(e, self.cursor + 1);
                    continue;
                }
                self.len -= 1;
                return Some(e);
            }
            self.occupied[slot / 64] &= !(1 << (slot % 64));
            self.cursor += 1;
        }
        None
    }

    /// Entries scheduled, stale ones of closed connections included.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The next tick whose slot is not yet drained.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// The first tick at or after the cursor whose slot holds an entry, or
    /// None when the wheel is empty: the owner may sleep until then (never
    /// past an entry's deadline; an entry parked beyond the horizon makes it
    /// wake early, once per turn). O(slots / 64).
    pub fn next_due(&self) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        let n = self.mask + 1;
        let start = self.cursor & self.mask;
        let words = self.occupied.len();
        let first = (start / 64) as usize;
        // From the cursor's slot to the end of the turn, then the slots
        // before it: words + 1 looks, the first and last ones masked.
        for i in 0..=words {
            let w = (first + i) % words;
            let mut word = self.occupied[w];
            if i == 0 {
                word &= !0u64 << (start % 64);
            }
            if i == words {
                word &= (1u64 << (start % 64)).wrapping_sub(1);
            }
            if word != 0 {
                let slot = w as u64 * 64 + word.trailing_zeros() as u64;
                return Some(self.cursor + ((slot + n - start) & self.mask));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(key: u32, deadline: u64) -> Entry {
        Entry {
            key,
            gen: 0,
            deadline,
        }
    }

    #[test]
    fn entries_come_due_at_their_tick_not_before() {
        let mut w = Wheel::new(10, 0);
        w.insert(e(1, 5));
        w.insert(e(2, 3));
        assert_eq!(w.pop_due(2), None);
        assert_eq!(w.pop_due(3), Some(e(2, 3)));
        assert_eq!(w.pop_due(4), None);
        assert_eq!(w.pop_due(100), Some(e(1, 5)));
        assert!(w.is_empty());
    }

    #[test]
    fn past_deadlines_are_due_now_and_far_ones_never_early() {
        let mut w = Wheel::new(7, 20);
        w.insert(e(1, 3));
        assert_eq!(w.pop_due(20), Some(e(1, 3)));
        w.insert(e(2, 1000));
        assert_eq!(w.pop_due(999), None);
        assert_eq!(w.len(), 1);
        assert_eq!(w.pop_due(1000), Some(e(2, 1000)));
    }
}
