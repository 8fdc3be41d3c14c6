//! Places for long-lived streams: at most so many at once in all, and so many per caller (one
//! token subject), so that one account cannot take every place.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use crate::error::AggregatorError;

/// The places of one kind of stream (`what`, for messages).
#[derive(Debug)]
pub(crate) struct StreamSlots {
    what: &'static str,
    total: usize,
    per_caller: usize,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    open: usize,
    by_caller: HashMap<[u8; 16], usize>,
}

/// One stream's place, given back when dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    slots: Arc<StreamSlots>,
    caller: [u8; 16],
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.slots.lock();
        counts.open = counts.open.saturating_sub(1);
        if let Some(n) = counts.by_caller.get_mut(&self.caller) {
            *n -= 1;
            if *n == 0 {
                counts.by_caller.remove(&self.caller);
            }
        }
    }
}

impl StreamSlots {
    /// At most `total` streams of `what` at once, `per_caller` for one caller.
    pub(crate) fn new(what: &'static str, total: usize, per_caller: usize) -> Arc<Self> {
        Arc::new(Self {
            what,
            total: total.max(1),
            per_caller: per_caller.max(1),
            counts: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many are open.
    pub(crate) fn open(&self) -> usize {
        self.lock().open
    }

    /// A place for a stream of `caller` (a key of its identity), or RESOURCE_EXHAUSTED.
    pub(crate) fn take(self: &Arc<Self>, caller: [u8; 16]) -> Result<Slot, AggregatorError> {
        let mut counts = self.lock();
        if counts.open >= self.total {
            return Err(AggregatorError::exhausted(format!(
                "this aggregator serves its maximum of {} {} streams; retry later or elsewhere",
                self.total, self.what
            )));
        }
        let of_caller = counts.by_caller.get(&caller).copied().unwrap_or(0);
        if of_caller >= self.per_caller {
            return Err(AggregatorError::exhausted(format!(
                "at most {} {} streams per caller at once",
                self.per_caller, self.what
            )));
        }
        counts.open += 1;
        *counts.by_caller.entry(caller).or_insert(0) += 1;
        Ok(Slot {
            slots: self.clone(),
            caller,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bounded in all and per caller; places come back when dropped.
    #[test]
    fn slots_are_bounded() {
        let slots = StreamSlots::new("Test", 3, 2);
        let (a, b) = ([1u8; 16], [2u8; 16]);
        let a1 = slots.take(a).expect("a 1");
        let _a2 = slots.take(a).expect("a 2");
        assert!(slots.take(a).is_err(), "per caller");
        let _b1 = slots.take(b).expect("b 1");
        assert!(slots.take(b).is_err(), "in all");
        drop(a1);
        let _b2 = slots.take(b).expect("freed by a's");
        assert_eq!(slots.open(), 3);
    }
}
