//! Constrained decoding: a rule on which tokens may come next, applied to a sequence's logits
//! before each token is chosen. [`Grammars`] builds them with llguidance (the grammar engine
//! mistral.rs and vLLM use) from a [`Structure`]: for OpenAI's `response_format`, forced tool
//! calls, and vLLM's `guided_*` / `structured_outputs`.

use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use tokenizers::Tokenizer;

/// Which tokens may come next, following the tokens chosen.
pub trait TokenConstraint: Send {
    /// Sets the logits of the tokens that may not come next to minus infinity.
    fn mask(&mut self, logits: &mut [f32]) -> Result<()>;
    /// Follows the token chosen.
    fn advance(&mut self, token: u32) -> Result<()>;
    /// The constrained text is complete: nothing more may come.
    fn finished(&self) -> bool;
}

/// What a grammar forces an answer to.
#[derive(Debug, Clone, PartialEq)]
pub enum Structure {
    /// JSON matching a JSON Schema.
    JsonSchema(serde_json::Value),
    /// Text the regular expression matches whole (llguidance's syntax).
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// Text of a Lark grammar (llguidance's dialect, which vLLM's `guidance` backend takes).
    Lark(String),
}

/// Builds grammar constraints over one tokenizer's vocabulary.
#[derive(Clone)]
pub struct Grammars {
    factory: Arc<ParserFactory>,
}

impl Grammars {
    /// For `tokenizer`, with logits over `vocab_size` tokens (rows past the tokenizer's are never
    /// allowed) and `eos` ending a constrained answer.
    pub fn new(tokenizer: &Tokenizer, vocab_size: usize, eos: &[u32]) -> Result<Self> {
        // toktrie reads the tokenizer from its JSON form (it links its own `tokenizers` version).
        let json = tokenizer.to_string(false).map_err(|e| anyhow!("serializing the tokenizer: {e}"))?;
        let mut bytes = toktrie_hf_tokenizers::ByteTokenizer::from_json_bytes(json.as_bytes())
            .context("reading the tokenizer's vocabulary for constrained decoding")?;
        if !eos.is_empty() {
            bytes.set_eos_tokens(eos);
        }
        let env = bytes.into_tok_env(Some(vocab_size)).context("building the token trie")?;
        let mut factory = ParserFactory::new_simple(&env).context("building the grammar engine")?;
        factory.quiet();
        Ok(Self { factory: Arc::new(factory) })
    }

    /// `copies` constraints to `structure`, sharing one compiled grammar; a structure the engine
    /// cannot use (an unsupported or malformed schema, regex or grammar) is an error. JSON is
    /// written as Python's `json.dumps` writes it (`, ` and `: `, no other whitespace), so that a
    /// model cannot loop on whitespace, unless the schema's own `x-guidance` options say
    /// otherwise. A choice is a grammar whose alternatives are the strings, each literal.
    pub fn build(&self, structure: &Structure, copies: usize) -> Result<Vec<Box<dyn TokenConstraint>>> {
        let grammar = match structure {
            Structure::JsonSchema(schema) => {
                let mut schema = match schema {
                    serde_json::Value::Bool(true) => serde_json::json!({}),
                    other => other.clone(),
                };
                if let Some(o) = schema.as_object_mut() {
                    o.entry("x-guidance").or_insert_with(|| {
                        serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
                    });
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Structure::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Structure::Choice(choices) if choices.is_empty() => {
                return Err(anyhow!("a choice needs at least one string"))
            }
            Structure::Choice(choices) => {
                // Lark string literals take JSON's escapes, and refuse a raw DEL, which JSON leaves.
                let literal = |c: &String| serde_json::Value::from(c.as_str()).to_string().replace('\u{7f}', "\\u007f");
                let literals: Vec<String> = choices.iter().map(literal).collect();
                TopLevelGrammar::from_lark(format!("start: {}", literals.join(" | ")))
            }
            Structure::Lark(grammar) => TopLevelGrammar::from_lark(grammar.clone()),
        };
        let parser = self.factory.create_parser(grammar)?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(anyhow!("{e}"));
        }
        let copy = |_| -> Box<dyn TokenConstraint> { Box::new(GrammarConstraint { matcher: matcher.deep_clone() }) };
        Ok((0..copies).map(copy).collect())
    }
}

/// An llguidance matcher as a [`TokenConstraint`].
struct GrammarConstraint {
    matcher: Matcher,
}

impl TokenConstraint for GrammarConstraint {
    fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let allowed = self.matcher.compute_mask_or_eos().map_err(|e| anyhow!("the grammar: {e}"))?;
        // Past the mask's end (logits longer than the vocabulary it was built for): refused too.
        for (i, l) in logits.iter_mut().enumerate() {
            if i >= allowed.len() || !allowed.is_allowed(i as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    fn advance(&mut self, token: u32) -> Result<()> {
        self.matcher.consume_token(token).map_err(|e| anyhow!("the grammar refused token {token}: {e}"))
    }

    fn finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The byte-level BPE vocabulary of the tiny Llama 3 fixture (512 tokens).
    fn tokenizer() -> (Tokenizer, u32) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/llama3_tiny.gguf");
        let mut file = std::fs::File::open(path).unwrap();
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
        let eos = content.metadata["tokenizer.ggml.eos_token_id"].to_u32().unwrap();
        (crate::model::gguf_tokenizer::from_gguf(&content).unwrap(), eos)
    }

    /// Samples a constrained answer from random logits (seeded), as the scheduler does.
    fn sample_answer(c: &mut dyn TokenConstraint, vocab: usize, eos: u32, seed: u64) -> Vec<u32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut tokens = Vec::new();
        while !c.finished() && tokens.len() < 400 {
            let mut logits: Vec<f32> = (0..vocab).map(|_| rng.random_range(-4.0..4.0)).collect();
            c.mask(&mut logits).unwrap();
            let allowed: Vec<usize> = (0..vocab).filter(|&i| logits[i].is_finite()).collect();
            assert!(!allowed.is_empty(), "the mask allows no token");
            let next = allowed[rng.random_range(0..allowed.len())] as u32;
            c.advance(next).unwrap();
            if next != eos {
                tokens.push(next);
            }
        }
        assert!(c.finished(), "no end within 400 tokens");
        tokens
    }

    /// Whatever the logits, the text a schema constraint lets through parses and matches the
    /// schema (checked by hand here, an oracle apart from llguidance).
    #[test]
    fn random_answers_under_a_schema_are_valid_json_of_that_schema() {
        let (tok, eos) = tokenizer();
        let vocab = tok.get_vocab_size(true) + 3;
        let grammars = Grammars::new(&tok, vocab, &[eos]).unwrap();
        let schema = serde_json::json!({"type": "object", "properties": {
            "n": {"type": "integer", "minimum": 0, "maximum": 99},
            "tag": {"enum": ["red", "green"]},
            "ok": {"type": "boolean"}},
            "required": ["n", "tag", "ok"], "additionalProperties": false});
        for seed in 0..12 {
            let mut c = grammars.build(&Structure::JsonSchema(schema.clone()), 1).unwrap().pop().unwrap();
            let tokens = sample_answer(c.as_mut(), vocab, eos, seed);
            let text = tok.decode(&tokens, false).unwrap();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
            let o = v.as_object().unwrap();
            assert_eq!(o.len(), 3, "{text}");
            // Written as json.dumps writes it: no whitespace but one space after `,` and `:`.
            assert!(!text.contains(['\n', '\t', '\r']) && !text.contains("  ") && text.starts_with("{\""), "{text}");
            assert!(o["n"].as_u64().is_some_and(|n| n <= 99), "{text}");
            assert!(["red", "green"].contains(&o["tag"].as_str().unwrap()), "{text}");
            assert!(o["ok"].is_boolean(), "{text}");
        }
        // Rows past the tokenizer's vocabulary are never allowed.
        let object = Structure::JsonSchema(serde_json::json!({"type": "object"}));
        let mut c = grammars.build(&object, 1).unwrap().pop().unwrap();
        let mut logits = vec![0.0; vocab];
        c.mask(&mut logits).unwrap();
        assert!(logits[vocab - 3..].iter().all(|l| *l == f32::NEG_INFINITY));
    }

    #[test]
    fn a_schema_the_engine_cannot_use_is_an_error() {
        let (tok, eos) = tokenizer();
        let grammars = Grammars::new(&tok, tok.get_vocab_size(true), &[eos]).unwrap();
        for bad in [serde_json::json!({"type": "nonsense"}), serde_json::json!({"$ref": "#/nowhere"})] {
            assert!(grammars.build(&Structure::JsonSchema(bad.clone()), 1).is_err(), "{bad}");
        }
        for bad in [Structure::Regex("(a".into()), Structure::Lark("start: nowhere".into()), Structure::Choice(vec![])]
        {
            assert!(grammars.build(&bad, 1).is_err(), "{bad:?}");
        }
    }

    /// Whether the constraint takes exactly `text`: its tokens one by one, then the end.
    fn accepts(c: &mut dyn TokenConstraint, tok: &Tokenizer, vocab: usize, eos: u32, text: &str) -> bool {
        let allows = |c: &mut dyn TokenConstraint, id: u32| {
            let mut logits = vec![0f32; vocab];
            c.mask(&mut logits).unwrap();
            logits[id as usize].is_finite()
        };
        for id in tok.encode(text, false).unwrap().get_ids().iter().copied() {
            if c.finished() || !allows(c, id) {
                return false;
            }
            c.advance(id).unwrap();
        }
        // A grammar that allows nothing more stops by itself; otherwise the end must be allowed.
        c.finished() || allows(c, eos)
    }

    /// GBNF grammars rewritten into Lark keep their language (checked by hand here): random
    /// answers lie in it, and chosen texts in it are taken and texts outside refused, through
    /// literals that are prefixes of one another, rule references, classes (ranges, negation,
    /// escapes), `.`, groups, every repetition, comments and dashed names.
    #[test]
    fn gbnf_grammars_keep_their_language_in_lark() {
        let (tok, eos) = tokenizer();
        let vocab = tok.get_vocab_size(true);
        let grammars = Grammars::new(&tok, vocab, &[eos]).unwrap();
        let prefixes = r#"root ::= "a" "b" "c" | "ab" "d""#;
        let sums = r#"
# sums of small numbers, in brackets (digits under stacked repetitions)
root  ::= "[" expr "]"
expr  ::= term ("+" term){0,2}
term  ::= num | "(" inner ")"
inner ::= num ("+" num)*
num   ::= [1-9] [0-9]?{0,2}
"#;
        let quoted =
            "root ::= quoted-str ws? \"\\x21\"{1,}\nquoted-str ::= \"\\\"\" [^\"\\\\\\n]{1,8} \"\\\"\"  # no quote\n\
                      ws ::= [ \\t] |\n  \"<\" . \">\"\n";
        let num = |t: &str| {
            let b = t.as_bytes();
            (1..=3).contains(&b.len()) && b[0] != b'0' && b.iter().all(u8::is_ascii_digit)
        };
        let term = |t: &str| match t.strip_prefix('(').and_then(|t| t.strip_suffix(')')) {
            Some(inner) => inner.split('+').all(num),
            None => num(t),
        };
        let in_sums = |t: &str| {
            let Some(e) = t.strip_prefix('[').and_then(|t| t.strip_suffix(']')) else { return false };
            // Split at the `+` outside parentheses.
            let (mut depth, mut terms, mut start) = (0, Vec::new(), 0);
            for (i, c) in e.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    '+' if depth == 0 => {
                        terms.push(&e[start..i]);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            terms.push(&e[start..]);
            terms.len() <= 3 && terms.iter().all(|t| term(t))
        };
        let in_quoted = |t: &str| {
            let Some(rest) = t.strip_prefix('"') else { return false };
            let Some(end) = rest.find('"') else { return false };
            let body = &rest[..end];
            let rest: Vec<char> = rest[end + 1..].chars().collect();
            let ws = match rest.first() {
                Some(' ' | '\t') => 1,
                Some('<') if rest.get(2) == Some(&'>') => 3,
                _ => 0,
            };
            (1..=8).contains(&body.chars().count())
                && !body.contains(['\\', '\n'])
                && rest.len() > ws
                && rest[ws..].iter().all(|&c| c == '!')
        };
        type InLanguage<'a> = &'a dyn Fn(&str) -> bool;
        let cases: [(&str, InLanguage, &[&str], &[&str]); 3] = [
            (prefixes, &|t| ["abc", "abd"].contains(&t), &["abc", "abd"], &["ab", "abcd", "ac", "abdd"]),
            (sums, &in_sums, &["[7]", "[12+(3+45+6)+999]", "[(1)]"], &["[0]", "[1+2+3+4]", "[1000]", "[()]", "7"]),
            (
                quoted,
                &in_quoted,
                &["\"a b\"!", "\"12345678\"\t!!", "\"é\"<\n>!"],
                &["\"\"!", "\"a\\b\"!", "\"123456789\"!", "\"a\"", "\"a\"  !"],
            ),
        ];
        for (gbnf, in_language, members, others) in cases {
            let lark = super::super::gbnf::to_lark(gbnf).unwrap();
            let build = || grammars.build(&Structure::Lark(lark.clone()), 1).unwrap().pop().unwrap();
            for text in members {
                assert!(in_language(text), "the checker refuses {text:?}");
                assert!(accepts(build().as_mut(), &tok, vocab, eos, text), "{gbnf}: {text:?} refused\n{lark}");
            }
            for text in others {
                assert!(!in_language(text), "the checker takes {text:?}");
                assert!(!accepts(build().as_mut(), &tok, vocab, eos, text), "{gbnf}: {text:?} taken\n{lark}");
            }
            let mut answers = std::collections::HashSet::new();
            for seed in 0..10 {
                let text = tok.decode(&sample_answer(build().as_mut(), vocab, eos, seed), false).unwrap();
                assert!(in_language(&text), "{gbnf}: {text:?}");
                answers.insert(text);
            }
            assert!(answers.len() > 1, "{gbnf}: one answer for every seed");
        }
    }

    /// Whatever the logits, answers under a regular expression, a choice and a Lark grammar lie
    /// in their languages (checked by hand here, apart from llguidance), and different seeds
    /// reach different answers.
    #[test]
    fn random_answers_under_a_regex_a_choice_and_a_grammar_are_in_their_language() {
        let (tok, eos) = tokenizer();
        let vocab = tok.get_vocab_size(true);
        let grammars = Grammars::new(&tok, vocab, &[eos]).unwrap();
        let choices = ["yes", "no way", "a \"quoted\" one\n", "del\u{7f}"];
        let regex = |t: &str| {
            let (digits, tail) = t.split_once('-').unwrap_or(("", ""));
            (2..=4).contains(&digits.len())
                && digits.bytes().all(|b| b.is_ascii_digit())
                && ["ab", "cd"].contains(&tail)
        };
        let list = |t: &str| {
            let inner = t.strip_prefix('(').and_then(|t| t.strip_suffix(')')).unwrap_or("");
            !inner.is_empty() && inner.split(',').all(|x| ["a", "b", "c"].contains(&x))
        };
        type InLanguage<'a> = &'a dyn Fn(&str) -> bool;
        let cases: [(Structure, InLanguage); 3] = [
            (Structure::Regex("[0-9]{2,4}-(ab|cd)".into()), &regex),
            (Structure::Choice(choices.iter().map(|c| c.to_string()).collect()), &|t| choices.contains(&t)),
            (Structure::Lark("start: \"(\" item (\",\" item)* \")\"\nitem: \"a\" | \"b\" | \"c\"".into()), &list),
        ];
        for (structure, in_language) in cases {
            let mut answers = std::collections::HashSet::new();
            for seed in 0..10 {
                let mut c = grammars.build(&structure, 1).unwrap().pop().unwrap();
                let text = tok.decode(&sample_answer(c.as_mut(), vocab, eos, seed), false).unwrap();
                assert!(in_language(&text), "{structure:?}: {text:?}");
                answers.insert(text);
            }
            assert!(answers.len() > 1, "{structure:?}: one answer for every seed");
        }
    }
}
