//! The topic grammar: what a topic name and a filter may hold, and how a filter matches.
//! Topics cross the API as `&str`, checked where they are used (publish, subscribe).

/// Checks a topic name: not empty, no wildcards, no NUL.
pub fn check_topic(topic: &str) -> Result<(), &'static str> {
    if topic.is_empty() {
        return Err("empty topic");
    }
    if topic.contains(['+', '#']) {
        return Err("wildcards are not allowed in a topic name");
    }
    if topic.contains('\0') {
        return Err("topic contains NUL");
    }
    Ok(())
}

/// Checks a topic filter: `#` only as the whole last level, `+` alone in its level, no NUL.
pub fn check_filter(filter: &str) -> Result<(), &'static str> {
    if filter.is_empty() {
        return Err("empty filter");
    }
    if filter.contains('\0') {
        return Err("filter contains NUL");
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err("`#` must be the whole last level");
        }
        if level.contains('+') && level != "+" {
            return Err("`+` must be a whole level");
        }
    }
    Ok(())
}

/// MQTT topic matching: does `filter` match `topic`? A leading wildcard does not match a
/// `$`-topic.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_and_filters() {
        assert!(check_topic("edge/a").is_ok());
        assert!(check_topic("edge/+").is_err());
        assert!(check_filter("edge/+/x/#").is_ok());
        assert!(matches("edge/+/x/#", "edge/a/x"));
        assert!(check_filter("edge/#/x").is_err());
        assert!(check_filter("edge/a+").is_err());
        assert!(!matches("#", "$SYS/x"));
    }
}
