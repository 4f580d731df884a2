//! Where a problem of a flow is in its JSON text: the line and column of the value a problem's
//! path names, else of its edge or its node.
//!
//! A flow is read from a parsed value (so that every node, edge and trigger is read on its own,
//! and every problem is reported), and a value has no lines. When the text is at hand (a
//! request body, a file), the places are found afterwards in it. serde_json keeps no spans, so
//! this walks the text once with [`RawValue`]s, which borrow their slice of it: a slice's
//! address less the text's is its offset. The walk is linear in the text whatever the number
//! of problems: the top object and the three arrays are split once, only the element of a
//! problem's path is descended, and lines are found by a binary search of their starts.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::{CompileError, Problem};

impl CompileError {
    /// Places each problem in `text`, the JSON document the flow was read from: its `line`
    /// and `column` are those of the value its path names, else of its edge, else of its
    /// node. Linear in the text, whatever the number of problems.
    ///
    /// ```
    /// let text = "{\"nodes\": [\n  {\"id\": \"a\", \"type\": \"noop\", \"retyr\": 3}\n]}";
    /// let value = serde_json::from_str(text).unwrap();
    /// let e = flowcore::FlowDef::from_value_all(value).unwrap_err().locate(text.as_bytes());
    /// assert_eq!((e.problems[0].line, e.problems[0].column), (Some(2), Some(40)));
    /// assert!(e.problems[0].to_string().starts_with("node `a` (line 2, column 40): `nodes[0].retyr`"));
    /// ```
    #[must_use]
    pub fn locate(mut self, text: &[u8]) -> Self {
        locate(&mut self.problems, text);
        self
    }
}

/// Sets `line` and `column` of each problem in `problems` that has none, from `text`, the flow
/// document they were found in. A problem is placed at the value its `path` names (the deepest
/// part of it that the text has), else at its edge (`edges[i]`), else at its node (the first
/// node with its id). Problems about the whole flow, and any text that is not a JSON object,
/// are left without a place.
fn locate(problems: &mut [Problem], text: &[u8]) {
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let Ok(top) = serde_json::from_str::<HashMap<String, &RawValue>>(text) else {
        return;
    };
    let index = Index::new(text, &top);
    for problem in problems.iter_mut().filter(|p| p.line.is_none()) {
        let at = match (&problem.path, problem.edge, &problem.node) {
            (Some(path), _, _) => index.path(path),
            (None, Some(edge), _) => index.element("edges", edge),
            (None, None, Some(node)) => index.node(node),
            (None, None, None) => None,
        };
        if let Some(offset) = at {
            let (line, column) = index.line_column(offset);
            problem.line = Some(line);
            problem.column = Some(column);
        }
    }
}

/// The text, its top object, its arrays split into elements, and where its lines start.
struct Index<'a> {
    text: &'a str,
    top: &'a HashMap<String, &'a RawValue>,
    arrays: HashMap<&'static str, Vec<&'a RawValue>>,
    node_ids: HashMap<String, usize>,
    line_starts: Vec<usize>,
}

/// A node's `id` and nothing else (its other fields are skipped, not kept).
#[derive(Deserialize)]
struct IdOnly {
    id: Option<String>,
}

impl<'a> Index<'a> {
    fn new(text: &'a str, top: &'a HashMap<String, &'a RawValue>) -> Self {
        let mut arrays = HashMap::new();
        for field in ["nodes", "edges", "triggers"] {
            if let Some(raw) = top.get(field)
                && let Ok(items) = serde_json::from_str::<Vec<&RawValue>>(raw.get())
            {
                arrays.insert(field, items);
            }
        }
        let mut node_ids = HashMap::new();
        for (i, node) in arrays.get("nodes").into_iter().flatten().enumerate() {
            if let Ok(IdOnly { id: Some(id) }) = serde_json::from_str(node.get()) {
                node_ids.entry(id).or_insert(i);
            }
        }
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self {
            text,
            top,
            arrays,
            node_ids,
            line_starts,
        }
    }

    /// The offset of `raw`, a slice of the text.
    fn offset(&self, raw: &RawValue) -> usize {
        raw.get().as_ptr() as usize - self.text.as_ptr() as usize
    }

    fn element(&self, field: &str, i: usize) -> Option<usize> {
        Some(self.offset(self.arrays.get(field)?.get(i)?))
    }

    fn node(&self, id: &str) -> Option<usize> {
        self.element("nodes", *self.node_ids.get(id)?)
    }

    /// The offset of the deepest value of `path` (`nodes[1].retry.max_attempts`, `settings`,
    /// `the top`) that the text has.
    fn path(&self, path: &str) -> Option<usize> {
        let mut steps = segments(path).into_iter().peekable();
        let mut at: &RawValue = match steps.next() {
            Some(Segment::Key(key)) => match self.top.get(key) {
                Some(raw) => raw,
                None => return Some(self.top_offset()),
            },
            _ => return Some(self.top_offset()),
        };
        if let Some(Segment::Index(i)) = steps.peek()
            && let Some(items) = self.arrays.get(first_key(path))
        {
            let Some(item) = items.get(*i) else {
                return Some(self.offset(at));
            };
            at = item;
            steps.next();
        }
        // A flow's fields nest at most 4 deep under an element (`settings.retention.days`);
        // a deeper path is an unknown key full of dots, and each step parses its value again.
        for step in steps.take(4) {
            let next = match step {
                Segment::Key(key) => serde_json::from_str::<HashMap<String, &RawValue>>(at.get())
                    .ok()
                    .and_then(|map| map.get(key).copied()),
                Segment::Index(i) => serde_json::from_str::<Vec<&RawValue>>(at.get())
                    .ok()
                    .and_then(|items| items.get(i).copied()),
            };
            match next {
                Some(raw) => at = raw,
                None => break,
            }
        }
        Some(self.offset(at))
    }

    /// Where the top object starts (after any leading white space).
    fn top_offset(&self) -> usize {
        self.text.len() - self.text.trim_start().len()
    }

    /// The 1-based line and column (in bytes, as serde_json counts them) of `offset`.
    fn line_column(&self, offset: usize) -> (usize, usize) {
        let line = self.line_starts.partition_point(|&start| start <= offset);
        (line, offset - self.line_starts[line - 1] + 1)
    }
}

/// One step of a path as serde_path_to_error writes it.
#[derive(Debug, PartialEq)]
enum Segment<'p> {
    Key(&'p str),
    Index(usize),
}

fn first_key(path: &str) -> &str {
    path.split(['.', '[']).next().unwrap_or_default()
}

/// `nodes[1].retry` as `[Key("nodes"), Index(1), Key("retry")]`; `the top` and `.` as none.
fn segments(path: &str) -> Vec<Segment<'_>> {
    if path == "the top" || path == "." {
        return Vec::new();
    }
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
        if !key.is_empty() {
            out.push(Segment::Key(key));
        }
        while let Some((n, after)) = rest.split_once(']') {
            match n.parse() {
                Ok(i) => out.push(Segment::Index(i)),
                Err(_) => return out,
            }
            rest = after.strip_prefix('[').unwrap_or(after);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed(text: &str, mut problem: Problem) -> (Option<usize>, Option<usize>) {
        locate(std::slice::from_mut(&mut problem), text.as_bytes());
        (problem.line, problem.column)
    }

    #[test]
    fn paths_read_as_serde_path_to_error_writes_them() {
        use Segment::*;
        assert_eq!(
            segments("nodes[1].retry.max_attempts"),
            [Key("nodes"), Index(1), Key("retry"), Key("max_attempts")]
        );
        assert_eq!(segments("a[2][3]"), [Key("a"), Index(2), Index(3)]);
        assert_eq!(segments("the top"), []);
    }

    #[test]
    fn a_problem_is_placed_by_its_path_its_edge_or_its_node() {
        let text = "{\n  \"nodes\": [\n    {\"id\": \"a\", \"type\": \"noop\"},\n    {\"id\": \"b\", \"retry\": {\"max_attempts\": \"x\"}}\n  ],\n  \"edges\": [{\"from\": \"a\", \"to\": \"b\"}]\n}";
        let at_path = Problem {
            path: Some("nodes[1].retry.max_attempts".into()),
            ..Problem::flow("p")
        };
        assert_eq!(placed(text, at_path), (Some(4), Some(43)));
        assert_eq!(placed(text, Problem::edge(0, "e")), (Some(6), Some(13)));
        assert_eq!(placed(text, Problem::node("b", "n")), (Some(4), Some(5)));
        // A path the text lacks past some point is placed at its deepest part there.
        let missing = Problem {
            path: Some("nodes[1].retry.backoff_ms".into()),
            ..Problem::flow("p")
        };
        assert_eq!(placed(text, missing), (Some(4), Some(26)));
        let top = Problem {
            path: Some("the top".into()),
            ..Problem::flow("p")
        };
        assert_eq!(placed(text, top), (Some(1), Some(1)));
        assert_eq!(placed(text, Problem::flow("whole")), (None, None));
        assert_eq!(placed("[1]", Problem::node("a", "n")), (None, None));
    }

    /// The most problems a request gets: a flow of the most nodes a flow may have, each with a
    /// problem, lists the first [`MAX_PROBLEMS`](crate::error::MAX_PROBLEMS), each placed on
    /// its own line, and counts the rest; a flow over the bounds is one problem.
    #[test]
    fn the_problems_of_the_largest_flow_are_capped_and_placed() {
        use crate::error::MAX_PROBLEMS;
        let nodes: Vec<String> = (0..20_000)
            .map(|i| format!("{{\"id\": \"n{i}\", \"type\": \"noop\", \"typo\": {i}}}"))
            .collect();
        let text = format!("{{\"nodes\": [\n{}\n]}}", nodes.join(",\n"));
        let value = serde_json::from_str(&text).unwrap();
        let e = crate::FlowDef::from_value_all(value)
            .unwrap_err()
            .locate(text.as_bytes());
        assert_eq!(e.problems.len(), MAX_PROBLEMS + 1);
        for (i, p) in e.problems[..MAX_PROBLEMS].iter().enumerate() {
            assert_eq!(p.line, Some(i + 2), "{p}");
            assert_eq!(p.column, Some(37 + i.to_string().len()), "{p}");
        }
        assert_eq!(
            e.problems[MAX_PROBLEMS].problem,
            "and 19900 more problems, not listed"
        );

        let edges = serde_json::json!({"nodes": [], "edges": vec![0; 100_001]});
        let e = crate::FlowDef::from_value_all(edges).unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        assert!(
            e.problems[0].problem.starts_with("a flow has at most"),
            "{e}"
        );
    }

    /// An unknown key is quoted cut short, and a key full of dots is not a deep path to walk.
    #[test]
    fn a_huge_key_is_cut_short_and_not_walked() {
        let key = "params.x".repeat(100_000);
        let text = format!("{{\"nodes\": [{{\"id\": \"a\", \"type\": \"noop\", \"{key}\": 1}}]}}");
        let value = serde_json::from_str(&text).unwrap();
        let e = crate::FlowDef::from_value_all(value)
            .unwrap_err()
            .locate(text.as_bytes());
        let p = &e.problems[0];
        assert!(p.path.as_ref().is_some_and(|path| path.len() <= 131), "{p}");
        assert!(p.problem.len() < 700, "{}", p.problem.len());
        assert_eq!((p.line, p.column), (Some(1), Some(12)), "{p}");
    }
}
