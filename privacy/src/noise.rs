//! Noise for numbers that leave the company: discrete Laplace noise drawn
//! *deterministically* from a secret and the identity of the cell it protects
//! (LinkedIn's PriPeARL property), so the same cell reached by any path, any
//! number of times, gets the same answer and averaging repeats buys nothing.
//!
//! The sampler is exact: integers only, no floating point anywhere in the
//! draw (floating-point Laplace noise leaks through its low bits — Mironov,
//! CCS 2012). It follows Canonne, Kamath and Steinke, "The Discrete Gaussian
//! for Differential Privacy" (NeurIPS 2020, arXiv 2004.00010), Algorithms 1
//! and 2: Bernoulli(exp(−γ)) for rational γ by a series of Bernoulli(γ/k)
//! trials, a geometric count of Bernoulli(exp(−1)) successes, and rejection.
//! Its randomness is ChaCha20 seeded with HMAC-SHA256(noise key, cell
//! identity).

use hmac::{Hmac, KeyInit, Mac};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::Sha256;

use crate::keys::SecretKey;

/// A discrete Laplace distribution over the integers with scale `numerator / denominator`:
/// P(x) ∝ exp(−|x| · denominator / numerator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscreteLaplace {
    numerator: u64,
    denominator: u64,
}

impl DiscreteLaplace {
    /// Scale `numerator / denominator` (both at least 1): e.g. sensitivity Δ and ε = p/q give
    /// scale Δ/ε = Δ·q / p.
    pub fn new(numerator: u64, denominator: u64) -> Self {
        DiscreteLaplace {
            numerator: numerator.max(1),
            denominator: denominator.max(1),
        }
    }

    /// The scale as a number, for reporting (never used to draw).
    pub fn scale(&self) -> f64 {
        self.numerator as f64 / self.denominator as f64
    }

    /// The variance, 2p/(1−p)² with p = exp(−1/scale), for reporting.
    pub fn variance(&self) -> f64 {
        let p = (-1.0 / self.scale()).exp();
        2.0 * p / ((1.0 - p) * (1.0 - p))
    }

    /// The half-width of the central 95 % interval: the least w with P(|X| ≤ w) ≥ 0.95, from
    /// P(|X| > w) = 2p^(w+1)/(1+p).
    pub fn ci95(&self) -> u64 {
        let p = (-1.0 / self.scale()).exp();
        if p <= 0.0 {
            return 0;
        }
        // 2 p^(w+1) / (1+p) <= 0.05  <=>  w + 1 >= ln(0.025 (1+p)) / ln p
        let w = ((0.025 * (1.0 + p)).ln() / p.ln()).ceil() - 1.0;
        w.max(0.0) as u64
    }

    /// One draw from `rng`.
    pub fn sample(&self, rng: &mut impl Rng) -> i64 {
        // CKS20 Algorithm 2 with scale t/s: t = numerator, s = denominator
        let (s, t) = (self.denominator, self.numerator);
        loop {
            let u = rng.random_range(0..t);
            if !bernoulli_exp(rng, u, t) {
                continue;
            }
            let mut v: u64 = 0;
            while bernoulli_exp(rng, 1, 1) {
                v = v.saturating_add(1);
            }
            let x = u.saturating_add(t.saturating_mul(v));
            let y = (x / s) as i64;
            let negative: bool = rng.random();
            if negative && y == 0 {
                continue;
            }
            return if negative { -y } else { y };
        }
    }
}

/// Bernoulli(n/d) for 0 ≤ n ≤ d, exactly: a uniform integer below d is below n.
fn bernoulli_ratio(rng: &mut impl Rng, n: u128, d: u128) -> bool {
    n > 0 && rng.random_range(0..d) < n
}

/// Bernoulli(exp(−n/d)), exactly (CKS20 Algorithm 1).
fn bernoulli_exp(rng: &mut impl Rng, n: u64, d: u64) -> bool {
    let (mut n, d) = (u128::from(n), u128::from(d.max(1)));
    // exp(−γ) = exp(−1)^⌊γ⌋ · exp(−(γ − ⌊γ⌋))
    while n > d {
        if !bernoulli_exp_at_most_one(rng, d, d) {
            return false;
        }
        n -= d;
    }
    bernoulli_exp_at_most_one(rng, n, d)
}

/// Bernoulli(exp(−n/d)) for n ≤ d: the first k with Bernoulli(γ/k) = 0 is odd with
/// probability exp(−γ).
fn bernoulli_exp_at_most_one(rng: &mut impl Rng, n: u128, d: u128) -> bool {
    let mut k: u128 = 1;
    while bernoulli_ratio(rng, n, d.saturating_mul(k)) {
        k += 1;
    }
    k % 2 == 1
}

/// The randomness of one cell: ChaCha20 keyed by HMAC-SHA256(noise key, the cell's canonical
/// identity). The same identity always gives the same stream; without the key nobody can
/// compute it.
pub fn cell_rng(noise_key: &SecretKey, identity: &[u8]) -> ChaCha20Rng {
    let seed: [u8; 32] = match Hmac::<Sha256>::new_from_slice(noise_key.as_bytes()) {
        Ok(mut mac) => {
            mac.update(b"marsad/noise/v1\0");
            mac.update(identity);
            mac.finalize().into_bytes().into()
        }
        // HMAC takes keys of any length: unreachable for a 32-byte key
        Err(_) => [0; 32],
    };
    ChaCha20Rng::from_seed(seed)
}

/// The noise of the cell with this `identity`: the same every time it is asked.
pub fn cell_noise(noise_key: &SecretKey, identity: &[u8], distribution: DiscreteLaplace) -> i64 {
    distribution.sample(&mut cell_rng(noise_key, identity))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_cell_gets_the_same_noise_and_others_do_not() {
        let key = SecretKey::from_bytes([9; 32]);
        let d = DiscreteLaplace::new(10, 1);
        let a = cell_noise(&key, b"traffic_hourly|country=JO|2026-11-01..2026-11-30|events", d);
        assert_eq!(
            a,
            cell_noise(&key, b"traffic_hourly|country=JO|2026-11-01..2026-11-30|events", d)
        );
        let others: Vec<i64> = (0..50)
            .map(|i| cell_noise(&key, format!("cell-{i}").as_bytes(), d))
            .collect();
        assert!(others.iter().any(|n| *n != a), "different cells, different noise");
        let other_key = SecretKey::from_bytes([8; 32]);
        let under_other_key: Vec<i64> = (0..50)
            .map(|i| cell_noise(&other_key, format!("cell-{i}").as_bytes(), d))
            .collect();
        assert_ne!(others, under_other_key, "the key decides the noise");
    }

    /// 10⁶ draws: the mean and the variance are within their confidence bounds.
    #[test]
    fn a_million_draws_have_the_distributions_mean_and_variance() {
        for (numerator, denominator) in [(1, 1), (10, 1), (7, 3)] {
            let d = DiscreteLaplace::new(numerator, denominator);
            let mut rng = ChaCha20Rng::from_seed([42; 32]);
            const N: usize = 1_000_000;
            let draws: Vec<i64> = (0..N).map(|_| d.sample(&mut rng)).collect();
            let mean = draws.iter().sum::<i64>() as f64 / N as f64;
            let variance = draws.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / (N as f64 - 1.0);
            let want = d.variance();
            // the mean's standard error is sqrt(var/N); the sample variance's is about
            // sqrt((kurtosis − 1)/N)·var, with kurtosis ≤ 6 for a Laplace shape
            let mean_bound = 5.0 * (want / N as f64).sqrt();
            let var_bound = 5.0 * (5.0 / N as f64).sqrt() * want;
            assert!(mean.abs() < mean_bound, "scale {}: mean {mean}", d.scale());
            assert!(
                (variance - want).abs() < var_bound,
                "scale {}: variance {variance}, want {want}",
                d.scale()
            );
            // symmetric, and the 95 % interval holds about 95 % of the draws
            let w = d.ci95() as i64;
            let inside = draws.iter().filter(|x| x.abs() <= w).count() as f64 / N as f64;
            assert!(
                (0.95..0.975).contains(&inside),
                "scale {}: {inside} within ±{w}",
                d.scale()
            );
        }
    }

    #[test]
    fn exp_bernoulli_is_exact_in_expectation() {
        let mut rng = ChaCha20Rng::from_seed([1; 32]);
        for (n, d) in [(1u64, 2u64), (3, 2), (5, 1)] {
            let hits = (0..400_000).filter(|_| bernoulli_exp(&mut rng, n, d)).count() as f64 / 400_000.0;
            let want = (-(n as f64) / d as f64).exp();
            assert!(
                (hits - want).abs() < 5.0 * (want * (1.0 - want) / 400_000.0).sqrt(),
                "{n}/{d}: {hits} vs {want}"
            );
        }
    }
}
