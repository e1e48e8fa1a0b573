//! Derived seeds: every random stream of a run (data order, timesteps, noise, dropout, sampling)
//! is seeded from the run's seed and its position, so a resumed run continues every stream exactly.

/// Mixes a seed with a path of integers (e.g. step, micro-batch) into a new 64-bit seed
/// (SplitMix64 finaliser over each part).
pub fn mix(seed: u64, parts: &[u64]) -> u64 {
    let mut h = seed ^ 0x9E37_79B9_7F4A_7C15;
    for &p in parts {
        h = splitmix(h ^ splitmix(p.wrapping_add(0x632B_E59B_D9B4_E019)));
    }
    splitmix(h) >> 1 // non-negative as i64, for libtorch's manual_seed
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// libtorch's default generator is process-wide: tests that compare random streams hold this
/// lock so that tests running in parallel threads do not interleave their draws.
#[cfg(test)]
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_inputs_give_distinct_seeds() {
        let mut seen = std::collections::HashSet::new();
        for seed in 0..10 {
            for step in 0..100 {
                assert!(seen.insert(mix(seed, &[step])));
            }
        }
        assert_ne!(mix(1, &[2, 3]), mix(1, &[3, 2]));
        assert_eq!(mix(5, &[6]), mix(5, &[6]));
    }
}
