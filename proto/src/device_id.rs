//! A device's id, as the connection keeps it: 1 to 64 bytes of
//! `[0-9A-Za-z:._-]` (the handshake checked them). Ids of up to 23 bytes (a
//! MAC address is 17) are stored inline, with no allocation; longer ones
//! go to the heap. 24 bytes either way: the inline length is kept plus one
//! in a `NonZeroU8`, whose zero is the niche that marks the heap form.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::num::NonZeroU8;

const INLINE: usize = 23;

/// Its representation is private: inline bytes are UTF-8 because only
/// [`DeviceId::new`] makes them (see `as_str`).
#[derive(Clone)]
pub struct DeviceId(Repr);

#[derive(Clone)]
enum Repr {
    /// `len1` is the length plus one (1..=24).
    Inline {
        len1: NonZeroU8,
        bytes: [u8; INLINE],
    },
    Heap(Box<str>),
}

/// The inline form's length field for `len` bytes (`len <= INLINE`).
fn len1(len: usize) -> NonZeroU8 {
    debug_assert!(len <= INLINE);
    NonZeroU8::MIN.saturating_add(len as u8)
}

impl DeviceId {
    pub fn new(id: &str) -> DeviceId {
        if id.len() <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..id.len()].copy_from_slice(id.as_bytes());
            DeviceId(Repr::Inline {
                len1: len1(id.len()),
                bytes,
            })
        } else {
            DeviceId(Repr::Heap(id.into()))
        }
    }

    pub fn as_str(&self) -> &str {
        match &self.0 {
            // SAFETY: only ever built (in `new`) by copying a whole &str,
            // so these bytes are UTF-8. Checking again cost 160
            // instructions a call, four calls per connection (callgrind,
            // results/20261206T165501Z-budget-profile).
            Repr::Inline { len1, bytes } => unsafe {
                std::str::from_utf8_unchecked(&bytes[..len1.get() as usize - 1])
            },
            Repr::Heap(s) => s,
        }
    }
}

impl Default for DeviceId {
    fn default() -> DeviceId {
        DeviceId(Repr::Inline {
            len1: len1(0),
            bytes: [0; INLINE],
        })
    }
}

impl PartialEq for DeviceId {
    fn eq(&self, other: &DeviceId) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for DeviceId {}

impl Hash for DeviceId {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.as_str().hash(h)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_ids_are_inline_long_ones_on_the_heap_and_equal_by_text() {
        let mac = DeviceId::new("02:00:5e:00:00:01");
        assert!(matches!(mac.0, Repr::Inline { len1, .. } if len1.get() == 18));
        assert_eq!(mac.as_str(), "02:00:5e:00:00:01");
        let long = "x".repeat(64);
        let l = DeviceId::new(&long);
        assert!(matches!(l.0, Repr::Heap(_)));
        assert_eq!(l.as_str(), long);
        assert_eq!(
            DeviceId::new(&"a".repeat(23)),
            DeviceId::new(&"a".repeat(23))
        );
        assert_ne!(mac, l);
        assert_eq!(std::mem::size_of::<DeviceId>(), 24);
        assert_eq!(DeviceId::default().as_str(), "");
        assert_eq!(DeviceId::new(&"b".repeat(24)).as_str().len(), 24);
    }
}
