//! A memory pool that counts live and peak bytes and refuses, with a typed error, any
//! allocation that would pass its budget.
//!
//! The pool is an accountant, not an allocator: on the CPU the bytes come from the system
//! allocator, and the pool records them while a [`Buffer`] lives. Clones of a `MemoryPool`
//! share one account.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::error::{EngineError, Result};

#[derive(Debug)]
struct Account {
    live: AtomicUsize,
    peak: AtomicUsize,
    budget: AtomicUsize,
    allocations: AtomicUsize,
}

/// Shared live/peak byte account with a hard budget.
#[derive(Debug, Clone)]
pub struct MemoryPool {
    account: Arc<Account>,
}

impl Default for MemoryPool {
    fn default() -> Self {
        Self::unlimited()
    }
}

impl MemoryPool {
    /// A pool with a budget in bytes.
    pub fn with_budget(budget: usize) -> Self {
        Self {
            account: Arc::new(Account {
                live: AtomicUsize::new(0),
                peak: AtomicUsize::new(0),
                budget: AtomicUsize::new(budget),
                allocations: AtomicUsize::new(0),
            }),
        }
    }

    /// A pool without a budget (still counting).
    pub fn unlimited() -> Self {
        Self::with_budget(usize::MAX)
    }

    pub fn live_bytes(&self) -> usize {
        self.account.live.load(Ordering::Relaxed)
    }

    pub fn peak_bytes(&self) -> usize {
        self.account.peak.load(Ordering::Relaxed)
    }

    pub fn budget(&self) -> usize {
        self.account.budget.load(Ordering::Relaxed)
    }

    /// Number of allocations made so far.
    pub fn allocations(&self) -> usize {
        self.account.allocations.load(Ordering::Relaxed)
    }

    pub fn set_budget(&self, budget: usize) {
        self.account.budget.store(budget, Ordering::Relaxed);
    }

    /// Sets the peak to the bytes live now, to measure the peak of what follows.
    pub fn reset_peak(&self) {
        self.account
            .peak
            .store(self.live_bytes(), Ordering::Relaxed);
    }

    /// Records `bytes` as live, or refuses if the budget would be passed.
    pub fn reserve(&self, bytes: usize) -> Result<()> {
        let budget = self.budget();
        let mut live = self.account.live.load(Ordering::Relaxed);
        loop {
            let next = live.checked_add(bytes).filter(|&n| n <= budget);
            let Some(next) = next else {
                return Err(EngineError::OutOfMemory {
                    requested: bytes,
                    live,
                    budget,
                });
            };
            match self.account.live.compare_exchange_weak(
                live,
                next,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.account.peak.fetch_max(next, Ordering::Relaxed);
                    self.account.allocations.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(now) => live = now,
            }
        }
    }

    /// Returns `bytes` previously reserved.
    pub fn release(&self, bytes: usize) {
        self.account.live.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Counts `bytes` of scratch held outside a [`Buffer`] (e.g. a per-task tile) until the
    /// returned guard drops.
    pub fn hold(&self, bytes: usize) -> Result<Hold> {
        self.reserve(bytes)?;
        Ok(Hold {
            pool: self.clone(),
            bytes,
        })
    }

    /// A zero-filled buffer of `len` elements, counted by this pool.
    pub fn alloc<T: bytemuck::Pod>(&self, len: usize) -> Result<Buffer<T>> {
        let bytes = len.checked_mul(std::mem::size_of::<T>()).ok_or_else(|| {
            EngineError::InvalidArgument(format!("allocation of {len} elements overflows"))
        })?;
        self.reserve(bytes)?;
        // A zeroed allocation this large comes fresh from the kernel, untouched: ask for huge
        // pages before the first write faults it in.
        let data = vec![T::zeroed(); len];
        crate::huge_pages::advise(data.as_ptr().cast(), bytes);
        Ok(Buffer {
            data,
            pool: self.clone(),
        })
    }

    /// Takes ownership of `data`, counting its bytes.
    pub fn adopt<T: bytemuck::Pod>(&self, data: Vec<T>) -> Result<Buffer<T>> {
        self.reserve(std::mem::size_of_val(data.as_slice()))?;
        Ok(Buffer {
            data,
            pool: self.clone(),
        })
    }
}

/// Bytes counted by a pool while this guard lives (see [`MemoryPool::hold`]).
#[derive(Debug)]
pub struct Hold {
    pool: MemoryPool,
    bytes: usize,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.pool.release(self.bytes);
    }
}

/// Host memory counted by a [`MemoryPool`] while it lives.
#[derive(Debug)]
pub struct Buffer<T: bytemuck::Pod> {
    data: Vec<T>,
    pool: MemoryPool,
}

impl<T: bytemuck::Pod> Buffer<T> {
    pub fn pool(&self) -> &MemoryPool {
        &self.pool
    }
    pub fn as_slice(&self) -> &[T] {
        &self.data
    }
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        &mut self.data
    }
    pub fn len(&self) -> usize {
        self.data.len()
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    pub fn try_clone(&self) -> Result<Self> {
        self.pool.adopt(self.data.clone())
    }
}

impl<T: bytemuck::Pod> std::ops::Deref for Buffer<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.data
    }
}

impl<T: bytemuck::Pod> std::ops::DerefMut for Buffer<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.data
    }
}

impl<T: bytemuck::Pod> Drop for Buffer<T> {
    fn drop(&mut self) {
        self.pool
            .release(std::mem::size_of_val(self.data.as_slice()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_live_and_peak_and_refuses_past_budget() {
        let pool = MemoryPool::with_budget(1000);
        let a = pool.alloc::<f32>(100).unwrap();
        assert_eq!(pool.live_bytes(), 400);
        let b = pool.alloc::<f32>(150).unwrap();
        assert_eq!(pool.live_bytes(), 1000);
        let err = pool.alloc::<f32>(1).unwrap_err();
        assert_eq!(
            err,
            EngineError::OutOfMemory {
                requested: 4,
                live: 1000,
                budget: 1000
            }
        );
        drop(b);
        assert_eq!(pool.live_bytes(), 400);
        assert_eq!(pool.peak_bytes(), 1000);
        pool.reset_peak();
        assert_eq!(pool.peak_bytes(), 400);
        drop(a);
        assert_eq!(pool.live_bytes(), 0);
    }
}
