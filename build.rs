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
    let mut build = cc::Build::new();
    if let Some(cuda_includes) = nccl_includes(&libtorch) {
        // The NCCL process group: compiled where the wheel's NCCL and CUDA headers are at hand
        // (tools/setup.sh installs the few CUDA headers the wheel lacks).
        build.define("USE_C10D_NCCL", None).define("USE_CUDA", None);
        build.define("DDPM_WITH_NCCL", None);
        for dir in cuda_includes {
            build.include(dir);
        }
    }
    build
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

/// The NCCL and CUDA include folders of a pip-installed torch, when all needed headers are there.
fn nccl_includes(libtorch: &std::path::Path) -> Option<Vec<PathBuf>> {
    if !libtorch.join("lib/libtorch_cuda.so").exists() {
        return None;
    }
    let nvidia = libtorch.parent()?.join("nvidia");
    let (nccl, cuda) = (nvidia.join("nccl/include"), nvidia.join("cu13/include"));
    let needed = [
        nccl.join("nccl.h"),
        cuda.join("cuda_runtime.h"),
        cuda.join("crt/host_config.h"),
        cuda.join("nv/target"),
    ];
    needed.iter().all(|f| f.exists()).then(|| vec![nccl, cuda])
}
