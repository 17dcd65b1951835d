//! Password checks for the front end ([`crate::front`]): [`Credentials::check`] without
//! stalling the event loop.
//!
//! Device secrets (`$coevo-hmac-sha256$`, see [`crate::credentials`]) verify in about a
//! microsecond and are checked inline: a 10,000-camera connect storm costs ~10 ms of CPU.
//! Only argon2id entries (passwords a human chose, e.g. the coordinator's) take the path below.
//!
//! The front end awaits the verdict inside its tokio runtime. An argon2 verification takes
//! tens of milliseconds of CPU, so calling it inline would freeze every other connection on
//! that listener during a reconnect storm. Instead verifications run on a small fixed pool of
//! OS threads behind a bounded queue, and the future resolves when the pool answers:
//!
//! - bounded threads and queue: a flood of bogus CONNECTs costs at most `workers` argon2
//!   computations at a time (each ~19 MiB of RAM), never an unbounded number; when the queue
//!   is full the attempt is answered [`Verdict::Busy`] (CONNACK 3, "server unavailable": fail
//!   closed, and the client backs off rather than treating it as a wrong password). The queue
//!   is short ([`QUEUE_DEPTH`]) on purpose: at ~20 checks/s a long queue only holds clients
//!   whose own connect timeout runs out before their turn (congestion collapse, issue #13);
//! - a cache of successful checks (client id → cheap keyed argon2 digest of the accepted
//!   password) makes reconnects of already-verified clients nearly free. It is only written
//!   after a full verification and only for known client ids, so it is bounded by the fleet
//!   size. Each entry remembers the stored hash it was verified against and only counts while
//!   that is still the client's hash, so a reloaded credential file (removal, new password)
//!   can never be bypassed through the cache, even by a verification that was in flight.
//!
//! The credential set is swapped as a whole by [`Verifier::replace`] (the file watcher in
//! `lib.rs`); every verification works on the snapshot it started with.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll, Waker};

use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::{Algorithm, Argon2, Params, Version};

use crate::Credentials;

/// Pending argon2 verifications beyond the ones being computed; more are answered busy.
/// 64 at ~15–27 checks/s on 2 cores is a wait of a few seconds, inside any client's timeout.
const QUEUE_DEPTH: usize = 64;
/// Upper bound on verification threads (each argon2 run holds ~19 MiB).
const MAX_WORKERS: usize = 4;

/// Shared state of the password checks.
pub(crate) struct Verifier {
    credentials: RwLock<Arc<Credentials>>,
    /// Client id → (stored PHC hash the password was verified against, cheap digest of it).
    cache: Mutex<HashMap<String, (String, [u8; 32])>>,
    /// Per-process random salt for cache digests, so they are useless outside this process.
    cache_salt: [u8; 16],
    jobs: SyncSender<Job>,
}

/// The answer to a CONNECT's password.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Accept,
    Refuse,
    /// Not checked: the verification pool is saturated. Answered with CONNACK 3.
    Busy,
}

struct Job {
    credentials: Arc<Credentials>,
    client_id: String,
    password: String,
    reply: Reply,
}

impl Verifier {
    /// Starts the worker pool and returns the shared verifier.
    pub(crate) fn start(credentials: Credentials) -> std::io::Result<Arc<Self>> {
        let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE_DEPTH);
        let mut cache_salt = [0u8; 16];
        OsRng.fill_bytes(&mut cache_salt);
        let verifier = Arc::new(Self {
            credentials: RwLock::new(Arc::new(credentials)),
            cache: Mutex::new(HashMap::new()),
            cache_salt,
            jobs: tx,
        });
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, MAX_WORKERS);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..workers {
            // Workers hold a Weak reference: they must not keep the verifier alive by themselves,
            // and they exit once the verifier (and with it the sender) is dropped.
            let weak = Arc::downgrade(&verifier);
            let rx = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("coevo-auth-{i}"))
                .spawn(move || worker(rx, weak))?;
        }
        Ok(verifier)
    }

    /// The current credential snapshot.
    pub(crate) fn snapshot(&self) -> Arc<Credentials> {
        match self.credentials.read() {
            Ok(c) => Arc::clone(&c),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Swaps in a reloaded credential set. Cache entries verified against a hash that is no
    /// longer the client's stop counting at once (see [`Self::cached`]); they are also dropped
    /// here so the cache never holds removed clients.
    pub(crate) fn replace(&self, credentials: Credentials) {
        let credentials = Arc::new(credentials);
        if let Ok(mut cache) = self.cache.lock() {
            cache.retain(|id, (hash, _)| credentials.clients.get(id) == Some(hash));
        }
        match self.credentials.write() {
            Ok(mut c) => *c = credentials,
            Err(poisoned) => *poisoned.into_inner() = credentials,
        }
    }

    /// Whether `client_id` is still known with the stored hash `hash` (the one its open
    /// connection authenticated against).
    pub(crate) fn is_current(&self, client_id: &str, hash: &str) -> bool {
        self.snapshot()
            .clients
            .get(client_id)
            .is_some_and(|h| h == hash)
    }

    /// Checks `password` for `client_id` (the caller has already checked that the user name
    /// equals the client id). Returns the verdict and the stored hash it is checked against
    /// (`None`: unknown client, verdict already `false`), which the caller keeps to notice a
    /// later revocation or password change with [`Self::is_current`].
    pub(crate) fn authenticate(
        self: &Arc<Self>,
        client_id: &str,
        password: &str,
    ) -> (AuthFuture, Option<String>) {
        let credentials = self.snapshot();
        // Cheap refusal first: no argon2 work for an id that cannot succeed.
        let Some(hash) = credentials.clients.get(client_id).cloned() else {
            return (AuthFuture::ready(Verdict::Refuse), None);
        };
        if crate::credentials::is_device_hash(&hash) {
            // Microseconds: inline, no pool, no cache needed.
            let ok = crate::credentials::verify_password(password, &hash);
            let verdict = if ok { Verdict::Accept } else { Verdict::Refuse };
            return (AuthFuture::ready(verdict), Some(hash));
        }
        if self.cached(client_id, &hash, password) {
            tracing::debug!(client_id, "MQTT connect accepted (cached verification)");
            return (AuthFuture::ready(Verdict::Accept), Some(hash));
        }
        let (reply, future) = Reply::new();
        let job = Job {
            credentials,
            client_id: client_id.to_owned(),
            password: password.to_owned(),
            reply,
        };
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(job)) => {
                tracing::debug!(client_id = job.client_id, "auth queue full");
                job.reply.send(Verdict::Busy);
            }
            Err(TrySendError::Disconnected(job)) => {
                tracing::error!(client_id = job.client_id, "auth workers gone");
                job.reply.send(Verdict::Busy);
            }
        }
        (future, Some(hash))
    }

    fn run(&self, job: Job) {
        let ok = job
            .credentials
            .check(&job.client_id, &job.client_id, &job.password);
        if ok {
            let hash = job.credentials.clients.get(&job.client_id);
            if let (Some(hash), Some(digest)) = (hash, self.digest(&job.password)) {
                if let Ok(mut cache) = self.cache.lock() {
                    cache.insert(job.client_id.clone(), (hash.clone(), digest));
                }
            }
        }
        job.reply
            .send(if ok { Verdict::Accept } else { Verdict::Refuse });
    }

    /// A cache hit needs the same password *and* the same stored hash as when it was verified.
    fn cached(&self, client_id: &str, hash: &str, password: &str) -> bool {
        let Some(digest) = self.digest(password) else {
            return false;
        };
        let Ok(cache) = self.cache.lock() else {
            return false;
        };
        cache
            .get(client_id)
            .is_some_and(|(h, known)| h == hash && constant_time_eq(known, &digest))
    }

    /// Keyed digest of a password for the cache: argon2id at minimum cost (8 KiB, 1 pass) with
    /// the per-process salt. Microseconds, yet still a one-way function.
    fn digest(&self, password: &str) -> Option<[u8; 32]> {
        let params = Params::new(Params::MIN_M_COST, 1, 1, Some(32)).ok()?;
        let mut out = [0u8; 32];
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password_into(password.as_bytes(), &self.cache_salt, &mut out)
            .ok()?;
        Some(out)
    }
}

fn worker(rx: Arc<Mutex<Receiver<Job>>>, verifier: std::sync::Weak<Verifier>) {
    loop {
        let job = {
            let Ok(rx) = rx.lock() else { return };
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return, // verifier dropped
            }
        };
        match verifier.upgrade() {
            Some(v) => v.run(job),
            None => job.reply.send(Verdict::Busy),
        }
    }
}

/// Compares without an early exit, so timing does not reveal how many bytes matched.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Result slot shared between a worker and the waiting connection task.
#[derive(Default)]
struct Slot {
    result: Option<Verdict>,
    waker: Option<Waker>,
}

/// Sending half. Dropping it unanswered (e.g. a worker panicked) answers
/// [`Verdict::Busy`] (not admitted), so a connection can never hang waiting for a verdict.
struct Reply(Option<Arc<Mutex<Slot>>>);

impl Reply {
    fn new() -> (Self, AuthFuture) {
        let slot = Arc::new(Mutex::new(Slot::default()));
        (
            Self(Some(Arc::clone(&slot))),
            AuthFuture(Inner::Pending(slot)),
        )
    }

    fn send(mut self, ok: Verdict) {
        self.complete(ok);
    }

    fn complete(&mut self, ok: Verdict) {
        if let Some(slot) = self.0.take() {
            let waker = match slot.lock() {
                Ok(mut s) => {
                    s.result = Some(ok);
                    s.waker.take()
                }
                Err(poisoned) => {
                    let mut s = poisoned.into_inner();
                    s.result = Some(ok);
                    s.waker.take()
                }
            };
            if let Some(w) = waker {
                w.wake();
            }
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        self.complete(Verdict::Busy);
    }
}

/// Resolves to the [`Verdict`] on a CONNECT's password.
pub(crate) struct AuthFuture(Inner);

enum Inner {
    Ready(Verdict),
    Pending(Arc<Mutex<Slot>>),
}

impl AuthFuture {
    fn ready(ok: Verdict) -> Self {
        Self(Inner::Ready(ok))
    }
}

impl Future for AuthFuture {
    type Output = Verdict;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Verdict> {
        match &self.0 {
            Inner::Ready(ok) => Poll::Ready(*ok),
            Inner::Pending(slot) => {
                let mut s = match slot.lock() {
                    Ok(s) => s,
                    Err(_) => return Poll::Ready(Verdict::Busy),
                };
                match s.result {
                    Some(ok) => Poll::Ready(ok),
                    None => {
                        s.waker = Some(cx.waker().clone());
                        Poll::Pending
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on(f: AuthFuture) -> Verdict {
        // Minimal executor: park the thread until the worker wakes us.
        struct ThreadWaker(std::thread::Thread);
        impl std::task::Wake for ThreadWaker {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut f = std::pin::pin!(f);
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
            std::thread::park();
        }
    }

    fn check(v: &Arc<Verifier>, id: &str, pw: &str) -> bool {
        block_on(v.authenticate(id, pw).0) == Verdict::Accept
    }

    #[test]
    fn verifies_on_pool_and_caches() {
        let mut creds = Credentials::default();
        creds.set_password("cam-1", "secret").unwrap();
        let v = Verifier::start(creds.clone()).unwrap();
        let hash = creds.clients["cam-1"].clone();
        assert!(!check(&v, "cam-1", "wrong"));
        assert!(!v.cached("cam-1", &hash, "secret"));
        assert!(check(&v, "cam-1", "secret"));
        assert!(v.cached("cam-1", &hash, "secret"));
        assert!(!v.cached("cam-1", &hash, "wrong"));
        assert!(check(&v, "cam-1", "secret"));
        assert!(!check(&v, "cam-9", "secret"));
        assert!(v.is_current("cam-1", &hash));
    }

    #[test]
    fn replaced_credentials_invalidate_cache_and_sessions() {
        let mut creds = Credentials::default();
        creds.set_password("cam-1", "old").unwrap();
        creds.set_password("cam-2", "two").unwrap();
        let v = Verifier::start(creds.clone()).unwrap();
        let old_hash = creds.clients["cam-1"].clone();
        assert!(check(&v, "cam-1", "old"));
        assert!(check(&v, "cam-2", "two"));
        creds.set_password("cam-1", "new").unwrap();
        creds.remove("cam-2");
        v.replace(creds);
        assert!(!v.is_current("cam-1", &old_hash));
        assert!(
            !check(&v, "cam-1", "old"),
            "the cached old password must not count"
        );
        assert!(check(&v, "cam-1", "new"));
        assert!(!check(&v, "cam-2", "two"));
    }

    #[test]
    fn dropped_reply_answers_busy() {
        let (reply, fut) = Reply::new();
        drop(reply);
        assert_eq!(block_on(fut), Verdict::Busy);
    }

    #[test]
    fn device_secrets_verify_inline_and_follow_reloads() {
        let mut creds = Credentials::default();
        let secret = crate::generate_password();
        creds.set_device_secret("cam-1", &secret).unwrap();
        let v = Verifier::start(creds.clone()).unwrap();
        // Ready at once: no worker involved.
        let (fut, hash) = v.authenticate("cam-1", &secret);
        assert!(matches!(fut.0, Inner::Ready(Verdict::Accept)));
        let hash = hash.unwrap();
        assert!(!check(&v, "cam-1", "wrong-but-long-enough-secret"));
        let new = crate::generate_password();
        creds.set_device_secret("cam-1", &new).unwrap();
        v.replace(creds);
        assert!(!v.is_current("cam-1", &hash));
        assert!(!check(&v, "cam-1", &secret));
        assert!(check(&v, "cam-1", &new));
    }

    #[test]
    fn a_full_argon2_queue_answers_busy_not_refused() {
        let mut creds = Credentials::default();
        creds.set_password("human", "chosen").unwrap();
        let v = Verifier::start(creds).unwrap();
        // Far more than workers + queue at once: the overflow must be Busy, never Refuse.
        let futures: Vec<_> = (0..QUEUE_DEPTH + MAX_WORKERS + 40)
            .map(|_| v.authenticate("human", "chosen").0)
            .collect();
        let verdicts: Vec<Verdict> = futures.into_iter().map(block_on).collect();
        assert!(verdicts.contains(&Verdict::Busy), "{verdicts:?}");
        assert!(verdicts.contains(&Verdict::Accept));
        assert!(!verdicts.contains(&Verdict::Refuse));
    }
}
