//! Incremental stop-string detection over streamed, decoded text.
//!
//! Generation is streamed chunk by chunk (usually one token's worth of text),
//! so a stop string can straddle chunk boundaries. [`StopMatcher`] holds back
//! the shortest tail of the text that could still grow into a stop string and
//! releases everything before it, so that (OpenAI semantics) no part of a stop
//! string is ever emitted.
//!
//! Matching semantics:
//! * Generation stops as soon as any stop string is complete; a stop string
//!   must end generation at the token that completes it, so the matcher never
//!   waits for a longer stop that might still complete later.
//! * Among the stop strings complete in the same push, the one starting
//!   earliest wins; ties go to the longest.
//! * Chunks are `&str`, so they always end on a UTF-8 character boundary, and
//!   the hold-back point is always a character boundary too (it is the start
//!   of a suffix that equals a prefix of a valid string).

/// Incremental stop-string detection over streamed text.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    /// Non-empty stop strings.
    stops: Vec<String>,
    /// Text received but not yet emitted: it could be the start of a stop.
    held: String,
    /// Set once a stop matched or `finish` ran; later input is discarded.
    done: bool,
}

/// Outcome of [`StopMatcher::push`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopCheck {
    /// Emit this text; nothing matched.
    Continue {
        /// Text that is safe to emit now (may be empty).
        emit: String,
    },
    /// A stop string matched: emit the text before it and finish.
    Stopped {
        /// Text before the stop string that was not emitted yet.
        emit: String,
        /// The stop string that matched.
        matched: String,
    },
}

impl StopMatcher {
    /// Creates a matcher for `stops`; empty strings are ignored (they would
    /// match everywhere and stop before any output).
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            stops,
            held: String::new(),
            done: false,
        }
    }

    /// Push newly decoded text; returns what is safe to emit now (text that
    /// could still be the start of a stop string is held back).
    ///
    /// After a stop matched (or after [`finish`](Self::finish)) further input
    /// is discarded and `Continue` with empty text is returned.
    pub fn push(&mut self, text: &str) -> StopCheck {
        if self.done {
            return StopCheck::Continue {
                emit: String::new(),
            };
        }
        if self.stops.is_empty() {
            // Fast path: nothing can ever be held back.
            return StopCheck::Continue {
                emit: text.to_owned(),
            };
        }
        self.held.push_str(text);

        // Only the held tail plus the new text can contain a match: the held
        // tail alone held none, or we would have stopped on the last push.
        if let Some((start, matched)) = self.earliest_match() {
            let matched = matched.to_owned();
            self.held.truncate(start);
            self.done = true;
            return StopCheck::Stopped {
                emit: std::mem::take(&mut self.held),
                matched,
            };
        }

        let keep = self.partial_suffix_len();
        let emit_len = self.held.len() - keep;
        // `split_off` keeps the first part in `held`; swap so we keep the tail.
        let tail = self.held.split_off(emit_len);
        let emit = std::mem::replace(&mut self.held, tail);
        StopCheck::Continue { emit }
    }

    /// End of generation (EOS/length): flush whatever was held back.
    pub fn finish(&mut self) -> String {
        self.done = true;
        std::mem::take(&mut self.held)
    }

    /// Earliest complete stop in `held` as (byte start, stop); ties between
    /// stops starting at the same byte go to the longest.
    fn earliest_match(&self) -> Option<(usize, &str)> {
        let mut best: Option<(usize, &str)> = None;
        for stop in &self.stops {
            if let Some(pos) = self.held.find(stop.as_str()) {
                let better = match best {
                    None => true,
                    Some((bpos, bstop)) => pos < bpos || (pos == bpos && stop.len() > bstop.len()),
                };
                if better {
                    best = Some((pos, stop.as_str()));
                }
            }
        }
        best
    }

    /// Length in bytes of the longest suffix of `held` that is a proper
    /// prefix of some stop string (and therefore must not be emitted yet).
    fn partial_suffix_len(&self) -> usize {
        let mut keep = 0;
        for stop in &self.stops {
            // Proper prefixes only: a full match was handled already.
            let max = (stop.len() - 1).min(self.held.len());
            // Longest first, so the first hit is this stop's best.
            for k in (keep + 1..=max).rev() {
                if stop.is_char_boundary(k) && self.held.ends_with(&stop[..k]) {
                    keep = k;
                    break;
                }
            }
        }
        keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(stops.iter().map(|s| s.to_string()).collect())
    }

    fn cont(s: &str) -> StopCheck {
        StopCheck::Continue { emit: s.into() }
    }

    fn stopped(emit: &str, matched: &str) -> StopCheck {
        StopCheck::Stopped {
            emit: emit.into(),
            matched: matched.into(),
        }
    }

    #[test]
    fn stop_split_across_chunks_is_matched_and_not_emitted() {
        let mut m = matcher(&["hello"]);
        assert_eq!(m.push("say hel"), cont("say "));
        assert_eq!(m.push("lo world"), stopped("", "hello"));
        // Input after the stop is discarded.
        assert_eq!(m.push("more"), cont(""));
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn held_prefix_is_released_when_it_stops_matching() {
        let mut m = matcher(&["hello"]);
        assert_eq!(m.push("hel"), cont(""));
        assert_eq!(m.push("p!"), cont("help!"));
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn text_before_stop_in_same_chunk_is_emitted() {
        let mut m = matcher(&["</s>"]);
        assert_eq!(m.push("abc</s>def"), stopped("abc", "</s>"));
    }

    #[test]
    fn multiple_stops_earliest_start_wins() {
        let mut m = matcher(&["world", "lo"]);
        assert_eq!(m.push("hello world"), stopped("hel", "lo"));

        // Both complete in the same push; the one starting earlier wins even
        // though it ends later in the stop list order.
        let mut m = matcher(&["bc", "abc"]);
        assert_eq!(m.push("xabc"), stopped("x", "abc"));

        // Second stop matches across chunks while the first never does.
        let mut m = matcher(&["STOP", "\n\n"]);
        assert_eq!(m.push("line\n"), cont("line"));
        assert_eq!(m.push("\nnext"), stopped("", "\n\n"));
    }

    #[test]
    fn same_start_tie_goes_to_longest() {
        let mut m = matcher(&["ab", "abc"]);
        assert_eq!(m.push("zabcd"), stopped("z", "abc"));
    }

    #[test]
    fn overlapping_prefixes_ab_abc_with_text_abx() {
        // Streamed token by token: "ab" completes first and ends generation.
        let mut m = matcher(&["ab", "abc"]);
        assert_eq!(m.push("a"), cont(""));
        assert_eq!(m.push("b"), stopped("", "ab"));

        // One chunk: only "ab" is present.
        let mut m = matcher(&["abc", "ab"]);
        assert_eq!(m.push("abx"), stopped("", "ab"));

        // Only the longer stop: "ab" is held, then released by "x".
        let mut m = matcher(&["abc"]);
        assert_eq!(m.push("a"), cont(""));
        assert_eq!(m.push("b"), cont(""));
        assert_eq!(m.push("x"), cont("abx"));
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn self_overlapping_stop_holds_only_the_live_suffix() {
        let mut m = matcher(&["ab"]);
        assert_eq!(m.push("a"), cont(""));
        assert_eq!(m.push("a"), cont("a"));
        assert_eq!(m.push("b"), stopped("", "ab"));

        let mut m = matcher(&["aab"]);
        assert_eq!(m.push("aaa"), cont("a"));
        assert_eq!(m.push("b"), stopped("", "aab"));
    }

    #[test]
    fn unicode_stop_across_chunks_never_splits_chars() {
        let mut m = matcher(&["世界"]);
        assert_eq!(m.push("你好世"), cont("你好"));
        assert_eq!(m.push("界!"), stopped("", "世界"));

        // A multi-byte first char is held whole, then released whole.
        let mut m = matcher(&["😀x"]);
        assert_eq!(m.push("a😀"), cont("a"));
        assert_eq!(m.push("y"), cont("😀y"));

        // Stop shares only a leading byte pattern with the text but not a
        // char: "é" (C3 A9) vs stop "ê" (C3 AA) must not hold anything.
        let mut m = matcher(&["êtes"]);
        assert_eq!(m.push("café"), cont("café"));
    }

    #[test]
    fn finish_flushes_held_back_text() {
        let mut m = matcher(&["hello"]);
        assert_eq!(m.push("oh hell"), cont("oh "));
        assert_eq!(m.finish(), "hell");
        assert_eq!(m.push("o"), cont(""));
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn no_stop_strings_emits_everything() {
        let mut m = matcher(&[]);
        assert_eq!(m.push("anything"), cont("anything"));
        assert_eq!(m.finish(), "");

        // Empty stop strings are ignored rather than stopping at once.
        let mut m = matcher(&["", ""]);
        assert_eq!(m.push("text"), cont("text"));

        let mut m = matcher(&["zzz"]);
        assert_eq!(m.push("abc"), cont("abc"));
        assert_eq!(m.push(""), cont(""));
        assert_eq!(m.finish(), "");
    }
}
