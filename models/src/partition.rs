//! Splitting a training set across simulated clients.
//!
//! Federated experiments differ mostly in *how* data is spread over clients, so the spread is a
//! value ([`PartitionSpec`]) that can be parsed from the CLI (`"dirichlet:10:0.5"`), stored in a
//! run config (serde) and replayed exactly (every partitioner is deterministic for a seed).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Gamma};

use crate::ModelError;

/// How to spread samples over clients.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum PartitionSpec {
    /// One client per distinct id of the dataset's clients file (e.g. FEMNIST writers).
    Natural,
    /// Uniformly shuffled, near-equal shares.
    Iid {
        /// Number of clients.
        clients: usize,
    },
    /// Label skew: for each class, client shares are drawn from `Dir(alpha)`; small `alpha` means
    /// each client sees few classes.
    Dirichlet {
        /// Number of clients.
        clients: usize,
        /// Concentration (> 0).
        alpha: f64,
    },
    /// McMahan et al.'s pathological split: sort by label, cut into
    /// `clients · shards_per_client` shards, deal shards out at random.
    Shards {
        /// Number of clients.
        clients: usize,
        /// Shards given to each client.
        shards_per_client: usize,
    },
}

impl fmt::Display for PartitionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PartitionSpec::Natural => write!(f, "natural"),
            PartitionSpec::Iid { clients } => write!(f, "iid:{clients}"),
            PartitionSpec::Dirichlet { clients, alpha } => write!(f, "dirichlet:{clients}:{alpha}"),
            PartitionSpec::Shards {
                clients,
                shards_per_client,
            } => write!(f, "shards:{clients}:{shards_per_client}"),
        }
    }
}

impl FromStr for PartitionSpec {
    type Err = ModelError;

    /// Parses `natural`, `iid:N`, `dirichlet:N:ALPHA`, `shards:N:S`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| {
            ModelError::Partition(format!(
                "bad partition spec {s:?}: {why} (expected natural | iid:N | dirichlet:N:ALPHA | shards:N:S)"
            ))
        };
        let parts: Vec<&str> = s.trim().split(':').collect();
        let count = |v: &str| -> Result<usize, ModelError> {
            match v.parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(bad(&format!("{v:?} is not a positive integer"))),
            }
        };
        match parts.as_slice() {
            [k] if k.eq_ignore_ascii_case("natural") => Ok(PartitionSpec::Natural),
            [k, n] if k.eq_ignore_ascii_case("iid") => {
                Ok(PartitionSpec::Iid { clients: count(n)? })
            }
            [k, n, a] if k.eq_ignore_ascii_case("dirichlet") => {
                let alpha = a
                    .parse::<f64>()
                    .ok()
                    .filter(|a| a.is_finite() && *a > 0.0)
                    .ok_or_else(|| bad(&format!("alpha {a:?} is not a positive number")))?;
                Ok(PartitionSpec::Dirichlet {
                    clients: count(n)?,
                    alpha,
                })
            }
            [k, n, sh] if k.eq_ignore_ascii_case("shards") => Ok(PartitionSpec::Shards {
                clients: count(n)?,
                shards_per_client: count(sh)?,
            }),
            _ => Err(bad("unknown form")),
        }
    }
}

/// Minimum samples per client the Dirichlet partitioner aims for (capped at `n / clients`).
const DIRICHLET_MIN_SAMPLES: usize = 10;
/// Redraws before the Dirichlet partitioner falls back to moving samples to starved clients.
const DIRICHLET_MAX_DRAWS: usize = 100;

fn client_name(i: usize) -> String {
    format!("client-{i:03}")
}

/// Splits sample indices `0..labels.len()` into one `(client name, indices)` per client.
///
/// Every index appears exactly once across clients, indices within a client are sorted, and the
/// result is deterministic for a given `seed`. `Natural` yields one client per distinct id of
/// `clients`, sorted by id (and named by it); the synthetic partitioners name clients
/// `client-000`, `client-001`, …. No client is ever empty: a spec that would force one (more
/// clients than samples) is an error.
pub fn partition(
    labels: &[i64],
    clients: Option<&[String]>,
    spec: &PartitionSpec,
    seed: u64,
) -> Result<Vec<(String, Vec<usize>)>, ModelError> {
    let n = labels.len();
    let mut rng = StdRng::seed_from_u64(seed);
    let check_count = |k: usize| -> Result<(), ModelError> {
        if k == 0 {
            Err(ModelError::Partition("need at least one client".into()))
        } else if k > n {
            Err(ModelError::Partition(format!(
                "{k} clients but only {n} samples: some client would be empty"
            )))
        } else {
            Ok(())
        }
    };
    let groups: Vec<(String, Vec<usize>)> = match spec {
        PartitionSpec::Natural => {
            let ids = clients.ok_or_else(|| {
                ModelError::Partition("natural partition needs a clients file".into())
            })?;
            if ids.len() != n {
                return Err(ModelError::Partition(format!(
                    "{} client ids for {n} labels",
                    ids.len()
                )));
            }
            let mut by_id: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
            for (i, id) in ids.iter().enumerate() {
                by_id.entry(id.as_str()).or_default().push(i);
            }
            by_id
                .into_iter()
                .map(|(id, v)| (id.to_string(), v))
                .collect()
        }
        PartitionSpec::Iid { clients } => {
            check_count(*clients)?;
            let mut idx: Vec<usize> = (0..n).collect();
            idx.shuffle(&mut rng);
            (0..*clients)
                .map(|c| {
                    let (lo, hi) = (c * n / clients, (c + 1) * n / clients);
                    (client_name(c), idx[lo..hi].to_vec())
                })
                .collect()
        }
        PartitionSpec::Dirichlet { clients, alpha } => {
            check_count(*clients)?;
            if !(alpha.is_finite() && *alpha > 0.0) {
                return Err(ModelError::Partition(format!(
                    "alpha must be > 0, got {alpha}"
                )));
            }
            dirichlet(labels, *clients, *alpha, &mut rng)?
                .into_iter()
                .enumerate()
                .map(|(c, v)| (client_name(c), v))
                .collect()
        }
        PartitionSpec::Shards {
            clients,
            shards_per_client,
        } => {
            check_count(*clients)?;
            let total = clients
                .checked_mul(*shards_per_client)
                .filter(|&t| t > 0 && t <= n)
                .ok_or_else(|| {
                    ModelError::Partition(format!(
                        "{clients}×{shards_per_client} shards do not fit {n} samples"
                    ))
                })?;
            // Shuffle first so ties within a label are broken by the seed, then stable-sort.
            let mut idx: Vec<usize> = (0..n).collect();
            idx.shuffle(&mut rng);
            idx.sort_by_key(|&i| labels[i]);
            let mut shard_ids: Vec<usize> = (0..total).collect();
            shard_ids.shuffle(&mut rng);
            shard_ids
                .chunks(*shards_per_client)
                .enumerate()
                .map(|(c, shards)| {
                    let v = shards
                        .iter()
                        .flat_map(|&s| idx[s * n / total..(s + 1) * n / total].iter().copied())
                        .collect();
                    (client_name(c), v)
                })
                .collect()
        }
    };
    Ok(groups
        .into_iter()
        .map(|(name, mut v)| {
            v.sort_unstable();
            (name, v)
        })
        .collect())
}

/// Draws one `Dir(alpha)` vector via normalised Gamma samples. With tiny `alpha` every Gamma
/// draw can underflow to 0; then all mass goes to one random client instead of producing NaN.
fn dirichlet_draw(k: usize, gamma: &Gamma<f64>, rng: &mut StdRng) -> Vec<f64> {
    let mut p: Vec<f64> = (0..k).map(|_| gamma.sample(rng)).collect();
    let sum: f64 = p.iter().sum();
    if sum.is_finite() && sum > 0.0 {
        p.iter_mut().for_each(|x| *x /= sum);
    } else {
        p = vec![0.0; k];
        p[rng.gen_range(0..k)] = 1.0;
    }
    p
}

/// The usual label-skew partitioner (as in NIID-Bench / FedML): per class, split that class's
/// shuffled samples by `Dir(alpha)` proportions, zeroing the share of clients already above the
/// average size; redraw until every client has a minimum. If redraws keep failing (very small
/// `alpha`), move samples from the largest clients to the starved ones, so it always terminates
/// and never leaves a client empty.
fn dirichlet(
    labels: &[i64],
    k: usize,
    alpha: f64,
    rng: &mut StdRng,
) -> Result<Vec<Vec<usize>>, ModelError> {
    let n = labels.len();
    let min_size = DIRICHLET_MIN_SAMPLES.min(n / k).max(1);
    let gamma =
        Gamma::new(alpha, 1.0).map_err(|e| ModelError::Partition(format!("alpha {alpha}: {e}")))?;
    let mut by_class: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for (i, &l) in labels.iter().enumerate() {
        by_class.entry(l).or_default().push(i);
    }
    let mut best = Vec::new();
    for _ in 0..DIRICHLET_MAX_DRAWS {
        let mut parts: Vec<Vec<usize>> = vec![Vec::new(); k];
        for members in by_class.values() {
            let mut members = members.clone();
            members.shuffle(rng);
            let mut p = dirichlet_draw(k, &gamma, rng);
            // Balance: clients already holding their fair share get nothing more of this class.
            for (pj, part) in p.iter_mut().zip(&parts) {
                if part.len() >= n / k {
                    *pj = 0.0;
                }
            }
            let sum: f64 = p.iter().sum();
            if sum <= 0.0 || !sum.is_finite() {
                p = dirichlet_draw(k, &gamma, rng);
            } else {
                p.iter_mut().for_each(|x| *x /= sum);
            }
            let m = members.len();
            let mut start = 0usize;
            let mut acc = 0.0;
            for (j, pj) in p.iter().enumerate() {
                acc += pj;
                let end = if j + 1 == k {
                    m
                } else {
                    ((acc * m as f64) as usize).clamp(start, m)
                };
                parts[j].extend_from_slice(&members[start..end]);
                start = end;
            }
        }
        let smallest = parts.iter().map(Vec::len).min().unwrap_or(0);
        best = parts;
        if smallest >= min_size {
            return Ok(best);
        }
    }
    // Fallback: top up starved clients from the currently largest client.
    loop {
        let (small, small_len) = best
            .iter()
            .enumerate()
            .map(|(i, v)| (i, v.len()))
            .min_by_key(|&(_, l)| l)
            .unwrap_or((0, min_size));
        if small_len >= min_size {
            break;
        }
        let big = best
            .iter()
            .enumerate()
            .max_by_key(|(_, v)| v.len())
            .map_or(0, |(i, _)| i);
        if best[big].len() <= min_size {
            break; // cannot happen when k ≤ n, but never loop forever
        }
        let pick = rng.gen_range(0..best[big].len());
        let moved = best[big].swap_remove(pick);
        best[small].push(moved);
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn labels(n: usize, classes: i64) -> Vec<i64> {
        (0..n as i64).map(|i| (i * 7 + i / 3) % classes).collect()
    }

    fn assert_exact_cover(parts: &[(String, Vec<usize>)], n: usize) {
        let mut seen = vec![0u32; n];
        for (_, v) in parts {
            assert!(!v.is_empty(), "empty client");
            for &i in v {
                seen[i] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c == 1), "not an exact cover");
    }

    #[test]
    fn parse_and_display() {
        let cases = [
            ("natural", PartitionSpec::Natural),
            ("iid:10", PartitionSpec::Iid { clients: 10 }),
            (
                "dirichlet:10:0.5",
                PartitionSpec::Dirichlet {
                    clients: 10,
                    alpha: 0.5,
                },
            ),
            (
                "shards:10:2",
                PartitionSpec::Shards {
                    clients: 10,
                    shards_per_client: 2,
                },
            ),
        ];
        for (s, spec) in cases {
            assert_eq!(s.parse::<PartitionSpec>().unwrap(), spec);
            assert_eq!(spec.to_string(), s);
        }
        for bad in [
            "",
            "iid",
            "iid:0",
            "iid:x",
            "dirichlet:3:-1",
            "dirichlet:3:nan",
            "shards:2",
            "foo:1",
        ] {
            assert!(
                matches!(bad.parse::<PartitionSpec>(), Err(ModelError::Partition(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn every_spec_covers_exactly_once_and_is_deterministic() {
        let l = labels(1000, 10);
        for spec in [
            PartitionSpec::Iid { clients: 7 },
            PartitionSpec::Dirichlet {
                clients: 10,
                alpha: 0.5,
            },
            PartitionSpec::Dirichlet {
                clients: 20,
                alpha: 0.01,
            },
            PartitionSpec::Shards {
                clients: 10,
                shards_per_client: 2,
            },
        ] {
            let a = partition(&l, None, &spec, 42).unwrap();
            assert_exact_cover(&a, l.len());
            assert_eq!(a, partition(&l, None, &spec, 42).unwrap(), "{spec}");
            assert_ne!(a, partition(&l, None, &spec, 43).unwrap(), "{spec}");
            assert_eq!(a[0].0, "client-000");
        }
    }

    #[test]
    fn dirichlet_clients_have_minimum_and_are_skewed() {
        let l = labels(2000, 10);
        let parts = partition(
            &l,
            None,
            &PartitionSpec::Dirichlet {
                clients: 10,
                alpha: 0.1,
            },
            1,
        )
        .unwrap();
        assert_eq!(parts.len(), 10);
        assert!(parts.iter().all(|(_, v)| v.len() >= DIRICHLET_MIN_SAMPLES));
        // With alpha = 0.1 most clients are dominated by few classes.
        let dominated = parts
            .iter()
            .filter(|(_, v)| {
                let mut counts = [0usize; 10];
                v.iter().for_each(|&i| counts[l[i] as usize] += 1);
                *counts.iter().max().unwrap() * 2 > v.len()
            })
            .count();
        assert!(dominated >= 5, "only {dominated} skewed clients");
    }

    #[test]
    fn shards_give_few_classes() {
        let l = labels(1000, 10);
        let parts = partition(
            &l,
            None,
            &PartitionSpec::Shards {
                clients: 10,
                shards_per_client: 2,
            },
            5,
        )
        .unwrap();
        for (_, v) in &parts {
            let mut classes: Vec<i64> = v.iter().map(|&i| l[i]).collect();
            classes.sort_unstable();
            classes.dedup();
            assert!(classes.len() <= 4, "{classes:?}");
        }
    }

    #[test]
    fn natural_uses_ids() {
        let l = vec![0, 1, 2, 3, 4];
        let ids: Vec<String> = ["w2", "w1", "w2", "w3", "w1"].map(String::from).to_vec();
        let parts = partition(&l, Some(&ids), &PartitionSpec::Natural, 0).unwrap();
        assert_eq!(
            parts,
            vec![
                ("w1".to_string(), vec![1, 4]),
                ("w2".to_string(), vec![0, 2]),
                ("w3".to_string(), vec![3]),
            ]
        );
        assert!(matches!(
            partition(&l, None, &PartitionSpec::Natural, 0),
            Err(ModelError::Partition(_))
        ));
        assert!(partition(&l, Some(&ids[..2]), &PartitionSpec::Natural, 0).is_err());
    }

    #[test]
    fn impossible_specs_are_errors() {
        let l = labels(5, 2);
        for spec in [
            PartitionSpec::Iid { clients: 0 },
            PartitionSpec::Iid { clients: 6 },
            PartitionSpec::Dirichlet {
                clients: 6,
                alpha: 1.0,
            },
            PartitionSpec::Dirichlet {
                clients: 2,
                alpha: 0.0,
            },
            PartitionSpec::Shards {
                clients: 2,
                shards_per_client: 3,
            },
            PartitionSpec::Shards {
                clients: 2,
                shards_per_client: 0,
            },
        ] {
            assert!(
                matches!(partition(&l, None, &spec, 0), Err(ModelError::Partition(_))),
                "{spec}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn dirichlet_never_empty(n in 1usize..300, k in 1usize..20, alpha in 0.001f64..10.0, seed: u64) {
            prop_assume!(k <= n);
            let l = labels(n, 5);
            let parts = partition(&l, None, &PartitionSpec::Dirichlet { clients: k, alpha }, seed).unwrap();
            prop_assert_eq!(parts.len(), k);
            assert_exact_cover(&parts, n);
        }
    }
}
