//! Parsers of the three dataset formats. Every error names the file and the 1-based line.

use std::collections::BTreeMap;

use super::{DatasetError, Example};

fn parse_err(file: &str, line: usize, reason: impl Into<String>) -> DatasetError {
    DatasetError::Parse { file: file.into(), line, reason: reason.into() }
}

fn utf8<'a>(file: &str, bytes: &'a [u8]) -> Result<&'a str, DatasetError> {
    std::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()].iter().filter(|b| **b == b'\n').count() + 1;
        parse_err(file, line, "not valid UTF-8")
    })
}

/// The most bytes an utterance may have: an intent is said in a sentence or two, and one huge
/// "utterance" (a whole document in a cell) made rows of as many features as it has n-grams.
pub const MAX_TEXT_BYTES: usize = 2_000;
/// The most bytes a label may have.
pub const MAX_LABEL_BYTES: usize = 200;

/// Why a row's text or label cannot be used, if it cannot (both are trimmed first).
fn row_problem(text: &str, label: &str) -> Option<String> {
    let (text, label) = (text.trim(), label.trim());
    if text.is_empty() {
        return Some("empty text".into());
    }
    if label.is_empty() {
        return Some("empty label".into());
    }
    if text.len() > MAX_TEXT_BYTES {
        return Some(format!(
            "a text of {} bytes, over the {MAX_TEXT_BYTES} an utterance may have: shorten it or leave it out",
            text.len()
        ));
    }
    if label.len() > MAX_LABEL_BYTES {
        return Some(format!("a label of {} bytes, over the {MAX_LABEL_BYTES} a label may have", label.len()));
    }
    None
}

fn check_example(file: &str, line: usize, text: &str, label: &str) -> Result<Example, DatasetError> {
    match row_problem(text, label) {
        Some(reason) => Err(parse_err(file, line, reason)),
        None => Ok(Example::new(text.trim(), label.trim())),
    }
}

/// CLINC150 JSON: an object of splits, each a list of `[text, label]` pairs.
pub(super) fn clinc(file: &str, bytes: &[u8]) -> Result<BTreeMap<String, Vec<Example>>, DatasetError> {
    let text = utf8(file, bytes)?;
    let doc: BTreeMap<String, Vec<(String, String)>> = serde_json::from_str(text)
        .map_err(|e| parse_err(file, e.line().max(1), format!("expected an object of splits, each a list of [text, label] pairs: {e}")))?;
    let mut out = BTreeMap::new();
    for (split, pairs) in doc {
        let mut v = Vec::with_capacity(pairs.len());
        for (i, (t, l)) in pairs.into_iter().enumerate() {
            // JSON has no row lines: report the entry's position in its split instead.
            if let Some(problem) = row_problem(&t, &l) {
                return Err(parse_err(file, line_of_entry(text, &split, i), format!("split {split:?} entry {i}: {problem}")));
            }
            v.push(Example::new(t.trim(), l.trim()));
        }
        out.insert(split, v);
    }
    Ok(out)
}

/// Best-effort line of entry `i` of `split` in a CLINC document (entries one per line, as in the published files).
fn line_of_entry(text: &str, split: &str, i: usize) -> usize {
    let key = format!("\"{split}\"");
    let Some(start) = text.find(&key) else { return 1 };
    let before = text[..start].matches('\n').count() + 1;
    // Count entry openings `[` after the split's own `[`.
    let mut depth = 0usize;
    let mut seen = 0usize;
    let mut line = before;
    for c in text[start..].chars() {
        match c {
            '\n' => line += 1,
            '[' => {
                depth += 1;
                if depth == 2 {
                    if seen == i {
                        return line;
                    }
                    seen += 1;
                }
            }
            ']' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    break;
                }
            }
            _ => {}
        }
    }
    before
}

/// CSV with a header row; `text_column` (default `text`) and `label_column` (default `label`).
pub(super) fn csv(file: &str, bytes: &[u8], text_col: Option<&str>, label_col: Option<&str>) -> Result<Vec<Example>, DatasetError> {
    utf8(file, bytes)?;
    let (text_col, label_col) = (text_col.unwrap_or("text"), label_col.unwrap_or("label"));
    let mut rdr = csv::ReaderBuilder::new().has_headers(true).flexible(false).from_reader(bytes);
    let headers = rdr.headers().map_err(|e| parse_err(file, 1, format!("cannot read the header row: {e}")))?.clone();
    let find = |name: &str, param: &str| {
        headers.iter().position(|h| h.trim() == name).ok_or_else(|| {
            parse_err(file, 1, format!("no column {name:?} in the header {:?}; set `{param}`", headers.iter().collect::<Vec<_>>()))
        })
    };
    let (ti, li) = (find(text_col, "text_column")?, find(label_col, "label_column")?);
    let mut out = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| {
            let line = e.position().map(|p| p.line() as usize).unwrap_or(0);
            parse_err(file, line, format!("malformed row: {e}"))
        })?;
        let line = rec.position().map(|p| p.line() as usize).unwrap_or(0);
        let (t, l) = (rec.get(ti).unwrap_or(""), rec.get(li).unwrap_or(""));
        out.push(check_example(file, line, t, l)?);
    }
    Ok(out)
}

/// JSON Lines: one object per line with `text_column` (default `text`) and `label_column`
/// (default `intent`, then `label`). Blank lines are skipped.
pub(super) fn jsonl(file: &str, bytes: &[u8], text_col: Option<&str>, label_col: Option<&str>) -> Result<Vec<Example>, DatasetError> {
    let text = utf8(file, bytes)?;
    let text_col = text_col.unwrap_or("text");
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let obj: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(raw).map_err(|e| parse_err(file, line, format!("not a JSON object: {e}")))?;
        let get = |k: &str| obj.get(k).and_then(|v| v.as_str());
        let t = get(text_col).ok_or_else(|| parse_err(file, line, format!("missing string field {text_col:?}")))?;
        let l = match label_col {
            Some(c) => get(c).ok_or_else(|| parse_err(file, line, format!("missing string field {c:?}")))?,
            None => get("intent")
                .or_else(|| get("label"))
                .ok_or_else(|| parse_err(file, line, "missing string field \"intent\" (or \"label\")"))?,
        };
        out.push(check_example(file, line, t, l)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line_of(e: DatasetError) -> usize {
        match e {
            DatasetError::Parse { line, .. } => line,
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn csv_rows_and_errors() {
        let ok = csv("d.csv", b"text,label\nhello there,greet\n\"bye, now\",bye\n", None, None).unwrap();
        assert_eq!(ok, vec![Example::new("hello there", "greet"), Example::new("bye, now", "bye")]);
        let mapped = csv("d.csv", b"utt,intent\nhi,greet\n", Some("utt"), Some("intent")).unwrap();
        assert_eq!(mapped[0].label, "greet");
        assert_eq!(line_of(csv("d.csv", b"text,label\nhi,greet\nbad row,x,y\n", None, None).unwrap_err()), 3);
        assert_eq!(line_of(csv("d.csv", b"text,label\nhi,greet\nok,fine\n,empty\n", None, None).unwrap_err()), 4);
        assert_eq!(line_of(csv("d.csv", b"utt,label\nhi,greet\n", None, None).unwrap_err()), 1);
    }

    #[test]
    fn jsonl_rows_and_errors() {
        let ok =
            jsonl("d.jsonl", b"{\"text\":\"hi\",\"intent\":\"greet\"}\n\n{\"text\":\"yo\",\"label\":\"greet\"}\n", None, None).unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(line_of(jsonl("d.jsonl", b"{\"text\":\"hi\",\"intent\":\"g\"}\n{oops\n", None, None).unwrap_err()), 2);
        assert_eq!(line_of(jsonl("d.jsonl", b"{\"text\":\"hi\",\"intent\":\"g\"}\n\n{\"text\":\"x\"}\n", None, None).unwrap_err()), 3);
    }

    #[test]
    fn clinc_splits_and_errors() {
        let doc = b"{\n \"train\": [\n  [\"hi\", \"greet\"],\n  [\"bye\", \"bye\"]\n ],\n \"oos_train\": [\n  [\"what\", \"oos\"]\n ]\n}";
        let named = clinc("c.json", doc).unwrap();
        assert_eq!(named["train"].len(), 2);
        assert_eq!(named["oos_train"][0].label, "oos");
        let bad = b"{\n \"train\": [\n  [\"hi\", \"greet\"],\n  [\"bye\"]\n ]\n}";
        assert_eq!(line_of(clinc("c.json", bad).unwrap_err()), 4);
        let empty = b"{\n \"train\": [\n  [\"hi\", \"greet\"],\n  [\"\", \"bye\"]\n ]\n}";
        assert_eq!(line_of(clinc("c.json", empty).unwrap_err()), 4);
    }

    /// A whole document in a cell, or a label as long as one, is refused naming its line: the
    /// device path pads every row to the longest one's features.
    #[test]
    fn a_text_or_label_over_its_limit_is_refused_naming_the_line() {
        let long = "word ".repeat(MAX_TEXT_BYTES / 5 + 1);
        let doc = format!("text,label\nhi,greet\n{long},greet\n");
        let e = csv("d.csv", doc.as_bytes(), None, None).unwrap_err();
        assert!(e.to_string().contains("line 3") && e.to_string().contains("over the 2000"), "{e}");
        let at_limit = format!("text,label\nhi,greet\n{},greet\n", "x".repeat(MAX_TEXT_BYTES));
        assert_eq!(csv("d.csv", at_limit.as_bytes(), None, None).unwrap().len(), 2);
        let label = "l".repeat(MAX_LABEL_BYTES + 1);
        let doc = format!("{{\"text\":\"hi\",\"intent\":\"{label}\"}}\n");
        assert!(jsonl("d.jsonl", doc.as_bytes(), None, None).unwrap_err().to_string().contains("a label of 201 bytes"));
        let doc = format!("{{\n \"train\": [\n  [\"hi\", \"greet\"],\n  [\"{long}\", \"bye\"]\n ]\n}}");
        let e = clinc("c.json", doc.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("entry 1: a text of"), "{e}");
        assert_eq!(line_of(e), 4);
    }
}
