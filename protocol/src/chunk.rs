//! Chunking of model and delta payloads, and bounded reassembly.
//!
//! Brokers limit packet sizes (rumqttd and Mosquitto are often set to 1 MiB), so payloads travel
//! in chunks. Reassembly tolerates duplicates (QoS 1 redelivery, client retries) and any order,
//! caps memory per transfer and in number of transfers, and lets the owner expire stale ones.
//!
//! A receiver facing many senders also caps each *sender* ([`Reassembler::with_owner_limits`]):
//! transfers and bytes per owner, plus a global byte budget, so one sender can never take the
//! capacity another needs.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    #[error("a transfer must have at least one chunk")]
    ZeroTotal,
    #[error("{total} chunks exceeds the limit of {max}")]
    TooManyChunks { total: u32, max: u32 },
    #[error("chunk index {index} out of range for {total} chunks")]
    IndexOutOfRange { index: u32, total: u32 },
    #[error("chunk says {got} chunks, the transfer has {expected}")]
    TotalMismatch { expected: u32, got: u32 },
    #[error("transfer exceeds {max} bytes")]
    TooLarge { max: usize },
    #[error("too many transfers in progress (limit {max})")]
    Busy { max: usize },
    #[error("sender {owner} already has {max} transfers in progress")]
    OwnerBusy { owner: String, max: usize },
    #[error("sender {owner} holds more than {max} bytes in transfers")]
    OwnerTooLarge { owner: String, max: usize },
    #[error("all transfers together would exceed {max} bytes")]
    Full { max: usize },
}

impl ChunkError {
    /// True when the chunk was refused for lack of shared capacity, not for anything its sender
    /// did: the sender is not to blame, and a retry later may succeed.
    pub fn is_capacity(&self) -> bool {
        matches!(self, ChunkError::Busy { .. } | ChunkError::Full { .. })
    }
}

/// Number of chunks for a payload of `len` bytes; an empty payload still travels as one chunk.
pub fn chunk_count(len: usize, chunk_size: usize) -> u32 {
    let size = chunk_size.max(1);
    len.div_ceil(size).max(1) as u32
}

/// Splits `payload` into chunks of at most `chunk_size` bytes (at least one, possibly empty).
pub fn split(payload: &[u8], chunk_size: usize) -> Vec<&[u8]> {
    if payload.is_empty() {
        return vec![payload];
    }
    payload.chunks(chunk_size.max(1)).collect()
}

struct Transfer {
    parts: Vec<Option<Vec<u8>>>,
    received: u32,
    bytes: usize,
    started: Instant,
    /// Who the transfer is charged to (`None`: no per-owner accounting).
    owner: Option<String>,
}

/// What one owner currently holds.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    transfers: usize,
    bytes: usize,
}

/// Highest memory use seen since the last [`Reassembler::reset_peaks`]: lets a caller prove
/// (and report) that a flood stayed within bounds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReassemblyPeaks {
    /// Payload bytes held across all transfers.
    pub bytes: usize,
    /// Transfers in flight.
    pub transfers: usize,
    /// Payload bytes held by the single largest owner.
    pub owner_bytes: usize,
}

/// Reassembles many concurrent transfers, each keyed by `K`, within fixed memory bounds.
pub struct Reassembler<K> {
    transfers: HashMap<K, Transfer>,
    max_transfers: usize,
    max_bytes: usize,
    max_chunks: u32,
    /// Per-owner and global limits; `usize::MAX` when not configured.
    owner_transfers: usize,
    owner_bytes: usize,
    total_bytes: usize,
    owners: HashMap<String, Usage>,
    held: usize,
    peaks: ReassemblyPeaks,
}

impl<K: Eq + Hash + Clone> Reassembler<K> {
    /// At most `max_transfers` in flight, each at most `max_bytes` in `max_chunks` chunks.
    pub fn new(max_transfers: usize, max_bytes: usize, max_chunks: u32) -> Self {
        Reassembler {
            transfers: HashMap::new(),
            max_transfers,
            max_bytes,
            max_chunks,
            owner_transfers: usize::MAX,
            owner_bytes: usize::MAX,
            total_bytes: usize::MAX,
            owners: HashMap::new(),
            held: 0,
            peaks: ReassemblyPeaks::default(),
        }
    }

    /// Adds limits for transfers inserted with [`Reassembler::insert_for`]: each owner may have
    /// at most `transfers` in flight holding at most `bytes` together, and all transfers
    /// together at most `total_bytes`.
    pub fn with_owner_limits(mut self, transfers: usize, bytes: usize, total_bytes: usize) -> Self {
        self.owner_transfers = transfers;
        self.owner_bytes = bytes;
        self.total_bytes = total_bytes;
        self
    }

    /// Like [`Reassembler::insert`], charging the transfer to `owner`: a new transfer beyond
    /// the owner's count is refused ([`ChunkError::OwnerBusy`]); a chunk that would take the
    /// owner past its byte budget drops that transfer ([`ChunkError::OwnerTooLarge`]); one
    /// that would take everyone past the global budget is refused ([`ChunkError::Full`]) and
    /// the transfer kept, since that is not its sender's doing.
    pub fn insert_for(
        &mut self,
        owner: &str,
        key: K,
        index: u32,
        total: u32,
        data: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, ChunkError> {
        self.insert_inner(Some(owner), key, index, total, data)
    }

    /// Adds a chunk. Returns the whole payload once every chunk is in (and forgets the
    /// transfer); duplicates of a chunk already held are ignored. An error drops the transfer,
    /// so a bad sender can't pin memory.
    pub fn insert(
        &mut self,
        key: K,
        index: u32,
        total: u32,
        data: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, ChunkError> {
        self.insert_inner(None, key, index, total, data)
    }

    fn insert_inner(
        &mut self,
        owner: Option<&str>,
        key: K,
        index: u32,
        total: u32,
        data: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, ChunkError> {
        if total == 0 {
            return Err(ChunkError::ZeroTotal);
        }
        if total > self.max_chunks {
            return Err(ChunkError::TooManyChunks {
                total,
                max: self.max_chunks,
            });
        }
        if index >= total {
            return Err(ChunkError::IndexOutOfRange { index, total });
        }
        if !self.transfers.contains_key(&key) {
            if self.transfers.len() >= self.max_transfers {
                return Err(ChunkError::Busy {
                    max: self.max_transfers,
                });
            }
            if let Some(o) = owner {
                let usage = self.owners.get(o).copied().unwrap_or_default();
                if usage.transfers >= self.owner_transfers {
                    return Err(ChunkError::OwnerBusy {
                        owner: o.to_string(),
                        max: self.owner_transfers,
                    });
                }
            }
            self.transfers.insert(
                key.clone(),
                Transfer {
                    parts: vec![None; total as usize],
                    received: 0,
                    bytes: 0,
                    started: Instant::now(),
                    owner: owner.map(str::to_string),
                },
            );
            if let Some(o) = owner {
                self.owners.entry(o.to_string()).or_default().transfers += 1;
            }
            self.peaks.transfers = self.peaks.transfers.max(self.transfers.len());
        }
        let Some(t) = self.transfers.get_mut(&key) else {
            return Ok(None);
        };
        if t.parts.len() != total as usize {
            let expected = t.parts.len() as u32;
            self.remove(&key);
            return Err(ChunkError::TotalMismatch {
                expected,
                got: total,
            });
        }
        if t.parts[index as usize].is_some() {
            return Ok(None);
        }
        if t.bytes + data.len() > self.max_bytes {
            self.remove(&key);
            return Err(ChunkError::TooLarge {
                max: self.max_bytes,
            });
        }
        let owner_held = t
            .owner
            .as_ref()
            .and_then(|o| self.owners.get(o))
            .map_or(0, |u| u.bytes);
        if t.owner.is_some() && owner_held + data.len() > self.owner_bytes {
            let owner = t.owner.clone().unwrap_or_default();
            self.remove(&key);
            return Err(ChunkError::OwnerTooLarge {
                owner,
                max: self.owner_bytes,
            });
        }
        if self.held + data.len() > self.total_bytes {
            return Err(ChunkError::Full {
                max: self.total_bytes,
            });
        }
        let len = data.len();
        t.bytes += len;
        t.received += 1;
        t.parts[index as usize] = Some(data);
        let complete = t.received >= total;
        self.held += len;
        self.peaks.bytes = self.peaks.bytes.max(self.held);
        if let Some(u) = t.owner.as_ref().and_then(|o| self.owners.get_mut(o)) {
            u.bytes += len;
            self.peaks.owner_bytes = self.peaks.owner_bytes.max(u.bytes);
        }
        if !complete {
            return Ok(None);
        }
        let Some(t) = self.take(&key) else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(t.bytes);
        for part in t.parts.into_iter().flatten() {
            out.extend_from_slice(&part);
        }
        Ok(Some(out))
    }

    /// Drops transfers started more than `age` ago and returns their keys.
    pub fn expire(&mut self, age: Duration) -> Vec<K> {
        let now = Instant::now();
        let stale: Vec<K> = self
            .transfers
            .iter()
            .filter(|(_, t)| now.duration_since(t.started) > age)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &stale {
            self.remove(k);
        }
        stale
    }

    /// Removes a transfer and releases what it held from the global and owner accounts.
    fn take(&mut self, key: &K) -> Option<Transfer> {
        let t = self.transfers.remove(key)?;
        self.held = self.held.saturating_sub(t.bytes);
        if let Some(o) = &t.owner {
            if let Some(u) = self.owners.get_mut(o) {
                u.transfers = u.transfers.saturating_sub(1);
                u.bytes = u.bytes.saturating_sub(t.bytes);
                if u.transfers == 0 {
                    self.owners.remove(o);
                }
            }
        }
        Some(t)
    }

    /// Forgets a transfer (e.g. when its round closes).
    pub fn remove(&mut self, key: &K) {
        self.take(key);
    }

    /// Keeps only the transfers for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        let gone: Vec<K> = self
            .transfers
            .keys()
            .filter(|k| !keep(k))
            .cloned()
            .collect();
        for k in &gone {
            self.remove(k);
        }
    }

    pub fn in_flight(&self) -> usize {
        self.transfers.len()
    }

    /// Payload bytes held right now, over all transfers.
    pub fn held_bytes(&self) -> usize {
        self.held
    }

    /// Payload bytes `owner` holds right now.
    pub fn owner_bytes(&self, owner: &str) -> usize {
        self.owners.get(owner).map_or(0, |u| u.bytes)
    }

    /// Highest use since creation or the last [`Reassembler::reset_peaks`].
    pub fn peaks(&self) -> ReassemblyPeaks {
        self.peaks
    }

    /// Starts a new measurement window from what is held now.
    pub fn reset_peaks(&mut self) {
        self.peaks = ReassemblyPeaks {
            bytes: self.held,
            transfers: self.transfers.len(),
            owner_bytes: self.owners.values().map(|u| u.bytes).max().unwrap_or(0),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn counts_and_splits() {
        assert_eq!(chunk_count(0, 10), 1);
        assert_eq!(chunk_count(10, 10), 1);
        assert_eq!(chunk_count(11, 10), 2);
        assert_eq!(split(&[], 4).len(), 1);
        assert_eq!(split(&[1; 9], 4).len(), 3);
    }

    #[test]
    fn limits_are_enforced() {
        let mut r = Reassembler::new(1, 8, 4);
        assert_eq!(r.insert(1, 0, 0, vec![]), Err(ChunkError::ZeroTotal));
        assert_eq!(
            r.insert(1, 0, 5, vec![]),
            Err(ChunkError::TooManyChunks { total: 5, max: 4 })
        );
        assert_eq!(
            r.insert(1, 2, 2, vec![]),
            Err(ChunkError::IndexOutOfRange { index: 2, total: 2 })
        );
        assert_eq!(r.insert(1, 0, 2, vec![0; 4]), Ok(None));
        assert_eq!(
            r.insert(2, 0, 2, vec![0; 4]),
            Err(ChunkError::Busy { max: 1 })
        );
        assert_eq!(
            r.insert(1, 1, 3, vec![0; 4]),
            Err(ChunkError::TotalMismatch {
                expected: 2,
                got: 3
            })
        );
        assert_eq!(r.in_flight(), 0);
        assert_eq!(r.insert(1, 0, 2, vec![0; 5]), Ok(None));
        assert_eq!(
            r.insert(1, 1, 2, vec![0; 5]),
            Err(ChunkError::TooLarge { max: 8 })
        );
        assert_eq!(r.in_flight(), 0);
        r.insert(3, 0, 2, vec![1]).unwrap();
        assert_eq!(r.expire(Duration::ZERO), vec![3]);
    }

    #[test]
    fn one_owner_cannot_take_anothers_slots() {
        // 4 transfers overall, 1 per owner: "mallory" is refused a second transfer while "cam"
        // still gets its own.
        let mut r = Reassembler::new(4, 100, 8).with_owner_limits(1, 100, 1000);
        assert_eq!(r.insert_for("mallory", 1, 0, 2, vec![0; 10]), Ok(None));
        assert_eq!(
            r.insert_for("mallory", 2, 0, 2, vec![0; 10]),
            Err(ChunkError::OwnerBusy {
                owner: "mallory".into(),
                max: 1
            })
        );
        assert_eq!(r.insert_for("cam", 3, 0, 2, vec![1; 10]), Ok(None));
        assert_eq!(
            r.insert_for("cam", 3, 1, 2, vec![2; 5])
                .unwrap()
                .map(|p| p.len()),
            Some(15)
        );
        // Completing a transfer gives the slot and the bytes back.
        assert_eq!(r.owner_bytes("cam"), 0);
        assert_eq!(r.insert_for("cam", 4, 0, 2, vec![1; 10]), Ok(None));
        assert_eq!(r.in_flight(), 2);
        assert_eq!(r.held_bytes(), 20);
    }

    #[test]
    fn owner_byte_budget_drops_only_that_owners_transfer() {
        let mut r = Reassembler::new(8, 100, 8).with_owner_limits(2, 30, 1000);
        assert_eq!(r.insert_for("m", 1, 0, 4, vec![0; 20]), Ok(None));
        assert_eq!(r.insert_for("c", 9, 0, 2, vec![0; 20]), Ok(None));
        // 20 + 20 > 30 for "m": its second transfer is dropped at once, "c" is untouched.
        assert_eq!(
            r.insert_for("m", 2, 0, 4, vec![0; 20]),
            Err(ChunkError::OwnerTooLarge {
                owner: "m".into(),
                max: 30
            })
        );
        assert_eq!(r.owner_bytes("m"), 20);
        assert_eq!(r.owner_bytes("c"), 20);
        assert_eq!(r.peaks().owner_bytes, 20);
        assert_eq!(
            r.insert_for("c", 9, 1, 2, vec![0; 10])
                .unwrap()
                .map(|p| p.len()),
            Some(30)
        );
    }

    #[test]
    fn global_budget_refuses_without_blame_or_loss() {
        let mut r = Reassembler::new(8, 100, 8).with_owner_limits(1, 100, 25);
        assert_eq!(r.insert_for("a", 1, 0, 2, vec![0; 20]), Ok(None));
        let e = r.insert_for("b", 2, 0, 2, vec![0; 10]).unwrap_err();
        assert_eq!(e, ChunkError::Full { max: 25 });
        assert!(e.is_capacity());
        // "a"'s transfer is kept; once it completes there is room for "b".
        assert_eq!(
            r.insert_for("a", 1, 1, 2, vec![0; 5])
                .unwrap()
                .map(|p| p.len()),
            Some(25)
        );
        assert_eq!(r.held_bytes(), 0);
        assert_eq!(r.insert_for("b", 2, 0, 2, vec![0; 10]), Ok(None));
        assert_eq!(r.peaks().bytes, 25);
        r.reset_peaks();
        assert_eq!(r.peaks().bytes, 10);
        r.retain(|_| false);
        assert_eq!(
            (r.held_bytes(), r.owner_bytes("b"), r.in_flight()),
            (0, 0, 0)
        );
    }

    proptest! {
        /// Whatever a set of owners send, no owner ever holds more than its byte budget or
        /// transfer count, the total stays within the global budget, and the books balance.
        #[test]
        fn owner_limits_hold_under_any_sequence(
            ops in proptest::collection::vec((0u8..4, 0u8..6, 0u32..4, 1u32..5, 0usize..40), 0..300),
        ) {
            let (per_t, per_b, total_b) = (2usize, 60usize, 150usize);
            let mut r: Reassembler<(u8, u8)> =
                Reassembler::new(8, 50, 4).with_owner_limits(per_t, per_b, total_b);
            for (owner, key, index, total, len) in ops {
                let name = format!("o{owner}");
                let _ = r.insert_for(&name, (owner, key), index, total, vec![0; len]);
                let mut sum = 0;
                for o in 0..4u8 {
                    let b = r.owner_bytes(&format!("o{o}"));
                    prop_assert!(b <= per_b);
                    sum += b;
                }
                prop_assert_eq!(sum, r.held_bytes());
                prop_assert!(r.held_bytes() <= total_b);
                prop_assert!(r.in_flight() <= 8);
            }
            prop_assert!(r.peaks().owner_bytes <= per_b && r.peaks().bytes <= total_b);
        }

        /// Any order, with any duplicates, gives back exactly the payload.
        #[test]
        fn reassembles_shuffled_duplicated(
            payload in proptest::collection::vec(any::<u8>(), 0..3000),
            size in 1usize..700,
            seed in any::<u64>(),
        ) {
            let parts = split(&payload, size);
            let total = parts.len() as u32;
            let mut order: Vec<usize> = (0..parts.len()).chain(0..parts.len()).collect();
            // Deterministic shuffle from the seed (xorshift), no extra dependency.
            let mut s = seed | 1;
            for i in (1..order.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                order.swap(i, (s % (i as u64 + 1)) as usize);
            }
            // Up to 3000 one-byte chunks: the chunk limit must not be what fails here.
            let mut r = Reassembler::new(4, 4096, 4096);
            // A duplicate arriving after completion starts a new transfer (the reassembler
            // can't know it's late); idempotency is the receiver's job, by digest.
            let mut completions = 0;
            for i in order {
                if let Some(p) = r.insert("k", i as u32, total, parts[i].to_vec()).unwrap() {
                    prop_assert_eq!(&p, &payload);
                    completions += 1;
                }
            }
            prop_assert!(completions >= 1);
        }
    }
}
