//! A block of the log as a tree of tenants' trees (see [`super::merkle`]):
//! the root a seal signs, and the proof that lets one tenant check an event
//! of its own against it without seeing any other tenant's.
//!
//! Each tenant's events in the block (in log order) make a tree; the block
//! tree's leaves are the tenants' summaries ([`TenantSummary::leaf`]: name,
//! event count and root), tenants in the order of their UTF-8 bytes.

use std::collections::BTreeMap;

use serde_json::json;

use super::jcs::canonical;
use super::merkle::{inclusion_proof, leaf_hash, root, root_from_proof, Hash};

/// The block-tree leaf of a tenant: the canonical JSON
/// `{"count":<events>,"root":"<hex of its tree's root>","tenant":"<tenant>"}`.
pub fn tenant_leaf(tenant: &str, count: usize, tenant_root: &Hash) -> Vec<u8> {
    canonical(&json!({
        "count": count,
        "root": hex::encode(tenant_root),
        "tenant": tenant,
    }))
}

/// One tenant's share of a block: what the block tree commits to, and what
/// a seal keeps beside it so that proofs need not re-read the block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantSummary {
    /// The tenant.
    pub tenant: String,
    /// Its events in the block.
    pub count: usize,
    /// The root of its events' tree.
    pub root: Hash,
}

impl TenantSummary {
    /// Its leaf hash in the block tree.
    pub fn leaf(&self) -> Hash {
        leaf_hash(&tenant_leaf(&self.tenant, self.count, &self.root))
    }
}

/// The root of a block whose tenants (in block order) are `tenants`.
pub fn block_root(tenants: &[TenantSummary]) -> Hash {
    let leaves: Vec<Hash> = tenants.iter().map(TenantSummary::leaf).collect();
    root(&leaves)
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

    /// How many events the block holds.
    pub fn len(&self) -> usize {
        self.tenants.values().map(Vec::len).sum()
    }

    /// Whether the block holds no event.
    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }

    /// The tenants' summaries, in block order.
    pub fn summaries(&self) -> Vec<TenantSummary> {
        self.tenants
            .iter()
            .map(|(tenant, leaves)| TenantSummary {
                tenant: tenant.clone(),
                count: leaves.len(),
                root: root(leaves),
            })
            .collect()
    }

    /// The block's root: what its seal signs.
    pub fn root(&self) -> Hash {
        block_root(&self.summaries())
    }

    /// The proof of `tenant`'s event number `index` (in log order) in the
    /// block; `None` if there is no such event.
    pub fn proof(&self, tenant: &str, index: usize) -> Option<EventProof> {
        let leaves = self.tenants.get(tenant)?;
        EventProof::new(&self.summaries(), tenant, leaves, index)
    }
}

impl EventProof {
    /// The proof of the event number `index` of `tenant`, whose event
    /// leaves in the block are `leaves`, in a block of `tenants`.
    pub fn new(
        tenants: &[TenantSummary],
        tenant: &str,
        leaves: &[Hash],
        index: usize,
    ) -> Option<Self> {
        let tenant_index = tenants.iter().position(|t| t.tenant == tenant)?;
        let tenant_path = inclusion_proof(leaves, index)?;
        let tenant_leaves: Vec<Hash> = tenants.iter().map(TenantSummary::leaf).collect();
        let block_path = inclusion_proof(&tenant_leaves, tenant_index)?;
        Some(Self {
            tenant: tenant.to_owned(),
            index,
            count: leaves.len(),
            tenant_path,
            tenant_index,
            tenants: tenants.len(),
            block_path,
        })
    }

    /// The block root this proof makes of the event whose leaf hash is
    /// `leaf`: the proof holds when it equals the root a valid seal signs.
    /// `None` when the proof is malformed.
    pub fn block_root(&self, leaf: &Hash) -> Option<Hash> {
        let tenant_root = root_from_proof(leaf, self.index, self.count, &self.tenant_path)?;
        let tenant_leaf = tenant_leaf(&self.tenant, self.count, &tenant_root);
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
        let top = block.root();
        for (tenant, mine) in [
            ("acme", vec!["a1", "a2", "a3"]),
            ("globex", vec!["g1", "g2"]),
            ("initech", vec!["i1"]),
        ] {
            for (index, event) in mine.iter().enumerate() {
                let proof = block.proof(tenant, index).unwrap();
                assert_eq!(proof.count, mine.len());
                assert_eq!(proof.block_root(&leaf_hash(event.as_bytes())), Some(top));
                // An edited event does not prove.
                assert_ne!(proof.block_root(&leaf_hash(b"edited")), Some(top));
            }
        }
        assert_eq!(block.proof("acme", 3), None);
        assert_eq!(block.proof("nobody", 0), None);
    }

    #[test]
    fn any_change_to_the_block_changes_its_root() {
        let top = block(LOG).root();
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
            assert_ne!(block(&log).root(), top, "{log:?}");
        }
        // Interleaving across tenants is not part of a block's root (each
        // tenant's order is; the positions inside each leaf fix the rest).
        let mut interleaved = LOG.to_vec();
        interleaved.swap(0, 1);
        assert_eq!(block(&interleaved).root(), top);
    }

    #[test]
    fn a_tenants_own_events_recompute_its_subtree_so_a_missing_one_shows() {
        // The proof states how many events the tenant has in the block: a
        // tenant holding its events can rebuild its tree and compare, so a
        // deleted event of its own cannot hide behind valid proofs of the
        // others.
        let block = block(LOG);
        let proof = block.proof("globex", 0).unwrap();
        assert_eq!(proof.count, 2);
        let mine = [leaf_hash(b"g1"), leaf_hash(b"g2")];
        let rebuilt = tenant_leaf("globex", mine.len(), &root(&mine));
        assert_eq!(
            root_from_proof(
                &leaf_hash(&rebuilt),
                proof.tenant_index,
                proof.tenants,
                &proof.block_path
            ),
            Some(block.root())
        );
        let fewer = tenant_leaf("globex", 1, &root(&mine[..1]));
        assert_ne!(
            root_from_proof(
                &leaf_hash(&fewer),
                proof.tenant_index,
                proof.tenants,
                &proof.block_path
            ),
            Some(block.root())
        );
    }
}
