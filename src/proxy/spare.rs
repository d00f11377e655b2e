//! Buffers lent to the front door's client connections while they serve a request, kept per
//! worker thread.
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
}
