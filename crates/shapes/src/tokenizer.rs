//! A word-level tokenizer over the shapes grammar's vocabulary.
//!
//! The data set's captions use a few dozen words, so every word is a token. Case and
//! punctuation are ignored, "an" reads as "a" and "centre" as "center"; any other word the
//! vocabulary lacks is dropped and reported by name, so the user learns that the model did not
//! read it.

use candle_core::{Device, Tensor};

/// Padding after the last word; the network learns to ignore it.
pub const PAD: &str = "<pad>";
/// The first token of every prompt; an empty prompt is this token alone (the unconditional
/// prompt used for CFG and caption dropout).
pub const START: &str = "<start>";

/// The tokenizer: the vocabulary in id order, and a fixed sequence length.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenizer {
    vocabulary: Vec<String>,
    max_tokens: usize,
}

/// A prompt as token ids, with the words that were dropped.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    pub unknown_words: Vec<String>,
    /// Words beyond the sequence length, which were cut.
    pub truncated: usize,
}

impl Tokenizer {
    /// A tokenizer whose ids are `vocabulary`'s positions; it must start with [`PAD`] and
    /// [`START`].
    pub fn new(vocabulary: Vec<String>, max_tokens: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(
            vocabulary.first().map(String::as_str) == Some(PAD)
                && vocabulary.get(1).map(String::as_str) == Some(START),
            "the vocabulary must start with {PAD} and {START}"
        );
        anyhow::ensure!(max_tokens >= 2, "max_tokens must be at least 2");
        Ok(Tokenizer {
            vocabulary,
            max_tokens,
        })
    }

    /// The vocabulary of the procedural shapes grammar.
    pub fn for_shapes(max_tokens: usize) -> Self {
        let mut vocabulary = vec![PAD.to_string(), START.to_string()];
        vocabulary.extend(crate::dataset::vocabulary().into_iter().map(String::from));
        Tokenizer::new(vocabulary, max_tokens).expect("a valid vocabulary")
    }

    pub fn vocabulary(&self) -> &[String] {
        &self.vocabulary
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    fn id(&self, word: &str) -> Option<u32> {
        self.vocabulary
            .iter()
            .position(|w| w == word)
            .map(|i| i as u32)
    }

    /// Tokenizes `text` to exactly `max_tokens` ids: START, the known words, then PAD.
    pub fn encode(&self, text: &str) -> Tokens {
        let mut ids = vec![self.id(START).expect("START is in the vocabulary")];
        let mut unknown_words = Vec::new();
        let mut truncated = 0;
        let words = text
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase);
        for word in words {
            let canonical = match word.as_str() {
                "an" => "a",
                "centre" => "center",
                other => other,
            };
            match self.id(canonical) {
                Some(_) if ids.len() == self.max_tokens => truncated += 1,
                Some(id) => ids.push(id),
                None => unknown_words.push(word),
            }
        }
        ids.resize(
            self.max_tokens,
            self.id(PAD).expect("PAD is in the vocabulary"),
        );
        Tokens {
            ids,
            unknown_words,
            truncated,
        }
    }

    /// A `[B, max_tokens]` u32 tensor of the prompts' ids.
    pub fn batch(&self, texts: &[String], device: &Device) -> candle_core::Result<Tensor> {
        let ids: Vec<u32> = texts.iter().flat_map(|t| self.encode(t).ids).collect();
        Tensor::from_vec(ids, (texts.len(), self.max_tokens), device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_words_become_ids_and_unknown_ones_are_named() {
        let tokenizer = Tokenizer::for_shapes(16);
        let tokens = tokenizer.encode("A LARGE red Star, please; in the top-left!");
        let words: Vec<&str> = tokens
            .ids
            .iter()
            .map(|&id| tokenizer.vocabulary()[id as usize].as_str())
            .take_while(|w| *w != PAD)
            .collect();
        assert_eq!(
            words,
            [
                START, "a", "large", "red", "star", "in", "the", "top", "left"
            ]
        );
        assert_eq!(tokens.unknown_words, ["please"]);
        assert_eq!(tokens.ids.len(), 16);
    }

    #[test]
    fn an_empty_prompt_is_start_alone_and_synonyms_are_read() {
        let tokenizer = Tokenizer::for_shapes(4);
        let empty = tokenizer.encode("  ");
        assert_eq!(empty.ids, [1, 0, 0, 0]);
        assert_eq!(
            tokenizer.encode("an orange").ids,
            tokenizer.encode("a orange").ids
        );
        let long = tokenizer.encode("a red star at the top");
        assert_eq!(long.truncated, 3);
    }
}
