//! The building blocks of the sealed audit log (issue 16): the canonical
//! JSON every hash is taken over ([`jcs`], RFC 8785), Merkle trees and
//! inclusion proofs ([`merkle`], RFC 9162 hashing), and a block as a tree
//! of tenants' trees with proofs a tenant checks alone ([`block`]). Nothing
//! seals the log with them yet.

pub mod block;
pub mod jcs;
pub mod merkle;
