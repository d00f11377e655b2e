//! The slot holding a credential's current token.
//!
//! The refresher is the only writer; the request path only reads. Reads are a lock-free
//! `ArcSwap` load plus an expiry check against the clock, so a token past its (early) expiry is
//! never handed out, whatever the refresher is doing. When no valid token exists a request
//! waits, bounded, for the attempt in flight (or nudges an idle refresher through `demand`);
//! it never fetches itself, which keeps one token request in flight per credential. After a
//! failed attempt, such a request tells the refresher that it waits (which caps the wait at a
//! few seconds, once) and waits only if the next attempt starts before its deadline; otherwise
//! it is answered at once with the failure. The refresher's schedule decides when the identity
//! provider is asked again, not the request rate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use http::HeaderValue;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::schedule::DEMAND_SPREAD;
use super::Token;

/// What `/readyz` reports about a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// No token was ever obtained.
    Pending,
    /// A token is held and valid.
    Valid,
    /// The last token expired and no new one was obtained.
    Expired,
}

impl SlotState {
    /// The name used in `/readyz`.
    pub fn as_str(self) -> &'static str {
        match self {
            SlotState::Pending => "pending",
            SlotState::Valid => "valid",
            SlotState::Expired => "expired",
        }
    }
}

/// Smallest time between two token invalidations caused by upstream `401`s.
pub const INVALIDATE_INTERVAL: Duration = Duration::from_secs(5);

/// Why a request got no token.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct TokenUnavailable(pub String);

/// Holds the current token of one credential.
#[derive(Debug)]
pub struct TokenSlot {
    name: String,
    current: ArcSwapOption<Token>,
    last_error: ArcSwap<Option<String>>,
    /// A token request is in flight.
    fetching: AtomicBool,
    /// The last attempt failed.
    failing: AtomicBool,
    changed: Notify,
    demand: Notify,
    /// When the refresher plans its next attempt after a failure (ms since `born`).
    next_attempt_ms: std::sync::atomic::AtomicU64,
    /// When it would make that attempt once a request waits (ms since `born`).
    wanted_attempt_ms: std::sync::atomic::AtomicU64,
    /// A reload asks a failing refresher to retry now.
    retry_now: Notify,
    /// When an upstream `401` last invalidated a token (ms since `born`, 0: never).
    last_invalidation_ms: std::sync::atomic::AtomicU64,
    born: Instant,
    /// Token requests by outcome, for `/metrics` (written by the refresher only).
    fetches: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl TokenSlot {
    /// An empty slot for the credential `name`.
    pub fn new(name: impl Into<String>) -> Self {
        TokenSlot {
            name: name.into(),
            current: ArcSwapOption::empty(),
            last_error: ArcSwap::from_pointee(None),
            fetching: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            changed: Notify::new(),
            demand: Notify::new(),
            next_attempt_ms: std::sync::atomic::AtomicU64::new(0),
            wanted_attempt_ms: std::sync::atomic::AtomicU64::new(0),
            retry_now: Notify::new(),
            last_invalidation_ms: std::sync::atomic::AtomicU64::new(0),
            born: Instant::now(),
            fetches: Default::default(),
        }
    }

    /// The credential's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `Authorization` value of the current token, if it is valid at `now`. The hot path.
    #[inline]
    pub fn header_at(&self, now: Instant) -> Option<HeaderValue> {
        let guard = self.current.load();
        match guard.as_deref() {
            Some(t) if t.is_valid_at(now) => Some(t.header().clone()),
            _ => None,
        }
    }

    /// Runs `f` on the `Authorization` value of the token valid at `now`, if there is one,
    /// without cloning it: a clone bumps a reference count that every worker shares, so the
    /// front door writes the value straight from the slot into the upstream's request head.
    #[inline]
    pub fn with_header_at<R>(&self, now: Instant, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let guard = self.current.load();
        match guard.as_deref() {
            Some(t) if t.is_valid_at(now) => Some(f(t.header().as_bytes())),
            _ => None,
        }
    }

    /// The current token, valid or not (for status reports and the refresher).
    pub fn current(&self) -> Option<Arc<Token>> {
        self.current.load_full()
    }

    /// State, seconds to expiry and last error, for `/readyz`.
    pub fn status(&self, now: Instant) -> (SlotState, Option<Duration>, Option<String>) {
        let error = (**self.last_error.load()).clone();
        match self.current.load().as_deref() {
            None => (SlotState::Pending, None, error),
            Some(t) if t.is_valid_at(now) => (SlotState::Valid, Some(t.expires_at() - now), error),
            Some(_) => (SlotState::Expired, Some(Duration::ZERO), error),
        }
    }

    /// Counts a finished token request by `outcome` (`ok`, `http_401`, ...). Called by the
    /// refresher only, off the request path.
    pub fn count_fetch(&self, outcome: &str) {
        let mut fetches = self.fetches.lock().unwrap_or_else(|e| e.into_inner());
        match fetches.get_mut(outcome) {
            Some(n) => *n += 1,
            None => {
                fetches.insert(outcome.to_string(), 1);
            }
        }
    }

    /// Token requests so far, by outcome.
    pub fn fetch_counts(&self) -> Vec<(String, u64)> {
        let fetches = self.fetches.lock().unwrap_or_else(|e| e.into_inner());
        fetches.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Whether a token request is in flight.
    pub fn is_fetching(&self) -> bool {
        self.fetching.load(Ordering::SeqCst)
    }

    /// Marks a token request as in flight. Called by the refresher only.
    pub fn begin_attempt(&self) {
        self.fetching.store(true, Ordering::SeqCst);
    }

    /// Installs a new token and wakes waiting requests. Called by the refresher only.
    pub fn store(&self, token: Token) {
        self.current.store(Some(Arc::new(token)));
        self.last_error.store(Arc::new(None));
        self.failing.store(false, Ordering::SeqCst);
        self.fetching.store(false, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.born).as_millis() as u64
    }

    fn at_ms(&self, ms: &std::sync::atomic::AtomicU64) -> Instant {
        self.born + Duration::from_millis(ms.load(Ordering::SeqCst))
    }

    /// Records a failed attempt (the current token stays), when the next one is planned and
    /// when it would be once a request waits, and wakes waiting requests.
    pub fn record_failure(&self, message: String, next_attempt: Instant, if_wanted: Instant) {
        self.next_attempt_ms
            .store(self.ms(next_attempt), Ordering::SeqCst);
        self.wanted_attempt_ms
            .store(self.ms(if_wanted), Ordering::SeqCst);
        self.last_error.store(Arc::new(Some(message)));
        self.failing.store(true, Ordering::SeqCst);
        self.fetching.store(false, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// The upstream answered `401` to a request that carried `used`. If `used` is still the
    /// current token, it is retired and the refresher asked for a new one, at most once per
    /// [`INVALIDATE_INTERVAL`]. Returns whether waiting for a token can help: false when the
    /// same token was already retired recently and came back (the rate limit holds).
    pub fn invalidate(&self, used: &[u8]) -> bool {
        let now = Instant::now();
        let current = self.current.load_full();
        let Some(token) = current.as_deref() else {
            return true;
        };
        // Compared without the `Bearer ` word: a route may send the token in another format.
        fn bare(v: &[u8]) -> &[u8] {
            v.strip_prefix(b"Bearer ").unwrap_or(v)
        }
        if bare(token.header().as_bytes()) != bare(used) || !token.is_valid_at(now) {
            // A newer token is already here, or this one is already retired and being replaced.
            return true;
        }
        let now_ms = (now - self.born).as_millis() as u64 + 1;
        let last = self.last_invalidation_ms.load(Ordering::SeqCst);
        let interval = INVALIDATE_INTERVAL.as_millis() as u64;
        if last != 0 && now_ms < last + interval {
            return false;
        }
        if self
            .last_invalidation_ms
            .compare_exchange(last, now_ms, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return true; // another request retired it just now
        }
        let retired = Token::retired(token, now);
        let _ = self
            .current
            .compare_and_swap(&current, Some(Arc::new(retired)));
        self.demand.notify_one();
        true
    }

    /// The refresher moved its next attempt (a request now waits, or a reload).
    pub fn replan(&self, next_attempt: Instant) {
        self.next_attempt_ms
            .store(self.ms(next_attempt), Ordering::SeqCst);
        self.wanted_attempt_ms
            .store(self.ms(next_attempt), Ordering::SeqCst);
    }

    /// Waits until the refresher has been asked for a token (used by the refresher).
    pub async fn demanded(&self) {
        self.demand.notified().await
    }

    /// Asks a failing refresher to retry now (on reload); no effect on a healthy one.
    pub fn retry_failing(&self) {
        self.retry_now.notify_one();
    }

    /// Waits until a reload asks for a retry (used by the refresher).
    pub async fn retry_requested(&self) {
        self.retry_now.notified().await
    }

    /// Waits up to `limit` for a valid token from the attempt in flight, or from one an idle
    /// refresher starts on demand. Fails at once when the last attempt failed and no new one is
    /// in flight, and as soon as the awaited attempt fails.
    pub async fn wait_for_header(&self, limit: Duration) -> Result<HeaderValue, TokenUnavailable> {
        let deadline = Instant::now() + limit;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(h) = self.header_at(Instant::now()) {
                return Ok(h);
            }
            // Tells an idle refresher, or one waiting to retry, that a request waits.
            self.demand.notify_one();
            if self.failing.load(Ordering::SeqCst) && !self.fetching.load(Ordering::SeqCst) {
                // Wait for the retry only if it starts before our deadline. Told that a request
                // waits, the refresher starts it by the wanted time, or within DEMAND_SPREAD
                // of now if that has passed.
                let now = Instant::now();
                let wanted = self.at_ms(&self.wanted_attempt_ms).max(now + DEMAND_SPREAD);
                let next = self.at_ms(&self.next_attempt_ms).min(wanted);
                if next >= deadline {
                    let e = (**self.last_error.load()).clone().unwrap_or_default();
                    return Err(self.unavailable(format!(
                        "{e} (next attempt in {:.1} s)",
                        (next - Instant::now()).as_secs_f64()
                    )));
                }
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(self.unavailable(format!(
                    "waited {:.1} s for the token endpoint",
                    limit.as_secs_f64()
                )));
            }
            // The attempt we waited for has ended: a token, or its failure, at once.
            if let Some(h) = self.header_at(Instant::now()) {
                return Ok(h);
            }
            if let Some(e) = &**self.last_error.load() {
                return Err(self.unavailable(e.clone()));
            }
        }
    }

    fn unavailable(&self, why: String) -> TokenUnavailable {
        let last = (**self.last_error.load()).clone();
        let why = match last {
            Some(e) if !why.contains(&e) => format!("{why}; last error: {e}"),
            _ => why,
        };
        TokenUnavailable(format!(
            "no valid token for credential {}: {why}",
            self.name
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn token(valid_for: Duration) -> Token {
        Token::new(&Secret::new("t"), Instant::now() + valid_for, valid_for).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn expired_token_is_never_handed_out() {
        let slot = TokenSlot::new("c");
        let copied = |now| slot.with_header_at(now, <[u8]>::to_vec);
        assert!(slot.header_at(Instant::now()).is_none());
        assert!(copied(Instant::now()).is_none());
        assert_eq!(
            slot.status(Instant::now()),
            (SlotState::Pending, None, None)
        );
        slot.store(token(Duration::from_secs(10)));
        assert!(slot.header_at(Instant::now()).is_some());
        let in_4s = Instant::now() + Duration::from_secs(4);
        let valid = (SlotState::Valid, Some(Duration::from_secs(6)), None);
        assert_eq!(slot.status(in_4s), valid);
        assert_eq!(copied(Instant::now()).as_deref(), Some(&b"Bearer t"[..]));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(slot.header_at(Instant::now()).is_none());
        assert!(copied(Instant::now()).is_none());
        let expired = (SlotState::Expired, Some(Duration::ZERO), None);
        assert_eq!(slot.status(Instant::now()), expired);
    }

    #[tokio::test(start_paused = true)]
    async fn waiter_gets_the_stored_token_or_the_failure() {
        let slot = Arc::new(TokenSlot::new("c"));
        let s = slot.clone();
        let waiter = tokio::spawn(async move { s.wait_for_header(Duration::from_secs(5)).await });
        slot.demanded().await;
        slot.store(token(Duration::from_secs(60)));
        assert!(waiter.await.unwrap().is_ok());

        let empty = Arc::new(TokenSlot::new("d"));
        let s = empty.clone();
        let waiter = tokio::spawn(async move { s.wait_for_header(Duration::from_secs(5)).await });
        empty.demanded().await;
        empty.begin_attempt();
        empty.record_failure(
            "HTTP 401 invalid_client".into(),
            Instant::now() + Duration::from_secs(60),
            Instant::now() + Duration::from_secs(60),
        );
        let e = waiter.await.unwrap().unwrap_err().to_string();
        assert!(
            e.contains("invalid_client") && e.contains("credential d"),
            "{e}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_failure_waiters_fail_fast_until_the_next_attempt_starts() {
        let slot = Arc::new(TokenSlot::new("c"));
        slot.begin_attempt();
        slot.record_failure(
            "connection refused".into(),
            Instant::now() + Duration::from_secs(60),
            Instant::now() + Duration::from_secs(60),
        );
        let started = Instant::now();
        let e = slot
            .wait_for_header(Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("connection refused"), "{e}");
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "answered without waiting"
        );

        slot.begin_attempt();
        let s = slot.clone();
        let waiter = tokio::spawn(async move { s.wait_for_header(Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        slot.store(token(Duration::from_secs(60)));
        assert!(
            waiter.await.unwrap().is_ok(),
            "waited for the attempt in flight"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn invalidation_retires_only_the_exact_token_and_is_rate_limited() {
        let slot = TokenSlot::new("c");
        // Not at once: the interval is counted from the last invalidation, not from the start.
        tokio::time::advance(Duration::from_secs(10)).await;
        slot.store(token(Duration::from_secs(60)));
        let used = slot.header_at(Instant::now()).unwrap();
        assert!(slot.invalidate(used.as_bytes()));
        assert!(slot.header_at(Instant::now()).is_none(), "retired");
        assert!(
            slot.invalidate(used.as_bytes()),
            "already retired: waiting helps"
        );
        slot.store(
            Token::new(
                &Secret::new("t2"),
                Instant::now() + Duration::from_secs(60),
                Duration::from_secs(60),
            )
            .unwrap(),
        );
        assert!(
            slot.invalidate(used.as_bytes()),
            "a newer token is not touched"
        );
        assert!(slot.header_at(Instant::now()).is_some());
        let newer = slot.header_at(Instant::now()).unwrap();
        assert!(
            !slot.invalidate(newer.as_bytes()),
            "rate limited within the interval"
        );
        assert!(slot.header_at(Instant::now()).is_some());
        tokio::time::advance(INVALIDATE_INTERVAL).await;
        assert!(slot.invalidate(newer.as_bytes()));
        assert!(slot.header_at(Instant::now()).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn waiter_gives_up_after_the_limit() {
        let slot = TokenSlot::new("c");
        let e = slot
            .wait_for_header(Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("waited 2.0 s"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn fetches_are_counted_by_outcome_and_attempts_tracked() {
        let slot = TokenSlot::new("c");
        assert!(slot.fetch_counts().is_empty());
        for outcome in ["ok", "http_401", "ok"] {
            slot.count_fetch(outcome);
        }
        let want = [("http_401".to_string(), 1), ("ok".to_string(), 2)];
        assert_eq!(slot.fetch_counts(), want);
        assert!(!slot.is_fetching());
        slot.begin_attempt();
        assert!(slot.is_fetching());
        slot.store(token(Duration::from_secs(60)));
        assert!(!slot.is_fetching());
    }

    /// The answer names the credential and the last error once, and how long until the next
    /// attempt: what a client reads in its `503`.
    #[tokio::test(start_paused = true)]
    async fn an_unavailable_token_is_explained_exactly() {
        let slot = TokenSlot::new("c");
        slot.begin_attempt();
        let at = Instant::now() + Duration::from_secs(60);
        slot.record_failure("connection refused".into(), at, at);
        let e = slot.wait_for_header(Duration::from_secs(5)).await;
        assert_eq!(
            e.unwrap_err().to_string(),
            "no valid token for credential c: connection refused (next attempt in 60.0 s)"
        );
        slot.begin_attempt();
        let e = slot.wait_for_header(Duration::from_secs(2)).await;
        assert_eq!(
            e.unwrap_err().to_string(),
            "no valid token for credential c: waited 2.0 s for the token endpoint; \
             last error: connection refused"
        );
    }

    /// Told that a request waits, the refresher retries within DEMAND_SPREAD of now even when
    /// its wanted time has passed: a request waits for that only if its deadline is later.
    #[tokio::test(start_paused = true)]
    async fn a_waiter_counts_on_a_demanded_retry_only_within_its_deadline() {
        let slot = Arc::new(TokenSlot::new("c"));
        slot.begin_attempt();
        let now = Instant::now();
        slot.record_failure("HTTP 503".into(), now + Duration::from_secs(60), now);
        tokio::time::advance(Duration::from_secs(1)).await;
        let short = DEMAND_SPREAD - Duration::from_secs(1);
        let e = slot.wait_for_header(short).await.unwrap_err().to_string();
        assert!(e.ends_with("HTTP 503 (next attempt in 5.0 s)"), "{e}");

        let s = slot.clone();
        let waiter = tokio::spawn(async move { s.wait_for_header(DEMAND_SPREAD * 2).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished(), "waits for the retry");
        slot.begin_attempt();
        slot.store(token(Duration::from_secs(60)));
        assert!(waiter.await.unwrap().is_ok());
    }

    /// The names `/readyz` reports, as README lists them.
    #[test]
    fn states_have_their_readyz_names() {
        let names =
            [SlotState::Pending, SlotState::Valid, SlotState::Expired].map(SlotState::as_str);
        assert_eq!(names, ["pending", "valid", "expired"]);
    }

    /// An invalidation in the slot's very first millisecond starts the interval too (its
    /// time is stored one more than the milliseconds since the slot was made: 0 means never).
    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_holds_from_the_slots_first_millisecond() {
        let slot = TokenSlot::new("c");
        slot.store(token(Duration::from_secs(60)));
        let used = slot.header_at(Instant::now()).unwrap();
        assert!(slot.invalidate(used.as_bytes()));
        let newer = Token::new(
            &Secret::new("t2"),
            Instant::now() + Duration::from_secs(60),
            Duration::from_secs(60),
        );
        slot.store(newer.unwrap());
        let newer = slot.header_at(Instant::now()).unwrap();
        assert!(!slot.invalidate(newer.as_bytes()), "rate limited");
        assert!(slot.header_at(Instant::now()).is_some());
    }
}
