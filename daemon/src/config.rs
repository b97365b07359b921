//! The layering both daemons apply to their settings: a flag (or its `GUESTWATCH_*`
//! environment variable, which clap reads) wins over the TOML file, the file over the built-in
//! default. Files use the long option names with underscores; values the file gives as text
//! are parsed here, and a bad one is reported under its key.

use std::{fmt::Display, path::Path, path::PathBuf, str::FromStr, time::Duration};

use serde::de::DeserializeOwned;

use crate::duration::parse_duration;

/// Why settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
}

/// Reads and parses the TOML file at `path`; parse errors are put on one line.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().lines().collect::<Vec<_>>().join(" "),
    })
}

/// The flag's duration, else the file's (parsed; an error names `key`), else `None`.
pub fn pick_duration(
    flag: Option<Duration>,
    file: &Option<String>,
    key: &'static str,
) -> Result<Option<Duration>, ConfigError> {
    match (flag, file) {
        (Some(d), _) => Ok(Some(d)),
        (None, Some(text)) => parse_duration(text)
            .map(Some)
            .map_err(|e| ConfigError::Invalid {
                key,
                message: e.to_string(),
            }),
        (None, None) => Ok(None),
    }
}

/// The flag's value, else the file's text parsed with `FromStr` (an error names `key` and
/// quotes the text), else `None`.
pub fn pick_parsed<T>(
    flag: Option<T>,
    file: &Option<String>,
    key: &'static str,
) -> Result<Option<T>, ConfigError>
where
    T: FromStr,
    T::Err: Display,
{
    match (flag, file) {
        (Some(value), _) => Ok(Some(value)),
        (None, Some(text)) => text.parse().map(Some).map_err(|e| ConfigError::Invalid {
            key,
            message: format!("`{text}`: {e}"),
        }),
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct File {
        interval: Option<String>,
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_nothing() {
        let file = Some("300ms".to_owned());
        let flag = Some(Duration::from_millis(50));
        assert_eq!(pick_duration(flag, &file, "k").unwrap(), flag);
        assert_eq!(
            pick_duration(None, &file, "k").unwrap(),
            Some(Duration::from_millis(300))
        );
        assert_eq!(pick_duration(None, &None, "k").unwrap(), None);
        let addr: SocketAddr = "127.0.0.1:9917".parse().unwrap();
        let text = Some("[::1]:1".to_owned());
        assert_eq!(pick_parsed(Some(addr), &text, "k").unwrap(), Some(addr));
        assert_eq!(
            pick_parsed::<SocketAddr>(None, &text, "k").unwrap(),
            Some("[::1]:1".parse().unwrap())
        );
        assert_eq!(pick_parsed::<SocketAddr>(None, &None, "k").unwrap(), None);
    }

    #[test]
    fn bad_values_are_reported_under_their_key() {
        let err = pick_duration(None, &Some("soon".into()), "quiet_period").unwrap_err();
        let message = err.to_string();
        assert!(message.starts_with("quiet_period: `soon`: "), "{message}");
        assert!(message.ends_with("(examples: 150ms, 30s, 4h)"), "{message}");
        let err = pick_parsed::<SocketAddr>(None, &Some("nowhere".into()), "metrics").unwrap_err();
        assert_eq!(
            err.to_string(),
            "metrics: `nowhere`: invalid socket address syntax"
        );
        // A flag is taken as given: the file's bad value is not even read.
        assert!(pick_duration(Some(Duration::ZERO), &Some("soon".into()), "k").is_ok());
    }

    #[test]
    fn files_are_read_and_their_errors_are_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.toml");
        std::fs::write(&path, "interval = \"4h\"\n").unwrap();
        let file: File = load_toml(&path).unwrap();
        assert_eq!(file.interval.as_deref(), Some("4h"));
        std::fs::write(&path, "intervall = \"4h\"\n").unwrap();
        let err = load_toml::<File>(&path).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }));
        let message = err.to_string();
        assert!(
            message.starts_with(&format!("{}: ", path.display())),
            "{message}"
        );
        assert!(
            message.contains("intervall") && !message.contains('\n'),
            "{message}"
        );
        let missing = dir.path().join("missing.toml");
        let err = load_toml::<File>(&missing).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
        assert!(err.to_string().starts_with("reading "), "{err}");
    }
}
