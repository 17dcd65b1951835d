//! Password checks for the front end ([`crate::front`]): [`Credentials::check`] without
//! stalling the event loop.
//!
//! The front end awaits the verdict inside its tokio runtime. An argon2 verification takes
//! tens of milliseconds of CPU, so calling it inline would freeze every other connection on
//! that listener during a reconnect storm. Instead verifications run on a small fixed pool of
//! OS threads behind a bounded queue, and the future resolves when the pool answers:
//!
//! - bounded threads and queue: a flood of bogus CONNECTs costs at most `workers` argon2
//!   computations at a time (each ~19 MiB of RAM), never an unbounded number; when the queue
//!   is full the attempt is refused (fail closed) and the client retries with backoff;
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

/// Pending verifications beyond the ones being computed; more are refused.
const QUEUE_DEPTH: usize = 1024;
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
            return (AuthFuture::ready(false), None);
        };
        if self.cached(client_id, &hash, password) {
            tracing::debug!(client_id, "MQTT connect accepted (cached verification)");
            return (AuthFuture::ready(true), Some(hash));
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
                job.reply.send(false);
            }
            Err(TrySendError::Disconnected(job)) => {
                tracing::error!(client_id = job.client_id, "auth workers gone");
                job.reply.send(false);
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
        job.reply.send(ok);
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
            None => job.reply.send(false),
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
    result: Option<bool>,
    waker: Option<Waker>,
}

/// Sending half. Dropping it unanswered (e.g. a worker panicked) answers `false`, so a
/// connection can never hang waiting for a verdict.
struct Reply(Option<Arc<Mutex<Slot>>>);

impl Reply {
    fn new() -> (Self, AuthFuture) {
        let slot = Arc::new(Mutex::new(Slot::default()));
        (
            Self(Some(Arc::clone(&slot))),
            AuthFuture(Inner::Pending(slot)),
        )
    }

    fn send(mut self, ok: bool) {
        self.complete(ok);
    }

    fn complete(&mut self, ok: bool) {
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
        self.complete(false);
    }
}

/// Future returned to rumqttd; resolves to whether the CONNECT is allowed.
pub(crate) struct AuthFuture(Inner);

enum Inner {
    Ready(bool),
    Pending(Arc<Mutex<Slot>>),
}

impl AuthFuture {
    fn ready(ok: bool) -> Self {
        Self(Inner::Ready(ok))
    }
}

impl Future for AuthFuture {
    type Output = bool;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        match &self.0 {
            Inner::Ready(ok) => Poll::Ready(*ok),
            Inner::Pending(slot) => {
                let mut s = match slot.lock() {
                    Ok(s) => s,
                    Err(_) => return Poll::Ready(false),
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

    fn block_on(f: AuthFuture) -> bool {
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
        block_on(v.authenticate(id, pw).0)
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
    fn dropped_reply_answers_false() {
        let (reply, fut) = Reply::new();
        drop(reply);
        assert!(!block_on(fut));
    }
}
