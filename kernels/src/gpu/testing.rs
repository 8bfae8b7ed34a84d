//! Support for GPU tests and benchmarks: open the GPU or skip loudly, and compare device
//! results with a host reference under a stated tolerance.
//!
//! Without a GPU (no driver, no device, no NVRTC) [`context_for_test`] prints
//! `SKIPPED: no GPU (<reason>)` and returns `None`, so the test passes — unless the environment
//! sets `REFORMER_REQUIRE_GPU=1` (a GPU CI runner), which turns the skip into a failure. A GPU
//! that answers the probe but cannot be opened is always a failure. A test that gets the GPU
//! says so on one line (`using CUDA device 0: <name> (<arch>) [<test>]`).

use std::io::Write;

use crate::gpu::GpuContext;
use crate::probe::probe;

/// Set to `1` to make a missing GPU fail the GPU tests instead of skipping them.
pub const REQUIRE_GPU_ENV: &str = "REFORMER_REQUIRE_GPU";

/// Whether the environment requires a GPU.
pub fn gpu_required() -> bool {
    std::env::var(REQUIRE_GPU_ENV).is_ok_and(|v| v == "1")
}

/// Device 0 with NaN poisoning of new buffers switched on, or `None` after printing
/// `SKIPPED: no GPU (<reason>)` when no GPU answers the probe. Panics when
/// `REFORMER_REQUIRE_GPU=1` and there is no GPU, or when a GPU answers but cannot be opened.
pub fn context_for_test(test: &str) -> Option<GpuContext> {
    match probe(0) {
        Err(e) => {
            if gpu_required() {
                panic!("{test}: {REQUIRE_GPU_ENV}=1 but no GPU answers: {e}");
            }
            // Written to the stderr handle, not with eprintln!: libtest captures the print
            // macros of passing tests, and this line must be seen.
            let _ = writeln!(std::io::stderr(), "SKIPPED: no GPU ({e}) [{test}]");
            None
        }
        Ok(info) => {
            let ctx = GpuContext::new(info.ordinal).unwrap_or_else(|e| {
                panic!("{test}: a GPU answered the probe ({}) but: {e}", info.name)
            });
            ctx.pool().set_poison(true);
            // Past libtest's capture, as above: a GPU result must come from a process that said
            // it is using the GPU.
            let _ = writeln!(
                std::io::stderr(),
                "using CUDA device {}: {} ({}) [{test}]",
                info.ordinal,
                info.name,
                ctx.arch()
            );
            Some(ctx)
        }
    }
}

/// `|got − want| ≤ atol + rtol·|want|`, element by element.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    pub rtol: f32,
    pub atol: f32,
}

impl Tolerance {
    /// `rtol`, with an absolute floor of `atol_floor · max(1, max|want|)`: the floor scales with
    /// the tensor's magnitude, so entries near zero in a large tensor are judged against the
    /// rounding of its large entries.
    pub fn scaled(rtol: f32, atol_floor: f32, want: &[f32]) -> Self {
        let scale = want
            .iter()
            .filter(|x| x.is_finite())
            .fold(1.0f32, |m, x| m.max(x.abs()));
        Self {
            rtol,
            atol: atol_floor * scale,
        }
    }
}

/// The worst element of a comparison.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CloseReport {
    /// Largest `|got − want| / (atol + rtol·|want|)`: ≤ 1 passes.
    pub worst_ratio: f32,
    pub worst_index: usize,
    pub got: f32,
    pub want: f32,
}

/// Compares `got` with `want` under `tol`. Fails on a length mismatch, on any non-finite `got`
/// where `want` is finite (an unwritten, NaN-poisoned output), and on any element out of
/// tolerance; the message names `what`, the element and both values.
pub fn check_close(
    what: &str,
    got: &[f32],
    want: &[f32],
    tol: Tolerance,
) -> Result<CloseReport, String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} elements, reference has {}",
            got.len(),
            want.len()
        ));
    }
    let mut report = CloseReport {
        worst_ratio: 0.0,
        worst_index: 0,
        got: 0.0,
        want: 0.0,
    };
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if !w.is_finite() {
            if g.to_bits() != w.to_bits() && !(g.is_nan() && w.is_nan()) {
                return Err(format!("{what}[{i}]: got {g}, reference {w}"));
            }
            continue;
        }
        if !g.is_finite() {
            return Err(format!(
                "{what}[{i}]: got {g} (an output never written?), reference {w}"
            ));
        }
        let ratio = (g - w).abs() / (tol.atol + tol.rtol * w.abs());
        if ratio > report.worst_ratio {
            report = CloseReport {
                worst_ratio: ratio,
                worst_index: i,
                got: g,
                want: w,
            };
        }
    }
    if report.worst_ratio > 1.0 {
        return Err(format!(
            "{what}[{}]: got {}, reference {} (|diff| {:e} > atol {:e} + rtol {:e}·|ref|)",
            report.worst_index,
            report.got,
            report.want,
            (report.got - report.want).abs(),
            tol.atol,
            tol.rtol
        ));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOL: Tolerance = Tolerance {
        rtol: 1e-4,
        atol: 1e-6,
    };

    #[test]
    fn close_values_pass_and_far_ones_fail() {
        let want = [1.0, -2.0, 0.0];
        assert!(check_close("x", &[1.00005, -2.0001, 5e-7], &want, TOL).is_ok());
        let err = check_close("x", &[1.0, -2.001, 0.0], &want, TOL).unwrap_err();
        assert!(err.contains("x[1]"), "{err}");
    }

    #[test]
    fn a_poisoned_output_fails_even_when_the_reference_is_tiny() {
        let err = check_close("out", &[0.0, f32::NAN], &[0.0, 1e-30], TOL).unwrap_err();
        assert!(err.contains("never written"), "{err}");
    }

    #[test]
    fn infinities_must_match_exactly() {
        let inf = f32::NEG_INFINITY;
        assert!(check_close("lse", &[inf, 1.0], &[inf, 1.0], TOL).is_ok());
        assert!(check_close("lse", &[-1e30, 1.0], &[inf, 1.0], TOL).is_err());
        assert!(check_close("lse", &[1.0], &[1.0, 2.0], TOL).is_err());
    }

    #[test]
    fn the_floor_scales_with_the_tensor() {
        let t = Tolerance::scaled(1e-4, 2e-5, &[100.0, -3.0, f32::NEG_INFINITY]);
        assert!((t.atol - 2e-3).abs() < 1e-9);
        assert_eq!(Tolerance::scaled(1e-4, 2e-5, &[0.5]).atol, 2e-5);
    }
}
