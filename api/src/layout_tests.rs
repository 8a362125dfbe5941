//! The crate's layout holds: no module imports one that imports it back,
//! directly or around a loop, and the settings floor imports nothing above.
//! Read from the sources (`crate::`, `super::` and `self::` paths outside
//! `#[cfg(test)] mod tests`), resolved to the longest module that exists.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`http::ws`) → source text, for every `.rs` under `src/`.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(root).unwrap().with_extension("");
                let mut parts: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                if matches!(
                    parts.last().map(String::as_str),
                    Some("mod" | "lib" | "main")
                ) {
                    parts.pop();
                }
                let text = std::fs::read_to_string(&path).unwrap();
                out.insert(parts.join("::"), text);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    walk(&root, &root, &mut out);
    out
}

/// The production text of a module: comments and its test module dropped.
fn production(text: &str) -> String {
    let text = text
        .find("#[cfg(test)]\nmod tests")
        .map_or(text, |i| &text[..i]);
    text.lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path starting with `crate`, `super` or `self` in `text`, with
/// `use x::{a, b}` groups expanded one level.
fn paths(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let rest: String = bytes[i..bytes.len().min(i + 6)].iter().collect();
        let boundary = i == 0 || !(bytes[i - 1].is_alphanumeric() || bytes[i - 1] == '_');
        if boundary
            && (rest.starts_with("crate:")
                || rest.starts_with("super:")
                || rest.starts_with("self::"))
        {
            let mut j = i;
            while j < bytes.len()
                && (bytes[j].is_alphanumeric() || bytes[j] == '_' || bytes[j] == ':')
            {
                j += 1;
            }
            let head: String = bytes[i..j].iter().collect();
            let head = head.trim_end_matches(':').to_owned();
            if j < bytes.len() && bytes[j] == '{' {
                let end = bytes[j..]
                    .iter()
                    .position(|&c| c == '}')
                    .map_or(bytes.len(), |p| j + p);
                let group: String = bytes[j + 1..end].iter().collect();
                for item in group.split(',') {
                    let item = item.split_whitespace().next().unwrap_or("");
                    let item = item.split("::").next().unwrap_or("");
                    if !item.is_empty() && item != "self" {
                        out.push(format!("{head}::{item}"));
                    }
                }
                out.push(head);
                i = end;
            } else {
                out.push(head);
                i = j;
            }
        } else {
            i += 1;
        }
    }
    out
}

/// The module `path` (seen from `from`) names: the longest existing prefix.
fn resolve(from: &str, path: &str, known: &BTreeSet<String>) -> Option<String> {
    let mut segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    let mut base: Vec<&str> = if from.is_empty() {
        Vec::new()
    } else {
        from.split("::").collect()
    };
    match segments.first().copied() {
        Some("crate") => base.clear(),
        Some("super") => {
            while segments.first() == Some(&"super") {
                base.pop();
                segments.remove(0);
            }
            segments.insert(0, "super");
        }
        Some("self") => {}
        _ => return None,
    }
    segments.remove(0);
    for take in (0..=segments.len()).rev() {
        let candidate: Vec<&str> = base.iter().chain(&segments[..take]).copied().collect();
        let candidate = candidate.join("::");
        if known.contains(&candidate) {
            return Some(candidate);
        }
    }
    None
}

/// Module → the modules it imports (not itself, its ancestors or the root).
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules();
    let known: BTreeSet<String> = modules.keys().cloned().collect();
    modules
        .iter()
        .filter(|(name, _)| !name.ends_with("tests"))
        .map(|(name, text)| {
            let text = production(text);
            let mut targets: BTreeSet<String> = paths(&text)
                .iter()
                .filter_map(|p| resolve(name, p, &known))
                .filter(|t| !t.is_empty() && t != name && !name.starts_with(&format!("{t}::")))
                .collect();
            // A child named by a bare path (`use state::AppState`, `ws::serve`).
            let prefix = if name.is_empty() {
                String::new()
            } else {
                format!("{name}::")
            };
            for child in known.iter().filter_map(|k| k.strip_prefix(&prefix)) {
                if child.is_empty() || child.contains("::") {
                    continue;
                }
                let named = text.match_indices(&format!("{child}::")).any(|(at, _)| {
                    text[..at]
                        .chars()
                        .next_back()
                        .is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == ':'))
                });
                if named {
                    targets.insert(format!("{prefix}{child}"));
                }
            }
            (name.clone(), targets)
        })
        .collect()
}

/// A loop through `start`, if there is one.
fn loop_through(start: &str, edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_owned(), vec![start.to_owned()])];
    let mut seen = BTreeSet::new();
    while let Some((at, path)) = stack.pop() {
        for next in edges.get(&at).into_iter().flatten() {
            if next == start {
                return Some(path);
            }
            if seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push((next.clone(), longer));
            }
        }
    }
    None
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let edges = imports();
    assert!(edges.len() > 30, "the sources were read: {edges:?}");
    let loops: Vec<Vec<String>> = edges
        .keys()
        .filter_map(|m| loop_through(m, &edges))
        .collect();
    assert!(loops.is_empty(), "import loops: {loops:?}");
}

#[test]
fn settings_import_nothing_above_them() {
    let edges = imports();
    for (module, targets) in edges.iter().filter(|(m, _)| m.starts_with("settings")) {
        for target in targets {
            assert!(
                target.starts_with("settings") || target == "sync",
                "{module} imports {target}"
            );
        }
    }
}

#[test]
fn the_checker_sees_a_loop() {
    let mut edges = imports();
    edges
        .entry("settings".to_owned())
        .or_default()
        .insert("http".to_owned());
    assert!(
        loop_through("settings", &edges).is_some(),
        "settings → http → … → settings is a loop"
    );
}
