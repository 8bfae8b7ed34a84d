#!/usr/bin/env python3
"""The best exact attention on this machine, for the LSH-vs-exact harness.

Runs PyTorch's scaled_dot_product_attention (flash backend on a GPU, in bf16; the math
backend on a CPU, in f32) on the same shapes as `examples/bench_attention` — 2 heads x d_k 64,
causal — for N = 2^10 ... 2^19, forward and forward+backward, and records the median time and
the peak memory (torch.cuda.max_memory_allocated on a GPU). Lengths stop once a run would take
longer than --budget seconds. Writes CSV and JSON beside each other.

    python3 scripts/bench_torch_attention.py --out bench/out/torch_attention
"""
import argparse
import json
import statistics
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--min-log2", type=int, default=10)
    ap.add_argument("--max-log2", type=int, default=19)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--budget", type=float, default=150.0, help="seconds per length, at most")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="bench/out/torch_attention")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    a = ap.parse_args()

    import torch
    import torch.nn.functional as F

    dev = "cuda" if (a.device == "auto" and torch.cuda.is_available()) or a.device == "cuda" else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    name = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
    backend = "flash" if dev == "cuda" else "math"

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def ctx():
        if dev == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
        import contextlib

        return contextlib.nullcontext()

    rows = []
    prev = None
    print(f"torch {torch.__version__} on {name}: SDPA {backend}, {dtype}, {a.heads} heads x d {a.d}, causal")
    print(f"{'N':>8} {'fwd us/tok':>12} {'fwd+bwd us/tok':>15} {'peak f+b B/tok':>15}")
    for log2 in range(a.min_log2, a.max_log2 + 1):
        n = 1 << log2
        if prev is not None and 4.2 * prev * a.reps > a.budget:
            print(f"(stopping before N = {n}: over the {a.budget:.0f} s budget)")
            break
        g = torch.Generator(device="cpu").manual_seed(log2)
        q, k, v, do = (
            torch.randn(1, a.heads, n, a.d, generator=g).to(dev, dtype) for _ in range(4)
        )
        for t in (q, k, v):
            t.requires_grad_(True)

        def fwd():
            with ctx():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def timed(backward):
            ts = []
            for _ in range(a.reps):
                sync()
                t0 = time.perf_counter()
                o = fwd()
                if backward:
                    o.backward(do)
                sync()
                ts.append(time.perf_counter() - t0)
                del o
                for t in (q, k, v):
                    t.grad = None
            return statistics.median(ts)

        fwd()  # warm-up (and kernel selection)
        sync()
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            tf = timed(False)
        peak_f = torch.cuda.max_memory_allocated() if dev == "cuda" else 0
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        tfb = timed(True)
        peak_fb = torch.cuda.max_memory_allocated() if dev == "cuda" else 0
        prev = tf + tfb
        rows.append(
            dict(kind=f"torch-sdpa-{backend}", device=name, dtype=str(dtype), len=n, fwd_s=tf,
                 fwd_bwd_s=tfb, peak_fwd_bytes=peak_f, peak_fwd_bwd_bytes=peak_fb,
                 heads=a.heads, d_k=a.d)
        )
        print(f"{n:>8} {1e6 * tf / n:>12.4f} {1e6 * tfb / n:>15.4f} {peak_fb / n:>15.0f}")

    import os

    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "attention.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(a.out, "attention.csv"), "w") as f:
        keys = list(rows[0].keys()) if rows else []
        f.write(",".join(keys) + "\n")
        for r in rows:
            f.write(",".join(str(r[k]) for k in keys) + "\n")
    print(f"wrote {a.out}/attention.csv and attention.json")


if __name__ == "__main__":
    main()
