//! The guest's serial console: following the log file QEMU writes, and the `@@gw` marker
//! lines the guest's scripts print (see `guest/lib.sh`).

use std::{
    fs::File,
    io::Read,
    path::{Path, PathBuf},
};

use anyhow::Result;

/// One marker line from the guest.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// `/init` started, with the guest's uptime in seconds.
    Init(String),
    Begin(String),
    Note {
        scenario: String,
        text: String,
    },
    Signal {
        scenario: String,
        word: String,
    },
    End {
        scenario: String,
        rc: i32,
    },
    Done,
}

const MARKER: &str = "@@gw ";

/// Parses a console line; kernel messages may precede a marker on the same line.
pub fn parse(line: &str) -> Option<Event> {
    let rest = &line[line.find(MARKER)? + MARKER.len()..];
    let rest = rest.trim_end_matches(['\r', '\n']);
    let (kind, args) = rest.split_once(' ').unwrap_or((rest, ""));
    let (first, tail) = args.split_once(' ').unwrap_or((args, ""));
    let owned = |s: &str| s.to_owned();
    Some(match kind {
        "init" => Event::Init(owned(first)),
        "begin" => Event::Begin(owned(first)),
        "note" => Event::Note {
            scenario: owned(first),
            text: owned(tail),
        },
        "signal" => Event::Signal {
            scenario: owned(first),
            word: owned(tail.trim()),
        },
        "end" => Event::End {
            scenario: owned(first),
            rc: tail.trim().parse().unwrap_or(-1),
        },
        "done" => Event::Done,
        _ => return None,
    })
}

/// Follows a growing log file and hands out complete lines.
pub struct Tail {
    path: PathBuf,
    file: Option<File>,
    pending: Vec<u8>,
}

impl Tail {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            file: None,
            pending: Vec::new(),
        }
    }

    /// Lines completed since the last call.
    pub fn lines(&mut self) -> Result<Vec<String>> {
        if self.file.is_none() {
            // QEMU creates the file when it starts; until then there is nothing to read.
            match File::open(&self.path) {
                Ok(f) => self.file = Some(f),
                Err(_) => return Ok(Vec::new()),
            }
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(Vec::new());
        };
        let mut chunk = Vec::new();
        // Stops at the current end; the next call continues from there.
        file.read_to_end(&mut chunk)?;
        self.pending.extend_from_slice(&chunk);
        let mut lines = Vec::new();
        while let Some(newline) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=newline).collect();
            lines.push(
                String::from_utf8_lossy(&line)
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
            );
        }
        Ok(lines)
    }
}

/// The last `n` lines of a log file, for failure reports.
pub fn last_lines(path: &Path, n: usize) -> Vec<String> {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| (*l).to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers() {
        assert_eq!(parse("@@gw init 1.23"), Some(Event::Init("1.23".into())));
        assert_eq!(parse("@@gw begin boot"), Some(Event::Begin("boot".into())));
        assert_eq!(
            parse("[    3.1] random: x@@gw note boot kernel 6.1, 9 modules\r"),
            Some(Event::Note {
                scenario: "boot".into(),
                text: "kernel 6.1, 9 modules".into()
            })
        );
        assert_eq!(
            parse("@@gw signal vsock-path sent"),
            Some(Event::Signal {
                scenario: "vsock-path".into(),
                word: "sent".into()
            })
        );
        assert_eq!(
            parse("@@gw end boot 0"),
            Some(Event::End {
                scenario: "boot".into(),
                rc: 0
            })
        );
        assert_eq!(parse("@@gw done"), Some(Event::Done));
        assert_eq!(parse("plain console output"), None);
        assert_eq!(parse("@@gw unknown x"), None);
    }
}
