//! What the benches of every crate share: their settings from the environment and the
//! statistics of their rounds (median and range), so that each prints its figures the same way.

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
}
