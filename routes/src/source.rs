//! Reading a route file safely before it is parsed: a regular file (a FIFO would block
//! every reload) of bounded size, and YAML whose aliases cannot blow a few hundred bytes up
//! into gigabytes (an alias bomb).

use std::io::Read;
use std::path::Path;

use yaml_rust2::parser::{Event, EventReceiver, Parser};

/// The largest route file read: 10,000 routes take about 2 MiB.
pub const MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;

/// How many nodes YAML aliases may add to a file, in all: aliases are a convenience for a few
/// repeated values, never a way to multiply a table.
pub const MAX_ALIAS_NODES: u64 = 10_000;

/// The text of a route file: a regular file, read up to one byte past [`MAX_FILE_BYTES`]
/// (which [`check_size`], on every text parsed, then refuses).
pub fn read(path: &Path) -> Result<String, String> {
    // Follows symlinks, as Kubernetes' ConfigMap volumes need.
    let metadata = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if !metadata.is_file() {
        return Err("not a regular file (a FIFO or device would block reading)".into());
    }
    if metadata.len() > MAX_FILE_BYTES {
        return Err(too_big(metadata.len()));
    }
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut text = String::new();
    // Bounded again: the file may grow between the check and the read.
    file.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read: {e}"))?;
    Ok(text)
}

/// Refuses text over [`MAX_FILE_BYTES`].
pub fn check_size(text: &str) -> Result<(), String> {
    match text.len() as u64 {
        len if len > MAX_FILE_BYTES => Err(too_big(len)),
        _ => Ok(()),
    }
}

fn too_big(len: u64) -> String {
    format!("{len} bytes is over the {MAX_FILE_BYTES}-byte limit of a route file")
}

/// Refuses YAML whose aliases would add more than [`MAX_ALIAS_NODES`] nodes once expanded.
/// Text that does not parse is left for the parser to report.
pub fn check_yaml_aliases(text: &str) -> Result<(), String> {
    let mut expansion = Expansion::default();
    if Parser::new_from_str(text).load(&mut expansion, true).is_err() {
        return Ok(());
    }
    if expansion.through_aliases > MAX_ALIAS_NODES {
        return Err(format!(
            "YAML aliases expand to more than {MAX_ALIAS_NODES} nodes: write the values out \
             instead of multiplying them with aliases"
        ));
    }
    Ok(())
}

/// Counts the nodes YAML aliases add, from the parser's events, without building anything.
#[derive(Default)]
struct Expansion {
    /// The size in nodes of each anchored node, by anchor id.
    sizes: std::collections::HashMap<usize, u64>,
    /// Collections being read: their anchor id and size so far.
    open: Vec<(usize, u64)>,
    through_aliases: u64,
}

impl Expansion {
    /// A finished node of `size` nodes: remembered under its anchor, added to its parent.
    fn node(&mut self, anchor: usize, size: u64) {
        if anchor != 0 {
            self.sizes.insert(anchor, size);
        }
        if let Some((_, parent)) = self.open.last_mut() {
            *parent = parent.saturating_add(size);
        }
    }
}

impl EventReceiver for Expansion {
    fn on_event(&mut self, event: Event) {
        match event {
            Event::Scalar(_, _, anchor, _) => self.node(anchor, 1),
            Event::Alias(anchor) => {
                let size = self.sizes.get(&anchor).copied().unwrap_or(1);
                self.through_aliases = self.through_aliases.saturating_add(size);
                self.node(0, size);
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                self.open.push((anchor, 1));
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((anchor, size)) = self.open.pop() {
                    self.node(anchor, size);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The classic "billion laughs": nine levels of nine aliases each.
    fn alias_bomb() -> String {
        let mut text = String::from(
            "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
        );
        for (level, previous) in ('b'..='i').zip('a'..) {
            let refs = vec![format!("*{previous}"); 9].join(",");
            text.push_str(&format!("{level}: &{level} [{refs}]\n"));
        }
        text
    }

    #[test]
    fn an_alias_bomb_is_refused_before_it_expands() {
        let bomb = alias_bomb();
        assert!(bomb.len() < 400, "{} bytes", bomb.len());
        let error = check_yaml_aliases(&bomb).expect_err("refused");
        assert!(error.contains("aliases expand"), "{error}");
    }

    #[test]
    fn a_few_aliases_and_plain_yaml_pass() {
        let text = "defaults: &d {backend: monolith}\nroutes:\n  - {name: a, <<: *d}\n  - {name: b, <<: *d}\n";
        assert_eq!(check_yaml_aliases(text), Ok(()));
        assert_eq!(check_yaml_aliases("routes: []"), Ok(()));
        assert_eq!(check_yaml_aliases(": : not yaml ["), Ok(()), "left to the parser to report");
    }

    #[test]
    fn oversized_text_is_refused() {
        assert!(check_size(&"x".repeat(MAX_FILE_BYTES as usize + 1)).is_err());
        assert!(check_size("backends = {}").is_ok());
    }
}
