//! The fuzz targets' inputs, replayed in `cargo test` so that CI checks them without a fuzzer:
//! every file of `fuzz/seeds/<target>/` and `fuzz/regressions/<target>/` (crashes the fuzzer
//! found, kept once fixed), then a few thousand mutations of them made with a fixed seed: bit
//! flips, truncations, splices, dictionary words, repeated slices and deep nesting. Each input
//! goes through the same `fhirgate::fuzzing` function as under `cargo fuzz` (see scripts/fuzz).

use std::path::{Path, PathBuf};
use std::time::Instant;

use fhirgate::fuzzing;

/// Mutations per target; the whole file stays well under 20 s in a debug build.
const MUTATIONS: usize = 3_000;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of a directory, sorted (none when it does not exist).
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(read) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, Vec<u8>)> = read
        .filter_map(Result::ok)
        .filter(|e| e.path().is_file())
        .map(|e| {
            let path = e.path();
            let bytes = std::fs::read(&path).unwrap();
            (path.display().to_string(), bytes)
        })
        .collect();
    out.sort();
    out
}

/// The words of a libFuzzer dictionary (`"..."` lines with `\xNN`, `\\` and `\"` escapes).
fn dictionary(target: &str) -> Vec<Vec<u8>> {
    let path = fuzz_dir().join("dicts").join(format!("{target}.dict"));
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut words = Vec::new();
    for line in text.lines() {
        let Some(quoted) = line
            .trim()
            .strip_prefix('"')
            .and_then(|l| l.strip_suffix('"'))
        else {
            continue;
        };
        let mut word = Vec::new();
        let mut bytes = quoted.bytes();
        while let Some(b) = bytes.next() {
            if b != b'\\' {
                word.push(b);
                continue;
            }
            match bytes.next() {
                Some(b'x') => {
                    let hex: Vec<u8> = bytes.by_ref().take(2).collect();
                    let hex = std::str::from_utf8(&hex).unwrap();
                    word.push(u8::from_str_radix(hex, 16).unwrap());
                }
                Some(other) => word.push(other),
                None => {}
            }
        }
        words.push(word);
    }
    words
}

/// One mutation of `input`, `others` being the rest of the corpus (for splices).
fn mutate(rng: &mut fastrand::Rng, input: &[u8], others: &[Vec<u8>], dict: &[Vec<u8>]) -> Vec<u8> {
    let mut out = input.to_vec();
    let rounds = rng.usize(1..=4);
    for _ in 0..rounds {
        let len = out.len();
        let at = if len == 0 { 0 } else { rng.usize(0..len) };
        match rng.u8(0..8) {
            // Bit flip.
            0 if len > 0 => out[at] ^= 1 << rng.u8(0..8),
            // A random byte, replaced or inserted.
            1 if len > 0 => out[at] = rng.u8(..),
            2 => out.insert(at, rng.u8(..)),
            // Truncation.
            3 => out.truncate(at),
            // Splice: this input's head and another's tail.
            4 if !others.is_empty() => {
                let other = &others[rng.usize(0..others.len())];
                let from = if other.is_empty() {
                    0
                } else {
                    rng.usize(0..other.len())
                };
                out.truncate(at);
                out.extend_from_slice(&other[from..]);
            }
            // A dictionary word, inserted or overwriting.
            5 if !dict.is_empty() => {
                let word = &dict[rng.usize(0..dict.len())];
                if rng.bool() {
                    out.splice(at..at, word.iter().copied());
                } else {
                    let end = (at + word.len()).min(len);
                    out.splice(at..end, word.iter().copied());
                }
            }
            // A slice repeated (long strings, many entries or parameters).
            6 if len > 0 => {
                let end = rng.usize(at..=len.min(at + 64));
                let slice = out[at..end].to_vec();
                let times = rng.usize(2..64);
                for _ in 0..times {
                    out.splice(end..end, slice.iter().copied());
                }
            }
            // Nesting: arrays or objects wrapped around a value, deeper than any limit.
            7 => {
                let depth = rng.usize(1..200);
                let (open, close): (&[u8], &[u8]) = if rng.bool() {
                    (b"[", b"]")
                } else {
                    (b"{\"a\":", b"}")
                };
                let mut nested = open.repeat(depth);
                nested.extend_from_slice(&out[at..]);
                nested.extend_from_slice(&close.repeat(depth));
                out.truncate(at);
                out.extend_from_slice(&nested);
            }
            _ => {}
        }
    }
    out
}

/// Runs a target's seeds and regressions, then mutations of them; a panic names the input.
fn replay(target: &str, run: fn(&[u8])) {
    let started = Instant::now();
    let dir = fuzz_dir();
    let seeds = files(&dir.join("seeds").join(target));
    assert!(!seeds.is_empty(), "{target} has seeds");
    let regressions = files(&dir.join("regressions").join(target));
    for (name, input) in seeds.iter().chain(&regressions) {
        let outcome = std::panic::catch_unwind(|| run(input));
        assert!(outcome.is_ok(), "{target}: {name} fails");
    }
    let corpus: Vec<Vec<u8>> = seeds
        .iter()
        .chain(&regressions)
        .map(|(_, b)| b.clone())
        .collect();
    let dict = dictionary(target);
    let mut rng = fastrand::Rng::with_seed(0x5eed_f022);
    for i in 0..MUTATIONS {
        let base = &corpus[i % corpus.len()];
        let input = mutate(&mut rng, base, &corpus, &dict);
        let outcome = std::panic::catch_unwind(|| run(&input));
        if outcome.is_err() {
            let path = std::env::temp_dir().join(format!("fuzz-replay-{target}-{i}"));
            std::fs::write(&path, &input).unwrap();
            panic!(
                "{target}: mutation {i} fails; the input is in {}",
                path.display()
            );
        }
    }
    eprintln!(
        "{target}: {} seeds, {} regressions, {MUTATIONS} mutations in {:.1?}",
        seeds.len(),
        regressions.len(),
        started.elapsed()
    );
}

#[test]
fn fhir_resource_inputs_are_refused_cleanly_or_stored_valid() {
    replay("fhir_resource", fuzzing::fhir_resource);
}

#[test]
fn search_parameters_are_refused_cleanly_or_planned() {
    replay("search_params", fuzzing::search_params);
}

#[test]
fn transaction_bundles_are_refused_cleanly_or_planned_valid() {
    replay("transaction_bundle", fuzzing::transaction_bundle);
}

#[test]
fn webhook_signatures_hold_and_payloads_parse_within_bounds() {
    replay("webhook", fuzzing::webhook);
}

#[test]
fn client_assertions_are_refused_with_oauth_errors() {
    replay("client_assertion", fuzzing::client_assertion);
}
