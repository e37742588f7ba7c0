//! The shape of `src/`: imports between its files go one way. Every `crate::` and `super::`
//! path (in `use` lines, inline, in use trees, and in `serde(with = "...")` strings) is
//! resolved to the module file it names, and the graph of those files must have no cycle.
//!
//! Cheap: it reads the sources, builds nothing. A small tokenizer (comments and literals
//! skipped) and a use-tree walker, not a regex; the test module at the end of a file
//! (`#[cfg(test)] mod tests`) is not counted, and neither is a file naming itself.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A token of Rust source that matters for paths.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Ident(String),
    /// A string literal's content, kept for `"crate::a::b"` paths in attributes.
    Str(String),
    Colons,
    Punct(char),
}

/// Splits source into identifiers, `::`, punctuation and string contents; comments, chars,
/// lifetimes and numbers are dropped. Each token carries its line.
fn tokenize(source: &str) -> Vec<(Token, usize)> {
    let chars: Vec<char> = source.chars().collect();
    let (mut tokens, mut i, mut line) = (Vec::new(), 0, 1);
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    line += usize::from(chars[i] == '\n');
                    i += 1;
                }
            }
        } else if c == '"' || (c == 'r' && matches!(next, Some('"') | Some('#'))) {
            let start_line = line;
            let (text, end) = string_literal(&chars, i);
            line += text.matches('\n').count();
            tokens.push((Token::Str(text), start_line));
            i = end;
        } else if c == 'b' && next == Some('"') {
            i += 1;
        } else if c == '\'' {
            i = skip_char_or_lifetime(&chars, i);
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            tokens.push((Token::Ident(chars[start..i].iter().collect()), line));
        } else if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
        } else if c == ':' && next == Some(':') {
            tokens.push((Token::Colons, line));
            i += 2;
        } else {
            if !c.is_whitespace() {
                tokens.push((Token::Punct(c), line));
            }
            i += 1;
        }
    }
    tokens
}

/// A `"..."` or `r#"..."#` literal starting at `start`: its content and the index after it.
fn string_literal(chars: &[char], start: usize) -> (String, usize) {
    let mut i = start;
    if chars[i] == 'r' {
        i += 1;
        let mut hashes = 0;
        while chars[i] == '#' {
            hashes += 1;
            i += 1;
        }
        i += 1; // the opening quote
        let begin = i;
        loop {
            if chars[i] == '"' && chars[i + 1..].iter().take(hashes).all(|&c| c == '#') {
                let text = chars[begin..i].iter().collect();
                return (text, i + 1 + hashes);
            }
            i += 1;
        }
    }
    i += 1;
    let begin = i;
    while chars[i] != '"' {
        i += if chars[i] == '\\' { 2 } else { 1 };
    }
    (chars[begin..i].iter().collect(), i + 1)
}

/// `'a'`, `'\n'`, `'\u{..}'` are chars; `'a` (no closing quote) is a lifetime.
fn skip_char_or_lifetime(chars: &[char], start: usize) -> usize {
    let mut i = start + 1;
    if chars.get(i) == Some(&'\\') {
        while chars.get(i) != Some(&'\'') || i == start + 1 {
            i += 1;
        }
        return i + 1;
    }
    if chars.get(i + 1) == Some(&'\'') {
        return i + 2;
    }
    while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
        i += 1;
    }
    i
}

/// The source without a trailing `#[cfg(test)] mod tests { ... }`.
fn without_test_module(source: &str) -> &str {
    let mut search = source;
    while let Some(at) = search.rfind("#[cfg(test)]") {
        let rest = search[at + "#[cfg(test)]".len()..].trim_start();
        if rest.starts_with("mod tests") {
            return &source[..at];
        }
        search = &search[..at];
    }
    source
}

/// A path found in a file: its segments (from `crate` or `super`) and its line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Found {
    segments: Vec<String>,
    line: usize,
}

/// Every `crate::`/`super::` path in `source`, use trees expanded to one path per leaf.
fn paths(source: &str) -> Vec<Found> {
    let tokens = tokenize(without_test_module(source));
    let mut found = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i].0 {
            Token::Ident(word)
                if (word == "crate" || word == "super")
                    && tokens.get(i + 1).map(|t| &t.0) == Some(&Token::Colons)
                    && !follows_colons(&tokens, i) =>
            {
                i = walk(&tokens, i, Vec::new(), &mut found);
            }
            Token::Str(text) => {
                let segments: Vec<String> = text.split("::").map(str::to_string).collect();
                let is_path = segments.len() > 1
                    && (segments[0] == "crate" || segments[0] == "super")
                    && segments.iter().all(|s| is_ident(s));
                if is_path {
                    found.push(Found {
                        segments,
                        line: tokens[i].1,
                    });
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    found
}

fn follows_colons(tokens: &[(Token, usize)], i: usize) -> bool {
    i > 0 && tokens[i - 1].0 == Token::Colons
}

fn is_ident(text: &str) -> bool {
    !text.is_empty() && text.chars().all(|c| c.is_alphanumeric() || c == '_')
}

/// Reads the path (or use tree) starting at token `i`, with `prefix` before it; pushes each
/// leaf and returns the index after the path.
fn walk(
    tokens: &[(Token, usize)],
    mut i: usize,
    prefix: Vec<String>,
    out: &mut Vec<Found>,
) -> usize {
    let line = tokens[i].1;
    let mut segments = prefix;
    loop {
        match tokens.get(i).map(|t| &t.0) {
            Some(Token::Ident(word)) => {
                segments.push(word.clone());
                i += 1;
            }
            Some(Token::Punct('*')) => {
                i += 1;
                break;
            }
            Some(Token::Punct('{')) => {
                i += 1;
                while !matches!(tokens.get(i).map(|t| &t.0), Some(Token::Punct('}')) | None) {
                    i = walk(tokens, i, segments.clone(), out);
                    if tokens.get(i).map(|t| &t.0) == Some(&Token::Punct(',')) {
                        i += 1;
                    }
                }
                return i + 1;
            }
            _ => break,
        }
        if tokens.get(i).map(|t| &t.0) == Some(&Token::Colons) {
            i += 1;
        } else {
            break;
        }
    }
    // `a as b`: the alias names nothing new.
    if tokens.get(i).map(|t| &t.0) == Some(&Token::Ident("as".into())) {
        i += 2;
    }
    segments.retain(|s| s != "self");
    if !segments.is_empty() {
        out.push(Found { segments, line });
    }
    i
}

/// The module path of a file under `src/`: `lib.rs` is the root, `a/mod.rs` and `a.rs` are `a`.
fn module_of(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("a file name");
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_string());
    }
    parts
}

/// Whether the file is a directory module (`mod.rs`, `lib.rs`): `super` of its children.
fn is_directory_module(relative: &Path) -> bool {
    matches!(
        relative.file_name().and_then(|n| n.to_str()),
        Some("mod.rs") | Some("lib.rs")
    )
}

/// The module file a path names: the longest prefix of its module path that is a file.
fn resolve(
    modules: &BTreeMap<Vec<String>, PathBuf>,
    from: &Path,
    segments: &[String],
) -> Option<PathBuf> {
    let mut base = module_of(from);
    let mut rest = segments;
    if rest.first().map(String::as_str) == Some("crate") {
        base.clear();
        rest = &rest[1..];
    } else {
        // `super` in `a/b.rs` is `a`; in `a/b/mod.rs` it is `a` too (the file is module `a::b`).
        let mut own = base.clone();
        if !is_directory_module(from) || !own.is_empty() {
            own.pop();
        }
        base = own;
        rest = &rest[1..];
        while rest.first().map(String::as_str) == Some("super") {
            base.pop();
            rest = &rest[1..];
        }
    }
    let mut full = base;
    full.extend(rest.iter().cloned());
    (0..=full.len())
        .rev()
        .find_map(|n| modules.get(&full[..n]))
        .cloned()
}

/// An edge of the file graph, with the first path that made it (for the message).
type Graph = BTreeMap<PathBuf, BTreeMap<PathBuf, String>>;

/// The file graph of the sources in `files` (paths relative to `src/`, and their text).
fn graph(files: &[(PathBuf, String)]) -> Graph {
    let test_only = test_only_modules(files);
    let files: Vec<&(PathBuf, String)> = files
        .iter()
        .filter(|(path, _)| !test_only.contains(&module_of(path)))
        .collect();
    let modules: BTreeMap<Vec<String>, PathBuf> = files
        .iter()
        .filter(|(path, _)| path != Path::new("main.rs"))
        .map(|(path, _)| (module_of(path), path.clone()))
        .collect();
    let mut graph = Graph::new();
    for (path, source) in files.iter().filter(|(p, _)| p != Path::new("main.rs")) {
        let edges = graph.entry(path.clone()).or_default();
        for found in paths(source) {
            let Some(target) = resolve(&modules, path, &found.segments) else {
                continue;
            };
            if &target != path {
                let why = format!("{} (line {})", found.segments.join("::"), found.line);
                edges.entry(target).or_insert(why);
            }
        }
    }
    graph
}

/// Modules declared `#[cfg(test)] mod NAME;`: test code in a file of its own.
fn test_only_modules(files: &[(PathBuf, String)]) -> BTreeSet<Vec<String>> {
    let mut found = BTreeSet::new();
    for (path, source) in files {
        let tokens = tokenize(source);
        for window in tokens.windows(9) {
            let words: Vec<&Token> = window.iter().map(|(t, _)| t).collect();
            let declared = words[0] == &Token::Punct('#')
                && words[2] == &Token::Ident("cfg".into())
                && words[4] == &Token::Ident("test".into())
                && words[7] == &Token::Ident("mod".into());
            if let (true, Token::Ident(name)) = (declared, words[8]) {
                let mut module = module_of(path);
                module.push(name.clone());
                found.insert(module);
            }
        }
    }
    found
}

/// One cycle per strongly connected group of files, as "a -> b (why) -> a".
fn cycles(graph: &Graph) -> Vec<String> {
    let mut reported: BTreeSet<PathBuf> = BTreeSet::new();
    let mut found = Vec::new();
    for start in graph.keys() {
        if reported.contains(start) {
            continue;
        }
        if let Some(cycle) = shortest_cycle(graph, start) {
            let mut text = start.display().to_string();
            for pair in cycle.windows(2) {
                let why = &graph[&pair[0]][&pair[1]];
                text.push_str(&format!(" -> {} [{why}]", pair[1].display()));
            }
            reported.extend(cycle);
            found.push(text);
        }
    }
    found
}

/// The shortest path from `start` back to itself (breadth first), nodes in order.
fn shortest_cycle(graph: &Graph, start: &PathBuf) -> Option<Vec<PathBuf>> {
    let mut came_from: BTreeMap<PathBuf, PathBuf> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start.clone()]);
    while let Some(node) = queue.pop_front() {
        for next in graph.get(&node).into_iter().flat_map(|e| e.keys()) {
            if next == start {
                let mut path = vec![start.clone(), node.clone()];
                let mut at = node.clone();
                while let Some(prev) = came_from.get(&at) {
                    path.insert(1, prev.clone());
                    at = prev.clone();
                }
                if path[1] == *start {
                    path.remove(1);
                }
                path.push(start.clone());
                return Some(path);
            }
            if !came_from.contains_key(next) && next != start {
                came_from.insert(next.clone(), node.clone());
                queue.push_back(next.clone());
            }
        }
    }
    None
}

fn sources(dir: &Path, root: &Path, out: &mut Vec<(PathBuf, String)>) {
    for entry in std::fs::read_dir(dir).expect("readable src directory") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            sources(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).expect("readable source");
            let relative = path.strip_prefix(root).expect("under src").to_path_buf();
            out.push((relative, text));
        }
    }
}

#[test]
fn the_files_of_src_import_each_other_one_way_only() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &root, &mut files);
    assert!(files.len() > 20, "found the sources");
    let cycles = cycles(&graph(&files));
    assert!(
        cycles.is_empty(),
        "import cycles between files of src/:\n{}",
        cycles.join("\n")
    );
}

fn file(path: &str, text: &str) -> (PathBuf, String) {
    (PathBuf::from(path), text.to_string())
}

fn edges(files: &[(PathBuf, String)], from: &str) -> Vec<String> {
    let graph = graph(files);
    graph[Path::new(from)]
        .keys()
        .map(|p| p.display().to_string())
        .collect()
}

#[test]
fn use_trees_resolve_each_leaf_to_the_longest_module_file() {
    let files = [
        file("lib.rs", ""),
        file("cache/mod.rs", ""),
        file("cache/index.rs", ""),
        file(
            "fill.rs",
            "use crate::cache::{index::Index, Cache};\nuse crate::AppState;",
        ),
    ];
    assert_eq!(
        edges(&files, "fill.rs"),
        ["cache/index.rs", "cache/mod.rs", "lib.rs"]
    );
}

#[test]
fn super_is_the_parent_of_a_file_and_of_a_directory_module() {
    let files = [
        file("lib.rs", ""),
        file("a/mod.rs", "use super::Root;"),
        file("a/b.rs", "use super::*;\nfn f() { super::super::x::y(); }"),
        file("x.rs", ""),
    ];
    assert_eq!(edges(&files, "a/b.rs"), ["a/mod.rs", "x.rs"]);
    assert_eq!(edges(&files, "a/mod.rs"), ["lib.rs"]);
}

#[test]
fn inline_paths_and_serde_strings_count_but_comments_and_tests_do_not() {
    let files = [
        file("lib.rs", ""),
        file("a.rs", ""),
        file("b.rs", ""),
        file("c.rs", ""),
        file(
            "d.rs",
            "// crate::a::X\nfn f() { let _ = crate::b::g(); }\n\
             #[serde(with = \"crate::c::de\")]\nstruct S;\nconst T: &str = \"crate::a is text\";\n\
             #[cfg(test)]\nmod tests {\n    use crate::a::X;\n}\n",
        ),
    ];
    assert_eq!(edges(&files, "d.rs"), ["b.rs", "c.rs"]);
}

#[test]
fn modules_declared_for_tests_only_are_not_counted() {
    let files = [
        file("lib.rs", ""),
        file("a/mod.rs", "#[cfg(test)]\nmod standin;\n"),
        file("a/b.rs", "use super::standin::X;"),
        file("a/standin.rs", "use super::b::Y;"),
    ];
    assert!(cycles(&graph(&files)).is_empty());
}

#[test]
fn a_cycle_is_named_file_by_file_with_the_path_that_makes_each_edge() {
    let files = [
        file("lib.rs", ""),
        file("a.rs", "use crate::b::B;"),
        file("b.rs", "fn f(_: crate::a::A) {}"),
        file("c.rs", "use crate::a::A;"),
    ];
    let cycles = cycles(&graph(&files));
    assert_eq!(
        cycles,
        ["a.rs -> b.rs [crate::b::B (line 1)] -> a.rs [crate::a::A (line 1)]"]
    );
}
