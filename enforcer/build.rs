//! Builds the kernel programs (`enforcer-ebpf`) with the nightly toolchain and
//! bpf-linker, and places the object in OUT_DIR for `include_bytes_aligned!`.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    // With AYA_BUILD_SKIP (clippy, docs, unit tests without bpf-linker) aya-build skips
    // the eBPF build; leave an empty object so the controller still compiles and the
    // loader can say why it has no programs.
    if std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
        std::fs::write(out.join("enforcer"), b"").context("write empty eBPF object")?;
    }
    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "enforcer-ebpf")
        .ok_or_else(|| anyhow!("enforcer-ebpf package not found in the workspace"))?;
    let root_dir =
        ebpf.manifest_path.parent().ok_or_else(|| anyhow!("enforcer-ebpf manifest has no parent directory"))?;
    aya_build::build_ebpf(
        [aya_build::Package { name: ebpf.name.as_str(), root_dir: root_dir.as_str(), ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}
