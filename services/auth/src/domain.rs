//! The auth domain: validated inputs, password hashing on threads of its own, refresh tokens and
//! login throttling. Plain Rust, no gRPC types.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use argon2::{
    Algorithm, Argon2, Params, PasswordHash, PasswordHasher as _, PasswordVerifier as _, Version,
    password_hash::SaltString,
};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use mesh_runtime::bounded::{BoundedMap, key16};
use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;

use crate::error::AuthError;

/// The longest e-mail address accepted (RFC 5321's path limit).
pub(crate) const MAX_EMAIL_CHARS: usize = 254;
/// Password length bounds, in bytes.
pub(crate) const PASSWORD_BYTES: std::ops::RangeInclusive<usize> = 8..=1024;

/// An e-mail address, trimmed and lower-cased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Email(String);

impl Email {
    /// Trims, lower-cases and checks that `raw` looks like an address.
    pub(crate) fn parse(raw: &str) -> Result<Self, AuthError> {
        let email = raw.trim().to_lowercase();
        let invalid = |why: &str| AuthError::InvalidArgument(format!("email {why}"));
        if email.is_empty() {
            return Err(invalid("must not be empty"));
        }
        if email.chars().count() > MAX_EMAIL_CHARS {
            return Err(invalid("must be at most 254 characters"));
        }
        let Some((local, domain)) = email.split_once('@') else {
            return Err(invalid("must look like name@example.com"));
        };
        let looks_right = !local.is_empty()
            && !domain.is_empty()
            && !domain.contains('@')
            && domain.contains('.')
            && !domain.starts_with('.')
            && !domain.ends_with('.')
            && !email.chars().any(|c| c.is_whitespace() || c.is_control());
        if !looks_right {
            return Err(invalid("must look like name@example.com"));
        }
        Ok(Self(email))
    }

    /// The normalised address.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// The key login throttling uses: the normalised form of any input, valid or not.
    pub(crate) fn throttle_key(raw: &str) -> String {
        raw.trim().to_lowercase()
    }
}

/// Checks a new password's length (bytes, never trimmed).
pub(crate) fn check_password(password: &str) -> Result<(), AuthError> {
    if PASSWORD_BYTES.contains(&password.len()) {
        Ok(())
    } else {
        Err(AuthError::InvalidArgument(
            "password must be 8 to 1024 bytes".into(),
        ))
    }
}

/// One piece of hashing work for the hashing threads.
type Job = Box<dyn FnOnce(&Argon2<'static>) + Send>;

/// Argon2id hashing and verification on threads of their own, one per core, at a lower CPU
/// priority, behind a permit per thread: a login storm never starves the runtime's workers (or
/// health checks), and memory stays bounded — each Argon2id call takes 19 MiB, and the
/// allocator keeps that memory per thread, so the number of hashing threads bounds it (on
/// tokio's blocking pool, whose threads come and go, auth grew to 490 MiB in a storm).
#[derive(Debug, Clone)]
pub(crate) struct PasswordHasher {
    jobs: std::sync::mpsc::SyncSender<Job>,
    permits: Arc<Semaphore>,
    /// A hash of a random password, verified against when the e-mail is unknown so that the
    /// answer takes as long as for a wrong password.
    dummy_hash: Arc<String>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
}

/// The Argon2id parameters of stored passwords: OWASP's minimum, 19 MiB, 2 iterations, 1
/// lane.
pub fn argon2_params() -> Params {
    // These constants are valid Argon2 parameters.
    Params::new(19 * 1024, 2, 1, None).unwrap_or_default()
}

impl PasswordHasher {
    pub(crate) async fn new(concurrency: usize) -> Result<Self, AuthError> {
        let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, argon2_params());
        let threads = concurrency.max(1);
        // Never more jobs than threads are handed over (the permits), so this never blocks.
        let (jobs, queue) = std::sync::mpsc::sync_channel::<Job>(threads);
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads {
            let (queue, argon2) = (queue.clone(), argon2.clone());
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || {
                    yield_to_the_runtime();
                    loop {
                        // Ends when every hasher (every sender) is gone.
                        let job = match queue.lock() {
                            Ok(queue) => queue.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(&argon2),
                            Err(_) => return,
                        }
                    }
                })
                .map_err(|e| AuthError::Internal(format!("hashing thread: {e}")))?;
        }
        let mut hasher = Self {
            jobs,
            permits: Arc::new(Semaphore::new(threads)),
            dummy_hash: Arc::new(String::new()),
            queued: Arc::default(),
        };
        let dummy = B64.encode(random_bytes::<16>()?);
        hasher.dummy_hash = Arc::new(hasher.hash(dummy).await?);
        Ok(hasher)
    }

    /// How many hash operations are waiting for or holding a permit.
    pub(crate) fn queued(&self) -> usize {
        self.queued.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn on_blocking_pool<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Argon2<'static>) -> T + Send + 'static,
    ) -> Result<T, AuthError> {
        use std::sync::atomic::Ordering;
        self.queued.fetch_add(1, Ordering::Relaxed);
        let _queued = scopeguard(self.queued.clone());
        // The permit goes with the job and is released when the work is done, even if the
        // caller has gone: no more jobs than threads are ever handed over.
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| AuthError::Internal("hasher closed".into()))?;
        let (done, result) = tokio::sync::oneshot::channel();
        self.jobs
            .try_send(Box::new(move |argon2: &Argon2<'static>| {
                let _ = done.send(work(argon2));
                drop(permit);
            }))
            .map_err(|e| AuthError::Internal(format!("hashing threads unavailable: {e}")))?;
        result
            .await
            .map_err(|_| AuthError::Internal("hashing thread failed".into()))
    }

    /// The PHC string of `password` with a fresh salt.
    pub(crate) async fn hash(&self, password: String) -> Result<String, AuthError> {
        let salt = SaltString::encode_b64(&random_bytes::<16>()?)
            .map_err(|e| AuthError::Internal(format!("salt: {e}")))?;
        self.on_blocking_pool(move |argon2| {
            argon2
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| AuthError::Internal(format!("hashing: {e}")))
        })
        .await?
    }

    /// Whether `password` matches `phc`; with `None`, verifies against the dummy hash (and
    /// returns false) so unknown e-mails cost the same time.
    pub(crate) async fn verify(
        &self,
        password: String,
        phc: Option<String>,
    ) -> Result<bool, AuthError> {
        let known = phc.is_some();
        let phc = phc.unwrap_or_else(|| self.dummy_hash.as_ref().clone());
        let matches = self
            .on_blocking_pool(move |argon2| {
                PasswordHash::new(&phc)
                    .map(|parsed| argon2.verify_password(password.as_bytes(), &parsed).is_ok())
                    .unwrap_or(false)
            })
            .await?;
        Ok(known && matches)
    }
}

/// Lowers the CPU priority of the calling (hashing) thread to nice 10.
///
/// Argon2id keeps every core it gets busy; at the same priority the runtime's workers wait
/// their turn behind it, and a health check or token check answered in a millisecond when idle
/// takes several during a login storm. At nice 10 the hashing still gets all the CPU nothing
/// else wants, but the workers preempt it. Linux only (elsewhere `setpriority` would renice the
/// whole process).
fn yield_to_the_runtime() {
    #[cfg(target_os = "linux")]
    {
        let tid = rustix::thread::gettid();
        if let Err(err) = rustix::process::setpriority_process(Some(tid), 10) {
            tracing::debug!(error = %err, "cannot lower the hashing thread's priority");
        }
    }
}

/// Decrements the queue count when dropped.
struct QueueGuard(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for QueueGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn scopeguard(counter: Arc<std::sync::atomic::AtomicUsize>) -> QueueGuard {
    QueueGuard(counter)
}

/// `N` bytes from the operating system's random source.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], AuthError> {
    let mut bytes = [0u8; N];
    getrandom::getrandom(&mut bytes)
        .map_err(|e| AuthError::Internal(format!("random source: {e}")))?;
    Ok(bytes)
}

/// A new refresh token (256 random bits, base64url) and the digest that is stored.
pub(crate) fn new_refresh_token() -> Result<(String, Vec<u8>), AuthError> {
    let token = B64.encode(random_bytes::<32>()?);
    let hash = refresh_hash(&token);
    Ok((token, hash))
}

/// The stored digest of a refresh token.
pub(crate) fn refresh_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// The key of one account in the failure throttle: the first 16 bytes of the SHA-256 of its
/// normalised e-mail (any input, valid or not, after its length was checked). Fixed-size, so a
/// flood of long made-up addresses costs no more than short ones.
pub(crate) fn account_key(raw_email: &str) -> [u8; 16] {
    key16(&[b"account", Email::throttle_key(raw_email).as_bytes()])
}

/// Failures and attempts in progress of one key, in the window that began with its entry.
#[derive(Debug, Default, Clone, Copy)]
struct Count {
    failures: u32,
    pending: u32,
}

/// Counts failed password checks per account in a fixed window (from the first attempt), and
/// reserves each attempt before its Argon2id check, so that concurrent attempts cannot race past
/// the limit: an attempt is refused while failures plus attempts in progress reach it.
///
/// The table is a [`BoundedMap`]: at most [`THROTTLE_ENTRIES`] accounts, forgotten with their
/// window, the oldest first when full.
#[derive(Debug)]
pub(crate) struct Throttle {
    limit: u32,
    window: Duration,
    entries: Mutex<BoundedMap<[u8; 16], Count>>,
}

/// Accounts with failures the throttle remembers at most (at most 14 MiB; see
/// [`BoundedMap::bytes_bound`]): the oldest is forgotten first. An entry stays only while it
/// has failures (or an attempt in progress).
pub(crate) const THROTTLE_ENTRIES: usize = 100_000;

/// One reserved attempt; settle it with its outcome. Dropped unsettled (the caller went away
/// mid-check), it counts as a failure.
#[derive(Debug)]
pub(crate) struct Attempt {
    throttle: Arc<Throttle>,
    key: [u8; 16],
    settled: bool,
}

impl Attempt {
    /// The check succeeded: the key's failures are forgotten.
    pub(crate) fn succeeded(mut self) {
        self.settled = true;
        self.throttle.settle(&self.key, true);
    }

    /// The check failed: one more failure.
    pub(crate) fn failed(mut self) {
        self.settled = true;
        self.throttle.settle(&self.key, false);
    }

    /// The check could not be made (storage or hashing failed): neither success nor failure.
    pub(crate) fn abandoned(mut self) {
        self.settled = true;
        self.throttle.release(&self.key);
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.settled {
            self.throttle.settle(&self.key, false);
        }
    }
}

impl Throttle {
    pub(crate) fn new(limit: u32, window: Duration) -> Self {
        Self::with_capacity(limit, window, THROTTLE_ENTRIES)
    }

    pub(crate) fn with_capacity(limit: u32, window: Duration, capacity: usize) -> Self {
        Self {
            limit,
            window,
            entries: Mutex::new(BoundedMap::new(capacity, window)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BoundedMap<[u8; 16], Count>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves an attempt for `key`: `Err(retry_after)` if its failures and attempts in
    /// progress have reached the limit within the window.
    pub(crate) fn reserve(self: &Arc<Self>, key: [u8; 16]) -> Result<Attempt, Duration> {
        let now = tokio::time::Instant::now();
        let mut entries = self.lock();
        let limit = self.limit;
        let count = entries.get_or_insert_with(key, now, Count::default);
        if count.failures + count.pending >= limit {
            let age = entries.age(&key, now).unwrap_or_default();
            return Err(self.window.saturating_sub(age).max(Duration::from_secs(1)));
        }
        count.pending += 1;
        Ok(Attempt {
            throttle: self.clone(),
            key,
            settled: false,
        })
    }

    fn release(&self, key: &[u8; 16]) {
        let now = tokio::time::Instant::now();
        let mut entries = self.lock();
        let empty = entries.get_mut(key, now).is_some_and(|count| {
            count.pending = count.pending.saturating_sub(1);
            count.pending == 0 && count.failures == 0
        });
        if empty {
            // Nothing to remember: do not let it push an account with failures out.
            entries.remove(key);
        }
    }

    fn settle(&self, key: &[u8; 16], success: bool) {
        let now = tokio::time::Instant::now();
        let mut entries = self.lock();
        if success {
            entries.remove(key);
            return;
        }
        let count = entries.get_or_insert_with(*key, now, Count::default);
        count.pending = count.pending.saturating_sub(1);
        count.failures += 1;
    }

    /// Whether an attempt for `key` would be refused now.
    #[cfg(test)]
    fn blocked(&self, key: [u8; 16]) -> bool {
        let now = tokio::time::Instant::now();
        self.lock()
            .get_mut(&key, now)
            .is_some_and(|count| count.failures + count.pending >= self.limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Addresses are trimmed and lower-cased; malformed ones are refused naming `email`.
    #[test]
    fn email_parsing() {
        assert_eq!(
            Email::parse("  Ada@Example.COM ").unwrap().as_str(),
            "ada@example.com"
        );
        for bad in [
            "",
            "   ",
            "ada",
            "ada@",
            "@example.com",
            "a@b",
            "a b@example.com",
            "a@@b.com",
            "a@.com",
            "a@b.",
        ] {
            let err = Email::parse(bad).unwrap_err();
            assert!(
                matches!(&err, AuthError::InvalidArgument(m) if m.contains("email")),
                "{bad}: {err:?}"
            );
        }
        let long = format!("{}@example.com", "a".repeat(250));
        assert!(Email::parse(&long).is_err());
    }

    /// Passwords are 8 to 1024 bytes, counted untrimmed.
    #[test]
    fn password_bounds() {
        assert!(check_password("1234567").is_err());
        assert!(check_password("12345678").is_ok());
        assert!(check_password("       x").is_ok());
        assert!(check_password(&"x".repeat(1024)).is_ok());
        assert!(check_password(&"x".repeat(1025)).is_err());
    }

    /// Five failures within the window block; the window passing or a success unblocks.
    #[tokio::test(start_paused = true)]
    async fn throttle_window() {
        let t = Arc::new(Throttle::new(5, Duration::from_secs(900)));
        let k = account_key("ada@example.com");
        for _ in 0..4 {
            t.reserve(k).expect("under the limit").failed();
        }
        assert!(!t.blocked(k));
        t.reserve(k).expect("fifth").failed();
        assert!(t.blocked(k), "five failures block");
        assert!(!t.blocked(account_key("other@example.com")));
        tokio::time::advance(Duration::from_secs(900)).await;
        assert!(!t.blocked(k), "the window passed");
        t.reserve(k).expect("again").failed();
        t.reserve(k).expect("and again").succeeded();
        for _ in 0..4 {
            t.reserve(k).expect("cleared by the success").failed();
        }
        assert!(!t.blocked(k));
    }

    /// Attempts in progress count: forty at once for one account get five checks, and an
    /// attempt dropped mid-check counts as a failure.
    #[tokio::test(start_paused = true)]
    async fn throttle_reserves_before_the_check() {
        let t = Arc::new(Throttle::new(5, Duration::from_secs(900)));
        let k = account_key("  ADA@example.com ");
        assert_eq!(
            k,
            account_key("ada@example.com"),
            "normalised before hashing"
        );
        let attempts: Vec<_> = (0..40).filter_map(|_| t.reserve(k).ok()).collect();
        assert_eq!(attempts.len(), 5);
        drop(attempts);
        assert!(t.blocked(k), "dropped attempts are failures");
    }

    /// The throttle's table is bounded in bytes whatever keys it sees: the figure the docs state.
    #[test]
    fn throttle_memory_is_fixed() {
        let t = Throttle::new(5, Duration::from_secs(900));
        let bound = t.lock().bytes_bound();
        assert!(bound <= 14 * 1024 * 1024, "{bound} bytes");
    }

    /// Refresh tokens carry 256 random bits and only their digest is kept.
    #[test]
    fn refresh_tokens() {
        let (a, ha) = new_refresh_token().unwrap();
        let (b, _) = new_refresh_token().unwrap();
        assert_ne!(a, b);
        assert_eq!(B64.decode(&a).unwrap().len(), 32);
        assert_eq!(ha, refresh_hash(&a));
        assert_eq!(ha.len(), 32);
    }

    /// Hashes are Argon2id at OWASP's parameters and verify only the right password; an unknown
    /// account never verifies.
    #[tokio::test]
    async fn hashing() {
        let hasher = PasswordHasher::new(1).await.unwrap();
        let phc = hasher.hash("correct horse".into()).await.unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(
            hasher
                .verify("correct horse".into(), Some(phc.clone()))
                .await
                .unwrap()
        );
        assert!(
            !hasher
                .verify("wrong horse".into(), Some(phc))
                .await
                .unwrap()
        );
        assert!(!hasher.verify("anything".into(), None).await.unwrap());
        assert_eq!(hasher.queued(), 0);
    }
}
