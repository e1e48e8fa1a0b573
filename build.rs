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
        println!("cargo:rustc-link-arg=-lc10_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    let include = libtorch.join("include");
    let mut build = cc::Build::new();
    if let Some(cuda) = cuda_includes(&libtorch) {
        // CUDA graphs and the NCCL process group: compiled where the wheel's CUDA and NCCL
        // headers are at hand (tools/setup.sh installs the few CUDA headers the wheel lacks).
        build
            .define("USE_CUDA", None)
            .define("DDPM_WITH_CUDA", None);
        build.include(&cuda.runtime);
        if let Some(nccl) = cuda.nccl {
            build
                .define("USE_C10D_NCCL", None)
                .define("DDPM_WITH_NCCL", None);
            build.include(nccl);
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
        .file("csrc/cuda_graph.cpp")
        .compile("ddpm_ops");
}

struct CudaIncludes {
    runtime: PathBuf,
    nccl: Option<PathBuf>,
}

/// The CUDA runtime (and, when present, NCCL) include folders of a pip-installed torch with
/// CUDA, when the headers libtorch's CUDA headers need are all there.
fn cuda_includes(libtorch: &std::path::Path) -> Option<CudaIncludes> {
    if !libtorch.join("lib/libtorch_cuda.so").exists() {
        return None;
    }
    let nvidia = libtorch.parent()?.join("nvidia");
    let runtime = nvidia.join("cu13/include");
    let needed = ["cuda_runtime.h", "crt/host_config.h", "nv/target"];
    if !needed.iter().all(|f| runtime.join(f).exists()) {
        return None;
    }
    let nccl = Some(nvidia.join("nccl/include")).filter(|dir| dir.join("nccl.h").exists());
    Some(CudaIncludes { runtime, nccl })
}
