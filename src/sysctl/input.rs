//! Bounds on untrusted YAML before it is parsed: the YAML parser's cost grows faster than
//! linearly with nesting (a 200 KB file of brackets took a minute), so nesting is measured
//! first with a linear scan. Used for profiles and for the cluster policy.

/// Checks that `text` nests `[`/`{` at most `max_nesting` deep (outside quotes and comments)
/// and indents block lines at most `max_indent` columns; `Err(line)` names the first line over.
pub fn check_yaml_nesting(text: &str, max_nesting: usize, max_indent: usize) -> Result<(), usize> {
    let mut depth = 0usize;
    let mut quote: Option<char> = None;
    for (idx, line) in text.lines().enumerate() {
        if quote.is_none() && depth == 0 {
            let indent = line.len() - line.trim_start_matches([' ', '-', '?', ':']).len();
            if indent > max_indent {
                return Err(idx + 1);
            }
        }
        let mut prev = ' ';
        let mut escaped = false;
        for c in line.chars() {
            match (quote, c) {
                // In a double-quoted scalar a backslash escapes the next character (`\"`).
                (Some('"'), _) if escaped => escaped = false,
                (Some('"'), '\\') => escaped = true,
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '#') if prev.is_whitespace() => break,
                (None, '[' | '{') => {
                    depth += 1;
                    if depth > max_nesting {
                        return Err(idx + 1);
                    }
                }
                (None, ']' | '}') => depth = depth.saturating_sub(1),
                _ => {}
            }
            prev = c;
        }
        // A single-quoted scalar rarely spans lines outside flow context; do not let a stray
        // apostrophe (`it's`) hide the rest of the file from the scan.
        if quote == Some('\'') && depth == 0 {
            quote = None;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_and_indentation() {
        assert_eq!(check_yaml_nesting("a: [[[1]]]\n", 3, 10), Ok(()));
        assert_eq!(check_yaml_nesting("a: 1\nb: [[[[1]]]]\n", 3, 10), Err(2));
        assert_eq!(check_yaml_nesting("a: \"[[[[\" # {{{{\n", 3, 10), Ok(()));
        assert_eq!(check_yaml_nesting("a:\n            b: 1\n", 3, 10), Err(2));
        assert_eq!(check_yaml_nesting("a: it's\nb: [[[[1]]]]\n", 3, 10), Err(2));
        // found by fuzzing convert: an escaped quote does not end a double-quoted scalar
        assert_eq!(check_yaml_nesting(r#"a: "\"{{{{\\" "#, 3, 10), Ok(()));
        assert_eq!(check_yaml_nesting(r#"a: "\\" {{{{"#, 3, 10), Err(1));
    }
}
