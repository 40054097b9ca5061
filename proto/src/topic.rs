//! Validated topic names and filters.

use std::fmt;

/// A topic was not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid topic `{topic}`: {reason}")]
pub struct TopicError {
    /// The text that was refused.
    pub topic: String,
    /// Why.
    pub reason: &'static str,
}

/// A topic name: not empty, no wildcards, no NUL.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(String);

impl Topic {
    /// Checks and wraps a topic name.
    pub fn new(s: impl Into<String>) -> Result<Topic, TopicError> {
        let s = s.into();
        match check_topic(&s) {
            Err(reason) => Err(TopicError { topic: s, reason }),
            Ok(()) => Ok(Topic(s)),
        }
    }

    /// The topic as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A topic filter: `+` a whole level, `#` only as the whole last level.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicFilter(String);

impl TopicFilter {
    /// Checks and wraps a filter.
    pub fn new(s: impl Into<String>) -> Result<TopicFilter, TopicError> {
        let s = s.into();
        match check_filter(&s) {
            Err(reason) => Err(TopicError { topic: s, reason }),
            Ok(()) => Ok(TopicFilter(s)),
        }
    }

    /// The filter as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this filter matches `topic`.
    pub fn matches(&self, topic: &Topic) -> bool {
        matches(&self.0, topic.as_str())
    }
}

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

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_and_filters() {
        assert!(Topic::new("edge/a").is_ok());
        assert!(Topic::new("edge/+").is_err());
        let f = TopicFilter::new("edge/+/x/#").expect("valid");
        assert!(f.matches(&Topic::new("edge/a/x").expect("valid")));
        assert!(TopicFilter::new("edge/#/x").is_err());
    }
}
