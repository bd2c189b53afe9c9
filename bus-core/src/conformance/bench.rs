//! What the benches of every crate share: their settings from the environment and the
//! statistics of their rounds (median and range), so that each prints its figures the same way.

use std::time::Duration;

/// The positive number in the environment variable `name`, else `default`.
#[must_use]
pub fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

/// The median of `values` (sorted in place); `NaN` for none.
#[must_use]
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// `median [min–max]` of `values`, each with `digits` decimals.
///
/// ```
/// use bus_core::conformance::bench::spread;
/// assert_eq!(spread(vec![3.0, 1.0, 2.0], 1), "2.0 [1.0–3.0]");
/// ```
#[must_use]
pub fn spread(mut values: Vec<f64>, digits: usize) -> String {
    let m = median(&mut values);
    match (values.first(), values.last()) {
        (Some(min), Some(max)) => format!("{m:.digits$} [{min:.digits$}–{max:.digits$}]"),
        _ => "none".to_owned(),
    }
}

/// The per-round ratios of the raw client's time to bus's, `pick` taking one time from each
/// round's figures (rounds in the same order on both sides): above 1, bus was faster.
#[must_use]
pub fn ratios<R>(bus: &[R], raw: &[R], pick: impl Fn(&R) -> Duration) -> Vec<f64> {
    bus.iter()
        .zip(raw)
        .map(|(bus, raw)| pick(raw).as_secs_f64() / pick(bus).as_secs_f64())
        .collect()
}

/// Prints the range of every ratio (`ratio ranges: publish … consume … <name> …`, `others`
/// after the two) and, last, the line the docs and notes quote: `ratio publish=<median>
/// consume=<median>`.
pub fn print_ratios(publish: &[f64], consume: &[f64], others: &[(&str, Vec<f64>)]) {
    let mut ranges = format!(
        "ratio ranges: publish {} consume {}",
        spread(publish.to_vec(), 2),
        spread(consume.to_vec(), 2)
    );
    for (name, values) in others {
        ranges.push_str(&format!(" {name} {}", spread(values.clone(), 2)));
    }
    println!("{ranges}");
    println!(
        "ratio publish={:.2} consume={:.2}",
        median(&mut publish.to_vec()),
        median(&mut consume.to_vec())
    );
}

/// The `p`-th percentile (nearest rank) of `sorted` durations, in µs; panics on none.
#[must_use]
pub fn percentile_us(sorted: &[Duration], p: usize) -> f64 {
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted[rank - 1].as_secs_f64() * 1e6
}

/// Prints the range of the per-round latency ratios (`latency ratio ranges: p50 … p99 …`,
/// `others` after the two) and, last, the lines the docs and notes quote: `latency p50
/// ratio=<median>` and `latency p99 ratio=<median>` (bus/raw: below 1 means bus was faster).
pub fn print_latency_ratios(p50: &[f64], p99: &[f64], others: &[(&str, Vec<f64>)]) {
    let mut ranges = format!(
        "latency ratio ranges (bus/raw, per round): p50 {} p99 {}",
        spread(p50.to_vec(), 2),
        spread(p99.to_vec(), 2)
    );
    for (name, values) in others {
        ranges.push_str(&format!(" {name} {}", spread(values.clone(), 2)));
    }
    println!("{ranges}");
    println!("latency p50 ratio={:.2}", median(&mut p50.to_vec()));
    println!("latency p99 ratio={:.2}", median(&mut p99.to_vec()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_even_and_no_values() {
        assert_eq!(median(&mut [5.0, 1.0, 3.0]), 3.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&mut []).is_nan());
        assert_eq!(spread(Vec::new(), 2), "none");
    }

    #[test]
    fn ratios_are_raw_over_bus_per_round() {
        let bus = [Duration::from_secs(2), Duration::from_secs(1)];
        let raw = [Duration::from_secs(1), Duration::from_secs(1)];
        assert_eq!(ratios(&bus, &raw, |d| *d), [0.5, 1.0]);
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let sorted: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile_us(&sorted, 50), 50.0);
        assert_eq!(percentile_us(&sorted, 99), 99.0);
        assert_eq!(percentile_us(&sorted[..1], 99), 1.0);
    }
}
