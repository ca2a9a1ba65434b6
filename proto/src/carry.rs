//! The bytes of one unit (an upgrade head, a frame, a TLS record) that
//! straddles two reads, for the connection state machine, the TLS session
//! and the client's devices alike. Empty, it is one word and owns no
//! buffer: an idle connection keeps nothing between reads.

/// Bytes kept from one read for the next; never an empty allocation.
/// Boxed on purpose: 8 bytes where a bare Vec is 24 in every idle
/// connection's slot.
#[derive(Debug, Default)]
#[allow(clippy::box_collection)]
pub struct Carry(Option<Box<Vec<u8>>>);

impl Carry {
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |c| c.len())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// Drops the carried bytes (and their buffer).
    pub fn clear(&mut self) {
        self.0 = None;
    }

    /// The carried bytes (empty when none).
    pub fn as_slice(&self) -> &[u8] {
        self.0.as_deref().map_or(&[], |c| c.as_slice())
    }

    /// The carried bytes (empty when none).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().map_or(&mut [], |c| c.as_mut_slice())
    }

    /// Appends `data` to the carried bytes.
    pub fn push(&mut self, data: &[u8]) {
        if !data.is_empty() {
            self.0
                .get_or_insert_with(Box::default)
                .extend_from_slice(data);
        }
    }

    /// Takes the carried bytes out, leaving none.
    pub fn take(&mut self) -> Vec<u8> {
        self.0.take().map_or_else(Vec::new, |c| *c)
    }

    /// Runs `consume` over the carried bytes followed by `data` (over
    /// `data` in place, copying nothing, when none are carried); it says
    /// how many bytes it used, and the rest is carried to the next read.
    /// On an error nothing is carried.
    #[inline]
    pub fn consume<E>(
        &mut self,
        data: &mut [u8],
        consume: impl FnOnce(&mut [u8]) -> Result<usize, E>,
    ) -> Result<(), E> {
        match self.0.take() {
            None => {
                let used = consume(data)?;
                if used < data.len() {
                    self.0 = Some(Box::new(data[used..].to_vec()));
                }
            }
            Some(mut carry) => {
                carry.extend_from_slice(data);
                let used = consume(&mut carry)?;
                if used < carry.len() {
                    carry.drain(..used);
                    self.0 = Some(carry);
                } // else dropped: nothing is kept between reads
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_what_was_not_used_and_nothing_when_all_was() {
        let mut c = Carry::default();
        // Two bytes of a three-byte unit: carried.
        c.consume(&mut [1, 2], |b| Ok::<_, ()>(b.len() / 3 * 3))
            .unwrap();
        assert_eq!(c.as_mut_slice(), &[1, 2]);
        // The third, and one of the next unit: the first unit is used.
        let mut seen = Vec::new();
        c.consume(&mut [3, 4], |b| {
            seen = b.to_vec();
            Ok::<_, ()>(3)
        })
        .unwrap();
        assert_eq!((seen, c.len()), (vec![1, 2, 3, 4], 1));
        c.consume(&mut [5, 6], |b| Ok::<_, ()>(b.len())).unwrap();
        assert!(c.is_empty(), "all used: no buffer kept");
        c.push(&[7]);
        assert_eq!(c.consume(&mut [8], |_| Err("bad")), Err("bad"));
        assert!(c.is_empty(), "an error keeps nothing");
        c.push(&[]);
        assert!(c.is_empty(), "never an empty allocation");
    }
}
