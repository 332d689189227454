//! The tables of addresses learned from DNS answers (`ENF_LEARN4/6`), written by the
//! DNS proxy's thread.
use std::net::IpAddr;

use aya::maps::{HashMap, MapData};
use enforcer_common::{LearnedClauses, Net4Key, Net6Key, names};

use super::{BpfError, pins::typed_map};

/// The tables of addresses learned from DNS answers, for the proxy's thread.
pub struct LearnedTables {
    learn4: HashMap<MapData, Net4Key, LearnedClauses>,
    learn6: HashMap<MapData, Net6Key, LearnedClauses>,
}

impl LearnedTables {
    pub fn open_pinned() -> Result<Self, BpfError> {
        Ok(Self { learn4: typed_map!(names::MAP_LEARN4), learn6: typed_map!(names::MAP_LEARN6) })
    }

    /// Sets what `addr` is open for under `binding` (IPv4-mapped addresses go to the
    /// IPv4 table, where the kernel looks for them); an empty list removes the entry.
    pub fn set(&mut self, binding: u32, addr: IpAddr, clauses: &LearnedClauses) -> Result<(), BpfError> {
        let full = |source| BpfError::TableFull { table: names::MAP_LEARN4, source };
        match addr.to_canonical() {
            IpAddr::V4(v4) => {
                let key = Net4Key { slot: binding, addr: v4.octets() };
                if clauses.count == 0 {
                    let _ = self.learn4.remove(&key);
                    Ok(())
                } else {
                    self.learn4.insert(key, clauses, 0).map_err(full)
                }
            }
            IpAddr::V6(v6) => {
                let key = Net6Key { slot: binding, addr: v6.octets() };
                if clauses.count == 0 {
                    let _ = self.learn6.remove(&key);
                    Ok(())
                } else {
                    self.learn6
                        .insert(key, clauses, 0)
                        .map_err(|source| BpfError::TableFull { table: names::MAP_LEARN6, source })
                }
            }
        }
    }

    pub fn get(&self, binding: u32, addr: IpAddr) -> Option<LearnedClauses> {
        match addr.to_canonical() {
            IpAddr::V4(v4) => self.learn4.get(&Net4Key { slot: binding, addr: v4.octets() }, 0).ok(),
            IpAddr::V6(v6) => self.learn6.get(&Net6Key { slot: binding, addr: v6.octets() }, 0).ok(),
        }
    }

    /// The binding's learned addresses with what they are open for.
    fn entries(&self, binding: u32) -> Vec<(IpAddr, LearnedClauses)> {
        let v4 = self.learn4.iter().filter_map(Result::ok).filter(|(k, _)| k.slot == binding);
        let v6 = self.learn6.iter().filter_map(Result::ok).filter(|(k, _)| k.slot == binding);
        v4.map(|(k, v)| (IpAddr::from(k.addr), v)).chain(v6.map(|(k, v)| (IpAddr::from(k.addr), v))).collect()
    }

    /// Replaces each of the binding's entries with `f(entry)` (an empty result removes
    /// it); returns how many remain.
    pub fn rewrite(&mut self, binding: u32, f: impl Fn(&LearnedClauses) -> LearnedClauses) -> usize {
        let mut remaining = 0;
        for (addr, old) in self.entries(binding) {
            let new = f(&old);
            if new.count != 0 {
                remaining += 1;
            }
            if new != old {
                let _ = self.set(binding, addr, &new);
            }
        }
        remaining
    }

    /// Removes the binding's entries for which `drop` says so; returns how many remain.
    pub fn forget(&mut self, binding: u32, drop: impl Fn(&LearnedClauses) -> bool) -> usize {
        self.rewrite(binding, |v| if drop(v) { LearnedClauses { count: 0, ..*v } } else { *v })
    }
}
