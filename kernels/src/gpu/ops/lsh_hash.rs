//! `lsh_hash.cu`: angular LSH, `h_r(x) = argmax([x R_r ; −x R_r])`, factorised as
//! `h = h1 + b1·h2` when `b2 > 1`.

use cudarc::driver::PushKernelArg;

use crate::error::KernelsError;
use crate::gpu::launch::{grid, invalid, mul, need, to_i32, to_i64, ROW_WARPS};
use crate::gpu::ops::launch_error;
use crate::gpu::{ActElem, DeviceBuffer, GpuContext};
use crate::sources::{names::lsh_hash as k, KernelFamily};

const FAMILY: KernelFamily = KernelFamily::LshHash;

/// What one hashing launch hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashDims {
    pub heads: usize,
    /// Positions per head.
    pub len: usize,
    pub d: usize,
    pub n_rounds: usize,
    /// Buckets of the first factor (1 or even).
    pub b1: usize,
    /// Buckets of the second factor (1: not factorised; else even).
    pub b2: usize,
    /// Elements between heads' rotations (0: every head shares them).
    pub rot_head_stride: usize,
}

impl HashDims {
    /// Rotation columns per round: `b1/2 + b2/2` (no second factor when `b2 = 1`).
    pub fn rotation_cols(&self) -> usize {
        rotation_cols(self.b1, self.b2)
    }

    /// Total buckets `b1·b2`.
    pub fn n_buckets(&self) -> usize {
        self.b1.saturating_mul(self.b2)
    }

    /// Elements the rotations buffer must hold.
    pub fn rotations_len(&self) -> Result<usize, KernelsError> {
        const OP: &str = "lsh_hash";
        let per_head = mul(OP, mul(OP, self.n_rounds, self.d)?, self.rotation_cols())?;
        let last = mul(OP, self.heads.saturating_sub(1), self.rot_head_stride)?;
        last.checked_add(per_head)
            .ok_or_else(|| invalid(OP, "rotation extent overflows"))
    }

    /// Checks the hashing configuration and the buffers' sizes.
    pub fn check(&self, x: usize, rot: usize, buckets: usize) -> Result<(), KernelsError> {
        const OP: &str = "lsh_hash";
        check_buckets(OP, self.b1, self.b2)?;
        if self.d == 0 || self.n_rounds == 0 || self.heads == 0 {
            return Err(invalid(OP, format!("empty hashing problem {self:?}")));
        }
        need(OP, "x", x, mul(OP, mul(OP, self.heads, self.len)?, self.d)?)?;
        need(OP, "rotations", rot, self.rotations_len()?)?;
        need(
            OP,
            "buckets",
            buckets,
            mul(OP, mul(OP, self.heads, self.n_rounds)?, self.len)?,
        )?;
        for (what, v) in [
            ("len", self.len),
            ("d", self.d),
            ("n_rounds", self.n_rounds),
            ("b1", self.b1),
            ("b2", self.b2),
        ] {
            to_i32(OP, what, v)?;
        }
        to_i64(OP, "rot_head_stride", self.rot_head_stride)?;
        Ok(())
    }
}

/// Rotation columns per round for `b1 × b2` buckets.
pub fn rotation_cols(b1: usize, b2: usize) -> usize {
    b1 / 2 + if b2 > 1 { b2 / 2 } else { 0 }
}

/// Each factor is 1 or even, and the total fits a `u32` key with room for the padding key.
pub fn check_buckets(op: &'static str, b1: usize, b2: usize) -> Result<(), KernelsError> {
    for b in [b1, b2] {
        if b == 0 || (b > 1 && b % 2 != 0) {
            return Err(invalid(
                op,
                format!("bucket factors must be 1 or even, got {b1} × {b2}"),
            ));
        }
    }
    match b1.checked_mul(b2) {
        Some(t) if t < (u32::MAX / 2) as usize => Ok(()),
        _ => Err(invalid(op, format!("too many buckets: {b1} × {b2}"))),
    }
}

/// Buckets `[heads, n_rounds, len]` of the rows `x` `[heads, len, d]` (f32 or bf16, widened on
/// load; the projections are f32 sums either way) under rotations `[n_rounds, d, cols]` per head
/// (head `h` at `h·rot_head_stride`).
pub fn hash<T: ActElem>(
    ctx: &GpuContext,
    x: &DeviceBuffer<T>,
    rot: &DeviceBuffer<f32>,
    buckets: &mut DeviceBuffer<u32>,
    dims: HashDims,
) -> Result<(), KernelsError> {
    const OP: &str = "lsh_hash";
    dims.check(x.len(), rot.len(), buckets.len())?;
    if dims.len == 0 {
        return Ok(());
    }
    let cfg = grid(
        OP,
        dims.len.div_ceil(ROW_WARPS as usize) as u64,
        dims.heads as u64,
        (32, ROW_WARPS, 1),
    )?;
    let (heads, n, d) = (dims.heads as i32, dims.len as i32, dims.d as i32);
    let (rounds, b1, b2) = (dims.n_rounds as i32, dims.b1 as i32, dims.b2 as i32);
    let stride = dims.rot_head_stride as i64;
    let x_bf16 = i32::from(T::IS_BF16);
    let f = ctx.function(FAMILY, k::HASH)?;
    let mut b = ctx.stream().launch_builder(&f);
    b.arg(x.cu()).arg(rot.cu()).arg(buckets.cu_mut());
    b.arg(&heads)
        .arg(&n)
        .arg(&d)
        .arg(&rounds)
        .arg(&b1)
        .arg(&b2)
        .arg(&stride)
        .arg(&x_bf16);
    // SAFETY: lsh_hash(const void* x, const float* rot, unsigned* buckets, int heads, int n, int d,
    // int rounds, int b1, int b2, long long stride, int x_bf16), grid (ceil(n / W), heads): x is a
    // T buffer (bf16 exactly when x_bf16 = 1, else f32); x, rotations and buckets hold the
    // elements dims.check asks for.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(k::HASH, e))?;
    Ok(())
}
