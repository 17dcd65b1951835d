//! A byte-driven sequence of `Reassembler` calls, checked against a simple reference model.
//!
//! Input: `[max_transfers][max_bytes][max_chunks]` then operations:
//! `0 key index total len data[len]` insert (len ≤ 15), `1 key` remove, `2 key` retain (drop
//! `key`), anything else a no-op. Invariants: no panic; results equal the model's (the first copy
//! of a chunk wins, errors drop the transfer except for the up-front argument checks); completed
//! payloads are the chunks in index order; never more than `max_transfers` in flight.
#![no_main]

use std::collections::HashMap;

use coevo_protocol::{ChunkError, Reassembler};
use libfuzzer_sys::fuzz_target;

struct Model {
    max_transfers: usize,
    max_bytes: usize,
    max_chunks: u32,
    transfers: HashMap<u8, Vec<Option<Vec<u8>>>>,
}

impl Model {
    fn insert(
        &mut self,
        key: u8,
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
        let parts = self
            .transfers
            .entry(key)
            .or_insert_with(|| vec![None; total as usize]);
        if parts.len() != total as usize {
            let expected = parts.len() as u32;
            self.transfers.remove(&key);
            return Err(ChunkError::TotalMismatch {
                expected,
                got: total,
            });
        }
        if parts[index as usize].is_some() {
            return Ok(None);
        }
        let held: usize = parts.iter().flatten().map(Vec::len).sum();
        if held + data.len() > self.max_bytes {
            self.transfers.remove(&key);
            return Err(ChunkError::TooLarge {
                max: self.max_bytes,
            });
        }
        parts[index as usize] = Some(data);
        if parts.iter().all(Option::is_some) {
            let parts = self.transfers.remove(&key).unwrap_or_default();
            return Ok(Some(parts.into_iter().flatten().flatten().collect()));
        }
        Ok(None)
    }
}

fuzz_target!(|data: &[u8]| {
    let [t, b, c, ops @ ..] = data else {
        return;
    };
    let (max_transfers, max_bytes, max_chunks) =
        (usize::from(t % 8), usize::from(*b), u32::from(c % 16));
    let mut r: Reassembler<u8> = Reassembler::new(max_transfers, max_bytes, max_chunks);
    let mut model = Model {
        max_transfers,
        max_bytes,
        max_chunks,
        transfers: HashMap::new(),
    };
    let mut ops = ops;
    while let [op, rest @ ..] = ops {
        ops = rest;
        match op % 4 {
            0 => {
                let [key, index, total, len, rest @ ..] = ops else {
                    return;
                };
                // Keys from a small set so transfers collide; indices/totals mostly small but
                // the high bit makes them large (u32 edge cases).
                let key = key % 8;
                let wide = |v: u8| {
                    if v & 0x80 != 0 {
                        u32::MAX - u32::from(v & 0x7f)
                    } else {
                        u32::from(v)
                    }
                };
                let (index, total) = (wide(*index), wide(*total));
                let len = usize::from(len % 16).min(rest.len());
                let payload = rest[..len].to_vec();
                ops = &rest[len..];
                let got = r.insert(key, index, total, payload.clone());
                let want = model.insert(key, index, total, payload);
                assert_eq!(got, want, "insert(key {key}, {index}/{total})");
            }
            1 => {
                let [key, rest @ ..] = ops else { return };
                ops = rest;
                r.remove(&(key % 8));
                model.transfers.remove(&(key % 8));
            }
            2 => {
                let [key, rest @ ..] = ops else { return };
                ops = rest;
                r.retain(|k| *k != key % 8);
                model.transfers.remove(&(key % 8));
            }
            _ => {}
        }
        assert_eq!(r.in_flight(), model.transfers.len());
        assert!(r.in_flight() <= max_transfers);
    }
    // Nothing old enough to expire; expiring with an hour's age must drop nothing.
    assert!(r.expire(std::time::Duration::from_secs(3600)).is_empty());
});
