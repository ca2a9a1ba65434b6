//! The device registry: one live connection per device id across all
//! shards. Sans-IO: a table and the messages shards exchange about it.
//!
//! Every id has an owner shard, [`owner`]: a hash of the id over all
//! shards. A shard that upgrades a device tells the id's owner
//! ([`Msg::Register`]); when the connection ends it says so
//! ([`Msg::Unregister`]). The owner keeps one [`Location`] per id. When two
//! connections claim one id, the newer upgrade wins (the older one is told
//! [`Msg::Replaced`] and closes with 4000), whatever order the messages
//! arrive in: shards send to each other in no common order, so "newer" is
//! the upgrade's time, not the message's. An unregister counts only for the
//! location it names, so a late one (close, reconnect, then the close's
//! message) never removes the newer entry. Every race thus ends with
//! exactly one entry per live id (the property tests drive random
//! interleavings).

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};

use crate::proto::device_id::DeviceId;

/// Where a connection lives: its shard (index over all shards), its slot
/// there and the slot's generation, and when it upgraded (monotonic
/// nanoseconds, comparable across the shards of a host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub shard: u32,
    pub key: u32,
    pub gen: u32,
    pub since: u64,
}

impl Location {
    /// Orders claims on one id: the later upgrade, ties broken by place.
    fn newer_than(&self, other: &Location) -> bool {
        (self.since, self.shard, self.key, self.gen)
            > (other.since, other.shard, other.key, other.gen)
    }

    /// The same connection (the upgrade time aside).
    fn same(&self, other: &Location) -> bool {
        (self.shard, self.key, self.gen) == (other.shard, other.key, other.gen)
    }
}

/// What shards tell each other about devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// To the id's owner: a connection upgraded with this id.
    Register { id: DeviceId, at: Location },
    /// To the id's owner: that connection ended.
    Unregister { id: DeviceId, at: Location },
    /// To the shard holding `at`: a newer connection took its id `id`;
    /// close it with 4000 "replaced" if it is that id's (see [`Table`]).
    Replaced { id: DeviceId, at: Location },
}

/// The owner shard of `id` among `shards`: FNV-1a, stable across processes
/// and builds (the std hasher is seeded per process).
pub fn owner(id: &str, shards: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % shards.max(1) as u64) as usize
}

/// One owner shard's part of the registry.
///
/// It keys each entry by a 64-bit digest of the id (SipHash-1-3 under a
/// random key of this table's), not by the id: 32 bytes an entry instead
/// of 56, the difference between 8 and 32 for the key. Two ids with one
/// digest (about 1 in 3.7e7 for a million live ids; not to be found on
/// purpose without the key) share an entry: the newer claim holds it, and
/// its [`Msg::Replaced`] carries its own id, which the holder of the older
/// connection compares with its own before closing anything. So a
/// collision costs the older device its lookups (`/devices`, pushes), never
/// its connection.
#[derive(Debug, Default)]
pub struct Table {
    map: HashMap<u64, Location, BuildHasherDefault<Digested>>,
    seed: RandomState,
    /// Tests: every id gets one digest, to exercise collisions.
    #[cfg(test)]
    collide: bool,
}

/// The map's hasher: its keys are digests already.
#[derive(Debug, Default)]
pub struct Digested(u64);

impl Hasher for Digested {
    fn write(&mut self, bytes: &[u8]) {
        // Not reached (keys are u64s, hashed by write_u64); kept total.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ b as u64;
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl Table {
    fn digest(&self, id: &DeviceId) -> u64 {
        #[cfg(test)]
        if self.collide {
            return 0;
        }
        self.seed.hash_one(id.as_str().as_bytes())
    }

    /// Records a claim on `id`; returns the location to tell
    /// [`Msg::Replaced`]: the older claim, which may be this one.
    pub fn register(&mut self, id: DeviceId, at: Location) -> Option<Location> {
        let key = self.digest(&id);
        match self.map.get_mut(&key) {
            None => {
                self.map.insert(key, at);
                None
            }
            Some(held) if held.same(&at) => None,
            Some(held) if at.newer_than(held) => Some(std::mem::replace(held, at)),
            Some(_) => Some(at),
        }
    }

    /// Forgets `id` if `at` is what the table holds for it.
    pub fn unregister(&mut self, id: &DeviceId, at: Location) {
        let key = self.digest(id);
        if self.map.get(&key).is_some_and(|held| held.same(&at)) {
            self.map.remove(&key);
        }
    }

    /// Forgets every entry on shards `shards` that upgraded before
    /// `before`: those shards restarted empty since.
    pub fn forget(&mut self, shards: std::ops::Range<u32>, before: u64) {
        self.map
            .retain(|_, at| !(shards.contains(&at.shard) && at.since < before));
    }

    /// Where `id` (or, after a digest collision, the id it collided
    /// with: the holder checks) is connected.
    pub fn get(&self, id: &DeviceId) -> Option<Location> {
        self.map.get(&self.digest(id)).copied()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(shard: u32, key: u32, since: u64) -> Location {
        Location {
            shard,
            key,
            gen: 1,
            since,
        }
    }

    #[test]
    fn the_newer_claim_wins_in_either_order() {
        let id = DeviceId::new("aa:bb");
        let mut t = Table::default();
        assert_eq!(t.register(id.clone(), at(0, 1, 10)), None);
        assert_eq!(t.register(id.clone(), at(1, 7, 20)), Some(at(0, 1, 10)));
        assert_eq!(t.get(&id), Some(at(1, 7, 20)));
        // The older claim's message arrives late: it is the one replaced.
        let mut t = Table::default();
        assert_eq!(t.register(id.clone(), at(1, 7, 20)), None);
        assert_eq!(t.register(id.clone(), at(0, 1, 10)), Some(at(0, 1, 10)));
        assert_eq!(t.get(&id), Some(at(1, 7, 20)));
    }

    #[test]
    fn a_late_unregister_leaves_the_newer_entry() {
        let id = DeviceId::new("dev");
        let mut t = Table::default();
        t.register(id.clone(), at(0, 1, 10));
        t.register(id.clone(), at(0, 2, 20));
        t.unregister(&id, at(0, 1, 10));
        assert_eq!(t.get(&id), Some(at(0, 2, 20)));
        t.unregister(&id, at(0, 2, 20));
        assert!(t.is_empty());
    }

    #[test]
    fn a_digest_collision_costs_the_older_device_its_lookups_not_its_connection() {
        let (a, b) = (DeviceId::new("aa"), DeviceId::new("bb"));
        let mut t = Table {
            collide: true,
            ..Table::default()
        };
        assert_eq!(t.register(a.clone(), at(0, 1, 10)), None);
        // b's claim takes the shared entry; the Replaced for a's location
        // carries b's id, which a's holder finds is not its device's.
        assert_eq!(t.register(b.clone(), at(1, 2, 20)), Some(at(0, 1, 10)));
        assert_eq!(t.get(&b), Some(at(1, 2, 20)));
        // a's unregister names a's connection: b's entry stays.
        t.unregister(&a, at(0, 1, 10));
        assert_eq!(t.get(&b), Some(at(1, 2, 20)));
    }

    #[test]
    fn an_entry_is_32_bytes() {
        assert_eq!(std::mem::size_of::<(u64, Location)>(), 32);
    }

    #[test]
    fn owners_spread_and_are_stable() {
        assert_eq!(owner("02:00:5e:00:00:01", 1), 0);
        let mut seen = [0usize; 4];
        for i in 0..4000 {
            seen[owner(&format!("02:00:5e:00:{:02x}:{:02x}", i / 256, i % 256), 4)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
        assert_eq!(owner("abc", 7), owner("abc", 7));
    }

    mod protocol {
        use std::collections::VecDeque;

        use proptest::prelude::*;

        use super::super::*;

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

        struct World {
            shards: usize,
            inbox: Vec<VecDeque<Msg>>,
            tables: Vec<Table>,
            conns: Vec<Conn>,
        }

        impl World {
            fn close(&mut self, i: usize) {
                if !self.conns[i].open {
                    return;
                }
                self.conns[i].open = false;
                let (id, at) = (self.conns[i].id.clone(), self.conns[i].at);
                let to = owner(id.as_str(), self.shards);
                self.inbox[to].push_back(Msg::Unregister { id, at });
            }

            fn deliver(&mut self, shard: usize) {
                match self.inbox[shard].pop_front() {
                    None => {}
                    Some(Msg::Register { id, at }) => {
                        if let Some(old) = self.tables[shard].register(id.clone(), at) {
                            self.inbox[old.shard as usize].push_back(Msg::Replaced { id, at: old });
                        }
                    }
                    Some(Msg::Unregister { id, at }) => self.tables[shard].unregister(&id, at),
                    Some(Msg::Replaced { id, at }) => {
                        // The holder closes it if that slot still holds it.
                        if let Some(i) = self.conns.iter().position(|c| c.at == at && c.id == id) {
                            self.close(i);
                        }
                    }
                }
            }
        }

        proptest! {
            /// Any interleaving of upgrades, closes and deliveries (each
            /// shard's inbox in order, the shards in any order) ends, once
            /// every message is handled, with at most one open connection
            /// per id, and the owner's entry naming exactly it.
            #[test]
            fn every_race_ends_with_one_entry_per_live_id(
                shards in 1usize..4,
                ops in prop::collection::vec(op(3), 1..120),
            ) {
                let mut w = World {
                    shards,
                    inbox: (0..shards).map(|_| VecDeque::new()).collect(),
                    tables: (0..shards).map(|_| Table::default()).collect(),
                    conns: Vec::new(),
                };
                let ids: Vec<DeviceId> = ["a", "bb:cc", "02:00:5e:00:00:01"].iter().map(|s| DeviceId::new(s)).collect();
                for (clock, op) in ops.into_iter().enumerate() {
                    match op {
                        Op::Connect { shard, id } => {
                            let shard = shard % shards;
                            let at = Location { shard: shard as u32, key: w.conns.len() as u32, gen: 1, since: clock as u64 };
                            let id = ids[id].clone();
                            w.conns.push(Conn { id: id.clone(), at, open: true });
                            let to = owner(id.as_str(), shards);
                            w.inbox[to].push_back(Msg::Register { id, at });
                        }
                        Op::Close(i) => {
                            if i < w.conns.len() {
                                w.close(i);
                            }
                        }
                        Op::Deliver(shard) => w.deliver(shard % shards),
                    }
                }
                while w.inbox.iter().any(|q| !q.is_empty()) {
                    for shard in 0..shards {
                        w.deliver(shard);
                    }
                }
                for id in &ids {
                    let open: Vec<Location> = w.conns.iter().filter(|c| c.open && &c.id == id).map(|c| c.at).collect();
                    prop_assert!(open.len() <= 1, "{} open connections for {id}", open.len());
                    let held = w.tables[owner(id.as_str(), shards)].get(id);
                    prop_assert_eq!(held, open.first().copied(), "entry for {}", id);
                }
            }
        }
    }
}
