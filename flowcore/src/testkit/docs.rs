//! Reading the examples of a Markdown page, for the tests that run every example of the
//! docs (`docs/flows.md`, `docs/api.md`).

/// The fenced blocks of a Markdown text, in order: each one's info string (what follows the
/// opening fence, trimmed: `json flow`, `http`) and its body, every line ending in `\n`.
///
/// ```
/// let page = "Text.\n\n```json run\n{\"input\": {}}\n```\n";
/// let blocks = flowcore::testkit::docs::fenced_blocks(page);
/// assert_eq!(blocks, vec![("json run".to_owned(), "{\"input\": {}}\n".to_owned())]);
/// ```
pub fn fenced_blocks(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut open: Option<(String, String)> = None;
    for line in text.lines() {
        match (&mut open, line.strip_prefix("```")) {
            (None, Some(info)) => open = Some((info.trim().to_owned(), String::new())),
            (Some(_), Some(_)) => out.extend(open.take()),
            (Some((_, body)), None) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, None) => {}
        }
    }
    out
}
