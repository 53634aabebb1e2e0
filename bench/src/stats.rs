//! Medians and spreads of repeated measurements.

use serde::Serialize;

/// A set of samples: the median is what tables report, the rest shows the noise.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub p99: f64,
}

pub fn summarize(samples: &[f64]) -> Summary {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return Summary { n: 0, median: f64::NAN, min: f64::NAN, max: f64::NAN, p99: f64::NAN };
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Summary { n: v.len(), median: at(0.5), min: v[0], max: v[v.len() - 1], p99: at(0.99) }
}

/// The median of paired ratios with a distribution-free confidence interval:
/// the order statistics `k`-th from each end, `k` the largest for which the
/// interval covers the true median with probability ≥ 95 % (a sign test:
/// each ratio falls either side of the median with probability ½, whatever
/// the noise's shape).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct MedianInterval {
    pub n: usize,
    pub median: f64,
    pub low: f64,
    pub high: f64,
    /// The interval's exact coverage, from the binomial distribution.
    pub coverage: f64,
}

pub fn median_interval(samples: &[f64]) -> MedianInterval {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return MedianInterval { n, median: f64::NAN, low: f64::NAN, high: f64::NAN, coverage: 0.0 };
    }
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    // P(X < k) for X ~ Binomial(n, ½): the chance the k-th smallest is above the median.
    let below = |k: usize| -> f64 {
        let mut total = 0.0;
        let mut c = 1.0f64; // C(n, 0)
        for i in 0..k {
            total += c;
            c = c * (n - i) as f64 / (i + 1) as f64;
        }
        total / 2f64.powi(n as i32)
    };
    let mut k = 0;
    while k < n / 2 && 1.0 - 2.0 * below(k + 1) >= 0.95 {
        k += 1;
    }
    if k == 0 {
        // Too few pairs for 95 %: the whole range, with the coverage it has.
        return MedianInterval { n, median, low: v[0], high: v[n - 1], coverage: 1.0 - 2.0 * below(1) };
    }
    MedianInterval { n, median, low: v[k - 1], high: v[n - k], coverage: 1.0 - 2.0 * below(k) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        let s = summarize(&[5.0, 1.0, 3.0, f64::NAN]);
        assert_eq!((s.n, s.median, s.min, s.max), (3, 3.0, 1.0, 5.0));
        assert!(summarize(&[]).median.is_nan());
        let many: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(summarize(&many).p99, 990.0);
    }

    #[test]
    fn median_interval_from_order_statistics() {
        // 12 pairs: the 3rd smallest to the 3rd largest covers 96.1 %.
        let twelve: Vec<f64> = (1..=12).map(f64::from).collect();
        let m = median_interval(&twelve);
        assert_eq!((m.n, m.median, m.low, m.high), (12, 6.5, 3.0, 10.0));
        assert!((m.coverage - 0.9614).abs() < 1e-3, "{}", m.coverage);
        // 6 pairs: only the whole range reaches 95 % (96.9 %).
        let six = median_interval(&[0.98, 0.97, 1.01, 0.99, 0.96, 1.0]);
        assert_eq!((six.low, six.high), (0.96, 1.01));
        assert!((six.coverage - 0.96875).abs() < 1e-9);
        // 5 pairs cannot reach 95 %: the range, with the coverage it has.
        let five = median_interval(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!((five.median, five.low, five.high), (3.0, 1.0, 5.0));
        assert!((five.coverage - 0.9375).abs() < 1e-9);
        assert!(median_interval(&[]).median.is_nan());
    }
}
