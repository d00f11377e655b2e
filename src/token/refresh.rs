//! The refresher: one task per credential, the only thing that requests its tokens.
//!
//! It applies the policy of [`super::schedule`]: refresh ahead of expiry, retry failures
//! with a spread backoff, honour `Retry-After`, and shorten the wait (never below a few
//! seconds) once requests are waiting for a token. The current token keeps being served while
//! it is valid, and a reload retries a failing credential at once.

use std::sync::Arc;

use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use super::schedule::{self, Failure, DEMAND_SPREAD, MIN_RETRY};
use super::slot::TokenSlot;
use super::source::{Fetched, TokenError, TokenSource};
use super::Token;

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

/// A failed attempt the refresher is waiting to retry.
#[derive(Debug)]
struct Pending {
    /// When the attempt ended.
    failed_at: Instant,
    /// The retry plan, counted from `failed_at`.
    retry: schedule::Retry,
    /// Where in [`DEMAND_SPREAD`] a late first waiting request puts the attempt.
    demand_jitter: f64,
    /// A request has already waited since the failure, so `retry.wanted` applies.
    wanted: bool,
}

impl Pending {
    /// The attempt time once a request waits, the first time one does.
    fn on_demand(&mut self, now: Instant) -> Option<Instant> {
        if std::mem::replace(&mut self.wanted, true) {
            return None;
        }
        let spread = DEMAND_SPREAD.mul_f64(self.demand_jitter);
        Some((self.failed_at + self.retry.wanted).max(now + spread))
    }
}

/// Keeps `slot` filled with a valid token from `source` until `cancel` fires.
pub async fn run<S: FetchToken>(
    source: Arc<S>,
    slot: Arc<TokenSlot>,
    refresh_before: std::time::Duration,
    cancel: CancellationToken,
) {
    let mut failures: u32 = 0;
    let mut last_attempt: Option<Instant> = None;
    let mut pending: Option<Pending> = None;
    // The first request goes at once: readiness waits for it.
    let mut next = Instant::now();
    // The last error logged at warn/error; repeats of it are logged at debug.
    let mut last_logged: Option<String> = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = sleep_until(next) => {}
            _ = slot.demanded() => {
                // A request found no valid token.
                let now = Instant::now();
                if slot.header_at(now).is_some() {
                    continue;
                }
                let at = match pending.as_mut() {
                    // After a failure: the shorter plan for waiting requests, once.
                    Some(p) => match p.on_demand(now) {
                        Some(at) => at,
                        None => continue,
                    },
                    // A token retired after a 401: now, but one request a second at most.
                    None => last_attempt.map_or(now, |t| t + MIN_RETRY),
                };
                if at < next {
                    next = at;
                    slot.replan(next);
                }
                if next > now {
                    continue;
                }
            }
            _ = slot.retry_requested() => {
                // A reload: an operator may have fixed what failed. Retry now, from a fresh
                // backoff, but never before a Retry-After.
                let Some(p) = pending.as_mut() else { continue };
                let now = Instant::now();
                let earliest = last_attempt.map_or(now, |t| t + MIN_RETRY);
                next = now.max(earliest).max(p.failed_at + p.retry.not_before);
                p.wanted = true;
                failures = 0;
                slot.replan(next);
                info!(
                    credential = %source.name(),
                    retry_in_secs = (next - now).as_secs_f64(),
                    "reload: retrying the failing credential"
                );
                if next > now {
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
        let e = match result {
            Ok(fetched) => {
                let expires_at = schedule::usable_until(fetched.requested_at, fetched.lifetime);
                match Token::new(&fetched.access_token, expires_at, fetched.lifetime) {
                    Some(token) => {
                        slot.count_fetch("ok");
                        slot.store(token);
                        failures = 0;
                        pending = None;
                        last_logged = None;
                        let delay =
                            schedule::refresh_in(fetched.lifetime, refresh_before, fastrand::f64());
                        next = fetched.requested_at + delay;
                        info!(
                            lifetime_secs = fetched.lifetime.as_secs_f64(),
                            next_refresh_in_secs = (next - Instant::now()).as_secs_f64(),
                            "token refreshed"
                        );
                        continue;
                    }
                    None => TokenError::InvalidResponse(
                        "access_token holds characters not allowed in a header".into(),
                    ),
                }
            }
            Err(e) => e,
        };
        failures += 1;
        let p = fail(&slot, &e, failures, &mut last_logged);
        next = p.failed_at + p.retry.idle;
        pending = Some(p);
    }
}

/// Records and logs a failed attempt; returns the plan for the retry. A new error is logged at
/// `warn` while a valid token is still served and at `error` otherwise; a permanent error
/// repeated unchanged is logged at `debug`, so a wrong secret is one line, not one a minute.
fn fail(
    slot: &TokenSlot,
    e: &TokenError,
    failures: u32,
    last_logged: &mut Option<String>,
) -> Pending {
    let now = Instant::now();
    let valid_left = slot
        .current()
        .filter(|t| t.is_valid_at(now))
        .map(|t| t.expires_at() - now);
    let permanent = e.is_permanent();
    let failure = Failure {
        failures,
        retry_after: e.retry_after(),
        permanent,
        valid_left,
    };
    let retry = schedule::retry_in(&failure, fastrand::f64());
    slot.count_fetch(&e.outcome());
    let text = e.to_string();
    let retry_in_secs = retry.idle.as_secs_f64();
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
    slot.record_failure(text, now + retry.idle, now + retry.wanted);
    Pending {
        failed_at: now,
        retry,
        demand_jitter: fastrand::f64(),
        wanted: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use std::sync::Mutex;
    use std::time::Duration;

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

    /// A refresher running on a script, with the slot it fills and when it started.
    struct Running {
        slot: Arc<TokenSlot>,
        t0: Instant,
        cancel: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    /// Starts the refresher on `script` with `refresh_before`, in a fresh slot.
    fn start(script: &Arc<Script>, refresh_before: Duration) -> Running {
        let slot = Arc::new(TokenSlot::new("c"));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(
            script.clone(),
            slot.clone(),
            refresh_before,
            cancel.clone(),
        ));
        Running {
            slot,
            t0: Instant::now(),
            cancel,
            task,
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

    const S: fn(u64) -> Duration = Duration::from_secs;

    /// Waits (paused clock) until the script has seen `n` calls; panics after `limit`.
    async fn until_calls(script: &Script, n: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while script.calls.lock().unwrap().len() < n {
            assert!(
                Instant::now() < deadline,
                "only {:?} calls",
                script.calls(deadline - limit)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn short_tokens_are_refreshed_before_they_expire() {
        let script = Script::new((0..10).map(|_| Ok(S(2))).collect());
        let Running {
            slot,
            t0,
            cancel,
            task,
        } = start(&script, S(300));
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
        assert!(calls.len() >= 5, "{calls:?}");
        for pair in calls.windows(2) {
            let gap = pair[1] - pair[0];
            // 1 s plus up to a tenth of jitter; the timer rounds to the millisecond, and the
            // difference of two rounded times in f64 can land just outside [1.0, 1.1].
            assert!(
                (0.999..=1.101).contains(&gap),
                "refresh gap {gap} s: {calls:?}"
            );
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
        // Refresh due at 300 s, spread up to 10 % later; then retries after 3-9 s and 6-18 s:
        // the last comes by 330 + 9 + 18 = 357 s at the latest (the spreads are random, so a
        // shorter look missed it now and then), and the next refresh of the new 600 s token
        // long after.
        let calls = attempts(&script, &slot, 360).await;
        assert_eq!(calls.len(), 4, "{calls:?}");
        assert!((300.0..=330.0).contains(&calls[1]), "{calls:?}");
        assert!((3.0..=9.0).contains(&(calls[2] - calls[1])), "{calls:?}");
        assert!((6.0..=18.0).contains(&(calls[3] - calls[2])), "{calls:?}");
        assert!(slot.header_at(Instant::now()).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn retries_race_the_expiry_a_few_seconds_apart() {
        // One 60 s token (usable for 54 s), then the endpoint fails for good.
        let mut answers = vec![Ok(S(60))];
        answers.extend((0..100).map(|_| Err(rejected(500, None))));
        let script = Script::new(answers);
        let slot = Arc::new(TokenSlot::new("c"));
        // Past the expiry too: the attempt after the last one before it shows that wait.
        let calls = attempts(&script, &slot, 54 + 40).await;
        let before_expiry: Vec<f64> = calls.iter().copied().filter(|t| *t < 54.0).collect();
        // Each wait after a failure with the token still valid is at most half the time it
        // had left (but 3 s at least). Without that rule the wait after the last failure
        // before the expiry outlasts the time left, so this check cannot pass by chance.
        for pair in calls.windows(2).skip(1).filter(|p| p[0] < 54.0) {
            let half_left = ((54.0 - pair[0]) / 2.0).max(3.0);
            assert!(
                pair[1] - pair[0] <= half_left + 0.001,
                "a retry at {} s waited over half the {} s left: {calls:?}",
                pair[0],
                54.0 - pair[0]
            );
        }
        let last = *before_expiry.last().unwrap();
        assert!(
            last >= 48.0,
            "an attempt in the token's last 6 s: {calls:?}"
        );
        for pair in calls.windows(2).skip(1) {
            assert!(
                pair[1] - pair[0] >= 3.0,
                "retries 3 s apart at least: {calls:?}"
            );
        }
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
        assert!(
            (30.0..=37.5).contains(&calls[1]),
            "Retry-After, spread: {calls:?}"
        );
        assert!(
            (60.0..=75.0).contains(&(calls[2] - calls[1])),
            "a permanent error waits a minute: {calls:?}"
        );
    }

    /// A writer for a test's log, kept in memory.
    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Log {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A wrong secret is one line, not one a minute: a permanent error repeated unchanged is
    /// logged at debug; a different one, or the same after a success, is news again.
    #[tokio::test(start_paused = true)]
    async fn a_repeated_permanent_error_is_logged_at_debug() {
        let script = Script::new(vec![
            Err(rejected(401, None)),
            Err(rejected(401, None)),
            Err(rejected(401, None)),
            Err(rejected(400, None)),
            Ok(S(600)),
            Err(rejected(400, None)),
        ]);
        let log = Log::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .without_time()
            .with_writer(move || writer.clone())
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);
        let slot = Arc::new(TokenSlot::new("c"));
        // Permanent errors are retried a minute apart; the 600 s token is refreshed at 300 s.
        let calls = attempts(&script, &slot, 4 * 75 + 340).await;
        assert!(calls.len() >= 6, "{calls:?}");
        let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        let failures: Vec<(&str, &str)> = text
            .lines()
            .filter(|l| l.contains("token refresh failed"))
            .map(|l| {
                let level = l.split_whitespace().next().unwrap();
                // By "HTTP <status>": a bare "401" can turn up in the random retry time.
                let status = ["401", "400"]
                    .into_iter()
                    .find(|s| l.contains(&format!("HTTP {s}")))
                    .unwrap_or("?");
                (level, status)
            })
            .collect();
        assert_eq!(
            failures,
            [
                ("ERROR", "401"),
                ("DEBUG", "401"),
                ("DEBUG", "401"),
                ("ERROR", "400"),
                ("WARN", "400"),
            ],
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_requests_do_not_override_retry_after() {
        let script = Script::new(vec![Err(rejected(503, Some(20))), Ok(S(600))]);
        let Running {
            slot,
            t0,
            cancel,
            task,
        } = start(&script, S(300));
        // Requests keep arriving during the Retry-After window; each is answered at once
        // (waiting up to 10 s could not reach the retry).
        for _ in 0..10 {
            tokio::time::sleep(S(1)).await;
            let asked = Instant::now();
            assert!(slot.wait_for_header(S(10)).await.is_err());
            assert_eq!(asked.elapsed(), Duration::ZERO);
        }
        tokio::time::sleep(S(20)).await;
        cancel.cancel();
        task.await.unwrap();
        let calls = script.calls(t0);
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert!((20.0..=25.0).contains(&calls[1]), "{calls:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_requests_cap_a_long_backoff_at_9_s() {
        // Five failures with nobody waiting grow the backoff to 40-120 s.
        let mut answers: Vec<_> = (0..5).map(|_| Err(rejected(500, None))).collect();
        answers.extend([Err(rejected(500, None)), Ok(S(600))]);
        let script = Script::new(answers);
        let Running {
            slot,
            t0,
            cancel,
            task,
        } = start(&script, S(300));
        until_calls(&script, 5, S(400)).await;
        let fifth = *script.calls(t0).last().unwrap();
        // A request waits from just after the fifth failure: the next attempt comes within
        // 9 s, not after the backoff; the one after that too.
        tokio::time::sleep(Duration::from_millis(10)).await;
        let asked = Instant::now();
        let first = slot.wait_for_header(S(10)).await;
        assert!(first.is_err(), "the sixth attempt fails");
        assert!(asked.elapsed() <= S(9), "{:?}", asked.elapsed());
        let header = slot.wait_for_header(S(10)).await;
        assert!(header.is_ok(), "{header:?}");
        cancel.cancel();
        task.await.unwrap();
        let calls = script.calls(t0);
        assert_eq!(calls.len(), 7, "{calls:?}");
        assert!(calls[5] - fifth <= 9.0, "{calls:?}");
        assert!((3.0..=9.0).contains(&(calls[6] - calls[5])), "{calls:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_first_request_starts_an_attempt_within_the_demand_spread() {
        let mut answers: Vec<_> = (0..4).map(|_| Err(rejected(500, None))).collect();
        answers.push(Ok(S(600)));
        let script = Script::new(answers);
        let Running {
            slot,
            t0,
            cancel,
            task,
        } = start(&script, S(300));
        until_calls(&script, 4, S(200)).await;
        // Long after the fourth failure (backoff 24-72 s), one request arrives and waits.
        let fourth = *script.calls(t0).last().unwrap();
        tokio::time::sleep_until(t0 + Duration::from_secs_f64(fourth) + S(20)).await;
        assert_eq!(script.calls(t0).len(), 4, "the backoff is 24 s at least");
        let asked = Instant::now();
        assert!(slot.wait_for_header(S(10)).await.is_ok());
        assert!(asked.elapsed() <= DEMAND_SPREAD, "{:?}", asked.elapsed());
        cancel.cancel();
        task.await.unwrap();
        assert_eq!(script.calls(t0).len(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_retries_a_failing_credential_at_once_but_not_before_retry_after() {
        let script = Script::new(vec![
            Err(rejected(401, None)),
            Ok(S(600)),
            Err(rejected(429, Some(30))),
            Ok(S(600)),
        ]);
        let Running {
            slot,
            t0,
            cancel,
            task,
        } = start(&script, S(1));
        until_calls(&script, 1, S(1)).await;
        tokio::time::sleep(S(5)).await;
        slot.retry_failing();
        until_calls(&script, 2, S(1)).await;
        assert!(slot.header_at(Instant::now()).is_some());
        // A healthy credential ignores it.
        slot.retry_failing();
        until_calls(&script, 3, S(600)).await;
        let third = *script.calls(t0).last().unwrap();
        slot.retry_failing();
        until_calls(&script, 4, S(60)).await;
        cancel.cancel();
        task.await.unwrap();
        let calls = script.calls(t0);
        assert!((4.999..5.1).contains(&calls[1]), "{calls:?}");
        assert!(
            calls[2] > 480.0,
            "the healthy one refreshed on schedule: {calls:?}"
        );
        assert!(
            (29.999..30.1).contains(&(calls[3] - third)),
            "the reload waits out Retry-After, not its spread: {calls:?}"
        );
    }

    /// A reload within MIN_RETRY of the last attempt plans the retry for MIN_RETRY after it,
    /// and says so to the slot: a request that arrives meanwhile waits for that retry, rather
    /// than failing fast on the old plan (a permanent error's long backoff).
    #[tokio::test(start_paused = true)]
    async fn a_request_after_a_reload_waits_for_the_retry_it_planned() {
        let script = Script::new(vec![Err(rejected(401, None)), Ok(S(600))]);
        let Running {
            slot,
            t0,
            cancel,
            task,
        } = start(&script, S(300));
        until_calls(&script, 1, S(1)).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        slot.retry_failing();
        tokio::time::sleep(Duration::from_millis(1)).await;
        let asked = Instant::now();
        let header = slot.wait_for_header(MIN_RETRY).await;
        assert!(header.is_ok(), "{header:?}");
        assert!(
            asked.elapsed() > Duration::from_millis(500),
            "{:?}",
            asked.elapsed()
        );
        cancel.cancel();
        task.await.unwrap();
        let calls = script.calls(t0);
        assert!((0.999..1.1).contains(&(calls[1] - calls[0])), "{calls:?}");
    }
}
