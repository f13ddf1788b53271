//! The generated Rust is a locked contract: this test regenerates it from the `.proto` files with
//! `protox` (a pure-Rust protobuf compiler, no `protoc`) and `tonic-prost-build`, and fails when
//! the checked-in `src/gen/` differs. Rerun with `UPDATE_SNAPSHOTS=1` to accept a change.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Every `.proto` file under `dir`, as paths relative to `root`, sorted.
fn proto_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            proto_files(root, &path, out);
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path.strip_prefix(root).unwrap().to_path_buf());
        }
    }
}

/// The `.rs` files in `dir` by name, with their contents.
fn rust_files(dir: &Path) -> BTreeMap<String, String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return BTreeMap::new();
    };
    entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

/// Generates the Rust for every `.proto` file into a fresh directory.
fn generate(root: &Path) -> BTreeMap<String, String> {
    let mut protos = Vec::new();
    proto_files(root, &root.join("kiln"), &mut protos);
    assert!(!protos.is_empty(), "no .proto files under proto/kiln");
    let fds = protox::compile(&protos, [root]).unwrap_or_else(|e| panic!("protox: {e:?}"));
    let out = tempfile::tempdir().unwrap();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .out_dir(out.path())
        .compile_fds(fds)
        .expect("tonic-prost-build");
    rust_files(out.path())
}

#[test]
fn generated_code_matches_the_checked_in_copy() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let gen_dir = root.join("src/gen");
    let generated = generate(root);
    assert!(
        generated.contains_key("kiln.node.v1.rs"),
        "{:?}",
        generated.keys()
    );

    if std::env::var("UPDATE_SNAPSHOTS").is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(&gen_dir).unwrap();
        for stale in rust_files(&gen_dir).keys() {
            if !generated.contains_key(stale) {
                std::fs::remove_file(gen_dir.join(stale)).unwrap();
            }
        }
        for (name, code) in &generated {
            std::fs::write(gen_dir.join(name), code).unwrap();
        }
        return;
    }

    let checked_in = rust_files(&gen_dir);
    let names = |m: &BTreeMap<String, String>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&checked_in),
        names(&generated),
        "proto/src/gen/ holds other files than the .proto files generate; \
         rerun with UPDATE_SNAPSHOTS=1 cargo test -p kiln-proto and review the diff"
    );
    for (name, code) in &generated {
        assert!(
            checked_in[name] == *code,
            "proto/src/gen/{name} is out of date with the .proto files; \
             rerun with UPDATE_SNAPSHOTS=1 cargo test -p kiln-proto and review the diff"
        );
    }
}
