//! What every in-process benchmark's `main` does: pick the benchmarks named on the command line
//! (`cargo bench -p fleetgate --bench X -- NAME…`; all when none is named, an unknown name exits
//! 2) and run each, in the file's order, on a two-worker tokio runtime (this machine's cores).

use std::future::Future;

pub fn run<F: Future<Output = ()>>(benchmarks: &[&'static str], bench: impl Fn(&'static str) -> F) {
    // `cargo bench` passes `--bench`; other words choose benchmarks by name.
    let chosen: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if let Some(unknown) = chosen.iter().find(|c| !benchmarks.contains(&c.as_str())) {
        eprintln!(
            "unknown benchmark {unknown:?}; there are: {}",
            benchmarks.join(", ")
        );
        std::process::exit(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    for &name in benchmarks {
        if chosen.is_empty() || chosen.iter().any(|c| c == name) {
            runtime.block_on(bench(name));
        }
    }
}
