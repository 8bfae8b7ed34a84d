//! The GPU environment, checked and reported in one test (the first check of
//! `scripts/gpu-proof.sh`): which libcuda, libnvrtc and libcublas were loaded and from where,
//! their versions, the device and its free memory; then every kernel family compiled for the
//! device's architecture and loaded as the driver will load it (CUBIN by default), one kernel
//! launched and read back, and one cuBLAS product checked. A failure here names the piece that
//! would have failed every later check.
//!
//! Without a GPU it prints what it found and `SKIPPED: no GPU`, and passes — unless
//! `REFORMER_REQUIRE_GPU=1`, which makes it fail. Everything it reads is printed on lines that
//! start with `gpu-env:` (unconditionally, past libtest's capture), the last one a JSON object.

use std::io::Write;
use std::time::Instant;

use reformer_kernels::gpu::ops::{elementwise, matmul};
use reformer_kernels::gpu::testing::{context_for_test, gpu_required};
use reformer_kernels::{
    compile_all, cublas_version, image_kind, libs, loaded_path, nvrtc_version, Library,
};

fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "gpu-env: {line}");
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn path_of(lib: Library) -> String {
    loaded_path(lib).map_or_else(|| "not loaded".into(), |p| p.display().to_string())
}

#[test]
fn gpu_environment() {
    let mut fields: Vec<(&str, String)> = Vec::new();
    let image = image_kind().unwrap_or_else(|e| panic!("{e}"));
    say(&format!(
        "kernel image: {} (REFORMER_KERNEL_IMAGE), extra NVRTC options: {:?}",
        image.name(),
        std::env::var("REFORMER_NVRTC_OPTIONS").unwrap_or_default()
    ));
    fields.push(("image", json_str(image.name())));
    match libs::driver_version() {
        Ok((a, b)) => {
            let p = path_of(Library::Driver);
            say(&format!("libcuda: CUDA {a}.{b} driver API, {p}"));
            fields.push(("driver_cuda", json_str(&format!("{a}.{b}"))));
            fields.push(("libcuda", json_str(&p)));
        }
        Err(e) => say(&format!("libcuda: {e}")),
    }
    match nvrtc_version() {
        Ok((a, b)) => {
            let p = path_of(Library::Nvrtc);
            say(&format!("libnvrtc: NVRTC {a}.{b}, {p}"));
            fields.push(("nvrtc", json_str(&format!("{a}.{b}"))));
            fields.push(("libnvrtc", json_str(&p)));
        }
        Err(e) => say(&format!("libnvrtc: {e}")),
    }
    match cublas_version() {
        Ok((a, b, c)) => {
            let p = path_of(Library::Cublas);
            say(&format!("libcublas: cuBLAS {a}.{b}.{c}, {p}"));
            fields.push(("cublas", json_str(&format!("{a}.{b}.{c}"))));
            fields.push(("libcublas", json_str(&p)));
        }
        Err(e) => {
            say(&format!("libcublas: {e}"));
            assert!(!gpu_required(), "REFORMER_REQUIRE_GPU=1 but cuBLAS: {e}");
        }
    }
    let Some(ctx) = context_for_test("gpu_environment") else {
        say("SKIPPED: no GPU");
        return;
    };
    let info = ctx.info().clone();
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    say(&format!(
        "using CUDA device {}: {} ({}), {:.2} GiB total, {:.2} GiB free; driver CUDA {}.{}, \
         NVRTC {}.{}",
        info.ordinal,
        info.name,
        ctx.arch(),
        gib(info.total_bytes),
        gib(info.free_bytes),
        info.driver_version.0,
        info.driver_version.1,
        info.nvrtc_version.0,
        info.nvrtc_version.1
    ));
    fields.push(("device", json_str(&info.name)));
    fields.push(("arch", json_str(ctx.arch())));
    fields.push(("total_bytes", info.total_bytes.to_string()));
    fields.push(("free_bytes", info.free_bytes.to_string()));

    // Every family, compiled for this device (NVRTC, or the REFORMER_KERNEL_CACHE folder).
    let t = Instant::now();
    let sizes = compile_all(ctx.arch()).unwrap_or_else(|e| panic!("{e}"));
    let compile_s = t.elapsed().as_secs_f64();
    for (name, ptx, cubin) in &sizes {
        say(&format!("compiled {name}.cu: {ptx} B PTX, {cubin} B CUBIN"));
    }
    say(&format!(
        "compiled {} families for {} in {compile_s:.1} s",
        sizes.len(),
        ctx.arch()
    ));
    fields.push(("compile_s", format!("{compile_s:.3}")));
    // ... and loaded as the driver loads them: a PTX/driver mismatch fails here, by name.
    let t = Instant::now();
    ctx.load_all()
        .unwrap_or_else(|e| panic!("loading the kernels: {e}"));
    let load_s = t.elapsed().as_secs_f64();
    say(&format!(
        "loaded every kernel ({}) in {load_s:.2} s",
        image.name()
    ));
    fields.push(("load_s", format!("{load_s:.3}")));

    // One launch, read back.
    let n = 1 << 20;
    let mut x = ctx.alloc::<f32>(n).unwrap();
    elementwise::fill(&ctx, &mut x, 1.5).unwrap_or_else(|e| panic!("ew_fill: {e}"));
    let host = ctx.download(&x).unwrap_or_else(|e| panic!("download: {e}"));
    assert!(
        host.iter().all(|&v| v == 1.5),
        "ew_fill wrote something else"
    );
    // One cuBLAS product: [2x3] · [3x2] of small integers (exact in f32).
    let a = ctx.upload(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    let b = ctx.upload(&[1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0]).unwrap();
    let mut c = ctx.alloc_zeros::<f32>(4).unwrap();
    matmul::gemm(&ctx, &mut c, &a, &b, 2, 3, 2, false, false, false)
        .unwrap_or_else(|e| panic!("cuBLAS: {e}"));
    let c = ctx.download(&c).unwrap();
    assert_eq!(c, vec![4.0, 5.0, 10.0, 11.0], "cuBLAS product");
    let report = ctx.memory_report().unwrap();
    say(&format!(
        "a kernel launch and a cuBLAS product checked; driver: {:.2} GiB free of {:.2} GiB",
        gib(report.driver_free),
        gib(report.driver_total)
    ));
    fields.push(("driver_free_after_bytes", report.driver_free.to_string()));
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}: {v}", json_str(k)))
        .collect();
    say(&format!("{{{}}}", body.join(", ")));
}
