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
        let reason = if s.is_empty() {
            Some("empty")
        } else if s.contains(['+', '#']) {
            Some("wildcards are not allowed in a topic name")
        } else if s.contains('\0') {
            Some("contains NUL")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(TopicError { topic: s, reason }),
            None => Ok(Topic(s)),
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
        let mut reason = if s.is_empty() { Some("empty") } else { None };
        let mut levels = s.split('/').peekable();
        while let Some(level) = levels.next() {
            if level.contains('#') && (level != "#" || levels.peek().is_some()) {
                reason = Some("`#` must be the whole last level");
            } else if level.contains('+') && level != "+" {
                reason = Some("`+` must be a whole level");
            }
        }
        match reason {
            Some(reason) => Err(TopicError { topic: s, reason }),
            None => Ok(TopicFilter(s)),
        }
    }

    /// The filter as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this filter matches `topic`.
    pub fn matches(&self, topic: &Topic) -> bool {
        let t = topic.as_str();
        if t.starts_with('$') && (self.0.starts_with('+') || self.0.starts_with('#')) {
            return false;
        }
        let mut f = self.0.split('/');
        let mut t = t.split('/');
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
