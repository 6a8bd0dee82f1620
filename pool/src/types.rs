//! Small value types shared by the pool's modules and its callers.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Stable identifier of a volume inside one pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VolumeId(pub u64);

/// Stable identifier of a snapshot inside one pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SnapshotId(pub u64);

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vol-{}", self.0)
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "snap-{}", self.0)
    }
}

/// A 32-byte keyed BLAKE3 digest naming a stored object (data chunk or index node).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Digest(pub [u8; 32]);

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl Digest {
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Storage tier of a device. RAM is a cache tier (configured by size, not by device).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Ram,
    Ssd,
    Hdd,
}

impl Tier {
    /// Lower is faster; the WAL goes to the fastest durable tier, chunks to the slowest.
    pub fn speed_rank(self) -> u8 {
        match self {
            Tier::Ram => 0,
            Tier::Ssd => 1,
            Tier::Hdd => 2,
        }
    }

    pub fn is_durable(self) -> bool {
        !matches!(self, Tier::Ram)
    }
}

impl std::str::FromStr for Tier {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ram" => Ok(Tier::Ram),
            "ssd" => Ok(Tier::Ssd),
            "hdd" => Ok(Tier::Hdd),
            other => Err(format!("unknown tier {other:?} (ram, ssd, hdd)")),
        }
    }
}

/// A location on a pool device, in bytes, always 4 KiB aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Extent {
    pub device: u16,
    pub offset: u64,
    pub len: u64,
}

/// The device number of objects that live only in an archive target (a lazily mounted
/// archived snapshot): their extent's offset is the pool's number of that remote source, its
/// length 0. Such an extent is never allocated, freed or read from a device.
pub const REMOTE_DEVICE: u16 = u16::MAX;

impl Extent {
    pub fn remote(source: u64) -> Extent {
        Extent {
            device: REMOTE_DEVICE,
            offset: source,
            len: 0,
        }
    }

    pub fn is_remote(&self) -> bool {
        self.device == REMOTE_DEVICE
    }
}

pub const BLOCK: u64 = 4096;

pub fn align_up(n: u64, a: u64) -> u64 {
    n.div_ceil(a) * a
}
