//! The CUDA C sources, one file per kernel family, and the kernel names the launch wrappers use.
//!
//! A family compiles as one NVRTC program: its preludes (shared device helpers, `*.cuh`)
//! followed by its `.cu` file, each introduced by a `#line` directive so that NVRTC's messages
//! point at the right file and line.

/// Names of the kernels, as the launch wrappers look them up in the compiled module. The unit
/// tests check that each family's source defines exactly these `extern "C" __global__` kernels.
pub mod names {
    pub mod elementwise {
        pub const FILL: &str = "ew_fill";
        pub const SCALE: &str = "ew_scale";
        pub const ADD: &str = "ew_add";
        pub const AXPY: &str = "ew_axpy";
        pub const RELU_FWD: &str = "ew_relu_fwd";
        pub const RELU_BWD: &str = "ew_relu_bwd";
        pub const F32_TO_BF16: &str = "ew_f32_to_bf16";
        pub const BF16_TO_F32: &str = "ew_bf16_to_f32";
        pub const ROW_DOT: &str = "ew_row_dot";
        pub const UNIT_ROWS: &str = "ew_unit_rows";
        pub const ALL: &[&str] = &[
            FILL,
            SCALE,
            ADD,
            AXPY,
            RELU_FWD,
            RELU_BWD,
            F32_TO_BF16,
            BF16_TO_F32,
            ROW_DOT,
            UNIT_ROWS,
        ];
    }
    pub mod layer_norm {
        pub const FWD: &str = "layer_norm_fwd";
        pub const BWD_DX: &str = "layer_norm_bwd_dx";
        pub const BWD_PARAMS: &str = "layer_norm_bwd_params";
        pub const REDUCE_PARTS: &str = "layer_norm_reduce_parts";
        pub const ALL: &[&str] = &[FWD, BWD_DX, BWD_PARAMS, REDUCE_PARTS];
    }
    pub mod embedding {
        pub const FWD: &str = "embedding_fwd";
        pub const BWD: &str = "embedding_bwd";
        pub const AXIAL_FWD: &str = "axial_pos_fwd";
        pub const AXIAL_BWD_FIRST: &str = "axial_pos_bwd_first";
        pub const AXIAL_BWD_SECOND: &str = "axial_pos_bwd_second";
        pub const ALL: &[&str] = &[FWD, BWD, AXIAL_FWD, AXIAL_BWD_FIRST, AXIAL_BWD_SECOND];
    }
    pub mod softmax_xent {
        pub const FWD: &str = "xent_fwd";
        pub const BWD: &str = "xent_bwd";
        pub const ALL: &[&str] = &[FWD, BWD];
    }
    pub mod reduce_adam {
        pub const SUM_SQUARES_PARTIAL: &str = "sum_squares_partial";
        pub const SUM_PARTIAL: &str = "sum_partial";
        pub const REDUCE_PARTIALS: &str = "reduce_partials";
        pub const ADAM_UPDATE: &str = "adam_update";
        pub const ALL: &[&str] = &[
            SUM_SQUARES_PARTIAL,
            SUM_PARTIAL,
            REDUCE_PARTIALS,
            ADAM_UPDATE,
        ];
    }
    pub mod lsh_hash {
        pub const HASH: &str = "lsh_hash";
        pub const ALL: &[&str] = &[HASH];
    }
    pub mod bucket_sort {
        pub const HISTOGRAM: &str = "bucket_sort_histogram";
        pub const SCAN: &str = "bucket_sort_scan";
        pub const SCATTER: &str = "bucket_sort_scatter";
        pub const INVERT: &str = "bucket_sort_invert";
        pub const MASK_KEYS: &str = "bucket_sort_mask_keys";
        pub const ALL: &[&str] = &[HISTOGRAM, SCAN, SCATTER, INVERT, MASK_KEYS];
    }
    pub mod lsh_attention {
        pub const FWD: &str = "lsh_attn_fwd";
        pub const COMBINE: &str = "lsh_attn_combine";
        pub const BWD_DQ: &str = "lsh_attn_bwd_dq";
        pub const BWD_DKDV: &str = "lsh_attn_bwd_dkdv";
        pub const ALL: &[&str] = &[FWD, COMBINE, BWD_DQ, BWD_DKDV];
    }
    pub mod local_attention {
        pub const FWD: &str = "local_attn_fwd";
        pub const BWD_DQ: &str = "local_attn_bwd_dq";
        pub const BWD_DKDV: &str = "local_attn_bwd_dkdv";
        pub const ALL: &[&str] = &[FWD, BWD_DQ, BWD_DKDV];
    }
    pub mod exact_attention {
        pub const FWD: &str = "exact_attn_fwd";
        pub const BWD_DQ: &str = "exact_attn_bwd_dq";
        pub const BWD_DKDV: &str = "exact_attn_bwd_dkdv";
        pub const ALL: &[&str] = &[FWD, BWD_DQ, BWD_DKDV];
    }
    pub mod cached_attention {
        pub const ATTEND: &str = "cached_attention";
        pub const ALL: &[&str] = &[ATTEND];
    }
    pub mod rows {
        pub const COPY2D: &str = "rows_copy2d";
        pub const ADD_BIAS: &str = "rows_add_bias";
        pub const COLUMN_SUMS_PARTS: &str = "rows_column_sums_parts";
        pub const COLUMN_SUMS_FINISH: &str = "rows_column_sums_finish";
        pub const RELU: &str = "rows_relu";
        pub const RELU_MASK: &str = "rows_relu_mask";
        pub const DROPOUT: &str = "rows_dropout";
        pub const ALL: &[&str] = &[
            COPY2D,
            ADD_BIAS,
            COLUMN_SUMS_PARTS,
            COLUMN_SUMS_FINISH,
            RELU,
            RELU_MASK,
            DROPOUT,
        ];
    }
}

/// A shared header prepended to the families that use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Prelude {
    /// Reductions and helpers every family uses.
    Common,
    /// The attention tile engine.
    Attention,
}

impl Prelude {
    pub fn file_name(self) -> &'static str {
        match self {
            Prelude::Common => "common.cuh",
            Prelude::Attention => "attention.cuh",
        }
    }

    pub fn source(self) -> &'static str {
        match self {
            Prelude::Common => include_str!("cu/common.cuh"),
            Prelude::Attention => include_str!("cu/attention.cuh"),
        }
    }
}

/// One `.cu` file: a set of kernels compiled together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelFamily {
    Elementwise,
    LayerNorm,
    Embedding,
    SoftmaxXent,
    ReduceAdam,
    LshHash,
    BucketSort,
    LshAttention,
    LocalAttention,
    ExactAttention,
    CachedAttention,
    Rows,
}

impl KernelFamily {
    pub const ALL: [KernelFamily; 12] = [
        KernelFamily::Elementwise,
        KernelFamily::LayerNorm,
        KernelFamily::Embedding,
        KernelFamily::SoftmaxXent,
        KernelFamily::ReduceAdam,
        KernelFamily::LshHash,
        KernelFamily::BucketSort,
        KernelFamily::LshAttention,
        KernelFamily::LocalAttention,
        KernelFamily::ExactAttention,
        KernelFamily::CachedAttention,
        KernelFamily::Rows,
    ];

    /// The file stem, e.g. `lsh_attention`.
    pub fn name(self) -> &'static str {
        match self {
            KernelFamily::Elementwise => "elementwise",
            KernelFamily::LayerNorm => "layer_norm",
            KernelFamily::Embedding => "embedding",
            KernelFamily::SoftmaxXent => "softmax_xent",
            KernelFamily::ReduceAdam => "reduce_adam",
            KernelFamily::LshHash => "lsh_hash",
            KernelFamily::BucketSort => "bucket_sort",
            KernelFamily::LshAttention => "lsh_attention",
            KernelFamily::LocalAttention => "local_attention",
            KernelFamily::ExactAttention => "exact_attention",
            KernelFamily::CachedAttention => "cached_attention",
            KernelFamily::Rows => "rows",
        }
    }

    /// The family's own `.cu` text.
    pub fn source(self) -> &'static str {
        match self {
            KernelFamily::Elementwise => include_str!("cu/elementwise.cu"),
            KernelFamily::LayerNorm => include_str!("cu/layer_norm.cu"),
            KernelFamily::Embedding => include_str!("cu/embedding.cu"),
            KernelFamily::SoftmaxXent => include_str!("cu/softmax_xent.cu"),
            KernelFamily::ReduceAdam => include_str!("cu/reduce_adam.cu"),
            KernelFamily::LshHash => include_str!("cu/lsh_hash.cu"),
            KernelFamily::BucketSort => include_str!("cu/bucket_sort.cu"),
            KernelFamily::LshAttention => include_str!("cu/lsh_attention.cu"),
            KernelFamily::LocalAttention => include_str!("cu/local_attention.cu"),
            KernelFamily::ExactAttention => include_str!("cu/exact_attention.cu"),
            KernelFamily::CachedAttention => include_str!("cu/cached_attention.cu"),
            KernelFamily::Rows => include_str!("cu/rows.cu"),
        }
    }

    /// The headers prepended to the source, in order.
    pub fn preludes(self) -> &'static [Prelude] {
        match self {
            KernelFamily::LshAttention
            | KernelFamily::LocalAttention
            | KernelFamily::ExactAttention => &[Prelude::Common, Prelude::Attention],
            _ => &[Prelude::Common],
        }
    }

    /// The kernels the launch wrappers expect in this family's module.
    pub fn kernels(self) -> &'static [&'static str] {
        match self {
            KernelFamily::Elementwise => names::elementwise::ALL,
            KernelFamily::LayerNorm => names::layer_norm::ALL,
            KernelFamily::Embedding => names::embedding::ALL,
            KernelFamily::SoftmaxXent => names::softmax_xent::ALL,
            KernelFamily::ReduceAdam => names::reduce_adam::ALL,
            KernelFamily::LshHash => names::lsh_hash::ALL,
            KernelFamily::BucketSort => names::bucket_sort::ALL,
            KernelFamily::LshAttention => names::lsh_attention::ALL,
            KernelFamily::LocalAttention => names::local_attention::ALL,
            KernelFamily::ExactAttention => names::exact_attention::ALL,
            KernelFamily::CachedAttention => names::cached_attention::ALL,
            KernelFamily::Rows => names::rows::ALL,
        }
    }

    /// The program NVRTC compiles: preludes, then the family's file.
    pub fn program_source(self) -> String {
        let mut text = String::new();
        for prelude in self.preludes() {
            text.push_str(&format!("#line 1 \"{}\"\n", prelude.file_name()));
            text.push_str(prelude.source());
            text.push('\n');
        }
        text.push_str(&format!("#line 1 \"{}.cu\"\n", self.name()));
        text.push_str(self.source());
        text
    }

    /// Whether the program includes CUDA toolkit headers (then NVRTC needs `-I`).
    pub fn needs_cuda_headers(self) -> bool {
        includes_cuda_headers(&self.program_source())
    }
}

/// Whether CUDA source `text` includes a CUDA toolkit header (`#include <cuda...>`).
pub fn includes_cuda_headers(text: &str) -> bool {
    text.lines()
        .any(|line| line.trim_start().starts_with("#include <cuda"))
}

/// Names of the `extern "C" __global__` kernels defined in CUDA source `text`, in order.
pub fn defined_kernels(text: &str) -> Vec<&str> {
    const MARKER: &str = "extern \"C\" __global__ void ";
    text.match_indices(MARKER)
        .filter_map(|(at, _)| {
            let rest = &text[at + MARKER.len()..];
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))?;
            Some(&rest[..end])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn every_family_defines_exactly_the_expected_kernels() {
        for family in KernelFamily::ALL {
            let defined: BTreeSet<&str> = defined_kernels(family.source()).into_iter().collect();
            let expected: BTreeSet<&str> = family.kernels().iter().copied().collect();
            let missing: Vec<_> = expected.difference(&defined).collect();
            let unlisted: Vec<_> = defined.difference(&expected).collect();
            assert!(
                missing.is_empty() && unlisted.is_empty(),
                "{}.cu: kernels the wrappers expect but the source lacks: {missing:?}; \
                 kernels the source defines but names:: does not list: {unlisted:?}",
                family.name()
            );
        }
    }

    #[test]
    fn kernel_names_are_unique_across_families() {
        let mut seen = BTreeSet::new();
        for family in KernelFamily::ALL {
            for name in family.kernels() {
                assert!(seen.insert(*name), "kernel {name} is listed twice");
            }
        }
    }

    #[test]
    fn preludes_define_no_kernels() {
        for prelude in [Prelude::Common, Prelude::Attention] {
            assert!(
                !prelude.source().contains("__global__"),
                "{} must hold device helpers only",
                prelude.file_name()
            );
        }
    }

    #[test]
    fn no_family_needs_cuda_headers() {
        // bf16 is converted by its bits (common.cuh): a missing or mismatched header set on a
        // GPU machine must not fail a family (the attention backward's row dot lives in
        // elementwise.cu).
        for family in KernelFamily::ALL {
            assert!(
                !family.needs_cuda_headers(),
                "{}.cu includes a CUDA header",
                family.name()
            );
        }
        assert!(includes_cuda_headers("#include <cuda_bf16.h>\n"));
    }

    #[test]
    fn program_source_marks_every_file() {
        let text = KernelFamily::LocalAttention.program_source();
        for marker in [
            "#line 1 \"common.cuh\"",
            "#line 1 \"attention.cuh\"",
            "#line 1 \"local_attention.cu\"",
        ] {
            assert!(text.contains(marker), "missing {marker}");
        }
    }

    #[test]
    fn defined_kernels_reads_names() {
        let text = "extern \"C\" __global__ void a_b(int x) {}\n\
                    extern \"C\" __global__ void c1() {}";
        assert_eq!(defined_kernels(text), vec!["a_b", "c1"]);
    }
}
