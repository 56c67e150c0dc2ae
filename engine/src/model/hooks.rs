//! The seam where adapters enter the forward: a LoRA delta per projection for a group of rows,
//! and prefix key/values that start a sequence's cache. The base model is the null adapter
//! (`None`), so serving with and without an adapter is one code path.

/// A linear projection inside a decoder layer, named as PEFT's `target_modules` name them.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Proj {
    /// `self_attn.q_proj`
    #[serde(rename = "q_proj")]
    Q,
    /// `self_attn.k_proj`
    #[serde(rename = "k_proj")]
    K,
    /// `self_attn.v_proj`
    #[serde(rename = "v_proj")]
    V,
    /// `self_attn.o_proj`
    #[serde(rename = "o_proj")]
    O,
    /// `mlp.gate_proj`
    #[serde(rename = "gate_proj")]
    Gate,
    /// `mlp.up_proj`
    #[serde(rename = "up_proj")]
    Up,
    /// `mlp.down_proj`
    #[serde(rename = "down_proj")]
    Down,
}

impl Proj {
    /// All projections in layer order.
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// The PEFT module name (`q_proj`, ...).
    pub fn module_name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// Parses a PEFT module name.
    pub fn from_module_name(name: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.module_name() == name)
    }
}

/// Rows of one sequence inside a projection call: input `x` (`rows × in_dim`) and the output
/// slice each row's delta is added to.
pub struct ProjRows<'a> {
    /// Decoder layer index.
    pub layer: usize,
    /// Which projection.
    pub proj: Proj,
    /// Input activations, row-major `rows × in_dim`.
    pub x: &'a [f32],
    /// Input width.
    pub in_dim: usize,
    /// Output buffer; row `r` of the delta goes to `out[r * out_stride + out_offset ..][..out_dim]`.
    pub out: &'a mut [f32],
    /// Distance between output rows (the fused q/k/v or gate/up width).
    pub out_stride: usize,
    /// Where this projection's columns start inside an output row.
    pub out_offset: usize,
    /// Output width of this projection.
    pub out_dim: usize,
    /// Number of rows.
    pub rows: usize,
    /// The forward runs llama.cpp's 8-bit arithmetic (quantized weights, int8 activations):
    /// LoRA weights are applied as 8-bit blocks too, as the trainer's forward on such a base
    /// applies them. Otherwise they are applied in f32 exactly as given.
    pub int8: bool,
}

/// What an adapter contributes to the forward. Implemented by the adapters crate.
pub trait AdapterHook: Send + Sync {
    /// Adds this adapter's delta for one projection to `rows.out`; a no-op for projections it
    /// does not target.
    fn add_delta(&self, rows: ProjRows<'_>);

    /// Key/value rows (`num_virtual_tokens × kv_dim` each) that start every sequence's cache in
    /// `layer`, for prefix tuning; `None` when the adapter has no prefix.
    fn prefix_kv(&self, layer: usize) -> Option<(&[f32], &[f32])>;

    /// Names the weights behind this hook: hooks with equal keys must add equal deltas, so the
    /// forward runs their rows together and reads the weights once for all of them. A wrapper
    /// that only forwards (a lease) returns the key of the weights it wraps. `None`, the
    /// default, groups a hook only with itself.
    fn weights_key(&self) -> Option<usize> {
        None
    }
}
