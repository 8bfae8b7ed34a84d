//! Criterion benches of the attention kernels at N = 2^12 and 2^16 (2 heads × d_k 64,
//! chunk 64): LSH forward and forward+backward with 1, 2 and 4 rounds, local attention, and
//! blockwise exact attention (forward+backward at 2^12; forward only at 2^16, where one
//! iteration takes tens of seconds on a laptop CPU).
//!
//! cargo bench --bench attention

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use reformer_engine::{MemoryPool, Rng, Tensor};
use reformer_lsh::*;

const HEADS: usize = 2;
const D: usize = 64;
const CHUNK: usize = 64;

fn inputs(len: usize) -> (Tensor, Tensor, Tensor) {
    let pool = MemoryPool::unlimited();
    let mut rng = Rng::new(1);
    let t = |rng: &mut Rng| Tensor::randn(&pool, &[HEADS, len, D], 1.0, rng).expect("bench input");
    (t(&mut rng), t(&mut rng), t(&mut rng))
}

fn attention(c: &mut Criterion) {
    for log2 in [12u32, 16] {
        let len = 1usize << log2;
        let (qk, v, g) = inputs(len);
        let mut group = c.benchmark_group(format!("attention_2^{log2}"));
        group
            .sample_size(10)
            .throughput(Throughput::Elements(len as u64));
        let cfg = LshConfig {
            chunk_len: CHUNK,
            causal: true,
        };
        for rounds in [1, 2, 4] {
            let rot = Rotations::random(D, rounds, Buckets::auto(len, CHUNK), &mut Rng::new(2))
                .expect("rotations");
            group.bench_function(BenchmarkId::new("lsh_fwd", rounds), |b| {
                b.iter(|| lsh_attention_forward(&qk, &v, &rot, &cfg, None).expect("lsh forward"))
            });
            group.bench_function(BenchmarkId::new("lsh_fwd_bwd", rounds), |b| {
                b.iter(|| {
                    let (o, s) =
                        lsh_attention_forward(&qk, &v, &rot, &cfg, None).expect("lsh forward");
                    lsh_attention_backward(&qk, &v, &o, &g, &s, &rot, &cfg, None)
                        .expect("lsh backward")
                })
            });
        }
        let lcfg = LocalConfig {
            chunk_len: CHUNK,
            causal: true,
        };
        group.bench_function("local_fwd_bwd", |b| {
            b.iter(|| {
                let (o, lse) =
                    local_attention_forward(&qk, &qk, &v, &lcfg, None).expect("local forward");
                local_attention_backward(&qk, &qk, &v, &o, &lse, &g, &lcfg, None)
                    .expect("local backward")
            })
        });
        let rule = shared_qk_rule(true);
        let k = unit_keys(&qk).expect("keys");
        if log2 <= 12 {
            group.bench_function("exact_fwd_bwd", |b| {
                b.iter(|| {
                    let (o, lse) =
                        exact_attention_forward(&qk, &k, &v, rule, None).expect("exact forward");
                    exact_attention_backward(&qk, &k, &v, &o, &lse, &g, rule, None)
                        .expect("exact backward")
                })
            });
        } else {
            group.bench_function("exact_fwd", |b| {
                b.iter(|| exact_attention_forward(&qk, &k, &v, rule, None).expect("exact forward"))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, attention);
criterion_main!(benches);
