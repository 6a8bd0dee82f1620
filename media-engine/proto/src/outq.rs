//! The bytes a connection still has to send, as a queue of segments written with one vectored
//! write. Headers and small payloads are copied into owned buffers; large payloads (a read's
//! Data-In) are queued by reference to the response buffer, so they are copied once, by the
//! kernel, instead of once more into an output buffer.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::ops::Range;
use std::sync::Arc;

/// Payloads at least this long are queued by reference rather than copied.
pub const SHARE_AT: usize = 16 << 10;
/// Most slices handed to one vectored write (well under any IOV_MAX).
const MAX_SLICES: usize = 64;

#[derive(Debug)]
enum Segment {
    Owned(Vec<u8>),
    Shared(Arc<Vec<u8>>, Range<usize>),
}

impl Segment {
    fn bytes(&self) -> &[u8] {
        match self {
            Segment::Owned(v) => v,
            Segment::Shared(data, r) => data.get(r.clone()).unwrap_or_default(),
        }
    }
}

/// Output waiting for the socket, in order: sealed segments, then an owned tail that encoders
/// append to.
#[derive(Debug, Default)]
pub struct OutQueue {
    segments: VecDeque<Segment>,
    /// Total length of `segments`.
    queued: usize,
    /// Bytes of the first segment already sent.
    head_sent: usize,
    tail: Vec<u8>,
}

impl OutQueue {
    pub fn new() -> OutQueue {
        OutQueue::default()
    }

    /// Bytes queued and not yet sent.
    pub fn len(&self) -> usize {
        self.queued - self.head_sent + self.tail.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The owned buffer at the end of the queue: whatever is appended to it is queued.
    pub fn tail(&mut self) -> &mut Vec<u8> {
        &mut self.tail
    }

    /// Queues a copy of `bytes`.
    pub fn push_copy(&mut self, bytes: &[u8]) {
        self.tail.extend_from_slice(bytes);
    }

    /// Queues `data[range]`, by reference when it is large. An out-of-range `range` queues
    /// nothing.
    pub fn push_shared(&mut self, data: &Arc<Vec<u8>>, range: Range<usize>) {
        let Some(bytes) = data.get(range.clone()) else {
            return;
        };
        if bytes.len() < SHARE_AT {
            self.push_copy(bytes);
            return;
        }
        if !self.tail.is_empty() {
            let t = std::mem::take(&mut self.tail);
            self.queued += t.len();
            self.segments.push_back(Segment::Owned(t));
        }
        self.queued += bytes.len();
        self.segments
            .push_back(Segment::Shared(data.clone(), range));
    }

    /// The first unsent bytes, as at most [`MAX_SLICES`] slices.
    pub fn slices(&self) -> Vec<IoSlice<'_>> {
        let mut out = Vec::with_capacity(self.segments.len().min(MAX_SLICES) + 1);
        for (i, s) in self.segments.iter().take(MAX_SLICES).enumerate() {
            let b = s.bytes();
            let b = if i == 0 {
                b.get(self.head_sent..).unwrap_or_default()
            } else {
                b
            };
            if !b.is_empty() {
                out.push(IoSlice::new(b));
            }
        }
        if out.len() < MAX_SLICES && self.segments.len() <= MAX_SLICES && !self.tail.is_empty() {
            out.push(IoSlice::new(&self.tail));
        }
        out
    }

    /// Everything queued, as one buffer, leaving the queue empty (what the socket would get).
    /// For tests of the codecs on both sides of a connection; drivers send [`Self::slices`].
    pub fn take_all(&mut self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        while !self.is_empty() {
            let before = out.len();
            for s in self.slices() {
                out.extend_from_slice(&s);
            }
            let n = out.len() - before;
            if n == 0 {
                break;
            }
            self.advance(n);
        }
        out
    }

    /// Drops `n` sent bytes from the front.
    pub fn advance(&mut self, mut n: usize) {
        while n > 0 {
            match self.segments.front() {
                Some(front) => {
                    let flen = front.bytes().len();
                    let left = flen - self.head_sent;
                    if n < left {
                        self.head_sent += n;
                        return;
                    }
                    n -= left;
                    self.queued -= flen;
                    self.head_sent = 0;
                    if let Some(Segment::Shared(data, _)) = self.segments.pop_front()
                        && let Ok(buf) = Arc::try_unwrap(data)
                    {
                        // The last PDU of a read's data is out: its buffer serves another read.
                        crate::bufpool::give(buf);
                    }
                }
                None => {
                    if n >= self.tail.len() {
                        self.tail.clear();
                    } else {
                        self.tail.drain(..n);
                    }
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain_all(q: &mut OutQueue, step: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while !q.is_empty() {
            let slices = q.slices();
            let mut n = 0;
            for s in &slices {
                let take = (step - n).min(s.len());
                got.extend_from_slice(&s[..take]);
                n += take;
                if n == step {
                    break;
                }
            }
            assert!(n > 0, "queue of {} bytes gave no slices", q.len());
            q.advance(n);
        }
        got
    }

    #[test]
    fn bytes_come_out_in_order_whatever_the_write_sizes() {
        let big: Arc<Vec<u8>> = Arc::new((0..100_000u32).map(|i| (i % 251) as u8).collect());
        for step in [1, 7, 4096, SHARE_AT + 3, 1 << 20] {
            let mut q = OutQueue::new();
            let mut want = Vec::new();
            q.push_copy(b"header-1");
            want.extend_from_slice(b"header-1");
            q.push_shared(&big, 10..60_000);
            want.extend_from_slice(&big[10..60_000]);
            q.push_shared(&big, 0..100); // small: copied
            want.extend_from_slice(&big[..100]);
            q.tail().extend_from_slice(b"trailer");
            want.extend_from_slice(b"trailer");
            q.push_shared(&big, 60_000..100_000);
            want.extend_from_slice(&big[60_000..]);
            assert_eq!(q.len(), want.len());
            assert_eq!(drain_all(&mut q, step), want, "step {step}");
            assert_eq!(q.len(), 0);
            assert!(q.slices().is_empty());
        }
    }

    #[test]
    fn out_of_range_shares_and_oversized_advances_are_harmless() {
        let data = Arc::new(vec![1u8; 10]);
        let mut q = OutQueue::new();
        q.push_shared(&data, 5..50);
        assert!(q.is_empty());
        q.push_copy(b"abc");
        q.advance(1000);
        assert!(q.is_empty());
        assert!(q.slices().is_empty());
    }
}
