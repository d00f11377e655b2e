//! Buffers lent to the front door's client connections while they serve a request (and to
//! its HTTP/2 clients' streams), kept per worker thread.
//!
//! Why: an idle keep-alive connection should hold no buffer (10,000 idle clients must fit in
//! well under 100 MiB), and allocating a connection's buffers for each request instead would
//! cost a `malloc` and a `free` each per request. So a connection gives its buffers back to
//! its thread's spares when it has to wait for a request and takes them again when bytes
//! arrive: under load that is one pop and one push of a thread-local stack per request, and
//! the buffers lent are warm in the cache.

use std::cell::RefCell;

use bytes::BytesMut;

use super::codec::Field;

/// Sets of spares kept per thread; more are freed.
const MAX_SPARES: usize = 64;
/// A set holding a larger buffer is freed rather than kept (a large response head, a large
/// gathered body).
const MAX_KEPT: usize = 64 * 1024;

/// What a connection uses while it serves a request.
#[derive(Debug, Default)]
pub struct Buffers {
    /// Bytes read from the client.
    pub buf: BytesMut,
    /// What goes to the client: the response head, small body frames gathered behind it.
    pub out: Vec<u8>,
    /// The upstream's request head.
    pub up: Vec<u8>,
    /// Where the request head's fields are.
    pub fields: Vec<Field>,
}

thread_local! {
    static SPARES: RefCell<Vec<Buffers>> = const { RefCell::new(Vec::new()) };
}

impl Buffers {
    /// Whether this connection holds buffers now.
    pub fn held(&self) -> bool {
        self.buf.capacity() != 0
    }

    /// Takes a set of spares from this thread, if there is one and none is held.
    pub fn borrow(&mut self) {
        if !self.held() {
            if let Some(spare) = SPARES.with_borrow_mut(Vec::pop) {
                *self = spare;
            }
        }
    }

    /// Gives the set back to this thread's spares; nothing read may be pending in `buf`.
    pub fn give_back(&mut self) {
        debug_assert!(self.buf.is_empty());
        let mut set = std::mem::take(self);
        let largest = set
            .buf
            .capacity()
            .max(set.out.capacity())
            .max(set.up.capacity())
            .max(set.fields.capacity() * std::mem::size_of::<Field>());
        if set.buf.capacity() == 0 || largest > MAX_KEPT {
            return;
        }
        set.buf.clear();
        set.out.clear();
        set.up.clear();
        set.fields.clear();
        SPARES.with_borrow_mut(|spares| {
            if spares.len() < MAX_SPARES {
                spares.push(set);
            }
        });
    }
}

/// What an HTTP/2 client's stream uses while the lean exchange serves it (`front_h2.rs`): the
/// buffers for the two heads, and a response timer. Kept per thread as [`Buffers`] are, for
/// the same reason, but apart from them and more of them: a connection has many streams in
/// flight at once, and each needs these only, not a read buffer.
#[derive(Debug, Default)]
pub struct Scratch {
    /// The response head for the client (an HPACK block).
    pub out: Vec<u8>,
    /// The upstream's request head.
    pub up: Vec<u8>,
    /// The response timer: made once, its timer reused (see `deadline.rs`).
    pub timer: Option<super::deadline::Deadline>,
}

/// Sets of stream scratch kept per thread (a few KiB each at most).
const MAX_SCRATCH: usize = 512;
/// A set whose buffer grew past this is freed rather than kept.
const MAX_SCRATCH_KEPT: usize = 16 * 1024;

thread_local! {
    static SCRATCH: RefCell<Vec<Scratch>> = const { RefCell::new(Vec::new()) };
}

impl Scratch {
    /// A set of this thread's spares, or a new one.
    pub fn take() -> Scratch {
        SCRATCH.with_borrow_mut(Vec::pop).unwrap_or_default()
    }

    /// Gives the set back to this thread's spares, emptied.
    pub fn give_back(mut self) {
        if self.out.capacity().max(self.up.capacity()) > MAX_SCRATCH_KEPT {
            return;
        }
        self.out.clear();
        self.up.clear();
        SCRATCH.with_borrow_mut(|spares| {
            if spares.len() < MAX_SCRATCH {
                spares.push(self);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_goes_back_and_comes_out_again_emptied() {
        let mut conn = Buffers::default();
        conn.buf.reserve(4096);
        conn.out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        conn.give_back();
        assert!(!conn.held(), "the idle connection holds none");
        assert_eq!(conn.out.capacity(), 0);

        let mut next = Buffers::default();
        next.borrow();
        assert!(next.held() && next.buf.capacity() >= 4096 && next.out.capacity() > 0);
        assert!(next.buf.is_empty() && next.out.is_empty());

        // A set with a large buffer is freed, not kept.
        next.out.reserve(MAX_KEPT + 1);
        next.give_back();
        let mut after = Buffers::default();
        after.borrow();
        assert!(!after.held());
    }

    #[test]
    fn stream_scratch_goes_back_emptied_and_a_grown_one_is_freed() {
        let mut set = Scratch::take();
        set.out.extend_from_slice(b"block");
        set.up.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let (out, up) = (set.out.as_ptr(), set.up.as_ptr());
        set.give_back();
        let again = Scratch::take();
        assert_eq!(
            (again.out.as_ptr(), again.up.as_ptr()),
            (out, up),
            "the same buffers"
        );
        assert!(again.out.is_empty() && again.up.is_empty());
        let mut grown = again;
        grown.up.reserve(MAX_SCRATCH_KEPT + 1);
        grown.give_back();
        assert_eq!(Scratch::take().up.capacity(), 0, "the grown set was freed");
    }
}
