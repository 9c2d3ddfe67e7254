//! `[[pool.scaler.schedule]]`: windows of the week, in a time zone, in
//! which a pool is kept up whatever its traffic (warm before the working
//! day starts, say).
//!
//! This module only answers "how many replicas does the schedule want at
//! this instant"; the supervisor (`scaling`) acts on it. Time zones and
//! daylight saving come from jiff and its bundled tz database, so the
//! answer does not depend on the host's `/usr/share/zoneinfo`.

use std::fmt;
use std::sync::Arc;

use jiff::civil::Weekday;
use jiff::tz::TimeZone;
use jiff::Timestamp;

use crate::config::ScheduleConfig;

/// The clock the scaler reads schedules by; tests pass their own.
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(Timestamp::now)
}

/// Day names as written in `days`, Monday first.
const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// Minutes in a day; `end = "24:00"` is this.
const DAY_MINUTES: u16 = 24 * 60;

/// A schedule entry that does not parse: the key under
/// `pool.scaler.schedule[i]` and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleError {
    pub field: &'static str,
    pub message: String,
}

impl fmt::Display for ScheduleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// One parsed `[[pool.scaler.schedule]]` entry.
#[derive(Clone)]
pub struct Window {
    /// Indexed Monday first.
    days: [bool; 7],
    /// Minutes after local midnight.
    start: u16,
    /// Minutes after local midnight; at or before `start`, the window
    /// ends on the next day.
    end: u16,
    zone: TimeZone,
    min_replicas: u32,
}

impl fmt::Debug for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Window")
            .field("days", &self.days)
            .field("start", &self.start)
            .field("end", &self.end)
            .field("zone", &self.zone.iana_name())
            .field("min_replicas", &self.min_replicas)
            .finish()
    }
}

impl Window {
    /// Parses and checks one entry.
    pub fn parse(config: &ScheduleConfig) -> Result<Self, ScheduleError> {
        let mut days = [false; 7];
        if config.days.is_empty() {
            return Err(ScheduleError {
                field: "days",
                message: "must name at least one day, e.g. [\"mon\", \"tue\"]".to_string(),
            });
        }
        for day in &config.days {
            let lower = day.to_ascii_lowercase();
            let Some(index) = DAY_NAMES.iter().position(|name| *name == lower) else {
                let message = format!("{day:?} is not a day; use {}", DAY_NAMES.join(", "));
                return Err(ScheduleError {
                    field: "days",
                    message,
                });
            };
            if let Some(slot) = days.get_mut(index) {
                *slot = true;
            }
        }
        let start = parse_time("start", &config.start, false)?;
        let end = parse_time("end", &config.end, true)?;
        if start == end {
            return Err(ScheduleError {
                field: "end",
                message: "must differ from start".to_string(),
            });
        }
        let zone = TimeZone::get(&config.timezone).map_err(|e| ScheduleError {
            field: "timezone",
            message: format!(
                "{:?} is not a known IANA time zone (e.g. \"Europe/Berlin\", \"UTC\"): {e}",
                config.timezone
            ),
        })?;
        if config.min_replicas > 1 {
            return Err(ScheduleError {
                field: "min_replicas",
                message: "must be 0 or 1; one server per pool is all a scaler runs".to_string(),
            });
        }
        Ok(Self {
            days,
            start,
            end,
            zone,
            min_replicas: config.min_replicas,
        })
    }

    /// Whether `now` falls inside the window, in its own time zone.
    pub fn contains(&self, now: Timestamp) -> bool {
        let local = now.to_zoned(self.zone.clone());
        let minute = u16::try_from(i32::from(local.hour()) * 60 + i32::from(local.minute()))
            .unwrap_or_default();
        let today = day_index(local.weekday());
        let yesterday = (today + 6) % 7;
        let on = |day: usize| self.days.get(day).copied().unwrap_or(false);
        if self.start < self.end {
            on(today) && minute >= self.start && minute < self.end
        } else {
            // Past midnight: the part before midnight belongs to today's
            // window, the part after to yesterday's.
            (on(today) && minute >= self.start) || (on(yesterday) && minute < self.end)
        }
    }
}

/// A pool's schedule: the windows and the replicas wanted outside them.
#[derive(Debug, Clone)]
pub struct Schedule {
    windows: Vec<Window>,
    outside: u32,
}

impl Schedule {
    /// The schedule of a scaler with `min_replicas` outside any window.
    pub fn parse(configs: &[ScheduleConfig], min_replicas: u32) -> Result<Self, String> {
        let mut windows = Vec::with_capacity(configs.len());
        for (i, config) in configs.iter().enumerate() {
            let window =
                Window::parse(config).map_err(|e| format!("pool.scaler.schedule[{i}].{e}"))?;
            windows.push(window);
        }
        Ok(Self {
            windows,
            outside: min_replicas,
        })
    }

    /// A schedule without windows: `min_replicas` always.
    pub fn fixed(min_replicas: u32) -> Self {
        Self {
            windows: Vec::new(),
            outside: min_replicas,
        }
    }

    /// Whether the schedule has any window; without one, the replicas
    /// wanted never change.
    pub fn is_timed(&self) -> bool {
        !self.windows.is_empty()
    }

    /// The least replicas wanted at `now`: the largest `min_replicas` of
    /// the windows it falls in, else the scaler's own.
    pub fn min_replicas_at(&self, now: Timestamp) -> u32 {
        self.windows
            .iter()
            .filter(|w| w.contains(now))
            .map(|w| w.min_replicas)
            .fold(self.outside, u32::max)
    }
}

/// Monday is 0.
fn day_index(day: Weekday) -> usize {
    usize::try_from(day.to_monday_zero_offset()).unwrap_or_default()
}

/// `"HH:MM"` as minutes after midnight; `"24:00"` only when `end`.
fn parse_time(field: &'static str, text: &str, end: bool) -> Result<u16, ScheduleError> {
    let wrong = || ScheduleError {
        field,
        message: format!("{text:?} is not a time of day; write \"HH:MM\", 00:00 to 23:59"),
    };
    let (hours, minutes) = text.split_once(':').ok_or_else(wrong)?;
    if hours.len() != 2 || minutes.len() != 2 {
        return Err(wrong());
    }
    let hours: u16 = hours.parse().map_err(|_| wrong())?;
    let minutes: u16 = minutes.parse().map_err(|_| wrong())?;
    let total = hours * 60 + minutes;
    let midnight = end && total == DAY_MINUTES && minutes == 0;
    if (hours > 23 || minutes > 59) && !midnight {
        return Err(wrong());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(days: &[&str], start: &str, end: &str, timezone: &str) -> ScheduleConfig {
        ScheduleConfig {
            days: days.iter().map(|d| d.to_string()).collect(),
            start: start.to_string(),
            end: end.to_string(),
            timezone: timezone.to_string(),
            min_replicas: 1,
        }
    }

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    const WEEKDAYS: [&str; 5] = ["mon", "tue", "wed", "thu", "fri"];

    #[test]
    fn berlin_office_hours_follow_daylight_saving() {
        let window = Window::parse(&entry(&WEEKDAYS, "09:00", "18:00", "Europe/Berlin")).unwrap();

        // Winter, UTC+1: 08:30 UTC is 09:30 in Berlin.
        assert!(window.contains(at("2026-01-14T08:30:00Z")));
        assert!(!window.contains(at("2026-01-14T07:30:00Z")));
        assert!(!window.contains(at("2026-01-14T17:00:00Z")));

        // Daylight saving began on Sunday 29 March 2026: on Monday 07:30
        // UTC is already 09:30, while on the Friday before it was 08:30.
        assert!(window.contains(at("2026-03-30T07:30:00Z")));
        assert!(!window.contains(at("2026-03-27T07:30:00Z")));
        assert!(window.contains(at("2026-03-30T15:59:00Z")));
        assert!(!window.contains(at("2026-03-30T16:00:00Z")));

        // Saturday is not in the window.
        assert!(!window.contains(at("2026-01-17T10:00:00Z")));
    }

    #[test]
    fn a_window_past_midnight_belongs_to_the_day_it_starts() {
        let window = Window::parse(&entry(&["fri"], "22:00", "02:00", "UTC")).unwrap();
        assert!(window.contains(at("2026-01-16T23:00:00Z")));
        assert!(window.contains(at("2026-01-17T01:00:00Z")));
        assert!(!window.contains(at("2026-01-17T02:00:00Z")));
        assert!(!window.contains(at("2026-01-16T01:00:00Z")));
    }

    #[test]
    fn outside_every_window_the_scalers_own_min_replicas_applies() {
        let entries = [entry(&["mon"], "00:00", "24:00", "UTC")];
        let schedule = Schedule::parse(&entries, 0).unwrap();
        assert_eq!(schedule.min_replicas_at(at("2026-01-12T23:59:00Z")), 1);
        assert_eq!(schedule.min_replicas_at(at("2026-01-13T00:00:00Z")), 0);
    }

    #[test]
    fn bad_entries_name_their_key() {
        let cases = [
            (entry(&["mon", "funday"], "09:00", "18:00", "UTC"), "days"),
            (entry(&[], "09:00", "18:00", "UTC"), "days"),
            (entry(&WEEKDAYS, "9:00", "18:00", "UTC"), "start"),
            (entry(&WEEKDAYS, "09:60", "18:00", "UTC"), "start"),
            (entry(&WEEKDAYS, "24:00", "18:00", "UTC"), "start"),
            (entry(&WEEKDAYS, "09:00", "25:00", "UTC"), "end"),
            (entry(&WEEKDAYS, "09:00", "09:00", "UTC"), "end"),
            (
                entry(&WEEKDAYS, "09:00", "18:00", "Europe/Atlantis"),
                "timezone",
            ),
        ];
        for (config, field) in cases {
            let error = Window::parse(&config).unwrap_err();
            assert_eq!(error.field, field, "{config:?}: {error}");
        }
        let mut two = entry(&WEEKDAYS, "09:00", "18:00", "UTC");
        two.min_replicas = 2;
        assert_eq!(Window::parse(&two).unwrap_err().field, "min_replicas");

        let error = Schedule::parse(&[entry(&["x"], "09:00", "18:00", "UTC")], 0).unwrap_err();
        assert!(
            error.starts_with("pool.scaler.schedule[0].days: "),
            "{error}"
        );
    }
}
