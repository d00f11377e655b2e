//! When to ask the identity provider for a token, as pure functions of what the refresher
//! knows, so that the policy can be unit-tested and simulated for a whole fleet.
//!
//! The policy is judged at fleet scale: thousands of sidecars share one identity provider, so
//! every wait is spread at random, and no rule lets requests or an approaching expiry make a
//! process ask a failing provider more often than once every few seconds.
//!
//! - **Refresh** `refresh_before` ahead of expiry, a lead capped at half the lifetime and never
//!   shorter than twice the early-expiry margin. A lead of `refresh_before` is spread up to 10 %
//!   earlier; a lead cut to half the lifetime is spread up to 10 % later instead, so a short
//!   token costs at most two requests per lifetime.
//! - **After a failure** the wait is random between a third of a cap and the cap, which starts
//!   at [`FIRST_BACKOFF`] and doubles up to [`MAX_BACKOFF`]. While the current token is still
//!   valid the wait is at most half the time it has left, but never under
//!   [`MIN_RETRY_BEFORE_EXPIRY`]. Once requests are waiting with no valid token, the wait is at
//!   most [`FIRST_BACKOFF`] (3 to 9 s), so a process is back within seconds of the provider.
//! - **`Retry-After`** is a floor, never shortened, with a random spread above it of at least
//!   [`RETRY_AFTER_SPREAD`] (or a quarter of it), so a throttled fleet does not return in step.
//! - **Permanent errors** (a wrong secret) wait [`PERMANENT_RETRY`] to 1.25 times that; waiting
//!   requests do not shorten it: a person must act (a reload retries at once).

use std::time::Duration;

use tokio::time::Instant;

/// Smallest gap between two token requests of one credential.
pub const MIN_RETRY: Duration = Duration::from_secs(1);
/// The cap of the first backoff, and the longest wait between attempts while requests are
/// waiting and no valid token is held.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(9);
/// Largest wait between two attempts after repeated failures.
pub const MAX_BACKOFF: Duration = Duration::from_secs(120);
/// Smallest wait between retries racing a valid token's expiry.
pub const MIN_RETRY_BEFORE_EXPIRY: Duration = Duration::from_secs(3);
/// Smallest wait after a permanent error (wrong secret, scope, client): a person must act.
pub const PERMANENT_RETRY: Duration = Duration::from_secs(60);
/// Smallest random spread above a `Retry-After`.
pub const RETRY_AFTER_SPREAD: Duration = Duration::from_secs(5);
/// Longest `Retry-After` believed.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// When the first request waiting for a token comes long after a failure, the attempt it
/// starts is spread this far at most, so an idle fleet woken by the same traffic spike does
/// not ask a failing provider all at once.
pub const DEMAND_SPREAD: Duration = Duration::from_secs(5);
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
    let jitter = jitter.clamp(0.0, 1.0);
    // Twice the skew is at most a fifth of the lifetime, so the lead stays within half of it.
    let ahead = refresh_before.min(lifetime / 2).max(skew(lifetime) * 2);
    let at = lifetime - ahead;
    if refresh_before >= lifetime / 2 {
        // Refreshing earlier than half-way would cost more than two requests per lifetime;
        // later by a tenth still leaves 35 % of the lifetime before early expiry.
        at + at.mul_f64(0.1 * jitter)
    } else {
        at - at.mul_f64(0.1 * jitter)
    }
}

/// What the refresher knows after a failed token request.
#[derive(Debug, Clone, Copy)]
pub struct Failure {
    /// Failures in a row, 1 for the first.
    pub failures: u32,
    /// The endpoint's `Retry-After`, if it gave one.
    pub retry_after: Option<Duration>,
    /// Retrying cannot help until someone changes the configuration.
    pub permanent: bool,
    /// How long the current token stays usable, if one is.
    pub valid_left: Option<Duration>,
}

/// How long to wait, from the end of a failed attempt, before the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// While no request is waiting for a token.
    pub idle: Duration,
    /// Once a request waits for a token (never longer than `idle`).
    pub wanted: Duration,
    /// No attempt before this, whatever happens: the `Retry-After`, or zero.
    pub not_before: Duration,
}

/// When to retry after `failure`; `jitter` is uniform in `[0, 1)`. One jitter drives every
/// term, so each is spread uniformly and none can fall below another's floor.
pub fn retry_in(failure: &Failure, jitter: f64) -> Retry {
    let j = jitter.clamp(0.0, 1.0);
    let spread = |lo: Duration, hi: Duration| lo + (hi - lo).mul_f64(j);
    let cap = FIRST_BACKOFF
        .saturating_mul(1u32 << failure.failures.saturating_sub(1).min(16))
        .min(MAX_BACKOFF);
    let mut idle = spread(cap / 3, cap);
    let mut wanted = spread(FIRST_BACKOFF / 3, FIRST_BACKOFF);
    let mut not_before = Duration::ZERO;
    if failure.permanent {
        idle = idle.max(spread(
            PERMANENT_RETRY,
            PERMANENT_RETRY + PERMANENT_RETRY / 4,
        ));
        wanted = idle;
    } else if let (Some(left), None) = (failure.valid_left, failure.retry_after) {
        // Race the token's expiry, but never faster than a few seconds apart.
        idle = idle.min((left / 2).max(MIN_RETRY_BEFORE_EXPIRY));
    }
    if let Some(r) = failure.retry_after {
        let r = r.min(MAX_RETRY_AFTER);
        let floor = spread(r, r + (r / 4).max(RETRY_AFTER_SPREAD));
        idle = idle.max(floor);
        wanted = wanted.max(floor);
        not_before = r;
    }
    Retry {
        idle,
        wanted: wanted.min(idle),
        not_before,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn failure(failures: u32) -> Failure {
        Failure {
            failures,
            retry_after: None,
            permanent: false,
            valid_left: None,
        }
    }

    #[test]
    fn refreshes_five_minutes_ahead_for_hour_tokens_spread_earlier() {
        assert_eq!(refresh_in(S(3599), S(300), 0.0), S(3299));
        let jittered = refresh_in(S(3599), S(300), 0.999);
        assert!(jittered < S(3299) && jittered > S(2969), "{jittered:?}");
    }

    #[test]
    fn short_tokens_refresh_half_way_spread_later() {
        assert_eq!(refresh_in(S(2), S(300), 0.0), S(1));
        assert_eq!(refresh_in(S(60), S(300), 0.0), S(30));
        assert_eq!(refresh_in(S(60), S(300), 1.0), S(33));
        assert_eq!(
            refresh_in(S(60), S(30), 1.0),
            S(33),
            "a lead of exactly half"
        );
    }

    #[test]
    fn refresh_always_comes_before_early_expiry() {
        for secs in [1u64, 2, 5, 30, 60, 600, 3599, 86_400] {
            for before in [0u64, 10, 300, 100_000] {
                let lifetime = S(secs);
                let t0 = Instant::now();
                for j in [0.0, 0.5, 1.0] {
                    assert!(
                        t0 + refresh_in(lifetime, S(before), j) < usable_until(t0, lifetime),
                        "{secs} {before} {j}"
                    );
                }
            }
        }
    }

    #[test]
    fn steady_state_costs_at_most_two_requests_per_short_lifetime() {
        // The mean over the jitter of lifetime / refresh interval.
        let per_lifetime = |secs: u64| {
            let n = 1000;
            let mean = (0..n)
                .map(|i| refresh_in(S(secs), S(300), (i as f64 + 0.5) / n as f64).as_secs_f64())
                .sum::<f64>()
                / n as f64;
            secs as f64 / mean
        };
        assert!(per_lifetime(60) <= 2.0, "{}", per_lifetime(60));
        assert!(per_lifetime(3599) <= 1.2, "{}", per_lifetime(3599));
    }

    #[test]
    fn skew_is_a_tenth_capped_at_thirty_seconds() {
        assert_eq!(skew(S(2)), Duration::from_millis(200));
        assert_eq!(skew(S(3599)), S(30));
    }

    /// The margin is applied, from when the request was sent: a token stated to last 100 s is
    /// sent for 90 s, and Azure's 3599 s for 3569 s.
    #[test]
    fn a_token_is_used_until_its_margin_before_the_stated_expiry() {
        let sent = Instant::now();
        assert_eq!(usable_until(sent, S(100)), sent + S(90));
        assert_eq!(usable_until(sent, S(3599)), sent + S(3569));
    }

    #[test]
    fn backoff_is_spread_from_a_third_of_a_doubling_cap() {
        assert_eq!(retry_in(&failure(1), 0.0).idle, S(3));
        assert_eq!(retry_in(&failure(1), 1.0).idle, S(9));
        assert_eq!(retry_in(&failure(2), 0.0).idle, S(6));
        assert_eq!(retry_in(&failure(3), 1.0).idle, S(36));
        assert_eq!(retry_in(&failure(30), 1.0).idle, MAX_BACKOFF);
        assert_eq!(retry_in(&failure(30), 0.0).idle, MAX_BACKOFF / 3);
    }

    #[test]
    fn waiting_requests_cap_the_wait_at_the_first_backoff() {
        for n in [1, 2, 5, 30] {
            let r = retry_in(&failure(n), 1.0);
            assert_eq!(r.wanted, FIRST_BACKOFF, "{n}");
            assert_eq!(retry_in(&failure(n), 0.0).wanted, FIRST_BACKOFF / 3, "{n}");
            assert!(r.wanted <= r.idle);
        }
    }

    #[test]
    fn a_valid_token_shortens_the_wait_to_half_its_time_left_but_not_under_3_s() {
        let with_left = |n, left| Failure {
            valid_left: Some(left),
            ..failure(n)
        };
        assert_eq!(retry_in(&with_left(4, S(20)), 1.0).idle, S(10));
        assert_eq!(retry_in(&with_left(4, S(2)), 1.0).idle, S(3));
        assert_eq!(retry_in(&with_left(1, S(600)), 1.0).idle, S(9), "no longer");
    }

    #[test]
    fn retry_after_is_a_floor_with_a_spread_above_it() {
        let throttled = |ra, left| Failure {
            retry_after: Some(S(ra)),
            valid_left: left,
            ..failure(1)
        };
        let early = retry_in(&throttled(30, None), 0.0);
        let late = retry_in(&throttled(30, None), 1.0);
        assert_eq!(
            (early.idle, early.wanted, early.not_before),
            (S(30), S(30), S(30))
        );
        assert_eq!(late.wanted, Duration::from_millis(37_500));
        // A short Retry-After still spreads over 5 s; the backoff stays a floor too.
        assert_eq!(retry_in(&throttled(2, None), 1.0).wanted, S(9));
        assert_eq!(retry_in(&throttled(2, None), 0.0).wanted, S(3));
        // A valid token does not shorten it.
        assert_eq!(retry_in(&throttled(30, Some(S(4))), 0.0).idle, S(30));
        assert_eq!(retry_in(&throttled(99_999, None), 0.0).idle, S(3600));
    }

    #[test]
    fn permanent_errors_wait_a_minute_or_more_even_with_requests_waiting() {
        let permanent = |n, left| Failure {
            permanent: true,
            valid_left: left,
            ..failure(n)
        };
        let r = retry_in(&permanent(1, None), 0.0);
        assert_eq!((r.idle, r.wanted), (PERMANENT_RETRY, PERMANENT_RETRY));
        assert_eq!(
            retry_in(&permanent(1, Some(S(5))), 0.0).idle,
            PERMANENT_RETRY
        );
        assert_eq!(retry_in(&permanent(1, None), 1.0).wanted, S(75));
        assert_eq!(retry_in(&permanent(30, None), 1.0).idle, MAX_BACKOFF);
    }
}
