//! Model configurations, the named presets of `docs/design.md`, their `key=value` text form (stored in
//! checkpoints) and their conversion to the reversible stack's per-layer configs.

use reformer_engine::Rng;
use reformer_lsh::Buckets;
use reformer_reversible::{AttentionKind, LayerConfig};

use crate::error::{ReformerError, Result};

/// Byte-level vocabulary.
pub const VOCAB: usize = 256;

/// The attention of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attention {
    /// Chunked local attention (chunk `c` sees chunks `c` and `c−1`).
    Local,
    /// Shared-QK LSH attention.
    Lsh,
    /// Exact full attention (the quality baseline).
    Exact,
}

impl Attention {
    pub fn name(self) -> &'static str {
        match self {
            Attention::Local => "local",
            Attention::Lsh => "lsh",
            Attention::Exact => "exact",
        }
    }

    pub fn parse(s: &str) -> Option<Attention> {
        match s {
            "local" => Some(Attention::Local),
            "lsh" => Some(Attention::Lsh),
            "exact" => Some(Attention::Exact),
            _ => None,
        }
    }

    fn kind(self) -> AttentionKind {
        match self {
            Attention::Local => AttentionKind::Local,
            Attention::Lsh => AttentionKind::Lsh,
            Attention::Exact => AttentionKind::Exact,
        }
    }
}

/// Everything that fixes a model's shape and its deterministic behaviour.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub n_layers: usize,
    pub d_model: usize,
    pub d_ff: usize,
    pub n_heads: usize,
    pub d_head: usize,
    /// One entry per layer.
    pub attention: Vec<Attention>,
    pub chunk_len: usize,
    /// `None`: the attention crate's default for the sequence length.
    pub buckets: Option<Buckets>,
    /// Hash rounds while training.
    pub n_rounds: usize,
    /// Hash rounds for evaluation and generation.
    pub eval_rounds: usize,
    /// Positions per feed-forward chunk.
    pub ff_chunk: usize,
    /// Heads per pass of each attention sublayer (`0`: all at once); see
    /// [`LayerConfig::head_group`]. An execution choice: it changes memory and speed, not the
    /// parameters, and results only through rounding.
    pub head_group: usize,
    /// Positions per chunk of the LM head and loss.
    pub loss_chunk: usize,
    /// Axial position shape `(a1, a2)`; the model serves lengths up to `a1·a2`.
    pub axial_shape: (usize, usize),
    /// Embedding widths of the two axial tables; they sum to `d_model`.
    pub axial_dims: (usize, usize),
    pub dropout: f32,
    pub seed: u64,
}

/// Names accepted by [`ModelConfig::preset`].
pub const PRESETS: &[&str] = &["tiny", "cp6", "deep20", "wide20"];

fn alternating(n: usize) -> Vec<Attention> {
    (0..n)
        .map(|i| {
            if i % 2 == 0 {
                Attention::Local
            } else {
                Attention::Lsh
            }
        })
        .collect()
}

impl ModelConfig {
    /// A preset by name: `tiny` (tests), `cp6`, `deep20`, `wide20` (`docs/design.md`).
    pub fn preset(name: &str) -> Result<ModelConfig> {
        let big_axial = (512, 1024);
        let cfg = match name {
            "tiny" => ModelConfig {
                n_layers: 2,
                d_model: 32,
                d_ff: 64,
                n_heads: 2,
                d_head: 16,
                attention: alternating(2),
                chunk_len: 8,
                buckets: None,
                n_rounds: 2,
                eval_rounds: 2,
                ff_chunk: 16,
                head_group: 0,
                loss_chunk: 16,
                axial_shape: (16, 16),
                axial_dims: (8, 24),
                dropout: 0.0,
                seed: 1,
            },
            "cp6" => ModelConfig {
                n_layers: 6,
                d_model: 256,
                d_ff: 512,
                n_heads: 2,
                d_head: 64,
                attention: alternating(6),
                chunk_len: 64,
                buckets: Some(Buckets::Factorised(64, 128)),
                n_rounds: 1,
                eval_rounds: 4,
                ff_chunk: 2048,
                head_group: 0,
                loss_chunk: 2048,
                axial_shape: big_axial,
                axial_dims: (64, 192),
                dropout: 0.05,
                seed: 0,
            },
            "deep20" => ModelConfig {
                n_layers: 20,
                d_model: 256,
                d_ff: 512,
                n_heads: 2,
                d_head: 64,
                attention: alternating(20),
                chunk_len: 64,
                buckets: None,
                n_rounds: 2,
                eval_rounds: 2,
                ff_chunk: 8192,
                head_group: 0,
                loss_chunk: 8192,
                axial_shape: big_axial,
                axial_dims: (64, 192),
                dropout: 0.0,
                seed: 0,
            },
            "wide20" => ModelConfig {
                n_layers: 20,
                d_model: 1024,
                d_ff: 4096,
                n_heads: 8,
                d_head: 128,
                attention: alternating(20),
                chunk_len: 64,
                buckets: None,
                n_rounds: 2,
                eval_rounds: 2,
                ff_chunk: 8192,
                head_group: 1,
                loss_chunk: 8192,
                axial_shape: big_axial,
                axial_dims: (256, 768),
                dropout: 0.0,
                seed: 0,
            },
            _ => {
                return Err(ReformerError::UnknownPreset {
                    name: name.to_string(),
                    known: PRESETS.join(", "),
                })
            }
        };
        Ok(cfg)
    }

    /// Longest sequence the axial table serves.
    pub fn max_len(&self) -> usize {
        self.axial_shape.0.saturating_mul(self.axial_shape.1)
    }

    /// Checks the fields agree with each other.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(ReformerError::Config(msg));
        let positive = [
            ("n_layers", self.n_layers),
            ("d_model", self.d_model),
            ("d_ff", self.d_ff),
            ("n_heads", self.n_heads),
            ("d_head", self.d_head),
            ("chunk_len", self.chunk_len),
            ("n_rounds", self.n_rounds),
            ("eval_rounds", self.eval_rounds),
            ("ff_chunk", self.ff_chunk),
            ("loss_chunk", self.loss_chunk),
            ("axial a1", self.axial_shape.0),
            ("axial a2", self.axial_shape.1),
            ("axial e1", self.axial_dims.0),
            ("axial e2", self.axial_dims.1),
        ];
        for (name, v) in positive {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if self.attention.len() != self.n_layers {
            return bad(format!(
                "{} attention kinds for {} layers",
                self.attention.len(),
                self.n_layers
            ));
        }
        if self.axial_dims.0.checked_add(self.axial_dims.1) != Some(self.d_model) {
            return bad(format!(
                "axial embedding widths {} + {} must sum to d_model {}",
                self.axial_dims.0, self.axial_dims.1, self.d_model
            ));
        }
        if self.axial_shape.0.checked_mul(self.axial_shape.1).is_none() {
            return bad(format!("axial shape {:?} overflows", self.axial_shape));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout {} must lie in [0, 1)", self.dropout));
        }
        if let Some(b) = &self.buckets {
            b.validate()?;
        }
        Ok(())
    }

    /// The reversible stack's per-layer configs. Each layer's seed is derived from the
    /// model seed and the layer index.
    pub fn layer_configs(&self) -> Vec<LayerConfig> {
        let root = Rng::new(self.seed);
        self.attention
            .iter()
            .enumerate()
            .map(|(i, kind)| LayerConfig {
                d_model: self.d_model,
                d_ff: self.d_ff,
                n_heads: self.n_heads,
                d_head: self.d_head,
                attention: kind.kind(),
                chunk_len: self.chunk_len,
                n_buckets: self.buckets.clone(),
                n_rounds: self.n_rounds,
                ff_chunk: self.ff_chunk,
                head_group: self.head_group,
                causal: true,
                dropout: self.dropout,
                seed: root.fork(1 + i as u64).next_u64(),
            })
            .collect()
    }

    /// `key=value` pairs, in a fixed order: the form stored in checkpoints.
    pub fn to_pairs(&self) -> Vec<(&'static str, String)> {
        let buckets = match &self.buckets {
            None => "auto".to_string(),
            Some(Buckets::Single(b)) => b.to_string(),
            Some(Buckets::Factorised(a, b)) => format!("{a}x{b}"),
        };
        let attention: Vec<&str> = self.attention.iter().map(|a| a.name()).collect();
        vec![
            ("n_layers", self.n_layers.to_string()),
            ("d_model", self.d_model.to_string()),
            ("d_ff", self.d_ff.to_string()),
            ("n_heads", self.n_heads.to_string()),
            ("d_head", self.d_head.to_string()),
            ("attention", attention.join(",")),
            ("chunk_len", self.chunk_len.to_string()),
            ("buckets", buckets),
            ("n_rounds", self.n_rounds.to_string()),
            ("eval_rounds", self.eval_rounds.to_string()),
            ("ff_chunk", self.ff_chunk.to_string()),
            ("head_group", self.head_group.to_string()),
            ("loss_chunk", self.loss_chunk.to_string()),
            (
                "axial_shape",
                format!("{}x{}", self.axial_shape.0, self.axial_shape.1),
            ),
            (
                "axial_dims",
                format!("{}+{}", self.axial_dims.0, self.axial_dims.1),
            ),
            // Bit pattern, so the text round-trips exactly.
            ("dropout", format!("{:#010x}", self.dropout.to_bits())),
            ("seed", self.seed.to_string()),
        ]
    }

    /// One line: `key=value;key=value;...`.
    pub fn to_text(&self) -> String {
        self.to_pairs()
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";")
    }

    /// Parses [`ModelConfig::to_text`]'s form.
    pub fn from_text(text: &str) -> Result<ModelConfig> {
        let bad = |msg: String| ReformerError::Config(msg);
        let mut map = std::collections::HashMap::new();
        for item in text.split(';').filter(|s| !s.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| bad(format!("config item `{item}` is not key=value")))?;
            map.insert(k, v);
        }
        let get = |k: &str| -> Result<&str> {
            map.get(k)
                .copied()
                .ok_or_else(|| bad(format!("config text lacks `{k}`")))
        };
        let num = |k: &str| -> Result<usize> {
            let v = get(k)?;
            v.parse()
                .map_err(|_| bad(format!("config `{k}={v}` is not a number")))
        };
        let pair = |k: &str, sep: char| -> Result<(usize, usize)> {
            let v = get(k)?;
            let parsed = v
                .split_once(sep)
                .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
            parsed.ok_or_else(|| bad(format!("config `{k}={v}` is not a{sep}b")))
        };
        let attention = get("attention")?
            .split(',')
            .map(|s| Attention::parse(s).ok_or_else(|| bad(format!("unknown attention `{s}`"))))
            .collect::<Result<Vec<_>>>()?;
        let buckets = match get("buckets")? {
            "auto" => None,
            v if v.contains('x') => {
                let (a, b) = pair("buckets", 'x')?;
                Some(Buckets::Factorised(a, b))
            }
            _ => Some(Buckets::Single(num("buckets")?)),
        };
        let dropout_text = get("dropout")?;
        let dropout = u32::from_str_radix(dropout_text.trim_start_matches("0x"), 16)
            .map(f32::from_bits)
            .map_err(|_| {
                bad(format!(
                    "config `dropout={dropout_text}` is not an f32 bit pattern"
                ))
            })?;
        let seed_text = get("seed")?;
        let seed = seed_text
            .parse()
            .map_err(|_| bad(format!("config `seed={seed_text}` is not a number")))?;
        let cfg = ModelConfig {
            n_layers: num("n_layers")?,
            d_model: num("d_model")?,
            d_ff: num("d_ff")?,
            n_heads: num("n_heads")?,
            d_head: num("d_head")?,
            attention,
            chunk_len: num("chunk_len")?,
            buckets,
            n_rounds: num("n_rounds")?,
            eval_rounds: num("eval_rounds")?,
            ff_chunk: num("ff_chunk")?,
            // Absent from configs written before head groups existed: all heads at once.
            head_group: if map.contains_key("head_group") {
                num("head_group")?
            } else {
                0
            },
            loss_chunk: num("loss_chunk")?,
            axial_shape: pair("axial_shape", 'x')?,
            axial_dims: pair("axial_dims", '+')?,
            dropout,
            seed,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The first field where `self` and `other` differ: `(field, self's value, other's)`.
    /// `head_group` is not compared: it is how the attention runs, not what the model is.
    pub fn first_difference(&self, other: &ModelConfig) -> Option<(&'static str, String, String)> {
        self.to_pairs()
            .into_iter()
            .zip(other.to_pairs())
            .filter(|((k, _), _)| *k != "head_group")
            .find(|((_, a), (_, b))| a != b)
            .map(|((k, a), (_, b))| (k, a, b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_round_trip_through_text() {
        for name in PRESETS {
            let cfg = ModelConfig::preset(name).unwrap();
            cfg.validate().unwrap();
            let back = ModelConfig::from_text(&cfg.to_text()).unwrap();
            assert_eq!(back, cfg, "{name}");
            assert_eq!(cfg.layer_configs().len(), cfg.n_layers);
        }
        let cp6 = ModelConfig::preset("cp6").unwrap();
        assert_eq!(cp6.max_len(), 524_288);
        assert!(matches!(
            ModelConfig::preset("huge"),
            Err(ReformerError::UnknownPreset { .. })
        ));
    }

    #[test]
    fn differences_are_named() {
        let a = ModelConfig::preset("tiny").unwrap();
        let mut b = a.clone();
        b.d_ff = 128;
        assert_eq!(
            a.first_difference(&b),
            Some(("d_ff", "64".to_string(), "128".to_string()))
        );
        let mut c = a.clone();
        c.axial_dims = (8, 8);
        assert!(c.validate().is_err());
    }

    #[test]
    fn head_group_is_stored_but_not_a_difference() {
        let a = ModelConfig::preset("wide20").unwrap();
        assert_eq!(a.head_group, 1);
        assert!(a.layer_configs().iter().all(|l| l.heads_per_group() == 1));
        let mut b = a.clone();
        b.head_group = 0;
        assert_eq!(a.first_difference(&b), None);
        // Text written before the field existed reads as all heads at once.
        let old: String = a
            .to_text()
            .split(';')
            .filter(|kv| !kv.starts_with("head_group="))
            .collect::<Vec<_>>()
            .join(";");
        assert_eq!(ModelConfig::from_text(&old).unwrap(), b);
    }
}
