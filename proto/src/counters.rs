//! One table per set of counters: [`counter_table!`] turns one line per
//! field into the struct, its sum, its `key=value` words and their reader,
//! and a list of (key, description) the rest of the code walks (the stats
//! line's rates, the /metrics families, the client's summary).
//!
//! The struct is plain fields, as written by hand before: a hot path still
//! counts with `counters.frames += 1`, one add to a field, and nothing here
//! runs but where the counters are summed, printed or read back. It lives
//! in proto (no dependencies) because the server and the client both use it.

/// How two copies of a field (two shards', two cores') make one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// Added up (every counter).
    Sum,
    /// The larger kept (a last-seen value such as an HTTP status).
    Max,
}

/// What a table says of each field beyond its key: the table's owner
/// chooses the type (the server's says where it goes in the stats line and
/// /metrics); these are the parts this module needs.
pub trait Meta {
    fn merge(&self) -> Merge {
        Merge::Sum
    }
    /// [`counter_table!`]'s `read_words` fails without it (else: default).
    fn required(&self) -> bool {
        false
    }
}

/// A plain merge rule is a description enough (the client's).
impl Meta for Merge {
    fn merge(&self) -> Merge {
        *self
    }
}

/// A field's type: how it merges, how it reads and writes as the value of
/// a `key=value` word, and the count it stands for.
pub trait Field: Sized {
    fn merge(&mut self, other: &Self, how: Merge);
    /// Appends the value (no spaces: words are split on whitespace).
    fn write(&self, out: &mut String);
    /// Reads what [`Field::write`] wrote.
    fn read(text: &str) -> Option<Self>;
    /// The number it counts (for rates and samples).
    fn count(&self) -> u64;
}

impl Field for u64 {
    #[inline]
    fn merge(&mut self, other: &u64, how: Merge) {
        match how {
            Merge::Sum => *self += *other,
            Merge::Max => *self = (*self).max(*other),
        }
    }

    fn write(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = write!(out, "{self}");
    }

    fn read(text: &str) -> Option<u64> {
        text.parse().ok()
    }

    #[inline]
    fn count(&self) -> u64 {
        *self
    }
}

/// The value of the first word `key=value` of `text` that reads as an `F`.
pub fn find<F: Field>(text: &str, key: &str) -> Option<F> {
    text.split_whitespace()
        .find_map(|kv| F::read(kv.strip_prefix(key)?.strip_prefix('=')?))
}

/// Declares a struct of counters from one table:
///
/// ```ignore
/// counter_table! {
///     /// Docs and derives of the struct.
///     #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
///     pub struct Counters: Desc {
///         /// Docs of the field.
///         accepted: u64 = "accepted", Desc::...;
///         //  field  type   its key    its description (a const expression of type Desc)
///     }
/// }
/// ```
///
/// Each field's type implements [`Field`], `Desc` implements [`Meta`].
/// Every field is `pub`, in the table's order. Generated:
/// - `LEN` and `FIELDS: [(key, Desc); LEN]`, in the table's order;
/// - `add(&mut self, &Self)`: field by field, by [`Meta::merge`];
/// - `counts(&self) -> [u64; LEN]`: [`Field::count`] of each, in order;
/// - `write_words(&self, &mut String)`: `key=value` of every field, by
///   single spaces, in order;
/// - `read_words(&str) -> Option<Self>`: reads them back (any order, other
///   words skipped; a field missing or unreadable is its default, or None if
///   [`Meta::required`]);
/// - `set_word(&mut self, key, value) -> bool`: sets one field from its
///   word (false if no field has that key or the value does not read).
#[macro_export]
macro_rules! counter_table {
    (
        $(#[$attr:meta])*
        $vis:vis struct $name:ident : $desc:ty {
            $(
                $(#[$fattr:meta])*
                $field:ident : $ty:ty = $key:literal, $meta:expr;
            )*
        }
    ) => {
        $(#[$attr])*
        $vis struct $name {
            $(
                $(#[$fattr])*
                pub $field: $ty,
            )*
        }

        impl $name {
            /// How many fields the table has.
            pub const LEN: usize = [$($key),*].len();

            /// Every field's key and description, in the table's order.
            pub const FIELDS: [(&'static str, $desc); $name::LEN] = [$(($key, $meta)),*];

            /// Adds `o` field by field (or keeps the larger, as the table says).
            pub fn add(&mut self, o: &Self) {
                $(
                    $crate::counters::Field::merge(
                        &mut self.$field,
                        &o.$field,
                        $crate::counters::Meta::merge(&$meta),
                    );
                )*
            }

            /// What every field counts, in the table's order.
            pub fn counts(&self) -> [u64; $name::LEN] {
                [$($crate::counters::Field::count(&self.$field)),*]
            }

            /// `key=value` of every field, by single spaces.
            pub fn write_words(&self, out: &mut String) {
                let mut sep = "";
                $(
                    out.push_str(sep);
                    out.push_str($key);
                    out.push('=');
                    $crate::counters::Field::write(&self.$field, out);
                    sep = " ";
                )*
                let _ = sep;
            }

            /// Reads [`Self::write_words`] back from among other words:
            /// None if a required field is missing.
            pub fn read_words(text: &str) -> Option<Self> {
                Some($name {
                    $(
                        $field: match $crate::counters::find(text, $key) {
                            Some(v) => v,
                            None if $crate::counters::Meta::required(&$meta) => return None,
                            None => Default::default(),
                        },
                    )*
                })
            }

            /// Sets the field whose key is `key` from `value`; false if no
            /// field has it or `value` does not read.
            pub fn set_word(&mut self, key: &str, value: &str) -> bool {
                match key {
                    $(
                        $key => match $crate::counters::Field::read(value) {
                            Some(v) => {
                                self.$field = v;
                                true
                            }
                            None => false,
                        },
                    )*
                    _ => false,
                }
            }
        }
    };
}
