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
}
