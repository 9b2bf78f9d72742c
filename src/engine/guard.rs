//! Guards judge a [`Plan`] before anything is applied. A purge that is too
//! large, or an empty upstream against a non-empty table, stops the pass;
//! only an explicit force applies it anyway.
//!
//! The other guard, "an incomplete listing never purges", is structural: a
//! pass only builds a plan (and so reaches these guards) from a listing the
//! pager and the differ declared complete.

use crate::config::PolicyConfig;
use crate::diff::Plan;

pub use crate::vocab::{GuardTrip, GUARD_NAMES};

/// Judges `plan` under `policy`. `None` means go ahead. Purges are judged
/// first, then updates: a mass update is how a renamed upstream field
/// shows, and it overwrites data as surely as a purge deletes it. Inserts
/// are not judged: they only add what upstream listed.
pub fn judge(plan: &Plan, policy: &PolicyConfig) -> Option<GuardTrip> {
    judge_purge(plan, policy).or_else(|| judge_update(plan, policy))
}

fn judge_update(plan: &Plan, policy: &PolicyConfig) -> Option<GuardTrip> {
    let update = plan.update.len() as u64;
    if !policy.repair_stale || update == 0 {
        return None;
    }
    if update > policy.max_update_count {
        return Some(GuardTrip::UpdateCount {
            update,
            max: policy.max_update_count,
        });
    }
    let fraction = update as f64 / plan.local_rows.max(1) as f64;
    if fraction > policy.max_update_fraction {
        return Some(GuardTrip::UpdateFraction {
            update,
            local: plan.local_rows,
            percent: fraction * 100.0,
            max_percent: policy.max_update_fraction * 100.0,
        });
    }
    None
}

fn judge_purge(plan: &Plan, policy: &PolicyConfig) -> Option<GuardTrip> {
    let purge = plan.purge.len() as u64;
    if !policy.purge_extra || purge == 0 {
        return None;
    }
    if plan.upstream_rows == 0 && plan.local_rows > 0 {
        return Some(GuardTrip::EmptyUpstream {
            local: plan.local_rows,
        });
    }
    if purge > policy.max_purge_count {
        return Some(GuardTrip::PurgeCount {
            purge,
            max: policy.max_purge_count,
        });
    }
    let fraction = purge as f64 / plan.local_rows.max(1) as f64;
    if fraction > policy.max_purge_fraction {
        return Some(GuardTrip::PurgeFraction {
            purge,
            local: plan.local_rows,
            percent: fraction * 100.0,
            max_percent: policy.max_purge_fraction * 100.0,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Key;

    fn plan(local: u64, upstream: u64, purge: usize) -> Plan {
        Plan {
            purge: (0..purge).map(|i| Key(i.to_string().into())).collect(),
            local_rows: local,
            upstream_rows: upstream,
            ..Plan::default()
        }
    }

    #[test]
    fn small_purge_passes() {
        assert_eq!(judge(&plan(100, 95, 5), &PolicyConfig::default()), None);
    }

    #[test]
    fn fraction_above_limit_trips() {
        let trip = judge(&plan(100, 89, 11), &PolicyConfig::default()).unwrap();
        assert_eq!(trip.name(), "purge_fraction");
        // exactly at the limit is allowed
        assert_eq!(judge(&plan(100, 90, 10), &PolicyConfig::default()), None);
    }

    #[test]
    fn count_above_limit_trips() {
        let policy = PolicyConfig {
            max_purge_count: 3,
            ..PolicyConfig::default()
        };
        assert_eq!(
            judge(&plan(1000, 996, 4), &policy),
            Some(GuardTrip::PurgeCount { purge: 4, max: 3 })
        );
    }

    #[test]
    fn empty_upstream_trips_even_with_permissive_limits() {
        let policy = PolicyConfig {
            max_purge_fraction: 1.0,
            max_purge_count: u64::MAX,
            ..PolicyConfig::default()
        };
        assert_eq!(
            judge(&plan(3, 0, 3), &policy),
            Some(GuardTrip::EmptyUpstream { local: 3 })
        );
    }

    #[test]
    fn mass_update_trips() {
        let mut p = plan(100, 100, 0);
        p.update = (0..30)
            .map(|i| crate::model::Row {
                key: Key(i.to_string().into()),
                values: vec![],
            })
            .collect();
        let trip = judge(&p, &PolicyConfig::default()).unwrap();
        assert_eq!(trip.name(), "update_fraction");
        let policy = PolicyConfig {
            max_update_fraction: 1.0,
            max_update_count: 29,
            ..PolicyConfig::default()
        };
        assert_eq!(judge(&p, &policy).unwrap().name(), "update_count");
        let policy = PolicyConfig {
            max_update_fraction: 0.30,
            ..PolicyConfig::default()
        };
        assert_eq!(judge(&p, &policy), None);
        let policy = PolicyConfig {
            repair_stale: false,
            ..PolicyConfig::default()
        };
        assert_eq!(judge(&p, &policy), None);
    }

    #[test]
    fn purge_disabled_never_trips() {
        let policy = PolicyConfig {
            purge_extra: false,
            ..PolicyConfig::default()
        };
        assert_eq!(judge(&plan(3, 0, 3), &policy), None);
    }
}
