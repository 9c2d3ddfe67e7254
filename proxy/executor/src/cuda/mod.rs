//! The executor's CUDA path, through cudarc: the driver API, cuBLAS for
//! the matrix products, and kernels compiled at run time with NVRTC for the
//! rest ([`SOURCE`]). The forward pass is in [`model`]; scheduling,
//! sampling and stop conditions are the CPU path's own ([`crate::engine`]).
//!
//! cudarc loads the CUDA libraries when first called and panics when one is
//! missing, so [`Gpu::open`] checks each library is present before any
//! call, and treats every failure on the way to a context, a stream, a
//! cuBLAS handle and a kernel that ran as "no GPU", with the reason.
//!
//! Every `unsafe` here is a kernel launch or a cuBLAS call: their arguments
//! are device buffers whose lengths the caller checked against the launch's
//! shape, on this module's single stream.

pub mod model;
#[cfg(test)]
mod tests;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{CompileOptions, Ptx};

/// The kernels' CUDA C source.
pub const SOURCE: &str = include_str!("kernels.cu");

/// Environment variable that makes the GPU tests fail, rather than skip,
/// when no GPU is usable (set by `scripts/gpu-check.sh`).
pub const REQUIRE_GPU_ENV: &str = "SWITCHYARD_REQUIRE_GPU";

/// Which CUDA libraries cannot be loaded, in words; `None` when all can.
/// Looks only: it calls nothing in them.
pub fn missing_libraries() -> Option<String> {
    // SAFETY: each check only tries to load the library by name.
    #[allow(unsafe_code)]
    let present = unsafe {
        [
            (
                "libcuda (the NVIDIA driver)",
                cudarc::driver::sys::is_culib_present(),
            ),
            ("libcublas", cudarc::cublas::sys::is_culib_present()),
            ("libnvrtc", cudarc::nvrtc::sys::is_culib_present()),
        ]
    };
    let missing: Vec<&str> = present
        .iter()
        .filter(|(_, found)| !found)
        .map(|(name, _)| *name)
        .collect();
    if !missing.is_empty() {
        return Some(format!(
            "{} cannot be loaded (looked for on the library path)",
            missing.join(", ")
        ));
    }
    missing_symbols()
}

/// The driver, cuBLAS and NVRTC functions this path calls (cudarc's
/// destructors included). cudarc looks each up when first called and
/// panics when it is absent; a panic while a half-made context unwinds
/// would abort the process, so a library without them is "no GPU" before
/// anything is called.
const DRIVER_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxSetCurrent",
    "cuCtxGetCurrent",
    "cuCtxSynchronize",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuMemAllocAsync",
    "cuMemFreeAsync",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuMemsetD8Async",
    "cuModuleLoadData",
    "cuModuleGetFunction",
    "cuModuleUnload",
    "cuLaunchKernel",
    "cuFuncSetAttribute",
    "cuDeviceGetName",
    "cuDeviceTotalMem_v2",
    "cuMemGetInfo_v2",
    "cuDeviceGetAttribute",
    "cuGetErrorString",
    "cuEventCreate",
    "cuEventDestroy_v2",
    "cuEventRecord",
    "cuStreamWaitEvent",
];
const CUBLAS_SYMBOLS: &[&str] = &[
    "cublasCreate_v2",
    "cublasDestroy_v2",
    "cublasSetStream_v2",
    "cublasSgemm_v2",
];
const NVRTC_SYMBOLS: &[&str] = &[
    "nvrtcCreateProgram",
    "nvrtcCompileProgram",
    "nvrtcGetPTXSize",
    "nvrtcGetPTX",
    "nvrtcDestroyProgram",
    "nvrtcGetProgramLogSize",
    "nvrtcGetProgramLog",
];

/// The first function in [`DRIVER_SYMBOLS`], [`CUBLAS_SYMBOLS`] or
/// [`NVRTC_SYMBOLS`] that its library lacks, in words.
fn missing_symbols() -> Option<String> {
    // SAFETY: only called once every library was found loadable; `culib`
    // loads it and `get` looks a name up without calling it.
    #[allow(unsafe_code)]
    let libraries = unsafe {
        [
            ("libcuda", cudarc::driver::sys::culib(), DRIVER_SYMBOLS),
            ("libcublas", cudarc::cublas::sys::culib(), CUBLAS_SYMBOLS),
            ("libnvrtc", cudarc::nvrtc::sys::culib(), NVRTC_SYMBOLS),
        ]
    };
    for (name, library, symbols) in libraries {
        for symbol in symbols {
            // SAFETY: a lookup; the pointer is never used.
            #[allow(unsafe_code)]
            let found = unsafe { library.get::<*const std::ffi::c_void>(symbol.as_bytes()) };
            if found.is_err() {
                return Some(format!(
                    "{name} has no {symbol} (not NVIDIA's, or older than CUDA 12.4)"
                ));
            }
        }
    }
    None
}

/// Compiles [`SOURCE`] with NVRTC. Needs only libnvrtc, not a GPU.
pub fn compile() -> Result<Ptx, String> {
    // SAFETY: only tries to load the library by name.
    #[allow(unsafe_code)]
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("libnvrtc cannot be loaded (looked for on the library path)".to_string());
    }
    let options = CompileOptions {
        name: Some("switchyard_kernels.cu".to_string()),
        ..CompileOptions::default()
    };
    guard("compiling the kernels", || {
        cudarc::nvrtc::compile_ptx_with_opts(SOURCE, options).map_err(|e| e.to_string())
    })
}

/// Runs `f`, turning a panic inside the CUDA libraries' bindings into an
/// error naming `what`.
fn guard<T>(what: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result.map_err(|e| format!("{what}: {e}")),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("no message");
            Err(format!("{what} panicked: {message}"))
        }
    }
}

/// The compiled kernels, by name.
#[derive(Debug)]
pub struct Kernels {
    pub probe: CudaFunction,
    pub dequant_q4_0: CudaFunction,
    pub dequant_q4_1: CudaFunction,
    pub dequant_q8_0: CudaFunction,
    pub dequant_f16: CudaFunction,
    pub embed: CudaFunction,
    pub rms_norm: CudaFunction,
    pub rope_store: CudaFunction,
    pub attention: CudaFunction,
    pub silu_mul: CudaFunction,
    pub logit_summary: CudaFunction,
}

impl Kernels {
    fn load(module: &Arc<CudaModule>) -> Result<Kernels, String> {
        let f = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| format!("kernel {name}: {e}"))
        };
        Ok(Kernels {
            probe: f("probe")?,
            dequant_q4_0: f("dequant_q4_0")?,
            dequant_q4_1: f("dequant_q4_1")?,
            dequant_q8_0: f("dequant_q8_0")?,
            dequant_f16: f("dequant_f16")?,
            embed: f("embed")?,
            rms_norm: f("rms_norm")?,
            rope_store: f("rope_store")?,
            attention: f("attention")?,
            silu_mul: f("silu_mul")?,
            logit_summary: f("logit_summary")?,
        })
    }
}

/// A GPU ready to run the model: context, the one stream everything runs
/// on, a cuBLAS handle on it, and the kernels.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    pub kernels: Kernels,
    pub ordinal: usize,
    pub name: String,
    pub total_memory: usize,
    pub free_memory: usize,
    pub capability: (i32, i32),
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("ordinal", &self.ordinal)
            .field("name", &self.name)
            .field("total_memory", &self.total_memory)
            .finish_non_exhaustive()
    }
}

impl Gpu {
    /// Opens GPU `ordinal` and checks that a kernel runs on it; the error
    /// says, in words, what was missing or failed.
    pub fn open(ordinal: usize) -> Result<Gpu, String> {
        if let Some(missing) = missing_libraries() {
            return Err(missing);
        }
        guard("opening the GPU", || open_checked(ordinal))
    }

    /// Launch shape for `n` independent elements, 256 threads a block.
    pub fn elements(n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).max(1);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

fn open_checked(ordinal: usize) -> Result<Gpu, String> {
    let count = CudaContext::device_count().map_err(|e| format!("counting devices: {e}"))?;
    if count <= 0 {
        return Err("the driver reports no CUDA device".to_string());
    }
    if ordinal >= count as usize {
        return Err(format!(
            "there is no CUDA device {ordinal} (the driver reports {count})"
        ));
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| format!("creating a context: {e}"))?;
    // SAFETY: everything runs on the one stream made below, so cudarc's
    // cross-stream event tracking is not needed.
    #[allow(unsafe_code)]
    unsafe {
        ctx.disable_event_tracking()
    };
    let stream = ctx
        .new_stream()
        .map_err(|e| format!("creating a stream: {e}"))?;
    let blas =
        CudaBlas::new(stream.clone()).map_err(|e| format!("creating a cuBLAS handle: {e}"))?;
    let ptx = compile()?;
    let module = ctx
        .load_module(ptx)
        .map_err(|e| format!("loading the compiled kernels: {e}"))?;
    let kernels = Kernels::load(&module)?;

    // The kernel that proves the rest: 1000 numbers written and read back.
    let n = 1000usize;
    let mut out = stream
        .alloc_zeros::<i32>(n)
        .map_err(|e| format!("allocating device memory: {e}"))?;
    let count_arg = n as i32;
    let mut launch = stream.launch_builder(&kernels.probe);
    launch.arg(&mut out).arg(&count_arg);
    // SAFETY: `out` holds n ints and the kernel writes indices below n.
    #[allow(unsafe_code)]
    unsafe { launch.launch(Gpu::elements(n)) }.map_err(|e| format!("running a kernel: {e}"))?;
    let back = stream
        .clone_dtoh(&out)
        .map_err(|e| format!("reading a kernel's output: {e}"))?;
    if back.iter().enumerate().any(|(i, &v)| v != 2 * i as i32) {
        return Err("the check kernel ran but wrote wrong numbers".to_string());
    }

    let name = ctx
        .name()
        .map_err(|e| format!("reading the device name: {e}"))?;
    let total_memory = ctx
        .total_mem()
        .map_err(|e| format!("reading device memory: {e}"))?;
    let (free_memory, _) = ctx
        .mem_get_info()
        .map_err(|e| format!("reading free device memory: {e}"))?;
    let capability = ctx
        .compute_capability()
        .map_err(|e| format!("reading the compute capability: {e}"))?;
    Ok(Gpu {
        ctx,
        stream,
        blas,
        kernels,
        ordinal,
        name,
        total_memory,
        free_memory,
        capability,
    })
}
