//! Workloads: synthetic random prompts, or a ShareGPT-format JSON file, as `vllm bench serve`
//! builds them. Token counts are estimated without a tokenizer as ceil(bytes / 4) (the
//! simulator counts the same way); usage from the server replaces them when it is sent.

use std::path::Path;

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// One request of the workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Prompt text.
    pub prompt: String,
    /// Estimated prompt tokens.
    pub prompt_len: usize,
    /// Output tokens asked for (`max_tokens` / `max_completion_tokens`).
    pub output_len: usize,
}

/// Estimated tokens of a text: ceil(bytes / 4), at least 1.
pub fn estimate_tokens(text: &str) -> usize {
    text.len().div_ceil(4).max(1)
}

/// Three-letter words: with a space each is 4 bytes, one estimated token.
const WORDS: &[&str] = &[
    "the", "and", "for", "you", "are", "not", "but", "can", "all", "one", "out", "day", "get",
    "has", "him", "his", "how", "man", "new", "now", "old", "see", "two", "way", "who", "boy",
    "did", "its", "let", "put", "say", "she", "too", "use", "map", "key", "log", "run", "set",
];

/// `n` requests with prompt and output lengths drawn uniformly from
/// `[len * (1 - ratio), len * (1 + ratio)]`, like vLLM's random dataset.
pub fn random(n: usize, input_len: usize, output_len: usize, ratio: f64, seed: u64) -> Vec<Sample> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let range = |len: usize| {
        let low = ((len as f64) * (1.0 - ratio)).floor().max(1.0) as usize;
        let high = ((len as f64) * (1.0 + ratio)).ceil().max(low as f64) as usize;
        (low, high)
    };
    let (in_lo, in_hi) = range(input_len);
    let (out_lo, out_hi) = range(output_len);
    (0..n)
        .map(|_| {
            let prompt_len = rng.random_range(in_lo..=in_hi);
            let output_len = rng.random_range(out_lo..=out_hi);
            let mut prompt = String::with_capacity(prompt_len * 4);
            for i in 0..prompt_len {
                if i > 0 {
                    prompt.push(' ');
                }
                prompt.push_str(WORDS[rng.random_range(0..WORDS.len())]);
            }
            Sample {
                prompt_len: estimate_tokens(&prompt),
                prompt,
                output_len,
            }
        })
        .collect()
}

/// A ShareGPT file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a ShareGPT JSON list.
    #[error("{path} is not a ShareGPT JSON list: {source}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        source: serde_json::Error,
    },
    /// Fewer usable conversations than requests.
    #[error("{path} has {found} usable conversations, {wanted} requested")]
    TooFew {
        /// The file.
        path: String,
        /// Usable conversations.
        found: usize,
        /// `--num-prompts`.
        wanted: usize,
    },
}

#[derive(serde::Deserialize)]
struct Conversation {
    #[serde(default)]
    conversations: Vec<Turn>,
}

#[derive(serde::Deserialize)]
struct Turn {
    #[serde(default)]
    value: String,
}

/// `n` requests from a ShareGPT JSON file: the first turn of each conversation is the prompt,
/// the second gives the output length (or `fixed_output_len`). Conversations are shuffled with
/// `seed`; like vLLM, too-short (< 4 tokens) and too-long (prompt > 1024 or prompt + output >
/// 2048 tokens) pairs are skipped.
pub fn sharegpt(
    path: &Path,
    n: usize,
    fixed_output_len: Option<usize>,
    seed: u64,
) -> Result<Vec<Sample>, DatasetError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| DatasetError::Read {
        path: shown.clone(),
        source,
    })?;
    let mut data: Vec<Conversation> =
        serde_json::from_str(&text).map_err(|source| DatasetError::Parse {
            path: shown.clone(),
            source,
        })?;
    data.retain(|c| c.conversations.len() >= 2);
    data.shuffle(&mut SmallRng::seed_from_u64(seed));
    let mut out = Vec::with_capacity(n);
    for c in &data {
        if out.len() == n {
            break;
        }
        let prompt = &c.conversations[0].value;
        let prompt_len = estimate_tokens(prompt);
        let output_len =
            fixed_output_len.unwrap_or_else(|| estimate_tokens(&c.conversations[1].value));
        if prompt_len < 4 || (fixed_output_len.is_none() && output_len < 4) {
            continue;
        }
        if prompt_len > 1024 || prompt_len + output_len > 2048 {
            continue;
        }
        out.push(Sample {
            prompt: prompt.clone(),
            prompt_len,
            output_len,
        });
    }
    if out.len() < n {
        return Err(DatasetError::TooFew {
            path: shown,
            found: out.len(),
            wanted: n,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_lengths_are_exact_without_range_and_seeded() {
        let a = random(20, 100, 30, 0.0, 1);
        assert!(a.iter().all(|s| s.prompt_len == 100 && s.output_len == 30));
        assert_eq!(a, random(20, 100, 30, 0.0, 1));
        assert_ne!(a, random(20, 100, 30, 0.0, 2));
        let b = random(500, 100, 30, 0.5, 3);
        assert!(b.iter().all(|s| (50..=150).contains(&s.prompt_len)));
        assert!(b.iter().all(|s| (15..=45).contains(&s.output_len)));
        assert!(b.iter().any(|s| s.output_len != b[0].output_len));
    }

    #[test]
    fn sharegpt_filters_like_vllm() {
        let dir = std::env::temp_dir().join(format!("tokentap-sharegpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("d.json");
        let long = "word ".repeat(40);
        let json = serde_json::json!([
            {"conversations": [{"from": "human", "value": long}, {"from": "gpt", "value": long}]},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": long}]},
            {"conversations": [{"from": "human", "value": long}]},
            {"conversations": [{"from": "human", "value": "x".repeat(5000)}, {"from": "gpt", "value": long}]},
        ]);
        std::fs::write(&file, json.to_string()).unwrap();
        let s = sharegpt(&file, 1, None, 0).unwrap();
        assert_eq!(s[0].prompt_len, 50);
        assert_eq!(s[0].output_len, 50);
        assert_eq!(sharegpt(&file, 1, Some(7), 0).unwrap()[0].output_len, 7);
        assert!(matches!(
            sharegpt(&file, 2, None, 0),
            Err(DatasetError::TooFew { found: 1, .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
