//! A count of events over a sliding window of time, kept in ten slots so
//! that old events fall out a tenth of the window at a time.

use std::time::Duration;

use tokio::time::Instant;

/// Slots the window is cut into.
const SLOTS: usize = 10;

/// Events of two kinds (say, requests and the failures among them) over
/// the last `span` of time.
#[derive(Debug)]
pub(crate) struct Window {
    start: Instant,
    /// Length of one slot; `span / SLOTS`, at least 1 ms.
    slot: Duration,
    slots: [Slot; SLOTS],
}

#[derive(Debug, Default, Clone, Copy)]
struct Slot {
    /// Which slot-length of time since `start` this slot counts.
    epoch: u64,
    total: u64,
    marked: u64,
}

/// What a window counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) total: u64,
    pub(crate) marked: u64,
}

impl Window {
    pub(crate) fn new(span: Duration, now: Instant) -> Self {
        let slot = (span / SLOTS as u32).max(Duration::from_millis(1));
        Self {
            start: now,
            slot,
            slots: [Slot::default(); SLOTS],
        }
    }

    /// Counts one event; `marked` ones are counted in both sums.
    pub(crate) fn add(&mut self, now: Instant, marked: bool) {
        let epoch = self.epoch(now);
        let slot = &mut self.slots[(epoch % SLOTS as u64) as usize];
        if slot.epoch != epoch {
            *slot = Slot {
                epoch,
                ..Slot::default()
            };
        }
        slot.total += 1;
        slot.marked += u64::from(marked);
    }

    /// The events of the last `span`.
    pub(crate) fn counts(&self, now: Instant) -> Counts {
        let current = self.epoch(now);
        let oldest = current.saturating_sub(SLOTS as u64 - 1);
        self.slots
            .iter()
            .filter(|slot| slot.epoch >= oldest && slot.epoch <= current)
            .fold(Counts::default(), |sum, slot| Counts {
                total: sum.total + slot.total,
                marked: sum.marked + slot.marked,
            })
    }

    /// Forgets every event.
    pub(crate) fn clear(&mut self) {
        self.slots = [Slot::default(); SLOTS];
    }

    fn epoch(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.start);
        (since.as_nanos() / self.slot.as_nanos()) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_fall_out_of_the_window() {
        let start = Instant::now();
        let mut window = Window::new(Duration::from_secs(10), start);
        window.add(start, false);
        window.add(start, true);
        let later = start + Duration::from_secs(5);
        window.add(later, true);
        assert_eq!(
            window.counts(later),
            Counts {
                total: 3,
                marked: 2
            }
        );

        // Past the first second's slot's span, its two events are gone.
        let after = start + Duration::from_millis(10_500);
        assert_eq!(
            window.counts(after),
            Counts {
                total: 1,
                marked: 1
            }
        );
        let much_later = start + Duration::from_secs(60);
        assert_eq!(window.counts(much_later), Counts::default());
    }
}
