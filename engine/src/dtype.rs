//! Element types. f32 is the reference; bf16/f16 are storage formats with f32 accumulation.

use half::{bf16, f16};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DType {
    #[default]
    F32,
    BF16,
    F16,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// Rounds `x` through this type's storage format (identity for f32): the CPU twin of
    /// storing an activation in reduced precision.
    pub fn round_trip(self, x: f32) -> f32 {
        match self {
            DType::F32 => x,
            DType::BF16 => bf16::from_f32(x).to_f32(),
            DType::F16 => f16::from_f32(x).to_f32(),
        }
    }
}
