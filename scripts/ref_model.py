#!/usr/bin/env python3
"""An independent reimplementation of the cp6 byte-level Reformer LM in JAX (CPU), for checking
the Rust trainer: same parameter names and shapes as the Rust checkpoints, same forward
semantics (DESIGN.md), plain (non-reversible) residual form, autodiff gradients.

LSH layers are modelled by exact shared-QK attention (what LSH computes with one bucket); so
compare against Rust models trained with `--lsh-as exact` or `--lsh-as local`.

    python scripts/ref_model.py loss  CKPT.safetensors TEXT --len 1024 [--offset K]
    python scripts/ref_model.py train TEXT --len 1024 --steps 300 [--lr 1e-3 ...]

Needs: jax, numpy, safetensors (pip install jax numpy safetensors).
"""

import argparse
import json
import math
import struct
import sys
import time

import numpy as np
import jax
import jax.numpy as jnp

LN_EPS = 1e-6
SELF_SCORE = -1e5


# ----------------------------------------------------------------------------- config

def cp6_config(attention=None):
    return dict(
        n_layers=6, d_model=256, d_ff=512, n_heads=2, d_head=64,
        attention=attention or ["local", "exact"] * 3, chunk_len=64,
        axial_shape=(512, 1024), axial_dims=(64, 192),
    )


def parse_rust_config(text):
    kv = dict(item.split("=", 1) for item in text.split(";") if item)
    a1, a2 = (int(x) for x in kv["axial_shape"].split("x"))
    e1, e2 = (int(x) for x in kv["axial_dims"].split("+"))
    return dict(
        n_layers=int(kv["n_layers"]), d_model=int(kv["d_model"]), d_ff=int(kv["d_ff"]),
        n_heads=int(kv["n_heads"]), d_head=int(kv["d_head"]),
        attention=kv["attention"].split(","), chunk_len=int(kv["chunk_len"]),
        axial_shape=(a1, a2), axial_dims=(e1, e2),
    )


# ----------------------------------------------------------------------------- params

def init_params(cfg, key, emb_std=1.0, pos_std=1.0, out_scale=1.0):
    """Rust's init: embeddings N(0, emb_std), axial N(0, pos_std), projections N(0, 1/fan_in),
    biases 0, LN gain 1 / bias 0, head N(0, 1/(2d)). `out_scale` multiplies W_o and W2."""
    d, f, w = cfg["d_model"], cfg["d_ff"], cfg["n_heads"] * cfg["d_head"]
    (a1, a2), (e1, e2) = cfg["axial_shape"], cfg["axial_dims"]
    keys = iter(jax.random.split(key, 1000))
    n = lambda shape, std: std * jax.random.normal(next(keys), shape, jnp.float32)
    p = {
        "embed.tokens": n((256, d), emb_std),
        "embed.axial.0": n((a1, e1), pos_std),
        "embed.axial.1": n((a2, e2), pos_std),
    }
    for i, kind in enumerate(cfg["attention"]):
        pre = f"layers.{i}"
        p[f"{pre}.ln_attn.gamma"] = jnp.ones(d)
        p[f"{pre}.ln_attn.beta"] = jnp.zeros(d)
        if kind == "local":
            p[f"{pre}.attn.w_q"] = n((d, w), d ** -0.5)
            p[f"{pre}.attn.w_k"] = n((d, w), d ** -0.5)
        else:
            p[f"{pre}.attn.w_qk"] = n((d, w), d ** -0.5)
        p[f"{pre}.attn.w_v"] = n((d, w), d ** -0.5)
        p[f"{pre}.attn.w_o"] = n((w, d), out_scale * w ** -0.5)
        p[f"{pre}.ln_ff.gamma"] = jnp.ones(d)
        p[f"{pre}.ln_ff.beta"] = jnp.zeros(d)
        p[f"{pre}.ff.w1"] = n((d, f), d ** -0.5)
        p[f"{pre}.ff.b1"] = jnp.zeros(f)
        p[f"{pre}.ff.w2"] = n((f, d), out_scale * f ** -0.5)
        p[f"{pre}.ff.b2"] = jnp.zeros(d)
    p["head.norm.gamma"] = jnp.ones(2 * d)
    p["head.norm.beta"] = jnp.zeros(2 * d)
    p["head.weight"] = n((2 * d, 256), (2 * d) ** -0.5)
    p["head.bias"] = jnp.zeros(256)
    return p


def load_safetensors(path):
    """Tensors (f32) and the string metadata of a safetensors file, without the library."""
    with open(path, "rb") as fh:
        raw = fh.read()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + hlen])
    meta = header.pop("__metadata__", {})
    base = 8 + hlen
    out = {}
    for name, info in header.items():
        if info["dtype"] != "F32":
            continue
        s, e = info["data_offsets"]
        out[name] = np.frombuffer(raw[base + s : base + e], dtype="<f4").reshape(info["shape"])
    return out, meta


# ----------------------------------------------------------------------------- forward

def layer_norm(x, g, b):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + LN_EPS) * g + b


def split_heads(x, h, dh):
    n = x.shape[0]
    return x.reshape(n, h, dh).transpose(1, 0, 2)  # [h, n, dh]


def local_attention(q, k, v, chunk):
    """Chunk c attends to chunks c-1 and c (causal), scores scaled by 1/sqrt(dh)."""
    h, n, dh = q.shape
    pos = jnp.arange(n)
    qc, kc = pos[:, None] // chunk, pos[None, :] // chunk
    allowed = (pos[None, :] <= pos[:, None]) & (kc >= qc - 1) & (kc <= qc)
    s = jnp.einsum("hid,hjd->hij", q, k) / math.sqrt(dh)
    s = jnp.where(allowed[None], s, -jnp.inf)
    return jnp.einsum("hij,hjd->hid", jax.nn.softmax(s, -1), v)


def exact_shared_qk(qk, v):
    """Keys are unit vectors, queries raw, no scaling, causal, self score -1e5."""
    h, n, dh = qk.shape
    k = qk / jnp.sqrt((qk * qk).sum(-1, keepdims=True))
    s = jnp.einsum("hid,hjd->hij", qk, k)
    pos = jnp.arange(n)
    s = jnp.where(pos[:, None] == pos[None, :], SELF_SCORE, s)
    s = jnp.where((pos[None, :] <= pos[:, None])[None], s, -jnp.inf)
    return jnp.einsum("hij,hjd->hid", jax.nn.softmax(s, -1), v)


def forward_logits(p, cfg, tokens):
    d, h, dh = cfg["d_model"], cfg["n_heads"], cfg["d_head"]
    (a1, a2), (e1, e2) = cfg["axial_shape"], cfg["axial_dims"]
    n = tokens.shape[0]
    pos = jnp.arange(n)
    x = p["embed.tokens"][tokens] + jnp.concatenate(
        [p["embed.axial.0"][pos // a2], p["embed.axial.1"][pos % a2]], -1
    )
    x1, x2 = x, x
    for i, kind in enumerate(cfg["attention"]):
        pre = f"layers.{i}"
        ln = layer_norm(x2, p[f"{pre}.ln_attn.gamma"], p[f"{pre}.ln_attn.beta"])
        v = split_heads(ln @ p[f"{pre}.attn.w_v"], h, dh)
        if kind == "local":
            q = split_heads(ln @ p[f"{pre}.attn.w_q"], h, dh)
            k = split_heads(ln @ p[f"{pre}.attn.w_k"], h, dh)
            o = local_attention(q, k, v, cfg["chunk_len"])
        else:
            qk = split_heads(ln @ p[f"{pre}.attn.w_qk"], h, dh)
            o = exact_shared_qk(qk, v)
        o = o.transpose(1, 0, 2).reshape(n, h * dh)
        y1 = x1 + o @ p[f"{pre}.attn.w_o"]
        ln = layer_norm(y1, p[f"{pre}.ln_ff.gamma"], p[f"{pre}.ln_ff.beta"])
        hid = jax.nn.relu(ln @ p[f"{pre}.ff.w1"] + p[f"{pre}.ff.b1"])
        y2 = x2 + hid @ p[f"{pre}.ff.w2"] + p[f"{pre}.ff.b2"]
        x1, x2 = y1, y2
    hcat = layer_norm(jnp.concatenate([x1, x2], -1), p["head.norm.gamma"], p["head.norm.beta"])
    return hcat @ p["head.weight"] + p["head.bias"]


def mean_loss(p, cfg, window):
    """Mean next-byte cross-entropy (nats) of a window of len+1 bytes."""
    logits = forward_logits(p, cfg, window[:-1])
    lse = jax.nn.logsumexp(logits, -1)
    return (lse - jnp.take_along_axis(logits, window[1:, None], -1)[:, 0]).mean()


# ----------------------------------------------------------------------------- training

def lr_at(step, lr, warmup, total, final_fraction=0.1):
    if step < warmup:
        return lr * (step + 1) / warmup
    prog = min((step - warmup) / max(total - warmup, 1), 1.0)
    return lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * prog)))


def cmd_loss(args):
    tensors, meta = load_safetensors(args.checkpoint)
    if "config" not in meta:
        sys.exit(f"no config in the metadata of {args.checkpoint}: {list(meta)}")
    cfg = parse_rust_config(meta["config"])
    # Tensor names: param.NNNN.NAME (the moments, adam.*, are not needed).
    p = {k.split(".", 2)[2]: jnp.asarray(v) for k, v in tensors.items() if k.startswith("param.")}
    data = np.frombuffer(open(args.text, "rb").read(), dtype=np.uint8)
    fn = jax.jit(lambda p, w: mean_loss(p, cfg, w))
    if args.valid_windows:
        # The Rust trainer's validation windows: the last 5% of the file, evenly spaced.
        valid = data[len(data) - round(len(data) * 0.05) :]
        n_len = min(args.len, len(valid) - 1) + 1
        room = len(valid) - n_len
        n = min(args.valid_windows, max(len(valid) // n_len, 1))
        offs = [room * i // (n - 1) if n > 1 else 0 for i in range(n)]
        losses = [float(fn(p, jnp.asarray(valid[o : o + n_len].astype(np.int32)))) for o in offs]
        loss = float(np.mean(losses))
    else:
        window = jnp.asarray(data[args.offset : args.offset + args.len + 1].astype(np.int32))
        loss = float(fn(p, window))
    print(json.dumps({"loss_nats": loss, "bits": loss / math.log(2), "len": args.len,
                      "offset": args.offset, "valid_windows": args.valid_windows}))


def cmd_train(args):
    cfg = cp6_config(["local"] * 6 if args.local_only else None)
    data = np.frombuffer(open(args.text, "rb").read(), dtype=np.uint8)
    n_valid = round(len(data) * 0.05)
    train, valid = data[: len(data) - n_valid], data[len(data) - n_valid :]
    p = init_params(cfg, jax.random.PRNGKey(args.seed), args.emb_std, args.pos_std,
                    args.out_scale)
    m = jax.tree_util.tree_map(jnp.zeros_like, p)
    v = jax.tree_util.tree_map(jnp.zeros_like, p)
    b1, b2, eps = args.beta1, args.beta2, args.eps

    def batch_loss(p, windows):
        return jnp.mean(jax.vmap(lambda w: mean_loss(p, cfg, w))(windows))

    @jax.jit
    def step_fn(p, m, v, windows, lr, t):
        loss, g = jax.value_and_grad(batch_loss)(p, windows)
        gn = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(g)))
        clip = jnp.where(gn > args.clip, args.clip / gn, 1.0) if args.clip > 0 else 1.0
        g = jax.tree_util.tree_map(lambda x: x * clip, g)
        m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
        v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g)
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        p = jax.tree_util.tree_map(
            lambda p, m, v: p - lr * (m / c1) / (jnp.sqrt(v / c2) + eps), p, m, v)
        return p, m, v, loss, gn

    eval_fn = jax.jit(lambda p, w: mean_loss(p, cfg, w))
    L = args.len
    room = len(valid) - (L + 1)
    vw = [jnp.asarray(valid[room * i // 3 : room * i // 3 + L + 1].astype(np.int32))
          for i in range(4)]
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    for step in range(args.steps):
        offs = rng.integers(0, len(train) - L - 1, size=args.batch)
        windows = jnp.asarray(np.stack([train[o : o + L + 1] for o in offs]).astype(np.int32))
        lr = lr_at(step, args.lr, args.warmup, args.steps)
        p, m, v, loss, gn = step_fn(p, m, v, windows, lr, step + 1)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val = float(np.mean([float(eval_fn(p, w)) for w in vw]))
            print(f"step {step + 1} tokens {(step + 1) * L * args.batch} "
                  f"train {float(loss) / math.log(2):.3f} val {val / math.log(2):.4f} bits/byte "
                  f"gnorm {float(gn):.3f} lr {lr:.2e} {time.time() - t0:.0f}s", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("loss")
    a.add_argument("checkpoint")
    a.add_argument("text")
    a.add_argument("--len", type=int, default=1024)
    a.add_argument("--offset", type=int, default=0)
    a.add_argument("--valid-windows", type=int, default=0,
                   help="mean over the Rust trainer's N validation windows instead")
    t = sub.add_parser("train")
    t.add_argument("text")
    t.add_argument("--len", type=int, default=1024)
    t.add_argument("--batch", type=int, default=1)
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--lr", type=float, default=0.01)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--beta1", type=float, default=0.86)
    t.add_argument("--beta2", type=float, default=0.92)
    t.add_argument("--eps", type=float, default=1e-9)
    t.add_argument("--clip", type=float, default=1.0)
    t.add_argument("--emb-std", type=float, default=1.0)
    t.add_argument("--pos-std", type=float, default=1.0)
    t.add_argument("--out-scale", type=float, default=1.0)
    t.add_argument("--local-only", action="store_true")
    t.add_argument("--eval-every", type=int, default=50)
    t.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    {"loss": cmd_loss, "train": cmd_train}[args.cmd](args)


if __name__ == "__main__":
    main()
