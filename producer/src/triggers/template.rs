//! Trigger rules' matching and templates: which routing keys a rule's topic pattern takes,
//! and how `{{field}}` placeholders are filled from an event.

/// Does an AMQP topic `pattern` (`*` = one word, `#` = zero or more) match `key`?
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match (p.first(), k.first()) {
            (None, None) => true,
            (Some(&"#"), _) => go(&p[1..], k) || (!k.is_empty() && go(p, &k[1..])),
            (Some(&"*"), Some(_)) => go(&p[1..], &k[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &k[1..]),
            _ => false,
        }
    }
    go(&pattern.split('.').collect::<Vec<_>>(), &key.split('.').collect::<Vec<_>>())
}

/// Fills `{{field}}` placeholders of `template` from `event`. A field the event lacks is an
/// error naming it: filled with nothing, a bot `bot-{{id}}` became `bot-` and a coalescing key
/// `intent-train/{{bot}}` one key for every bot, whose jobs then superseded each other.
pub fn render(template: &serde_json::Value, event: &serde_json::Value) -> Result<serde_json::Value, String> {
    use serde_json::Value;
    Ok(match template {
        Value::String(s) => render_str(s, event)?,
        Value::Array(a) => Value::Array(a.iter().map(|v| render(v, event)).collect::<Result<_, _>>()?),
        Value::Object(o) => Value::Object(o.iter().map(|(k, v)| Ok((k.clone(), render(v, event)?))).collect::<Result<_, String>>()?),
        other => other.clone(),
    })
}

/// [`render`] of one string: only `{{field}}` takes the field's JSON value, anything else is
/// text with each placeholder replaced.
pub(super) fn render_str(s: &str, event: &serde_json::Value) -> Result<serde_json::Value, String> {
    use serde_json::Value;
    let field = |name: &str| event.get(name).ok_or_else(|| format!("the event has no field {name:?}"));
    let t = s.trim();
    if let Some(name) = t.strip_prefix("{{").and_then(|r| r.strip_suffix("}}")).filter(|n| !n.contains("{{")) {
        return field(name.trim()).cloned();
    }
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("{{") {
        // An opening without its closing is text.
        let Some(end) = rest[start..].find("}}") else { break };
        out.push_str(&rest[..start]);
        let name = rest[start + 2..start + end].trim();
        match field(name)? {
            Value::String(v) => out.push_str(v),
            // As text, null would read "null": a bot `bot-null`, one coalescing key for every
            // event without the value.
            Value::Null => return Err(format!("the event's field {name:?} is null, which a text cannot hold")),
            v => out.push_str(&v.to_string()),
        }
        rest = &rest[start + end + 2..];
    }
    out.push_str(rest);
    Ok(Value::String(out))
}

pub(super) fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn topics_match_like_rabbitmq() {
        assert!(topic_matches("bot.dataset_updated", "bot.dataset_updated"));
        assert!(topic_matches("bot.*", "bot.dataset_updated"));
        assert!(!topic_matches("bot.*", "bot.a.b"));
        assert!(topic_matches("bot.#", "bot.a.b"));
        assert!(topic_matches("#", "x"));
        assert!(!topic_matches("bot.x", "bot.y"));
    }

    #[test]
    fn templates_fill_fields() {
        let ev = json!({"bot": "banking", "dataset": "clinc150/x.json", "epochs": 5});
        let t = json!({"dataset": "{{dataset}}", "epochs": "{{ epochs }}", "note": "bot {{bot}} v{{epochs}}", "fixed": 1});
        assert_eq!(render(&t, &ev).unwrap(), json!({"dataset": "clinc150/x.json", "epochs": 5, "note": "bot banking v5", "fixed": 1}));
        // An opening without its closing is text, once (it was repeated).
        assert_eq!(render(&json!("ab{{x"), &ev).unwrap(), json!("ab{{x"));
        assert_eq!(render(&json!("{{bot}}-{{x"), &ev).unwrap(), json!("banking-{{x"));
        // A field the event lacks is named, wherever the template uses it.
        for t in [json!("{{bot_id}}"), json!("intent-train/{{bot_id}}"), json!({"a": ["{{bot_id}}"]})] {
            assert_eq!(render(&t, &ev).unwrap_err(), "the event has no field \"bot_id\"", "{t}");
        }
        // A null inside a text is refused, naming the field; the whole value may be null.
        let ev = json!({"id": null});
        for t in [json!("bot-{{id}}"), json!("k/{{ id }}")] {
            assert_eq!(render(&t, &ev).unwrap_err(), "the event's field \"id\" is null, which a text cannot hold", "{t}");
        }
        assert_eq!(render(&json!("{{id}}"), &ev).unwrap(), json!(null));
    }
}
