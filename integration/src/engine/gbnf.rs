//! llama.cpp's GBNF grammars (what llama.cpp's server and vLLM's xgrammar backend take as a
//! grammar), rewritten into the Lark dialect of llguidance, the grammar engine here.
//!
//! Written by hand: no maintained Rust crate reads GBNF into anything llguidance takes
//! (llguidance's own converter is a Python script outside its crate). The syntax read is
//! llama.cpp's parser's (`llama-grammar.cpp`): rules `name ::= alternates`, a rule ending at a
//! newline unless inside parentheses or after `|`; string literals and character classes with
//! `\x`, `\u`, `\U`, `\t`, `\r`, `\n` and `\\ \" \[ \] \-` escapes; `.`; groups; `*`, `+`, `?` and
//! `{m}`, `{m,}`, `{m,n}`; `#` comments; the start rule `root`. Token references (`<[id]>`,
//! `<name>`, `!`) are refused.
//!
//! GBNF matches characters, while llguidance splits a rule's text into lexemes, matched
//! greedily: `"ab" "d" | "a" "b" "c"` would never reach `abc` if `"ab"` and `"a"` were lexemes.
//! So every literal becomes one lexeme per character, and every class one character: a lexeme
//! is never a prefix of another, and the language is GBNF's.

use anyhow::{bail, Result};

/// Whether `text` reads as GBNF rather than Lark: some line starts with a rule name and `::=`.
pub fn looks_like_gbnf(text: &str) -> bool {
    text.split(['\n', '\r']).any(|line| {
        let line = line.trim_start();
        let name = line.chars().take_while(|&c| is_word_char(c)).count();
        name > 0 && line[name..].trim_start_matches([' ', '\t']).starts_with("::=")
    })
}

/// The Lark grammar (start rule `start`) of the GBNF grammar `gbnf`; an error naming the line
/// and what was expected for text llama.cpp's parser would refuse, a token reference, a missing
/// `root` or an undefined rule.
pub fn to_lark(gbnf: &str) -> Result<String> {
    let mut p = Parser { src: gbnf.chars().collect(), pos: 0, names: Vec::new(), rules: Vec::new() };
    p.space(true);
    while p.pos < p.src.len() {
        p.rule()?;
    }
    let Some(root) = p.names.iter().position(|n| n == "root") else {
        bail!("GBNF: the grammar has no `root` rule");
    };
    let mut out = format!("start: {}\n", lark_name(root, "root"));
    for (i, name) in p.names.iter().enumerate() {
        let Some(body) = p.rules.iter().rev().find(|(r, _)| *r == i).map(|(_, b)| b) else {
            bail!("GBNF: rule `{name}` is used but never defined");
        };
        out.push_str(&format!("{}: {body}\n", lark_name(i, name)));
    }
    Ok(out)
}

/// Rule-name characters: llama.cpp's, and `_` as xgrammar's names take it.
fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// llama.cpp's largest repetition count: a larger maximum is no maximum, a larger minimum an
/// error.
const MAX_REPETITIONS: u32 = 2000;

/// The Lark name of GBNF rule `i` named `name`: lower case (upper case names Lark's lexemes),
/// unique by its index.
fn lark_name(i: usize, name: &str) -> String {
    format!("r{i}_{}", name.to_ascii_lowercase().replace('-', "_"))
}

/// A Lark string literal of one character.
fn literal(c: char) -> String {
    match c {
        '"' => "\"\\\"\"".into(),
        '\\' => "\"\\\\\"".into(),
        c if c.is_control() => format!("\"\\u{:04x}\"", c as u32),
        c => format!("\"{c}\""),
    }
}

/// A regex escape of one character, whatever it is.
fn regex_char(c: char) -> String {
    format!("\\x{{{:x}}}", c as u32)
}

/// A recursive-descent reader of GBNF, following llama.cpp's parser; each rule's body is
/// written out in Lark as it is read.
struct Parser {
    src: Vec<char>,
    pos: usize,
    /// Rule names in order of first mention (definition or reference).
    names: Vec<String>,
    /// (rule index, Lark body) per definition; a later definition replaces an earlier one, as in
    /// llama.cpp.
    rules: Vec<(usize, String)>,
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.src.get(self.pos).copied()
    }

    fn at(&self, offset: usize) -> Option<char> {
        self.src.get(self.pos + offset).copied()
    }

    /// An error at the current position, with its line and the text there.
    fn error(&self, what: &str) -> anyhow::Error {
        let line = self.src[..self.pos.min(self.src.len())].iter().filter(|&&c| c == '\n').count() + 1;
        let near: String = self.src[self.pos.min(self.src.len())..].iter().take(20).collect();
        anyhow::anyhow!("GBNF line {line}: {what} at {near:?}")
    }

    /// Skips spaces, tabs and comments, and newlines when `newline_ok`.
    fn space(&mut self, newline_ok: bool) {
        while let Some(c) = self.peek() {
            match c {
                ' ' | '\t' => self.pos += 1,
                '\r' | '\n' if newline_ok => self.pos += 1,
                '#' => {
                    while self.peek().is_some_and(|c| c != '\r' && c != '\n') {
                        self.pos += 1;
                    }
                }
                _ => break,
            }
        }
    }

    /// Reads a rule name; returns its index.
    fn name(&mut self) -> Result<usize> {
        let start = self.pos;
        while self.peek().is_some_and(is_word_char) {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.error("expecting a rule name"));
        }
        let name: String = self.src[start..self.pos].iter().collect();
        Ok(match self.names.iter().position(|n| *n == name) {
            Some(i) => i,
            None => {
                self.names.push(name);
                self.names.len() - 1
            }
        })
    }

    /// `name ::= alternates` up to its newline.
    fn rule(&mut self) -> Result<()> {
        let index = self.name()?;
        self.space(false);
        if !(self.peek() == Some(':') && self.at(1) == Some(':') && self.at(2) == Some('=')) {
            return Err(self.error("expecting ::="));
        }
        self.pos += 3;
        self.space(true);
        let body = self.alternates(false)?;
        match self.peek() {
            Some('\r') => self.pos += if self.at(1) == Some('\n') { 2 } else { 1 },
            Some('\n') => self.pos += 1,
            None => {}
            Some(_) => return Err(self.error("expecting a newline or the end")),
        }
        self.space(true);
        self.rules.push((index, body));
        Ok(())
    }

    fn alternates(&mut self, nested: bool) -> Result<String> {
        let mut alts = vec![self.sequence(nested)?];
        while self.peek() == Some('|') {
            self.pos += 1;
            self.space(true);
            alts.push(self.sequence(nested)?);
        }
        Ok(alts.join(" | "))
    }

    /// A sequence of elements, each with its repetitions; `""` when empty.
    fn sequence(&mut self, nested: bool) -> Result<String> {
        let mut items: Vec<String> = Vec::new();
        while let Some(c) = self.peek() {
            let item = match c {
                '"' => {
                    self.pos += 1;
                    let mut chars = Vec::new();
                    while self.peek() != Some('"') {
                        chars.push(self.char()?);
                    }
                    self.pos += 1;
                    match chars.len() {
                        0 => "\"\"".to_string(),
                        1 => literal(chars[0]),
                        _ => format!("({})", chars.into_iter().map(literal).collect::<Vec<_>>().join(" ")),
                    }
                }
                '[' => self.class()?,
                '.' => {
                    self.pos += 1;
                    "/(?s:.)/".to_string()
                }
                '(' => {
                    self.pos += 1;
                    self.space(true);
                    let inner = self.alternates(true)?;
                    if self.peek() != Some(')') {
                        return Err(self.error("expecting ')'"));
                    }
                    self.pos += 1;
                    format!("({inner})")
                }
                '<' | '!' => return Err(self.error("token references are not supported")),
                c if is_word_char(c) => {
                    let i = self.name()?;
                    lark_name(i, &self.names[i])
                }
                '*' | '+' | '?' | '{' => {
                    let Some(last) = items.pop() else {
                        return Err(self.error("expecting an item before the repetition"));
                    };
                    self.repetition(last, nested)?
                }
                _ => break,
            };
            items.push(item);
            self.space(nested);
        }
        Ok(if items.is_empty() { "\"\"".to_string() } else { items.join(" ") })
    }

    /// `item` under the repetition at the current position (an item already repeated is
    /// grouped first: Lark takes one operator per item, GBNF any number).
    fn repetition(&mut self, item: String, nested: bool) -> Result<String> {
        let op = self.peek().expect("called at a repetition");
        self.pos += 1;
        let item = if item.ends_with(['*', '+', '?', '}']) { format!("({item})") } else { item };
        if op != '{' {
            return Ok(format!("{item}{op}"));
        }
        self.space(nested);
        let min = self.int()?;
        self.space(nested);
        let max = match self.peek() {
            Some('}') => Some(min),
            Some(',') => {
                self.pos += 1;
                self.space(nested);
                let max = if self.peek().is_some_and(|c| c.is_ascii_digit()) { Some(self.int()?) } else { None };
                self.space(nested);
                max
            }
            _ => return Err(self.error("expecting ',' or '}'")),
        };
        if self.peek() != Some('}') {
            return Err(self.error("expecting '}'"));
        }
        self.pos += 1;
        if min > MAX_REPETITIONS {
            return Err(self.error(&format!("a repetition of at least {min} times (at most {MAX_REPETITIONS})")));
        }
        Ok(match max.filter(|&m| m <= MAX_REPETITIONS) {
            Some(max) if max < min => return Err(self.error(&format!("a repetition of {min} to {max} times"))),
            Some(0) => "\"\"".to_string(),
            Some(max) => format!("{item}{{{min},{max}}}"),
            None => format!("{item}{{{min},}}"),
        })
    }

    fn int(&mut self) -> Result<u32> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        let digits: String = self.src[start..self.pos].iter().collect();
        digits.parse().map_err(|_| self.error("expecting a count"))
    }

    /// `[...]` or `[^...]` as a one-character regex.
    fn class(&mut self) -> Result<String> {
        self.pos += 1;
        let negated = self.peek() == Some('^');
        if negated {
            self.pos += 1;
        }
        let mut parts = String::new();
        while self.peek() != Some(']') {
            let lo = self.char()?;
            parts.push_str(&regex_char(lo));
            if self.peek() == Some('-') && self.at(1).is_some_and(|c| c != ']') {
                self.pos += 1;
                let hi = self.char()?;
                if hi < lo {
                    return Err(self.error("a character range that runs backwards"));
                }
                parts.push('-');
                parts.push_str(&regex_char(hi));
            }
        }
        self.pos += 1;
        if parts.is_empty() {
            return Err(self.error("an empty character class"));
        }
        Ok(format!("/[{}{parts}]/", if negated { "^" } else { "" }))
    }

    /// One character of a literal or class, escapes decoded.
    fn char(&mut self) -> Result<char> {
        let Some(c) = self.peek() else { return Err(self.error("unexpected end of input")) };
        self.pos += 1;
        if c != '\\' {
            return Ok(c);
        }
        let Some(e) = self.peek() else { return Err(self.error("unexpected end of input")) };
        self.pos += 1;
        let hex = |p: &mut Self, n: usize| -> Result<char> {
            let digits: String = p.src[p.pos.min(p.src.len())..].iter().take(n).collect();
            let all_hex = digits.len() == n && digits.chars().all(|c| c.is_ascii_hexdigit());
            let value = all_hex.then(|| u32::from_str_radix(&digits, 16).ok()).flatten();
            let c = value.and_then(char::from_u32).ok_or_else(|| p.error(&format!("expecting {n} hex digits")))?;
            p.pos += n;
            Ok(c)
        };
        match e {
            'x' => hex(self, 2),
            'u' => hex(self, 4),
            'U' => hex(self, 8),
            't' => Ok('\t'),
            'r' => Ok('\r'),
            'n' => Ok('\n'),
            '\\' | '"' | '[' | ']' | '-' => Ok(e),
            _ => Err(self.error("unknown escape")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gbnf_is_told_from_lark() {
        assert!(looks_like_gbnf("root ::= \"a\""));
        assert!(looks_like_gbnf("# a comment\n  item-list\t::= [a-z]+\nroot ::= item-list"));
        assert!(!looks_like_gbnf("start: \"(\" item (\",\" item)* \")\"\nitem: \"a\" | \"b\""));
        assert!(!looks_like_gbnf("start: \"::=\""));
    }

    /// What llama.cpp's parser refuses, and what llguidance cannot take, is an error naming the
    /// line and the problem.
    #[test]
    fn malformed_grammars_are_refused_with_their_line() {
        for (gbnf, words) in [
            ("item ::= \"a\"", vec!["no `root` rule"]),
            ("root ::= item", vec!["`item` is used but never defined"]),
            ("root ::= \"a\"\nx ::= <[42]>", vec!["line 2", "token references"]),
            ("root ::= !<tool>", vec!["token references"]),
            ("root ::= \"a\\q\"", vec!["unknown escape"]),
            ("root ::= \"\\x4\"", vec!["2 hex digits"]),
            ("root ::= \"abc", vec!["unexpected end"]),
            ("root ::= [z-a]", vec!["runs backwards"]),
            ("root ::= []", vec!["empty character class"]),
            ("root ::= \"a\"{3,1}", vec!["3 to 1 times"]),
            ("root ::= \"a\"{3,0}", vec!["3 to 0 times"]),
            ("root ::= \"a\"{2001,}", vec!["at least 2001 times"]),
            ("root ::= \"\\x+a\"", vec!["2 hex digits"]),
            ("root ::= \"a\"{x}", vec!["expecting a count"]),
            ("root ::= * \"a\"", vec!["before the repetition"]),
            ("root ::= (\"a\" \"b\"", vec!["expecting ')'"]),
            ("root ::= \"a\" )", vec!["newline or the end"]),
            ("root : \"a\"", vec!["expecting ::="]),
            ("\"a\"", vec!["expecting a rule name"]),
        ] {
            let e = format!("{:#}", to_lark(gbnf).err().unwrap_or_else(|| panic!("{gbnf:?} accepted")));
            assert!(words.iter().all(|w| e.contains(w)), "{gbnf:?}: {e}");
        }
    }

    /// The rewriting itself: one lexeme per character, classes as one-character regexes, names
    /// unique and lower case, a later definition winning (as in llama.cpp), `{0}` as nothing.
    #[test]
    fn rules_are_written_out_lexeme_by_character() {
        let lark = to_lark("root ::= Ab-c \"x\"{0} | \"\"\nAb-c ::= \"q\\\"\" [^a-c\\n]? .*\nAb-c ::= \"z\"").unwrap();
        assert_eq!(lark, "start: r0_root\nr0_root: r1_ab_c \"\" | \"\"\nr1_ab_c: \"z\"\n");
        let lark = to_lark("root ::= \"q\\\"\" [^a-c\\n]? .* ( \"a\" |\n \"b\" )+").unwrap();
        assert_eq!(
            lark,
            "start: r0_root\nr0_root: (\"q\" \"\\\"\") /[^\\x{61}-\\x{63}\\x{a}]/? /(?s:.)/* (\"a\" | \"b\")+\n"
        );
        // Repetitions stack (GBNF repeats what the last one made); a maximum past llama.cpp's
        // 2000 is none; braces may span lines inside a group; names may take `_` (xgrammar's).
        let lark = to_lark("root ::= \"a\"*? x_y{2}{1,3} (\"b\"{1,\n 5000})\nx_y ::= \"c\"").unwrap();
        assert_eq!(lark, "start: r0_root\nr0_root: (\"a\"*)? (r1_x_y{2,2}){1,3} (\"b\"{1,})\nr1_x_y: \"c\"\n");
    }
}
