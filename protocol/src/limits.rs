//! Limits, checked before allocation.

/// Default largest frame (header excluded): 16 MiB.
pub const DEFAULT_MAX_FRAME: u32 = 16 * 1024 * 1024;
/// Default largest report payload after decompression: 64 MiB (a zstd bomb stops here).
pub const DEFAULT_MAX_REPORT_PAYLOAD: u32 = 64 * 1024 * 1024;

/// The limits a [`crate::Connection`] enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame payload accepted or sent.
    pub max_frame: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

/// Bounds on everything a guest says: each string and list in `Hello` and in a report's facts.
/// The relay refuses a message beyond them (`Error` for `Hello`, `Nack(Rejected)` for a report),
/// never truncating silently; the agent builds its facts within them ([`ReportFacts::fit`]).
pub mod guest {
    /// Names: hostname, versions, os, kernel, detector, comm, tty, unit, operation.
    pub const MAX_NAME: usize = 256;
    /// Free text and paths: detail, exe, library, database, each path, each argument.
    pub const MAX_TEXT: usize = 4096;
    /// Paths in one attribution.
    pub const MAX_PATHS: usize = 1024;
    /// Arguments of a command line, and their bytes in total.
    pub const MAX_CMDLINE_ARGS: usize = 64;
    pub const MAX_CMDLINE_BYTES: usize = 4096;
    pub const MAX_ANCESTORS: usize = 8;
    /// Transactions, and tamper records, listed in one report.
    pub const MAX_LISTED: usize = 64;
    /// Kinds in `coalesced`, versions in `Hello`, extensions in `Hello`.
    pub const MAX_SMALL_LIST: usize = 32;
    /// The encoded facts of one report, in bytes.
    pub const MAX_FACTS: usize = 64 * 1024;
}

/// A guest message over one of the [`guest`] bounds.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field} is {len} long, over the limit of {max}")]
pub struct LimitError {
    pub field: &'static str,
    pub len: usize,
    pub max: usize,
}

fn within(field: &'static str, len: usize, max: usize) -> Result<(), LimitError> {
    if len > max {
        return Err(LimitError { field, len, max });
    }
    Ok(())
}

fn text(field: &'static str, value: &str, max: usize) -> Result<(), LimitError> {
    within(field, value.len(), max)
}

fn opt(field: &'static str, value: &Option<String>, max: usize) -> Result<(), LimitError> {
    value.as_deref().map_or(Ok(()), |v| text(field, v, max))
}

use crate::{
    message::{Hello, ReportFacts},
    trigger::{Attribution, Trigger},
};

impl Hello {
    /// Checks every string and list against the [`guest`] bounds.
    pub fn check_limits(&self) -> Result<(), LimitError> {
        use guest::*;
        within("versions", self.versions.len(), MAX_SMALL_LIST)?;
        let a = &self.agent;
        text("agent_version", &a.agent_version, MAX_NAME)?;
        text("hostname", &a.hostname, MAX_NAME)?;
        text("os", &a.os, MAX_NAME)?;
        text("kernel", &a.kernel, MAX_NAME)?;
        text("detector", &a.detector, MAX_NAME)?;
        within("extensions", self.extensions.len(), MAX_SMALL_LIST)?;
        for (key, value) in &self.extensions {
            text("extension key", key, MAX_NAME)?;
            text("extension value", value, MAX_TEXT)?;
        }
        Ok(())
    }
}

impl Attribution {
    pub fn check_limits(&self) -> Result<(), LimitError> {
        use guest::*;
        text("comm", &self.comm, MAX_NAME)?;
        opt("exe", &self.exe, MAX_TEXT)?;
        opt("tty", &self.tty, MAX_NAME)?;
        within("cmdline", self.cmdline.len(), MAX_CMDLINE_ARGS)?;
        let bytes: usize = self.cmdline.iter().map(String::len).sum();
        within("cmdline bytes", bytes, MAX_CMDLINE_BYTES)?;
        within("ancestors", self.ancestors.len(), MAX_ANCESTORS)?;
        for ancestor in &self.ancestors {
            text("ancestor comm", &ancestor.comm, MAX_NAME)?;
            opt("ancestor exe", &ancestor.exe, MAX_TEXT)?;
        }
        opt("unit", &self.unit, MAX_NAME)?;
        opt("database", &self.database, MAX_TEXT)?;
        opt("library", &self.library, MAX_TEXT)?;
        opt("operation", &self.operation, MAX_NAME)?;
        within("paths", self.paths.len(), MAX_PATHS)?;
        for path in &self.paths {
            text("path", path, MAX_TEXT)?;
        }
        Ok(())
    }

    /// Cuts every string and list to its bound (the agent's side of the limits).
    pub fn fit(&mut self) {
        use guest::*;
        truncate(&mut self.comm, MAX_NAME);
        truncate_opt(&mut self.exe, MAX_TEXT);
        truncate_opt(&mut self.tty, MAX_NAME);
        self.cmdline.truncate(MAX_CMDLINE_ARGS);
        let mut budget = MAX_CMDLINE_BYTES;
        for arg in &mut self.cmdline {
            truncate(arg, budget);
            budget -= arg.len();
        }
        self.cmdline.retain(|a| !a.is_empty());
        self.ancestors.truncate(MAX_ANCESTORS);
        for ancestor in &mut self.ancestors {
            truncate(&mut ancestor.comm, MAX_NAME);
            truncate_opt(&mut ancestor.exe, MAX_TEXT);
        }
        truncate_opt(&mut self.unit, MAX_NAME);
        truncate_opt(&mut self.database, MAX_TEXT);
        truncate_opt(&mut self.library, MAX_TEXT);
        truncate_opt(&mut self.operation, MAX_NAME);
        self.paths.truncate(MAX_PATHS);
        for path in &mut self.paths {
            truncate(path, MAX_TEXT);
        }
    }
}

impl Trigger {
    pub fn check_limits(&self) -> Result<(), LimitError> {
        opt("detail", &self.detail, guest::MAX_TEXT)?;
        self.attribution
            .as_ref()
            .map_or(Ok(()), Attribution::check_limits)
    }

    pub fn fit(&mut self) {
        truncate_opt(&mut self.detail, guest::MAX_TEXT);
        if let Some(a) = &mut self.attribution {
            a.fit();
        }
    }
}

impl ReportFacts {
    /// Checks every string and list, and the encoded size, against the [`guest`] bounds.
    pub fn check_limits(&self) -> Result<(), LimitError> {
        use guest::*;
        self.trigger.check_limits()?;
        within("transactions", self.transactions.len(), MAX_LISTED)?;
        within("tampers", self.tampers.len(), MAX_LISTED)?;
        for a in self.transactions.iter().chain(&self.tampers) {
            a.check_limits()?;
        }
        within("coalesced", self.coalesced.len(), MAX_SMALL_LIST)?;
        text("agent_version", &self.agent_version, MAX_NAME)?;
        text("detector", &self.detector, MAX_NAME)?;
        within("facts", crate::codec::encoded_len(self), MAX_FACTS)
    }

    /// Brings the facts within the bounds: strings and lists cut to their limits; the cause's
    /// paths and command line shortened until it takes at most half of [`guest::MAX_FACTS`];
    /// then the newest listed transactions and tamper records that fit are kept (`coalesced`
    /// keeps the full counts).
    pub fn fit(&mut self) {
        use guest::*;
        self.trigger.fit();
        for list in [&mut self.transactions, &mut self.tampers] {
            if list.len() > MAX_LISTED {
                list.drain(..list.len() - MAX_LISTED);
            }
            for a in list.iter_mut() {
                a.fit();
            }
        }
        self.coalesced.truncate(MAX_SMALL_LIST);
        truncate(&mut self.agent_version, MAX_NAME);
        truncate(&mut self.detector, MAX_NAME);
        // Measure each listed record once and keep the newest that fit beside the rest.
        let lists = (
            std::mem::take(&mut self.transactions),
            std::mem::take(&mut self.tampers),
        );
        while crate::codec::encoded_len(self) > MAX_FACTS / 2 {
            let Some(a) = &mut self.trigger.attribution else {
                break;
            };
            if a.paths.is_empty() && a.cmdline.is_empty() {
                // Only bounded strings are left: the bounds above keep this unreachable.
                self.trigger.attribution = None;
                break;
            }
            a.paths.truncate(a.paths.len() / 2);
            a.cmdline.truncate(a.cmdline.len() / 2);
        }
        let mut budget = MAX_FACTS.saturating_sub(crate::codec::encoded_len(self));
        let (transactions, tampers) = lists;
        self.transactions = keep_newest(transactions, &mut budget);
        self.tampers = keep_newest(tampers, &mut budget);
    }
}

/// The newest records of `list` whose encodings fit in `budget` (which they use up), in order.
fn keep_newest(list: Vec<Attribution>, budget: &mut usize) -> Vec<Attribution> {
    let mut kept = Vec::new();
    for a in list.into_iter().rev() {
        // The length prefix of the list grows by at most a few bytes.
        let size = crate::codec::encoded_len(&a) + 9;
        if size > *budget {
            break;
        }
        *budget -= size;
        kept.push(a);
    }
    kept.reverse();
    kept
}

/// Cuts `s` to at most `max` bytes on a character boundary, marking the cut with `…`.
fn truncate(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    const MARK: &str = "…";
    let mut end = max.saturating_sub(MARK.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    if max >= MARK.len() {
        s.push_str(MARK);
    }
}

fn truncate_opt(s: &mut Option<String>, max: usize) {
    if let Some(s) = s {
        truncate(s, max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trigger::TriggerKind;

    #[test]
    fn truncation_respects_characters_and_marks_the_cut() {
        let mut s = "ééééé".to_owned(); // 10 bytes
        truncate(&mut s, 8);
        assert!(s.len() <= 8 && s.ends_with('…'), "{s:?}");
        let mut short = "abc".to_owned();
        truncate(&mut short, 8);
        assert_eq!(short, "abc");
    }

    #[test]
    fn fitted_facts_pass_the_check_and_keep_the_newest() {
        let big = Attribution {
            pid: 1,
            comm: "c".repeat(1000),
            cmdline: vec!["x".repeat(3000); 100],
            paths: vec!["/p".repeat(100); 2000],
            ..Default::default()
        };
        let mut facts = ReportFacts {
            trigger: Trigger::new(TriggerKind::Tamper).with_attribution(big.clone()),
            transactions: (0..80)
                .map(|pid| Attribution { pid, ..big.clone() })
                .collect(),
            ..Default::default()
        };
        assert!(facts.check_limits().is_err());
        facts.fit();
        facts.check_limits().unwrap();
        assert!(crate::codec::encoded_len(&facts) <= guest::MAX_FACTS);
        if let Some(last) = facts.transactions.last() {
            assert_eq!(last.pid, 79, "the newest transactions are kept");
        }
        let limit = LimitError {
            field: "hostname",
            len: 300,
            max: 256,
        };
        assert_eq!(
            limit.to_string(),
            "hostname is 300 long, over the limit of 256"
        );
    }
}
