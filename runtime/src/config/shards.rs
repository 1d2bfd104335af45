//! `targets[].shards` and `targets[].sharding`: a target made of several databases, expanded
//! at load into one target per shard (`<target>/<shard>`), each with its rows' rule.

use super::validate::{url_problem, valid_name, Problems};
use super::*;
use std::collections::BTreeMap;
use std::sync::Arc;
use synapse_apply::shards::{key_range_problems, KeyRange, ShardAssignment, TableRule};

/// One shard of a shard set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    pub name: String,
    pub url: SecretUrl,
    /// The keyspace ids this shard holds for hash-sharded tables, as Vitess names shards
    /// (`-80`, `80-`, `40-80`). Absent on every shard: the space split evenly in their order.
    #[serde(default)]
    pub key_range: Option<String>,
}

/// The placement a shard set moves to: every shard of it, kept ones by name alone (their key
/// range and rows stay), new ones with their database and key range; shards of the set not
/// named here are retired once the move finishes. Rows only move to new shards.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReshardConfig {
    pub shards: Vec<NextShard>,
    /// The rules after the move, where range-sharded tables' ranges change (absent: the same).
    #[serde(default)]
    pub sharding: Option<BTreeMap<String, TableRule>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NextShard {
    pub name: String,
    /// A new shard's database (a kept shard keeps its own).
    #[serde(default)]
    pub url: Option<SecretUrl>,
    /// A new shard's key range (a kept shard keeps its own).
    #[serde(default)]
    pub key_range: Option<String>,
}

/// A shard's part in a set's move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReshardRole {
    /// Of the next placement only: copied and applied once the move starts.
    New,
    /// Of the current placement only: applied until the move finishes (so that it can be
    /// reversed), then its moved rows are deleted.
    Retired,
}

/// `n` equal key ranges, in order.
fn even_split(n: usize) -> Vec<KeyRange> {
    let step = (u128::from(u64::MAX) + 1) / n.max(1) as u128;
    (0..n)
        .map(|i| KeyRange {
            start: (step * i as u128) as u64,
            end: (i + 1 < n).then(|| (step * (i as u128 + 1)) as u64),
        })
        .collect()
}

/// Each rule's problems in a set of shards `names`, under `at` (`sharding.<table>.ranges[1]: …`
/// becomes field and message).
fn rule_problems(rules: &BTreeMap<String, TableRule>, at: &str, names: &[&str], p: &mut Problems) {
    for (table, rule) in rules {
        for problem in rule.problems(table, names) {
            let (field, message) = problem.split_once(": ").unwrap_or(("sharding", &problem));
            p.add(format!("{at}.{field}"), message.to_owned());
        }
    }
}

impl TargetConfig {
    /// The key range of each shard: as given, or the even split.
    fn key_ranges(&self) -> Vec<Option<KeyRange>> {
        if self.shards.iter().all(|s| s.key_range.is_none()) {
            return even_split(self.shards.len()).into_iter().map(Some).collect();
        }
        self.shards.iter().map(|s| s.key_range.as_deref().and_then(|r| r.parse().ok())).collect()
    }

    /// Problems of a shard set's `url`, `shards` and `sharding` (at `targets[i]`).
    pub(super) fn shard_problems(&self, i: usize, p: &mut Problems) {
        let at = format!("targets[{i}]");
        if self.shards.is_empty() {
            if !self.sharding.is_empty() {
                p.add(format!("{at}.sharding"), "sharding rules need shards: list the databases under `shards`");
            }
            url_problem(p, format!("{at}.url"), &self.url);
            return;
        }
        if !self.url.0.is_empty() {
            p.add(format!("{at}.url"), "a shard set has no url of its own: each entry of `shards` gives its database");
        }
        let mut names: Vec<&str> = Vec::new();
        for (j, s) in self.shards.iter().enumerate() {
            if !valid_name(&s.name) || names.contains(&s.name.as_str()) {
                p.add(
                    format!("{at}.shards[{j}].name"),
                    format!("`{}` must be unique in the set, 1–40 characters of a-z, 0-9, _ or -", s.name),
                );
            }
            names.push(&s.name);
            url_problem(p, format!("{at}.shards[{j}].url"), &s.url);
            if let Some(Err(e)) = s.key_range.as_deref().map(str::parse::<KeyRange>) {
                p.add(format!("{at}.shards[{j}].key_range"), e);
            }
        }
        let given = self.shards.iter().filter(|s| s.key_range.is_some()).count();
        if given != 0 && given != self.shards.len() {
            p.add(
                format!("{at}.shards"),
                "give every shard a key_range, or none (the keyspace is then split evenly in the shards' order)",
            );
        } else {
            let ranges: Vec<(&str, KeyRange)> =
                names.iter().zip(self.key_ranges()).filter_map(|(n, r)| Some((*n, r?))).collect();
            if ranges.len() == self.shards.len() {
                for problem in key_range_problems(&ranges) {
                    p.add(format!("{at}.shards"), problem.trim_start_matches("shards: ").to_owned());
                }
            }
        }
        rule_problems(&self.sharding, &at, &names, p);
        if let Some(r) = &self.resharding {
            self.reshard_problems(r, &at, p);
        }
    }

    fn reshard_problems(&self, r: &ReshardConfig, at: &str, p: &mut Problems) {
        let at = format!("{at}.resharding");
        let current: BTreeMap<&str, Option<KeyRange>> =
            self.shards.iter().map(|s| s.name.as_str()).zip(self.key_ranges()).collect();
        let mut names: Vec<&str> = Vec::new();
        let mut ranges = Vec::new();
        for (j, s) in r.shards.iter().enumerate() {
            let f = format!("{at}.shards[{j}]");
            if names.contains(&s.name.as_str()) || !valid_name(&s.name) {
                p.add(format!("{f}.name"), format!("`{}` must be unique, 1–40 characters of a-z, 0-9, _ or -", s.name));
            }
            names.push(&s.name);
            let given = s.key_range.as_deref().map(str::parse::<KeyRange>);
            if let Some(Err(e)) = &given {
                p.add(format!("{f}.key_range"), e.clone());
            }
            match current.get(s.name.as_str()) {
                Some(kept) => {
                    if s.url.is_some() {
                        p.add(
                            format!("{f}.url"),
                            "a kept shard keeps its database: name it alone (move rows to a new shard instead)",
                        );
                    }
                    if let (Some(Ok(g)), Some(k)) = (&given, kept) {
                        if g != k {
                            p.add(
                                format!("{f}.key_range"),
                                format!("a kept shard keeps its key range ({k}); give the new range to a new shard"),
                            );
                        }
                    }
                    ranges.push((s.name.as_str(), *kept));
                }
                None => {
                    match &s.url {
                        Some(u) => url_problem(p, format!("{f}.url"), u),
                        None => p.add(format!("{f}.url"), "a new shard needs its database's url"),
                    }
                    if given.is_none() {
                        p.add(format!("{f}.key_range"), "a new shard needs its key range, e.g. \"-40\"");
                    }
                    ranges.push((s.name.as_str(), given.and_then(Result::ok)));
                }
            }
        }
        if names.iter().all(|n| current.contains_key(n)) {
            p.add(format!("{at}.shards"), "name at least one new shard: rows move only to new shards");
        }
        let complete: Vec<(&str, KeyRange)> = ranges.iter().filter_map(|(n, r)| Some((*n, (*r)?))).collect();
        if complete.len() == ranges.len() {
            for problem in key_range_problems(&complete) {
                p.add(format!("{at}.shards"), problem.trim_start_matches("shards: ").to_owned());
            }
        }
        let next = r.sharding.as_ref().unwrap_or(&self.sharding);
        rule_problems(next, &at, &names, p);
        // The same tables, sharded the same way: only where rows live changes.
        let kinds = |rules: &BTreeMap<String, TableRule>| -> Vec<(String, Option<String>, Option<String>)> {
            rules.iter().map(|(t, r)| (t.clone(), r.hash.clone(), r.range.clone())).collect()
        };
        if kinds(next) != kinds(&self.sharding) {
            p.add(format!("{at}.sharding"), "must shard the same tables on the same columns as `sharding`; only the ranges of range-sharded tables may change");
        }
        // A kept shard's rows stay: its ranges of every range-sharded table are unchanged.
        for kept in names.iter().filter(|n| current.contains_key(*n)) {
            for (table, rule) in next {
                let mine = |r: &TableRule| -> Vec<_> {
                    r.ranges.iter().filter(|v| v.shard == *kept).map(|v| (v.from.clone(), v.to.clone())).collect()
                };
                if self.sharding.get(table).is_some_and(|old| mine(old) != mine(rule)) {
                    p.add(
                        format!("{at}.sharding.{table}"),
                        format!("kept shard `{kept}` would gain or lose rows; move ranges to a new shard"),
                    );
                }
            }
        }
    }
}

impl Config {
    /// Replaces each shard set by one target per shard (`<set>/<shard>`, same sources and
    /// settings), each carrying its [`ShardAssignment`]. Run after validation.
    pub fn expand_shards(&mut self) {
        let mut out = Vec::with_capacity(self.targets.len());
        for t in std::mem::take(&mut self.targets) {
            if t.shards.is_empty() {
                out.push(t);
                continue;
            }
            let rules = Arc::new(t.sharding.clone());
            let next_names: Vec<&str> =
                t.resharding.iter().flat_map(|r| r.shards.iter().map(|s| s.name.as_str())).collect();
            let shard = |name: &str,
                         url: &SecretUrl,
                         range: Option<KeyRange>,
                         rules: &Arc<BTreeMap<String, TableRule>>,
                         role| {
                TargetConfig {
                    name: format!("{}/{name}", t.name),
                    url: url.clone(),
                    shards: Vec::new(),
                    sharding: Default::default(),
                    resharding: None,
                    shard: Some(ShardAssignment {
                        set: t.name.clone(),
                        shard: name.to_owned(),
                        key_range: range.unwrap_or(KeyRange::FULL),
                        rules: rules.clone(),
                    }),
                    reshard_role: role,
                    ..t.clone()
                }
            };
            for (s, range) in t.shards.iter().zip(t.key_ranges()) {
                let retired = t.resharding.is_some() && !next_names.contains(&s.name.as_str());
                out.push(shard(&s.name, &s.url, range, &rules, retired.then_some(ReshardRole::Retired)));
            }
            if let Some(r) = &t.resharding {
                let next_rules = Arc::new(r.sharding.clone().unwrap_or_else(|| t.sharding.clone()));
                for s in r.shards.iter().filter(|s| !t.shards.iter().any(|c| c.name == s.name)) {
                    let (Some(url), Some(range)) = (&s.url, s.key_range.as_deref().and_then(|k| k.parse().ok())) else {
                        continue; // refused by validation
                    };
                    out.push(shard(&s.name, url, Some(range), &next_rules, Some(ReshardRole::New)));
                }
            }
        }
        self.targets = out;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_even_split_covers_the_space_once() {
        for n in 1..=7 {
            let ranges = even_split(n);
            let named: Vec<(&str, KeyRange)> = ranges.iter().map(|r| ("s", *r)).collect();
            assert!(key_range_problems(&named).is_empty(), "{n}: {ranges:?}");
        }
        let two: Vec<String> = even_split(2).iter().map(ToString::to_string).collect();
        assert_eq!(two, ["-80", "80-"]);
        let four: Vec<String> = even_split(4).iter().map(ToString::to_string).collect();
        assert_eq!(four, ["-40", "40-80", "80-c0", "c0-"]);
    }
}
