//! Discovers the built-in mapping profiles: every `profiles/*.toml` is compiled in, so adding a
//! vendor's profile is adding its file (no list to edit). Writes `$OUT_DIR/built_in_profiles.rs`,
//! a `&[(vendor, text)]` sorted by file name, the vendor being the file's stem.

use std::fmt::Write as _;
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let dir = manifest.join("profiles");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("mappings/profiles/ is readable")
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    let mut out = String::from("&[\n");
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
        let stem = file
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("a profile's file name is UTF-8");
        let path = file.to_str().expect("the profile's path is UTF-8");
        writeln!(out, "    ({stem:?}, include_str!({path:?})),").expect("a String grows");
    }
    out.push(']');
    let target = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it"))
        .join("built_in_profiles.rs");
    std::fs::write(target, out).expect("OUT_DIR is writable");
}
