//! The device registry: one live connection per device id across all
//! shards and all `--procs` workers, in one table in shared memory.
//!
//! The table lives in a memfd mapped MAP_SHARED: a server of one process
//! makes it at start, a `--procs` parent makes it and every worker maps
//! the same descriptor. A shard that upgrades a device *claims* the id in
//! the table itself, before its 101 goes out ([`Registry::claim`]); when
//! the connection ends it *releases* it ([`Registry::release`]). Neither
//! sends a message: the only message left is [`Msg::Replaced`], to the
//! shard holding a connection that a newer claim displaced, which closes
//! it with 4000. Claims are ordered by the table (its stripe's lock), and
//! a claim is made before the device can see its 101, so a device's next
//! connection always claims after its previous one: the newer wins.
//!
//! The table's layout and algorithm are `c1m_proto::table` (sans-IO, with
//! its property tests); here is its memory: the memfd, its mapping, and
//! the descriptor a worker finds it at.
//!
//! Why a lock and not compare-and-swap on entries: an open-addressing table
//! whose entries are claimed by CAS cannot reuse a freed bucket for another
//! id without a 128-bit CAS and a subtle proof (a claimer of the same id
//! may be probing past it), and one that never reuses buckets fills with
//! every id ever seen. So the table is cut into stripes of
//! [`table::PER_STRIPE`] entries, each a plain linear-probing table (backward-shift
//! deletion) under its own lock word. A critical section is a probe of a
//! few entries: tens of nanoseconds, no system call, no allocation. The
//! lock word holds the holder's pid, so when a worker dies (even by
//! SIGKILL) holding one, the parent finds it by that pid and repairs the
//! stripe ([`Registry::sweep`]); a waiter meanwhile yields its CPU.
//!
//! Entries are keyed by a 64-bit digest of the id (SipHash-1-3 over a
//! random 128-bit key kept in the table's header, then the id): two ids
//! with one digest (about 1 in 3.7e7 for a million live ids; not to be
//! found on purpose without the key) share an entry. The newer claim holds
//! it, and its [`Msg::Replaced`] carries its own id, which the holder of
//! the older connection compares with its own before closing anything: a
//! collision costs the older device its lookups, never its connection.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use c1m_proto::device_id::DeviceId;
use c1m_proto::table::{self, Claim, Location, Table};

/// What shards tell each other about devices: only a displacement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// To the shard holding `at`: a newer connection took its id `id`;
    /// close it with 4000 "replaced" if it is that id's (see the digests
    /// above).
    Replaced { id: DeviceId, at: Location },
}

/// The owner shard of `id` among `shards`: FNV-1a, stable across processes
/// and builds. Operators' questions (lookup, push, kick) go to it; it
/// finds the holder in the table and forwards them there.
pub fn owner(id: &str, shards: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % shards.max(1) as u64) as usize
}

/// A handle to the shared table: cheap to clone, for every shard and
/// thread of the process.
#[derive(Clone)]
pub struct Registry {
    map: Arc<Mapping>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registry({} stripes)", self.map.table.stripes())
    }
}

struct Mapping {
    table: Table,
    base: *mut u8,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping is shared memory; every access to its entries is
// made by the table under the stripe's lock word (an atomic), the header
// is written once before the handle exists.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: base/len are the mapping this value made.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// The environment variable a `--procs` parent gives each worker: the
/// descriptor of the table's memfd.
pub const ENV: &str = "C1M_REGISTRY";

impl Registry {
    /// A new table for a server that holds up to `capacity` connections.
    pub fn create(capacity: usize) -> io::Result<Registry> {
        let stripes = table::stripes_for(capacity);
        let len = table::bytes_for(stripes);
        // SAFETY: a new anonymous file, owned from here on.
        let fd = unsafe { libc::memfd_create(c"c1m-registry".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sizing our own memfd; its pages are zero until touched.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut random = [0u8; 16];
        c1m_io::host::random_bytes(&mut random)?;
        let (k0, k1) = random.split_at(8);
        let key = [k0, k1].map(|k| u64::from_ne_bytes(k.try_into().unwrap_or_default()));
        let base = map(&fd, len)?;
        // SAFETY: a fresh mapping of `len` bytes (page-aligned, zero), nobody
        // else maps it yet; unmapped once the header is in.
        unsafe {
            Table::format(base, stripes, key);
            libc::munmap(base.cast(), len);
        }
        // Mapped again as every other process maps it, header checked.
        Registry::open(fd)
    }

    /// The table a `--procs` parent made, at descriptor `fd` (from
    /// [`ENV`]); None when this process is not such a worker.
    pub fn from_env() -> Result<Option<Registry>, String> {
        let Some(v) = std::env::var_os(ENV) else {
            return Ok(None);
        };
        let fd: RawFd = v.to_str().and_then(|s| s.parse().ok()).ok_or_else(|| {
            format!("{ENV} is not a descriptor ({v:?}); it is set by a --procs parent only")
        })?;
        // SAFETY: the parent put the table at this descriptor for this
        // process (dup2 before exec); nothing else here owns it.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(format!("{ENV} names descriptor {fd}, which is not open"));
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: FD_CLOEXEC on our own descriptor.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        Registry::open(fd)
            .map(Some)
            .map_err(|e| format!("cannot map the device registry the --procs parent made: {e}"))
    }

    /// Maps the table in `fd` (made by [`Registry::create`], perhaps in
    /// another process), checking that it is one.
    pub fn open(fd: OwnedFd) -> io::Result<Registry> {
        // SAFETY: fstat on a descriptor we own into a zeroed struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let len = st.st_size as usize;
        if len < table::bytes_for(0) {
            return Err(io::Error::other("not a registry table (too short)"));
        }
        let base = map(&fd, len)?;
        // SAFETY: `len` bytes mapped (page-aligned) until Mapping drops,
        // which outlives the table it holds; every process uses them
        // through a Table.
        match unsafe { Table::attach(base, len, std::process::id()) } {
            Ok(table) => Ok(Registry {
                map: Arc::new(Mapping {
                    table,
                    base,
                    len,
                    fd,
                }),
            }),
            Err(e) => {
                unsafe { libc::munmap(base.cast(), len) };
                Err(io::Error::other(e))
            }
        }
    }

    /// The table's descriptor, to hand to a worker.
    pub fn fd(&self) -> RawFd {
        self.map.fd.as_raw_fd()
    }

    /// Entries the table has room for in all (its bytes are 32 each).
    pub fn slots(&self) -> usize {
        self.map.table.slots()
    }

    /// Bytes of shared memory the table spans (touched as used).
    pub fn bytes(&self) -> usize {
        self.map.len
    }

    /// Makes `at` the connection that holds `id` ([`Table::claim`]).
    pub fn claim(&self, id: &DeviceId, at: Location) -> Claim {
        self.map.table.claim(id, at)
    }

    /// Forgets `id` if `at` is the connection that holds it
    /// ([`Table::release`]).
    pub fn release(&self, id: &DeviceId, at: Location) {
        self.map.table.release(id, at)
    }

    /// Where `id` is connected ([`Table::get`]).
    pub fn get(&self, id: &DeviceId) -> Option<Location> {
        self.map.table.get(id)
    }

    /// Connections registered now.
    pub fn len(&self) -> usize {
        self.map.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A worker died: forget every entry on its shards `shards`, and
    /// repair any stripe it held locked when it died (`pid`). For the
    /// `--procs` parent, before it restarts the worker ([`Table::sweep`]).
    pub fn sweep(&self, pid: u32, shards: std::ops::Range<u32>) -> usize {
        self.map.table.sweep(pid, shards)
    }
}

fn map(fd: &OwnedFd, len: usize) -> io::Result<*mut u8> {
    // SAFETY: a shared mapping of our own memfd, `len` bytes long.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p.cast())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(shard: u32, key: u32, gen: u32) -> Location {
        Location { shard, key, gen }
    }

    #[test]
    fn the_later_claim_wins_in_the_shared_mapping() {
        let r = Registry::create(100).unwrap();
        let id = DeviceId::new("aa:bb");
        assert_eq!(r.claim(&id, at(0, 1, 10)), Claim::Fresh);
        assert_eq!(r.claim(&id, at(1, 7, 20)), Claim::Displaced(at(0, 1, 10)));
        r.release(&id, at(0, 1, 10));
        assert_eq!(r.get(&id), Some(at(1, 7, 20)));
        r.release(&id, at(1, 7, 20));
        assert!(r.is_empty());
    }

    #[test]
    fn the_table_is_sized_for_its_capacity_with_slack() {
        let r = Registry::create(1_000_000).unwrap();
        assert!(r.slots() >= 1_333_333 && r.slots() < 1_333_333 + table::PER_STRIPE);
        // 22 bytes per connection the server can hold, shared by all workers.
        assert!(r.bytes() / 1_000_000 <= 22, "{}", r.bytes());
    }

    #[test]
    fn a_second_mapping_of_the_descriptor_sees_the_same_table() {
        let r = Registry::create(100).unwrap();
        let fd = r.map.fd.try_clone().unwrap();
        let other = Registry::open(fd).unwrap();
        let id = DeviceId::new("dev-1");
        assert_eq!(other.claim(&id, at(3, 4, 5)), Claim::Fresh);
        assert_eq!(r.get(&id), Some(at(3, 4, 5)));
        assert_eq!(r.claim(&id, at(0, 0, 6)), Claim::Displaced(at(3, 4, 5)));
        assert_eq!(other.get(&id), Some(at(0, 0, 6)));
    }

    #[test]
    fn a_descriptor_that_is_not_a_table_is_refused() {
        // SAFETY: a new memfd of ours.
        let fd = unsafe { libc::memfd_create(c"x".as_ptr(), libc::MFD_CLOEXEC) };
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        unsafe { libc::ftruncate(fd.as_raw_fd(), 4096) };
        assert!(Registry::open(fd).is_err());
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
}
