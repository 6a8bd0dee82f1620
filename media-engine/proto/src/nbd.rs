//! The NBD client side (the protocol of `doc/proto.md` in the NBD project): fixed-newstyle
//! handshake with structured replies, metadata contexts (`base:allocation`, and QEMU's
//! `qemu:dirty-bitmap:NAME`, through which a hypervisor tells which blocks changed), and the
//! READ and BLOCK_STATUS commands. Encoding and parsing are plain functions over bytes; the
//! [`Client`] drives them over any blocking stream (a UNIX socket or TCP), one command at a
//! time. Everything a server sends is bounded before it is allocated.

use std::io::{Read, Write};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_BIT: u32 = 1 << 31;

const INFO_EXPORT: u16 = 0;

const CMD_READ: u16 = 0;
const CMD_DISC: u16 = 2;
const CMD_BLOCK_STATUS: u16 = 7;

const REPLY_FLAG_DONE: u16 = 1;
const CHUNK_NONE: u16 = 0;
const CHUNK_OFFSET_DATA: u16 = 1;
const CHUNK_OFFSET_HOLE: u16 = 2;
const CHUNK_BLOCK_STATUS: u16 = 5;

/// `base:allocation`: the range is a hole (unallocated) / reads as zeroes.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:*`: the range changed since the bitmap was started.
pub const STATE_DIRTY: u32 = 1;

/// Largest option reply read (meta context names, export info).
const MAX_OPTION_REPLY: u32 = 64 << 10;
/// Largest read asked for (and so accepted back).
pub const MAX_READ: u32 = 32 << 20;
/// Largest block-status payload accepted (descriptors).
const MAX_STATUS_REPLY: u32 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("NBD I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("NBD protocol: {0}")]
    Protocol(String),
    #[error("NBD server refused {what}: {message}")]
    Refused { what: String, message: String },
    #[error("NBD command failed with error {code}: {message}")]
    Command { code: u32, message: String },
}

fn proto(s: impl Into<String>) -> NbdError {
    NbdError::Protocol(s.into())
}

/// An option request.
pub fn encode_option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// The data of SET_META_CONTEXT and GO: the export name, then `queries` (for GO: none).
fn export_and_queries(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// A transmission request.
pub fn encode_request(kind: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&0u16.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// Parses BLOCK_STATUS descriptors (after the context id): (length, flags) runs.
pub fn parse_status(payload: &[u8]) -> Result<(u32, Vec<(u32, u32)>), NbdError> {
    if payload.len() < 4 || (payload.len() - 4) % 8 != 0 {
        return Err(proto(format!("block status of {} bytes", payload.len())));
    }
    let id = be32(payload, 0);
    let runs = payload[4..]
        .chunks_exact(8)
        .map(|c| (be32(c, 0), be32(c, 4)))
        .collect();
    Ok((id, runs))
}

/// What the handshake agreed.
#[derive(Clone, Debug)]
pub struct Export {
    pub size: u64,
    pub flags: u16,
    /// Metadata contexts the server granted: (id, name).
    pub contexts: Vec<(u32, String)>,
}

/// A connected NBD client in the transmission phase.
#[derive(Debug)]
pub struct Client<S: Read + Write> {
    s: S,
    pub export: Export,
    cookie: u64,
    /// Bytes of data the server sent in read replies (holes it described cost nothing).
    pub data_bytes: u64,
}

fn read_exact<S: Read>(s: &mut S, n: usize) -> Result<Vec<u8>, NbdError> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)?;
    Ok(b)
}

impl<S: Read + Write> Client<S> {
    /// Negotiates export `name` with structured replies and the metadata contexts `queries`
    /// (e.g. `base:allocation`, `qemu:dirty-bitmap:b0`); a context the server does not grant
    /// is absent from [`Export::contexts`].
    pub fn connect(mut s: S, name: &str, queries: &[&str]) -> Result<Client<S>, NbdError> {
        let hello = read_exact(&mut s, 18)?;
        if be64(&hello, 0) != NBDMAGIC || be64(&hello, 8) != IHAVEOPT {
            return Err(proto("not a fixed-newstyle NBD server"));
        }
        let hflags = u16::from_be_bytes([hello[16], hello[17]]);
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(proto("the server does not speak fixed newstyle"));
        }
        let cflags = u32::from(hflags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        s.write_all(&cflags.to_be_bytes())?;

        s.write_all(&encode_option(OPT_STRUCTURED_REPLY, &[]))?;
        let (t, d) = Self::option_reply(&mut s, OPT_STRUCTURED_REPLY)?;
        if t != REP_ACK {
            return Err(NbdError::Refused {
                what: "structured replies".into(),
                message: String::from_utf8_lossy(&d).into_owned(),
            });
        }
        let mut contexts = Vec::new();
        if !queries.is_empty() {
            s.write_all(&encode_option(
                OPT_SET_META_CONTEXT,
                &export_and_queries(name, queries),
            ))?;
            loop {
                let (t, d) = Self::option_reply(&mut s, OPT_SET_META_CONTEXT)?;
                match t {
                    REP_ACK => break,
                    REP_META_CONTEXT if d.len() >= 4 => {
                        contexts.push((be32(&d, 0), String::from_utf8_lossy(&d[4..]).into_owned()))
                    }
                    t if t & REP_ERR_BIT != 0 => {
                        return Err(NbdError::Refused {
                            what: "metadata contexts".into(),
                            message: String::from_utf8_lossy(&d).into_owned(),
                        });
                    }
                    _ => return Err(proto(format!("unexpected reply {t} to SET_META_CONTEXT"))),
                }
            }
        }
        let mut go = Vec::new();
        go.extend_from_slice(&(name.len() as u32).to_be_bytes());
        go.extend_from_slice(name.as_bytes());
        go.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&encode_option(OPT_GO, &go))?;
        let mut export: Option<(u64, u16)> = None;
        loop {
            let (t, d) = Self::option_reply(&mut s, OPT_GO)?;
            match t {
                REP_ACK => break,
                REP_INFO if d.len() >= 12 && u16::from_be_bytes([d[0], d[1]]) == INFO_EXPORT => {
                    export = Some((be64(&d, 2), u16::from_be_bytes([d[10], d[11]])));
                }
                REP_INFO => {}
                t if t & REP_ERR_BIT != 0 => {
                    return Err(NbdError::Refused {
                        what: format!("export {name:?}"),
                        message: String::from_utf8_lossy(&d).into_owned(),
                    });
                }
                _ => return Err(proto(format!("unexpected reply {t} to GO"))),
            }
        }
        let (size, flags) = export.ok_or_else(|| proto("GO gave no export size"))?;
        Ok(Client {
            s,
            export: Export {
                size,
                flags,
                contexts,
            },
            cookie: 1,
            data_bytes: 0,
        })
    }

    fn option_reply(s: &mut S, opt: u32) -> Result<(u32, Vec<u8>), NbdError> {
        let h = read_exact(s, 20)?;
        if be64(&h, 0) != OPT_REPLY_MAGIC || be32(&h, 8) != opt {
            return Err(proto("bad option reply header"));
        }
        let (t, len) = (be32(&h, 12), be32(&h, 16));
        if len > MAX_OPTION_REPLY {
            return Err(proto(format!("option reply of {len} bytes")));
        }
        Ok((t, read_exact(s, len as usize)?))
    }

    /// The id of the granted context `name`.
    pub fn context(&self, name: &str) -> Option<u32> {
        self.export
            .contexts
            .iter()
            .find(|(_, n)| n == name)
            .map(|(id, _)| *id)
    }

    /// Reads one chunk header: (flags, type, cookie, length).
    fn chunk_header(&mut self) -> Result<(u16, u16, u64, u32), NbdError> {
        let h = read_exact(&mut self.s, 20)?;
        let magic = be32(&h, 0);
        if magic == SIMPLE_REPLY_MAGIC {
            return Err(proto("a simple reply after structured replies were agreed"));
        }
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(proto(format!("bad reply magic {magic:#x}")));
        }
        Ok((
            u16::from_be_bytes([h[4], h[5]]),
            u16::from_be_bytes([h[6], h[7]]),
            be64(&h, 8),
            be32(&h, 16),
        ))
    }

    fn chunk_error(payload: &[u8]) -> NbdError {
        if payload.len() < 6 {
            return proto("short error chunk");
        }
        let code = be32(payload, 0);
        let mlen = u16::from_be_bytes([payload[4], payload[5]]) as usize;
        let msg = payload.get(6..6 + mlen).unwrap_or_default();
        NbdError::Command {
            code,
            message: String::from_utf8_lossy(msg).into_owned(),
        }
    }

    /// Reads `len` bytes at `offset` (holes the server reports come back as zeroes).
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, NbdError> {
        if len > MAX_READ
            || offset
                .checked_add(u64::from(len))
                .is_none_or(|e| e > self.export.size)
        {
            return Err(proto(format!("read of {len} at {offset} out of bounds")));
        }
        let cookie = self.cookie;
        self.cookie += 1;
        self.s
            .write_all(&encode_request(CMD_READ, cookie, offset, len))?;
        let mut out = vec![0u8; len as usize];
        let mut failed = None;
        loop {
            let (flags, kind, c, plen) = self.chunk_header()?;
            if c != cookie {
                return Err(proto("reply to another request"));
            }
            if plen > len.saturating_add(64) {
                return Err(proto(format!("chunk of {plen} bytes for a read of {len}")));
            }
            let payload = read_exact(&mut self.s, plen as usize)?;
            match kind {
                CHUNK_NONE => {}
                CHUNK_OFFSET_DATA | CHUNK_OFFSET_HOLE if payload.len() >= 8 => {
                    let at = be64(&payload, 0);
                    let (start, n) = if kind == CHUNK_OFFSET_DATA {
                        (at, (payload.len() - 8) as u64)
                    } else if payload.len() == 12 {
                        (at, u64::from(be32(&payload, 8)))
                    } else {
                        return Err(proto("bad hole chunk"));
                    };
                    let rel = start
                        .checked_sub(offset)
                        .filter(|r| r.checked_add(n).is_some_and(|e| e <= u64::from(len)))
                        .ok_or_else(|| proto("chunk outside the read"))?;
                    let dst = &mut out[rel as usize..(rel + n) as usize];
                    if kind == CHUNK_OFFSET_DATA {
                        dst.copy_from_slice(&payload[8..]);
                        self.data_bytes += n;
                    } else {
                        dst.fill(0);
                    }
                }
                k if k & 0x8000 != 0 => failed = Some(Self::chunk_error(&payload)),
                k => return Err(proto(format!("unexpected chunk type {k} in a read"))),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// The runs (length, flags) of context `id` from `offset`, covering at most `len` bytes
    /// (the server may describe less: ask again from where the runs end).
    pub fn block_status(
        &mut self,
        id: u32,
        offset: u64,
        len: u32,
    ) -> Result<Vec<(u32, u32)>, NbdError> {
        let cookie = self.cookie;
        self.cookie += 1;
        self.s
            .write_all(&encode_request(CMD_BLOCK_STATUS, cookie, offset, len))?;
        let mut runs = None;
        let mut failed = None;
        loop {
            let (flags, kind, c, plen) = self.chunk_header()?;
            if c != cookie {
                return Err(proto("reply to another request"));
            }
            if plen > MAX_STATUS_REPLY {
                return Err(proto(format!("block status of {plen} bytes")));
            }
            let payload = read_exact(&mut self.s, plen as usize)?;
            match kind {
                CHUNK_NONE => {}
                CHUNK_BLOCK_STATUS => {
                    let (cid, r) = parse_status(&payload)?;
                    if cid == id {
                        runs = Some(r);
                    }
                }
                k if k & 0x8000 != 0 => failed = Some(Self::chunk_error(&payload)),
                k => return Err(proto(format!("unexpected chunk type {k} in block status"))),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let runs = runs.ok_or_else(|| proto("no status for the asked context"))?;
        if runs.is_empty() || runs.iter().any(|&(l, _)| l == 0) {
            return Err(proto("empty block status runs"));
        }
        Ok(runs)
    }

    /// Ends the session politely.
    pub fn disconnect(mut self) {
        let _ = self.s.write_all(&encode_request(CMD_DISC, 0, 0, 0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that answers with `input` whatever it is told.
    struct Scripted(std::io::Cursor<Vec<u8>>);

    impl Read for Scripted {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.0.read(b)
        }
    }

    impl Write for Scripted {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A well-formed handshake granting export size 1 MiB and context 9, then `tail`.
    fn handshake_then(tail: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&NBDMAGIC.to_be_bytes());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        let reply = |b: &mut Vec<u8>, opt: u32, t: u32, d: &[u8]| {
            b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
            b.extend_from_slice(&opt.to_be_bytes());
            b.extend_from_slice(&t.to_be_bytes());
            b.extend_from_slice(&(d.len() as u32).to_be_bytes());
            b.extend_from_slice(d);
        };
        reply(&mut b, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        let mut ctx = 9u32.to_be_bytes().to_vec();
        ctx.extend_from_slice(b"base:allocation");
        reply(&mut b, OPT_SET_META_CONTEXT, REP_META_CONTEXT, &ctx);
        reply(&mut b, OPT_SET_META_CONTEXT, REP_ACK, &[]);
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&(1u64 << 20).to_be_bytes());
        info.extend_from_slice(&1u16.to_be_bytes());
        reply(&mut b, OPT_GO, REP_INFO, &info);
        reply(&mut b, OPT_GO, REP_ACK, &[]);
        b.extend_from_slice(tail);
        b
    }

    #[test]
    fn a_scripted_server_is_understood() {
        // A read answered with a data chunk and a hole chunk.
        let mut tail = Vec::new();
        let chunk = |t: &mut Vec<u8>, flags: u16, kind: u16, payload: &[u8]| {
            t.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            t.extend_from_slice(&flags.to_be_bytes());
            t.extend_from_slice(&kind.to_be_bytes());
            t.extend_from_slice(&1u64.to_be_bytes());
            t.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            t.extend_from_slice(payload);
        };
        let mut data = 4096u64.to_be_bytes().to_vec();
        data.extend_from_slice(&[7u8; 100]);
        chunk(&mut tail, 0, CHUNK_OFFSET_DATA, &data);
        let mut hole = 4196u64.to_be_bytes().to_vec();
        hole.extend_from_slice(&100u32.to_be_bytes());
        chunk(&mut tail, REPLY_FLAG_DONE, CHUNK_OFFSET_HOLE, &hole);
        let mut c = Client::connect(
            Scripted(std::io::Cursor::new(handshake_then(&tail))),
            "d",
            &["base:allocation"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.export.size, 1 << 20);
        assert_eq!(c.context("base:allocation"), Some(9));
        let got = c.read(4096, 200).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&got[..100], &[7u8; 100][..]);
        assert!(got[100..].iter().all(|&b| b == 0));
        assert_eq!(c.data_bytes, 100);
    }

    proptest::proptest! {
        /// Whatever a hostile server answers, the client returns (an error or data), bounded.
        #[test]
        fn hostile_servers_never_panic(tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
                                       cut in 0usize..200, flip in 0usize..400) {
            let mut input = handshake_then(&tail);
            if flip < input.len() { input[flip] ^= 0x55; }
            let n = input.len().saturating_sub(cut % 8);
            input.truncate(n);
            if let Ok(mut c) = Client::connect(Scripted(std::io::Cursor::new(input)), "d", &["base:allocation"]) {
                let _ = c.read(0, 4096);
                let _ = c.block_status(9, 0, 65536);
            }
        }
    }

    #[test]
    fn requests_and_statuses() {
        let r = encode_request(CMD_READ, 7, 4096, 512);
        assert_eq!(&r[0..4], &REQUEST_MAGIC.to_be_bytes());
        assert_eq!(be64(&r, 8), 7);
        assert_eq!(be64(&r, 16), 4096);
        assert_eq!(be32(&r, 24), 512);
        let mut p = 3u32.to_be_bytes().to_vec();
        p.extend_from_slice(&65536u32.to_be_bytes());
        p.extend_from_slice(&1u32.to_be_bytes());
        assert_eq!(parse_status(&p).ok(), Some((3, vec![(65536, 1)])));
        assert!(parse_status(&p[..7]).is_err());
    }
}
