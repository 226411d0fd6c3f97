//! Distributions of the write path's work, for metrics: how many
//! operations each group commit carries and how long each fsync of the
//! WAL takes. Fixed buckets of atomic counters, so the writer and the
//! syncer pay one atomic add per bucket, sum and count, and never a lock;
//! a hand-written few lines, because this crate reports plain numbers and
//! leaves their exposition (Prometheus) to the service.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the batch-size buckets, in operations.
const BATCH_BOUNDS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

/// Upper bounds of the fsync-latency buckets, in microseconds (100 µs to
/// 5 s: a healthy SSD answers in the first few, a failing disk in the
/// last).
const FSYNC_BOUNDS_MICROS: &[u64] =
    &[100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 5_000_000];

/// Counts of observations per bucket, with their sum and count.
#[derive(Debug)]
pub(crate) struct Histogram {
    bounds: &'static [u64],
    /// One per bound, and one more for everything above the last.
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [u64]) -> Self {
        let buckets = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Histogram { bounds, buckets, sum: AtomicU64::new(0), count: AtomicU64::new(0) }
    }

    fn observe(&self, value: u64) {
        let i = self.bounds.iter().position(|b| value <= *b).unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts so far, bounds and sum divided by `unit` (1e6 for
    /// microseconds as seconds).
    fn snapshot(&self, unit: f64) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: self
                .bounds
                .iter()
                .zip(self.buckets.iter())
                .map(|(b, n)| (*b as f64 / unit, n.load(Ordering::Relaxed)))
                .collect(),
            sum: self.sum.load(Ordering::Relaxed) as f64 / unit,
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

/// The write path's distributions, kept beside the writer's counters.
#[derive(Debug)]
pub(crate) struct WriteDistributions {
    batch_operations: Histogram,
    fsync_micros: Histogram,
}

impl Default for WriteDistributions {
    fn default() -> Self {
        WriteDistributions {
            batch_operations: Histogram::new(BATCH_BOUNDS),
            fsync_micros: Histogram::new(FSYNC_BOUNDS_MICROS),
        }
    }
}

impl WriteDistributions {
    /// A transaction (one group commit) of `operations` operations ran.
    pub(crate) fn batch(&self, operations: usize) {
        self.batch_operations.observe(operations as u64);
    }

    /// An fsync of the WAL took `took`.
    pub(crate) fn fsync(&self, took: Duration) {
        self.fsync_micros.observe(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
    }

    pub(crate) fn snapshot(&self) -> WriteHistograms {
        WriteHistograms {
            batch_operations: self.batch_operations.snapshot(1.0),
            fsync_seconds: self.fsync_micros.snapshot(1e6),
        }
    }
}

/// A histogram as read: what [`SqliteStore::write_histograms`] reports.
///
/// [`SqliteStore::write_histograms`]: crate::SqliteStore::write_histograms
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Each bucket's upper bound (inclusive) and the observations in it
    /// (not cumulative), ascending; observations above the last bound
    /// are counted in `count` only.
    pub buckets: Vec<(f64, u64)>,
    /// The sum of every observation.
    pub sum: f64,
    /// How many observations there were.
    pub count: u64,
}

/// The write path's work since the store was opened, as distributions.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteHistograms {
    /// Operations per transaction: how well group commit batches (one
    /// transaction per batch, so also the batch sizes).
    pub batch_operations: HistogramSnapshot,
    /// Seconds per fsync of the WAL by the syncer thread (with
    /// [`Synchronous::Full`](crate::Synchronous::Full); none otherwise).
    pub fsync_seconds: HistogramSnapshot,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_buckets() {
        let d = WriteDistributions::default();
        for n in [1, 1, 3, 2000] {
            d.batch(n);
        }
        d.fsync(Duration::from_micros(300));
        let s = d.snapshot();
        assert_eq!(&s.batch_operations.buckets[..3], &[(1.0, 2), (2.0, 0), (4.0, 1)]);
        assert_eq!(s.batch_operations.buckets.iter().map(|(_, n)| n).sum::<u64>(), 3, "2000 is above every bound");
        assert_eq!((s.batch_operations.sum, s.batch_operations.count), (2005.0, 4));
        assert_eq!(s.fsync_seconds.buckets[2], (0.0005, 1));
        assert_eq!((s.fsync_seconds.sum, s.fsync_seconds.count), (0.0003, 1));
    }
}
