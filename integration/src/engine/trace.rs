//! `--trace` output: JSON Lines with the kept positions, compression ratio, per-head kept
//! fractions and bytes per (step, layer), and the top logits per step.

use std::io::Write;

use anyhow::Result;
use serde_json::json;

use crate::kv::sequence::SequenceCache;
use crate::kv::store::KvStore;

/// Writes one object per (step, layer) with `kept` and `cr`, and one per step with `top`.
pub struct TraceWriter {
    out: Box<dyn Write>,
}

impl TraceWriter {
    /// Traces into any writer.
    pub fn new(out: Box<dyn Write>) -> Self {
        Self { out }
    }

    /// Records the state after step `step` (0 = after the prompt) and the logits it produced.
    pub fn record(&mut self, step: usize, seq: &SequenceCache, store: &KvStore, logits: &[f32]) -> Result<()> {
        for layer in 0..seq.shape().n_layers {
            let kept = seq.kept_positions(layer, store);
            let cr = seq.layer_compression_ratio(layer, store);
            let seen = seq.seen().max(1) as f64;
            let frac: Vec<f64> = kept.iter().map(|k| k.len() as f64 / seen).collect();
            let live: u64 = seq.layer_rows(layer).iter().map(|&r| store.row_usage(r).bytes_live).sum();
            let full: u64 = seq.layer_rows(layer).iter().map(|&r| store.row_usage(r).bytes_full).sum();
            writeln!(
                self.out,
                "{}",
                json!({"step": step, "layer": layer, "kept": kept, "cr": cr, "kept_fraction": frac,
                       "bytes_live": live, "bytes_full": full})
            )?;
        }
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        let top: Vec<_> = idx.iter().take(10).map(|&i| json!([i, logits[i]])).collect();
        writeln!(self.out, "{}", json!({"step": step, "top": top}))?;
        Ok(())
    }

    /// Flushes the output.
    pub fn flush(&mut self) -> Result<()> {
        Ok(self.out.flush()?)
    }
}
