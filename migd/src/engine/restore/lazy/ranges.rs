//! Sets of address ranges, each range with the pages.img offset of its first byte.

use std::collections::BTreeMap;

/// Address ranges, each with the pages.img offset of its first byte.
#[derive(Debug, Clone, Default)]
pub(super) struct Ranges(pub(super) BTreeMap<u64, (u64, u64)>);

impl Ranges {
    pub(super) fn insert(&mut self, start: u64, end: u64, off: u64) {
        if start < end {
            self.0.insert(start, (end, off));
        }
    }

    /// The range holding `addr`: (start, end, offset).
    pub(super) fn find(&self, addr: u64) -> Option<(u64, u64, u64)> {
        let (&s, &(e, o)) = self.0.range(..=addr).next_back()?;
        (addr < e).then_some((s, e, o))
    }

    /// Removes `[start, end)`; returns the parts that were there.
    pub(super) fn cut(&mut self, start: u64, end: u64) -> Vec<(u64, u64, u64)> {
        let keys: Vec<u64> = self
            .0
            .range(..end)
            .rev()
            .take_while(|(_, &(e, _))| e > start)
            .map(|(&s, _)| s)
            .collect();
        let mut out = Vec::new();
        for s in keys.into_iter().rev() {
            let (e, o) = self.0.remove(&s).unwrap();
            let (a, b) = (s.max(start), e.min(end));
            self.insert(s, a, o);
            self.insert(b, e, o + (b - s));
            out.push((a, b, o + (a - s)));
        }
        out
    }

    /// The first range ending after `from`, else the first one.
    pub(super) fn next_from(&self, from: u64) -> Option<(u64, u64, u64)> {
        self.find(from)
            .or_else(|| self.0.range(from..).next().map(|(&s, &(e, o))| (s, e, o)))
            .or_else(|| self.0.iter().next().map(|(&s, &(e, o))| (s, e, o)))
    }

    pub(super) fn bytes(&self) -> u64 {
        self.0.iter().map(|(s, (e, _))| e - s).sum()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_splits_ranges_and_keeps_offsets() {
        let mut r = Ranges::default();
        r.insert(0x1000, 0x5000, 100);
        r.insert(0x8000, 0x9000, 900);
        let got = r.cut(0x2000, 0x8800);
        assert_eq!(
            got,
            vec![(0x2000, 0x5000, 100 + 0x1000), (0x8000, 0x8800, 900)]
        );
        assert_eq!(r.find(0x1fff), Some((0x1000, 0x2000, 100)));
        assert_eq!(r.find(0x2000), None);
        assert_eq!(r.find(0x8800), Some((0x8800, 0x9000, 900 + 0x800)));
        assert_eq!(r.bytes(), 0x1000 + 0x800);
        assert_eq!(r.next_from(0x3000), Some((0x8800, 0x9000, 900 + 0x800)));
        assert_eq!(r.next_from(0xa000), Some((0x1000, 0x2000, 100)));
    }
}
