#!/usr/bin/env python3
"""Hugging Face's Reformer, the same shape as our cp6, one training step on the CPU.

The baseline for "the CPU training step against Hugging Face's Reformer with the same shape":
`ReformerModelWithLMHead` with 6 layers alternating local and LSH attention, d_model 256,
d_ff 512, 2 heads x 64, chunks of 64, one hash round, the bucket count our model uses at each
length (the power of two nearest 2N/64, factorised above 128), axial positions (512, 1024)
with dims (64, 192) (HF trains only at the shape's full length, so the shape is
(2^floor(k/2), 2^ceil(k/2)) at 2^k), byte vocabulary, dropout 0.05, reversible layers (HF always is), feed-
forward chunking as ours (2048 positions). One step = forward with the loss, backward, Adam.
Reported per length: the median step time over --steps timed steps after one warm-up step,
tokens/s, the process's peak RSS after the run, the loss.

    python3 scripts/bench_hf_reformer_step.py --lens 14,16 --steps 3 --threads 2 --out hf.json
"""
import argparse
import json
import math
import resource
import statistics
import sys
import time


def buckets_for(n, chunk=64):
    target = max(2.0 * n / chunk, 2.0)
    exp = max(round(math.log2(target)), 1)
    b = 1 << exp
    if b > 128:
        b1 = 1 << (exp // 2)
        return [b1, b // b1]
    return b


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lens", default="14,16", help="log2 of the sequence lengths")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch
    from transformers import ReformerConfig, ReformerModelWithLMHead

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for log2 in [int(x) for x in args.lens.split(",")]:
        n = 1 << log2
        cfg = ReformerConfig(
            vocab_size=256,
            hidden_size=256,
            feed_forward_size=512,
            num_attention_heads=2,
            attention_head_size=64,
            attn_layers=["local", "lsh"] * 3,
            local_attn_chunk_length=64,
            local_num_chunks_before=1,
            local_num_chunks_after=0,
            lsh_attn_chunk_length=64,
            lsh_num_chunks_before=1,
            lsh_num_chunks_after=0,
            num_hashes=1,
            num_buckets=buckets_for(n),
            axial_pos_embds=True,
            # HF trains only at the axial shape's full length: a shape of n positions.
            axial_pos_shape=(1 << (log2 // 2), 1 << (log2 - log2 // 2)),
            axial_pos_embds_dim=(64, 192),
            max_position_embeddings=n,
            hidden_dropout_prob=0.05,
            attention_probs_dropout_prob=0.05,
            lsh_attention_probs_dropout_prob=0.05,
            local_attention_probs_dropout_prob=0.05,
            chunk_size_lm_head=min(2048, n),
            chunk_size_feed_forward=min(2048, n),
            is_decoder=True,
            pad_token_id=0,
            eos_token_id=1,
        )
        model = ReformerModelWithLMHead(cfg)
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        ids = torch.randint(0, 256, (1, n))
        times, loss = [], None
        for step in range(args.steps + 1):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            opt.step()
            dt = time.perf_counter() - t0
            loss = out.loss.item()
            if step > 0:
                times.append(dt)
            print(f"hf reformer cp6 n=2^{log2} step {step}: {dt:.2f} s, loss {loss:.3f}",
                  flush=True)
        med = statistics.median(times)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        row = dict(preset="cp6", len=n, s_median=med, s_all=times, tokens_per_s=n / med,
                   peak_rss_bytes=rss, loss=loss, threads=args.threads,
                   buckets=buckets_for(n), torch=torch.__version__)
        print(json.dumps(row), flush=True)
        rows.append(row)
        del model, opt, out
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
