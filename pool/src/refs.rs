//! Reference counting of stored objects inside one metadata transaction.
//!
//! A root is referenced by each volume base and snapshot that uses it, a leaf by each root
//! entry naming it, a chunk by each leaf entry naming it. All increments of an operation are
//! applied before its decrements, so an object that stays in use never transiently hits zero.
//! An object reaching zero releases its children (recursively) and becomes a sweep candidate;
//! one rising from zero (new, or resurrected before the sweep) takes its children again.

use std::collections::HashMap;

use redb::{ReadableTable, WriteTransaction};

use crate::error::{PoolError, Result};
use crate::index::Node;
use crate::meta::{OBJECTS, ObjRec};
use crate::object::ObjectKind;
use crate::shared::Shared;
use crate::types::Digest;

/// Net reference changes to apply in one transaction.
#[derive(Debug, Default)]
pub struct RefDelta {
    pub changes: HashMap<Digest, i64>,
}

impl RefDelta {
    pub fn add(&mut self, d: Digest, n: i64) {
        *self.changes.entry(d).or_insert(0) += n;
    }
}

/// Applies `delta`; new objects must already be in the table (with refcount 0). Returns the
/// digests that reached zero (sweep candidates).
pub fn apply(shared: &Shared, tx: &WriteTransaction, delta: RefDelta) -> Result<Vec<Digest>> {
    let mut t = tx.open_table(OBJECTS)?;
    let mut ups: Vec<(Digest, i64)> = delta
        .changes
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(d, n)| (*d, *n))
        .collect();
    let mut downs: Vec<(Digest, i64)> = delta
        .changes
        .iter()
        .filter(|(_, n)| **n < 0)
        .map(|(d, n)| (*d, *n))
        .collect();
    let mut zeroed = Vec::new();
    let load = |t: &redb::Table<'_, [u8; 32], &[u8]>, d: &Digest| -> Result<ObjRec> {
        match t.get(&d.0)? {
            Some(v) => ObjRec::decode(v.value(), d),
            None => Err(PoolError::corrupt(
                format!("object {d}"),
                "reference to a missing object",
            )),
        }
    };
    let children = |d: &Digest, rec: &ObjRec| -> Result<Vec<Digest>> {
        if rec.kind != ObjectKind::Node {
            return Ok(Vec::new());
        }
        let node: std::sync::Arc<Node> = match shared.node_cache.get(d) {
            Some(n) => n,
            None => std::sync::Arc::new(Node::decode(&shared.read_object(d, rec)?)?),
        };
        Ok(node.children().copied().collect())
    };
    while let Some((d, n)) = ups.pop() {
        let mut rec = load(&t, &d)?;
        let was = rec.refcount;
        rec.refcount += n as u64;
        t.insert(&d.0, rec.encode().as_slice())?;
        if was == 0 {
            for c in children(&d, &rec)? {
                ups.push((c, 1));
            }
        }
    }
    while let Some((d, n)) = downs.pop() {
        let mut rec = load(&t, &d)?;
        let dec = (-n) as u64;
        if rec.refcount < dec {
            return Err(PoolError::corrupt(
                format!("object {d}"),
                format!("reference count {} would drop by {dec}", rec.refcount),
            ));
        }
        rec.refcount -= dec;
        t.insert(&d.0, rec.encode().as_slice())?;
        if rec.refcount == 0 {
            zeroed.push(d);
            for c in children(&d, &rec)? {
                downs.push((c, -1));
            }
        }
    }
    Ok(zeroed)
}
