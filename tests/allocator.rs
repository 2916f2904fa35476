//! The binary's allocator gives back what it frees: `marsad` is built with jemalloc, its
//! background threads on and a one-second decay, so the hundreds of MiB a compaction frees
//! leave the resident set within seconds whatever thread freed them (BENCHMARKS.md, "The
//! allocator gives back what the compactions freed"). A build that loses one of these (the
//! `background_threads` feature, `.cargo/config.toml`, another `#[global_allocator]`) fails
//! here: the options are read from jemalloc itself, as the built binary has them.

use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::common::marsad_bin;

/// jemalloc's run-time options as the binary prints them at exit (`opt.NAME: VALUE`).
fn jemalloc_options() -> Result<Vec<(String, String)>> {
    let out = Command::new(marsad_bin())
        .arg("--version")
        // the only option given at run time: print the statistics (options included) at exit
        .env("_RJEM_MALLOC_CONF", "stats_print:true")
        .output()
        .context("running marsad --version")?;
    ensure!(out.status.success(), "marsad --version failed: {out:?}");
    let printed = String::from_utf8_lossy(&out.stderr);
    Ok(printed
        .lines()
        .filter_map(|line| line.trim().strip_prefix("opt."))
        .filter_map(|opt| opt.split_once(": "))
        .map(|(name, value)| {
            // "1000 (arenas.dirty_decay_ms: 1000)": the option as built, then the value in force
            let (built, running) = match value.split_once(" (") {
                Some((built, rest)) => (built, rest.trim_end_matches(')').rsplit(": ").next().unwrap_or(built)),
                None => (value, value),
            };
            let value = if built == running {
                built
            } else {
                "(built and running values differ)"
            };
            (name.to_owned(), value.trim_matches('"').to_owned())
        })
        .collect())
}

#[test]
fn freed_memory_is_given_back_by_background_threads_after_a_one_second_decay() -> Result<()> {
    let options = jemalloc_options()?;
    ensure!(
        !options.is_empty(),
        "no jemalloc options printed: is jemalloc still the global allocator of `marsad`?"
    );
    let option = |name: &str| {
        options
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .with_context(|| format!("jemalloc printed no opt.{name}: {options:?}"))
    };
    ensure!(
        option("background_thread")? == "true",
        "background threads off: freed pages wait for the thread that freed them to allocate again"
    );
    ensure!(
        option("dirty_decay_ms")? == "1000",
        "dirty pages kept {} ms (.cargo/config.toml sets 1000)",
        option("dirty_decay_ms")?
    );
    ensure!(
        option("muzzy_decay_ms")? == "0",
        "muzzy pages kept {} ms (.cargo/config.toml sets 0)",
        option("muzzy_decay_ms")?
    );
    // jemalloc itself asks for no huge pages (a kernel whose THP mode is `always` gives them
    // anyway: README, "Memory", says what to set there)
    ensure!(option("thp")? != "always", "jemalloc asks for transparent huge pages");
    Ok(())
}
