//! When to fetch tokens, as pure functions, and the small loop that applies them.
//!
//! A token is refreshed `refresh_before` ahead of its expiry, a lead capped at half the
//! lifetime (so an hour-long token is refreshed 5 minutes before expiry and a 4-second token
//! after about 2 s) and never shorter than twice the early-expiry margin, spread earlier by up
//! to 10 % so that many proxies started together do not hit the identity provider together.
//! The request path stops using a token `skew` before its stated expiry, which absorbs clock
//! skew and the time the response spent in transit. Failures back off exponentially with full
//! jitter and honour `Retry-After`; the current token keeps being served while it is valid.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use super::slot::TokenSlot;
use super::source::{Fetched, TokenError, TokenSource};
use super::Token;

/// Smallest wait between two attempts, also when requests are waiting for a token.
pub const MIN_RETRY: Duration = Duration::from_secs(1);
/// Largest wait between two attempts after repeated failures.
pub const MAX_BACKOFF: Duration = Duration::from_secs(120);
/// Smallest wait between retries racing a valid token's expiry.
pub const MIN_RETRY_BEFORE_EXPIRY: Duration = Duration::from_millis(200);
/// Smallest wait after a permanent error (wrong secret, scope, client): a person must act.
pub const PERMANENT_RETRY: Duration = Duration::from_secs(60);
/// Largest early-expiry margin.
pub const MAX_SKEW: Duration = Duration::from_secs(30);

/// How much earlier than stated a token of this lifetime is treated as expired.
pub fn skew(lifetime: Duration) -> Duration {
    (lifetime / 10).min(MAX_SKEW)
}

/// When a token requested at `requested_at` with `lifetime` must no longer be sent.
pub fn usable_until(requested_at: Instant, lifetime: Duration) -> Instant {
    requested_at + lifetime - skew(lifetime)
}

/// Delay from the token request until the next refresh; `jitter` is uniform in `[0, 1)`.
pub fn refresh_in(lifetime: Duration, refresh_before: Duration, jitter: f64) -> Duration {
    // Twice the skew is at most a fifth of the lifetime, so the lead stays within half of it.
    let ahead = refresh_before.min(lifetime / 2).max(skew(lifetime) * 2);
    let at = lifetime - ahead;
    at - at.mul_f64(0.1 * jitter.clamp(0.0, 1.0))
}

/// Delay before retry number `failures` (1 for the first), full jitter between
/// [`MIN_RETRY`] and an exponentially growing cap; at least `retry_after` when given.
pub fn retry_in(
    failures: u32,
    retry_after: Option<Duration>,
    permanent: bool,
    jitter: f64,
) -> Duration {
    let cap = MIN_RETRY
        .saturating_mul(1u32 << failures.min(16))
        .min(MAX_BACKOFF);
    let mut backoff = cap.mul_f64(jitter.clamp(0.0, 1.0)).max(MIN_RETRY);
    if permanent {
        backoff = backoff.max(PERMANENT_RETRY);
    }
    match retry_after {
        Some(r) => backoff.max(r.min(Duration::from_secs(3600))),
        None => backoff,
    }
}

/// Where the refresher gets tokens: the token endpoint, or a script in tests.
pub trait FetchToken: Send + Sync + 'static {
    /// The credential's name, for logs.
    fn name(&self) -> &str;
    /// One token request.
    fn fetch(&self) -> impl std::future::Future<Output = Result<Fetched, TokenError>> + Send;
}

impl FetchToken for TokenSource {
    fn name(&self) -> &str {
        TokenSource::name(self)
    }
    fn fetch(&self) -> impl std::future::Future<Output = Result<Fetched, TokenError>> + Send {
        TokenSource::fetch(self)
    }
}

/// Keeps `slot` filled with a valid token from `source` until `cancel` fires.
pub async fn run<S: FetchToken>(
    source: Arc<S>,
    slot: Arc<TokenSlot>,
    refresh_before: Duration,
    cancel: CancellationToken,
) {
    let mut failures: u32 = 0;
    let mut last_attempt: Option<Instant> = None;
    let mut next = Instant::now();
    // The last error logged at warn/error; repeats of it are logged at debug.
    let mut last_logged: Option<String> = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = sleep_until(next) => {}
            _ = slot.demanded() => {
                // A request found no valid token. After failures the backoff (and any
                // Retry-After) decides; otherwise try now, never faster than MIN_RETRY.
                let now = Instant::now();
                if failures > 0 || slot.header_at(now).is_some() {
                    continue;
                }
                let earliest = last_attempt.map_or(now, |t| t + MIN_RETRY);
                if earliest > now {
                    next = next.min(earliest);
                    continue;
                }
            }
        }
        last_attempt = Some(Instant::now());
        slot.begin_attempt();
        let span = tracing::info_span!("refresh", credential = %source.name());
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = source.fetch().instrument(span.clone()) => r,
        };
        let _entered = span.enter();
        match result {
            Ok(fetched) => {
                let expires_at = usable_until(fetched.requested_at, fetched.lifetime);
                let Some(token) = Token::new(&fetched.access_token, expires_at, fetched.lifetime)
                else {
                    failures += 1;
                    let e = TokenError::InvalidResponse(
                        "access_token holds characters not allowed in a header".into(),
                    );
                    next = fail(&slot, &e, failures, &mut last_logged);
                    continue;
                };
                slot.count_fetch("ok");
                slot.store(token);
                failures = 0;
                last_logged = None;
                let delay = refresh_in(fetched.lifetime, refresh_before, fastrand::f64());
                next = fetched.requested_at + delay;
                info!(
                    lifetime_secs = fetched.lifetime.as_secs_f64(),
                    next_refresh_in_secs = (next - Instant::now()).as_secs_f64(),
                    "token refreshed"
                );
            }
            Err(e) => {
                failures += 1;
                next = fail(&slot, &e, failures, &mut last_logged);
            }
        }
    }
}

/// Records and logs a failed attempt; returns when to try again. A new error is logged at
/// `warn` while a valid token is still served and at `error` otherwise; a permanent error
/// repeated unchanged is logged at `debug`, so a wrong secret is one line, not one a minute.
fn fail(
    slot: &TokenSlot,
    e: &TokenError,
    failures: u32,
    last_logged: &mut Option<String>,
) -> Instant {
    let permanent = e.is_permanent();
    let mut delay = retry_in(failures, e.retry_after(), permanent, fastrand::f64());
    let now = Instant::now();
    let valid_left = slot
        .current()
        .filter(|t| t.is_valid_at(now))
        .map(|t| t.expires_at() - now);
    if let (Some(left), false, None) = (valid_left, permanent, e.retry_after()) {
        // A transient failure with a token still valid: retry while it still is, if possible.
        delay = delay.min((left / 2).max(MIN_RETRY_BEFORE_EXPIRY));
    }
    slot.count_fetch(&e.outcome());
    let text = e.to_string();
    let retry_in_secs = delay.as_secs_f64();
    // Compare by kind, not text: Azure puts a fresh trace id and timestamp in every answer.
    let key = e.kind_key();
    if permanent && last_logged.as_deref() == Some(key.as_str()) {
        debug!(error = %text, failures, retry_in_secs, "token refresh failed again");
    } else {
        match valid_left {
            Some(left) => warn!(
                error = %text,
                failures,
                permanent,
                retry_in_secs,
                current_token_valid_for_secs = left.as_secs_f64(),
                "token refresh failed; still serving the current token"
            ),
            None => error!(
                error = %text,
                failures,
                permanent,
                retry_in_secs,
                "token refresh failed and no valid token is held; requests get 503 token_unavailable"
            ),
        }
    }
    *last_logged = Some(key);
    slot.record_failure(text, now + delay);
    now + delay
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use std::sync::Mutex;

    /// Answers token requests from a script and records when each was made.
    struct Script {
        answers: Mutex<std::collections::VecDeque<Result<Duration, TokenError>>>,
        calls: Mutex<Vec<Instant>>,
    }

    impl Script {
        fn new(answers: Vec<Result<Duration, TokenError>>) -> Arc<Self> {
            Arc::new(Script {
                answers: Mutex::new(answers.into()),
                calls: Mutex::default(),
            })
        }
        fn calls(&self, since: Instant) -> Vec<f64> {
            self.calls
                .lock()
                .unwrap()
                .iter()
                .map(|t| (*t - since).as_secs_f64())
                .collect()
        }
    }

    impl FetchToken for Script {
        fn name(&self) -> &str {
            "script"
        }
        async fn fetch(&self) -> Result<Fetched, TokenError> {
            let now = Instant::now();
            self.calls.lock().unwrap().push(now);
            let answer = self
                .answers
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(Ok(S(3600)));
            answer.map(|lifetime| Fetched {
                access_token: Secret::new("t"),
                lifetime,
                requested_at: now,
            })
        }
    }

    fn rejected(status: u16, retry_after: Option<u64>) -> TokenError {
        TokenError::Rejected {
            status,
            detail: String::new(),
            oauth: None,
            retry_after: retry_after.map(S),
        }
    }

    /// Runs the refresher on `script` for `secs` of paused time; the attempt times.
    async fn attempts(script: &Arc<Script>, slot: &Arc<TokenSlot>, secs: u64) -> Vec<f64> {
        let t0 = Instant::now();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(script.clone(), slot.clone(), S(300), cancel.clone()));
        tokio::time::sleep(S(secs)).await;
        cancel.cancel();
        task.await.unwrap();
        script.calls(t0)
    }

    #[tokio::test(start_paused = true)]
    async fn short_tokens_are_refreshed_before_they_expire() {
        let script = Script::new((0..10).map(|_| Ok(S(2))).collect());
        let slot = Arc::new(TokenSlot::new("c"));
        let t0 = Instant::now();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(script.clone(), slot.clone(), S(300), cancel.clone()));
        // Check every 10 ms for 6 s that a valid token is held.
        let mut gaps = 0;
        for _ in 0..600 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            gaps += usize::from(slot.header_at(Instant::now()).is_none());
        }
        cancel.cancel();
        task.await.unwrap();
        assert_eq!(gaps, 0, "instants without a valid token");
        let calls = script.calls(t0);
        assert!(calls.len() >= 6, "{calls:?}");
        for pair in calls.windows(2) {
            let gap = pair[1] - pair[0];
            assert!((0.9..=1.0).contains(&gap), "refresh gap {gap} s: {calls:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_and_keep_the_current_token() {
        let script = Script::new(vec![
            Ok(S(600)),
            Err(rejected(500, None)),
            Err(rejected(500, None)),
            Ok(S(600)),
        ]);
        let slot = Arc::new(TokenSlot::new("c"));
        let calls = attempts(&script, &slot, 330).await;
        // Refresh due at 300 s minus jitter; then two retries a few seconds apart, then success.
        assert_eq!(calls.len(), 4, "{calls:?}");
        assert!(calls[1] >= 270.0 && calls[1] <= 300.0, "{calls:?}");
        assert!(
            calls[2] - calls[1] >= 1.0 && calls[2] - calls[1] <= 2.0,
            "{calls:?}"
        );
        assert!(
            calls[3] - calls[2] >= 1.0 && calls[3] - calls[2] <= 4.0,
            "{calls:?}"
        );
        assert!(slot.header_at(Instant::now()).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_and_permanent_errors_slow_the_retries() {
        let script = Script::new(vec![
            Err(rejected(429, Some(30))),
            Err(rejected(401, None)),
            Ok(S(600)),
        ]);
        let slot = Arc::new(TokenSlot::new("c"));
        let calls = attempts(&script, &slot, 200).await;
        assert_eq!(calls.len(), 3, "{calls:?}");
        assert!(calls[1] >= 30.0, "Retry-After honoured: {calls:?}");
        assert!(
            calls[2] - calls[1] >= 60.0,
            "a permanent error waits a minute: {calls:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_requests_do_not_override_the_backoff() {
        let script = Script::new(vec![Err(rejected(503, Some(20))), Ok(S(600))]);
        let slot = Arc::new(TokenSlot::new("c"));
        let t0 = Instant::now();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(script.clone(), slot.clone(), S(300), cancel.clone()));
        // Requests keep arriving during the Retry-After window; each is answered at once.
        for _ in 0..10 {
            tokio::time::sleep(S(1)).await;
            assert!(slot.wait_for_header(S(5)).await.is_err());
        }
        tokio::time::sleep(S(15)).await;
        cancel.cancel();
        task.await.unwrap();
        let calls = script.calls(t0);
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert!(calls[1] >= 20.0, "{calls:?}");
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn refreshes_five_minutes_ahead_for_hour_tokens() {
        assert_eq!(refresh_in(S(3599), S(300), 0.0), S(3299));
        let jittered = refresh_in(S(3599), S(300), 0.999);
        assert!(jittered < S(3299) && jittered > S(2960), "{jittered:?}");
    }

    #[test]
    fn short_tokens_refresh_half_way() {
        assert_eq!(refresh_in(S(2), S(300), 0.0), S(1));
        assert_eq!(refresh_in(S(30), S(300), 0.0), S(15));
        assert!(refresh_in(S(2), S(300), 1.0) >= Duration::from_millis(900));
    }

    #[test]
    fn refresh_always_comes_before_early_expiry() {
        for secs in [1u64, 2, 5, 30, 600, 3599, 86_400] {
            let lifetime = S(secs);
            let t0 = Instant::now();
            assert!(
                t0 + refresh_in(lifetime, S(300), 0.0) < usable_until(t0, lifetime),
                "{secs}"
            );
        }
    }

    #[test]
    fn skew_is_a_tenth_capped_at_thirty_seconds() {
        assert_eq!(skew(S(2)), Duration::from_millis(200));
        assert_eq!(skew(S(3599)), S(30));
    }

    #[test]
    fn backoff_grows_is_capped_and_honours_retry_after() {
        assert_eq!(retry_in(1, None, false, 0.0), MIN_RETRY);
        assert_eq!(retry_in(1, None, false, 1.0), S(2));
        assert_eq!(retry_in(3, None, false, 1.0), S(8));
        assert_eq!(retry_in(30, None, false, 1.0), MAX_BACKOFF);
        assert_eq!(retry_in(1, Some(S(30)), false, 0.5), S(30));
        assert_eq!(retry_in(1, Some(S(99_999)), false, 0.5), S(3600));
    }

    #[test]
    fn permanent_errors_wait_at_least_a_minute() {
        assert_eq!(retry_in(1, None, true, 0.0), PERMANENT_RETRY);
        assert_eq!(retry_in(30, None, true, 1.0), MAX_BACKOFF);
    }
}
