//! doc/CONTROL.md's JSON examples against the protocol's types: every
//! message must read as a [`Message`] and every reply as a [`Reply`], and
//! each must write back as it is shown (no field renamed, left over, or
//! missing: a request shows only the fields a client sends, none at its
//! default). The document cannot drift from the code again.

use super::{Message, Reply, ReplyOutcome, Response};
use serde_json::Value;
use std::collections::BTreeSet;

const DOC: &str = include_str!("../../doc/CONTROL.md");

/// The ```json blocks of a Markdown text, with the line each starts on.
fn json_blocks(doc: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in doc.lines().enumerate() {
        match (&mut current, line.trim_end()) {
            (None, "```json") => current = Some((i + 2, String::new())),
            (Some(_), "```") => out.extend(current.take()),
            (Some((_, text)), l) => {
                text.push_str(l);
                text.push('\n');
            }
            (None, _) => {}
        }
    }
    out
}

/// Whether one example reads as its type and writes back unchanged; the
/// reason when not. A block holds one JSON value, or one per line.
fn check(text: &str) -> Result<usize, String> {
    let values: Vec<Value> = match serde_json::from_str::<Value>(text) {
        Ok(v) => vec![v],
        Err(_) => text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| format!("not JSON: {e}: {l}")))
            .collect::<Result<_, _>>()?,
    };
    let n = values.len();
    for v in values {
        let back = if v.get("request").is_some() {
            let m: Message =
                serde_json::from_value(v.clone()).map_err(|e| format!("not a message: {e}"))?;
            serde_json::to_value(&m)
        } else if v.get("ok").is_some() || v.get("error").is_some() {
            let r: Reply =
                serde_json::from_value(v.clone()).map_err(|e| format!("not a reply: {e}"))?;
            texts_match(&r)?;
            serde_json::to_value(&r)
        } else {
            return Err(format!("neither a message nor a reply: {v}"));
        }
        .map_err(|e| e.to_string())?;
        if back != v {
            return Err(format!(
                "writes back differently:\n  doc:  {v}\n  code: {back}"
            ));
        }
    }
    Ok(n)
}

/// The text for a person a reply carries beside its data is the text the
/// daemon makes of that data.
fn texts_match(r: &Reply) -> Result<(), String> {
    let ReplyOutcome::Ok(resp) = &r.outcome else {
        return Ok(());
    };
    match &**resp {
        Response::Detached {
            stop: Some(stop),
            outcome: Some(o),
            ..
        } if *stop != o.to_string() => Err(format!(
            "`stop` {stop:?} is not what the daemon says of {o:?}: {:?}",
            o.to_string()
        )),
        Response::Queued {
            pending,
            change: Some(c),
            ..
        } if *pending != c.describe() => Err(format!(
            "`pending` {pending:?} is not what the daemon says of {c:?}: {:?}",
            c.describe()
        )),
        _ => Ok(()),
    }
}

/// The `op`s of the table of requests.
fn ops_of_table(doc: &str) -> BTreeSet<String> {
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`').map(|(op, _)| op.to_owned()))
        .filter(|op| op.starts_with("pool_") || op.starts_with("volume_") || op == "status")
        .collect()
}

#[test]
fn every_request_of_the_table_has_an_example() {
    let examples: BTreeSet<String> = json_blocks(DOC)
        .iter()
        .flat_map(|(_, text)| text.lines().map(str::to_owned).collect::<Vec<_>>())
        .filter_map(|l| serde_json::from_str::<Message>(&l).ok())
        .filter_map(|m| serde_json::to_value(&m.request).ok())
        .filter_map(|v| v["op"].as_str().map(str::to_owned))
        .collect();
    let table = ops_of_table(DOC);
    assert!(
        table.len() >= 28,
        "only {} requests in the table",
        table.len()
    );
    let missing: Vec<_> = table.difference(&examples).collect();
    assert!(missing.is_empty(), "no example of {missing:?}");
    let unlisted: Vec<_> = examples.difference(&table).collect();
    assert!(unlisted.is_empty(), "not in the table: {unlisted:?}");
}

#[test]
fn every_json_example_of_control_md_matches_the_protocol_types() {
    let (mut checked, mut bad) = (0, Vec::new());
    for (line, text) in json_blocks(DOC) {
        match check(&text) {
            Ok(n) => checked += n,
            Err(e) => bad.push(format!("the block at line {line}: {e}")),
        }
    }
    assert!(bad.is_empty(), "doc/CONTROL.md:\n{}", bad.join("\n"));
    // Every request has its example, and so does every error kind a
    // client acts on: at least one line per `op`.
    assert!(checked >= 60, "only {checked} examples found");
}

#[test]
fn a_wrong_example_is_caught() {
    // A renamed field, a wrong value, a field at its default, a missing one.
    for wrong in [
        r#"{"protocol": "1.5", "request": {"op": "volume_info", "vid_": "a:b"}}"#,
        r#"{"protocol": "1.5", "request": {"op": "volume_info", "vid": "a:b", "brief": false}}"#,
        r#"{"protocol": "1.5", "ok": {"result": "removed", "data": {}}}"#,
        r#"{"protocol": "1.5", "ok": {"result": "detached", "data": {"vid": "a/b/c", "device": "/dev/loop0", "stop": null, "outcome": {"kind": "unchanged", "revision": 1}}}}"#,
        r#"{"protocol": "1.5", "error": {"kind": "busy", "code": 5, "message": "m", "cause": "timed out"}}"#,
        r#"{"protocol": "1.5", "ok": {"result": "detached", "data": {"vid": "a/b/c", "device": "/dev/loop0", "stop": "unchanged", "outcome": {"kind": "unchanged"}}}}"#,
        r#"{"protocol": "1.5", "ok": {"result": "queued", "data": {"vid": "a/b/c", "pending": "discard", "change": {"action": "discard"}}}}"#,
    ] {
        assert!(check(wrong).is_err(), "not caught: {wrong}");
    }
}
