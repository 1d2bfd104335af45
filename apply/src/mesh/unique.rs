//! Settling unique-key collisions between a peer's row and local rows.

use super::*;

/// The row that loses a unique-key collision, and what it lost to.
pub(super) struct Lost<'a> {
    pub(super) key: &'a [String],
    pub(super) version: &'a RowVersion,
    pub(super) kept_key: &'a [String],
    pub(super) index: &'a str,
}

/// A live row the buffer is about to write into a table with unique indexes besides its key.
pub(super) struct Claim {
    pub(super) table: String,
    pub(super) key: Vec<String>,
    pub(super) version: RowVersion,
}

/// The text of `column` in a row given by its key and values (`None`: NULL or not known).
pub(super) fn column_text(info: &MeshTable, key: &[String], values: &Values, column: &str) -> Option<String> {
    match info.key.iter().position(|k| k == column) {
        Some(i) => key.get(i).cloned(),
        None => values.get(column).cloned().flatten(),
    }
}

pub(super) fn values_of(info: &MeshTable, v: &RowVersion) -> Values {
    v.cells.iter().map(|(c, cell)| (c.clone(), visible_text(info, c, cell))).collect()
}

/// Concurrent inserts on two nodes can claim one unique value under different primary keys
/// (the same e-mail registered in two regions). Writing both would fail on a unique violation
/// and stop the applier for good, so each claim is checked against the local rows holding its
/// values: `unique_key_winner` keeps the row whose latest write is later, on every node alike;
/// the other becomes a tombstone (deleted, its values kept in its version) and the outcome goes
/// to `synapse.conflicts` as kind `unique_key`. Claims of one batch are checked against each
/// other the same way; local rows the batch deletes or claims are not colliders (their final
/// state is the batch's). Returns the number of conflicts.
pub(super) async fn settle_unique_claims(
    client: &Client,
    statements: &mut HashMap<String, Statement>,
    tables: &HashMap<String, MeshTable>,
    claims: Vec<Claim>,
    rewritten: &HashSet<(String, Vec<String>)>,
    local_rows: &HashMap<(String, Vec<String>), Values>,
    writes: &mut Writes,
) -> Result<u64, ApplyError> {
    let mut conflicts = 0;
    let mut by_table: BTreeMap<String, Vec<Claim>> = BTreeMap::new();
    for c in claims {
        by_table.entry(c.table.clone()).or_default().push(c);
    }
    for (name, claims) in by_table {
        let Some(info) = tables.get(&name) else { continue };
        let claimed: Vec<Values> = claims.iter().map(|c| values_of(info, &c.version)).collect();
        // (claim, index, local key) → the local row's values.
        let mut colliders: Vec<(usize, String, Vec<String>, Values)> = Vec::new();
        // Claims beaten by another claim of this batch: (index, winning claim).
        let mut beaten_by_claim: HashMap<usize, (String, usize)> = HashMap::new();
        for (index, cols) in &info.unique {
            let mut owners: BTreeMap<Vec<String>, Vec<usize>> = BTreeMap::new();
            for (i, c) in claims.iter().enumerate() {
                // A NULL never collides; an unknown (unchanged TOAST) value did not change.
                let probe: Option<Vec<String>> =
                    cols.iter().map(|col| column_text(info, &c.key, &claimed[i], col)).collect();
                if let Some(p) = probe {
                    owners.entry(p).or_default().push(i);
                }
            }
            if owners.is_empty() {
                continue;
            }
            // Claims against each other: per unique value, the winning claim beats the rest.
            for group in owners.values().filter(|g| g.len() > 1) {
                let Some(&best) = group.iter().reduce(|a, b| {
                    let (ca, cb) = (&claims[*a], &claims[*b]);
                    if unique_key_winner((&ca.version.stamp, &ca.key), (&cb.version.stamp, &cb.key)) {
                        a
                    } else {
                        b
                    }
                }) else {
                    continue;
                };
                for &i in group.iter().filter(|i| **i != best) {
                    beaten_by_claim.entry(i).or_insert((index.clone(), best));
                }
            }
            let probes: Vec<&Vec<String>> = owners.keys().collect();
            for (lkey, lvalues) in read_rows_by(client, statements, info, cols, &probes, true).await? {
                let Some(held) =
                    cols.iter().map(|col| column_text(info, &lkey, &lvalues, col)).collect::<Option<Vec<_>>>()
                else {
                    continue;
                };
                for &i in owners.get(&held).into_iter().flatten() {
                    if lkey != claims[i].key && !rewritten.contains(&(name.clone(), lkey.clone())) {
                        colliders.push((i, index.clone(), lkey.clone(), lvalues.clone()));
                    }
                }
            }
        }
        let (tbls, pks): (Vec<String>, Vec<String>) =
            colliders.iter().map(|(_, _, k, _)| (name.clone(), serde_json::to_string(k).unwrap_or_default())).unzip();
        let sides =
            if tbls.is_empty() { HashMap::new() } else { lock_versions(client, statements, &tbls, &pks).await? };
        // A row older than the mesh has no version: the shared baseline, older than any write.
        let baseline = Side { vv: [(NodeId(0), 1)].into_iter().collect(), live: true, ..Side::default() };
        let local_version = |lkey: &Vec<String>, lvalues: &Values| {
            let side = sides.get(&(name.clone(), lkey.clone())).filter(|s| s.live).unwrap_or(&baseline);
            version(info, side, Some(lvalues))
        };
        let mut buried: HashSet<Vec<String>> = HashSet::new();
        for (i, claim) in claims.iter().enumerate() {
            if let Some((index, w)) = beaten_by_claim.get(&i) {
                let winner = &claims[*w];
                let lost = Lost { key: &claim.key, version: &claim.version, kept_key: &winner.key, index };
                writes.bury(info, lost, "remote_wins", [&claim.version, &winner.version]);
                conflicts += 1;
                continue;
            }
            let mine: Vec<_> = colliders
                .iter()
                .filter(|(c, ..)| *c == i)
                .map(|(_, index, k, v)| (index, k, local_version(k, v)))
                .collect();
            let beaten_by = mine
                .iter()
                .find(|(_, lkey, local)| !unique_key_winner((&claim.version.stamp, &claim.key), (&local.stamp, lkey)));
            if let Some((index, lkey, local)) = beaten_by {
                let lost = Lost { key: &claim.key, version: &claim.version, kept_key: lkey, index };
                writes.bury(info, lost, "local_wins", [local, &claim.version]);
                conflicts += 1;
                continue;
            }
            for (index, lkey, local) in &mine {
                if buried.insert((*lkey).clone()) {
                    let lost = Lost { key: lkey, version: local, kept_key: &claim.key, index };
                    writes.bury(info, lost, "remote_wins", [local, &claim.version]);
                    conflicts += 1;
                }
            }
            match local_rows.get(&(name.clone(), claim.key.clone())) {
                // The row moves to other unique values: one multi-row upsert checks each row as
                // it goes, so a value it frees for another claim of the batch (two rows swapping
                // e-mails, or one taking what another left) would still be held. Deleted first
                // (deletes run before upserts) and written whole, it holds nothing meanwhile.
                Some(local) if moves_unique_values(info, &claim.key, local, &claimed[i]) => {
                    let mut whole = local.clone();
                    whole.extend(claimed[i].clone());
                    writes.deletes.entry(name.clone()).or_default().push(claim.key.clone());
                    writes.row(info, &claim.key, Some(&whole));
                    writes.side(&name, &claim.key, side_of(&claim.version));
                }
                _ => writes.version(info, &claim.key, &claim.version),
            }
        }
    }
    Ok(conflicts)
}

/// Whether `claimed` changes a unique column of the local row (unknown values do not change).
pub(super) fn moves_unique_values(info: &MeshTable, key: &[String], local: &Values, claimed: &Values) -> bool {
    info.unique
        .iter()
        .flat_map(|(_, cols)| cols)
        .any(|c| claimed.contains_key(c) && column_text(info, key, local, c) != column_text(info, key, claimed, c))
}

/// Whether two versions descend from a common write (else two independent inserts).
pub(super) fn shares_history(a: &VersionVector, b: &VersionVector) -> bool {
    a.iter().any(|(n, c)| c > 0 && b.get(n) > 0)
}
