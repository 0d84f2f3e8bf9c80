//! Writes the seed corpus: `fuzz/corpus/<target>/seed-*` for every target (old seeds of
//! that name are replaced; entries libFuzzer added are kept). Run from the repository
//! root as `cargo xtask fuzz --seeds`.

use std::path::PathBuf;

fn main() -> std::process::ExitCode {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, seeds) in twostage_fuzz::seeds::all() {
        let d = dir.join(target);
        if let Err(e) = std::fs::create_dir_all(&d) {
            eprintln!("seeds: cannot create {}: {e}", d.display());
            return std::process::ExitCode::FAILURE;
        }
        for (name, bytes) in &seeds {
            if let Err(e) = std::fs::write(d.join(name), bytes) {
                eprintln!("seeds: cannot write {name}: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
        println!("{target}: {} seeds", seeds.len());
    }
    std::process::ExitCode::SUCCESS
}
