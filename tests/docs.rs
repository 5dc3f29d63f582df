//! The documentation agrees with the binary and stands on its own.
//!
//! - Every `banger <command> [<sub>]` that README.md or docs/*.md shows in code (fenced blocks and
//!   backtick spans) exists in the real binary's `--help` output, and every long flag shown with it
//!   is one the binary accepts. Flags inside a `<!-- verify: … -->` … `<!-- /verify: … -->` region
//!   (text written ahead of code still being built) are not checked; the commands there are.
//! - README.md and docs/ never send a reader outside the repository (`../shared`, `shared/DESIGN`),
//!   every relative link resolves to a file in the repository, and every `#anchor` to a heading.
//! - Every row `banger doctor` prints is in the doctor table of docs/operations.md.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_banger");
const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The markdown files the checks cover: README.md and everything in docs/.
fn doc_files() -> Vec<PathBuf> {
    let repo = Path::new(REPO);
    let mut files = vec![repo.join("README.md"), repo.join("CHANGELOG.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo.join("docs"))
        .expect("reading docs/")
        .map(|e| e.expect("docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// One piece of code from a markdown file: its line number, text, and whether flags are checked.
#[derive(Debug)]
struct Code {
    line: usize,
    text: String,
    check_flags: bool,
}

/// The code in `md`: each line of a fenced block (a `#` comment cut off) and each backtick span.
fn code_of(md: &str) -> Vec<Code> {
    let mut out = Vec::new();
    let mut fenced = false;
    let mut verify = false;
    for (i, line) in md.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("<!-- verify:") {
            verify = true;
        }
        if trimmed.starts_with("<!-- /verify:") {
            verify = false;
        }
        // A marker inside a line (e.g. a table row) covers that line only.
        let check_flags = !verify && !line.contains("<!-- verify:");
        if trimmed.starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            let text = match line.find(" #") {
                Some(n) => &line[..n],
                None if trimmed.starts_with('#') => "",
                None => line,
            };
            out.push(Code {
                line: i + 1,
                text: text.to_string(),
                check_flags,
            });
        } else {
            for (n, span) in line.split('`').enumerate() {
                if n % 2 == 1 {
                    out.push(Code {
                        line: i + 1,
                        text: span.to_string(),
                        check_flags,
                    });
                }
            }
        }
    }
    out
}

/// Every `banger …` invocation in a piece of code, as its words (up to `|`, `&&`, `;`, `)`).
fn invocations(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for segment in code.split(['|', ';', ')']).flat_map(|s| s.split("&&")) {
        let words: Vec<&str> = segment.split_whitespace().collect();
        for (i, w) in words.iter().enumerate() {
            let w = w.trim_start_matches('(');
            if w == "banger" && i + 1 < words.len() {
                out.push(words[i + 1..].iter().map(|s| s.to_string()).collect());
            }
        }
    }
    out
}

/// What `banger <path> --help` lists.
#[derive(Debug, Default, Clone)]
struct Help {
    commands: BTreeSet<String>,
    flags: BTreeSet<String>,
}

/// Parses argh's help text: the names under `Commands:` and the flags under `Options:`.
fn parse_help(text: &str) -> Help {
    let mut help = Help::default();
    let mut section = "";
    for line in text.lines() {
        if !line.starts_with(' ') {
            section = line.trim_end_matches(':');
            continue;
        }
        // Entries start at column 2; wrapped descriptions are indented further.
        let Some(entry) = line.strip_prefix("  ").filter(|l| !l.starts_with(' ')) else {
            continue;
        };
        match section {
            "Commands" => {
                if let Some(name) = entry.split_whitespace().next() {
                    help.commands.insert(name.to_string());
                }
            }
            "Options" => {
                for word in entry.split_whitespace().take(2) {
                    let word = word.trim_end_matches(',');
                    if word.starts_with("--") {
                        help.flags.insert(word.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    help
}

/// Asks the real binary; results are cached per command path.
struct Binary {
    scratch: PathBuf,
    cache: HashMap<Vec<String>, Option<Help>>,
}

impl Binary {
    fn new() -> Binary {
        let scratch = std::env::temp_dir().join(format!("banger-it-docs-{}", std::process::id()));
        std::fs::create_dir_all(&scratch).expect("creating a scratch root");
        Binary {
            scratch,
            cache: HashMap::new(),
        }
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        // A scratch BANGER_ROOT: `--help` touches nothing, and if it ever did, not the host.
        Command::new(BIN)
            .args(args)
            .env("BANGER_ROOT", &self.scratch)
            .output()
            .expect("running the banger binary")
    }

    /// `banger <path> --help`, parsed; `None` when the binary refuses the path.
    fn help(&mut self, path: &[String]) -> Option<Help> {
        if let Some(h) = self.cache.get(path) {
            return h.clone();
        }
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let o = self.run(&args);
        let h = o
            .status
            .success()
            .then(|| parse_help(&String::from_utf8_lossy(&o.stdout)));
        self.cache.insert(path.to_vec(), h.clone());
        h
    }

    /// Whether `banger <path>` accepts `flag`: listed in its help, or (a hidden option) parsed
    /// without complaint when given a value ahead of `--help`.
    fn accepts(&mut self, path: &[String], flag: &str) -> bool {
        if self.help(path).is_some_and(|h| h.flags.contains(flag)) {
            return true;
        }
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.extend([flag, "x", "--help"]);
        self.run(&args).status.success()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

fn is_word(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Checks the invocations in `md`; returns (how many were checked, the problems found).
fn check_markdown(bin: &mut Binary, name: &str, md: &str) -> (usize, Vec<String>) {
    let mut checked = 0;
    let mut problems = Vec::new();
    for code in code_of(md) {
        for words in invocations(&code.text) {
            let at = format!("{name}:{}: `banger {}`", code.line, words.join(" "));
            let Some(first) = words.first().filter(|w| is_word(w)) else {
                continue; // `banger --version`, `banger <command>`, …
            };
            checked += 1;
            let Some(top) = bin.help(&[]) else {
                problems.push(format!("{at}: `banger --help` failed"));
                continue;
            };
            if !top.commands.contains(first) {
                problems.push(format!(
                    "{at}: `{first}` is not a command in `banger --help` ({})",
                    top.commands.iter().cloned().collect::<Vec<_>>().join(", ")
                ));
                continue;
            }
            let mut path = vec![first.clone()];
            let Some(help) = bin.help(&path) else {
                problems.push(format!("{at}: `banger {first} --help` failed"));
                continue;
            };
            let mut rest = &words[1..];
            if !help.commands.is_empty() {
                if let Some(sub) = rest.first().filter(|w| is_word(w)) {
                    if !help.commands.contains(sub) {
                        problems.push(format!(
                            "{at}: `{sub}` is not a subcommand in `banger {first} --help` ({})",
                            help.commands.iter().cloned().collect::<Vec<_>>().join(", ")
                        ));
                        continue;
                    }
                    path.push(sub.clone());
                    rest = &rest[1..];
                }
            }
            if !code.check_flags {
                continue;
            }
            for word in rest {
                let flag = word
                    .trim_start_matches('[')
                    .split(['=', ']'])
                    .next()
                    .unwrap_or_default();
                if !flag.starts_with("--") || flag == "--help" || flag == "--" {
                    continue;
                }
                if !bin.accepts(&path, flag) {
                    problems.push(format!(
                        "{at}: the binary does not accept {flag} (see `banger {} --help`)",
                        path.join(" ")
                    ));
                }
            }
        }
    }
    (checked, problems)
}

#[test]
fn every_command_in_the_docs_exists_in_help() {
    let mut bin = Binary::new();
    let mut total = 0;
    let mut problems = Vec::new();
    let mut in_operations = 0;
    for file in doc_files() {
        let name = file
            .strip_prefix(REPO)
            .unwrap_or(&file)
            .display()
            .to_string();
        let (n, p) = check_markdown(&mut bin, &name, &read(&file));
        if name.ends_with("docs/operations.md") {
            in_operations = n;
        }
        total += n;
        problems.extend(p);
    }
    assert!(
        problems.is_empty(),
        "the docs name commands or flags the binary does not have:\n{}",
        problems.join("\n")
    );
    eprintln!("checked {total} `banger …` invocations ({in_operations} in docs/operations.md)");
    // A parser that found nothing would pass vacuously: operations.md shows dozens of commands.
    assert!(
        in_operations >= 30,
        "only {in_operations} invocations found in docs/operations.md (total {total})"
    );
}

#[test]
fn the_checker_catches_what_does_not_exist() {
    let mut bin = Binary::new();
    let md = "\
```sh
banger vm create --name a   # fine
banger frobnicate
sudo banger vm frobnicate dev
banger update --no-such-flag
banger update --manifest-url http://127.0.0.1/m.json
```
And `banger doctor --json`, `banger daemon bogus`.
<!-- verify: x -->
`banger vm create --not-yet`
<!-- /verify: x -->
`banger vm create --not-yet`
";
    let (checked, problems) = check_markdown(&mut bin, "sample", md);
    assert_eq!(checked, 9, "{problems:#?}");
    let want = [
        "sample:3: `banger frobnicate`",
        "sample:4: `banger vm frobnicate dev`",
        "sample:5: `banger update --no-such-flag`",
        "sample:8: `banger daemon bogus`",
        "sample:12: `banger vm create --not-yet`",
    ];
    assert_eq!(problems.len(), want.len(), "{problems:#?}");
    for (p, w) in problems.iter().zip(want) {
        assert!(p.starts_with(w), "{p:?} should start with {w:?}");
    }
}

/// GitHub's anchor for a heading: lower-case, spaces to `-`, punctuation other than `-`/`_` dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(md: &str) -> BTreeSet<String> {
    let mut fenced = false;
    let mut out = BTreeSet::new();
    for line in md.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            out.insert(slug(line.trim_start_matches('#')));
        }
    }
    out
}

/// Every `](target)` link in `md`.
fn links(md: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, line) in md.lines().enumerate() {
        let mut rest = line;
        while let Some(n) = rest.find("](") {
            rest = &rest[n + 2..];
            if let Some(end) = rest.find(')') {
                out.push((i + 1, rest[..end].to_string()));
                rest = &rest[end..];
            }
        }
    }
    out
}

#[test]
fn docs_stay_inside_the_repository_and_links_resolve() {
    let mut problems = Vec::new();
    for file in doc_files() {
        let md = read(&file);
        let name = file
            .strip_prefix(REPO)
            .unwrap_or(&file)
            .display()
            .to_string();
        for (i, line) in md.lines().enumerate() {
            for bad in ["../shared", "shared/DESIGN"] {
                if line.contains(bad) {
                    problems.push(format!(
                        "{name}:{}: refers to `{bad}`, outside the repository",
                        i + 1
                    ));
                }
            }
        }
        for (line, target) in links(&md) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let dir = file.parent().expect("a file has a directory");
            let resolved = if path.is_empty() {
                file.clone()
            } else {
                dir.join(path)
            };
            if !resolved.exists() {
                problems.push(format!("{name}:{line}: link `{target}`: no such file"));
                continue;
            }
            if !resolved
                .canonicalize()
                .is_ok_and(|p| p.starts_with(Path::new(REPO).canonicalize().unwrap()))
            {
                problems.push(format!(
                    "{name}:{line}: link `{target}` leaves the repository"
                ));
            }
            if let Some(a) = anchor {
                if !anchors(&read(&resolved)).contains(a) {
                    problems.push(format!(
                        "{name}:{line}: link `{target}`: no heading with anchor #{a}"
                    ));
                }
            }
        }
    }
    let readme = read(&Path::new(REPO).join("README.md"));
    for doc in [
        "docs/architecture.md",
        "docs/operations.md",
        "docs/releasing.md",
        "CHANGELOG.md",
    ] {
        if !readme.contains(&format!("]({doc})")) {
            problems.push(format!("README.md does not link {doc}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn slugs_match_githubs() {
    for (heading, want) in [
        (" Install", "install"),
        (" A crashed update", "a-crashed-update"),
        (" 8. The update flow", "8-the-update-flow"),
        (" Kernels, images and VMs", "kernels-images-and-vms"),
    ] {
        assert_eq!(slug(heading), want);
    }
}

/// Every row `banger doctor` prints has a line in operations.md's doctor table saying what to do.
#[test]
fn every_doctor_row_is_documented() {
    let bin = Binary::new();
    // Read-only by contract; under a scratch BANGER_ROOT it also sees no install.
    let o = bin.run(&["doctor", "--json"]);
    let report: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("banger doctor --json prints JSON");
    let names: Vec<String> = report["checks"]
        .as_array()
        .expect("a `checks` list")
        .iter()
        .map(|c| c["name"].as_str().expect("a row name").to_string())
        .collect();
    assert!(names.len() >= 9, "doctor printed only {names:?}");
    let ops = read(&Path::new(REPO).join("docs/operations.md"));
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !ops.contains(&format!("| `{n}` ")))
        .collect();
    assert!(
        missing.is_empty(),
        "doctor rows with no `| `name` |` row in docs/operations.md's doctor table: {missing:?}"
    );
}
