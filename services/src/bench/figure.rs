//! What a scenario measured, typed: its headline number, how it is shown, what it delivered;
//! the goals edgebus holds itself to; and the side-by-side table of several brokers.

/// What one scenario measured on one broker.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// The headline number, which ratios and goals compare (p50 for latencies).
    pub value: f64,
    /// The cell as printed.
    pub shown: String,
    /// Messages delivered of those sent, where the scenario counts them.
    pub delivered: Option<(u64, u64)>,
}

impl Figure {
    /// A figure of `value`, printed as `shown`.
    pub fn new(value: f64, shown: impl Into<String>) -> Figure {
        Figure {
            value,
            shown: shown.into(),
            delivered: None,
        }
    }

    /// The same figure, with `got` of `want` messages delivered.
    pub fn delivered(mut self, got: u64, want: u64) -> Figure {
        self.delivered = Some((got, want));
        self
    }

    /// Whether fewer messages arrived than were sent.
    pub fn lossy(&self) -> bool {
        self.delivered.is_some_and(|(got, want)| got < want)
    }
}

/// Which way a figure is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    /// Throughput, rates.
    Higher,
    /// Latency, memory.
    Lower,
    /// Counts that explain other figures.
    Info,
}

/// Rows other rows' goals refer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// The QoS 1 round trip of bare MQTT clients.
    RoundTripQos1,
    /// The broker's memory before any load.
    RssIdle,
}

/// A goal a figure is held to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Goal {
    /// edgebus ÷ the other broker at most this.
    RatioAtMost(f64),
    /// edgebus ÷ the other broker at least this, and nothing lost.
    RatioAtLeastNoLoss(f64),
    /// edgebus ÷ the other broker at least this.
    RatioAtLeast(f64),
    /// edgebus's own figure at most this.
    AtMost(f64),
    /// edgebus's figure at most this times its figure in the row with this key.
    TimesRow(f64, Key),
}

impl Goal {
    fn describe(self) -> String {
        match self {
            Goal::RatioAtMost(r) => format!("≤ {r}×"),
            Goal::RatioAtLeastNoLoss(r) => format!("≥ {r}×, none lost"),
            Goal::RatioAtLeast(r) => format!("≥ {r}×"),
            Goal::AtMost(v) => format!("≤ {v}"),
            Goal::TimesRow(r, key) => format!("≤ {r}× {}", key.describe()),
        }
    }
}

impl Key {
    fn describe(self) -> &'static str {
        match self {
            Key::RoundTripQos1 => "round trip QoS 1",
            Key::RssIdle => "RSS idle",
        }
    }
}

/// One row of a broker's results: what was measured, and the figure or why there is none.
#[derive(Debug, Clone)]
pub struct Row {
    /// Scenario and measure, as the table names it.
    pub name: String,
    /// Which way is better.
    pub better: Better,
    /// The goal, if edgebus holds itself to one here.
    pub goal: Option<Goal>,
    /// The key other rows' goals know this one by.
    pub key: Option<Key>,
    /// The figure, or the error that stopped the scenario.
    pub outcome: Result<Figure, String>,
}

impl Row {
    /// A row without a goal.
    pub fn new(name: impl Into<String>, better: Better, outcome: anyhow::Result<Figure>) -> Row {
        Row {
            name: name.into(),
            better,
            goal: None,
            key: None,
            outcome: outcome.map_err(|e| format!("error: {e:#}")),
        }
    }

    /// The same row, held to `goal`.
    pub fn goal(mut self, goal: Goal) -> Row {
        self.goal = Some(goal);
        self
    }

    /// The same row, known to other rows' goals as `key`.
    pub fn key(mut self, key: Key) -> Row {
        self.key = Some(key);
        self
    }

    /// The headline number, when the scenario produced one.
    pub fn value(&self) -> Option<f64> {
        self.outcome.as_ref().ok().map(|f| f.value)
    }

    /// The cell as printed.
    pub fn shown(&self) -> &str {
        match &self.outcome {
            Ok(f) => &f.shown,
            Err(e) => e,
        }
    }
}

/// One row of the side-by-side table: the ratio of the first broker's figure to the
/// second's, and the goal with whether the first broker meets it.
struct Compared {
    ratio: Option<f64>,
    goal: Option<(String, Option<bool>)>,
}

fn compare(i: usize, results: &[Vec<Row>]) -> Compared {
    let a = results.first().and_then(|r| r.get(i));
    let b = results.get(1).and_then(|r| r.get(i));
    let ratio = match (a.and_then(Row::value), b.and_then(Row::value)) {
        (Some(x), Some(y)) if y > 0.0 => Some(x / y),
        _ => None,
    };
    let goal = a.and_then(|row| {
        let g = row.goal?;
        let value = row.value();
        let met = match g {
            Goal::RatioAtMost(r) => ratio.map(|x| x <= r),
            Goal::RatioAtLeast(r) => ratio.map(|x| x >= r),
            Goal::RatioAtLeastNoLoss(r) => {
                let lossy = row.outcome.as_ref().is_ok_and(Figure::lossy);
                ratio.map(|x| x >= r && !lossy)
            }
            Goal::AtMost(v) => value.map(|x| x <= v),
            Goal::TimesRow(r, key) => {
                let base = results[0]
                    .iter()
                    .find(|o| o.key == Some(key))
                    .and_then(Row::value);
                match (value, base) {
                    (Some(x), Some(y)) if y > 0.0 => Some(x <= r * y),
                    _ => None,
                }
            }
        };
        Some((g.describe(), met))
    });
    Compared { ratio, goal }
}

/// The figures as a Markdown table: one column per broker; with two brokers, the first's
/// figure divided by the second's, and each goal with whether the first broker meets it.
pub fn markdown_table(names: &[String], results: &[Vec<Row>]) -> String {
    let mut out = String::new();
    let Some(first) = results.first() else {
        return out;
    };
    let two = names.len() >= 2;
    out.push_str("| scenario |");
    for n in names {
        out.push_str(&format!(" {n} |"));
    }
    if two {
        out.push_str(&format!(" {} ÷ {} | goal | met |", names[0], names[1]));
    }
    out.push('\n');
    out.push_str("|---|");
    for _ in names {
        out.push_str("---|");
    }
    if two {
        out.push_str("---|---|---|");
    }
    out.push('\n');
    for (i, row) in first.iter().enumerate() {
        out.push_str(&format!("| {} |", row.name));
        for rows in results {
            let v = rows.get(i).map_or("", Row::shown);
            out.push_str(&format!(" {v} |"));
        }
        if two {
            let c = compare(i, results);
            let ratio = c
                .ratio
                .filter(|_| row.better != Better::Info)
                .map_or(String::new(), |r| format!("{r:.2}×"));
            let (goal, met) = match c.goal {
                Some((g, Some(true))) => (g, "yes"),
                Some((g, Some(false))) => (g, "**no**"),
                Some((g, None)) => (g, "?"),
                None => (String::new(), ""),
            };
            out.push_str(&format!(" {ratio} | {goal} | {met} |"));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, value: f64) -> Row {
        Row::new(
            name,
            Better::Lower,
            Ok(Figure::new(value, value.to_string())),
        )
    }

    #[test]
    fn goals_compare_headline_numbers_not_text() {
        let ours = vec![
            row("rtt", 90.0).key(Key::RoundTripQos1),
            row("runtime", 110.0).goal(Goal::TimesRow(1.3, Key::RoundTripQos1)),
            Row::new(
                "fan",
                Better::Higher,
                Ok(Figure::new(300.0, "300 msg/s").delivered(9, 10)),
            )
            .goal(Goal::RatioAtLeastNoLoss(3.0)),
            row("rss", 3000.0).goal(Goal::AtMost(2048.0)),
        ];
        let theirs = vec![
            row("rtt", 100.0),
            row("runtime", 1.0),
            row("fan", 10.0),
            row("rss", 1.0),
        ];
        let table = markdown_table(&["a".into(), "b".into()], &[ours, theirs]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[3].ends_with("| ≤ 1.3× round trip QoS 1 | yes |"),
            "{}",
            lines[3]
        );
        // 30× faster, but one message lost: not met.
        assert!(lines[4].ends_with("| **no** |"), "{}", lines[4]);
        assert!(lines[5].ends_with("| ≤ 2048 | **no** |"), "{}", lines[5]);
    }

    #[test]
    fn an_error_is_shown_and_compares_to_nothing() {
        let ours = vec![
            Row::new("x", Better::Higher, Err(anyhow::anyhow!("timed out")))
                .goal(Goal::RatioAtLeast(1.5)),
        ];
        let theirs = vec![row("x", 5.0)];
        let table = markdown_table(&["a".into(), "b".into()], &[ours, theirs]);
        assert!(
            table.contains("| x | error: timed out | 5 |  | ≥ 1.5× | ? |"),
            "{table}"
        );
    }
}
