//! bf16 activation storage in the one model, on the CPU backend: the head-layout activations
//! (q, k, v, qk, the attention output and its gradient) rounded to bf16 where the GPU stores
//! them, everything else f32. Compared with the same model storing f32, at the tolerances
//! stated in `model_common::bf16` (without LSH: loss 1e-4 relative, each gradient tensor
//! within 0.1 in norm ratio, all together 3e-2; with LSH, whose buckets are hashed from the
//! rounded `qk`: 2e-3, 0.25 and 0.1). Each comparison also checks that the bf16 run is not the f32 run (the
//! rounding happened), and the backend test that stored activations hold bf16 values exactly.

mod model_common;
mod reference;

use model_common::bf16::{compare, NO_HASH, WITH_LSH};
use reformer::backend::{AttnCall, Backend, CpuBackend, DType, HeadShape, Strided};
use reformer::{Attention, ModelConfig};
use reformer_engine::{MemoryPool, Rng};

fn is_bf16(x: f32) -> bool {
    x.is_nan() || x.to_bits() & 0xffff == 0
}

fn cpu(act: DType) -> CpuBackend {
    CpuBackend::poisoned(&MemoryPool::unlimited())
        .with_act_dtype(act)
        .unwrap()
}

#[test]
fn local_and_exact_attention_with_bf16_activations_stay_within_the_stated_tolerance() {
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.n_layers = 2;
    cfg.attention = vec![Attention::Local, Attention::Exact];
    cfg.head_group = 1;
    cfg.dropout = 0.1;
    cfg.ff_chunk = 12;
    cfg.loss_chunk = 7;
    compare(cpu(DType::F32), cpu(DType::BF16), &cfg, 45, 7, NO_HASH);
}

#[test]
fn every_attention_kind_with_bf16_activations_stays_within_the_stated_tolerance() {
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.n_layers = 3;
    cfg.attention = vec![Attention::Local, Attention::Lsh, Attention::Exact];
    cfg.head_group = 1;
    cfg.dropout = 0.1;
    cfg.ff_chunk = 12;
    cfg.loss_chunk = 7;
    compare(cpu(DType::F32), cpu(DType::BF16), &cfg, 45, 7, WITH_LSH);
}

#[test]
fn cp6_with_bf16_activations_at_2048_tokens_stays_within_the_stated_tolerance() {
    let mut cfg = ModelConfig::preset("cp6").unwrap();
    cfg.n_rounds = 2;
    cfg.ff_chunk = 512;
    cfg.loss_chunk = 512;
    compare(cpu(DType::F32), cpu(DType::BF16), &cfg, 2048, 3, WITH_LSH);
    // Its local layers alone: the rounding without hash moves.
    for a in cfg.attention.iter_mut() {
        *a = Attention::Local;
    }
    compare(cpu(DType::F32), cpu(DType::BF16), &cfg, 2048, 3, NO_HASH);
}

#[test]
fn host_backend_stores_bf16_values_where_the_gpu_stores_bf16() {
    let pool = MemoryPool::unlimited();
    let b = CpuBackend::new(&pool).with_act_dtype(DType::BF16).unwrap();
    assert_eq!(b.act_dtype(), DType::BF16);
    let mut rng = Rng::new(5);
    let (rows, cols) = (6, 8);
    let host: Vec<f32> = (0..rows * cols).map(|_| rng.normal()).collect();
    let src = b.upload(&[rows, cols], &host).unwrap();
    let mut act = b.alloc_act(&[1, rows, cols]).unwrap();
    b.copy_to_act(
        &src,
        Strided::new(0, cols),
        &mut act,
        Strided::new(0, cols),
        rows,
        cols,
    )
    .unwrap();
    let stored = b.download_act(&act).unwrap();
    for (s, h) in stored.iter().zip(&host) {
        assert!(is_bf16(*s), "{s} is not a bf16 value");
        assert_eq!(
            *s,
            reformer_kernels::gpu::bf16::from_f32(*h).to_f32(),
            "rounding of {h}"
        );
    }
    assert!(stored.iter().zip(&host).any(|(s, h)| s != h));
    // The attention output is stored rounded too.
    let shape = HeadShape {
        heads: 1,
        len: rows,
        d: cols,
    };
    let mut v = b.alloc_act(&[1, rows, cols]).unwrap();
    b.copy_to_act(
        &src,
        Strided::new(0, cols),
        &mut v,
        Strided::new(0, cols),
        rows,
        cols,
    )
    .unwrap();
    let call = AttnCall {
        shape,
        chunk: 4,
        causal: true,
        mask: None,
    };
    let (out, _) = b.local_forward(&act, &act, &v, &call).unwrap();
    assert!(b.download_act(&out).unwrap().iter().all(|&x| is_bf16(x)));
    // f16 has no kernels: a typed error, not a silent f32.
    assert!(CpuBackend::new(&pool).with_act_dtype(DType::F16).is_err());
}
