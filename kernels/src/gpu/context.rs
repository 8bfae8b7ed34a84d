//! One GPU, ready to run the kernels: the CUDA context, the stream every operation is ordered
//! on, the device memory pool, the kernel modules (NVRTC-compiled for this device's
//! architecture and loaded as CUBIN, lazily, once per family) and a cuBLAS handle (created at
//! the first matrix product).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};

use crate::compile::{compile, image_kind};
use crate::error::KernelsError;
use crate::gpu::driver_error;
use crate::gpu::memory::{DeviceBuffer, DeviceElem, DevicePool, MemoryReport};
use crate::libs::{self, Library};
use crate::probe::{probe, GpuInfo};
use crate::sources::KernelFamily;

/// A CUDA device with its stream, memory pool, kernels and cuBLAS handle.
///
/// Every allocation, copy, kernel launch and matrix product of a context is issued on its one
/// stream, in program order, so no operation needs explicit synchronisation with another;
/// downloads to the host wait for the stream.
pub struct GpuContext {
    info: GpuInfo,
    arch: String,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    pool: DevicePool,
    modules: Mutex<HashMap<KernelFamily, Arc<CudaModule>>>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    blas: OnceLock<Result<CudaBlas, KernelsError>>,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("info", &self.info)
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The maps are only ever extended by single inserts, so a poisoned lock is still sound.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl GpuContext {
    /// Probes device `ordinal` (driver, NVRTC, device, driver version) and opens it, with a
    /// memory budget of the device's total memory. Never panics: a missing library or device is
    /// an `Err` that says what is missing.
    pub fn new(ordinal: usize) -> Result<Self, KernelsError> {
        let info = probe(ordinal)?;
        let budget = info.total_bytes;
        Self::open(info, budget)
    }

    /// As [`GpuContext::new`], with a memory budget of `budget` bytes.
    pub fn with_budget(ordinal: usize, budget: usize) -> Result<Self, KernelsError> {
        let info = probe(ordinal)?;
        Self::open(info, budget)
    }

    fn open(info: GpuInfo, budget: usize) -> Result<Self, KernelsError> {
        let ordinal = info.ordinal;
        let (ctx, stream) = libs::guarded("libcuda", || {
            let ctx = CudaContext::new(ordinal)
                .map_err(|e| driver_error("cuDevicePrimaryCtxRetain", e))?;
            // SAFETY: every buffer of this context is allocated, used and freed on the one stream
            // below, which orders those operations; no other stream ever touches them, so the
            // per-buffer events cudarc would otherwise record are never needed.
            unsafe { ctx.disable_event_tracking() };
            let stream = ctx.default_stream();
            Ok((ctx, stream))
        })?;
        let arch = info.arch();
        Ok(Self {
            info,
            arch,
            pool: DevicePool::new(Arc::clone(&stream), budget),
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            blas: OnceLock::new(),
        })
    }

    /// What the probe found.
    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    /// The NVRTC architecture the kernels are compiled for, e.g. `sm_90`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    pub fn cuda_context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every operation of this context runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn pool(&self) -> &DevicePool {
        &self.pool
    }

    /// Waits until everything issued so far has finished; reports a deferred error (e.g. from
    /// a free) if one was recorded.
    pub fn synchronize(&self) -> Result<(), KernelsError> {
        self.stream
            .synchronize()
            .map_err(|e| driver_error("cuStreamSynchronize", e))?;
        self.ctx
            .check_err()
            .map_err(|e| driver_error("deferred CUDA error", e))
    }

    /// The driver's reading `(free, total)` in bytes (every process and allocator together).
    pub fn driver_mem_info(&self) -> Result<(usize, usize), KernelsError> {
        self.ctx
            .mem_get_info()
            .map_err(|e| driver_error("cuMemGetInfo", e))
    }

    /// The pool's live/peak/budget beside the driver's free/total.
    pub fn memory_report(&self) -> Result<MemoryReport, KernelsError> {
        let (driver_free, driver_total) = self.driver_mem_info()?;
        Ok(MemoryReport {
            live: self.pool.live_bytes(),
            peak: self.pool.peak_bytes(),
            budget: self.pool.budget(),
            driver_free,
            driver_total,
        })
    }

    /// The module of `family`, compiled (NVRTC, cached per process) and loaded on first use.
    pub fn module(&self, family: KernelFamily) -> Result<Arc<CudaModule>, KernelsError> {
        if let Some(m) = lock(&self.modules).get(&family) {
            return Ok(Arc::clone(m));
        }
        let compiled = compile(family, &self.arch)?;
        let (image, kind) = compiled.module_image(image_kind()?, self.info.driver_version)?;
        let module = libs::guarded("libcuda", || {
            self.ctx.load_module(image).map_err(|e| {
                driver_error(&format!("loading {}.cu {}", family.name(), kind.name()), e)
            })
        })?;
        Ok(Arc::clone(
            lock(&self.modules).entry(family).or_insert(module),
        ))
    }

    /// Kernel `name` of `family`.
    pub fn function(
        &self,
        family: KernelFamily,
        name: &'static str,
    ) -> Result<CudaFunction, KernelsError> {
        if let Some(f) = lock(&self.functions).get(name) {
            return Ok(f.clone());
        }
        if !family.kernels().contains(&name) {
            return Err(KernelsError::InvalidArgument {
                op: "kernel lookup",
                msg: format!("{}.cu has no kernel {name}", family.name()),
            });
        }
        let module = self.module(family)?;
        let f = module
            .load_function(name)
            .map_err(|e| driver_error(&format!("cuModuleGetFunction({name})"), e))?;
        Ok(lock(&self.functions).entry(name).or_insert(f).clone())
    }

    /// Compiles and loads every kernel family now (instead of at first use), e.g. before timing.
    pub fn load_all(&self) -> Result<(), KernelsError> {
        for family in KernelFamily::ALL {
            for name in family.kernels() {
                self.function(family, name)?;
            }
        }
        Ok(())
    }

    /// The cuBLAS handle (bound to this context's stream), created on first use. A missing
    /// libcublas is an error here, not at [`GpuContext::new`]: the hand-written kernels do not
    /// need it.
    pub fn blas(&self) -> Result<&CudaBlas, KernelsError> {
        self.blas
            .get_or_init(|| {
                libs::ensure(Library::Cublas)?;
                libs::guarded("libcublas", || {
                    CudaBlas::new(Arc::clone(&self.stream)).map_err(|e| KernelsError::Cublas {
                        op: "cublasCreate",
                        status: format!("{e:?}"),
                    })
                })
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    // ----- copies ----------------------------------------------------------------------------

    /// A device buffer of `len` elements, contents unspecified (poisoned when the pool says so).
    pub fn alloc<T: DeviceElem>(&self, len: usize) -> Result<DeviceBuffer<T>, KernelsError> {
        self.pool.alloc(len)
    }

    /// A zero-filled device buffer of `len` elements.
    pub fn alloc_zeros<T: DeviceElem>(&self, len: usize) -> Result<DeviceBuffer<T>, KernelsError> {
        self.pool.alloc_zeros(len)
    }

    /// A device copy of `host`.
    pub fn upload<T: DeviceElem>(&self, host: &[T]) -> Result<DeviceBuffer<T>, KernelsError> {
        self.pool.upload(host)
    }

    /// A key-padding mask as the attention kernels read it: 1 = may be attended to.
    pub fn upload_mask(&self, mask: &[bool]) -> Result<DeviceBuffer<u8>, KernelsError> {
        let bytes: Vec<u8> = mask.iter().map(|&m| u8::from(m)).collect();
        self.upload(&bytes)
    }

    /// Copies `host` into the start of `dst` (which must hold at least `host.len()` elements).
    pub fn copy_to_device<T: DeviceElem>(
        &self,
        host: &[T],
        dst: &mut DeviceBuffer<T>,
    ) -> Result<(), KernelsError> {
        if host.len() > dst.len() {
            return Err(KernelsError::Shape {
                op: "copy_to_device",
                got: vec![dst.len()],
                expected: vec![host.len()],
            });
        }
        if host.is_empty() {
            return Ok(());
        }
        self.stream
            .memcpy_htod(host, dst.cu_mut())
            .map_err(|e| driver_error("host-to-device copy", e))
    }

    /// Copies all of `src` into `host` (which must hold exactly `src.len()` elements), after
    /// everything issued before it has finished.
    pub fn copy_to_host<T: DeviceElem>(
        &self,
        src: &DeviceBuffer<T>,
        host: &mut [T],
    ) -> Result<(), KernelsError> {
        if host.len() != src.len() {
            return Err(KernelsError::Shape {
                op: "copy_to_host",
                got: vec![host.len()],
                expected: vec![src.len()],
            });
        }
        if !host.is_empty() {
            self.stream
                .memcpy_dtoh(src.cu(), host)
                .map_err(|e| driver_error("device-to-host copy", e))?;
        }
        self.synchronize()
    }

    /// A host copy of `src`.
    pub fn download<T: DeviceElem>(&self, src: &DeviceBuffer<T>) -> Result<Vec<T>, KernelsError> {
        let mut host = vec![T::default(); src.len()];
        self.copy_to_host(src, &mut host)?;
        Ok(host)
    }
}
