//! Projections stored fused in one tensor, as Phi-3 stores them (`self_attn.qkv_proj`: the query
//! rows, then the key rows, then the value rows; `mlp.gate_up_proj`: the gate rows, then the up
//! rows) and llama.cpp's converter keeps them (`attn_qkv`; a `phi3` file's `ffn_up`): which rows
//! of the fused tensor an HF projection name asks for.

use anyhow::{bail, Result};

/// One projection of a fused tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FusedPart {
    /// `q_proj` of `qkv_proj`.
    Q,
    /// `k_proj` of `qkv_proj`.
    K,
    /// `v_proj` of `qkv_proj`.
    V,
    /// `gate_proj` of `gate_up_proj`.
    Gate,
    /// `up_proj` of `gate_up_proj`.
    Up,
}

impl FusedPart {
    /// The part an HF projection weight name (`model.layers.N.self_attn.q_proj.weight`, ...,
    /// `model.layers.N.mlp.up_proj.weight`) is, with the HF name of its fused tensor.
    pub(crate) fn of(name: &str) -> Option<(Self, String)> {
        for (suffix, part, fused) in [
            (".self_attn.q_proj.weight", Self::Q, ".self_attn.qkv_proj.weight"),
            (".self_attn.k_proj.weight", Self::K, ".self_attn.qkv_proj.weight"),
            (".self_attn.v_proj.weight", Self::V, ".self_attn.qkv_proj.weight"),
            (".mlp.gate_proj.weight", Self::Gate, ".mlp.gate_up_proj.weight"),
            (".mlp.up_proj.weight", Self::Up, ".mlp.gate_up_proj.weight"),
        ] {
            if let Some(layer) = name.strip_suffix(suffix) {
                return Some((part, format!("{layer}{fused}")));
            }
        }
        None
    }

    /// The first of this part's `out` rows in a fused tensor of `rows` rows. Keys and values are
    /// as wide as each other, so their rows are the last `2 x out`; gate and up split the tensor
    /// in halves. A query's width is checked apart ([`check_qkv_rows`]), since its rows alone do
    /// not tell where the keys start.
    pub(crate) fn first_row(self, rows: usize, out: usize, tensor: &str) -> Result<usize> {
        let start = match self {
            Self::Q => (rows > out).then_some(0),
            Self::K => rows.checked_sub(2 * out),
            Self::V => rows.checked_sub(out),
            Self::Gate => (rows == 2 * out).then_some(0),
            Self::Up => (rows == 2 * out).then_some(out),
        };
        match start {
            Some(s) => Ok(s),
            None => bail!(
                "fused tensor `{tensor}` has {rows} rows, which cannot hold its {self:?} part of {out} rows \
                 (config.json does not match the weights)"
            ),
        }
    }
}

/// Checks that a fused `qkv_proj` of `rows` rows holds exactly the query, key and value rows the
/// config implies (`q` and `kv` each).
pub(crate) fn check_qkv_rows(tensor: &str, rows: usize, q: usize, kv: usize) -> Result<()> {
    if rows != q + 2 * kv {
        bail!(
            "fused tensor `{tensor}` has {rows} rows but the config implies {q} query + 2 x {kv} key/value rows \
             (config.json does not match the weights)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_the_rows_phi3_stores_them_in() {
        let (q, kv) = (64, 32);
        let rows = q + 2 * kv;
        let name = "model.layers.3.self_attn.k_proj.weight";
        let (part, fused) = FusedPart::of(name).unwrap();
        assert_eq!((part, fused.as_str()), (FusedPart::K, "model.layers.3.self_attn.qkv_proj.weight"));
        assert_eq!(FusedPart::Q.first_row(rows, q, "t").unwrap(), 0);
        assert_eq!(FusedPart::K.first_row(rows, kv, "t").unwrap(), q);
        assert_eq!(FusedPart::V.first_row(rows, kv, "t").unwrap(), q + kv);
        assert_eq!(FusedPart::Gate.first_row(192, 96, "t").unwrap(), 0);
        assert_eq!(FusedPart::Up.first_row(192, 96, "t").unwrap(), 96);
        assert!(FusedPart::Up.first_row(190, 96, "t").is_err());
        assert!(check_qkv_rows("t", rows, q, kv).is_ok());
        assert!(check_qkv_rows("t", rows, q, 16).is_err());
        // Experts' and shared experts' projections are never fused this way.
        assert_eq!(FusedPart::of("model.layers.0.mlp.experts.3.gate_proj.weight"), None);
        assert_eq!(FusedPart::of("model.layers.0.mlp.shared_expert.up_proj.weight"), None);
        assert_eq!(FusedPart::of("model.layers.0.mlp.down_proj.weight"), None);
    }
}
