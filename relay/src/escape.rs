//! Guest text in log lines. Everything a guest says is hostile: a newline (or `\r`, U+0085,
//! U+2028, U+2029, a bidi override …) in a hostname could otherwise forge a log line or hide
//! part of one. [`for_log`] is the one way a guest string reaches `log`: quoted, every character
//! that is not plainly printable escaped, and long text cut short (with its real length).

use std::fmt;

/// At most this many bytes of a guest string are shown (escaping can make them up to 10× as
/// long in the line); the rest is summarised by its length.
pub const MAX_SHOWN: usize = 200;

/// A guest string made safe for one log line. Create with [`for_log`].
pub struct ForLog<'a>(&'a str);

/// `text` quoted and escaped for a log line: printable characters as they are; `"` and `\`
/// with a backslash; `\n`, `\r`, `\t` as such; every other control, format, line/paragraph
/// separator, private-use or non-character as `\u{…}`; at most [`MAX_SHOWN`] bytes of it.
pub fn for_log(text: &str) -> ForLog<'_> {
    ForLog(text)
}

impl fmt::Display for ForLog<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0;
        let mut end = text.len().min(MAX_SHOWN);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        f.write_str("\"")?;
        for c in text[..end].chars() {
            match c {
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                c if needs_escape(c) => write!(f, "\\u{{{:x}}}", u32::from(c))?,
                c => fmt::Write::write_char(f, c)?,
            }
        }
        f.write_str("\"")?;
        if end < text.len() {
            write!(f, "…({} bytes)", text.len())?;
        }
        Ok(())
    }
}

impl fmt::Debug for ForLog<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Characters that are not safe to print as they are: controls (C0, DEL, C1 with U+0085),
/// format characters (zero-width, bidi controls and isolates, BOM, tags), line and paragraph
/// separators, private use and non-characters.
fn needs_escape(c: char) -> bool {
    let u = u32::from(c);
    c.is_control()
        || matches!(u,
            0x00AD | 0x034F | 0x061C | 0x115F | 0x1160 | 0x17B4 | 0x17B5 | 0x180B..=0x180F
            | 0x200B..=0x200F | 0x2028..=0x202E | 0x2060..=0x206F | 0x3164 | 0xFE00..=0xFE0F
            | 0xFEFF | 0xFFA0 | 0xFFF0..=0xFFFB | 0x1BCA0..=0x1BCA3 | 0x1D173..=0x1D17A
            | 0xE0000..=0xE0FFF
            | 0xE000..=0xF8FF | 0xF0000..=0x10FFFF)
        // Non-characters: U+FDD0..U+FDEF and the last two code points of every plane.
        || (0xFDD0..=0xFDEF).contains(&u)
        || (u & 0xFFFE) == 0xFFFE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_breaks_and_controls_never_survive() {
        let hostile = "a\nb\rc\u{85}d\u{2028}e\u{2029}f\u{0}g\u{1b}[31mh\u{7f}i\u{202e}j\u{feff}k\u{b}l\u{c}m";
        let shown = for_log(hostile).to_string();
        assert_eq!(
            shown,
            r#""a\nb\rc\u{85}d\u{2028}e\u{2029}f\u{0}g\u{1b}[31mh\u{7f}i\u{202e}j\u{feff}k\u{b}l\u{c}m""#
        );
        for c in shown.chars() {
            assert!(
                !c.is_control() && !matches!(c, '\u{2028}' | '\u{2029}' | '\u{85}'),
                "{c:?} in {shown}"
            );
        }
    }

    #[test]
    fn printable_text_is_kept_and_quotes_escaped() {
        assert_eq!(for_log("web-1").to_string(), "\"web-1\"");
        assert_eq!(for_log("Grüße, 東京").to_string(), "\"Grüße, 東京\"");
        assert_eq!(
            for_log(r#"say "hi" \o/"#).to_string(),
            r#""say \"hi\" \\o/""#
        );
        assert_eq!(for_log("").to_string(), "\"\"");
    }

    #[test]
    fn long_text_is_cut_on_a_character_boundary_with_its_length() {
        let long = "é".repeat(1000);
        let shown = for_log(&long).to_string();
        assert!(shown.ends_with("…(2000 bytes)"), "{shown}");
        assert!(shown.len() < MAX_SHOWN + 40, "{}", shown.len());
        // The worst case: every shown byte a control character.
        let worst = for_log(&"\u{1}".repeat(1 << 20)).to_string();
        assert!(worst.len() <= MAX_SHOWN * 6 + 40, "{}", worst.len());
    }
}
