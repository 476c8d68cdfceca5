//! The sandbox address pool: a CIDR range cut into /30 blocks, one per sandbox
//! (host end `.1`, guest end `.2` of each block). Pure logic; which blocks are in
//! use is the store's business, so the pool survives restarts by construction.

use crate::Lease;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

const BLOCK: u32 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressPool {
    base: u32,
    blocks: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    #[error("address pool {0:?} is not of the form A.B.C.D/N")]
    Malformed(String),
    #[error("address pool {cidr} has host bits set; did you mean {base}/{len}?")]
    HostBits {
        cidr: String,
        base: Ipv4Addr,
        len: u8,
    },
    #[error("address pool /{0} is too small: it must hold at least one /30 (prefix ≤ 30)")]
    TooSmall(u8),
    #[error("no free addresses: all {0} blocks of the pool are in use")]
    Exhausted(u32),
}

impl AddressPool {
    /// Parse `10.231.0.0/16`.
    pub fn parse(cidr: &str) -> Result<Self, PoolError> {
        let malformed = || PoolError::Malformed(cidr.to_owned());
        let (addr, len) = cidr.split_once('/').ok_or_else(malformed)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| malformed())?;
        let len: u8 = len.parse().map_err(|_| malformed())?;
        if len > 32 {
            return Err(malformed());
        }
        if len > 30 {
            return Err(PoolError::TooSmall(len));
        }
        let base = u32::from(addr);
        let mask = if len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(len))
        };
        if base & !mask != 0 {
            return Err(PoolError::HostBits {
                cidr: cidr.to_owned(),
                base: Ipv4Addr::from(base & mask),
                len,
            });
        }
        let size = 1u64 << (32 - u32::from(len));
        let blocks = u32::try_from(size / u64::from(BLOCK)).unwrap_or(u32::MAX);
        Ok(AddressPool { base, blocks })
    }

    /// The whole pool as `(base, prefix length)`.
    pub fn network(&self) -> (Ipv4Addr, u8) {
        let size = u64::from(self.blocks) * u64::from(BLOCK);
        let len = 32u32.saturating_sub(size.trailing_zeros());
        (Ipv4Addr::from(self.base), len as u8)
    }

    pub fn capacity(&self) -> u32 {
        self.blocks
    }

    /// The lease for block `index`, or `None` if it lies outside the pool.
    pub fn lease(&self, index: u32) -> Option<Lease> {
        if index >= self.blocks {
            return None;
        }
        let start = self.base + index * BLOCK;
        Some(Lease {
            index,
            host: Ipv4Addr::from(start + 1),
            guest: Ipv4Addr::from(start + 2),
            prefix_len: 30,
        })
    }

    /// The lowest free block not in `used`.
    pub fn allocate(&self, used: &BTreeSet<u32>) -> Result<Lease, PoolError> {
        let mut candidate = 0u32;
        for &taken in used.range(0..self.blocks) {
            if taken != candidate {
                break;
            }
            candidate += 1;
        }
        self.lease(candidate)
            .ok_or(PoolError::Exhausted(self.blocks))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn default_range_holds_thousands() {
        let pool = AddressPool::parse("10.231.0.0/16").expect("valid");
        assert_eq!(pool.capacity(), 16384);
        let lease = pool.lease(1).expect("in range");
        assert_eq!(lease.host, Ipv4Addr::new(10, 231, 0, 5));
        assert_eq!(lease.guest, Ipv4Addr::new(10, 231, 0, 6));
    }

    #[test]
    fn rejects_bad_ranges_with_reasons() {
        assert!(matches!(
            AddressPool::parse("10.0.0.0"),
            Err(PoolError::Malformed(_))
        ));
        assert!(matches!(
            AddressPool::parse("10.0.0.1/24"),
            Err(PoolError::HostBits { .. })
        ));
        assert_eq!(
            AddressPool::parse("10.0.0.0/31"),
            Err(PoolError::TooSmall(31))
        );
        assert!(matches!(
            AddressPool::parse("10.0.0.0/33"),
            Err(PoolError::Malformed(_))
        ));
    }

    #[test]
    fn exhaustion_is_an_error() {
        let pool = AddressPool::parse("10.0.0.0/29").expect("valid");
        let used: BTreeSet<u32> = [0, 1].into();
        assert_eq!(pool.allocate(&used), Err(PoolError::Exhausted(2)));
    }

    proptest! {
        #[test]
        fn allocation_never_reuses_and_stays_inside(used in proptest::collection::btree_set(0u32..64, 0..64), len in 22u8..=30) {
            let pool = AddressPool::parse(&format!("10.200.0.0/{len}")).expect("valid");
            match pool.allocate(&used) {
                Ok(lease) => {
                    prop_assert!(!used.contains(&lease.index));
                    prop_assert!(lease.index < pool.capacity());
                    // Lowest free: everything below it is taken.
                    prop_assert!((0..lease.index).all(|i| used.contains(&i)));
                    let base = u32::from(Ipv4Addr::new(10, 200, 0, 0));
                    prop_assert_eq!(u32::from(lease.host), base + lease.index * 4 + 1);
                }
                Err(PoolError::Exhausted(n)) => prop_assert!((0..n).all(|i| used.contains(&i))),
                Err(other) => prop_assert!(false, "unexpected {other}"),
            }
        }

        #[test]
        fn parse_never_panics(s in ".{0,24}") {
            let _ = AddressPool::parse(&s);
        }
    }
}
