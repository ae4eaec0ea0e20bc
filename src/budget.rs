//! Exact byte accounting on the compute device against `vram_limit`.

use crate::trace::{MemorySamples, Stamp};

/// A limit meaning "no limit" (`vram_limit`, `host_limit`).
pub(crate) const UNLIMITED: u64 = u64::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Unlimited,
    /// `vram_limit == 0`: nothing stays resident between uses; layers in use are always allowed.
    Minimal,
    Bytes(u64),
}

impl Limit {
    pub fn from_abi(vram_limit: u64) -> Limit {
        match vram_limit {
            UNLIMITED => Limit::Unlimited,
            0 => Limit::Minimal,
            n => Limit::Bytes(n),
        }
    }

    pub fn to_abi(self) -> u64 {
        match self {
            Limit::Unlimited => UNLIMITED,
            Limit::Minimal => 0,
            Limit::Bytes(n) => n,
        }
    }
}

/// As messages show a limit: "unlimited", "0 (nothing resident)", or the bytes.
impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limit::Unlimited => f.write_str("unlimited"),
            Limit::Minimal => f.write_str("0 (nothing resident)"),
            Limit::Bytes(n) => write!(f, "{n} bytes"),
        }
    }
}

#[derive(Debug)]
pub struct Budget {
    pub limit: Limit,
    in_use: u64,
    peak: u64,
    overcommit_peak: u64,
    /// `in_use` after each change, for the timeline's device-memory track.
    samples: MemorySamples,
}

impl Budget {
    pub fn new(limit: Limit) -> Budget {
        Budget {
            limit,
            in_use: 0,
            peak: 0,
            overcommit_peak: 0,
            samples: MemorySamples::default(),
        }
    }

    /// Whether `bytes` more can be held without passing a hard cap.
    pub fn fits(&self, bytes: u64) -> bool {
        match self.limit {
            Limit::Unlimited | Limit::Minimal => true,
            Limit::Bytes(cap) => self.in_use.saturating_add(bytes) <= cap,
        }
    }

    /// Whether `bytes` alone is more than a hard cap allows: the one case allowed to overcommit.
    pub fn exceeds_cap_alone(&self, bytes: u64) -> bool {
        matches!(self.limit, Limit::Bytes(cap) if bytes > cap)
    }

    /// Records `bytes` as held. Callers check `fits` first; holding more is overcommit, recorded.
    pub fn charge(&mut self, bytes: u64) {
        self.in_use += bytes;
        self.peak = self.peak.max(self.in_use);
        if let Limit::Bytes(cap) = self.limit {
            self.overcommit_peak = self.overcommit_peak.max(self.in_use.saturating_sub(cap));
        }
        self.samples.record(Stamp::now(), self.in_use);
    }

    /// Whether more is held than may stay between uses: above a hard cap, or anything under `0`.
    pub fn over_cap(&self) -> bool {
        match self.limit {
            Limit::Unlimited => false,
            Limit::Minimal => self.in_use > 0,
            Limit::Bytes(cap) => self.in_use > cap,
        }
    }

    pub fn refund(&mut self, bytes: u64) {
        debug_assert!(bytes <= self.in_use, "refund of bytes never charged");
        self.in_use -= bytes.min(self.in_use);
        self.samples.record(Stamp::now(), self.in_use);
    }

    /// The bytes held over time.
    pub fn samples(&self) -> &MemorySamples {
        &self.samples
    }

    pub fn in_use(&self) -> u64 {
        self.in_use
    }

    pub fn peak(&self) -> u64 {
        self.peak
    }

    pub fn overcommit_peak(&self) -> u64 {
        self.overcommit_peak
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_cap_counts_exactly_and_records_overcommit() {
        let mut budget = Budget::new(Limit::from_abi(100));
        assert!(budget.fits(100));
        budget.charge(60);
        assert!(budget.fits(40));
        assert!(!budget.fits(41));
        assert!(budget.exceeds_cap_alone(101));
        assert!(!budget.over_cap());
        budget.limit = Limit::from_abi(50);
        assert!(budget.over_cap());
        budget.limit = Limit::from_abi(100);
        budget.refund(60);
        budget.charge(130);
        assert_eq!(budget.overcommit_peak(), 30);
        assert_eq!(budget.peak(), 130);
        budget.refund(130);
        assert_eq!(budget.in_use(), 0);
    }

    #[test]
    fn zero_and_unlimited_never_refuse() {
        for limit in [0, UNLIMITED] {
            let mut budget = Budget::new(Limit::from_abi(limit));
            budget.charge(1 << 40);
            assert_eq!(budget.over_cap(), limit == 0);
            assert!(budget.fits(u64::MAX / 2));
            assert!(!budget.exceeds_cap_alone(u64::MAX));
            assert_eq!(budget.overcommit_peak(), 0);
        }
    }
}
