//! Embeds the shipped policy set (../policies/*, top level) into the binaries, so that
//! `sovctl demo` runs on an embedded default with nothing else on disk.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let mut out = String::from(
        "/// The shipped policy set: (file name, contents).\npub const EMBEDDED_POLICIES: &[(&str, &str)] = &[\n",
    );
    for p in files {
        let (Some(name), Some(path)) = (p.file_name().and_then(|n| n.to_str()), p.to_str()) else {
            continue;
        };
        let _ = writeln!(out, "    ({name:?}, include_str!({path:?})),");
    }
    out.push_str("];\n");
    let dest = Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("policies_embedded.rs");
    std::fs::write(dest, out).expect("write policies_embedded.rs");
}
