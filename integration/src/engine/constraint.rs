//! Constrained decoding: a rule on which tokens may come next, applied to a sequence's logits
//! before each token is chosen. [`Grammars`] builds them from JSON Schemas with llguidance (the
//! grammar engine mistral.rs and vLLM use), for OpenAI's `response_format` and forced tool calls.

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

    /// A constraint to text matching `schema` (a JSON Schema); an unsupported or malformed schema
    /// is an error.
    pub fn json_schema(&self, schema: serde_json::Value) -> Result<Box<dyn TokenConstraint>> {
        let parser = self.factory.create_parser(TopLevelGrammar::from_json_schema(schema))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(anyhow!("{e}"));
        }
        Ok(Box::new(GrammarConstraint { matcher }))
    }
}

/// An llguidance matcher as a [`TokenConstraint`].
struct GrammarConstraint {
    matcher: Matcher,
}

impl TokenConstraint for GrammarConstraint {
    fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let allowed = self.matcher.compute_mask_or_eos().map_err(|e| anyhow!("the grammar: {e}"))?;
        for (i, l) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(i as u32) {
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
