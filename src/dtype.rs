//! Element types and their sizes (their numbers in the C ABI are in `ffi::consts`).

use crate::error::{Error, Result};

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

/// Every dtype, floats first (in the order of their ABI numbers).
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
    pub(crate) fn from_safetensors(dtype: safetensors::Dtype) -> Result<DType> {
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
    fn floats_are_exactly_the_float_dtypes() {
        let floats: Vec<DType> = ALL.iter().copied().filter(|d| d.is_float()).collect();
        assert_eq!(DType::floats(), floats.as_slice());
    }
}
