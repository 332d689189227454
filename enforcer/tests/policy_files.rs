//! Every example policy under policies/ parses and compiles.
use std::path::Path;

use enforcer::model::{compile_policy, file_tables, parse_policy_file};

#[test]
fn every_shipped_policy_parses_and_compiles() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("policies/ exists") {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let policy = parse_policy_file(&path).unwrap_or_else(|e| panic!("{e}"));
        let compiled = compile_policy(&policy).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(!compiled.rules.is_empty(), "{}: an example with no rules teaches nothing", path.display());
        if let Some(files) = &policy.files {
            // Against this machine's filesystem, with a home that does not exist yet:
            // every `~` path is then pending, which must compile too.
            let home = std::env::temp_dir().join("enforcer-policy-files-home");
            file_tables::compile(files, &home).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
        checked += 1;
    }
    assert!(checked >= 4, "expected the shipped example policies, found {checked}");
}
