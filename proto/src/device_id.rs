//! A device's id, as the connection keeps it: 1 to 64 bytes of
//! `[0-9A-Za-z:._-]` (the handshake checked them). Ids of up to 23 bytes (a
//! MAC address is 17) are stored inline, with no allocation; longer ones
//! go to the heap. 32 bytes either way.

use std::fmt;
use std::hash::{Hash, Hasher};

const INLINE: usize = 23;

/// Its representation is private: inline bytes are UTF-8 because only
/// [`DeviceId::new`] makes them (see `as_str`).
#[derive(Clone)]
pub struct DeviceId(Repr);

#[derive(Clone)]
enum Repr {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<str>),
}

impl DeviceId {
    pub fn new(id: &str) -> DeviceId {
        if id.len() <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..id.len()].copy_from_slice(id.as_bytes());
            DeviceId(Repr::Inline {
                len: id.len() as u8,
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
            Repr::Inline { len, bytes } => unsafe {
                std::str::from_utf8_unchecked(&bytes[..*len as usize])
            },
            Repr::Heap(s) => s,
        }
    }
}

impl Default for DeviceId {
    fn default() -> DeviceId {
        DeviceId(Repr::Inline {
            len: 0,
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
        assert!(matches!(mac.0, Repr::Inline { len: 17, .. }));
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
        assert_eq!(std::mem::size_of::<DeviceId>(), 32);
    }
}
