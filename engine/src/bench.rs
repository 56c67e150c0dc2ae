//! The workload and helpers `engine-bench` and `mistralrs-bench` share, so the figures they put
//! side by side in `bench/results/engine.json` come from the same measurement.

/// Prompt lengths whose prefill is timed.
pub const PREFILL_LENS: [usize; 2] = [128, 512];
/// Concurrent sequences whose aggregate decode is timed.
pub const DECODE_BATCHES: [usize; 3] = [1, 4, 16];
/// Tokens each sequence decodes in a timed run.
pub const DECODE_STEPS: usize = 64;
/// Timed prefills per length (the median is reported).
pub const REPEATS: usize = 3;

/// Token `i` of the deterministic pseudo-text: ids spread over a vocabulary of `vocab`, none
/// below 3 (the special tokens of the default model).
pub fn pseudo_token(i: usize, vocab: u32) -> u32 {
    ((i as u64 * 2654435761 % u64::from(vocab.max(1))) as u32).max(3)
}

/// This process's peak resident set in MiB (`VmHWM`; 0 where /proc is missing).
pub fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The median of `v` (the upper one of an even count; NaN for none).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}
