//! Limits the public edge applies per client address.
//!
//! The aggregator is the only service clients reach, so it is where a per-source limit
//! belongs: auth counts failed logins per account only (every public login reaches it from the
//! aggregator, so a per-address count there would lock every user out at once). The aggregator
//! counts failed password checks (Login and DeleteAccount) and sign-ups per client address (an
//! IPv4 address or an IPv6 /64), in [`BoundedMap`]s, and passes nothing on that auth would have
//! to trust.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_runtime::{bounded::BoundedMap, conn::PeerKey};
use tokio::time::Instant;
use tonic::{Code, Status};

use crate::error::AggregatorError;

/// The window of the failed-login count per address.
pub(crate) const LOGIN_WINDOW: Duration = Duration::from_secs(15 * 60);
/// The window of the sign-up count per address.
pub(crate) const SIGNUP_WINDOW: Duration = Duration::from_secs(60);
/// Addresses each table remembers at most (at most 14 MiB each; see
/// [`BoundedMap::bytes_bound`]), the oldest forgotten first.
pub(crate) const ADDRESSES: usize = 65_536;

#[derive(Debug, Default, Clone, Copy)]
struct Count {
    done: u32,
    pending: u32,
}

/// Password work (an Argon2id check or hash at auth) one address may have in progress at once:
/// beyond it a burst from one address is refused at once (RESOURCE_EXHAUSTED, retry), so at
/// most this many of its checks wait in auth's hashing queue ahead of other clients'.
pub(crate) const PASSWORD_WORK_PER_ADDRESS: u32 = 4;

/// Failed logins and sign-ups per client address.
#[derive(Debug)]
pub(crate) struct EdgeLimits {
    login_failures: u32,
    signups: u32,
    failures: Mutex<BoundedMap<PeerKey, Count>>,
    signed_up: Mutex<BoundedMap<PeerKey, Count>>,
    /// Password work in progress per address (entries go at zero: at most one per call).
    working: Mutex<HashMap<PeerKey, u32>>,
}

/// One unit of password work of an address in progress, given back when dropped.
#[derive(Debug)]
pub(crate) struct Working {
    limits: Arc<EdgeLimits>,
    peer: PeerKey,
}

impl Drop for Working {
    fn drop(&mut self) {
        let mut working = self
            .limits
            .working
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = working.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                working.remove(&self.peer);
            }
        }
    }
}

/// One password check from an address, reserved before it is made. Dropped unsettled (the
/// caller went away), it counts as neither failure nor success.
#[derive(Debug)]
pub(crate) struct Check {
    limits: Arc<EdgeLimits>,
    peer: Option<PeerKey>,
    settled: bool,
    _working: Option<Working>,
}

impl Check {
    /// Settles the check with auth's answer: bad credentials count as a failure of the
    /// address, and so does a check that ran out of time (its Argon2id check still runs to the
    /// end at auth and counts for the account there: a short deadline must not escape the
    /// address's count). Nothing else counts; a success does not clear the address's failures
    /// (one good account must not reset an attacker's count).
    pub(crate) fn settle<T>(mut self, outcome: &Result<T, Status>) {
        let failed = matches!(
            outcome,
            Err(status) if matches!(
                status.code(),
                Code::Unauthenticated | Code::DeadlineExceeded | Code::Cancelled
            )
        );
        self.release(failed);
    }

    fn release(&mut self, failed: bool) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        if let Some(peer) = self.peer {
            let mut failures = self
                .limits
                .failures
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(count) = failures.get_mut(&peer, Instant::now()) {
                count.pending = count.pending.saturating_sub(1);
                if failed {
                    count.done += 1;
                }
            }
        }
    }
}

impl Drop for Check {
    fn drop(&mut self) {
        self.release(false);
    }
}

/// RESOURCE_EXHAUSTED until a `window` whose count began `age` ago is over.
fn exhausted(message: &str, window: Duration, age: Duration) -> AggregatorError {
    AggregatorError::Exhausted {
        message: message.to_owned(),
        retry_after: Some(window.saturating_sub(age)),
    }
}

impl EdgeLimits {
    /// At most `login_failures` failed password checks per address per 15 minutes, and
    /// `signups` sign-ups per address per minute (0: no limit).
    pub(crate) fn new(login_failures: u32, signups: u32) -> Self {
        Self {
            login_failures,
            signups,
            failures: Mutex::new(BoundedMap::new(ADDRESSES, LOGIN_WINDOW)),
            signed_up: Mutex::new(BoundedMap::new(ADDRESSES, SIGNUP_WINDOW)),
            working: Mutex::new(HashMap::new()),
        }
    }

    /// A unit of password work for `peer`; RESOURCE_EXHAUSTED while it has
    /// [`PASSWORD_WORK_PER_ADDRESS`] in progress.
    fn work(self: &Arc<Self>, peer: PeerKey) -> Result<Working, AggregatorError> {
        let mut working = self.working.lock().unwrap_or_else(|e| e.into_inner());
        let n = working.entry(peer).or_insert(0);
        if *n >= PASSWORD_WORK_PER_ADDRESS {
            return Err(AggregatorError::exhausted(
                "too many logins and sign-ups in progress from this address; retry",
            ));
        }
        *n += 1;
        Ok(Working {
            limits: self.clone(),
            peer,
        })
    }

    /// Reserves a password check for `peer`; RESOURCE_EXHAUSTED once its failures and checks
    /// in progress reach the limit.
    pub(crate) fn check(self: &Arc<Self>, peer: Option<IpAddr>) -> Result<Check, AggregatorError> {
        let working = peer.map(|ip| self.work(PeerKey::of(ip))).transpose()?;
        let peer = peer.map(PeerKey::of).filter(|_| self.login_failures > 0);
        if let Some(key) = peer {
            let now = Instant::now();
            let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
            let count = failures.get_or_insert_with(key, now, Count::default);
            if count.done + count.pending >= self.login_failures {
                let age = failures.age(&key, now).unwrap_or_default();
                return Err(exhausted(
                    "too many failed logins from this address; retry later",
                    LOGIN_WINDOW,
                    age,
                ));
            }
            count.pending += 1;
        }
        Ok(Check {
            limits: self.clone(),
            peer,
            settled: false,
            _working: working,
        })
    }

    /// Counts a sign-up from `peer` (RESOURCE_EXHAUSTED beyond the limit) and holds its unit of
    /// password work until the returned value is dropped.
    pub(crate) fn sign_up(
        self: &Arc<Self>,
        peer: Option<IpAddr>,
    ) -> Result<Option<Working>, AggregatorError> {
        let working = peer.map(|ip| self.work(PeerKey::of(ip))).transpose()?;
        let Some(key) = peer.map(PeerKey::of).filter(|_| self.signups > 0) else {
            return Ok(working);
        };
        let now = Instant::now();
        let mut signed_up = self.signed_up.lock().unwrap_or_else(|e| e.into_inner());
        let count = signed_up.get_or_insert_with(key, now, Count::default);
        if count.done >= self.signups {
            let age = signed_up.age(&key, now).unwrap_or_default();
            return Err(exhausted(
                "too many sign-ups from this address; retry later",
                SIGNUP_WINDOW,
                age,
            ));
        }
        count.done += 1;
        Ok(working)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Failures from one address block it (checks in progress count too); another address is
    /// unaffected; a success clears nothing.
    #[tokio::test(start_paused = true)]
    async fn failed_logins_per_address() {
        let limits = Arc::new(EdgeLimits::new(3, 0));
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let b = Some(IpAddr::from([10, 0, 0, 2]));
        let bad: Result<(), Status> = Err(Status::unauthenticated("bad"));
        let ok: Result<(), Status> = Ok(());
        limits.check(a).expect("first").settle(&bad);
        limits.check(a).expect("second").settle(&ok);
        let in_flight = [
            limits.check(a).expect("third"),
            limits.check(a).expect("fourth"),
        ];
        assert!(limits.check(a).is_err(), "checks in progress count");
        for check in in_flight {
            check.settle(&bad);
        }
        let refused = Status::from(limits.check(a).expect_err("three failures"));
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert!(refused.metadata().get("retry-after").is_some());
        limits.check(b).expect("another address").settle(&bad);
        tokio::time::advance(LOGIN_WINDOW).await;
        assert!(limits.check(a).is_ok(), "the window passed");
    }

    /// Each table is bounded in bytes whatever addresses it sees: the figure the docs state.
    #[test]
    fn tables_have_a_fixed_size() {
        let limits = EdgeLimits::new(100, 60);
        for table in [&limits.failures, &limits.signed_up] {
            let bound = table.lock().expect("lock").bytes_bound();
            assert!(bound <= 14 * 1024 * 1024, "{bound} bytes");
        }
    }

    /// Sign-ups per address per minute.
    #[tokio::test(start_paused = true)]
    async fn sign_ups_per_address() {
        let limits = Arc::new(EdgeLimits::new(0, 2));
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        limits.sign_up(a).expect("one");
        limits.sign_up(a).expect("two");
        assert!(limits.sign_up(a).is_err());
        assert!(limits.sign_up(None).is_ok(), "unknown address: no limit");
        tokio::time::advance(SIGNUP_WINDOW).await;
        limits.sign_up(a).expect("next minute");
    }

    /// One address has at most a few password checks and sign-ups in progress; they come back
    /// when done, whether settled or dropped.
    #[test]
    fn password_work_per_address() {
        let limits = Arc::new(EdgeLimits::new(1000, 1000));
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let mut held: Vec<Check> = (0..PASSWORD_WORK_PER_ADDRESS)
            .map(|_| limits.check(a).expect("within"))
            .collect();
        assert!(limits.check(a).is_err());
        assert!(limits.sign_up(a).is_err(), "sign-ups share the bound");
        assert!(limits.check(Some(IpAddr::from([10, 0, 0, 2]))).is_ok());
        held.pop().expect("one").settle(&Ok::<(), Status>(()));
        held.pop();
        let _two = (
            limits.check(a).expect("freed"),
            limits.check(a).expect("freed"),
        );
        drop(held);
        assert!(limits.working.lock().expect("lock").len() <= 1);
    }
}
