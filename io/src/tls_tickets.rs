//! One TLS session-ticket key for every process of a server, rotated by a
//! hash ratchet.
//!
//! A device that reconnects resumes its TLS session (an AEAD open of its
//! ticket instead of a full handshake's X25519 and certificate signature)
//! only if the process its connection lands on can open the ticket. rustls'
//! own ticketer draws a random key per process, so under `--procs` a
//! reconnect that lands on another worker (the kernel's SO_REUSEPORT hash
//! of a new source port picks one) does a full handshake, and so does every
//! reconnect after a hot upgrade. Here the processes share the key:
//!
//! - time is cut into epochs of [`PERIOD`] (6 hours, as rustls rotates);
//!   each epoch has a 32-byte secret, and the next epoch's is derived from
//!   it (HKDF-SHA256), never the other way: a process holds the secrets of
//!   the current and the previous epoch only, and the older ones cannot be
//!   computed from them (forward secrecy for tickets of past epochs);
//! - a ticket is sealed (AES-256-GCM, a random nonce) with the current
//!   epoch's key, names its epoch, and opens during that epoch and the
//!   next: it lives 6 to 12 hours;
//! - the `--procs` parent draws the first secret, ratchets it as time goes,
//!   and hands the current state to each worker it starts (a restart's, a
//!   hot upgrade's new worker's) through a pipe; a single process hands its
//!   state to the new binary of a hot upgrade the same way. Each process
//!   then ratchets on its own clock: the same state and the same epoch give
//!   every process the same key, with no message between them.
//!
//! [`TicketKeys`] is the ratchet (plain data); [`Ticketer`] is rustls'
//! `ProducesTickets` over it, shared by a process's shards.

use std::fmt;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

/// How long an epoch lasts: a new key every 6 hours, as rustls' own
/// ticketer rotates.
pub const PERIOD: Duration = Duration::from_secs(6 * 60 * 60);

/// The variable a process finds its parent's ticket state in: the number
/// of the descriptor (a pipe's read end) to read it from.
pub const ENV: &str = "C1M_TLS_TICKETS";

/// The descriptor a `--procs` worker finds the pipe at.
pub const FD: RawFd = 7;

/// Bytes of a ticket before its ciphertext: its epoch (big-endian, also the
/// AEAD's additional data) and the nonce.
const HEAD: usize = 8 + NONCE_LEN;

/// The longest ticket opened: a session's state is a few hundred bytes
/// (no client certificates here); anything longer is refused before it is
/// copied.
const MAX_TICKET: usize = 4096;

/// Bytes of [`TicketKeys::to_bytes`]: epoch, current secret, whether a
/// previous one follows, previous secret.
pub const STATE_LEN: usize = 8 + 32 + 1 + 32;

/// A 32-byte secret, overwritten with zeros when dropped.
#[derive(Clone, PartialEq, Eq)]
struct Secret([u8; 32]);

impl Drop for Secret {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: a write to a byte we own; volatile so that the
            // compiler keeps the erasure of memory about to be freed.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

impl Secret {
    /// HKDF-SHA256 of this secret, with `info`: 32 bytes.
    fn derive(&self, info: &'static [u8]) -> Secret {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"c1m tls tickets").extract(&self.0);
        let mut out = Secret([0; 32]);
        // Cannot fail: 32 bytes is HKDF-SHA256's output length, far below
        // its limit of 255 blocks.
        prk.expand(&[info], hkdf::HKDF_SHA256)
            .and_then(|okm| okm.fill(&mut out.0))
            .expect("32 bytes of HKDF-SHA256");
        out
    }

    /// The AEAD key this epoch's tickets are sealed with.
    fn sealing_key(&self) -> LessSafeKey {
        let k = self.derive(b"aead key");
        // Cannot fail: 32 bytes is AES-256's key length.
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &k.0).expect("a 32-byte AES-256 key"))
    }
}

/// The ratchet: the current epoch's secret and the previous one's.
#[derive(Clone, PartialEq, Eq)]
pub struct TicketKeys {
    epoch: u64,
    current: Secret,
    previous: Option<Secret>,
}

impl fmt::Debug for TicketKeys {
    // Never the secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TicketKeys")
            .field("epoch", &self.epoch)
            .field("previous", &self.previous.is_some())
            .finish_non_exhaustive()
    }
}

/// The epoch `unix_secs` falls in.
pub fn epoch_at(unix_secs: u64) -> u64 {
    unix_secs / PERIOD.as_secs()
}

/// Seconds since the Unix epoch, by the wall clock (the same for every
/// process of the host; 0 if the clock is before 1970).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl TicketKeys {
    /// A ratchet at `epoch` from `secret`, with no previous epoch.
    pub fn new(epoch: u64, secret: [u8; 32]) -> TicketKeys {
        TicketKeys {
            epoch,
            current: Secret(secret),
            previous: None,
        }
    }

    /// A new ratchet at `epoch` from the kernel's random bytes.
    pub fn random(epoch: u64) -> std::io::Result<TicketKeys> {
        let mut secret = Secret([0; 32]);
        crate::host::random_bytes(&mut secret.0)?;
        Ok(TicketKeys::new(epoch, secret.0))
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Moves on to `epoch`, one derivation per epoch passed, erasing the
    /// secrets left behind; an earlier `epoch` (the clock set back) changes
    /// nothing: the ratchet never goes back. True if it moved.
    pub fn advance_to(&mut self, epoch: u64) -> bool {
        if epoch <= self.epoch {
            return false;
        }
        // A clock far ahead would take a derivation per epoch; two are
        // enough to know the last two (the rest are erased unseen), but
        // both processes must take the same path to agree, so every step
        // is taken: 1,460 a year of clock jump, a microsecond each.
        while self.epoch < epoch {
            let next = self.current.derive(b"next epoch");
            self.previous = Some(std::mem::replace(&mut self.current, next));
            self.epoch += 1;
        }
        true
    }

    /// The state, for a process that is to share it ([`TicketKeys::from_bytes`]).
    pub fn to_bytes(&self) -> [u8; STATE_LEN] {
        let mut out = [0u8; STATE_LEN];
        out[..8].copy_from_slice(&self.epoch.to_be_bytes());
        out[8..40].copy_from_slice(&self.current.0);
        if let Some(p) = &self.previous {
            out[40] = 1;
            out[41..].copy_from_slice(&p.0);
        }
        out
    }

    pub fn from_bytes(b: &[u8; STATE_LEN]) -> Result<TicketKeys, String> {
        let secret = |at: usize| {
            let mut s = Secret([0; 32]);
            s.0.copy_from_slice(&b[at..at + 32]);
            s
        };
        let previous = match b[40] {
            0 => None,
            1 => Some(secret(41)),
            other => return Err(format!("a TLS ticket state with previous-key flag {other}")),
        };
        Ok(TicketKeys {
            epoch: u64::from_be_bytes(b[..8].try_into().expect("8 bytes")),
            current: secret(8),
            previous,
        })
    }
}

/// The keys in use: the ratchet and the AEAD keys derived from it.
struct Live {
    keys: TicketKeys,
    current: LessSafeKey,
    previous: Option<LessSafeKey>,
}

impl Live {
    fn new(keys: TicketKeys) -> Live {
        Live {
            current: keys.current.sealing_key(),
            previous: keys.previous.as_ref().map(Secret::sealing_key),
            keys,
        }
    }
}

/// rustls' `ProducesTickets` over a [`TicketKeys`], shared by a process's
/// shards: a read lock per ticket (uncontended but for the write once per
/// epoch, as rustls' own rotator), the wall clock's epoch checked at each.
pub struct Ticketer {
    live: RwLock<Live>,
    clock: Box<dyn Fn() -> u64 + Send + Sync>,
    random: SystemRandom,
}

impl fmt::Debug for Ticketer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticketer").finish_non_exhaustive()
    }
}

impl Ticketer {
    /// Over `keys`, with epochs from `clock` (Unix seconds).
    pub fn with_clock(
        keys: TicketKeys,
        clock: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> Arc<Ticketer> {
        let t = Ticketer {
            live: RwLock::new(Live::new(keys)),
            clock: Box::new(clock),
            random: SystemRandom::new(),
        };
        t.advance();
        Arc::new(t)
    }

    /// Over `keys`, on the wall clock.
    pub fn new(keys: TicketKeys) -> Arc<Ticketer> {
        Ticketer::with_clock(keys, unix_now)
    }

    /// Over a new random state of its own (no other process shares it), on
    /// the wall clock: for tests and tools.
    pub fn random() -> Result<Arc<Ticketer>, String> {
        TicketKeys::random(epoch_at(unix_now()))
            .map(Ticketer::new)
            .map_err(|e| format!("cannot draw a TLS session-ticket key: {e}"))
    }

    /// This process's: the state its parent handed it ([`ENV`]), else a new
    /// random one; the wall clock's epochs; a thread that moves the ratchet
    /// at each epoch's start so that no secret outlives its epoch by more
    /// than one, tickets or not. The error is one sentence.
    pub fn inherited_or_new() -> Result<Arc<Ticketer>, String> {
        let keys = match std::env::var_os(ENV) {
            Some(v) => read_inherited(&v)?,
            None => TicketKeys::random(epoch_at(unix_now()))
                .map_err(|e| format!("cannot draw a TLS session-ticket key: {e}"))?,
        };
        let t = Ticketer::new(keys);
        let weak = Arc::downgrade(&t);
        std::thread::Builder::new()
            .name("tls-tickets".into())
            .spawn(move || loop {
                let now = unix_now();
                let next = (epoch_at(now) + 1) * PERIOD.as_secs();
                std::thread::sleep(Duration::from_secs(next.saturating_sub(now).max(1)));
                match weak.upgrade() {
                    Some(t) => t.advance(),
                    None => return,
                }
            })
            .map_err(|e| format!("cannot start the TLS ticket key thread: {e}"))?;
        Ok(t)
    }

    /// Moves the ratchet to the clock's epoch (if it has passed).
    pub fn advance(&self) {
        let epoch = epoch_at((self.clock)());
        if self.read().keys.epoch >= epoch {
            return;
        }
        let mut live = self.live.write().unwrap_or_else(|p| p.into_inner());
        let mut keys = live.keys.clone();
        if keys.advance_to(epoch) {
            *live = Live::new(keys);
        }
    }

    /// The state, at the clock's epoch: what a process to share it is given.
    pub fn state(&self) -> TicketKeys {
        self.advance();
        self.read().keys.clone()
    }

    /// A pipe holding [`Ticketer::state`], its read end returned
    /// (close-on-exec: the caller places it in the child it starts).
    pub fn to_pipe(&self) -> std::io::Result<OwnedFd> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills both descriptors, owned from here on.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // Far under a pipe's capacity: the write does not block.
        std::fs::File::from(write).write_all(&self.state().to_bytes())?;
        Ok(read)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Live> {
        // A panic while holding the lock left whole keys: a Live is
        // replaced in one assignment.
        self.live.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// Reads the state from the descriptor `v` names and closes it.
fn read_inherited(v: &std::ffi::OsStr) -> Result<TicketKeys, String> {
    let fd: RawFd = v.to_str().and_then(|s| s.parse().ok()).ok_or_else(|| {
        format!("{ENV} is not a descriptor ({v:?}); it is set by a --procs parent or a hot upgrade only")
    })?;
    // SAFETY: F_GETFD only asks whether the descriptor is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("{ENV} names descriptor {fd}, which is not open"));
    }
    // SAFETY: the parent left this pipe's read end to this process alone;
    // nothing else here owns it, and it is closed once read.
    let mut pipe = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut b = [0u8; STATE_LEN];
    pipe.read_exact(&mut b).map_err(|e| {
        format!(
            "cannot read the TLS ticket keys from descriptor {} ({e}); the parent process must have failed while starting this one",
            pipe.as_raw_fd()
        )
    })?;
    TicketKeys::from_bytes(&b)
}

impl rustls::server::ProducesTickets for Ticketer {
    fn enabled(&self) -> bool {
        true
    }

    /// The shortest a ticket lives (issued at its epoch's end).
    fn lifetime(&self) -> u32 {
        PERIOD.as_secs() as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.advance();
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).ok()?;
        let live = self.read();
        let epoch = live.keys.epoch.to_be_bytes();
        let mut out = Vec::with_capacity(HEAD + plain.len() + AES_256_GCM.tag_len());
        out.extend_from_slice(&epoch);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = live
            .current
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(epoch),
                &mut out[HEAD..],
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() > MAX_TICKET || ticket.len() < HEAD + AES_256_GCM.tag_len() {
            return None;
        }
        self.advance();
        let epoch: [u8; 8] = ticket[..8].try_into().ok()?;
        let nonce = Nonce::try_assume_unique_for_key(&ticket[8..HEAD]).ok()?;
        let live = self.read();
        let key = match live.keys.epoch.checked_sub(u64::from_be_bytes(epoch))? {
            0 => &live.current,
            1 => live.previous.as_ref()?,
            _ => return None,
        };
        let mut out = ticket[HEAD..].to_vec();
        let len = key
            .open_in_place(nonce, Aad::from(epoch), &mut out)
            .ok()?
            .len();
        out.truncate(len);
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;
    use std::sync::atomic::{AtomicU64, Ordering};

    const P: u64 = 6 * 60 * 60;

    /// A ticketer over `keys` and a clock the test sets.
    fn at(keys: &TicketKeys, secs: u64) -> (Arc<Ticketer>, Arc<AtomicU64>) {
        let clock = Arc::new(AtomicU64::new(secs));
        let c = clock.clone();
        (
            Ticketer::with_clock(keys.clone(), move || c.load(Ordering::Relaxed)),
            clock,
        )
    }

    fn keys() -> TicketKeys {
        TicketKeys::new(100, [7; 32])
    }

    #[test]
    fn a_ticket_opens_in_its_epoch_and_the_next_and_never_after() {
        let (t, clock) = at(&keys(), 100 * P + 5);
        let ticket = t.encrypt(b"session state").unwrap();
        assert_eq!(t.decrypt(&ticket).unwrap(), b"session state");
        clock.store(101 * P, Ordering::Relaxed);
        assert_eq!(t.decrypt(&ticket).unwrap(), b"session state");
        clock.store(102 * P, Ordering::Relaxed);
        assert_eq!(t.decrypt(&ticket), None);
        // And the ratchet never goes back: the clock set back opens nothing
        // older.
        clock.store(100 * P, Ordering::Relaxed);
        assert_eq!(t.decrypt(&ticket), None);
        assert_eq!(t.state().epoch(), 102);
    }

    #[test]
    fn processes_with_the_same_state_open_each_others_tickets_across_epochs() {
        // The parent hands its state at epoch 100; each process then
        // ratchets on its own (one ticks through 101, the other jumps).
        let (a, ca) = at(&keys(), 100 * P);
        let (b, cb) = at(
            &TicketKeys::from_bytes(&a.state().to_bytes()).unwrap(),
            100 * P,
        );
        let t = a.encrypt(b"x").unwrap();
        assert_eq!(b.decrypt(&t).unwrap(), b"x");
        ca.store(101 * P, Ordering::Relaxed);
        ca.store(102 * P + 1, Ordering::Relaxed);
        let _ = a.encrypt(b"tick").unwrap();
        cb.store(102 * P + 9, Ordering::Relaxed);
        let t = a.encrypt(b"later").unwrap();
        assert_eq!(b.decrypt(&t).unwrap(), b"later");
        let t = b.encrypt(b"back").unwrap();
        assert_eq!(a.decrypt(&t).unwrap(), b"back");
        assert_eq!(a.state(), b.state());
    }

    #[test]
    fn another_secret_a_tampered_ticket_or_a_wrong_epoch_opens_nothing() {
        let (a, _) = at(&keys(), 100 * P);
        let (other, _) = at(&TicketKeys::new(100, [8; 32]), 100 * P);
        let t = a.encrypt(b"state").unwrap();
        assert_eq!(other.decrypt(&t), None);
        for i in 0..t.len() {
            let mut bad = t.clone();
            bad[i] ^= 1;
            assert_eq!(a.decrypt(&bad), None, "byte {i} flipped");
        }
        assert_eq!(a.decrypt(&t[..t.len() - 1]), None);
        assert_eq!(a.decrypt(&[]), None);
        assert_eq!(a.decrypt(&vec![0; MAX_TICKET + 1]), None);
        // A ticket naming a later epoch than ours.
        let (ahead, _) = at(&keys(), 101 * P);
        assert_eq!(a.decrypt(&ahead.encrypt(b"s").unwrap()), None);
    }

    #[test]
    fn the_ratchet_derives_forward_only_and_erases_what_it_leaves() {
        let mut k = keys();
        let start = k.clone();
        assert!(!k.advance_to(99));
        assert!(k.advance_to(103));
        assert_eq!(k.epoch(), 103);
        // One step at a time or all at once: the same keys.
        let mut stepped = start.clone();
        for e in 101..=103 {
            stepped.advance_to(e);
        }
        assert_eq!(stepped, k);
        // Neither the start's secret nor any before 102 is kept.
        let kept = [Some(&k.current), k.previous.as_ref()];
        let mut walk = start.clone();
        for _ in 0..2 {
            assert!(!kept.contains(&Some(&walk.current)));
            walk.advance_to(walk.epoch() + 1);
        }
        assert_eq!(TicketKeys::from_bytes(&k.to_bytes()).unwrap(), k);
        assert_eq!(TicketKeys::from_bytes(&start.to_bytes()).unwrap(), start);
        let mut bad = k.to_bytes();
        bad[40] = 2;
        assert!(TicketKeys::from_bytes(&bad).is_err());
    }

    #[test]
    fn the_pipe_carries_the_state() {
        let (t, _) = at(&keys(), 100 * P);
        let fd = t.to_pipe().unwrap();
        let mut b = [0u8; STATE_LEN];
        std::fs::File::from(fd).read_exact(&mut b).unwrap();
        assert_eq!(TicketKeys::from_bytes(&b).unwrap(), t.state());
    }
}
