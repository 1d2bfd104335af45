//! `targets[].shards` and `targets[].sharding`: a target made of several databases, expanded
//! at load into one target per shard (`<target>/<shard>`), each with its rows' rule.

use super::validate::{url_problem, valid_name, Problems};
use super::*;
use std::sync::Arc;
use synapse_apply::shards::{key_range_problems, KeyRange, ShardAssignment};

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
        for (table, rule) in &self.sharding {
            for problem in rule.problems(table, &names) {
                // `sharding.<table>.ranges[1]: …` → field and message.
                let (field, message) = problem.split_once(": ").unwrap_or(("sharding", &problem));
                p.add(format!("{at}.{field}"), message.to_owned());
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
            for (s, range) in t.shards.iter().zip(t.key_ranges()) {
                out.push(TargetConfig {
                    name: format!("{}/{}", t.name, s.name),
                    url: s.url.clone(),
                    shards: Vec::new(),
                    sharding: Default::default(),
                    shard: Some(ShardAssignment {
                        set: t.name.clone(),
                        shard: s.name.clone(),
                        key_range: range.unwrap_or(KeyRange::FULL),
                        rules: rules.clone(),
                    }),
                    ..t.clone()
                });
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
