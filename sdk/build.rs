//! Sets the cfg `core_abi` when building for a wasm32 target other than
//! WASI (`wasm32-unknown-unknown`), where the SDK builds a 0.4.0 core
//! module rather than a 0.3.0 component. The export macros expand in the
//! plugin's crate, which does not have this cfg, so they spell the
//! condition out.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(core_abi)");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if arch == "wasm32" && os != "wasi" {
        println!("cargo::rustc-cfg=core_abi");
    }
}
