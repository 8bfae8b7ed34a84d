#!/usr/bin/env python3
"""Whole-step PyTorch baseline for the Reformer presets (issue 5, item 4).

A standard pre-LN decoder-only transformer with the sizes of our presets — byte vocabulary 256,
token embedding plus axial position embedding (the same two concatenated tables as ours),
`layers` x [x + proj(SDPA(qkv(LN(x)))); x + W2 relu(W1 LN(x) + b1) + b2], final LN, linear head
to 256 — with exact causal attention through torch's scaled_dot_product_attention (flash backend
on a GPU). One training step is forward, cross-entropy loss over every position, backward and
Adam; batch 1. Reported per (preset, length): the median step time over --steps timed steps
after --warmup untimed ones, tokens/s, the peak of torch.cuda.max_memory_allocated over the timed
steps (parameters, gradients and Adam state included), the driver's used memory, the loss, and
"oom" when the step does not fit.

Presets (as DESIGN.md; ours alternate local and LSH attention in reversible blocks, this one is
exact attention in ordinary residual blocks, so it stores every layer's activations):

    cp6     6 layers, d_model 256,  d_ff 512,  2 heads x 64, axial (512, 1024) dims (64, 192)
    deep20  20 layers, d_model 256, d_ff 512,  2 heads x 64, axial (512, 1024) dims (64, 192)
    wide20  20 layers, d_model 1024, d_ff 4096, 8 heads x 128, axial (512, 1024) dims (256, 768)

On a GPU the default is bf16 autocast (f32 master weights and Adam state), which flash attention
needs; `--dtype f32 --attn-backend efficient` runs everything in f32. On a CPU (validation) it is
f32 with the math backend. `--checkpoint` recomputes each block in the backward
(torch.utils.checkpoint), the usual way to fit longer sequences.

    python3 scripts/bench_torch_step.py --out bench/out/torch_step.json
    python3 scripts/bench_torch_step.py --device cpu --presets cp6 --lens 10,11 --out /tmp/s.json
"""
import argparse
import gc
import json
import os
import statistics
import sys
import time

PRESETS = {
    "cp6": dict(layers=6, d_model=256, d_ff=512, heads=2, d_k=64, axial=(512, 1024),
                axial_dims=(64, 192)),
    "deep20": dict(layers=20, d_model=256, d_ff=512, heads=2, d_k=64, axial=(512, 1024),
                   axial_dims=(64, 192)),
    "wide20": dict(layers=20, d_model=1024, d_ff=4096, heads=8, d_k=128, axial=(512, 1024),
                   axial_dims=(256, 768)),
}
VOCAB = 256


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="cp6,wide20", help="comma list of " + ", ".join(PRESETS))
    ap.add_argument("--lens", default="14,15,16",
                    help="comma list of lengths, as log2 (<= 30) or as token counts")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layers")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per case")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--dtype", default=None, choices=["bf16", "f16", "f32"],
                    help="autocast type (default bf16 on a GPU, f32 on a CPU)")
    ap.add_argument("--attn-backend", default=None, choices=["flash", "efficient", "cudnn", "math"],
                    help="SDPA backend (default flash on a GPU, math on a CPU)")
    ap.add_argument("--checkpoint", action="store_true", help="recompute blocks in the backward")
    ap.add_argument("--budget", type=float, default=120.0,
                    help="seconds one case may take (warmup + timed steps), predicted")
    ap.add_argument("--deadline", type=float, default=None,
                    help="stop starting new cases after this many seconds in all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/out/torch_step.json")
    a = ap.parse_args(argv)
    a.presets = [p.strip() for p in a.presets.split(",") if p.strip()]
    for p in a.presets:
        if p not in PRESETS:
            ap.error(f"unknown preset {p!r} (known: {', '.join(PRESETS)})")
    lens = []
    for s in a.lens.split(","):
        s = s.strip()
        if not s:
            continue
        try:
            x = int(s)
        except ValueError:
            ap.error(f"--lens: {s!r} is not an integer")
        if x <= 0:
            ap.error(f"--lens: {x} must be positive")
        lens.append(1 << x if x <= 30 else x)
    if not lens:
        ap.error("--lens is empty")
    a.lens = sorted(set(lens))
    if a.steps < 1 or a.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    if a.layers is not None and a.layers < 1:
        ap.error("--layers must be at least 1")
    return a


def build_model(torch, cfg, kernel, checkpoint):
    nn = torch.nn
    F = torch.nn.functional
    from torch.nn.attention import sdpa_kernel

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            d, inner = cfg["d_model"], cfg["heads"] * cfg["d_k"]
            self.ln1 = nn.LayerNorm(d)
            self.qkv = nn.Linear(d, 3 * inner, bias=False)
            self.proj = nn.Linear(inner, d, bias=False)
            self.ln2 = nn.LayerNorm(d)
            self.ff1 = nn.Linear(d, cfg["d_ff"])
            self.ff2 = nn.Linear(cfg["d_ff"], d)

        def forward(self, x):
            b, n, _ = x.shape
            h, dk = cfg["heads"], cfg["d_k"]
            q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, h, dk).permute(2, 0, 3, 1, 4)
            with sdpa_kernel([kernel]):
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(a.transpose(1, 2).reshape(b, n, h * dk))
            return x + self.ff2(F.relu(self.ff1(self.ln2(x))))

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            d = cfg["d_model"]
            (a1, a2), (e1, e2) = cfg["axial"], cfg["axial_dims"]
            self.a2 = a2
            self.emb = nn.Embedding(VOCAB, d)
            self.pos1 = nn.Parameter(torch.randn(a1, e1) * 0.02)
            self.pos2 = nn.Parameter(torch.randn(a2, e2) * 0.02)
            self.blocks = nn.ModuleList(Block() for _ in range(cfg["layers"]))
            self.ln_f = nn.LayerNorm(d)
            self.head = nn.Linear(d, VOCAB)

        def forward(self, tokens, targets):
            n = tokens.shape[1]
            p = torch.arange(n, device=tokens.device)
            pos = torch.cat([self.pos1[p // self.a2], self.pos2[p % self.a2]], dim=-1)
            x = self.emb(tokens) + pos
            for blk in self.blocks:
                if checkpoint and self.training:
                    x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
                else:
                    x = blk(x)
            logits = self.head(self.ln_f(x))
            return F.cross_entropy(logits.float().view(-1, VOCAB), targets.reshape(-1))

    return LM()


def main(argv=None):
    a = parse_args(argv)
    try:
        import torch
    except ImportError as e:
        print(f"bench_torch_step: PyTorch is not installed ({e})", file=sys.stderr)
        return 2
    from torch.nn.attention import SDPBackend

    if a.device == "cuda" and not torch.cuda.is_available():
        print("bench_torch_step: --device cuda but torch.cuda.is_available() is False",
              file=sys.stderr)
        return 2
    gpu = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    if a.device == "auto" and not gpu:
        print("bench_torch_step: no CUDA device visible to PyTorch; running on the CPU")
    dev = "cuda" if gpu else "cpu"
    dname = a.dtype or ("bf16" if gpu else "f32")
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dname]
    backend = a.attn_backend or ("flash" if gpu else "math")
    kernel = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", SDPBackend.FLASH_ATTENTION),
        "math": SDPBackend.MATH,
    }[backend]
    device_name = torch.cuda.get_device_name(0) if gpu else f"cpu ({torch.get_num_threads()} threads)"
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    meta = dict(
        script="scripts/bench_torch_step.py", torch=torch.__version__,
        cuda=torch.version.cuda if gpu else None, device=device_name, dtype=dname,
        attn_backend=backend, tf32_matmul=gpu, checkpoint=a.checkpoint, steps=a.steps, warmup=a.warmup,
        batch=1, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        args=sys.argv[1:] if argv is None else list(argv),
    )
    rows = []

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
            f.write("\n")
        os.replace(tmp, a.out)

    def sync():
        if gpu:
            torch.cuda.synchronize()

    def driver_used():
        if not gpu:
            return None
        free, total = torch.cuda.mem_get_info()
        return total - free

    def autocast():
        if dtype == torch.float32:
            import contextlib
            return contextlib.nullcontext()
        return torch.autocast(device_type=dev, dtype=dtype)

    print(f"torch {torch.__version__} on {device_name}: pre-LN transformer, exact causal "
          f"attention (SDPA {backend}), {dname}{' + checkpointing' if a.checkpoint else ''}, "
          f"batch 1, median of {a.steps} steps after {a.warmup}")
    print(f"{'preset':>8} {'N':>8} {'params':>11} {'step s':>9} {'tokens/s':>10} "
          f"{'peak GiB':>9} {'peak B/tok':>11} {'loss':>7}  status")
    t_start = time.perf_counter()
    for preset in a.presets:
        cfg = dict(PRESETS[preset])
        if a.layers is not None:
            cfg["layers"] = a.layers
        capacity = cfg["axial"][0] * cfg["axial"][1]
        prev_step = prev_n = None
        oom_at = None
        for n in a.lens:
            row = dict(kind="torch-step", preset=preset, layers=cfg["layers"],
                       d_model=cfg["d_model"], d_ff=cfg["d_ff"], heads=cfg["heads"],
                       d_k=cfg["d_k"], len=n, batch=1, device=device_name, dtype=dname,
                       attn_backend=backend, tf32_matmul=gpu, checkpoint=a.checkpoint, params=None, steps=0,
                       step_s=None, step_s_all=[], tokens_per_s=None, peak_bytes=None,
                       peak_bytes_per_token=None, driver_used_bytes=None, loss=None,
                       status="ok")
            if a.deadline is not None and time.perf_counter() - t_start > a.deadline:
                print(f"(deadline of {a.deadline:.0f} s passed: stopping before {preset} N = {n})")
                row["status"] = "skipped: deadline"
                rows.append(row)
                save()
                continue
            if n > capacity:
                row["status"] = f"skipped: N exceeds the axial capacity {capacity}"
                rows.append(row)
                save()
                continue
            if oom_at is not None:
                row["status"] = f"skipped: out of memory at N = {oom_at}"
                rows.append(row)
                save()
                print(f"{preset:>8} {n:>8}  {row['status']}")
                continue
            steps = a.steps
            if prev_step is not None:
                # Attention is quadratic: assume the step grows with the square of the length.
                predicted = prev_step * (n / prev_n) ** 2
                if predicted * (a.warmup + 1) > a.budget:
                    row["status"] = f"skipped: predicted {predicted:.0f} s per step, over budget"
                    rows.append(row)
                    save()
                    print(f"{preset:>8} {n:>8}  {row['status']}")
                    continue
                steps = max(1, min(steps, int(a.budget / predicted) - a.warmup))
            model = opt = None
            try:
                if gpu:
                    torch.cuda.empty_cache()
                    sync()
                base = driver_used()
                torch.manual_seed(a.seed)
                model = build_model(torch, cfg, kernel, a.checkpoint).to(dev)
                model.train()
                params = sum(p.numel() for p in model.parameters())
                row["params"] = params
                kw = dict(lr=1e-3, betas=(0.86, 0.92), eps=1e-9)
                try:
                    opt = torch.optim.Adam(model.parameters(), fused=gpu, **kw)
                except (TypeError, RuntimeError):
                    opt = torch.optim.Adam(model.parameters(), **kw)
                g = torch.Generator(device="cpu").manual_seed(a.seed + n)
                data = torch.randint(0, VOCAB, (1, n + 1), generator=g).to(dev)
                tokens, targets = data[:, :-1], data[:, 1:]

                def step():
                    sync()
                    t0 = time.perf_counter()
                    opt.zero_grad(set_to_none=True)
                    with autocast():
                        loss = model(tokens, targets)
                    loss.backward()
                    opt.step()
                    sync()
                    return time.perf_counter() - t0, float(loss.detach())

                for _ in range(a.warmup):
                    s, _ = step()
                    if s * steps > a.budget:
                        steps = max(1, int(a.budget / s))
                if gpu:
                    torch.cuda.reset_peak_memory_stats()
                times, loss, used = [], None, None
                for _ in range(steps):
                    s, loss = step()
                    times.append(s)
                    u = driver_used()
                    if u is not None and base is not None:
                        used = max(used or 0, u - base)
                med = statistics.median(times)
                peak = torch.cuda.max_memory_allocated() if gpu else None
                row.update(steps=len(times), step_s=med, step_s_all=times, tokens_per_s=n / med,
                           peak_bytes=peak, peak_bytes_per_token=(peak / n if peak else None),
                           driver_used_bytes=used, loss=loss)
                prev_step, prev_n = med, n
            except Exception as e:  # noqa: BLE001 - every failure becomes a row
                oom = isinstance(e, getattr(torch, "OutOfMemoryError", ())) or \
                    "out of memory" in str(e).lower()
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                row["status"] = "oom" if oom else f"failed: {type(e).__name__}: {msg}"
            finally:
                model = opt = None
                gc.collect()
                if gpu:
                    torch.cuda.empty_cache()
            rows.append(row)
            save()
            if row["status"] != "ok":
                print(f"{preset:>8} {n:>8} {row['params'] or 0:>11}  {row['status']}")
                if row["status"] == "oom":
                    oom_at = n  # longer lengths will not fit either
                continue
            peak = row["peak_bytes"]
            peak_gib = f"{peak / 2**30:>9.2f}" if peak else f"{'-':>9}"
            peak_tok = f"{peak / n:>11.0f}" if peak else f"{'-':>11}"
            print(f"{preset:>8} {n:>8} {row['params']:>11} {row['step_s']:>9.3f} "
                  f"{row['tokens_per_s']:>10.0f} {peak_gib} {peak_tok} {row['loss']:>7.3f}  ok")
    save()
    print(f"wrote {a.out} ({len(rows)} rows)")
    return 0 if any(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
