//! Small helpers shared by the modules.

/// The last `max` bytes of `bytes` as valid UTF-8: cut at a character
/// boundary, invalid sequences replaced, surrounding whitespace trimmed.
pub(crate) fn tail_utf8(bytes: &[u8], max: usize) -> String {
    let mut start = bytes.len().saturating_sub(max);
    // Skip UTF-8 continuation bytes so the cut does not split a character.
    while start < bytes.len() && start > 0 && (bytes[start] & 0b1100_0000) == 0b1000_0000 {
        start += 1;
    }
    let cut = start > 0;
    let text = String::from_utf8_lossy(&bytes[start..]);
    let text = text.trim();
    if cut { format!("…{text}") } else { text.to_string() }
}

/// Text from outside (a machine's failure reason, a command's output) made
/// safe for one log line or history entry: control characters become
/// spaces, and it is cut to `max` characters.
pub(crate) fn one_line(s: &str, max: usize) -> String {
    let mut out: String = s.trim().chars().take(max).map(|c| if c.is_control() { ' ' } else { c }).collect::<String>();
    if s.trim().chars().count() > max {
        out.push('…');
    }
    out
}

/// The first 8 characters of a token, for logs. Never log a whole token.
pub(crate) fn token_prefix(token: &str) -> String {
    let p: String = token.chars().take(8).collect();
    format!("{p}…")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_is_valid_utf8_at_a_boundary() {
        assert_eq!(tail_utf8(b"short\n", 2048), "short");
        let s = "ééééé".as_bytes(); // 10 bytes
        let t = tail_utf8(s, 5);
        assert!(t.starts_with('…'));
        assert_eq!(t.trim_start_matches('…'), "éé");
        assert_eq!(tail_utf8(&[0xff, b'a'], 10), "\u{fffd}a");
        assert_eq!(tail_utf8(b"", 10), "");
    }

    #[test]
    fn one_line_strips_controls() {
        assert_eq!(one_line(" disk\nfailed\x1b[0m ", 100), "disk failed [0m");
        assert_eq!(one_line("abcdef", 3), "abc…");
        assert_eq!(token_prefix("0123456789abcdef"), "01234567…");
    }
}
