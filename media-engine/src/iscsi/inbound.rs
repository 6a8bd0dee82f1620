//! The receiving side of a full-feature connection, sans-IO: how much the next read from the
//! socket may take and where it goes, and the PDUs it completes, handed one at a time to the
//! [`Session`] (so the driver can stop between two of them when its budget is spent).
//!
//! Reads are bounded: the receive buffer takes at most [`READ_AHEAD`] beyond the PDU being
//! completed, so a large Data-Out's header comes in with only the first part of its data, and
//! the rest is read straight into its command's buffer (the kernel copies it once, into the
//! buffer the pool writes from, instead of into the receive buffer and once more from there).
//! A write command's immediate data goes into a buffer with room for all its data (EDTL),
//! which the command then keeps.

use bytes::BufMut;
use bytes::buf::Limit;

use super::pdu::{DataOutHead, DecodedRef, Framer, Pdu, PduError, op};
use super::session::{self, Session};

/// Most bytes one read takes beyond the PDU being completed.
pub const READ_AHEAD: usize = 32 << 10;
/// Data-Out segments at least this long are read straight into their command's buffer.
pub const DIRECT_DATA_OUT: usize = 32 << 10;

/// A Data-Out being read straight into its command's buffer.
#[derive(Debug)]
struct DirectDataOut {
    head: DataOutHead,
    /// The command's buffer (taken from the session), with the data read so far at its end.
    buf: Vec<u8>,
    /// Data bytes still to read.
    remaining: usize,
}

/// What a connection has received and not yet handed to its session.
#[derive(Debug)]
pub struct Inbound {
    framer: Framer,
    buf: Vec<u8>,
    /// Bytes of `buf` already decoded.
    consumed: usize,
    /// A large Data-Out whose data is being read straight into its command's buffer.
    direct: Option<DirectDataOut>,
    /// Padding after a directly read data segment, still to be dropped from the stream.
    skip: usize,
    /// Bytes still missing of the PDU at the front of `buf`.
    need: usize,
    /// `buf` holds no whole PDU: the next step is a read.
    starved: bool,
}

/// A PDU's data segment as the session gets it. A write command's immediate data goes into a
/// buffer with room for all its data (EDTL), which the command then keeps: the rest arrives
/// without reallocating, and the immediate part is not copied again.
fn pdu_data(p: &Pdu, data: &[u8]) -> Vec<u8> {
    let write = p.opcode() == op::SCSI_CMD && p.flags() & 0x20 != 0;
    let edtl = p.u32_at(20) as usize;
    if !write || edtl <= data.len() || edtl > session::MAX_WRITE as usize {
        return data.to_vec();
    }
    let mut buf = crate::bufpool::take_empty(edtl);
    buf.extend_from_slice(data);
    buf
}

impl Inbound {
    /// `received`: bytes already read from the connection (after the login's last PDU).
    pub fn new(framer: Framer, received: Vec<u8>) -> Inbound {
        let mut buf = received;
        buf.reserve(64 << 10);
        Inbound {
            framer,
            buf,
            consumed: 0,
            direct: None,
            skip: 0,
            need: 0,
            starved: false,
        }
    }

    pub fn framer(&self) -> &Framer {
        &self.framer
    }

    /// Whether the next step is a read from the socket (everything received was handed on).
    pub fn wants_bytes(&self) -> bool {
        self.direct.is_some() || self.starved
    }

    /// Where the next read goes, bounded: the rest of a large Data-Out's data into its
    /// command's buffer, or the receive buffer.
    pub fn room(&mut self) -> Limit<&mut Vec<u8>> {
        match self.direct.as_mut() {
            Some(d) => (&mut d.buf).limit(d.remaining),
            None => (&mut self.buf).limit(self.need.max(READ_AHEAD)),
        }
    }

    /// `n` bytes were read into [`Inbound::room`].
    pub fn received(&mut self, n: usize, session: &mut Session) {
        if n == 0 {
            return;
        }
        self.starved = false;
        if let Some(mut d) = self.direct.take() {
            d.remaining -= n.min(d.remaining);
            if d.remaining == 0 {
                self.skip = d.head.pad;
                self.need = 0;
                session.on_data_out_direct(&d.head.pdu, d.buf, d.head.data_len);
            } else {
                self.direct = Some(d);
            }
        }
    }

    /// Hands the next whole PDU received to the session; `false` when there is none (a read
    /// must come first). An error (a malformed PDU) ends the connection.
    pub fn next(&mut self, session: &mut Session) -> Result<bool, PduError> {
        if self.wants_bytes() {
            return Ok(false);
        }
        if self.skip > 0 {
            let k = self.skip.min(self.buf.len() - self.consumed);
            self.consumed += k;
            self.skip -= k;
        }
        match self.framer.decode_ref(&self.buf[self.consumed..])? {
            DecodedRef::Pdu(mut p, data, n) => {
                let data = self.consumed + data.start..self.consumed + data.end;
                self.consumed += n;
                if p.opcode() == op::DATA_OUT {
                    // Write data goes once, from here to its command.
                    session.on_data_out_ref(&p, &self.buf[data]);
                } else {
                    p.data = pdu_data(&p, &self.buf[data]);
                    session.on_pdu(p);
                }
                Ok(true)
            }
            DecodedRef::NeedMore(n) => {
                // Move the partial PDU to the front once per read, not the rest of the
                // buffer once per PDU.
                self.buf.drain(..self.consumed);
                self.consumed = 0;
                self.need = n.saturating_sub(self.buf.len());
                self.starved = true;
                self.start_direct(session)?;
                if self.direct.is_none() {
                    self.buf.reserve(self.need);
                }
                Ok(false)
            }
        }
    }

    /// When the buffer holds the header and the first part of a large Data-Out's data (and
    /// nothing else: everything before it was decoded), moves that part into its command's
    /// buffer and reads the rest straight there.
    fn start_direct(&mut self, session: &mut Session) -> Result<(), PduError> {
        let Some(head) = self.framer.data_out_head(&self.buf)? else {
            return Ok(());
        };
        if head.data_len < DIRECT_DATA_OUT {
            return Ok(());
        }
        let Some(mut buf) = session.take_data_out_buffer(&head.pdu, head.data_len) else {
            return Ok(());
        };
        let have = &self.buf[head.data_start..];
        buf.extend_from_slice(have);
        let remaining = head.data_len - have.len();
        self.buf.clear();
        self.direct = Some(DirectDataOut {
            head,
            buf,
            remaining,
        });
        Ok(())
    }
}
