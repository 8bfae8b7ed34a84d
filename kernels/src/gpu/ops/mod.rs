//! Safe launch wrappers, one module per kernel family (`kernels/src/cu/<family>.cu`). Each
//! wrapper checks its buffers' sizes and the launch limits, then launches on the context's
//! stream; the arguments are pushed in exactly the order of the kernel's parameter list.
//! Buffers must hold *at least* the elements a launch touches (so a chunk buffer can be reused
//! for a shorter last chunk); the kernels touch nothing beyond that.

pub mod bucket_sort;
pub mod cached_attention;
pub mod elementwise;
pub mod embedding;
pub mod exact_attention;
pub mod layer_norm;
pub mod local_attention;
pub mod lsh_attention;
pub mod lsh_hash;
pub mod matmul;
pub mod reduce_adam;
pub mod rows;
pub mod softmax_xent;

use crate::error::KernelsError;
use crate::gpu::driver_error;

/// Maps a launch failure to an error naming the kernel.
pub(crate) fn launch_error(kernel: &'static str, e: cudarc::driver::DriverError) -> KernelsError {
    driver_error(&format!("launching {kernel}"), e)
}

use cudarc::driver::{LaunchArgs, PushKernelArg};

use crate::geometry::ATTN_MAX_D;
use crate::gpu::launch::{invalid, mul, need, to_i32, to_i64, MAX_GRID_YZ, NULL_DEVICE_PTR};
use crate::gpu::DeviceBuffer;

/// Dimensions of a `[heads, len, d]` attention input (`heads` may fold a batch in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnDims {
    pub heads: usize,
    pub len: usize,
    pub d: usize,
}

impl AttnDims {
    pub fn new(heads: usize, len: usize, d: usize) -> Self {
        Self { heads, len, d }
    }

    /// Elements of a `[heads, len, d]` tensor.
    pub fn numel(&self) -> usize {
        self.heads.saturating_mul(self.len).saturating_mul(self.d)
    }

    /// Rows (`heads · len`): the length of a logsumexp or delta buffer.
    pub fn rows(&self) -> usize {
        self.heads.saturating_mul(self.len)
    }

    /// What the attention kernels serve: non-empty, `d ≤ ATTN_MAX_D`, `heads ≤ 65535` (the
    /// grid's y), `len` a kernel `int`, `heads·len·d` a `long long`.
    pub fn check(&self, op: &'static str) -> Result<(), KernelsError> {
        if self.heads == 0 || self.len == 0 || self.d == 0 {
            return Err(invalid(op, format!("empty attention input {self:?}")));
        }
        if self.d > ATTN_MAX_D {
            return Err(invalid(
                op,
                format!("head size {} exceeds the kernels' {ATTN_MAX_D}", self.d),
            ));
        }
        if self.heads as u64 > MAX_GRID_YZ {
            return Err(invalid(
                op,
                format!("{} heads exceed the grid's 65535", self.heads),
            ));
        }
        to_i32(op, "len", self.len)?;
        to_i64(
            op,
            "heads·len·d",
            mul(op, mul(op, self.heads, self.len)?, self.d)?,
        )?;
        Ok(())
    }

    /// Checks that a `[heads, len, d]` buffer `what` holds the whole tensor.
    pub fn check_tensor(
        &self,
        op: &'static str,
        what: &str,
        len: usize,
    ) -> Result<(), KernelsError> {
        need(op, what, len, self.numel())
    }

    /// Checks that a `[heads, len]` buffer `what` holds every row.
    pub fn check_rows(&self, op: &'static str, what: &str, len: usize) -> Result<(), KernelsError> {
        need(op, what, len, self.rows())
    }

    /// `valid_per_head` of a key mask (`[len]` → 0, `[heads, len]` → 1; none → 0).
    pub fn mask_layout(&self, op: &'static str, mask: Option<usize>) -> Result<i32, KernelsError> {
        match mask {
            None => Ok(0),
            Some(m) => bucket_sort::mask_layout(op, m, self.heads, self.len),
        }
    }
}

/// Pushes a key mask (or a null pointer) and its `valid_per_head` flag.
pub(crate) fn push_mask<'a>(
    b: &mut LaunchArgs<'a>,
    mask: Option<&'a DeviceBuffer<u8>>,
    valid_per_head: &'a i32,
) {
    match mask {
        Some(m) => b.arg(m.cu()),
        None => b.arg(&NULL_DEVICE_PTR),
    };
    b.arg(valid_per_head);
}
