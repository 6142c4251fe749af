//! A byte-level compressed radix tree over path prefixes.
//!
//! Each node may carry entries (the routes whose static prefix ends there).
//! A lookup walks the request path once and yields the entries of every
//! prefix it passes, deepest first, so its cost grows with the path's length,
//! not with the number of routes.

#[derive(Debug)]
pub(crate) struct Trie<T> {
    nodes: Vec<Node<T>>,
}

#[derive(Debug)]
struct Node<T> {
    label: Box<[u8]>,
    /// First byte of each child's label, parallel to `children`.
    first: Vec<u8>,
    children: Vec<u32>,
    entries: Vec<T>,
}

impl<T> Node<T> {
    fn new(label: &[u8]) -> Self {
        Node {
            label: label.into(),
            first: Vec::new(),
            children: Vec::new(),
            entries: Vec::new(),
        }
    }

    fn child(&self, b: u8) -> Option<u32> {
        self.first
            .iter()
            .position(|&f| f == b)
            .map(|i| self.children[i])
    }
}

impl<T> Default for Trie<T> {
    fn default() -> Self {
        Trie {
            nodes: vec![Node::new(b"")],
        }
    }
}

impl<T> Trie<T> {
    /// The entries stored at exactly `key`, created empty if absent.
    pub(crate) fn entry(&mut self, key: &[u8]) -> &mut Vec<T> {
        let mut at = 0usize;
        let mut rest = key;
        loop {
            if rest.is_empty() {
                return &mut self.nodes[at].entries;
            }
            let Some(child) = self.nodes[at].child(rest[0]) else {
                let new = self.push(Node::new(rest));
                self.link(at, new);
                return &mut self.nodes[new as usize].entries;
            };
            let child = child as usize;
            let common = common_prefix(&self.nodes[child].label, rest);
            if common < self.nodes[child].label.len() {
                self.split(child, common);
            }
            at = child;
            rest = &rest[common..];
        }
    }

    fn push(&mut self, node: Node<T>) -> u32 {
        self.nodes.push(node);
        (self.nodes.len() - 1) as u32
    }

    fn link(&mut self, parent: usize, child: u32) {
        let b = self.nodes[child as usize].label[0];
        self.nodes[parent].first.push(b);
        self.nodes[parent].children.push(child);
    }

    /// Splits `node`'s label at `at`: the node keeps the head and a new child
    /// takes the tail with the old children and entries.
    fn split(&mut self, node: usize, at: usize) {
        let tail_label = self.nodes[node].label[at..].to_vec();
        let head_label = self.nodes[node].label[..at].to_vec();
        let mut tail = Node::new(&tail_label);
        let old = &mut self.nodes[node];
        std::mem::swap(&mut tail.first, &mut old.first);
        std::mem::swap(&mut tail.children, &mut old.children);
        std::mem::swap(&mut tail.entries, &mut old.entries);
        old.label = head_label.into();
        let tail = self.push(tail);
        self.link(node, tail);
    }

    /// Calls `visit` with the entries of every stored prefix of `key`, the
    /// longest first, until it returns `Some`.
    pub(crate) fn find_deepest<R>(
        &self,
        key: &[u8],
        mut visit: impl FnMut(&[T], usize) -> Option<R>,
    ) -> Option<R> {
        // Nodes on the path, with the key length consumed at each. Paths are
        // short: a fixed array keeps the walk free of allocation, and a
        // deeper path spills into a vector rather than losing nodes.
        let mut stack = [(0u32, 0usize); 32];
        let mut spill: Vec<(u32, usize)> = Vec::new();
        let mut depth = 0;
        let mut at = 0usize;
        let mut consumed = 0usize;
        loop {
            if depth < stack.len() {
                stack[depth] = (at as u32, consumed);
            } else {
                spill.push((at as u32, consumed));
            }
            depth += 1;
            let rest = &key[consumed..];
            let Some(child) = rest.first().and_then(|&b| self.nodes[at].child(b)) else {
                break;
            };
            let label = &self.nodes[child as usize].label;
            if !rest.starts_with(label) {
                break;
            }
            consumed += label.len();
            at = child as usize;
        }
        let kept = depth.min(stack.len());
        spill
            .iter()
            .rev()
            .chain(stack[..kept].iter().rev())
            .find_map(|&(node, len)| {
                let entries = &self.nodes[node as usize].entries;
                if entries.is_empty() {
                    None
                } else {
                    visit(entries, len)
                }
            })
    }

    /// Every entry list, for post-processing after building.
    pub(crate) fn entries_mut(&mut self) -> impl Iterator<Item = &mut Vec<T>> {
        self.nodes.iter_mut().map(|n| &mut n.entries)
    }
}

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trie(keys: &[&str]) -> Trie<&'static str> {
        let mut t = Trie::default();
        for k in keys {
            let leaked: &'static str = Box::leak(k.to_string().into_boxed_str());
            t.entry(k.as_bytes()).push(leaked);
        }
        t
    }

    fn all(t: &Trie<&'static str>, key: &str) -> Vec<&'static str> {
        let mut out = Vec::new();
        t.find_deepest::<()>(key.as_bytes(), |e, _| {
            out.extend_from_slice(e);
            None
        });
        out
    }

    #[test]
    fn yields_prefixes_longest_first() {
        let t = trie(&["/", "/blog/", "/blog/foo", "/blog/bar", "/b"]);
        assert_eq!(
            all(&t, "/blog/foo/x"),
            vec!["/blog/foo", "/blog/", "/b", "/"]
        );
        assert_eq!(all(&t, "/blog/ba"), vec!["/blog/", "/b", "/"]);
        assert_eq!(all(&t, "/c"), vec!["/"]);
    }

    #[test]
    fn split_keeps_existing_entries() {
        let t = trie(&["/abcdef", "/abc", "/abxy"]);
        assert_eq!(all(&t, "/abcdefg"), vec!["/abcdef", "/abc"]);
        assert_eq!(all(&t, "/abxyz"), vec!["/abxy"]);
    }

    #[test]
    fn deep_paths_keep_every_prefix() {
        let keys: Vec<String> = (1..80).map(|n| "/a".repeat(n)).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let t = trie(&refs);
        let found = all(&t, &"/a".repeat(100));
        assert_eq!(found.len(), 79);
        assert_eq!(found[0].len(), 158);
        assert_eq!(found[78], "/a");
    }

    #[test]
    fn reports_consumed_length() {
        let t = trie(&["/api/"]);
        let len = t.find_deepest(b"/api/v1", |_, len| Some(len));
        assert_eq!(len, Some(5));
    }
}
