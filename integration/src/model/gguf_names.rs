//! Where a tensor named as in an HF checkpoint lies in a GGUF file, under the names and layouts
//! of llama.cpp's converter.

use super::fused::FusedPart;
use super::gguf_header::GgufHeader;

/// Where an HF-named tensor lies in a GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum GgufSource {
    /// A tensor of its own.
    Whole(String),
    /// Expert `index` of a tensor that stacks every expert's matrix (`[experts, out, in]`), or
    /// half of it where the converter fused gate and up (`ffn_gate_up_exps`, `[experts, 2 x
    /// out, in]`: each expert's gate rows, then its up rows).
    Expert {
        /// The stacked tensor.
        stacked: String,
        /// Which expert.
        index: usize,
        /// In a fused gate/up stack, the gate (0) or up (1) half.
        half: Option<usize>,
    },
    /// Row `index` of a tensor that stacks every expert's bias (`[experts, out]`; GPT-OSS), or
    /// half of it in a fused gate/up stack (`ffn_gate_up_exps.bias`, `[experts, 2 x out]`).
    ExpertBias {
        /// The stacked biases.
        stacked: String,
        /// Which expert.
        index: usize,
        /// In a fused gate/up stack, the gate (0) or up (1) half.
        half: Option<usize>,
    },
    /// DeepSeek's `kv_b_proj` (`[heads * (nope + v), rank]`), which files converted since
    /// llama.cpp's MLA support split into `attn_k_b` (`[heads, rank, nope]`: each head's key
    /// part transposed) and `attn_v_b` (`[heads, v, rank]`).
    SplitKvB {
        /// `attn_k_b`.
        k_b: String,
        /// `attn_v_b`.
        v_b: String,
    },
    /// One projection's rows of a fused tensor (`attn_qkv`; a `phi3` file's `ffn_up`, gate rows
    /// first).
    Rows {
        /// The fused tensor.
        fused: String,
        /// Which projection.
        part: FusedPart,
    },
}

/// `general.architecture` of `h`.
fn architecture(h: &GgufHeader) -> Option<&str> {
    h.content.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).map(String::as_str)
}

/// The GGUF source of an HF tensor name in `h`, or `None` for a name with no GGUF counterpart.
pub(crate) fn source(hf: &str, h: &GgufHeader) -> Option<GgufSource> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(GgufSource::Whole(f.to_string()));
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let blk = |name: &str| format!("blk.{layer}.{name}");
    if let Some(expert) = tail.strip_prefix("mlp.experts.") {
        let (index, proj) = expert.split_once('.')?;
        let (kind, what) = proj.split_once("_proj.")?;
        if !matches!(kind, "gate" | "up" | "down") || !matches!(what, "weight" | "bias") {
            return None;
        }
        let index = index.parse().ok()?;
        let fused = blk(&format!("ffn_gate_up_exps.{what}"));
        let (stacked, half) = match kind != "down" && h.contains(&fused) {
            true => (fused, Some(usize::from(kind == "up"))),
            false => (blk(&format!("ffn_{kind}_exps.{what}")), None),
        };
        return Some(match what {
            "weight" => GgufSource::Expert { stacked, index, half },
            _ => GgufSource::ExpertBias { stacked, index, half },
        });
    }
    if let Some((part, _)) = FusedPart::of(hf) {
        let has = |name: &str| h.contains(&blk(name));
        let fused = match part {
            FusedPart::Q | FusedPart::K | FusedPart::V if !has("attn_q.weight") && has("attn_qkv.weight") => {
                Some("attn_qkv.weight")
            }
            // Only llama.cpp's `phi3` layout fuses gate and up into `ffn_up`.
            FusedPart::Gate | FusedPart::Up if !has("ffn_gate.weight") && architecture(h) == Some("phi3") => {
                Some("ffn_up.weight")
            }
            _ => None,
        };
        if let Some(f) = fused {
            return Some(GgufSource::Rows { fused: blk(f), part });
        }
    }
    if tail == "self_attn.kv_b_proj.weight" && !h.contains(&blk("attn_kv_b.weight")) {
        return Some(GgufSource::SplitKvB { k_b: blk("attn_k_b.weight"), v_b: blk("attn_v_b.weight") });
    }
    // Gemma's norms around attention and MLP: `ffn_norm` is the norm before the MLP, as it is in
    // every other architecture (where HF calls it `post_attention_layernorm`).
    if matches!(architecture(h), Some("gemma2" | "gemma3")) {
        let gemma = match tail {
            "post_attention_layernorm.weight" => Some("post_attention_norm.weight"),
            "pre_feedforward_layernorm.weight" => Some("ffn_norm.weight"),
            "post_feedforward_layernorm.weight" => Some("post_ffw_norm.weight"),
            _ => None,
        };
        if let Some(g) = gemma {
            return Some(GgufSource::Whole(blk(g)));
        }
    }
    // GPT-OSS's norm before the experts is `post_attention_norm`.
    if tail == "post_attention_layernorm.weight" && architecture(h) == Some("gpt-oss") {
        return Some(GgufSource::Whole(blk("post_attention_norm.weight")));
    }
    let mapped = match tail {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.o_proj.bias" => "attn_output.bias",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "self_attn.q_a_proj.weight" => "attn_q_a.weight",
        "self_attn.q_a_layernorm.weight" => "attn_q_a_norm.weight",
        "self_attn.q_b_proj.weight" => "attn_q_b.weight",
        "self_attn.kv_a_proj_with_mqa.weight" => "attn_kv_a_mqa.weight",
        "self_attn.kv_a_layernorm.weight" => "attn_kv_a_norm.weight",
        "self_attn.kv_b_proj.weight" => "attn_kv_b.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        "self_attn.sinks" => "attn_sinks.weight",
        "mlp.gate.weight" => "ffn_gate_inp.weight",
        "mlp.gate.bias" => "ffn_gate_inp.bias",
        "mlp.gate.e_score_correction_bias" => "exp_probs_b.bias",
        "mlp.shared_experts.gate_proj.weight" => "ffn_gate_shexp.weight",
        "mlp.shared_experts.up_proj.weight" => "ffn_up_shexp.weight",
        "mlp.shared_experts.down_proj.weight" => "ffn_down_shexp.weight",
        "mlp.shared_expert.gate_proj.weight" => "ffn_gate_shexp.weight",
        "mlp.shared_expert.up_proj.weight" => "ffn_up_shexp.weight",
        "mlp.shared_expert.down_proj.weight" => "ffn_down_shexp.weight",
        "mlp.shared_expert_gate.weight" => "ffn_gate_inp_shexp.weight",
        _ => return None,
    };
    Some(GgufSource::Whole(blk(mapped)))
}
