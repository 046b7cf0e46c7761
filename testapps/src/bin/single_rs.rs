//! single-rs: the single-threaded test app in Rust. A 32 MiB `Vec` rewritten every round, a
//! `HashMap` of `String`s churned (inserts and removes) every round, and progress written through
//! a `BufWriter` (Rust's stdout is line-buffered even into a file; the `BufWriter` keeps output in
//! memory the way C stdio does, so a checkpoint catches some of it unwritten).
//!
//! Contract (testapps/README.md): READY on stderr, progress on stdout, PHASE 2 on stderr halfway,
//! state verified at the end, PASS on stdout or FAIL with the reason and exit status 1.
//!
//! Usage: single-rs [ROUNDS]     (default 160, about 1.5 s here)

use std::collections::HashMap;
use std::io::{self, BufWriter, Write};

const WORDS: usize = 4 << 20;
const MASK: usize = WORDS - 1;
const KEYS: u64 = 40_000;
const CHURN: u64 = 3_000;
const PARTS: usize = 4;

fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A map value: which round wrote it, and text that is a function of key and round.
struct Entry {
    generation: u64,
    text: String,
}

fn entry_text(key: u64, generation: u64) -> String {
    let words = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen"];
    let n = 1 + mix64(key ^ (generation << 32)) % 12;
    let mut s = format!("{key:06}/{generation}:");
    for i in 0..n {
        let w = words[(mix64(key * 31 + generation * 7 + i) % 8) as usize];
        s.push_str(w);
        s.push('-');
    }
    s
}

type Out = BufWriter<io::StdoutLock<'static>>;

fn fail(out: &mut Out, reason: &str) -> ! {
    let _ = writeln!(out, "FAIL: {reason}");
    let _ = out.flush();
    eprintln!("FAIL: {reason}");
    std::process::exit(1);
}

fn main() {
    let rounds: u64 = match std::env::args().nth(1) {
        Some(a) => a.parse().unwrap_or(0),
        None => 160,
    };
    let mut out: Out = BufWriter::with_capacity(8192, io::stdout().lock());
    if !(2..=1000).contains(&rounds) {
        fail(&mut out, "rounds must be in 2..1000");
    }
    let mut v: Vec<u64> = (0..WORDS as u64).map(mix64).collect();
    let mut map: HashMap<u64, Entry> = (0..KEYS)
        .map(|k| {
            let text = entry_text(k, 0);
            (
                k,
                Entry {
                    generation: 0,
                    text,
                },
            )
        })
        .collect();
    let mut salt = 0x5eed_u64;
    let mut sum = 0u64;
    let _ = writeln!(
        out,
        "single-rs: {WORDS} words, {KEYS} keys, {rounds} rounds"
    );
    eprintln!("READY");

    for r in 0..rounds {
        if r == rounds / 2 {
            eprintln!("PHASE 2");
        }
        sum = 0;
        for part in 0..PARTS {
            for i in part * (WORDS / PARTS)..(part + 1) * (WORDS / PARTS) {
                v[i] = mix64(v[i] ^ v[(i + 1021) & MASK] ^ r ^ salt);
                sum = sum.wrapping_add(v[i]);
            }
            let _ = writeln!(out, "round {r:3} part {part}: {sum:016x}");
        }
        let mut h = 0u64;
        for k in 0..CHURN {
            let key = mix64(r * CHURN + k) % (2 * KEYS);
            match map.get(&key) {
                Some(e) if e.generation % 2 == 1 => {
                    map.remove(&key);
                    h = mix64(h ^ key);
                }
                _ => {
                    let text = entry_text(key, r + 1);
                    h = mix64(h ^ text.len() as u64 ^ (key << 20));
                    map.insert(
                        key,
                        Entry {
                            generation: r + 1,
                            text,
                        },
                    );
                }
            }
        }
        salt = mix64(salt ^ sum);
        let _ = writeln!(
            out,
            "round {r:3} map: {} entries, churn {h:016x}, salt {salt:016x}",
            map.len()
        );
    }

    // Verify: the vector still sums to what the last round computed while writing it, and every
    // map entry is the text its key and generation call for.
    let check = v.iter().fold(0u64, |s, &x| s.wrapping_add(x));
    if check != sum {
        fail(
            &mut out,
            &format!("vector sums to {check:016x}, the last round wrote {sum:016x}"),
        );
    }
    let mut text_hash = 0u64;
    for (&key, e) in &map {
        if e.text != entry_text(key, e.generation) {
            fail(&mut out, &format!("map entry {key} is damaged"));
        }
        // Order-independent, so HashMap iteration order does not matter.
        text_hash ^= mix64(key ^ e.text.len() as u64);
    }
    let _ = writeln!(
        out,
        "final: vector {check:016x}, {} entries, texts {text_hash:016x}",
        map.len()
    );
    let _ = writeln!(out, "PASS");
    if out.flush().is_err() {
        std::process::exit(1);
    }
}
