//! The initial parameter values of a config, on the host, in [`crate::model::param_specs`]
//! order. Every stream is a pure function of `cfg.seed` and labels, so a model starts from the
//! same values on every backend:
//!
//! * `embed.tokens` `N(0, 1)` from the model seed's fork 1001; the axial tables `N(0, 1)`, in
//!   turn, from fork 1002;
//! * layer `i`'s attention weights `N(0, 1/fan_in)` (`w_qk` or `w_q`, `w_k`, then `w_v`, `w_o`)
//!   from the layer seed's parameter stream 0, its feed-forward weights (`w1`, `w2`) from stream
//!   1; layer-norm gains 1, every bias and layer-norm shift 0;
//! * `head.weight` `N(0, 1/(2·d_model))` from fork 1003, `head.bias` 0.

use reformer_engine::Rng;
use reformer_reversible::{param_stream, AttentionKind};

use crate::config::{ModelConfig, VOCAB};

/// `n` draws of `N(0, std²)` from `rng`.
fn normal(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    let mut v = vec![0.0; n];
    rng.fill_normal(&mut v, std);
    v
}

/// Every parameter's initial values, in the model's parameter order.
pub fn initial_values(cfg: &ModelConfig) -> Vec<Vec<f32>> {
    let (d, f, w) = (cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.d_head);
    let root = Rng::new(cfg.seed);
    let mut out = vec![normal(&mut root.fork(1001), VOCAB * d, 1.0)];
    let mut axial = root.fork(1002);
    out.push(normal(
        &mut axial,
        cfg.axial_shape.0 * cfg.axial_dims.0,
        1.0,
    ));
    out.push(normal(
        &mut axial,
        cfg.axial_shape.1 * cfg.axial_dims.1,
        1.0,
    ));
    let std_in = (d as f32).powf(-0.5);
    for (i, lc) in cfg.layer_configs().iter().enumerate() {
        let mut a = param_stream(lc.seed, i, 0);
        out.push(vec![1.0; d]);
        out.push(vec![0.0; d]);
        let projections = match lc.attention {
            AttentionKind::Lsh | AttentionKind::Exact => 2,
            AttentionKind::Local => 3,
        };
        for _ in 0..projections {
            out.push(normal(&mut a, d * w, std_in));
        }
        out.push(normal(&mut a, w * d, (w as f32).powf(-0.5)));
        let mut ff = param_stream(lc.seed, i, 1);
        out.push(vec![1.0; d]);
        out.push(vec![0.0; d]);
        out.push(normal(&mut ff, d * f, std_in));
        out.push(vec![0.0; f]);
        out.push(normal(&mut ff, f * d, (f as f32).powf(-0.5)));
        out.push(vec![0.0; d]);
    }
    out.push(vec![1.0; 2 * d]);
    out.push(vec![0.0; 2 * d]);
    out.push(normal(
        &mut root.fork(1003),
        2 * d * VOCAB,
        (1.0 / (2 * d) as f32).sqrt(),
    ));
    out.push(vec![0.0; VOCAB]);
    out
}
