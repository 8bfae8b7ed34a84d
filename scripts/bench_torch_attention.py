#!/usr/bin/env python3
"""The best exact attention on this machine, for the LSH-vs-exact harness.

Runs PyTorch's scaled_dot_product_attention on the shapes of `examples/bench_attention`
(2 heads x d_k 64, causal, batch 1) for N = 2^10 ... 2^19, forward and forward+backward, and
records median times and peak memory. On a GPU the default backend is flash attention in bf16
(the fastest exact kernel PyTorch has); `--backends flash,efficient` adds the memory-efficient
kernel (which also runs f32). On a CPU (validation) it is the math backend in f32.

Stopping: before each length, the time of the next one is predicted from the last (x4.2 per
doubling: exact attention is quadratic) and the backend stops when the prediction for all its
repetitions passes --budget seconds; a single repetition that itself passes the budget also
stops it. An out-of-memory error is recorded as a row with status "oom" and stops the backend.

Writes <out>/attention.csv and <out>/attention.json after every length, in the schema of
`examples/bench_attention` (one chart can hold both: `bench_attention --also <out>/attention.json`):
kind, device, dtype, len, heads, d_k, chunk, reps, fwd_s, fwd_bwd_s, fwd_us_per_token,
fwd_bwd_us_per_token, peak_fwd_bytes, peak_fwd_bwd_bytes, driver_fwd_bytes,
driver_fwd_bwd_bytes, status.
Peaks (GPU: torch.cuda.max_memory_allocated, reset before each timed block) include the inputs
q, k, v and the output gradient; driver_* is the driver's used memory (torch.cuda.mem_get_info)
right after a pass, outputs still live, less its reading before the length's inputs existed
(it includes what PyTorch's caching allocator keeps). On a CPU the memory fields are empty.

    python3 scripts/bench_torch_attention.py --out bench/out/torch_attention
    python3 scripts/bench_torch_attention.py --device cpu --max-log2 12 --out /tmp/t   # validation
"""
import argparse
import json
import os
import statistics
import sys
import time

FIELDS = [
    "kind", "device", "dtype", "len", "heads", "d_k", "chunk", "reps", "fwd_s", "fwd_bwd_s",
    "fwd_us_per_token", "fwd_bwd_us_per_token", "peak_fwd_bytes", "peak_fwd_bwd_bytes",
    "driver_fwd_bytes", "driver_fwd_bwd_bytes", "status",
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--min-log2", type=int, default=10)
    ap.add_argument("--max-log2", type=int, default=19)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--backends", default=None,
                    help="comma list of flash, efficient, cudnn, math (default: flash on a GPU, "
                         "math on a CPU)")
    ap.add_argument("--dtype", default=None, choices=["bf16", "f16", "f32"],
                    help="default: bf16 for flash/cudnn, f32 otherwise")
    ap.add_argument("--budget", type=float, default=60.0,
                    help="seconds a length may take per backend (all repetitions), predicted")
    ap.add_argument("--reps", type=int, default=None,
                    help="repetitions per case (default: 10 on a GPU, 5 on a CPU; 3 from 2^17)")
    ap.add_argument("--out", default="bench/out/torch_attention")
    a = ap.parse_args(argv)
    if a.min_log2 > a.max_log2:
        ap.error("--min-log2 must not exceed --max-log2")
    if a.reps is not None and a.reps < 1:
        ap.error("--reps must be at least 1")
    return a


def fmt(x):
    return "" if x is None else str(x)


def write_rows(out, rows):
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, "attention.json.tmp")
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")
    os.replace(tmp, os.path.join(out, "attention.json"))
    with open(os.path.join(out, "attention.csv"), "w") as f:
        f.write(",".join(FIELDS) + "\n")
        for r in rows:
            f.write(",".join(fmt(r.get(k)).replace(",", " ") for k in FIELDS) + "\n")


def main(argv=None):
    a = parse_args(argv)
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        print(f"bench_torch_attention: PyTorch is not installed ({e})", file=sys.stderr)
        return 2

    if a.device == "cuda" and not torch.cuda.is_available():
        print("bench_torch_attention: --device cuda but torch.cuda.is_available() is False",
              file=sys.stderr)
        return 2
    dev = "cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu"
    if a.device == "auto" and dev == "cpu":
        print("bench_torch_attention: no CUDA device visible to PyTorch; running on the CPU")
    gpu = dev == "cuda"
    name = torch.cuda.get_device_name(0) if gpu else f"cpu ({torch.get_num_threads()} threads)"
    backends = (a.backends or ("flash" if gpu else "math")).split(",")
    backends = [b.strip() for b in backends if b.strip()]

    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel_of = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
        "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None),
    }
    dtypes = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}

    def sync():
        if gpu:
            torch.cuda.synchronize()

    def driver_used():
        if not gpu:
            return None
        free, total = torch.cuda.mem_get_info()
        return total - free

    print(f"torch {torch.__version__} on {name}: SDPA {','.join(backends)}, "
          f"{a.heads} heads x d_k {a.d}, causal, batch 1")
    print(f"{'kind':>24} {'N':>8} {'reps':>5} {'fwd us/tok':>12} {'fwd+bwd us/tok':>15} "
          f"{'peak f+b B/tok':>15}")
    rows = []
    for backend in backends:
        if kernel_of.get(backend) is None:
            print(f"bench_torch_attention: unknown or unavailable backend {backend!r}",
                  file=sys.stderr)
            continue
        dname = a.dtype or ("bf16" if backend in ("flash", "cudnn") else "f32")
        dtype = dtypes[dname]
        kind = f"torch-sdpa-{backend}"
        prev = None  # seconds of one fwd + one fwd+bwd at the previous length
        for log2 in range(a.min_log2, a.max_log2 + 1):
            n = 1 << log2
            reps = a.reps or ((10 if gpu else 5) if n < (1 << 17) else 3)
            if prev is not None:
                predicted = 4.2 * prev  # one fwd + one fwd+bwd at this length
                if predicted > a.budget:
                    print(f"({kind} stops before N = {n}: one repetition is predicted to take "
                          f"{predicted:.0f} s, over the {a.budget:.0f} s budget)")
                    break
                reps = max(1, min(reps, int(a.budget / predicted)))
            row = dict(kind=kind, device=name, dtype=dname, len=n, heads=a.heads, d_k=a.d,
                       chunk=None, reps=reps, fwd_s=None, fwd_bwd_s=None, fwd_us_per_token=None,
                       fwd_bwd_us_per_token=None, peak_fwd_bytes=None, peak_fwd_bwd_bytes=None,
                       driver_fwd_bytes=None, driver_fwd_bwd_bytes=None, status="ok")
            q = k = v = do = None
            try:
                if gpu:
                    torch.cuda.empty_cache()
                sync()
                base = driver_used()
                g = torch.Generator(device=dev).manual_seed(log2)
                q, k, v, do = (torch.randn(1, a.heads, n, a.d, generator=g, device=dev, dtype=dtype)
                               for _ in range(4))
                for t in (q, k, v):
                    t.requires_grad_(True)

                def one(backward):
                    sync()
                    t0 = time.perf_counter()
                    with sdpa_kernel([kernel_of[backend]]):
                        if backward:
                            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                            o.backward(do)
                        else:
                            with torch.no_grad():
                                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    sync()
                    secs = time.perf_counter() - t0
                    used = driver_used()
                    del o
                    for t in (q, k, v):
                        t.grad = None
                    return secs, used

                def timed(backward):
                    if gpu:
                        torch.cuda.reset_peak_memory_stats()
                    ts, drv = [], None
                    for _ in range(reps):
                        secs, used = one(backward)
                        ts.append(secs)
                        if used is not None and base is not None:
                            drv = max(drv or 0, used - base)
                        if secs > a.budget:
                            break
                    peak = torch.cuda.max_memory_allocated() if gpu else None
                    return statistics.median(ts), peak, drv, len(ts)

                warm_s, _ = one(True)  # kernel selection, allocator warm-up
                if warm_s > a.budget:
                    row["reps"] = 1
                    reps = 1
                tf, pf, df, nf = timed(False)
                tfb, pfb, dfb, nfb = timed(True)
                row.update(fwd_s=tf, fwd_bwd_s=tfb, fwd_us_per_token=1e6 * tf / n,
                           fwd_bwd_us_per_token=1e6 * tfb / n, peak_fwd_bytes=pf,
                           peak_fwd_bwd_bytes=pfb, driver_fwd_bytes=df, driver_fwd_bwd_bytes=dfb,
                           reps=min(nf, nfb))
                prev = tf + tfb
            except Exception as e:  # noqa: BLE001 - every failure becomes a row, then we stop
                oom = isinstance(e, getattr(torch, "OutOfMemoryError", ())) or \
                    "out of memory" in str(e).lower()
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                row["status"] = "oom" if oom else f"failed: {type(e).__name__}: {msg}"
            finally:
                q = k = v = do = None
                if gpu:
                    torch.cuda.empty_cache()
            rows.append(row)
            write_rows(a.out, rows)
            if row["status"] != "ok":
                print(f"{kind:>24} {n:>8}  {row['status']}")
                break
            peak = row["peak_fwd_bwd_bytes"]
            peak_tok = f"{peak / n:>15.0f}" if peak is not None else f"{'-':>15}"
            print(f"{kind:>24} {n:>8} {row['reps']:>5} {row['fwd_us_per_token']:>12.4f} "
                  f"{row['fwd_bwd_us_per_token']:>15.4f} {peak_tok}")

    write_rows(a.out, rows)
    print(f"wrote {a.out}/attention.csv and {a.out}/attention.json ({len(rows)} rows)")
    return 0 if any(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
