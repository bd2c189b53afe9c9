//! The dice behind [`Chaos`]: one seeded random source per broker.

use std::sync::Mutex;
use std::time::Duration;

use crate::Chaos;

/// Decides, at the configured rates, which faults to inject.
#[derive(Debug)]
pub(crate) struct Dice {
    chaos: Chaos,
    rng: Mutex<fastrand::Rng>,
}

impl Dice {
    pub(crate) fn new(chaos: Chaos) -> Self {
        let rng = chaos
            .seed
            .map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed);
        Self {
            chaos,
            rng: Mutex::new(rng),
        }
    }

    fn roll(&self, rate: f64) -> bool {
        rate > 0.0 && self.rng.lock().unwrap_or_else(|p| p.into_inner()).f64() < rate
    }

    /// How many copies of a published message to store (1, or 2 for a duplicate).
    pub(crate) fn copies(&self) -> usize {
        if self.roll(self.chaos.duplicate_rate) {
            2
        } else {
            1
        }
    }

    /// How long to hold a published message back, if at all.
    pub(crate) fn delay(&self) -> Option<Duration> {
        if !self.roll(self.chaos.delay_rate) {
            return None;
        }
        let ms = self
            .rng
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .u64(0..=self.chaos.max_delay_ms);
        Some(Duration::from_millis(ms))
    }

    /// Whether to lose this acknowledgement, so that the message comes again.
    pub(crate) fn lose_ack(&self) -> bool {
        self.roll(self.chaos.redeliver_rate)
    }
}
