//! `wg-namespace`: puts a WireGuard interface into its own network namespace so that whatever
//! runs there reaches the world only through the VPN peer.
//!
//! Dependencies point one way: [`cli`] parses the command line and maps outcomes to [`exit`]
//! codes; [`commands`] (one file per subcommand) order the steps that [`system`] provides;
//! [`system`] acts through netlink, nft and the file system on a [`config`] that was validated
//! before anything was touched, using [`render`] for the files and ruleset.

pub mod cli;
pub mod commands;
pub mod config;
pub mod exit;
pub mod render;
pub mod system;
pub mod wgquick;

#[cfg(test)]
mod layers {
    use std::path::{Path, PathBuf};

    /// The top-level modules a source file names through `crate::` (also inside `use crate::{..}`).
    fn crate_modules(text: &str) -> Vec<String> {
        let ident = |s: &str| -> String {
            s.chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        };
        let mut found = Vec::new();
        for (at, _) in text.match_indices("crate::") {
            let rest = &text[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // Only the group's first level: `{a::{b, c}, d}` names a and d.
                let mut depth = 0;
                let mut item_start = true;
                for (i, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => item_start = true,
                        c if c.is_whitespace() => {}
                        _ if item_start && depth == 0 => {
                            found.push(ident(&group[i..]));
                            item_start = false;
                        }
                        _ => {}
                    }
                }
            } else {
                found.push(ident(rest));
            }
        }
        found
    }

    fn sources(under: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        if under.is_file() {
            return vec![under.to_path_buf()];
        }
        for entry in std::fs::read_dir(under).expect("a source directory") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                files.extend(sources(&path));
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
        files
    }

    /// Dependencies point one way: cli -> exit, commands -> system -> config, render.
    #[test]
    fn dependencies_point_one_way() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let rules: [(&str, &[&str]); 6] = [
            ("system", &["cli", "exit", "commands"]),
            ("config.rs", &["cli", "exit", "commands"]),
            ("render.rs", &["cli", "exit", "commands"]),
            ("wgquick.rs", &["cli", "exit", "commands"]),
            ("exit.rs", &["cli", "commands"]),
            ("commands", &["cli"]),
        ];
        let mut wrong = Vec::new();
        for (part, forbidden) in rules {
            for file in sources(&src.join(part)) {
                let text = std::fs::read_to_string(&file).expect("a readable source file");
                for module in crate_modules(&text) {
                    if forbidden.contains(&module.as_str()) {
                        wrong.push(format!("{} uses crate::{module}", file.display()));
                    }
                }
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
        assert_eq!(
            crate_modules("use crate::{cli::x, system::{a, b}};\nuse crate::exit::code;"),
            ["cli", "system", "exit"]
        );
    }

    /// wireguard-control's userspace backend starts a `wireguard-go` of its own when the socket
    /// does not answer, and speaks to whoever serves the socket: userspace daemons are spoken to
    /// only through `system::uapi`. Its `Backend` must be imported under another name, and that
    /// name's `Userspace` never used.
    #[test]
    fn wireguard_controls_userspace_backend_is_never_used() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut wrong = Vec::new();
        for file in sources(&src) {
            let text = std::fs::read_to_string(&file).expect("a readable source file");
            let mut names = vec!["wireguard_control::Backend".to_string()];
            if let Some(at) = text.find("use wireguard_control::") {
                let statement = &text[at..at + text[at..].find(';').unwrap_or(0)];
                let words: Vec<&str> = statement
                    .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .filter(|w| !w.is_empty())
                    .collect();
                for (i, word) in words.iter().enumerate() {
                    if *word == "Backend" {
                        match words.get(i + 1..i + 3) {
                            Some(["as", alias]) => names.push(alias.to_string()),
                            _ => wrong.push(format!(
                                "{} imports wireguard_control::Backend without a name of its own",
                                file.display()
                            )),
                        }
                    }
                }
            }
            for name in names {
                if text.contains(&format!("{name}::Userspace")) {
                    wrong.push(format!("{} uses {name}::Userspace", file.display()));
                }
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }
}
