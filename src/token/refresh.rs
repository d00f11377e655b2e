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
use super::source::{TokenError, TokenSource};
use super::Token;

/// Smallest wait between two attempts, also when requests are waiting for a token.
pub const MIN_RETRY: Duration = Duration::from_secs(1);
/// Largest wait between two attempts after repeated failures.
pub const MAX_BACKOFF: Duration = Duration::from_secs(120);
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
pub fn retry_in(failures: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
    let cap = MIN_RETRY
        .saturating_mul(1u32 << failures.min(16))
        .min(MAX_BACKOFF);
    let backoff = cap.mul_f64(jitter.clamp(0.0, 1.0)).max(MIN_RETRY);
    match retry_after {
        Some(r) => backoff.max(r.min(Duration::from_secs(3600))),
        None => backoff,
    }
}

/// Keeps `slot` filled with a valid token from `source` until `cancel` fires.
pub async fn run(
    source: Arc<TokenSource>,
    slot: Arc<TokenSlot>,
    refresh_before: Duration,
    cancel: CancellationToken,
) {
    let mut failures: u32 = 0;
    let mut last_attempt: Option<Instant> = None;
    let mut next = Instant::now();
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
                    next = fail(&slot, &e, failures);
                    continue;
                };
                slot.store(token);
                failures = 0;
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
                next = fail(&slot, &e, failures);
            }
        }
    }
}

/// Records and logs a failed attempt; returns when to try again.
fn fail(slot: &TokenSlot, e: &TokenError, failures: u32) -> Instant {
    let delay = retry_in(failures, e.retry_after(), fastrand::f64());
    let now = Instant::now();
    let valid_left = slot
        .current()
        .filter(|t| t.is_valid_at(now))
        .map(|t| t.expires_at() - now);
    match valid_left {
        Some(left) => warn!(
            error = %e,
            failures,
            retry_in_secs = delay.as_secs_f64(),
            current_token_valid_for_secs = left.as_secs_f64(),
            "token refresh failed; still serving the current token"
        ),
        None => error!(
            error = %e,
            failures,
            retry_in_secs = delay.as_secs_f64(),
            "token refresh failed and no valid token is held; requests get 503 token_unavailable"
        ),
    }
    slot.record_failure(e.to_string());
    debug!(
        retry_in_secs = delay.as_secs_f64(),
        "next token attempt scheduled"
    );
    now + delay
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(retry_in(1, None, 0.0), MIN_RETRY);
        assert_eq!(retry_in(1, None, 1.0), S(2));
        assert_eq!(retry_in(3, None, 1.0), S(8));
        assert_eq!(retry_in(30, None, 1.0), MAX_BACKOFF);
        assert_eq!(retry_in(1, Some(S(30)), 0.5), S(30));
        assert_eq!(retry_in(1, Some(S(99_999)), 0.5), S(3600));
    }
}
