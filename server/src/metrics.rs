//! Prometheus metrics of API.md "Operations", in one registry rendered by `GET /metrics`.
//! Families that later issues fill (adapters, feedback, training) are registered now with their
//! label values at zero, so dashboards and `promtool` see a stable set of names.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// Prefix of every metric name.
pub const NAMESPACE: &str = "prefix_rft";

/// Latency buckets in seconds, from a fast decode step to a long generation.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// Batch-size buckets.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// Training job states, pre-registered at zero.
const TRAINING_STATUSES: &[&str] = &["queued", "running", "succeeded", "failed", "cancelled"];

/// The handles the scheduler thread updates.
#[derive(Clone)]
pub struct SchedulerMetrics {
    /// Sequences prefilling or decoding.
    pub running: IntGauge,
    /// Requests queued for a batch slot.
    pub waiting: IntGauge,
    /// Sequences per forward step.
    pub batch_size: Histogram,
}

/// Every metric of the server.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Requests by route, status and adapter.
    pub requests: IntCounterVec,
    /// Time to the first token.
    pub ttft: Histogram,
    /// Time between tokens of a stream.
    pub inter_token: Histogram,
    /// Whole request latency.
    pub e2e: Histogram,
    /// Prompt tokens processed.
    pub prompt_tokens: IntCounter,
    /// Tokens generated.
    pub generation_tokens: IntCounter,
    /// Scheduler gauges.
    pub scheduler: SchedulerMetrics,
    /// Adapters resident in memory.
    pub adapters_resident: IntGauge,
    /// Bytes of resident adapters.
    pub adapters_resident_bytes: IntGauge,
    /// Feedback received, by rating.
    pub feedback: IntCounterVec,
    /// Training jobs by status.
    pub training_jobs: IntGaugeVec,
    /// Loss at the last training step.
    pub training_last_loss: Gauge,
    /// mistralrs backend: adapter versions held as merged models.
    pub mistralrs_versions_live: IntGauge,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(NAMESPACE)
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Result<Histogram, prometheus::Error> {
    Histogram::with_opts(
        HistogramOpts::new(name, help)
            .namespace(NAMESPACE)
            .buckets(buckets.to_vec()),
    )
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            opts(
                "requests_total",
                "HTTP requests by route, status code and adapter.",
            ),
            &["route", "status", "adapter"],
        )?;
        let ttft = histogram(
            "time_to_first_token_seconds",
            "Time from request arrival to the first token.",
            LATENCY_BUCKETS,
        )?;
        let inter_token = histogram(
            "inter_token_latency_seconds",
            "Time between consecutive tokens of a choice.",
            LATENCY_BUCKETS,
        )?;
        let e2e = histogram(
            "e2e_request_latency_seconds",
            "Time from request arrival to its last byte.",
            LATENCY_BUCKETS,
        )?;
        let prompt_tokens =
            IntCounter::with_opts(opts("prompt_tokens_total", "Prompt tokens prefilled."))?;
        let generation_tokens =
            IntCounter::with_opts(opts("generation_tokens_total", "Tokens generated."))?;
        let running = IntGauge::with_opts(opts(
            "requests_running",
            "Sequences being prefilled or decoded.",
        ))?;
        let waiting = IntGauge::with_opts(opts(
            "requests_waiting",
            "Requests waiting for a batch slot.",
        ))?;
        let batch_size = histogram(
            "batch_size",
            "Sequences in one forward step.",
            BATCH_BUCKETS,
        )?;
        let adapters_resident =
            IntGauge::with_opts(opts("adapters_resident", "Adapters resident in memory."))?;
        let adapters_resident_bytes = IntGauge::with_opts(opts(
            "adapters_resident_bytes",
            "Bytes held by resident adapters.",
        ))?;
        let feedback = IntCounterVec::new(
            opts("feedback_total", "Feedback received, by rating."),
            &["rating"],
        )?;
        let training_jobs = IntGaugeVec::new(
            opts("training_jobs", "Training jobs by status."),
            &["status"],
        )?;
        let training_last_loss = Gauge::with_opts(opts(
            "training_last_loss",
            "Loss at the last training step.",
        ))?;
        let mistralrs_versions_live = IntGauge::with_opts(opts(
            "mistralrs_versions_live",
            "Adapter versions the mistralrs backend holds as merged models (loading, loaded or \
             finishing requests; each a copy of the model).",
        ))?;
        for rating in ["up", "down"] {
            feedback.with_label_values(&[rating]);
        }
        for status in TRAINING_STATUSES {
            training_jobs.with_label_values(&[status]);
        }
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(ttft.clone()))?;
        registry.register(Box::new(inter_token.clone()))?;
        registry.register(Box::new(e2e.clone()))?;
        registry.register(Box::new(prompt_tokens.clone()))?;
        registry.register(Box::new(generation_tokens.clone()))?;
        registry.register(Box::new(running.clone()))?;
        registry.register(Box::new(waiting.clone()))?;
        registry.register(Box::new(batch_size.clone()))?;
        registry.register(Box::new(adapters_resident.clone()))?;
        registry.register(Box::new(adapters_resident_bytes.clone()))?;
        registry.register(Box::new(feedback.clone()))?;
        registry.register(Box::new(training_jobs.clone()))?;
        registry.register(Box::new(training_last_loss.clone()))?;
        registry.register(Box::new(mistralrs_versions_live.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            ttft,
            inter_token,
            e2e,
            prompt_tokens,
            generation_tokens,
            scheduler: SchedulerMetrics {
                running,
                waiting,
                batch_size,
            },
            adapters_resident,
            adapters_resident_bytes,
            feedback,
            training_jobs,
            training_last_loss,
            mistralrs_versions_live,
        })
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_family_of_the_contract() {
        let m = Metrics::new().expect("metrics");
        m.requests
            .with_label_values(&["/v1/models", "200", "base"])
            .inc();
        m.ttft.observe(0.1);
        let text = m.render();
        for name in [
            "prefix_rft_requests_total",
            "prefix_rft_time_to_first_token_seconds_bucket",
            "prefix_rft_inter_token_latency_seconds_bucket",
            "prefix_rft_e2e_request_latency_seconds_bucket",
            "prefix_rft_requests_running",
            "prefix_rft_requests_waiting",
            "prefix_rft_batch_size_bucket",
            "prefix_rft_prompt_tokens_total",
            "prefix_rft_generation_tokens_total",
            "prefix_rft_adapters_resident",
            "prefix_rft_adapters_resident_bytes",
            "prefix_rft_feedback_total{rating=\"up\"} 0",
            "prefix_rft_training_jobs{status=\"running\"} 0",
            "prefix_rft_training_last_loss",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
