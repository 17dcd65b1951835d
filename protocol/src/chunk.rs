//! Chunking of model and delta payloads, and bounded reassembly.
//!
//! Brokers limit packet sizes (rumqttd and Mosquitto are often set to 1 MiB), so payloads travel
//! in chunks. Reassembly tolerates duplicates (QoS 1 redelivery, client retries) and any order,
//! caps memory per transfer and in number of transfers, and lets the owner expire stale ones.

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
}

/// Reassembles many concurrent transfers, each keyed by `K`, within fixed memory bounds.
pub struct Reassembler<K> {
    transfers: HashMap<K, Transfer>,
    max_transfers: usize,
    max_bytes: usize,
    max_chunks: u32,
}

impl<K: Eq + Hash + Clone> Reassembler<K> {
    /// At most `max_transfers` in flight, each at most `max_bytes` in `max_chunks` chunks.
    pub fn new(max_transfers: usize, max_bytes: usize, max_chunks: u32) -> Self {
        Reassembler {
            transfers: HashMap::new(),
            max_transfers,
            max_bytes,
            max_chunks,
        }
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
        if !self.transfers.contains_key(&key) && self.transfers.len() >= self.max_transfers {
            return Err(ChunkError::Busy {
                max: self.max_transfers,
            });
        }
        let t = self
            .transfers
            .entry(key.clone())
            .or_insert_with(|| Transfer {
                parts: vec![None; total as usize],
                received: 0,
                bytes: 0,
                started: Instant::now(),
            });
        if t.parts.len() != total as usize {
            let expected = t.parts.len() as u32;
            self.transfers.remove(&key);
            return Err(ChunkError::TotalMismatch {
                expected,
                got: total,
            });
        }
        let slot = &mut t.parts[index as usize];
        if slot.is_some() {
            return Ok(None);
        }
        if t.bytes + data.len() > self.max_bytes {
            self.transfers.remove(&key);
            return Err(ChunkError::TooLarge {
                max: self.max_bytes,
            });
        }
        t.bytes += data.len();
        t.received += 1;
        *slot = Some(data);
        if t.received < total {
            return Ok(None);
        }
        let t = match self.transfers.remove(&key) {
            Some(t) => t,
            None => return Ok(None),
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
            self.transfers.remove(k);
        }
        stale
    }

    /// Forgets a transfer (e.g. when its round closes).
    pub fn remove(&mut self, key: &K) {
        self.transfers.remove(key);
    }

    /// Keeps only the transfers for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.transfers.retain(|k, _| keep(k));
    }

    pub fn in_flight(&self) -> usize {
        self.transfers.len()
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

    proptest! {
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
