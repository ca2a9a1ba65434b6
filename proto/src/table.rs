//! The device table's logic: one live connection per device id, over a
//! memory region its user provides (c1m-server maps one memfd in every
//! `--procs` worker: its `directory::registry`). Here only the layout and
//! the algorithm; no mapping, no system call.
//!
//! A shard that upgrades a device *claims* the id in the table itself,
//! before its 101 goes out ([`Table::claim`]); when the connection ends it
//! *releases* it ([`Table::release`]). Claims are ordered by the table (its
//! stripe's lock), and a claim is made before the device can see its 101,
//! so a device's next connection always claims after its previous one: the
//! newer wins, and the holder of the older one is told to close it.
//!
//! Why a lock and not compare-and-swap on entries: an open-addressing table
//! whose entries are claimed by CAS cannot reuse a freed bucket for another
//! id without a 128-bit CAS and a subtle proof (a claimer of the same id
//! may be probing past it), and one that never reuses buckets fills with
//! every id ever seen. So the table is cut into stripes of
//! [`PER_STRIPE`] entries, each a plain linear-probing table (backward-shift
//! deletion) under its own lock word. A critical section is a probe of a
//! few entries: tens of nanoseconds, no system call, no allocation. The
//! lock word holds the holder's pid, so when a worker dies (even by
//! SIGKILL) holding one, the parent finds it by that pid and repairs the
//! stripe ([`Table::sweep`]); a waiter meanwhile yields its CPU.
//!
//! Entries are keyed by a 64-bit digest of the id (SipHash-1-3 over a
//! random 128-bit key kept in the table's header, then the id): two ids
//! with one digest (about 1 in 3.7e7 for a million live ids; not to be
//! found on purpose without the key) share an entry. The newer claim holds
//! it, and the holder of the older connection compares the id it is told
//! with its own before closing anything: a collision costs the older device
//! its lookups, never its connection.

use std::hash::Hasher;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::device_id::DeviceId;

/// Where a connection lives: its shard (index over all shards), its slot
/// there and the slot's generation. Packed into 64 bits in an entry:
/// [`SHARD_BITS`], [`KEY_BITS`] and [`GEN_BITS`] bits, so a server has at
/// most 4,096 shards of at most 16.7M slots (checked at its start), and a
/// shard's generations wrap at 2^28 ([`next_gen`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Location {
    pub shard: u32,
    pub key: u32,
    pub gen: u32,
}

pub const SHARD_BITS: u32 = 12;
pub const KEY_BITS: u32 = 24;
pub const GEN_BITS: u32 = 28;
/// Shards a server may have.
pub const MAX_SHARDS: usize = 1 << SHARD_BITS;
/// Slots a shard may have (its slab keys are below this).
pub const MAX_KEYS: usize = 1 << KEY_BITS;

/// The generation after `gen`: 1 to 2^28 - 1, wrapping (0 is never used,
/// so a zeroed place names no connection).
pub fn next_gen(gen: u32) -> u32 {
    (gen.wrapping_add(1) & ((1 << GEN_BITS) - 1)).max(1)
}

impl Location {
    /// The 64 bits an entry keeps, or None when the location is out of
    /// range (unreachable with a checked configuration).
    fn pack(&self) -> Option<u64> {
        let fits = (self.shard as usize) < MAX_SHARDS
            && (self.key as usize) < MAX_KEYS
            && self.gen < 1 << GEN_BITS;
        fits.then_some(
            (self.shard as u64) << (KEY_BITS + GEN_BITS)
                | (self.key as u64) << GEN_BITS
                | self.gen as u64,
        )
    }

    fn unpack(place: u64) -> Location {
        Location {
            shard: (place >> (KEY_BITS + GEN_BITS)) as u32,
            key: ((place >> GEN_BITS) & ((1 << KEY_BITS) - 1)) as u32,
            gen: (place & ((1 << GEN_BITS) - 1)) as u32,
        }
    }
}

/// Entries per stripe: a power of two. A stripe is 16 KiB of entries.
pub const PER_STRIPE: usize = 1024;
/// A stripe holds at most this many: probes stay short, and a full stripe
/// is a table sized too small, not a hash that went long.
const STRIPE_LIMIT: u32 = (PER_STRIPE * 15 / 16) as u32;
/// Table entries per connection the server can hold. At capacity the mean
/// stripe then holds 768 of 1,024, and one past [`STRIPE_LIMIT`] is 6.9
/// standard deviations away.
const SLACK: (usize, usize) = (4, 3);

const MAGIC: u64 = 0x6331_6d2d_7265_6731; // "c1m-reg1"
/// 2: 16-byte entries (the upgrade time left the table).
const VERSION: u32 = 2;

/// The table's first 64 bytes.
#[repr(C)]
struct Header {
    magic: u64,
    version: u32,
    stripes: u32,
    key: [u64; 2],
    _pad: [u64; 4],
}

/// A stripe's lock word and count, one cache line each so that stripes
/// locked by different cores do not share a line.
#[repr(C, align(64))]
struct Stripe {
    /// The holder's pid; 0 when free.
    lock: AtomicU32,
    /// Entries held; read and written under `lock` only (an atomic so that
    /// shared references to the stripe stay sound).
    len: AtomicU32,
}

/// One id's claim: 16 bytes (a connection's upgrade time is its shard's
/// to keep). `digest == 0` is an empty entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Entry {
    digest: u64,
    /// [`Location::pack`]ed.
    place: u64,
}

impl Entry {
    fn at(&self) -> Location {
        Location::unpack(self.place)
    }

    fn shard(&self) -> u32 {
        self.at().shard
    }
}

/// What a claim found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// No other connection held the id (or this one already did).
    Fresh,
    /// This connection now holds it; the one at this location held it
    /// and is to be told to close it.
    Displaced(Location),
    /// The id's stripe is full: the table was sized for fewer connections
    /// than are held (or the location is out of [`Location`]'s range,
    /// which a checked configuration never makes). The connection is
    /// served, unregistered.
    Full,
}

const HEADER: usize = std::mem::size_of::<Header>();
const STRIPE: usize = std::mem::size_of::<Stripe>();
const ENTRY: usize = std::mem::size_of::<Entry>();

/// The alignment a table's region needs (a stripe's lock is a cache line).
pub const ALIGN: usize = std::mem::align_of::<Stripe>();

/// Stripes for a server that holds up to `capacity` connections (with
/// slack: a full table probes long).
pub fn stripes_for(capacity: usize) -> usize {
    let slots = capacity.max(1).saturating_mul(SLACK.0) / SLACK.1;
    slots.div_ceil(PER_STRIPE).clamp(1, u32::MAX as usize)
}

/// Bytes of a table of `stripes` stripes.
pub fn bytes_for(stripes: usize) -> usize {
    HEADER + stripes * (STRIPE + PER_STRIPE * ENTRY)
}

/// A view of a table in memory its user owns (and keeps mapped while the
/// view exists): cheap to copy, shared by every thread of a process.
#[derive(Clone, Copy)]
pub struct Table {
    base: *mut u8,
    stripes: usize,
    key: [u64; 2],
    /// The lock word of this process: its pid.
    me: u32,
}

// SAFETY: the region is shared memory; every access to its entries is made
// under the stripe's lock word (an atomic), the header is written once
// before any view exists.
unsafe impl Send for Table {}
unsafe impl Sync for Table {}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Table({} stripes)", self.stripes)
    }
}

impl Table {
    /// Writes a new table's header with digest key `key` at `base`.
    ///
    /// # Safety
    /// `base` is [`ALIGN`]-aligned, writable for [`bytes_for`]`(stripes)`
    /// bytes, zeroed, and nothing else uses it yet.
    pub unsafe fn format(base: *mut u8, stripes: usize, key: [u64; 2]) {
        base.cast::<Header>().write(Header {
            magic: MAGIC,
            version: VERSION,
            stripes: stripes as u32,
            key,
            _pad: [0; 4],
        });
    }

    /// The table of `len` bytes at `base` (formatted by [`Table::format`],
    /// perhaps in another process), checking that it is one; `me` is the
    /// lock word this process takes stripes with (its pid, for
    /// [`Table::sweep`]).
    ///
    /// # Safety
    /// `base` is [`ALIGN`]-aligned and readable and writable for `len`
    /// bytes for as long as the table (or a copy) is used, and every other
    /// user of those bytes goes through a [`Table`].
    pub unsafe fn attach(base: *mut u8, len: usize, me: u32) -> Result<Table, &'static str> {
        if len < HEADER {
            return Err("not a registry table (too short)");
        }
        // At least HEADER bytes; written before shared.
        let h = &*base.cast::<Header>();
        let stripes = h.stripes as usize;
        if h.magic != MAGIC || h.version != VERSION || bytes_for(stripes) != len {
            return Err(
                "not a registry table of this version (a parent and worker of different builds?)",
            );
        }
        Ok(Table {
            base,
            stripes,
            key: h.key,
            me,
        })
    }

    /// Stripes of the table.
    pub fn stripes(&self) -> usize {
        self.stripes
    }

    /// Entries the table has room for in all (its bytes are 16 each).
    pub fn slots(&self) -> usize {
        self.stripes * PER_STRIPE
    }

    fn digest(&self, id: &DeviceId) -> u64 {
        // std's SipHash-1-3 with its fixed key, keyed here by the table's
        // random prefix (the same binary in every worker: the same digest).
        let mut h = std::collections::hash_map::DefaultHasher::new();
        h.write_u64(self.key[0]);
        h.write_u64(self.key[1]);
        h.write(id.as_str().as_bytes());
        h.finish().max(1)
    }

    fn stripe_of(&self, digest: u64) -> usize {
        (((digest >> 32) * self.stripes as u64) >> 32) as usize
    }

    /// Stripe `s`, locked until the guard drops.
    fn lock(&self, s: usize) -> Locked<'_> {
        let stripe = self.stripe(s);
        let me = self.me;
        let mut spins = 0u32;
        while stripe
            .lock
            .compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            // Held for tens of nanoseconds, unless its holder was
            // preempted (or died: the parent repairs that): then give the
            // CPU away rather than spin through a time slice.
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        Locked { reg: self, s }
    }

    fn stripe(&self, s: usize) -> &Stripe {
        // SAFETY: s < stripes; the stripe array follows the header.
        unsafe { &*self.base.add(HEADER + s * STRIPE).cast::<Stripe>() }
    }

    /// Makes `at` the connection that holds `id`.
    pub fn claim(&self, id: &DeviceId, at: Location) -> Claim {
        let Some(place) = at.pack() else {
            return Claim::Full;
        };
        let d = self.digest(id);
        let mut t = self.lock(self.stripe_of(d));
        match t.find(d) {
            Some(i) => {
                let held = t.entries()[i];
                if held.place == place {
                    return Claim::Fresh;
                }
                t.entries()[i].place = place;
                Claim::Displaced(held.at())
            }
            None if t.len() >= STRIPE_LIMIT => Claim::Full,
            None => {
                t.insert(Entry { digest: d, place });
                Claim::Fresh
            }
        }
    }

    /// Forgets `id` if `at` is the connection that holds it (a released
    /// claim that a newer one displaced leaves the newer alone).
    pub fn release(&self, id: &DeviceId, at: Location) {
        let Some(place) = at.pack() else { return };
        let d = self.digest(id);
        let mut t = self.lock(self.stripe_of(d));
        if let Some(i) = t.find(d) {
            if t.entries()[i].place == place {
                t.remove(i);
            }
        }
    }

    /// Where `id` (or, after a digest collision, the id it collided
    /// with: the holder checks) is connected.
    pub fn get(&self, id: &DeviceId) -> Option<Location> {
        let d = self.digest(id);
        let mut t = self.lock(self.stripe_of(d));
        t.find(d).map(|i| t.entries()[i].at())
    }

    /// Connections registered now (walks every stripe's count).
    pub fn len(&self) -> usize {
        (0..self.stripes).map(|s| self.lock(s).len() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A worker died: forget every entry on its shards `shards`, and
    /// repair any stripe it held locked when it died (`pid`; a stripe
    /// half-updated then is rebuilt from what it holds). For the `--procs`
    /// parent, before it restarts the worker.
    pub fn sweep(&self, pid: u32, shards: std::ops::Range<u32>) -> usize {
        let mut forgotten = 0;
        for s in 0..self.stripes {
            let stripe = self.stripe(s);
            // A dead holder never unlocks: take its lock over.
            let mut t = match stripe.lock.compare_exchange(
                pid,
                self.me,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => Locked { reg: self, s },
                Err(_) => self.lock(s),
            };
            forgotten += t.rebuild(|e| !shards.contains(&e.shard()));
        }
        forgotten
    }
}

/// A locked stripe: a plain linear-probing table.
struct Locked<'a> {
    reg: &'a Table,
    s: usize,
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        self.reg.stripe(self.s).lock.store(0, Ordering::Release);
    }
}

impl Locked<'_> {
    fn len(&self) -> u32 {
        self.reg.stripe(self.s).len.load(Ordering::Relaxed)
    }

    fn set_len(&mut self, n: u32) {
        self.reg.stripe(self.s).len.store(n, Ordering::Relaxed);
    }

    fn entries(&mut self) -> &mut [Entry] {
        let m = self.reg;
        let off = HEADER + m.stripes * STRIPE + self.s * PER_STRIPE * ENTRY;
        // SAFETY: the stripe's entries, inside the region, locked by us.
        unsafe { std::slice::from_raw_parts_mut(m.base.add(off).cast::<Entry>(), PER_STRIPE) }
    }
    fn find(&mut self, d: u64) -> Option<usize> {
        let e = self.entries();
        let mut i = home(d);
        loop {
            match e[i].digest {
                0 => return None,
                x if x == d => return Some(i),
                _ => i = (i + 1) & (PER_STRIPE - 1),
            }
        }
    }

    fn insert(&mut self, entry: Entry) {
        let n = self.len();
        let e = self.entries();
        let mut i = home(entry.digest);
        while e[i].digest != 0 {
            i = (i + 1) & (PER_STRIPE - 1);
        }
        e[i] = entry;
        self.set_len(n + 1);
    }

    /// Backward-shift deletion: later entries of the run move up into the
    /// hole when their home allows, so no tombstones and probes stay short.
    fn remove(&mut self, mut hole: usize) {
        let n = self.len();
        let e = self.entries();
        let mask = PER_STRIPE - 1;
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            if e[j].digest == 0 {
                break;
            }
            let h = home(e[j].digest);
            // Movable when its home is not in (hole, j] (cyclically).
            if (j.wrapping_sub(h) & mask) >= (j.wrapping_sub(hole) & mask) {
                e[hole] = e[j];
                hole = j;
            }
        }
        e[hole] = Entry::default();
        self.set_len(n - 1);
    }

    /// Keeps the entries `keep` says, once each (a holder that died in the
    /// middle of a move may have left one twice); returns how many went.
    fn rebuild(&mut self, keep: impl Fn(&Entry) -> bool) -> usize {
        let mut held: Vec<Entry> = self
            .entries()
            .iter()
            .filter(|e| e.digest != 0)
            .copied()
            .collect();
        let before = held.len();
        held.sort_by_key(|e| e.digest);
        held.dedup_by_key(|e| e.digest);
        held.retain(|e| keep(e));
        let gone = before - held.len();
        self.entries().fill(Entry::default());
        self.set_len(0);
        for e in held {
            self.insert(e);
        }
        gone
    }
}

fn home(d: u64) -> usize {
    d as usize & (PER_STRIPE - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table in zeroed heap memory, freed on drop (the server's is a
    /// shared mapping instead: the logic cannot tell).
    struct Heap {
        table: Table,
        base: *mut u8,
        layout: std::alloc::Layout,
    }

    impl Heap {
        fn new(capacity: usize) -> Heap {
            let stripes = stripes_for(capacity);
            let layout = std::alloc::Layout::from_size_align(bytes_for(stripes), ALIGN).unwrap();
            // SAFETY: a non-zero size; zeroed as a fresh memfd's pages are.
            let base = unsafe { std::alloc::alloc_zeroed(layout) };
            assert!(!base.is_null());
            // SAFETY: the region just allocated, aligned, zeroed, ours.
            let table = unsafe {
                Table::format(base, stripes, [0x0123_4567, 0x89ab_cdef]);
                Table::attach(base, layout.size(), std::process::id()).unwrap()
            };
            Heap {
                table,
                base,
                layout,
            }
        }
    }

    impl std::ops::Deref for Heap {
        type Target = Table;
        fn deref(&self) -> &Table {
            &self.table
        }
    }

    impl Drop for Heap {
        fn drop(&mut self) {
            // SAFETY: allocated in Heap::new with this layout.
            unsafe { std::alloc::dealloc(self.base, self.layout) };
        }
    }

    fn at(shard: u32, key: u32, gen: u32) -> Location {
        Location { shard, key, gen }
    }

    #[test]
    fn the_later_claim_wins_and_displaces_the_earlier() {
        let r = Heap::new(100);
        let id = DeviceId::new("aa:bb");
        assert_eq!(r.claim(&id, at(0, 1, 10)), Claim::Fresh);
        assert_eq!(r.claim(&id, at(0, 1, 10)), Claim::Fresh, "a claim again");
        assert_eq!(r.claim(&id, at(1, 7, 20)), Claim::Displaced(at(0, 1, 10)));
        assert_eq!(r.get(&id), Some(at(1, 7, 20)));
        // The displaced connection's release leaves the newer entry.
        r.release(&id, at(0, 1, 10));
        assert_eq!(r.get(&id), Some(at(1, 7, 20)));
        r.release(&id, at(1, 7, 20));
        assert_eq!(r.get(&id), None);
        assert!(r.is_empty());
    }

    /// Every byte of an entry is in every connection's budget.
    #[test]
    fn an_entry_is_16_bytes_and_a_stripe_a_cache_line() {
        assert_eq!(std::mem::size_of::<Entry>(), 16);
        assert_eq!(std::mem::size_of::<Stripe>(), 64);
        assert_eq!(std::mem::size_of::<Header>(), 64);
    }

    #[test]
    fn the_table_is_sized_for_its_capacity_with_slack() {
        let stripes = stripes_for(1_000_000);
        let slots = stripes * PER_STRIPE;
        assert!((1_333_333..1_333_333 + PER_STRIPE).contains(&slots));
        // 22 bytes per connection the server can hold, shared by all workers.
        assert!(
            bytes_for(stripes) / 1_000_000 <= 22,
            "{}",
            bytes_for(stripes)
        );
    }

    #[test]
    fn a_location_packs_to_the_bits_it_has_and_no_further() {
        let far = Location {
            shard: MAX_SHARDS as u32 - 1,
            key: MAX_KEYS as u32 - 1,
            gen: (1 << GEN_BITS) - 1,
        };
        assert_eq!(Location::unpack(far.pack().unwrap()), far);
        let near = at(3, 5, 7);
        assert_eq!(Location::unpack(near.pack().unwrap()), near);
        for beyond in [
            Location {
                shard: MAX_SHARDS as u32,
                ..near
            },
            Location {
                key: MAX_KEYS as u32,
                ..near
            },
            Location {
                gen: 1 << GEN_BITS,
                ..near
            },
        ] {
            assert_eq!(beyond.pack(), None);
        }
        let r = Heap::new(10);
        let id = DeviceId::new("aa:bb");
        let beyond = Location {
            key: MAX_KEYS as u32,
            ..near
        };
        assert_eq!(r.claim(&id, beyond), Claim::Full);
        r.release(&id, beyond);
        assert!(r.is_empty());
        // Generations wrap inside their bits and skip 0.
        assert_eq!(next_gen(1), 2);
        assert_eq!(next_gen((1 << GEN_BITS) - 1), 1);
        assert_eq!(next_gen(u32::MAX), 1);
    }

    #[test]
    fn a_region_that_is_not_a_table_is_refused() {
        let mut zeros = vec![0u64; 512];
        let base = zeros.as_mut_ptr().cast::<u8>();
        // SAFETY: 4 KiB of our own zeroed memory (8-aligned: only the
        // header is read, and it is refused).
        assert!(unsafe { Table::attach(base, 4096, 1) }.is_err());
        assert!(unsafe { Table::attach(base, 8, 1) }.is_err());
    }

    #[test]
    fn a_full_stripe_refuses_rather_than_probing_forever() {
        let r = Heap::new(1); // one stripe
        let mut full = 0;
        for i in 0..PER_STRIPE as u32 {
            let id = DeviceId::new(&format!("d{i}"));
            if r.claim(&id, at(0, i, 1)) == Claim::Full {
                full += 1;
            }
        }
        assert_eq!(r.len(), STRIPE_LIMIT as usize);
        assert_eq!(full, PER_STRIPE - STRIPE_LIMIT as usize);
    }

    #[test]
    fn a_dead_workers_entries_and_its_lock_are_swept() {
        let r = Heap::new(100);
        for i in 0..50u32 {
            let id = DeviceId::new(&format!("d{i}"));
            r.claim(&id, at(i % 5, i, 1));
        }
        // A worker (pid 4242) died holding stripe 0's lock.
        r.stripe(0).lock.store(4242, Ordering::Release);
        let gone = r.sweep(4242, 1..3);
        assert_eq!(gone, 20);
        assert_eq!(r.len(), 30);
        for i in 0..50u32 {
            let id = DeviceId::new(&format!("d{i}"));
            let held = r.get(&id).map(|a| a.shard);
            if (1..3).contains(&(i % 5)) {
                assert_eq!(held, None);
            } else {
                assert_eq!(held, Some(i % 5));
            }
        }
    }

    #[test]
    fn threads_claiming_and_releasing_at_once_leave_one_entry_per_live_id() {
        let heap = Heap::new(4096);
        let r = heap.table;
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                std::thread::spawn(move || {
                    let mut live = Vec::new();
                    for i in 0..20_000u32 {
                        let id = DeviceId::new(&format!("d{}", (i * 7 + t) % 3000));
                        let me = at(t, i, 1);
                        if r.claim(&id, me) != Claim::Full {
                            live.push((id, me));
                        }
                        if i % 3 == 0 {
                            if let Some((id, at)) = live.pop() {
                                r.release(&id, at);
                            }
                        }
                    }
                    live
                })
            })
            .collect();
        let live: Vec<_> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let mut held = std::collections::HashMap::new();
        for (id, at) in live {
            if r.get(&id) == Some(at) {
                held.insert(id, at);
            }
        }
        // Every entry names a connection some thread still thinks it
        // holds, and no id has two.
        let mut real = 0;
        for s in 0..r.stripes {
            real += r.lock(s).entries().iter().filter(|e| e.digest != 0).count();
        }
        assert_eq!((r.len(), real), (held.len(), held.len()));
    }

    mod stripe {
        use proptest::prelude::*;

        use super::super::*;
        use super::Heap;

        proptest! {
            /// One stripe's table behaves as a map under any sequence of
            /// inserts and removes, whatever the digests' homes (few
            /// distinct homes force long runs and wrap-around).
            #[test]
            fn a_stripe_is_a_map(ops in prop::collection::vec((0u64..40, 0u64..6, any::<bool>()), 1..400)) {
                let r = Heap::new(1);
                let mut model = std::collections::HashMap::new();
                let mut t = r.lock(0);
                for (n, homeish, add) in ops {
                    // digest: a small home (low bits) and a distinct tag.
                    let d = ((n + 1) << 32) | (homeish * 333 % PER_STRIPE as u64);
                    match (t.find(d), add) {
                        (None, true) => { t.insert(Entry { digest: d, place: n }); model.insert(d, n as u32); }
                        (Some(i), false) => { t.remove(i); model.remove(&d); }
                        _ => {}
                    }
                    prop_assert_eq!(t.len() as usize, model.len());
                    for (&d, &k) in &model {
                        let i = t.find(d);
                        prop_assert!(i.is_some(), "lost {:x}", d);
                        prop_assert_eq!(t.entries()[i.unwrap()].place, k as u64);
                    }
                }
            }
        }
    }

    mod protocol {
        use std::collections::VecDeque;

        use proptest::prelude::*;

        use super::super::*;
        use super::Heap;

        /// What shards tell each other about devices (the server's
        /// `Msg::Replaced`): a newer connection took this id from the
        /// connection at this location.
        #[derive(Debug, Clone)]
        struct Replaced {
            id: DeviceId,
            at: Location,
        }

        #[derive(Debug, Clone)]
        enum Op {
            /// A device with id `id` upgrades on shard `shard`.
            Connect { shard: usize, id: usize },
            /// The i-th connection ever made ends by itself (if still open).
            Close(usize),
            /// Shard `shard` handles the next message in its inbox.
            Deliver(usize),
        }

        fn op(shards: usize) -> impl Strategy<Value = Op> {
            prop_oneof![
                (0..shards, 0..3usize).prop_map(|(shard, id)| Op::Connect { shard, id }),
                (0..40usize).prop_map(Op::Close),
                (0..shards).prop_map(Op::Deliver),
            ]
        }

        struct Conn {
            id: DeviceId,
            at: Location,
            open: bool,
        }

        proptest! {
            /// Any interleaving of upgrades (claims), closes (releases) and
            /// deliveries of Replaced (each shard's inbox in order, the
            /// shards in any order) ends, once every message is handled,
            /// with at most one open connection per id, and the table's
            /// entry naming exactly it.
            #[test]
            fn every_race_ends_with_one_entry_per_live_id(
                shards in 1usize..4,
                ops in prop::collection::vec(op(3), 1..120),
            ) {
                let r = Heap::new(64);
                let mut inbox: Vec<VecDeque<Replaced>> = (0..shards).map(|_| VecDeque::new()).collect();
                let mut conns: Vec<Conn> = Vec::new();
                let ids: Vec<DeviceId> = ["a", "bb:cc", "02:00:5e:00:00:01"].iter().map(|s| DeviceId::new(s)).collect();
                let close = |conns: &mut Vec<Conn>, i: usize| {
                    if conns[i].open {
                        conns[i].open = false;
                        r.release(&conns[i].id, conns[i].at);
                    }
                };
                let deliver = |inbox: &mut Vec<VecDeque<Replaced>>, conns: &mut Vec<Conn>, shard: usize| {
                    if let Some(Replaced { id, at }) = inbox[shard].pop_front() {
                        if let Some(i) = conns.iter().position(|c| c.at == at && c.id == id) {
                            close(conns, i);
                        }
                    }
                };
                for (clock, op) in ops.into_iter().enumerate() {
                    match op {
                        Op::Connect { shard, id } => {
                            let shard = shard % shards;
                            let at = Location { shard: shard as u32, key: conns.len() as u32, gen: 1 + clock as u32 % 3 };
                            let id = ids[id].clone();
                            conns.push(Conn { id: id.clone(), at, open: true });
                            if let Claim::Displaced(old) = r.claim(&id, at) {
                                inbox[old.shard as usize].push_back(Replaced { id, at: old });
                            }
                        }
                        Op::Close(i) => {
                            if i < conns.len() {
                                close(&mut conns, i);
                            }
                        }
                        Op::Deliver(shard) => deliver(&mut inbox, &mut conns, shard % shards),
                    }
                }
                while inbox.iter().any(|q| !q.is_empty()) {
                    for shard in 0..shards {
                        deliver(&mut inbox, &mut conns, shard);
                    }
                }
                for id in &ids {
                    let open: Vec<Location> = conns.iter().filter(|c| c.open && &c.id == id).map(|c| c.at).collect();
                    prop_assert!(open.len() <= 1, "{} open connections for {id}", open.len());
                    prop_assert_eq!(r.get(id), open.first().copied(), "entry for {}", id);
                }
            }
        }
    }
}
