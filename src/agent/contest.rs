//! Contested keys: a key the agent keeps correcting because another writer (TuneD, a script,
//! another DaemonSet) keeps changing it back. More than `threshold` corrections within `window`
//! make it `Contested`: the agent then leaves it alone for a while before correcting it again,
//! doubling the pause up to `max_backoff` while the fight goes on, instead of rewriting it every
//! interval forever. Pure: the caller passes the time.
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// The limits, from the agent's flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContestLimits {
    /// Corrections within `window` that a key may need before it is contested.
    pub threshold: u32,
    pub window: Duration,
    /// Longest pause between two corrections of a contested key.
    pub max_backoff: Duration,
}

impl Default for ContestLimits {
    fn default() -> Self {
        Self {
            threshold: 5,
            window: Duration::from_secs(3600),
            max_backoff: Duration::from_secs(600),
        }
    }
}

/// The first pause of a contested key; doubled per further correction, up to `max_backoff`.
const FIRST_PAUSE: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct KeyFight {
    /// When the key was corrected, oldest first, within the window.
    corrections: VecDeque<Instant>,
    /// The value found instead of ours, last time.
    foreign: String,
    /// Pauses taken in a row (the next is `FIRST_PAUSE * 2^pauses`, bounded).
    pauses: u32,
    /// Leave the key alone until then.
    hold_until: Option<Instant>,
}

/// One contested key as the report shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Contested {
    pub key: String,
    pub foreign: String,
    pub corrections: usize,
    /// When the key may be corrected again.
    pub hold_until: Option<Instant>,
}

/// Every key's recent corrections.
#[derive(Debug, Default)]
pub struct Contests {
    limits: ContestLimits,
    keys: BTreeMap<String, KeyFight>,
}

impl Contests {
    pub fn new(limits: ContestLimits) -> Self {
        Self {
            limits,
            keys: BTreeMap::new(),
        }
    }

    fn first_pause(&self) -> Duration {
        FIRST_PAUSE.min(self.limits.max_backoff)
    }

    /// Records that `key` held `foreign` and was corrected at `now`. Returns true when the key
    /// is contested from now on (the correction that crossed the threshold, or any after it).
    pub fn corrected(&mut self, key: &str, foreign: &str, now: Instant) -> bool {
        let limits = self.limits;
        let first = self.first_pause();
        let fight = self.keys.entry(key.to_owned()).or_default();
        fight.corrections.push_back(now);
        prune(&mut fight.corrections, limits.window, now);
        fight.foreign = foreign.to_owned();
        if fight.corrections.len() <= limits.threshold as usize {
            return false;
        }
        let pause = first
            .saturating_mul(1u32 << fight.pauses.min(16))
            .min(limits.max_backoff);
        fight.pauses = fight.pauses.saturating_add(1);
        fight.hold_until = Some(now + pause);
        true
    }

    /// Whether `key` must be left alone at `now` (a contested key in its pause).
    pub fn holding(&self, key: &str, now: Instant) -> bool {
        self.keys
            .get(key)
            .and_then(|f| f.hold_until)
            .is_some_and(|until| now < until)
    }

    /// A pass found `key` as wanted without correcting it: once its corrections have left the
    /// window, the fight is over and its pauses start again from the first.
    pub fn settled(&mut self, key: &str, now: Instant) {
        let window = self.limits.window;
        if let Some(f) = self.keys.get_mut(key) {
            prune(&mut f.corrections, window, now);
            if f.corrections.is_empty() && !self.holding(key, now) {
                self.keys.remove(key);
            }
        }
    }

    /// No profile wants `key` any more.
    pub fn forget(&mut self, key: &str) {
        self.keys.remove(key);
    }

    /// The keys contested at `now` (more than `threshold` corrections in the window), by key.
    pub fn contested(&self, now: Instant) -> Vec<Contested> {
        self.keys
            .iter()
            .filter_map(|(k, f)| {
                let recent = f
                    .corrections
                    .iter()
                    .filter(|t| now.saturating_duration_since(**t) <= self.limits.window)
                    .count();
                (recent > self.limits.threshold as usize || self.holding(k, now)).then(|| {
                    Contested {
                        key: k.clone(),
                        foreign: f.foreign.clone(),
                        corrections: recent,
                        hold_until: f.hold_until.filter(|u| now < *u),
                    }
                })
            })
            .collect()
    }
}

fn prune(corrections: &mut VecDeque<Instant>, window: Duration, now: Instant) {
    while corrections
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) > window)
    {
        corrections.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "net.ipv4.tcp_fin_timeout";

    fn limits() -> ContestLimits {
        ContestLimits {
            threshold: 3,
            window: Duration::from_secs(60),
            max_backoff: Duration::from_secs(120),
        }
    }

    #[test]
    fn a_key_corrected_more_than_the_threshold_is_contested_and_held() {
        let mut c = Contests::new(limits());
        let t0 = Instant::now();
        for i in 0..3 {
            assert!(!c.corrected(KEY, "60", t0 + Duration::from_secs(i)));
            assert!(!c.holding(KEY, t0 + Duration::from_secs(i)));
        }
        assert!(c.contested(t0).is_empty());
        let t = t0 + Duration::from_secs(3);
        assert!(c.corrected(KEY, "61", t));
        assert!(c.holding(KEY, t + Duration::from_secs(29)));
        assert!(!c.holding(KEY, t + Duration::from_secs(30)));
        let listed = c.contested(t);
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].foreign.as_str(), listed[0].corrections),
            ("61", 4)
        );
    }

    #[test]
    fn pauses_double_up_to_the_bound() {
        let mut c = Contests::new(ContestLimits {
            window: Duration::from_secs(3600),
            ..limits()
        });
        let mut t = Instant::now();
        for _ in 0..3 {
            c.corrected(KEY, "60", t);
        }
        let mut pauses = Vec::new();
        for _ in 0..5 {
            c.corrected(KEY, "60", t);
            let until = c.contested(t)[0].hold_until.expect("held");
            pauses.push((until - t).as_secs());
            t = until;
        }
        assert_eq!(pauses, [30, 60, 120, 120, 120]);
    }

    #[test]
    fn corrections_older_than_the_window_do_not_count_and_the_fight_ends() {
        let mut c = Contests::new(limits());
        let t0 = Instant::now();
        for i in 0..3 {
            c.corrected(KEY, "60", t0 + Duration::from_secs(i));
        }
        let later = t0 + Duration::from_secs(200);
        assert!(!c.corrected(KEY, "60", later), "three of four are stale");
        c.settled(KEY, later + Duration::from_secs(61));
        assert!(c.contested(later + Duration::from_secs(61)).is_empty());
        c.forget(KEY);
        assert!(c.keys.is_empty());
    }
}

#[cfg(test)]
#[path = "contest_tests.rs"]
mod pass_tests;
