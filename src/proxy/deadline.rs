//! A connection's timer for the waits that recur on it: each request head the front door
//! reads (`header_read_timeout`), each upstream response it waits for (`response_timeout`).
//! One timer serves both, as the waits never overlap: a connection holds one, not two.
//!
//! `tokio::time::timeout` per request registers a timer in tokio's wheel and removes it again
//! (a lock and a wheel slot each way, about 8 % of the front door's instructions per request).
//! A [`Deadline`] instead leaves its timer set while the deadline moves later: a timer that
//! fires before the current deadline is set again for it, so a connection busy with one
//! request after another touches the wheel about once per timeout length, not per request.
//! The deadline itself is exact: a wait ends when it has passed, never earlier.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Where a new timer's deadline stands: later than any wait's (as tokio's own "far future").
const NOT_SET: Duration = Duration::from_secs(86400 * 365 * 30);

/// A recurring deadline of a fixed length, owned by one connection.
#[derive(Debug)]
pub struct Deadline {
    length: Duration,
    sleep: Pin<Box<Sleep>>,
    /// When the current wait ends.
    due: Instant,
    /// The waker the timer was last polled with, while it is set and has not fired: the timer
    /// wakes it when it fires, so until then polling it again (a coop budget check and a
    /// waker swap, per request) tells nothing new.
    registered: Option<Waker>,
}

impl Deadline {
    /// A deadline `length` after each [`start`](Self::start).
    pub fn new(length: Duration) -> Deadline {
        let now = Instant::now();
        Deadline {
            length,
            // Never polled as it is: the first wait sets it (its deadline is earlier).
            sleep: Box::pin(tokio::time::sleep_until(now + NOT_SET)),
            due: now,
            registered: None,
        }
    }

    /// Starts a wait that ends `length` after `now`. The timer is set again only when it
    /// would fire later than that (as before the first wait); when it fires earlier,
    /// [`poll_expired`](Self::poll_expired) sets it again.
    pub fn start(&mut self, now: Instant) {
        self.start_for(now, self.length);
    }

    /// [`start`](Self::start) for a wait of `length`, not the deadline's own.
    pub fn start_for(&mut self, now: Instant, length: Duration) {
        self.due = now + length;
        if self.sleep.deadline() > self.due {
            self.sleep.as_mut().reset(self.due);
            self.registered = None;
        }
    }

    /// Ready once the current wait's deadline has passed.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(waker) = &self.registered {
            if waker.will_wake(cx.waker()) && !self.sleep.is_elapsed() {
                return Poll::Pending;
            }
        }
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                self.registered = Some(cx.waker().clone());
                return Poll::Pending;
            }
            self.registered = None;
            if self.sleep.deadline() >= self.due {
                return Poll::Ready(());
            }
            // It fired for an earlier wait: set it for this one.
            self.sleep.as_mut().reset(self.due);
        }
    }

    /// Runs `future` within a wait started `now`: `None` if the deadline passed first. The
    /// future comes pinned where its caller made it: moving a large future in costs a copy.
    pub async fn bound<F: Future>(
        &mut self,
        now: Instant,
        future: Pin<&mut F>,
    ) -> Option<F::Output> {
        self.bound_for(now, self.length, future).await
    }

    /// [`bound`](Self::bound) for a wait of `length`, not the deadline's own.
    pub async fn bound_for<F: Future>(
        &mut self,
        now: Instant,
        length: Duration,
        mut future: Pin<&mut F>,
    ) -> Option<F::Output> {
        self.start_for(now, length);
        poll_fn(|cx| {
            if let Poll::Ready(v) = future.as_mut().poll(cx) {
                return Poll::Ready(Some(v));
            }
            self.poll_expired(cx).map(|()| None)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::pin;

    /// With tokio's clock paused, time moves only as the test says (auto-advancing when
    /// everything waits), so the deadlines are checked exactly.
    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_at_its_own_deadline_even_when_the_timer_was_set_for_an_earlier_one() {
        let mut deadline = Deadline::new(Duration::from_secs(10));
        let t0 = Instant::now();
        // A first wait that finishes in time leaves the timer set for t0 + 10 s.
        let quick = deadline.bound(t0, pin!(async { 1 })).await;
        assert_eq!(quick, Some(1));
        // A second wait started 4 s later must last until t0 + 14 s, not end at t0 + 10 s.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let started = Instant::now();
        let never = deadline
            .bound(started, pin!(std::future::pending::<()>()))
            .await;
        assert_eq!(never, None);
        assert_eq!(Instant::now() - started, Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn one_timer_serves_waits_of_two_lengths_each_to_its_own_deadline() {
        let mut deadline = Deadline::new(Duration::from_secs(30));
        let t0 = Instant::now();
        let short = Duration::from_secs(3);
        // A long wait that finishes leaves the timer set late; a short one still ends on time.
        assert_eq!(deadline.bound(t0, pin!(async { 1 })).await, Some(1));
        let t1 = Instant::now();
        let cut = deadline
            .bound_for(t1, short, pin!(std::future::pending::<()>()))
            .await;
        assert_eq!(cut, None);
        assert_eq!(Instant::now() - t1, short);
        // And a long wait after a short one lasts its whole length.
        let t2 = Instant::now();
        assert_eq!(
            deadline.bound(t2, pin!(std::future::pending::<()>())).await,
            None
        );
        assert_eq!(Instant::now() - t2, Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_future_that_finishes_first_wins_and_a_slow_one_is_cut_at_the_deadline() {
        let mut deadline = Deadline::new(Duration::from_secs(3));
        let t0 = Instant::now();
        let slow = tokio::time::sleep(Duration::from_secs(5));
        assert_eq!(deadline.bound(t0, pin!(slow)).await, None);
        assert_eq!(Instant::now() - t0, Duration::from_secs(3));
        let t1 = Instant::now();
        let fast = async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            "answered"
        };
        assert_eq!(deadline.bound(t1, pin!(fast)).await, Some("answered"));
        assert_eq!(Instant::now() - t1, Duration::from_secs(2));
    }
}
