//! Element types, their sizes, and their numbers in the C ABI.

use crate::error::{Error, Result};

/// Keep the stored dtype (in a tier), so a zeroed placement means "the stored dtype".
pub const STRATA_DTYPE_SOURCE: u32 = 0;
pub const STRATA_DTYPE_F32: u32 = 1;
pub const STRATA_DTYPE_F16: u32 = 2;
pub const STRATA_DTYPE_BF16: u32 = 3;
/// fp8 with 4 exponent and 3 mantissa bits, no infinities (max 448): safetensors' `F8_E4M3`.
pub const STRATA_DTYPE_F8_E4M3FN: u32 = 4;
/// fp8 with 5 exponent and 2 mantissa bits (max 57344).
pub const STRATA_DTYPE_F8_E5M2: u32 = 5;
pub const STRATA_DTYPE_F64: u32 = 6;
pub const STRATA_DTYPE_I64: u32 = 7;
pub const STRATA_DTYPE_I32: u32 = 8;
pub const STRATA_DTYPE_I16: u32 = 9;
pub const STRATA_DTYPE_I8: u32 = 10;
pub const STRATA_DTYPE_U8: u32 = 11;
pub const STRATA_DTYPE_BOOL: u32 = 12;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    F8E4M3,
    F8E5M2,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

/// Every dtype in ABI order: `ALL[i]` has ABI number `i + 1`.
pub(crate) const ALL: [DType; 12] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::F8E4M3,
    DType::F8E5M2,
    DType::F64,
    DType::I64,
    DType::I32,
    DType::I16,
    DType::I8,
    DType::U8,
    DType::Bool,
];

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::F8E4M3 | DType::F8E5M2 | DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// The floating-point dtypes, in ABI order: they convert among themselves.
    pub fn floats() -> &'static [DType] {
        &ALL[..6]
    }

    /// Floating-point dtypes convert among themselves; the others only pass through.
    pub fn is_float(self) -> bool {
        matches!(
            self,
            DType::F32 | DType::F16 | DType::BF16 | DType::F8E4M3 | DType::F8E5M2 | DType::F64
        )
    }

    pub fn is_fp8(self) -> bool {
        matches!(self, DType::F8E4M3 | DType::F8E5M2)
    }

    /// The ABI number (`STRATA_DTYPE_*`).
    pub fn to_abi(self) -> u32 {
        ALL.iter().position(|&d| d == self).unwrap() as u32 + 1
    }

    /// Reads an ABI number: `Ok(None)` for `STRATA_DTYPE_SOURCE`.
    pub fn from_abi(value: u32) -> Result<Option<DType>> {
        if value == STRATA_DTYPE_SOURCE {
            return Ok(None);
        }
        ALL.get(value as usize - 1)
            .copied()
            .map(Some)
            .ok_or_else(|| Error::invalid(format!("unknown dtype {value}")))
    }

    /// Like `from_abi`, but `SOURCE` is not allowed (a tensor's own dtype).
    pub fn from_abi_concrete(value: u32) -> Result<DType> {
        DType::from_abi(value)?
            .ok_or_else(|| Error::invalid("a tensor's dtype cannot be STRATA_DTYPE_SOURCE"))
    }

    /// The name safetensors uses in its headers.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
            DType::F64 => "F64",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
        }
    }

    /// Maps a safetensors dtype; the ones strata does not handle are `UNSUPPORTED`.
    pub fn from_safetensors(dtype: safetensors::Dtype) -> Result<DType> {
        use safetensors::Dtype as S;
        Ok(match dtype {
            S::F32 => DType::F32,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::F8_E4M3 => DType::F8E4M3,
            S::F8_E5M2 => DType::F8E5M2,
            S::F64 => DType::F64,
            S::I64 => DType::I64,
            S::I32 => DType::I32,
            S::I16 => DType::I16,
            S::I8 => DType::I8,
            S::U8 => DType::U8,
            S::BOOL => DType::Bool,
            other => {
                return Err(Error::unsupported(format!(
                    "dtype {other:?} is not supported"
                )))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_numbers_match_the_header_constants() {
        assert_eq!(DType::F32.to_abi(), STRATA_DTYPE_F32);
        assert_eq!(DType::BF16.to_abi(), STRATA_DTYPE_BF16);
        assert_eq!(DType::F8E4M3.to_abi(), STRATA_DTYPE_F8_E4M3FN);
        assert_eq!(DType::F8E5M2.to_abi(), STRATA_DTYPE_F8_E5M2);
        assert_eq!(DType::F64.to_abi(), STRATA_DTYPE_F64);
        assert_eq!(DType::Bool.to_abi(), STRATA_DTYPE_BOOL);
    }

    #[test]
    fn floats_are_exactly_the_float_dtypes() {
        let floats: Vec<DType> = ALL.iter().copied().filter(|d| d.is_float()).collect();
        assert_eq!(DType::floats(), floats.as_slice());
    }

    #[test]
    fn abi_numbers_round_trip() {
        for d in ALL {
            assert_eq!(DType::from_abi(d.to_abi()).unwrap(), Some(d));
        }
        assert_eq!(DType::from_abi(STRATA_DTYPE_SOURCE).unwrap(), None);
        assert!(DType::from_abi(13).is_err());
        assert!(DType::from_abi(u32::MAX).is_err());
    }
}
