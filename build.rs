//! Links libtorch so that the binary runs without LD_LIBRARY_PATH (rpath) and really loads the
//! CUDA part of libtorch on GPU machines, and compiles the project's small C++ binding.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=csrc");
    let libtorch = std::env::var("LIBTORCH").unwrap_or_default();
    let libtorch = PathBuf::from(&libtorch).canonicalize().unwrap_or_else(|_| {
        panic!("libtorch not found at LIBTORCH={libtorch:?}: run tools/setup.sh first (see README)")
    });
    let lib = libtorch.join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        // Nothing in the Rust code names a libtorch_cuda symbol, so `--as-needed` would drop the
        // library and CUDA would be unavailable at run time.
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{}", lib.display());
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    let include = libtorch.join("include");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        // ProcessGroupGloo.hpp is compiled only with this; csrc/gloo_decls stands in for the
        // Gloo headers the wheel lacks.
        .flag("-DUSE_C10D_GLOO")
        .include("csrc/gloo_decls")
        .file("csrc/ops.cpp")
        .file("csrc/distributed.cpp")
        .compile("ddpm_ops");
}
