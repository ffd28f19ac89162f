//! S-expressions with line numbers: the surface syntax of `passes/*.rules`.
//!
//! `(list items)`, `[vector items]`, atoms (symbols, numbers, `?vars`, `:keys`),
//! `"strings"`, and `#` comments to the end of the line. A `#` inside an atom is
//! part of it (`Split#1`, an output index): only one that starts a token opens a
//! comment.

use std::fmt;

#[derive(Clone, Debug, PartialEq)]
pub enum SExpr {
    Atom { text: String, line: usize },
    Str { text: String, line: usize },
    List { items: Vec<SExpr>, line: usize },
    Vector { items: Vec<SExpr>, line: usize },
}

impl SExpr {
    pub fn line(&self) -> usize {
        match self {
            SExpr::Atom { line, .. } | SExpr::Str { line, .. } | SExpr::List { line, .. } | SExpr::Vector { line, .. } => *line,
        }
    }

    pub fn atom(&self) -> Option<&str> {
        match self {
            SExpr::Atom { text, .. } => Some(text),
            _ => None,
        }
    }
}

impl fmt::Display for SExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let join = |f: &mut fmt::Formatter<'_>, items: &[SExpr]| -> fmt::Result {
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    f.write_str(" ")?;
                }
                write!(f, "{item}")?;
            }
            Ok(())
        };
        match self {
            SExpr::Atom { text, .. } => f.write_str(text),
            SExpr::Str { text, .. } => write!(f, "{text:?}"),
            SExpr::List { items, .. } => {
                f.write_str("(")?;
                join(f, items)?;
                f.write_str(")")
            }
            SExpr::Vector { items, .. } => {
                f.write_str("[")?;
                join(f, items)?;
                f.write_str("]")
            }
        }
    }
}

/// A syntax error at a line.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    pub line: usize,
    pub message: String,
}

/// Parses every top-level expression, each with the `#` comment lines right
/// above it (the rule's documentation).
pub fn parse(text: &str) -> Result<Vec<(SExpr, Vec<String>)>, SyntaxError> {
    let mut parser = Parser { chars: text.chars().collect(), pos: 0, line: 1, comments: Vec::new() };
    let mut out = Vec::new();
    loop {
        parser.skip_space();
        if parser.pos >= parser.chars.len() {
            return Ok(out);
        }
        let doc = std::mem::take(&mut parser.comments);
        out.push((parser.expr()?, doc));
    }
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
    line: usize,
    comments: Vec<String>,
}

impl Parser {
    fn error(&self, message: impl Into<String>) -> SyntaxError {
        SyntaxError { line: self.line, message: message.into() }
    }

    fn skip_space(&mut self) {
        while let Some(&c) = self.chars.get(self.pos) {
            if c == '\n' {
                self.line += 1;
                self.pos += 1;
            } else if c.is_whitespace() {
                self.pos += 1;
            } else if c == '#' {
                let start = self.pos + 1;
                while self.chars.get(self.pos).is_some_and(|&c| c != '\n') {
                    self.pos += 1;
                }
                self.comments.push(self.chars[start..self.pos].iter().collect::<String>().trim().to_string());
            } else {
                return;
            }
        }
    }

    fn expr(&mut self) -> Result<SExpr, SyntaxError> {
        self.skip_space();
        let line = self.line;
        match self.chars.get(self.pos) {
            None => Err(self.error("unexpected end of file")),
            Some('(') | Some('[') => {
                let close = if self.chars[self.pos] == '(' { ')' } else { ']' };
                self.pos += 1;
                let mut items = Vec::new();
                loop {
                    self.skip_space();
                    match self.chars.get(self.pos) {
                        None => return Err(SyntaxError { line, message: format!("'{}' opened here is never closed", if close == ')' { '(' } else { '[' }) }),
                        Some(&c) if c == close => {
                            self.pos += 1;
                            return Ok(if close == ')' { SExpr::List { items, line } } else { SExpr::Vector { items, line } });
                        }
                        Some(')') | Some(']') => return Err(self.error("mismatched closing bracket")),
                        Some(_) => items.push(self.expr()?),
                    }
                }
            }
            Some(')') | Some(']') => Err(self.error("unexpected closing bracket")),
            Some('"') => {
                self.pos += 1;
                let start = self.pos;
                while self.chars.get(self.pos).is_some_and(|&c| c != '"') {
                    self.pos += 1;
                }
                if self.pos >= self.chars.len() {
                    return Err(SyntaxError { line, message: "unterminated string".into() });
                }
                let text = self.chars[start..self.pos].iter().collect();
                self.pos += 1;
                Ok(SExpr::Str { text, line })
            }
            Some(_) => {
                let start = self.pos;
                while self.chars.get(self.pos).is_some_and(|&c| !c.is_whitespace() && !"()[]\"".contains(c)) {
                    self.pos += 1;
                }
                Ok(SExpr::Atom { text: self.chars[start..self.pos].iter().collect(), line })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_lists_vectors_and_comments() {
        let parsed = parse("# doc line\n(a (b ?x) [1 2] :k \"s\")\n(c)").unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].1, vec!["doc line"]);
        assert_eq!(parsed[0].0.to_string(), "(a (b ?x) [1 2] :k \"s\")");
        assert_eq!(parsed[1].0.line(), 3);
    }

    #[test]
    fn a_hash_inside_an_atom_is_not_a_comment() {
        let parsed = parse("(Split#1@s ?x) # note\n").unwrap();
        assert_eq!(parsed[0].0.to_string(), "(Split#1@s ?x)");
    }

    #[test]
    fn errors_carry_lines() {
        let err = parse("(a\n(b)").unwrap_err();
        assert_eq!(err.line, 1);
        let err = parse("(a))").unwrap_err();
        assert_eq!(err.line, 1);
    }
}
