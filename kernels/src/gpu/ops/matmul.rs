//! Dense matrix products through cuBLAS, with the semantics of `reformer_engine::matmul::gemm`:
//! `c[m×n] = (accumulate ? c : 0) + op(a)[m×k] · op(b)[k×n]`, all row-major, `op(a)` being `a`
//! stored `[m, k]` or (with `ta`) its transpose stored `[k, m]`; likewise `b` (`[k, n]`, or
//! `[n, k]` with `tb`).
//!
//! cuBLAS is column-major. A row-major `[r, c]` matrix is the column-major `c × r` matrix of
//! its transpose, so `C = op(A)·op(B)` (row-major) is `Cᵀ = op(B)ᵀ·op(A)ᵀ` (column-major): one
//! cuBLAS call with the operands swapped, `m ↔ n`, and each operand's transpose flag carried
//! over. [`column_major_gemm`] is that mapping as a pure function (tested on the host).

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig, StridedBatchedConfig};

use crate::error::KernelsError;
use crate::gpu::driver_error;
use crate::gpu::launch::{invalid, mul, need, to_i32};
use crate::gpu::{DeviceBuffer, GpuContext};

/// One row-major product expressed as a column-major cuBLAS call. cuBLAS's first operand is the
/// row-major `b`, its second the row-major `a`; `c` is written in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColumnMajorGemm {
    /// Transpose cuBLAS's first operand (the row-major `b`).
    pub trans_first: bool,
    /// Transpose cuBLAS's second operand (the row-major `a`).
    pub trans_second: bool,
    /// cuBLAS `m` (= row-major `n`).
    pub m: i32,
    /// cuBLAS `n` (= row-major `m`).
    pub n: i32,
    pub k: i32,
    /// Leading dimension of the first operand (`b`).
    pub lda: i32,
    /// Leading dimension of the second operand (`a`).
    pub ldb: i32,
    pub ldc: i32,
}

/// The column-major call computing the row-major `c[m×n] = op(a)[m×k] · op(b)[k×n]`; `None`
/// when the product is empty (`m`, `n` or `k` zero), which the caller handles without cuBLAS.
pub fn column_major_gemm(
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
) -> Result<Option<ColumnMajorGemm>, KernelsError> {
    const OP: &str = "gemm";
    let (mi, ki, ni) = (
        to_i32(OP, "m", m)?,
        to_i32(OP, "k", k)?,
        to_i32(OP, "n", n)?,
    );
    if m == 0 || n == 0 || k == 0 {
        return Ok(None);
    }
    Ok(Some(ColumnMajorGemm {
        trans_first: tb,
        trans_second: ta,
        m: ni,
        n: mi,
        k: ki,
        // b is [k, n] (column-major: n × k, ld n) or, transposed, [n, k] (k × n, ld k).
        lda: if tb { ki } else { ni },
        // a is [m, k] (column-major: k × m, ld k) or, transposed, [k, m] (m × k, ld m).
        ldb: if ta { mi } else { ki },
        ldc: ni,
    }))
}

fn op(t: bool) -> cublasOperation_t {
    if t {
        cublasOperation_t::CUBLAS_OP_T
    } else {
        cublasOperation_t::CUBLAS_OP_N
    }
}

fn cublas_error(op: &'static str, e: cudarc::cublas::result::CublasError) -> KernelsError {
    KernelsError::Cublas {
        op,
        status: format!("{e:?}"),
    }
}

fn zero_prefix(
    ctx: &GpuContext,
    c: &mut DeviceBuffer<f32>,
    len: usize,
) -> Result<(), KernelsError> {
    if len == 0 {
        return Ok(());
    }
    let mut view = c.cu_mut().slice_mut(0..len);
    ctx.stream()
        .memset_zeros(&mut view)
        .map_err(|e| driver_error("zeroing a product", e))
}

/// `c[m×n] = (accumulate ? c : 0) + op(a) · op(b)` (row-major), through cuBLAS (f32, default
/// math mode: no TF32 unless the environment forces it).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    ctx: &GpuContext,
    c: &mut DeviceBuffer<f32>,
    a: &DeviceBuffer<f32>,
    b: &DeviceBuffer<f32>,
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
    accumulate: bool,
) -> Result<(), KernelsError> {
    const OP: &str = "gemm";
    need(OP, "a", a.len(), mul(OP, m, k)?)?;
    need(OP, "b", b.len(), mul(OP, k, n)?)?;
    let mn = mul(OP, m, n)?;
    need(OP, "c", c.len(), mn)?;
    let Some(p) = column_major_gemm(m, k, n, ta, tb)? else {
        return if accumulate {
            Ok(())
        } else {
            zero_prefix(ctx, c, mn)
        };
    };
    let blas = ctx.blas()?;
    ctx.cuda_context()
        .bind_to_thread()
        .map_err(|e| driver_error("binding the context", e))?;
    let cfg = GemmConfig {
        transa: op(p.trans_first),
        transb: op(p.trans_second),
        m: p.m,
        n: p.n,
        k: p.k,
        alpha: 1.0f32,
        lda: p.lda,
        ldb: p.ldb,
        beta: if accumulate { 1.0 } else { 0.0 },
        ldc: p.ldc,
    };
    // SAFETY: the column-major call reads k·n floats of b, m·k of a and writes m·n of c, all
    // within the buffers (checked above); cuBLAS runs on the context's stream.
    unsafe { blas.gemm(cfg, b.cu(), a.cu(), c.cu_mut()) }.map_err(|e| cublas_error(OP, e))
}

/// `batch` independent products, matrix `i` of each operand at `i·(its size)`:
/// `c_i = (accumulate ? c_i : 0) + op(a_i) · op(b_i)` (row-major), one cuBLAS call.
#[allow(clippy::too_many_arguments)]
pub fn gemm_strided_batched(
    ctx: &GpuContext,
    c: &mut DeviceBuffer<f32>,
    a: &DeviceBuffer<f32>,
    b: &DeviceBuffer<f32>,
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
    accumulate: bool,
) -> Result<(), KernelsError> {
    const OP: &str = "gemm_strided_batched";
    let (sa, sb, sc) = (mul(OP, m, k)?, mul(OP, k, n)?, mul(OP, m, n)?);
    need(OP, "a", a.len(), mul(OP, batch, sa)?)?;
    need(OP, "b", b.len(), mul(OP, batch, sb)?)?;
    need(OP, "c", c.len(), mul(OP, batch, sc)?)?;
    let batch_i = to_i32(OP, "batch", batch)?;
    if batch == 0 {
        return Ok(());
    }
    let Some(p) = column_major_gemm(m, k, n, ta, tb)? else {
        return if accumulate {
            Ok(())
        } else {
            zero_prefix(ctx, c, batch * sc)
        };
    };
    for s in [sa, sb, sc] {
        i64::try_from(s).map_err(|_| invalid(OP, "stride overflows"))?;
    }
    let blas = ctx.blas()?;
    ctx.cuda_context()
        .bind_to_thread()
        .map_err(|e| driver_error("binding the context", e))?;
    let cfg = StridedBatchedConfig {
        gemm: GemmConfig {
            transa: op(p.trans_first),
            transb: op(p.trans_second),
            m: p.m,
            n: p.n,
            k: p.k,
            alpha: 1.0f32,
            lda: p.lda,
            ldb: p.ldb,
            beta: if accumulate { 1.0 } else { 0.0 },
            ldc: p.ldc,
        },
        batch_size: batch_i,
        stride_a: sb as i64,
        stride_b: sa as i64,
        stride_c: sc as i64,
    };
    // SAFETY: matrix i of each operand lies at i·stride within its buffer, and batch·stride fits
    // every buffer (checked above); cuBLAS runs on the context's stream.
    unsafe { blas.gemm_strided_batched(cfg, b.cu(), a.cu(), c.cu_mut()) }
        .map_err(|e| cublas_error(OP, e))
}

/// Lets cuBLAS run the f32 products on tensor cores in TF32 (inputs rounded to a 10-bit
/// mantissa, f32 accumulation) when `on`, or in full f32 (the default, and what the parity
/// tests use) when not. A speed option for long training runs; it changes results at about
/// 1e-3 relative.
pub fn set_tf32(ctx: &GpuContext, on: bool) -> Result<(), KernelsError> {
    use cudarc::cublas::sys::{cublasMath_t, cublasSetMathMode, cublasStatus_t};
    let blas = ctx.blas()?;
    let mode = if on {
        cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
    } else {
        cublasMath_t::CUBLAS_DEFAULT_MATH
    };
    // SAFETY: the handle is the context's live cuBLAS handle; setting its math mode has no
    // other precondition.
    let status = crate::libs::guarded("libcublas", || {
        Ok(unsafe { cublasSetMathMode(*blas.handle(), mode) })
    })?;
    if status != cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        return Err(KernelsError::Cublas {
            op: "cublasSetMathMode",
            status: format!("{status:?}"),
        });
    }
    Ok(())
}
