//! Device memory: a pool that counts live and peak bytes and refuses, with a typed error, any
//! allocation that would pass its budget; [`DeviceBuffer`], a typed device allocation that is
//! counted while it lives and freed (on the stream) when dropped.
//!
//! The accounting ([`MemoryAccount`]) is plain host logic, testable without a GPU. The pool
//! is an accountant in front of the driver's allocator (stream-ordered `cuMemAllocAsync` where
//! the device supports it): its live bytes are what this process holds through it, which
//! [`crate::gpu::GpuContext::memory_report`] prints beside the driver's own free/total reading.
//!
//! Poisoning: with the pool's `poison` flag on (the default in builds with debug assertions),
//! every [`DevicePool::alloc`] fills the new buffer with `0xFF` bytes — NaN for `f32` and
//! `bf16`, `u32::MAX` for indices — so a test that reads an output a kernel never wrote sees
//! NaN instead of a stale but plausible value.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut, DeviceRepr, ValidAsZeroBits};

use crate::error::KernelsError;
use crate::gpu::driver_error;

/// Live/peak byte account with a hard budget. Clones of an `Arc<MemoryAccount>` share one
/// account; every method is thread-safe.
#[derive(Debug)]
pub struct MemoryAccount {
    live: AtomicUsize,
    peak: AtomicUsize,
    budget: AtomicUsize,
    allocations: AtomicUsize,
}

impl MemoryAccount {
    pub fn new(budget: usize) -> Self {
        Self {
            live: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            budget: AtomicUsize::new(budget),
            allocations: AtomicUsize::new(0),
        }
    }

    pub fn live_bytes(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    pub fn peak_bytes(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    pub fn budget(&self) -> usize {
        self.budget.load(Ordering::Relaxed)
    }

    /// Allocations granted so far.
    pub fn allocations(&self) -> usize {
        self.allocations.load(Ordering::Relaxed)
    }

    pub fn set_budget(&self, budget: usize) {
        self.budget.store(budget, Ordering::Relaxed);
    }

    /// Sets the peak to the bytes live now, to measure the peak of what follows.
    pub fn reset_peak(&self) {
        self.peak.store(self.live_bytes(), Ordering::Relaxed);
    }

    /// Records `bytes` as live, or refuses with [`KernelsError::OutOfMemory`] when the budget
    /// would be passed (nothing is recorded then).
    pub fn reserve(&self, bytes: usize) -> Result<(), KernelsError> {
        let budget = self.budget();
        let mut live = self.live.load(Ordering::Relaxed);
        loop {
            let Some(next) = live.checked_add(bytes).filter(|&n| n <= budget) else {
                return Err(KernelsError::OutOfMemory {
                    requested: bytes,
                    live,
                    budget,
                });
            };
            match self
                .live
                .compare_exchange_weak(live, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.peak.fetch_max(next, Ordering::Relaxed);
                    self.allocations.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(now) => live = now,
            }
        }
    }

    /// Returns `bytes` previously reserved.
    pub fn release(&self, bytes: usize) {
        self.live.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// Bytes of `len` elements of `T`, or an error naming the overflow.
pub fn bytes_of<T>(len: usize) -> Result<usize, KernelsError> {
    len.checked_mul(std::mem::size_of::<T>())
        .ok_or_else(|| KernelsError::InvalidArgument {
            op: "device allocation",
            msg: format!(
                "{len} elements of {} bytes overflow",
                std::mem::size_of::<T>()
            ),
        })
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for u32 {}
    impl Sealed for i32 {}
    impl Sealed for u8 {}
    impl Sealed for half::bf16 {}
}

/// Element types a [`DeviceBuffer`] holds: plain data for which every bit pattern is a valid
/// value, so uninitialised or poisoned device memory can be copied to the host soundly.
pub trait DeviceElem:
    DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + fmt::Debug + sealed::Sealed + 'static
{
}
impl DeviceElem for f32 {}
impl DeviceElem for u32 {}
impl DeviceElem for i32 {}
impl DeviceElem for u8 {}
impl DeviceElem for half::bf16 {}

/// An element type activations may be stored in on the device. Kernels widen it to f32 on load
/// (bf16 → f32 is exact) and accumulate in f32; outputs stay f32.
///
/// `widen` and `narrow` are the host's view of the kernels' conversions (for CPU twins and
/// tests): `widen` is the kernels' `bf16_bits_to_float` (bits `<< 16`, NaN payloads kept as they
/// are), `narrow` their `float_to_bf16_bits` (`half::bf16::from_f32`: round to nearest even).
pub trait ActElem: DeviceElem {
    /// Whether the kernels read (or write) this type as bf16; otherwise it is f32. Launch
    /// wrappers pass `i32::from(T::IS_BF16)` beside the pointer.
    const IS_BF16: bool;

    /// The value as f32, exactly as a kernel loads it.
    fn widen(self) -> f32;

    /// `x` stored as this type, exactly as a kernel stores it: itself for f32, rounded to
    /// nearest even for bf16.
    fn narrow(x: f32) -> Self;
}

impl ActElem for f32 {
    const IS_BF16: bool = false;

    fn widen(self) -> f32 {
        self
    }

    fn narrow(x: f32) -> Self {
        x
    }
}

impl ActElem for half::bf16 {
    const IS_BF16: bool = true;

    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }

    fn narrow(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
}

/// A typed device allocation counted by a [`DevicePool`] while it lives. An empty buffer still
/// owns one element of device memory (drivers refuse zero-byte allocations); its `len` is 0.
pub struct DeviceBuffer<T: DeviceElem> {
    slice: CudaSlice<T>,
    len: usize,
    account: Arc<MemoryAccount>,
    bytes: usize,
}

impl<T: DeviceElem> DeviceBuffer<T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn size_in_bytes(&self) -> usize {
        self.bytes
    }

    /// The cudarc slice, for launches (the kernel may read it). It may be longer than
    /// [`DeviceBuffer::len`] (one element for an empty buffer).
    pub fn cu(&self) -> &CudaSlice<T> {
        &self.slice
    }

    /// The cudarc slice, for launches that write it.
    pub fn cu_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.slice
    }
}

impl<T: DeviceElem> fmt::Debug for DeviceBuffer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceBuffer")
            .field("type", &std::any::type_name::<T>())
            .field("len", &self.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl<T: DeviceElem> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        // The slice itself is freed (stream-ordered) when its field drops, right after this.
        self.account.release(self.bytes);
    }
}

/// Live, peak and budget of a pool, with the driver's reading beside them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryReport {
    pub live: usize,
    pub peak: usize,
    pub budget: usize,
    /// `cuMemGetInfo`: free bytes on the device (every process, every allocator).
    pub driver_free: usize,
    /// `cuMemGetInfo`: total bytes on the device.
    pub driver_total: usize,
}

impl MemoryReport {
    /// Bytes in use on the device by the driver's reading (`total − free`).
    pub fn driver_used(&self) -> usize {
        self.driver_total.saturating_sub(self.driver_free)
    }
}

impl fmt::Display for MemoryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MIB: f64 = (1 << 20) as f64;
        let budget = if self.budget == usize::MAX {
            "unlimited".to_string()
        } else {
            format!("{:.1} MiB", self.budget as f64 / MIB)
        };
        write!(
            f,
            "pool: live {:.1} MiB, peak {:.1} MiB, budget {budget}; driver: used {:.1} MiB of \
             {:.1} MiB ({:.1} MiB free)",
            self.live as f64 / MIB,
            self.peak as f64 / MIB,
            self.driver_used() as f64 / MIB,
            self.driver_total as f64 / MIB,
            self.driver_free as f64 / MIB,
        )
    }
}

/// Allocates device buffers on one stream, counting them against a budget.
#[derive(Debug, Clone)]
pub struct DevicePool {
    account: Arc<MemoryAccount>,
    stream: Arc<CudaStream>,
    poison: Arc<AtomicBool>,
}

impl DevicePool {
    pub(crate) fn new(stream: Arc<CudaStream>, budget: usize) -> Self {
        Self {
            account: Arc::new(MemoryAccount::new(budget)),
            stream,
            poison: Arc::new(AtomicBool::new(cfg!(debug_assertions))),
        }
    }

    pub fn account(&self) -> &Arc<MemoryAccount> {
        &self.account
    }

    pub fn live_bytes(&self) -> usize {
        self.account.live_bytes()
    }

    pub fn peak_bytes(&self) -> usize {
        self.account.peak_bytes()
    }

    pub fn budget(&self) -> usize {
        self.account.budget()
    }

    pub fn set_budget(&self, budget: usize) {
        self.account.set_budget(budget);
    }

    pub fn reset_peak(&self) {
        self.account.reset_peak();
    }

    /// Whether [`DevicePool::alloc`] fills new buffers with `0xFF` bytes (NaN for floats).
    pub fn poison(&self) -> bool {
        self.poison.load(Ordering::Relaxed)
    }

    pub fn set_poison(&self, on: bool) {
        self.poison.store(on, Ordering::Relaxed);
    }

    /// A buffer of `len` elements whose contents are unspecified — poisoned (all bytes `0xFF`)
    /// when the pool's `poison` flag is on. For outputs a kernel writes in full.
    pub fn alloc<T: DeviceElem>(&self, len: usize) -> Result<DeviceBuffer<T>, KernelsError> {
        let mut buf = self.alloc_raw::<T>(len)?;
        if self.poison() {
            let (ptr, _record) = buf.slice.device_ptr_mut(&self.stream);
            // SAFETY: `ptr` addresses exactly `buf.bytes` bytes owned by `buf`, and the memset is
            // ordered on the stream that owns the allocation.
            unsafe {
                cudarc::driver::result::memset_d8_async(
                    ptr,
                    0xFF,
                    buf.bytes,
                    self.stream.cu_stream(),
                )
            }
            .map_err(|e| driver_error("poisoning a new buffer", e))?;
        }
        Ok(buf)
    }

    /// A zero-filled buffer of `len` elements. For accumulators kernels add into.
    pub fn alloc_zeros<T: DeviceElem>(&self, len: usize) -> Result<DeviceBuffer<T>, KernelsError> {
        let mut buf = self.alloc_raw::<T>(len)?;
        if len > 0 {
            self.stream
                .memset_zeros(&mut buf.slice)
                .map_err(|e| driver_error("zeroing a new buffer", e))?;
        }
        Ok(buf)
    }

    /// A buffer holding a copy of `host`.
    pub fn upload<T: DeviceElem>(&self, host: &[T]) -> Result<DeviceBuffer<T>, KernelsError> {
        let mut buf = self.alloc_raw::<T>(host.len())?;
        if !host.is_empty() {
            self.stream
                .memcpy_htod(host, &mut buf.slice)
                .map_err(|e| driver_error("host-to-device copy", e))?;
        }
        Ok(buf)
    }

    fn alloc_raw<T: DeviceElem>(&self, len: usize) -> Result<DeviceBuffer<T>, KernelsError> {
        let physical = len.max(1);
        let bytes = bytes_of::<T>(physical)?;
        self.account.reserve(bytes)?;
        // SAFETY: `T: DeviceElem` is plain data valid for every bit pattern, so the
        // uninitialised contents can never be an invalid value of `T` (callers poison, zero or
        // fully overwrite them before they are read for a result).
        match unsafe { self.stream.alloc::<T>(physical) } {
            Ok(slice) => Ok(DeviceBuffer {
                slice,
                len,
                account: Arc::clone(&self.account),
                bytes,
            }),
            Err(e) => {
                self.account.release(bytes);
                Err(driver_error(
                    &format!("allocating {bytes} bytes on the device"),
                    e,
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_live_and_peak_and_refuses_past_budget() {
        let acct = MemoryAccount::new(1000);
        acct.reserve(400).unwrap();
        acct.reserve(600).unwrap();
        assert_eq!(acct.live_bytes(), 1000);
        assert_eq!(
            acct.reserve(4),
            Err(KernelsError::OutOfMemory {
                requested: 4,
                live: 1000,
                budget: 1000
            })
        );
        assert_eq!(acct.live_bytes(), 1000, "a refused request records nothing");
        acct.release(600);
        assert_eq!((acct.live_bytes(), acct.peak_bytes()), (400, 1000));
        acct.reset_peak();
        assert_eq!(acct.peak_bytes(), 400);
        assert_eq!(acct.allocations(), 2);
    }

    #[test]
    fn act_elem_flags_and_conversions_match_the_kernels() {
        use half::bf16;
        const { assert!(!<f32 as ActElem>::IS_BF16 && <bf16 as ActElem>::IS_BF16) };
        assert_eq!(f32::narrow(0.1).widen().to_bits(), 0.1f32.to_bits());
        // widen is bf16_bits_to_float: the bits shifted up, a NaN payload kept as it is (half's
        // to_f32 would set the quiet bit).
        for bits in [
            0x0000u16, 0x8000, 0x3F80, 0xC0A1, 0x0001, 0x7F80, 0xFF80, 0x7F81, 0xFFFF,
        ] {
            let w = bf16::from_bits(bits).widen();
            assert_eq!(w.to_bits(), u32::from(bits) << 16, "{bits:#06x}");
        }
        // narrow is float_to_bf16_bits: half's round to nearest even.
        for x in [
            1.0f32,
            -2.5e-3,
            f32::MAX,
            f32::from_bits(0x3F81_8000),
            f32::NAN,
        ] {
            assert_eq!(bf16::narrow(x).to_bits(), bf16::from_f32(x).to_bits());
        }
    }

    #[test]
    fn byte_counts_do_not_overflow_silently() {
        assert_eq!(bytes_of::<f32>(3).unwrap(), 12);
        assert!(bytes_of::<f32>(usize::MAX / 2).is_err());
    }
}
