//! Merkle trees over the log's events, with RFC 9162 (Certificate
//! Transparency 2.0) hashing and inclusion proofs: SHA-256, a leaf hashed
//! as `SHA-256(0x00 ‖ leaf)`, an inner node as `SHA-256(0x01 ‖ left ‖ right)`,
//! a tree of n > 1 leaves split at the largest power of two below n (so
//! no node is ever duplicated to fill a level, and no two lists of leaves
//! share a root), the empty tree's hash `SHA-256("")`.
//!
//! A block of the log is a tree of trees, so that a tenant can check its
//! own events without seeing anyone else's: each tenant's events in the
//! block, in position order, make the tenant's tree; the block's tree has
//! one leaf per tenant — the canonical JSON `{"count":n,"root":"<hex>",
//! "tenant":"<tenant>"}` — in the order of the tenants' UTF-8 bytes. An
//! event's proof is its path in its tenant's tree and the tenant leaf's
//! path in the block's tree; both are sibling hashes only.

use sha2::{Digest as _, Sha256};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

const LEAF: u8 = 0x00;
const NODE: u8 = 0x01;

/// `SHA-256(0x00 ‖ leaf)`.
pub fn leaf_hash(leaf: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([LEAF]);
    h.update(leaf);
    h.finalize().into()
}

/// `SHA-256(0x01 ‖ left ‖ right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([NODE]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The largest power of two below `n` (n ≥ 2).
fn split(n: usize) -> usize {
    debug_assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// The root of the tree whose leaf hashes are `leaves` (RFC 9162 §2.1.1).
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves {
        [] => Sha256::digest([]).into(),
        [one] => *one,
        _ => {
            let k = split(leaves.len());
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The inclusion proof of leaf `index` among `leaves` (RFC 9162
/// §2.1.3.1): the sibling hashes from the leaf up. `None` if out of range.
pub fn inclusion_proof(leaves: &[Hash], index: usize) -> Option<Vec<Hash>> {
    if index >= leaves.len() {
        return None;
    }
    let mut path = Vec::new();
    collect_path(leaves, index, &mut path);
    Some(path)
}

fn collect_path(leaves: &[Hash], index: usize, path: &mut Vec<Hash>) {
    if leaves.len() <= 1 {
        return;
    }
    let k = split(leaves.len());
    if index < k {
        collect_path(&leaves[..k], index, path);
        path.push(root(&leaves[k..]));
    } else {
        collect_path(&leaves[k..], index - k, path);
        path.push(root(&leaves[..k]));
    }
}

/// The root that `leaf` at `index` of a tree of `size` leaves with
/// inclusion proof `path` implies (RFC 9162 §2.1.3.2); `None` when the
/// path cannot belong to such a tree (wrong length, index out of range).
/// A proof verifies when this equals the signed root.
pub fn root_from_proof(leaf: &Hash, index: usize, size: usize, path: &[Hash]) -> Option<Hash> {
    if index >= size {
        return None;
    }
    let (mut f_n, mut s_n) = (index, size - 1);
    let mut r = *leaf;
    for p in path {
        if s_n == 0 {
            return None;
        }
        if f_n & 1 == 1 || f_n == s_n {
            r = node_hash(p, &r);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    (s_n == 0).then_some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves_of(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(format!("event {i}").as_bytes()))
            .collect()
    }

    #[test]
    fn roots_follow_rfc_9162_on_its_test_vectors() {
        // The Certificate Transparency test vectors (RFC 6962's reference
        // implementation, merkle_tree_test.cc): leaves are these byte
        // strings, the roots of their first 1, 2, 3, 8 leaves these.
        let inputs: Vec<Vec<u8>> = [
            "",
            "00",
            "10",
            "2021",
            "3031",
            "40414243",
            "5051525354555657",
            "606162636465666768696a6b6c6d6e6f",
        ]
        .iter()
        .map(|h| hex::decode(h).unwrap())
        .collect();
        let hashes: Vec<Hash> = inputs.iter().map(|l| leaf_hash(l)).collect();
        let expect = |n: usize, root_hex: &str| {
            assert_eq!(hex::encode(root(&hashes[..n])), root_hex, "{n} leaves");
        };
        expect(
            1,
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        );
        expect(
            2,
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        );
        expect(
            3,
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        );
        expect(
            4,
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        );
        expect(
            5,
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        );
        expect(
            6,
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        );
        expect(
            7,
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        );
        expect(
            8,
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        );
        assert_eq!(
            hex::encode(root(&[])),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn every_leaf_of_every_size_proves_its_inclusion_and_nothing_else_does() {
        for n in 1..=33 {
            let leaves = leaves_of(n);
            let top = root(&leaves);
            for i in 0..n {
                let path = inclusion_proof(&leaves, i).unwrap();
                assert_eq!(
                    root_from_proof(&leaves[i], i, n, &path),
                    Some(top),
                    "{i} of {n}"
                );
                // Another leaf, index, size or a changed sibling does not.
                let other = leaf_hash(b"not in the tree");
                assert_ne!(root_from_proof(&other, i, n, &path), Some(top));
                if n > 1 {
                    assert_ne!(
                        root_from_proof(&leaves[i], (i + 1) % n, n, &path),
                        Some(top)
                    );
                    let mut bent = path.clone();
                    bent[0][0] ^= 1;
                    assert_ne!(root_from_proof(&leaves[i], i, n, &bent), Some(top));
                }
                // Nor does it for the tree one leaf larger (whose size a
                // seal would sign with its root).
                let larger = root(&leaves_of(n + 1));
                assert_ne!(root_from_proof(&leaves[i], i, n + 1, &path), Some(larger));
            }
            assert_eq!(inclusion_proof(&leaves, n), None);
            assert_eq!(root_from_proof(&leaves[0], n, n, &[]), None);
        }
    }

    #[test]
    fn no_two_lists_of_leaves_share_a_root() {
        // Duplicating the last leaf to fill a level (Bitcoin's tree) gives
        // [a, b, c] and [a, b, c, c] one root; this tree does not.
        let l = leaves_of(3);
        let mut padded = l.clone();
        padded.push(l[2]);
        assert_ne!(root(&l), root(&padded));
        // A leaf's hash can never pass for an inner node's.
        assert_ne!(root(&l[..2]), leaf_hash(&[l[0], l[1]].concat()));
    }
}
