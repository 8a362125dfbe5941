//! A block of the log as a tree of tenants' trees (see [`super::merkle`]):
//! the root a seal signs, and the proof that lets one tenant check an event
//! of its own against it without seeing any other tenant's.

use std::collections::BTreeMap;

use serde_json::json;

use super::jcs::{canonical, CanonicalError};
use super::merkle::{inclusion_proof, leaf_hash, root, root_from_proof, Hash};

/// The block-tree leaf of a tenant: the canonical JSON
/// `{"count":<events>,"root":"<hex of its tree's root>","tenant":"<tenant>"}`.
pub fn tenant_leaf(
    tenant: &str,
    count: usize,
    tenant_root: &Hash,
) -> Result<Vec<u8>, CanonicalError> {
    canonical(&json!({
        "count": count,
        "root": hex::encode(tenant_root),
        "tenant": tenant,
    }))
}

/// The events of one block, grouped by tenant (tenants in the order of
/// their UTF-8 bytes, each tenant's event leaf hashes in log order).
#[derive(Clone, Debug, Default)]
pub struct Block {
    tenants: BTreeMap<String, Vec<Hash>>,
}

/// An event's inclusion in a block, checkable by its tenant alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventProof {
    /// The event's tenant.
    pub tenant: String,
    /// The event's index among its tenant's events in the block.
    pub index: usize,
    /// How many events the tenant has in the block.
    pub count: usize,
    /// Sibling hashes from the event's leaf to the tenant's root.
    pub tenant_path: Vec<Hash>,
    /// The tenant's index among the block's tenants.
    pub tenant_index: usize,
    /// How many tenants the block has.
    pub tenants: usize,
    /// Sibling hashes from the tenant's leaf to the block's root.
    pub block_path: Vec<Hash>,
}

impl Block {
    /// Adds the next event (in log order) of `tenant`, by its leaf hash.
    pub fn push(&mut self, tenant: &str, leaf: Hash) {
        match self.tenants.get_mut(tenant) {
            Some(leaves) => leaves.push(leaf),
            None => {
                self.tenants.insert(tenant.to_owned(), vec![leaf]);
            }
        }
    }

    /// The tenants' leaf hashes in the block tree's order.
    fn tenant_leaves(&self) -> Result<Vec<Hash>, CanonicalError> {
        self.tenants
            .iter()
            .map(|(tenant, leaves)| {
                Ok(leaf_hash(&tenant_leaf(
                    tenant,
                    leaves.len(),
                    &root(leaves),
                )?))
            })
            .collect()
    }

    /// The block's root: what its seal signs.
    pub fn root(&self) -> Result<Hash, CanonicalError> {
        Ok(root(&self.tenant_leaves()?))
    }

    /// The proof of `tenant`'s event number `index` (in log order) in the
    /// block; `None` if there is no such event.
    pub fn proof(&self, tenant: &str, index: usize) -> Result<Option<EventProof>, CanonicalError> {
        let Some((tenant_index, leaves)) = self
            .tenants
            .iter()
            .enumerate()
            .find_map(|(i, (t, leaves))| (t == tenant).then_some((i, leaves)))
        else {
            return Ok(None);
        };
        let Some(tenant_path) = inclusion_proof(leaves, index) else {
            return Ok(None);
        };
        let tenant_leaves = self.tenant_leaves()?;
        let block_path = inclusion_proof(&tenant_leaves, tenant_index).unwrap_or_default();
        Ok(Some(EventProof {
            tenant: tenant.to_owned(),
            index,
            count: leaves.len(),
            tenant_path,
            tenant_index,
            tenants: tenant_leaves.len(),
            block_path,
        }))
    }
}

impl EventProof {
    /// The block root this proof makes of the event whose leaf hash is
    /// `leaf`: the proof holds when it equals the root a valid seal signs.
    /// `None` when the proof is malformed.
    pub fn block_root(&self, leaf: &Hash) -> Option<Hash> {
        let tenant_root = root_from_proof(leaf, self.index, self.count, &self.tenant_path)?;
        let tenant_leaf = tenant_leaf(&self.tenant, self.count, &tenant_root).ok()?;
        root_from_proof(
            &leaf_hash(&tenant_leaf),
            self.tenant_index,
            self.tenants,
            &self.block_path,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block of events of three tenants, interleaved as in a log.
    fn block(events: &[(&str, &str)]) -> Block {
        let mut block = Block::default();
        for (tenant, event) in events {
            block.push(tenant, leaf_hash(event.as_bytes()));
        }
        block
    }

    const LOG: &[(&str, &str)] = &[
        ("acme", "a1"),
        ("globex", "g1"),
        ("acme", "a2"),
        ("initech", "i1"),
        ("acme", "a3"),
        ("globex", "g2"),
    ];

    #[test]
    fn each_event_proves_against_the_block_root_from_its_tenants_side_alone() {
        let block = block(LOG);
        let top = block.root().unwrap();
        for (tenant, mine) in [
            ("acme", vec!["a1", "a2", "a3"]),
            ("globex", vec!["g1", "g2"]),
            ("initech", vec!["i1"]),
        ] {
            for (index, event) in mine.iter().enumerate() {
                let proof = block.proof(tenant, index).unwrap().unwrap();
                assert_eq!(proof.count, mine.len());
                assert_eq!(proof.block_root(&leaf_hash(event.as_bytes())), Some(top));
                // An edited event does not prove.
                assert_ne!(proof.block_root(&leaf_hash(b"edited")), Some(top));
            }
        }
        assert_eq!(block.proof("acme", 3).unwrap(), None);
        assert_eq!(block.proof("nobody", 0).unwrap(), None);
    }

    #[test]
    fn any_change_to_the_block_changes_its_root() {
        let top = block(LOG).root().unwrap();
        let mut changed: Vec<Vec<(&str, &str)>> = Vec::new();
        // Edited, deleted, inserted, reordered within a tenant, moved to
        // another tenant.
        let mut edited = LOG.to_vec();
        edited[2].1 = "a2'";
        changed.push(edited);
        changed.push(LOG.iter().copied().filter(|e| e.1 != "g2").collect());
        let mut inserted = LOG.to_vec();
        inserted.insert(3, ("acme", "a2.5"));
        changed.push(inserted);
        let mut swapped = LOG.to_vec();
        swapped.swap(0, 2);
        changed.push(swapped);
        let mut moved = LOG.to_vec();
        moved[3].0 = "globex";
        changed.push(moved);
        for log in changed {
            assert_ne!(block(&log).root().unwrap(), top, "{log:?}");
        }
        // Interleaving across tenants is not part of a block's root (each
        // tenant's order is; the positions inside each leaf fix the rest).
        let mut interleaved = LOG.to_vec();
        interleaved.swap(0, 1);
        assert_eq!(block(&interleaved).root().unwrap(), top);
    }

    #[test]
    fn a_tenants_own_events_recompute_its_subtree_so_a_missing_one_shows() {
        // The proof states how many events the tenant has in the block: a
        // tenant holding its events can rebuild its tree and compare, so a
        // deleted event of its own cannot hide behind valid proofs of the
        // others.
        let block = block(LOG);
        let proof = block.proof("globex", 0).unwrap().unwrap();
        assert_eq!(proof.count, 2);
        let mine = [leaf_hash(b"g1"), leaf_hash(b"g2")];
        let rebuilt = tenant_leaf("globex", mine.len(), &root(&mine)).unwrap();
        assert_eq!(
            root_from_proof(
                &leaf_hash(&rebuilt),
                proof.tenant_index,
                proof.tenants,
                &proof.block_path
            ),
            Some(block.root().unwrap())
        );
        let fewer = tenant_leaf("globex", 1, &root(&mine[..1])).unwrap();
        assert_ne!(
            root_from_proof(
                &leaf_hash(&fewer),
                proof.tenant_index,
                proof.tenants,
                &proof.block_path
            ),
            Some(block.root().unwrap())
        );
    }
}
