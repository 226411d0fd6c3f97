//! A tiny template renderer: `{{name}}` placeholders and nothing else.
//!
//! A placeholder is `{{`, a name of ASCII letters, digits and `_` (spaces
//! around it are allowed), and `}}`. Values are inserted verbatim, without
//! any escaping: callers only insert values they control or have validated
//! (URLs Duffy builds, validated host names, validated SSH keys). A
//! placeholder the caller does not know is an error, and so is a `{{`
//! without its `}}` on the same line, so a typo in an operator's template is
//! caught when it is loaded rather than sent to a machine.

/// What is wrong with a template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A `{{name}}` that is not one of the known placeholders.
    #[error("unknown placeholder {{{{{name}}}}} on line {line}; known: {known}")]
    UnknownPlaceholder {
        /// The name as written (cut to 40 characters).
        name: String,
        /// 1-based line number.
        line: usize,
        /// The known names, comma-separated.
        known: String,
    },
    /// A `{{` with no `}}` after it on the same line.
    #[error("unclosed placeholder on line {line}: '{{{{' without '}}}}'")]
    Unclosed {
        /// 1-based line number.
        line: usize,
    },
}

/// Renders `template`, replacing each `{{name}}` with the value of `name` in
/// `vars`.
pub fn render(template: &str, vars: &[(&str, &str)]) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len() + 256);
    walk(template, vars.iter().map(|(k, _)| *k), |piece| match piece {
        Piece::Text(t) => out.push_str(t),
        Piece::Var(name) => {
            if let Some((_, v)) = vars.iter().find(|(k, _)| *k == name) {
                out.push_str(v);
            }
        }
    })?;
    Ok(out)
}

/// Checks that `template` only uses placeholders from `known` and that every
/// `{{` is closed, without rendering it.
pub fn check(template: &str, known: &[&str]) -> Result<(), TemplateError> {
    walk(template, known.iter().copied(), |_| {})
}

enum Piece<'a> {
    Text(&'a str),
    Var(&'a str),
}

fn walk<'a, 'k>(
    template: &'a str,
    known: impl Iterator<Item = &'k str> + Clone,
    mut emit: impl FnMut(Piece<'a>),
) -> Result<(), TemplateError> {
    let mut rest = template;
    let mut line = 1;
    while let Some(start) = rest.find("{{") {
        let (text, after_open) = rest.split_at(start);
        line += text.matches('\n').count();
        emit(Piece::Text(text));
        let after_open = &after_open[2..];
        let end = match after_open.find("}}") {
            Some(end) if !after_open[..end].contains('\n') => end,
            _ => return Err(TemplateError::Unclosed { line }),
        };
        let name = after_open[..end].trim();
        let well_formed = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !well_formed || !known.clone().any(|k| k == name) {
            return Err(TemplateError::UnknownPlaceholder {
                name: name.chars().take(40).collect(),
                line,
                known: known.collect::<Vec<_>>().join(", "),
            });
        }
        emit(Piece::Var(name));
        rest = &after_open[end + 2..];
    }
    emit(Piece::Text(rest));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_known_placeholders() {
        let out = render("a {{x}} b {{ y }}{{x}}\n", &[("x", "1"), ("y", "{{z}}")]).unwrap();
        // Values are inserted verbatim and not rendered again.
        assert_eq!(out, "a 1 b {{z}}1\n");
        assert_eq!(render("no placeholders", &[]).unwrap(), "no placeholders");
        assert_eq!(render("single { braces } ${x}", &[]).unwrap(), "single { braces } ${x}");
    }

    #[test]
    fn unknown_and_unclosed_are_errors() {
        let e = render("line1\nline2 {{nope}}", &[("x", "1")]).unwrap_err();
        assert_eq!(e, TemplateError::UnknownPlaceholder { name: "nope".into(), line: 2, known: "x".into() });
        assert!(e.to_string().contains("{{nope}}"), "{e}");
        assert_eq!(render("a {{x", &[("x", "1")]), Err(TemplateError::Unclosed { line: 1 }));
        assert_eq!(render("a {{x\n}}", &[("x", "1")]), Err(TemplateError::Unclosed { line: 1 }));
        assert!(matches!(render("{{}}", &[]), Err(TemplateError::UnknownPlaceholder { .. })));
        assert!(matches!(render("{{a-b}}", &[("a-b", "")]), Err(TemplateError::UnknownPlaceholder { .. })));
        assert!(check("{{x}} {{y}}", &["x", "y"]).is_ok());
        assert!(check("{{x}} {{w}}", &["x", "y"]).is_err());
    }
}
