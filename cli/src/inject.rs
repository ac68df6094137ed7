//! `neutrino inject` and `neutrino uninject`: the injector's patch applied offline to
//! manifests (multi-document YAML from a file or stdin), written to stdout or `-o FILE`.
//!
//! Thin: reading and writing only. Finding pod templates, the patch and its reverse are
//! `neutrino_injector::manifest`, the same code the webhook runs. What happened to each
//! workload (injected, skipped and why, already injected) goes to stderr, so stdout can
//! be piped to `kubectl apply -f -`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use neutrino_injector::config::InjectArgs;
use neutrino_injector::manifest::{self, Note};

/// Reads the manifests: a file, or stdin for `-`.
fn read_input(file: &Path) -> anyhow::Result<String> {
    if file == Path::new("-") {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("reading manifests from stdin")?;
        return Ok(text);
    }
    std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))
}

fn write_output(output: Option<&PathBuf>, text: &str) -> anyhow::Result<()> {
    match output {
        Some(path) => std::fs::write(path, text).with_context(|| format!("writing {}", path.display())),
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes()).and_then(|()| out.flush()).context("writing to stdout")
        }
    }
}

fn source(file: &Path) -> String {
    if file == Path::new("-") { "stdin".into() } else { file.display().to_string() }
}

fn report(notes: &[Note]) {
    for note in notes {
        match note {
            Note::Injected { object } => eprintln!("{object}: injected"),
            Note::Skipped { object, reason } => eprintln!("{object}: not injected: {reason}"),
            Note::AlreadyInjected { object } => eprintln!("{object}: already injected, left as is"),
            Note::Uninjected { object } => eprintln!("{object}: uninjected"),
        }
    }
}

/// `neutrino inject -f FILE [-o OUT]`.
pub fn inject(file: &Path, output: Option<&PathBuf>, args: &InjectArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    let text = read_input(file)?;
    let (out, notes) = manifest::inject_stream(&text, &config).with_context(|| source(file))?;
    write_output(output, &out)?;
    report(&notes);
    Ok(())
}

/// `neutrino uninject -f FILE [-o OUT]`.
pub fn uninject(file: &Path, output: Option<&PathBuf>) -> anyhow::Result<()> {
    let text = read_input(file)?;
    let (out, notes) = manifest::uninject_stream(&text).with_context(|| source(file))?;
    write_output(output, &out)?;
    report(&notes);
    Ok(())
}
