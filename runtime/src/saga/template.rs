//! Step input templates: `${path}` filled from the run's context.

use serde_json::Value;

/// Fills a template from `ctx`: a string that is exactly `${path}` becomes the value at `path`
/// (any JSON type; `null` when absent); `${path}` inside a longer string is replaced by the
/// value's text. Paths are dot-separated (`request.order`, `steps.reserve.id`, `steps.list.0`).
pub fn render(template: &Value, ctx: &Value) -> Value {
    match template {
        Value::String(s) => {
            if let Some(path) = s.strip_prefix("${").and_then(|r| r.strip_suffix('}')) {
                if !path.contains("${") {
                    return lookup(ctx, path).cloned().unwrap_or(Value::Null);
                }
            }
            let mut out = String::new();
            let mut rest = s.as_str();
            while let Some(at) = rest.find("${") {
                out.push_str(&rest[..at]);
                let after = &rest[at + 2..];
                match after.find('}') {
                    Some(end) => {
                        match lookup(ctx, &after[..end]) {
                            Some(Value::String(v)) => out.push_str(v),
                            Some(Value::Null) | None => {}
                            Some(v) => out.push_str(&v.to_string()),
                        }
                        rest = &after[end + 1..];
                    }
                    None => {
                        out.push_str(&rest[at..]);
                        rest = "";
                    }
                }
            }
            out.push_str(rest);
            Value::String(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(|v| render(v, ctx)).collect()),
        Value::Object(o) => {
            Value::Object(o.iter().map(|(k, v)| (k.clone(), render(v, ctx))).collect())
        }
        other => other.clone(),
    }
}

/// The paths a template refers to (for validation).
pub fn template_paths(template: &Value) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => {
                let mut rest = s.as_str();
                while let Some(at) = rest.find("${") {
                    let after = &rest[at + 2..];
                    let Some(end) = after.find('}') else { break };
                    out.push(after[..end].to_owned());
                    rest = &after[end + 1..];
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            Value::Object(o) => o.values().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(template, &mut out);
    out
}

fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.trim().split('.').try_fold(v, |v, key| match v {
        Value::Object(o) => o.get(key),
        Value::Array(a) => key.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn templates_fill_whole_values_and_text() {
        let ctx =
            json!({"request": {"order": "A1", "qty": 2}, "steps": {"r": {"id": 7}}, "run_id": "x"});
        let t = json!({"key": "${request.order}/reserved", "n": "${request.qty}", "id": "${steps.r.id}", "missing": "${steps.none}", "run": "${run_id}"});
        assert_eq!(
            render(&t, &ctx),
            json!({"key": "A1/reserved", "n": 2, "id": 7, "missing": null, "run": "x"})
        );
        assert_eq!(template_paths(&t).len(), 5, "{:?}", template_paths(&t));
    }
}
