//! Human-sized descriptions of how two outputs differ: lengths, the first differing line of each,
//! and a hint when the difference has a recognisable cause.

/// Appended to output files after the original is killed, standing in for output it wrote after
/// the checkpoint. A correct restore cuts every file back to its checkpoint-time length, so this
/// text must never survive into the final output.
pub const AFTER_CHECKPOINT_LINE: &str =
    "<<< written by the original after the checkpoint: a restore must cut this off >>>\n";

const SHOW: usize = 160;

fn line_at(b: &[u8], start: usize) -> String {
    let start = start.min(b.len());
    let end = b[start..]
        .iter()
        .position(|&c| c == b'\n')
        .map_or(b.len(), |p| start + p);
    let mut s = String::from_utf8_lossy(&b[start..end]).into_owned();
    if s.len() > SHOW {
        let mut cut = SHOW;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// Describes how `actual` differs from `expected`, or says they are identical.
pub fn diff_summary(expected: &[u8], actual: &[u8]) -> String {
    if expected == actual {
        return format!("identical ({} bytes)", expected.len());
    }
    let common = expected
        .iter()
        .zip(actual)
        .take_while(|(a, b)| a == b)
        .count();
    let line = expected[..common].iter().filter(|&&c| c == b'\n').count() + 1;
    let start = expected[..common]
        .iter()
        .rposition(|&c| c == b'\n')
        .map_or(0, |p| p + 1);
    let mut s = format!(
        "expected {} bytes ({} lines), got {} bytes ({} lines); first difference at byte {common}, line {line}\n",
        expected.len(),
        expected.iter().filter(|&&c| c == b'\n').count(),
        actual.len(),
        actual.iter().filter(|&&c| c == b'\n').count(),
    );
    if start > 0 {
        let prev = expected[..start - 1]
            .iter()
            .rposition(|&c| c == b'\n')
            .map_or(0, |p| p + 1);
        s += &format!("  last common line: {:?}\n", line_at(expected, prev));
    }
    if common == actual.len() {
        s += "  the output stops there: everything after it is missing\n";
    } else if common == expected.len() {
        s += "  the output goes on past the expected end: extra or repeated output\n";
    }
    s += &format!("  expected: {:?}\n", line_at(expected, start));
    s += &format!("  actual:   {:?}\n", line_at(actual, start));
    let marker = AFTER_CHECKPOINT_LINE.trim_end().as_bytes();
    if actual.windows(marker.len()).any(|w| w == marker) {
        s += "  hint: the file still holds the text appended after the original was killed: it \
              was not cut back to its checkpoint-time length\n";
    } else if actual.len() > common {
        // Output written twice shows up as a line of the expected output appearing again.
        let dup = line_at(actual, start);
        let first = find(expected, dup.as_bytes());
        if !dup.is_empty() && first.is_some_and(|p| p < start) {
            s += "  hint: the actual line appears earlier in the expected output: duplicated output\n";
        }
    }
    s
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || needle.len() > hay.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical() {
        assert!(diff_summary(b"a\nb\n", b"a\nb\n").starts_with("identical (4 bytes)"));
    }

    #[test]
    fn first_differing_line_and_lengths() {
        let s = diff_summary(b"one\ntwo\nthree\n", b"one\ntwX\nthree\n");
        assert!(
            s.contains("expected 14 bytes (3 lines), got 14 bytes (3 lines)"),
            "{s}"
        );
        assert!(s.contains("line 2"), "{s}");
        assert!(s.contains("last common line: \"one\""), "{s}");
        assert!(s.contains("expected: \"two\""), "{s}");
        assert!(s.contains("actual:   \"twX\""), "{s}");
    }

    #[test]
    fn missing_tail() {
        let s = diff_summary(b"a\nb\nc\n", b"a\nb\n");
        assert!(s.contains("line 3"), "{s}");
        assert!(s.contains("everything after it is missing"), "{s}");
    }

    #[test]
    fn leftover_tail_is_recognised() {
        let mut actual = b"a\nb\n".to_vec();
        actual.extend_from_slice(AFTER_CHECKPOINT_LINE.as_bytes());
        let s = diff_summary(b"a\nb\n", &actual);
        assert!(s.contains("extra or repeated output"), "{s}");
        assert!(s.contains("not cut back"), "{s}");
    }

    #[test]
    fn duplicated_output_is_recognised() {
        let s = diff_summary(b"l1\nl2\nl3\n", b"l1\nl2\nl1\nl2\nl3\n");
        assert!(s.contains("duplicated output"), "{s}");
    }

    #[test]
    fn long_and_binary_lines_are_cut() {
        let long = vec![b'x'; 1000];
        let mut other = long.clone();
        other[999] = 0xff;
        let s = diff_summary(&long, &other);
        assert!(s.len() < 1000, "{s}");
    }
}
