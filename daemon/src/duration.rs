//! Durations as both daemons take them in flags, environment variables and their TOML files:
//! `150ms`, `30s`, `4h`, `1h30m` (humantime's units), or plain seconds (`90`).

use std::time::Duration;

/// A duration that does not parse; says what was given and how one looks.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("`{text}`: {reason} (examples: 150ms, 30s, 4h)")]
pub struct DurationError {
    /// The text as given, trimmed.
    pub text: String,
    /// Why it is not a duration (part of the message rather than a source, so chains do not
    /// print it twice).
    pub reason: humantime::DurationError,
}

/// Parses `150ms`, `4h`, `1h30m`, or plain seconds; surrounding whitespace is ignored.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(text).map_err(|reason| DurationError {
        text: text.to_owned(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("150ms"), Ok(Duration::from_millis(150)));
        assert_eq!(parse_duration("4h"), Ok(Duration::from_secs(4 * 3600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration(" 30s "), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-5s").is_err());
    }

    #[test]
    fn the_error_names_the_text_and_shows_examples() {
        let e = parse_duration(" soon ").unwrap_err();
        assert_eq!(e.text, "soon");
        let message = e.to_string();
        assert!(message.starts_with("`soon`: "), "{message}");
        assert!(
            message.ends_with(" (examples: 150ms, 30s, 4h)"),
            "{message}"
        );
        assert!(std::error::Error::source(&e).is_none());
    }
}
