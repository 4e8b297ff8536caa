//! A run-length-encoded bitmap of pages: what `Resume` carries (the pages the destination
//! already has).
//!
//! The bitmap is a sequence of run lengths that alternate between clear and set bits, starting
//! with clear: `[3, 2, 1]` is `000 11 0`. Only the first run may be empty (a bitmap starting
//! with a set bit); every other run is at least one bit long, so each bitmap has exactly one
//! encoding. On the wire each run is an unsigned LEB128 varint (1–10 bytes), at most 10 bytes
//! per run, no overlong forms.

/// Errors decoding a run-length-encoded bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    /// The bytes end inside a run.
    #[error("bitmap truncated inside run {0}")]
    Truncated(usize),
    /// A varint is longer than needed or does not fit in 64 bits.
    #[error("bitmap run {0} is overlong or exceeds 64 bits")]
    Overlong(usize),
    /// A run other than the first is empty.
    #[error("bitmap run {0} is empty")]
    EmptyRun(usize),
    /// The runs add up to more bits than allowed.
    #[error("bitmap is longer than the {limit} pages allowed")]
    TooLong {
        /// The largest length allowed.
        limit: u64,
    },
}

impl BitmapError {
    /// Always bad input from the peer: these bytes will never decode.
    pub fn is_bad_input(&self) -> bool {
        true
    }
}

/// A run-length-encoded bitmap (see the module documentation).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RleBitmap {
    /// Run lengths, alternately clear and set, starting with clear. Invariant: no empty run
    /// other than the first, and the sum fits in a u64.
    runs: Vec<u64>,
    len: u64,
}

/// The longest encoding of one run.
pub const MAX_VARINT_LEN: usize = 10;

impl RleBitmap {
    /// An empty bitmap (zero bits).
    pub fn new() -> RleBitmap {
        RleBitmap::default()
    }

    /// The bitmap of these bits, in order.
    pub fn from_bits(bits: impl IntoIterator<Item = bool>) -> RleBitmap {
        let mut b = RleBitmap::new();
        for bit in bits {
            b.push(bit, 1);
        }
        b
    }

    /// Appends `count` bits of value `set`. Returns `false` (and changes nothing) when the
    /// length would exceed `u64::MAX`.
    pub fn push(&mut self, set: bool, count: u64) -> bool {
        if count == 0 {
            return true;
        }
        let Some(len) = self.len.checked_add(count) else {
            return false;
        };
        // The value of the last run: even index = clear, odd = set.
        let last_set = self.runs.len().is_multiple_of(2);
        match self.runs.last_mut() {
            Some(last) if last_set == set => *last += count,
            _ => {
                if self.runs.is_empty() && set {
                    self.runs.push(0);
                }
                self.runs.push(count);
            }
        }
        self.len = len;
        true
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// No bits at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of set bits.
    pub fn count_set(&self) -> u64 {
        self.runs.iter().skip(1).step_by(2).sum()
    }

    /// The runs as `(first bit, length, set)`, empty runs left out.
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64, bool)> + '_ {
        let mut at = 0u64;
        self.runs
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(move |(i, &n)| {
                let start = at;
                at += n;
                (start, n, i % 2 == 1)
            })
            .collect::<Vec<_>>()
            .into_iter()
    }

    /// The ranges `[first, first + count)` of set bits.
    pub fn set_ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs().filter(|r| r.2).map(|(s, n, _)| (s, n))
    }

    /// Whether bit `i` is set (`false` past the end).
    pub fn get(&self, i: u64) -> bool {
        self.runs().any(|(s, n, set)| set && i >= s && i - s < n)
    }

    /// Number of runs on the wire (including an empty first run).
    pub fn run_count(&self) -> usize {
        self.runs.len()
    }

    /// Bytes [`RleBitmap::encode`] appends.
    pub fn encoded_len(&self) -> usize {
        self.runs.iter().map(|&n| varint_len(n)).sum()
    }

    /// Appends the runs as LEB128 varints.
    pub fn encode(&self, out: &mut Vec<u8>) {
        for &n in &self.runs {
            put_varint(out, n);
        }
    }

    /// Decodes exactly `run_count` runs from the start of `bytes`, refusing a bitmap longer
    /// than `limit` bits. Returns the bitmap and the bytes consumed.
    pub fn decode(
        bytes: &[u8],
        run_count: usize,
        limit: u64,
    ) -> Result<(RleBitmap, usize), BitmapError> {
        // Each run takes at least one byte: a count beyond the bytes is truncated input, and
        // checking it first keeps the allocation bounded by the input.
        if run_count > bytes.len() {
            return Err(BitmapError::Truncated(bytes.len()));
        }
        let mut runs = Vec::with_capacity(run_count);
        let mut at = 0;
        let mut len = 0u64;
        for i in 0..run_count {
            let (n, used) = get_varint(&bytes[at..], i)?;
            at += used;
            if n == 0 && i > 0 {
                return Err(BitmapError::EmptyRun(i));
            }
            len = match len.checked_add(n) {
                Some(l) if l <= limit => l,
                _ => return Err(BitmapError::TooLong { limit }),
            };
            runs.push(n);
        }
        if runs.len() == 1 && runs[0] == 0 {
            // `[0]` alone is not canonical: the empty bitmap has no runs.
            return Err(BitmapError::EmptyRun(0));
        }
        Ok((RleBitmap { runs, len }, at))
    }
}

fn varint_len(mut n: u64) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// One LEB128 varint; `run` names it in errors.
fn get_varint(bytes: &[u8], run: usize) -> Result<(u64, usize), BitmapError> {
    let mut n = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(MAX_VARINT_LEN) {
        let bits = u64::from(b & 0x7f);
        // The tenth byte may carry only the 64th bit.
        if i == MAX_VARINT_LEN - 1 && bits > 1 {
            return Err(BitmapError::Overlong(run));
        }
        n |= bits << (7 * i);
        if b & 0x80 == 0 {
            // A last byte of zero after others is an overlong form.
            if i > 0 && b == 0 {
                return Err(BitmapError::Overlong(run));
            }
            return Ok((n, i + 1));
        }
    }
    if bytes.len() >= MAX_VARINT_LEN {
        Err(BitmapError::Overlong(run))
    } else {
        Err(BitmapError::Truncated(run))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_alternate_from_clear() {
        let b = RleBitmap::from_bits([true, true, false, true]);
        assert_eq!(b.runs, vec![0, 2, 1, 1]);
        assert_eq!(b.len(), 4);
        assert_eq!(b.count_set(), 3);
        assert!(b.get(0) && b.get(1) && !b.get(2) && b.get(3) && !b.get(4));
        assert_eq!(b.set_ranges().collect::<Vec<_>>(), vec![(0, 2), (3, 1)]);
    }

    #[test]
    fn round_trip_and_limit() {
        let mut b = RleBitmap::new();
        b.push(false, 300);
        b.push(true, 1 << 40);
        let mut out = Vec::new();
        b.encode(&mut out);
        assert_eq!(out.len(), b.encoded_len());
        let (d, used) = RleBitmap::decode(&out, b.run_count(), b.len()).unwrap();
        assert_eq!((d, used), (b.clone(), out.len()));
        assert_eq!(
            RleBitmap::decode(&out, b.run_count(), b.len() - 1),
            Err(BitmapError::TooLong { limit: b.len() - 1 })
        );
    }

    #[test]
    fn non_canonical_forms_are_refused() {
        // An empty run after the first.
        assert_eq!(
            RleBitmap::decode(&[1, 0], 2, 10),
            Err(BitmapError::EmptyRun(1))
        );
        // Overlong zero.
        assert_eq!(
            RleBitmap::decode(&[0x81, 0x00], 1, 10),
            Err(BitmapError::Overlong(0))
        );
        // More than 64 bits.
        let mut past = vec![0xff; 9];
        past.push(0x02);
        assert_eq!(
            RleBitmap::decode(&past, 1, u64::MAX),
            Err(BitmapError::Overlong(0))
        );
        assert_eq!(
            RleBitmap::decode(&[0x80], 1, 10),
            Err(BitmapError::Truncated(0))
        );
        assert_eq!(
            RleBitmap::decode(&[0], 1, 10),
            Err(BitmapError::EmptyRun(0))
        );
    }

    #[test]
    fn sum_overflow_is_too_long() {
        let mut out = Vec::new();
        put_varint(&mut out, u64::MAX);
        put_varint(&mut out, 1);
        assert_eq!(
            RleBitmap::decode(&out, 2, u64::MAX),
            Err(BitmapError::TooLong { limit: u64::MAX })
        );
    }
}
