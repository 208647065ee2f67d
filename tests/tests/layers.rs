//! The house rules, checked from the source: no import circle between files, and no import that
//! runs back up the declared layer order of each crate (`docs/ARCHITECTURE.md` draws the same
//! order). A failure names the files and the import.
//!
//! An edge is a file naming an item of another file: `use` lines (braces expanded), inline
//! `crate::…` / `super::…` paths, and a folder root calling into its own child modules. Two
//! things are not edges: a re-export (`pub use child::X`, the folder's door), and a file using
//! its own folder's root (`super::Vm` from `vm/create.rs`: the room uses the house's type).
//! Comments and `#[cfg(test)]` blocks are ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each crate's layers, lowest first, by top-level module (a folder's files share its layer).
/// A file may use its own layer and the layers below; within a layer, no circles.
const CRATES: &[(&str, &[&[&str]])] = &[
    (
        "qmp",
        &[
            &["error", "codec", "fd", "transcript", "probe"],
            &["connect", "session", "events"],
            &["client"],
            &["commands"],
        ],
    ),
    (
        "engine",
        &[
            &["error", "qemu", "proc"],
            &["name", "tool", "failpoint", "guest_agent", "qcow2"],
            &["store"],
            &["cache", "image", "blocks"],
            &["chains", "features", "unlink"],
            &["launch"],
            &["snapshot"],
            &["vm"],
            &["bundle"],
            &["inspect", "testing"],
        ],
    ),
    (
        "remote",
        &[
            &["error"],
            &["format"],
            &["location", "chunk", "cache"],
            &["push", "pull", "manage"],
        ],
    ),
    (
        "harness",
        &[
            &["error"],
            &["ready", "watchdog", "pool"],
            &["cache", "fork"],
            &["golden"],
        ],
    ),
    (
        "cli",
        &[
            &["complete"],
            &["args"],
            &["output", "progress", "man", "schema"],
            &["request"],
        ],
    ),
];

/// A module path (`vm::create`), `""` for the crate root.
type Module = String;

struct Crate {
    /// Module → its file.
    files: BTreeMap<Module, PathBuf>,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn load(name: &str) -> Option<Crate> {
    let src = workspace().join(name).join("src");
    if !src.is_dir() {
        return None;
    }
    let mut files = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(&src).unwrap().with_extension("");
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
                files.insert(parts.join("::"), p);
            }
        }
    }
    Some(Crate { files })
}

/// The source without comments, string literals' contents and `#[cfg(test)]` items.
fn code(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut chars = src.chars().peekable();
    let mut in_str = false;
    while let Some(c) = chars.next() {
        if in_str {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => {
                    in_str = false;
                    out.push('"');
                }
                '\n' => out.push('\n'),
                _ => {}
            }
            continue;
        }
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                let mut prev = ' ';
                for c in chars.by_ref() {
                    if prev == '*' && c == '/' {
                        break;
                    }
                    prev = c;
                }
            }
            '"' => {
                in_str = true;
                out.push('"');
            }
            // A char literal `'"'` must not open a string.
            '\'' if chars.peek() == Some(&'"') => {
                chars.next();
                out.push_str("'\"");
            }
            _ => out.push(c),
        }
    }
    strip_cfg_test(&out)
}

/// Drops every item that follows `#[cfg(test)]` (a `mod tests { … }` or a single item).
fn strip_cfg_test(src: &str) -> String {
    let mut out = String::new();
    let mut rest = src;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        // The item ends at its matching `}` or at a `;` before any `{`.
        let (mut depth, mut end) = (0usize, after.len());
        for (i, c) in after.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                ';' if depth == 0 => {
                    end = i + 1;
                    break;
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// `a::{b, c::{d, self}}` → `a::b`, `a::c::d`, `a::c`.
fn expand(tree: &str) -> Vec<String> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = tree.find('{') else {
        let t = tree.split(" as ").next().unwrap_or(&tree);
        return vec![t.trim_end_matches("::self").to_owned()];
    };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..tree.len() - 1];
    let (mut depth, mut start, mut out) = (0, 0, Vec::new());
    let mut parts = Vec::new();
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    for p in parts.into_iter().filter(|p| !p.is_empty()) {
        for e in expand(p) {
            out.push(if e == "self" {
                prefix.trim_end_matches("::").to_owned()
            } else {
                format!("{prefix}{e}")
            });
        }
    }
    out
}

fn parent(m: &str) -> &str {
    m.rsplit_once("::").map_or("", |(p, _)| p)
}

fn join(base: &str, rest: &str) -> String {
    match (base.is_empty(), rest.is_empty()) {
        (true, _) => rest.to_owned(),
        (_, true) => base.to_owned(),
        _ => format!("{base}::{rest}"),
    }
}

impl Crate {
    /// The file a path names, from `here`: the longest module prefix that is a file.
    fn resolve(&self, here: &str, path: &str) -> Option<Module> {
        let mut segs: Vec<&str> = path.split("::").collect();
        let mut base = match segs.first().copied() {
            Some("crate") => {
                segs.remove(0);
                String::new()
            }
            Some("self") => {
                segs.remove(0);
                here.to_owned()
            }
            Some("super") => {
                let mut b = here.to_owned();
                while segs.first() == Some(&"super") {
                    segs.remove(0);
                    b = parent(&b).to_owned();
                }
                b
            }
            // A bare first segment is a child module of this one, or an external crate.
            Some(first) if self.files.contains_key(&join(here, first)) => here.to_owned(),
            _ => return None,
        };
        let mut found = None;
        for s in segs {
            base = join(&base, s);
            if self.files.contains_key(&base) {
                found = Some(base.clone());
            } else {
                break;
            }
        }
        found.or_else(|| self.files.contains_key(&base).then_some(base))
    }

    fn edges(&self) -> BTreeMap<Module, BTreeMap<Module, String>> {
        let mut all = BTreeMap::new();
        for (here, file) in &self.files {
            let src = code(&std::fs::read_to_string(file).unwrap());
            let mut to: BTreeMap<Module, String> = BTreeMap::new();
            let mut add = |m: Option<Module>, what: &str| {
                if let Some(m) = m {
                    // Its own folder's root (and the crate root) is the house, not a room.
                    let ancestor = m.is_empty() || here.starts_with(&format!("{m}::"));
                    if m != *here && !ancestor {
                        to.entry(m).or_insert_with(|| what.to_owned());
                    }
                }
            };
            // `use` statements, braces expanded; re-exports of a child are the folder's door.
            let mut rest = src.as_str();
            let mut without_uses = String::new();
            while let Some(at) = find_use(rest) {
                without_uses.push_str(&rest[..at]);
                let stmt_start = &rest[at..];
                let end = stmt_start.find(';').unwrap_or(stmt_start.len());
                let stmt = &stmt_start[..end];
                let reexport =
                    rest[..at].trim_end().ends_with("pub") || rest[..at].trim_end().ends_with(')');
                let tree = stmt.trim_start_matches("use").trim();
                for path in expand(tree) {
                    let m = self.resolve(here, &path);
                    let child = m.as_deref().is_some_and(|m| parent(m) == here);
                    if !(reexport && child) {
                        add(m, &format!("use {path}"));
                    }
                }
                rest = &stmt_start[end..];
            }
            without_uses.push_str(rest);
            let src = without_uses;
            // Inline paths: `crate::a::b`, `super::a`, `child::f`.
            let bytes = src.as_bytes();
            let mut i = 0;
            while i < src.len() {
                let c = bytes[i] as char;
                let boundary = i == 0 || {
                    let p = bytes[i - 1] as char;
                    !(p.is_alphanumeric() || p == '_' || p == ':')
                };
                if boundary && (c.is_ascii_lowercase() || c == '_') {
                    let len = src[i..]
                        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                        .unwrap_or(src.len() - i);
                    let path = src[i..i + len].trim_end_matches(':');
                    if path.contains("::") {
                        add(self.resolve(here, path), path);
                    }
                    i += len.max(1);
                } else {
                    i += 1;
                }
            }
            all.insert(here.clone(), to);
        }
        all
    }
}

/// The next `use` keyword that starts a statement.
fn find_use(s: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = s[from..].find("use ") {
        let at = from + i;
        let before = s[..at].chars().last();
        if before.is_none_or(|c| c.is_whitespace() || c == ';' || c == '{' || c == '}') {
            return Some(at);
        }
        from = at + 4;
    }
    None
}

fn layer_of(layers: &[&[&str]], m: &str) -> Option<usize> {
    let top = m.split("::").next().unwrap_or("");
    layers.iter().position(|l| l.contains(&top))
}

/// Strongly connected components with more than one file (Tarjan).
fn circles(edges: &BTreeMap<Module, BTreeMap<Module, String>>) -> Vec<Vec<Module>> {
    struct T<'a> {
        e: &'a BTreeMap<Module, BTreeMap<Module, String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<Module>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let n = t.index.len();
        t.index.insert(v, n);
        t.low.insert(v, n);
        t.stack.push(v);
        t.on.insert(v);
        for w in t.e.get(v).into_iter().flat_map(|m| m.keys()) {
            if !t.index.contains_key(w.as_str()) {
                visit(t, w);
                let lw = t.low[w.as_str()];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if t.on.contains(w.as_str()) {
                let iw = t.index[w.as_str()];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = t.stack.pop().unwrap();
                t.on.remove(w);
                comp.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        e: edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

#[test]
fn no_import_circles_and_no_import_runs_back_up() {
    let mut problems = Vec::new();
    for (name, layers) in CRATES {
        let Some(krate) = load(name) else {
            problems.push(format!("{name}: no such crate folder"));
            continue;
        };
        let edges = krate.edges();
        for c in circles(&edges) {
            let how: Vec<String> = c
                .iter()
                .flat_map(|a| {
                    edges[a]
                        .iter()
                        .filter(|(b, _)| c.contains(b))
                        .map(move |(b, what)| format!("{a} → {b} ({what})"))
                })
                .collect();
            problems.push(format!(
                "{name}: import circle {}: {}",
                c.join(", "),
                how.join("; ")
            ));
        }
        for (from, to) in &edges {
            let Some(lf) = layer_of(layers, from) else {
                if !from.is_empty() {
                    problems.push(format!("{name}: {from} is in no declared layer"));
                }
                continue;
            };
            for (m, what) in to {
                if layer_of(layers, m).is_some_and(|lt| lt > lf) {
                    problems.push(format!(
                        "{name}: {from} imports {m}, which is above it ({what})"
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "the house rules are broken:\n  {}",
        problems.join("\n  ")
    );
}

/// The checker itself finds what it must: a circle, an upward import, a re-export ignored.
#[test]
fn the_checker_sees_circles_and_upward_imports() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("low")).unwrap();
    std::fs::write(src.join("lib.rs"), "pub use low::X;\nmod low;\nmod high;\n").unwrap();
    std::fs::write(
        src.join("low/mod.rs"),
        "// use crate::high; (a comment)\nmod a;\npub use a::X;\nfn f() { crate::high::g(); }\n",
    )
    .unwrap();
    std::fs::write(src.join("low/a.rs"), "use super::b::{self, Y};\n").unwrap();
    std::fs::write(src.join("low/b.rs"), "use crate::low::a::X;\n").unwrap();
    std::fs::write(
        src.join("high.rs"),
        "use crate::low;\n#[cfg(test)]\nmod tests { use crate::nothing; }\n",
    )
    .unwrap();
    let mut files = BTreeMap::new();
    for (m, f) in [
        ("", "lib.rs"),
        ("low", "low/mod.rs"),
        ("low::a", "low/a.rs"),
        ("low::b", "low/b.rs"),
        ("high", "high.rs"),
    ] {
        files.insert(m.to_owned(), src.join(f));
    }
    let edges = Crate { files }.edges();
    assert_eq!(
        circles(&edges),
        vec![
            vec!["high".to_owned(), "low".to_owned()],
            vec!["low::a".to_owned(), "low::b".to_owned()],
        ]
    );
    assert!(edges["low"].contains_key("high"), "{edges:?}");
    assert!(
        !edges["low"].contains_key("low::a"),
        "a re-export is no edge"
    );
    assert!(edges[""].is_empty(), "{edges:?}");
    assert_eq!(edges["high"].keys().collect::<Vec<_>>(), ["low"]);
    let layers: &[&[&str]] = &[&["low"], &["high"]];
    assert!(layer_of(layers, "low") < layer_of(layers, "high"));
}
