//! Writes the seed corpus of the fuzz targets: `fuzz/corpus/<target>/<seed>` (or under the
//! directory given as the first argument). Run from the repository root with
//! `cargo run --example fuzz_seeds --features fuzzing`; see docs/SECURITY.md, "Fuzzing".

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let root = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus".into()),
    );
    let seeds = fleetgate::fuzzing::seed_corpus();
    for (target, name, bytes) in &seeds {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(name), bytes)?;
    }
    println!("{} seeds written under {}", seeds.len(), root.display());
    Ok(())
}
