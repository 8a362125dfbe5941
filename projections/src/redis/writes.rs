//! A batch's writes, coalesced per key before they are sent.

use std::collections::{BTreeMap, HashMap};

/// The final effect of a batch's writes to one hash field.
#[derive(Debug)]
struct FieldWrite {
    /// The value the batch sets, if any: `HSET` (`nx == false`) or
    /// `HSETNX` (`nx == true`, only when the batch touches the field first
    /// with `HSETNX`).
    set: Option<(String, bool)>,
    /// The sum of the `HINCRBY`s applied after `set` (kept even when zero:
    /// `HINCRBY f 0` creates a missing field, as `+1` then `-1` would).
    delta: Option<i64>,
}

/// The writes of a batch to one hash, field by field in the order the batch
/// first touched them (hashes have at most a few dozen fields, so a linear
/// scan beats hashing).
#[derive(Debug, Default)]
pub(super) struct HashWrites {
    fields: Vec<(String, FieldWrite)>,
}

impl HashWrites {
    fn field(&mut self, field: &str) -> (&mut FieldWrite, bool) {
        let found = self.fields.iter().position(|(f, _)| f == field);
        let fresh = found.is_none();
        let index = found.unwrap_or_else(|| {
            self.fields.push((
                field.to_owned(),
                FieldWrite {
                    set: None,
                    delta: None,
                },
            ));
            self.fields.len() - 1
        });
        (&mut self.fields[index].1, fresh)
    }

    /// `HSET key field value`.
    pub(super) fn set(&mut self, field: &str, value: String) {
        let (write, _) = self.field(field);
        write.set = Some((value, false));
        write.delta = None;
    }

    /// `HSETNX key field value`.
    pub(super) fn set_nx(&mut self, field: &str, value: String) {
        let (write, fresh) = self.field(field);
        // Written earlier in the batch: the field exists, HSETNX is a no-op.
        if fresh {
            write.set = Some((value, true));
        }
    }

    /// `HINCRBY key field by`.
    pub(super) fn incr(&mut self, field: &str, by: i64) {
        let (write, _) = self.field(field);
        match &mut write.set {
            // A plain HSET of an integer followed by HINCRBY: fold into the
            // value (Redis would store the same decimal string).
            Some((value, false)) if write.delta.is_none() => match value.parse::<i64>() {
                Ok(n) if n.to_string() == *value && n.checked_add(by).is_some() => {
                    *value = (n + by).to_string();
                }
                _ => write.delta = Some(by),
            },
            _ => write.delta = Some(write.delta.unwrap_or(0) + by),
        }
    }
}

/// A batch's writes coalesced per key. Applying them gives the same result
/// as applying the planned commands one by one: commands on different keys
/// commute, a later `HSET` of a field overrides what came before, `HINCRBY`s
/// add up, an `HSETNX` after any write of the field is a no-op, and a set
/// member's or sorted-set member's last write is its final state.
#[derive(Debug, Default)]
pub(super) struct Writes {
    /// Hash key → its fields' writes.
    hashes: HashMap<String, HashWrites>,
    /// Set key → member → whether it ends up added (`SADD`) or removed.
    sets: HashMap<String, BTreeMap<String, bool>>,
    /// Sorted-set key → member → last score.
    zsets: HashMap<String, BTreeMap<String, i64>>,
}

impl Writes {
    /// The writes to hash `key` (the key is only kept the first time).
    pub(super) fn hash(&mut self, key: String) -> &mut HashWrites {
        self.hashes.entry(key).or_default()
    }

    pub(super) fn sadd(&mut self, key: String, member: &str) {
        Self::member(&mut self.sets, key, member, true);
    }

    pub(super) fn srem(&mut self, key: String, member: &str) {
        Self::member(&mut self.sets, key, member, false);
    }

    pub(super) fn zadd(&mut self, key: String, member: &str, score: i64) {
        Self::member(&mut self.zsets, key, member, score);
    }

    fn member<V>(
        keys: &mut HashMap<String, BTreeMap<String, V>>,
        key: String,
        member: &str,
        value: V,
    ) {
        let members = keys.entry(key).or_default();
        match members.get_mut(member) {
            Some(current) => *current = value,
            None => {
                members.insert(member.to_owned(), value);
            }
        }
    }

    /// Appends the coalesced commands to `pipe` (an atomic pipeline whose
    /// replies are not looked at, so nothing is marked ignored).
    pub(super) fn emit(self, pipe: &mut redis::Pipeline) {
        for (key, hash) in self.hashes {
            let fields = hash.fields;
            let mut hset = redis::Cmd::with_capacity(2 + 2 * fields.len(), 64 * fields.len());
            hset.arg("HSET").arg(&key);
            let mut any = false;
            for (field, write) in &fields {
                match &write.set {
                    Some((value, true)) => {
                        pipe.cmd("HSETNX").arg(&key).arg(field).arg(value);
                    }
                    Some((value, false)) => {
                        hset.arg(field).arg(value);
                        any = true;
                    }
                    None => {}
                }
            }
            if any {
                pipe.add_command(hset);
            }
            for (field, write) in &fields {
                if let Some(by) = write.delta {
                    pipe.cmd("HINCRBY").arg(&key).arg(field).arg(by);
                }
            }
        }
        for (key, members) in self.sets {
            let (added, removed): (Vec<_>, Vec<_>) =
                members.into_iter().partition(|(_, added)| *added);
            if !removed.is_empty() {
                let mut cmd = redis::cmd("SREM");
                cmd.arg(&key);
                for (member, _) in removed {
                    cmd.arg(member);
                }
                pipe.add_command(cmd);
            }
            if !added.is_empty() {
                let mut cmd = redis::cmd("SADD");
                cmd.arg(&key);
                for (member, _) in added {
                    cmd.arg(member);
                }
                pipe.add_command(cmd);
            }
        }
        for (key, members) in self.zsets {
            let mut cmd = redis::cmd("ZADD");
            cmd.arg(&key);
            for (member, score) in members {
                cmd.arg(score).arg(member);
            }
            pipe.add_command(cmd);
        }
    }
}
