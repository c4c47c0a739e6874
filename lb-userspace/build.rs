//! Builds the eBPF datapath (`lb-ebpf`) for the agent to embed.
//!
//! Its objects, for target bpfel-unknown-none, go to OUT_DIR for
//! `include_bytes_aligned!`: the datapath (`lb-ebpf.o`) and the benchmark's
//! empty program (`lb-bench-floor.o`).
//!
//! Two routes, picked by what the machine has:
//! - Debian's rustc with its prebuilt BPF `core` (`/usr/lib/rustlib/
//!   bpfel-unknown-none`), with RUSTC_BOOTSTRAP for aya-ebpf's feature gates;
//!   `cargo xtask setup` installs it;
//! - a rustup nightly with `rust-src`, building `core` with `-Z build-std`.
//!
//! `LB_EBPF_OBJECT=/path/to/object` uses a prebuilt object instead (and the
//! `lb-bench-floor` object beside it, if there is one: only the benchmark
//! needs it).
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_BPF_CORE: &str = "/usr/lib/rustlib/bpfel-unknown-none";

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir.parent().expect("lb-userspace sits in the workspace");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("set by cargo"));
    let (out, floor_out) = (out_dir.join("lb-ebpf.o"), out_dir.join("lb-bench-floor.o"));
    println!("cargo:rerun-if-env-changed=LB_EBPF_OBJECT");
    if let Ok(prebuilt) = env::var("LB_EBPF_OBJECT") {
        println!("cargo:rerun-if-changed={prebuilt}");
        std::fs::copy(&prebuilt, &out).unwrap_or_else(|e| panic!("LB_EBPF_OBJECT={prebuilt}: {e}"));
        // Empty when absent: the benchmark then says what is missing.
        let floor = Path::new(&prebuilt).with_file_name("lb-bench-floor");
        let floor_bytes = std::fs::read(&floor).unwrap_or_default();
        std::fs::write(&floor_out, floor_bytes).unwrap_or_else(|e| panic!("writing {}: {e}", floor_out.display()));
        return;
    }
    for watched in ["lb-ebpf/src", "lb-ebpf/Cargo.toml", "lb-ebpf/Cargo.lock", "lb-ebpf/.cargo", "lb-common/src", "lb-common/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    let target_dir = root.join("target").join("ebpf");
    let mut cmd = ebpf_cargo();
    cmd.current_dir(root.join("lb-ebpf"))
        .args(["build", "--release", "--target", "bpfel-unknown-none"])
        .env("CARGO_TARGET_DIR", &target_dir);
    let status = cmd.status().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(status.success(), "building the eBPF datapath failed ({status}); see the errors above");
    for (name, to) in [("lb-ebpf", &out), ("lb-bench-floor", &floor_out)] {
        let object = target_dir.join("bpfel-unknown-none/release").join(name);
        std::fs::copy(&object, to).unwrap_or_else(|e| panic!("copying {}: {e}", object.display()));
    }
}

/// A cargo command for the BPF target, clean of the variables the outer
/// cargo sets, which would otherwise leak its toolchain into the build.
fn ebpf_cargo() -> Command {
    let mut cmd = Command::new(DEBIAN_CARGO);
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        let leaks = (key.starts_with("CARGO_") && key != "CARGO_HOME")
            || matches!(
                key.as_ref(),
                "RUSTC" | "RUSTC_WRAPPER" | "RUSTC_WORKSPACE_WRAPPER" | "RUSTFLAGS" | "RUSTDOC"
                    | "RUSTUP_TOOLCHAIN" | "MAKEFLAGS" | "MFLAGS" | "CARGO"
            );
        if leaks {
            cmd.env_remove(key.as_ref());
        }
    }
    if Path::new(DEBIAN_BPF_CORE).is_dir() && Path::new(DEBIAN_CARGO).exists() {
        cmd.env("RUSTC", DEBIAN_RUSTC).env("RUSTC_BOOTSTRAP", "1");
    } else if has_nightly_rust_src() {
        // Same command, through rustup's nightly instead of Debian's cargo.
        let mut nightly = Command::new("rustup");
        nightly.args(["run", "nightly", "cargo"]).env("CARGO_UNSTABLE_BUILD_STD", "core");
        for (key, value) in cmd.get_envs() {
            match value {
                Some(v) => nightly.env(key, v),
                None => nightly.env_remove(key),
            };
        }
        cmd = nightly;
    } else {
        panic!(
            "no Rust toolchain for the BPF target: run `cargo xtask setup` (installs Debian's \
             rustc with its BPF core and bpf-linker), or install a nightly with rust-src"
        );
    }
    // bpf-linker is installed by `cargo install` into cargo's bin directory.
    let cargo_bin = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|home| home.join("bin"));
    if let Some(bin) = cargo_bin {
        let mut paths = vec![bin];
        paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
        cmd.env("PATH", env::join_paths(paths).expect("PATH entries without separators"));
    }
    cmd
}

fn has_nightly_rust_src() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("lib/rustlib/src/rust/library/core").is_dir())
        .unwrap_or(false)
}
