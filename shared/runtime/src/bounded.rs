//! A map that hostile keys cannot grow: fixed capacity, entries forgotten by age.
//!
//! Every per-key table a caller can grow — login throttles, per-address limits, caches — is a
//! [`BoundedMap`]: at most `capacity` entries, each dropped once older than `max_age`, and when
//! full the oldest goes first. With fixed-size keys (hash inputs of any length down to 16 bytes
//! first: see [`key16`]) its memory is fixed too, whatever a flood of distinct keys does:
//! [`BoundedMap::bytes_bound`] says how much.
//!
//! `moka` and `lru` bound entries as well, but the mesh's tables need the entry's age (a throttle
//! window starts with its first failure) and an in-place update under the caller's own lock
//! (a throttle's reserve-then-settle must not race), so the table is a `HashMap` and a queue of
//! insertion times.

use std::{collections::HashMap, collections::VecDeque, hash::Hash, mem::size_of, time::Duration};

use sha2::{Digest as _, Sha256};
use tokio::time::Instant;

/// A fixed-size key for a value of any length: the first 16 bytes of its SHA-256. Hash a
/// hostile input down before it is used as a key, so each entry costs the same.
pub fn key16(parts: &[&[u8]]) -> [u8; 16] {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    let digest = hasher.finalize();
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest[..16]);
    key
}

#[derive(Debug)]
struct Entry<V> {
    value: V,
    born: Instant,
}

/// A map of at most `capacity` entries, each kept at most `max_age` from its birth.
#[derive(Debug)]
pub struct BoundedMap<K, V> {
    capacity: usize,
    max_age: Duration,
    map: HashMap<K, Entry<V>>,
    /// Keys in order of birth (stale ones — renewed or removed — are skipped).
    order: VecDeque<(K, Instant)>,
}

impl<K: Hash + Eq + Copy, V> BoundedMap<K, V> {
    /// An empty map of at most `capacity` entries (at least 1), each kept `max_age`.
    pub fn new(capacity: usize, max_age: Duration) -> Self {
        Self {
            capacity: capacity.max(1),
            max_age,
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// How many entries there are now.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there is no entry.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The most entries there can be.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// An upper bound on the bytes the map can take, however many distinct keys it has seen:
    /// the hash table at its largest (hashbrown keeps at least one slot in eight free, plus a
    /// control byte per slot) and the birth queue at its largest (twice the capacity, then it
    /// is compacted; the queue's buffer grows in powers of two).
    pub fn bytes_bound(&self) -> usize {
        let slots = (self.capacity * 8 / 7 + 1).next_power_of_two();
        let queue = (2 * self.capacity + 1).next_power_of_two();
        slots * (size_of::<(K, Entry<V>)>() + 1) + queue * size_of::<(K, Instant)>()
    }

    /// The bytes the map takes now (its allocations, by their capacities).
    pub fn bytes_now(&self) -> usize {
        self.map.capacity() * (size_of::<(K, Entry<V>)>() + 1)
            + self.order.capacity() * size_of::<(K, Instant)>()
    }

    fn expired(&self, born: Instant, now: Instant) -> bool {
        now.saturating_duration_since(born) >= self.max_age
    }

    /// The live entry of `key`, if any; an expired one is removed.
    pub fn get_mut(&mut self, key: &K, now: Instant) -> Option<&mut V> {
        let born = self.map.get(key)?.born;
        if self.expired(born, now) {
            self.map.remove(key);
            return None;
        }
        self.map.get_mut(key).map(|entry| &mut entry.value)
    }

    /// The live entry of `key`, made with `make` (born `now`) if there is none. Making one
    /// first drops expired entries and, when the map is full, the oldest.
    pub fn get_or_insert_with(&mut self, key: K, now: Instant, make: impl FnOnce() -> V) -> &mut V {
        if self.get_mut(&key, now).is_none() {
            self.make_room(now);
            self.compact();
            self.order.push_back((key, now));
        }
        &mut self
            .map
            .entry(key)
            .or_insert_with(|| Entry {
                value: make(),
                born: now,
            })
            .value
    }

    /// How old `key`'s live entry is.
    pub fn age(&self, key: &K, now: Instant) -> Option<Duration> {
        let born = self.map.get(key)?.born;
        let age = now.saturating_duration_since(born);
        (age < self.max_age).then_some(age)
    }

    /// Removes `key`'s entry.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        self.map.remove(key).map(|entry| entry.value)
    }

    /// Drops every expired entry (also done as entries are made).
    pub fn purge(&mut self, now: Instant) {
        while let Some(&(key, born)) = self.order.front() {
            let live = self.map.get(&key).is_some_and(|entry| entry.born == born);
            if live && !self.expired(born, now) {
                break;
            }
            self.order.pop_front();
            if live {
                self.map.remove(&key);
            }
        }
    }

    fn make_room(&mut self, now: Instant) {
        self.purge(now);
        while self.map.len() >= self.capacity {
            let Some((key, born)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&key).is_some_and(|entry| entry.born == born) {
                self.map.remove(&key);
            }
        }
    }

    /// Rebuilds the birth queue from the map when stale keys make up half of it.
    fn compact(&mut self) {
        if self.order.len() <= 2 * self.capacity {
            return;
        }
        let mut live: Vec<(K, Instant)> = self.map.iter().map(|(k, e)| (*k, e.born)).collect();
        live.sort_by_key(|(_, born)| *born);
        self.order = live.into();
        self.order.shrink_to(2 * self.capacity);
    }
}

/// A token bucket per key: `burst` at once, refilled at `per_second`, in a [`BoundedMap`] of at
/// most `capacity` keys (a key not seen for the time a bucket takes to fill is forgotten: it
/// would be full anyway).
#[derive(Debug)]
pub struct RateLimit<K> {
    burst: f64,
    per_second: f64,
    buckets: std::sync::Mutex<BoundedMap<K, (f64, Instant)>>,
}

impl<K: Hash + Eq + Copy> RateLimit<K> {
    /// `burst` at once per key, then `per_second`.
    pub fn new(burst: u32, per_second: f64, capacity: usize) -> Self {
        let per_second = per_second.max(f64::MIN_POSITIVE);
        let refill = Duration::from_secs_f64((f64::from(burst) / per_second).min(86_400.0));
        Self {
            burst: f64::from(burst.max(1)),
            per_second,
            buckets: std::sync::Mutex::new(BoundedMap::new(capacity, refill)),
        }
    }

    /// Takes one from `key`'s bucket, or says how long until one is there.
    pub fn try_take(&self, key: K) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let burst = self.burst;
        let (tokens, last) = buckets.get_or_insert_with(key, now, || (burst, now));
        let refilled = (*tokens
            + now.saturating_duration_since(*last).as_secs_f64() * self.per_second)
            .min(self.burst);
        *last = now;
        if refilled >= 1.0 {
            *tokens = refilled - 1.0;
            Ok(())
        } else {
            *tokens = refilled;
            Err(Duration::from_secs_f64((1.0 - refilled) / self.per_second))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A burst, then the refill rate; keys are apart.
    #[tokio::test(start_paused = true)]
    async fn rate_limits_refill() {
        let limit = RateLimit::new(3, 2.0, 100);
        for _ in 0..3 {
            limit.try_take(1u8).expect("burst");
        }
        let wait = limit.try_take(1).expect_err("empty");
        assert!(wait <= Duration::from_millis(500), "{wait:?}");
        limit.try_take(2).expect("another key");
        tokio::time::advance(Duration::from_millis(500)).await;
        limit.try_take(1).expect("refilled one");
        assert!(limit.try_take(1).is_err());
    }

    /// A million distinct keys leave at most `capacity` entries and the stated bytes.
    #[test]
    fn a_million_hostile_keys_cost_a_fixed_amount() {
        let mut map: BoundedMap<[u8; 16], u64> = BoundedMap::new(10_000, Duration::from_secs(900));
        let now = Instant::now();
        for i in 0u64..1_000_000 {
            let key = key16(&[&i.to_be_bytes()]);
            *map.get_or_insert_with(key, now, || 0) += 1;
            assert!(map.len() <= 10_000);
        }
        assert_eq!(map.len(), 10_000);
        assert!(
            map.bytes_now() <= map.bytes_bound(),
            "{} > {}",
            map.bytes_now(),
            map.bytes_bound()
        );
        // The figure the docs state for 10,000 entries of 16-byte keys.
        assert!(
            map.bytes_bound() <= 2 * 1024 * 1024,
            "{}",
            map.bytes_bound()
        );
        // The newest keys survive; the oldest went first.
        let newest = key16(&[&999_999u64.to_be_bytes()]);
        let oldest = key16(&[&0u64.to_be_bytes()]);
        assert!(map.get_mut(&newest, now).is_some());
        assert!(map.get_mut(&oldest, now).is_none());
    }

    /// Entries end at their age, and renewing a key's entry (removing and making it again)
    /// keeps the queue bounded.
    #[test]
    fn entries_expire_and_the_queue_stays_bounded() {
        let mut map: BoundedMap<u32, u32> = BoundedMap::new(4, Duration::from_secs(10));
        let t0 = Instant::now();
        *map.get_or_insert_with(1, t0, || 0) += 1;
        assert_eq!(
            map.get_mut(&1, t0 + Duration::from_secs(9)).copied(),
            Some(1)
        );
        assert!(map.get_mut(&1, t0 + Duration::from_secs(10)).is_none());
        for round in 0..1000u64 {
            let now = t0 + Duration::from_millis(round);
            map.remove(&7);
            map.get_or_insert_with(7, now, || 0);
            assert!(map.order.len() <= 2 * 4 + 1);
        }
        assert_eq!(map.len(), 1);
    }

    /// The key of a value depends on all of it, and parts cannot be shifted between.
    #[test]
    fn keys_are_unambiguous() {
        assert_ne!(key16(&[b"ab", b"c"]), key16(&[b"a", b"bc"]));
        assert_eq!(key16(&[b"x"]), key16(&[b"x"]));
    }
}
