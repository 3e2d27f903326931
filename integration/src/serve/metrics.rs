//! What `/metrics` exports, in Prometheus text format: the pool, the queue, and per policy what it
//! saves (compression, evicted tokens) and how fast it answers.

use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntGauge, Opts, Registry, TextEncoder,
};

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    /// Sequences decoding now.
    pub requests_running: IntGauge,
    /// Requests waiting for admission (preempted ones included).
    pub requests_waiting: IntGauge,
    /// Bytes of K/V in occupied slots.
    pub bytes_live: IntGauge,
    /// Bytes of blocks held by sequences.
    pub bytes_allocated: IntGauge,
    /// Bytes of the whole pool.
    pub bytes_capacity: IntGauge,
    /// Tokens seen over slots held, over the running sequences of a policy.
    pub compression_ratio: GaugeVec,
    /// Tokens generated.
    pub generated_tokens: CounterVec,
    /// Prompt tokens (prefilled, or taken from the prefix cache).
    pub prompt_tokens: CounterVec,
    /// Prompt tokens taken from the prefix cache instead of prefilled.
    pub prompt_tokens_cached: CounterVec,
    /// States the prefix cache keeps in the pool.
    pub prefix_cache_states: IntGauge,
    /// Bytes of K/V in occupied slots of the prefix cache's states.
    pub prefix_cache_bytes_live: IntGauge,
    /// Bytes of KV blocks the prefix cache's states hold.
    pub prefix_cache_bytes_allocated: IntGauge,
    /// Requests finished (or cancelled).
    pub requests: CounterVec,
    /// Tokens evicted, averaged over a sequence's KV rows, counted when it ends.
    pub evicted_tokens: CounterVec,
    /// Sequences preempted.
    pub preemptions: IntCounter,
    /// Sequences started as a copy of another (same prompt and policy) with no prompt pass.
    pub forked: IntCounter,
    /// Seconds from a request's arrival to its first token.
    pub time_to_first_token: HistogramVec,
    /// Seconds between consecutive tokens of a request.
    pub inter_token_latency: HistogramVec,
}

impl Metrics {
    /// Registers every metric, with each of `policies` present (at 0) from the start.
    pub fn new(policies: &[String]) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counters = |name: &str, help: &str| -> prometheus::Result<CounterVec> {
            let c = CounterVec::new(Opts::new(name, help), &["policy"])?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let histograms = |name: &str, help: &str, buckets: Vec<f64>| -> prometheus::Result<HistogramVec> {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &["policy"])?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let compression_ratio = GaugeVec::new(
            Opts::new(
                "dms_kv_compression_ratio",
                "Tokens seen over KV slots held, over the running sequences of a policy (its last finished one when none runs)",
            ),
            &["policy"],
        )?;
        registry.register(Box::new(compression_ratio.clone()))?;
        let preemptions = IntCounter::new(
            "dms_preemptions_total",
            "Sequences preempted (swapped out of the pool or dropped for recomputation)",
        )?;
        registry.register(Box::new(preemptions.clone()))?;
        let forked = IntCounter::new(
            "dms_forked_sequences_total",
            "Sequences started as a copy of a running one with the same prompt and policy (no prompt pass of their own)",
        )?;
        registry.register(Box::new(forked.clone()))?;
        let latency_buckets = prometheus::exponential_buckets(0.001, 2.0, 16)?;
        let m = Self {
            requests_running: gauge("dms_requests_running", "Sequences decoding now")?,
            requests_waiting: gauge("dms_requests_waiting", "Requests waiting for admission or with their prompt pass under way, preempted ones included")?,
            bytes_live: gauge("dms_kv_cache_bytes_live", "Bytes of K/V in occupied slots")?,
            bytes_allocated: gauge(
                "dms_kv_cache_bytes_allocated",
                "Bytes of KV blocks held by sequences (running ones and the prefix cache's states)",
            )?,
            bytes_capacity: gauge("dms_kv_cache_bytes_capacity", "Bytes of the whole KV block pool")?,
            compression_ratio,
            generated_tokens: counters("dms_generated_tokens_total", "Tokens generated")?,
            prompt_tokens: counters("dms_prompt_tokens_total", "Prompt tokens (prefilled or taken from the prefix cache)")?,
            prompt_tokens_cached: counters(
                "dms_prompt_tokens_cached_total",
                "Prompt tokens taken from the prefix cache instead of prefilled",
            )?,
            prefix_cache_states: gauge(
                "dms_prefix_cache_states",
                "Sequence states the prefix cache keeps in the pool (given back when blocks are needed)",
            )?,
            prefix_cache_bytes_live: gauge(
                "dms_prefix_cache_bytes_live",
                "Bytes of K/V in occupied slots of the prefix cache's states (part of dms_kv_cache_bytes_live)",
            )?,
            prefix_cache_bytes_allocated: gauge(
                "dms_prefix_cache_bytes_allocated",
                "Bytes of KV blocks the prefix cache's states hold (part of dms_kv_cache_bytes_allocated)",
            )?,
            requests: counters("dms_requests_total", "Requests finished or cancelled")?,
            evicted_tokens: counters(
                "dms_evicted_tokens_total",
                "Tokens evicted from the KV cache, averaged over each sequence's rows (layer x KV head), counted when it ends",
            )?,
            preemptions,
            forked,
            time_to_first_token: histograms(
                "dms_time_to_first_token_seconds",
                "Seconds from a request's arrival to its first token",
                latency_buckets.clone(),
            )?,
            inter_token_latency: histograms(
                "dms_inter_token_latency_seconds",
                "Seconds between consecutive tokens of a request",
                latency_buckets,
            )?,
            registry,
        };
        for p in policies {
            m.compression_ratio.with_label_values(&[p]).set(1.0);
            for c in [&m.generated_tokens, &m.prompt_tokens, &m.prompt_tokens_cached, &m.requests, &m.evicted_tokens] {
                c.with_label_values(&[p]);
            }
            m.time_to_first_token.with_label_values(&[p]);
            m.inter_token_latency.with_label_values(&[p]);
        }
        Ok(m)
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_of_the_issue_is_exported_with_its_policy_label() {
        let m = Metrics::new(&["dms".into(), "full".into()]).unwrap();
        m.generated_tokens.with_label_values(&["dms"]).inc_by(3.0);
        let text = m.render();
        for name in [
            "dms_requests_running",
            "dms_requests_waiting",
            "dms_kv_cache_bytes_live",
            "dms_kv_cache_bytes_allocated",
            "dms_kv_cache_bytes_capacity",
            "dms_kv_compression_ratio{policy=\"full\"}",
            "dms_generated_tokens_total{policy=\"dms\"} 3",
            "dms_prompt_tokens_total{policy=\"dms\"}",
            "dms_prompt_tokens_cached_total{policy=\"full\"}",
            "dms_prefix_cache_states",
            "dms_requests_total{policy=\"full\"}",
            "dms_prefix_cache_bytes_live",
            "dms_prefix_cache_bytes_allocated",
            "dms_evicted_tokens_total{policy=\"full\"}",
            "dms_preemptions_total",
            "dms_forked_sequences_total",
            "dms_time_to_first_token_seconds_bucket{policy=\"dms\"",
            "dms_inter_token_latency_seconds_count{policy=\"full\"}",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
