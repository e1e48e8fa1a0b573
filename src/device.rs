//! Device selection: `auto`, `cpu`, `cuda`, `cuda:N`, `mps`.
use anyhow::{bail, Result};
use tch::Device;

/// Parses a device name; `auto` picks the first CUDA device when one is present.
pub fn parse(name: &str) -> Result<Device> {
    let device = match name {
        "auto" => Device::cuda_if_available(),
        "cpu" => Device::Cpu,
        "mps" => Device::Mps,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(index)) => Device::Cuda(index),
            _ => bail!("unknown device {other:?}: expected auto, cpu, cuda, cuda:N or mps"),
        },
    };
    Ok(device)
}

/// A device as `--device` names it: `cpu`, `cuda:0`, `mps`.
pub fn name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(index) => format!("cuda:{index}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
    }
}

/// Parses and checks that the device can be used here.
pub fn resolve(name: &str) -> Result<Device> {
    let device = parse(name)?;
    if let Device::Cuda(index) = device {
        let count = tch::Cuda::device_count() as usize;
        if index >= count {
            bail!("device {name:?} requested but this machine has {count} CUDA device(s) visible to libtorch");
        }
    }
    if device == Device::Mps && !tch::utils::has_mps() {
        bail!("device \"mps\" requested but MPS is not available in this libtorch build");
    }
    Ok(device)
}

/// Waits for the device's queued work (CUDA; other devices run synchronously).
pub fn synchronize(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

/// Peak CUDA memory (allocated, reserved) by libtorch's allocator, in GiB, since the last
/// [`reset_peak_memory`]; None on other devices.
pub fn peak_memory_gib(device: Device) -> Result<Option<(f64, f64)>> {
    const GIB: f64 = (1u64 << 30) as f64;
    match device {
        Device::Cuda(index) => {
            let (allocated, reserved) = crate::ops::cuda_peak_memory(index)?;
            Ok(Some((allocated as f64 / GIB, reserved as f64 / GIB)))
        }
        _ => Ok(None),
    }
}

pub fn reset_peak_memory(device: Device) -> Result<()> {
    if let Device::Cuda(index) = device {
        crate::ops::reset_cuda_peak_memory(index)?;
    }
    Ok(())
}

/// Processes of this run on this machine (LOCAL_WORLD_SIZE, as torchrun and `ddpm launch` set),
/// each of which holds its own cache.
pub fn local_processes() -> u64 {
    std::env::var("LOCAL_WORLD_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1u64)
        .max(1)
}

/// The most resident memory this process has had (VmHWM, Linux) since it started or since
/// `reset_host_peak_memory`, in bytes; None elsewhere.
pub fn host_peak_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Starts the peak of `host_peak_memory` over from the memory resident now (Linux ≥ 4.0; a
/// no-op elsewhere).
pub fn reset_host_peak_memory() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// MemAvailable from /proc/meminfo (Linux), else the physical memory (other Unix systems);
/// None where neither is known, and then nothing is checked.
pub fn available_host_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        });
    meminfo.or_else(|| {
        // SAFETY: sysconf only reads system constants.
        let (pages, page_size) = unsafe {
            (
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        (pages > 0 && page_size > 0).then(|| pages as u64 * page_size as u64)
    })
}

/// Keeps freed host memory for reuse instead of returning it to the system after every large
/// tensor: with glibc's defaults each step's activations (megabytes each) are mmapped and
/// unmapped again, and the page faults cost ~10% of a CPU training step.
pub fn tune_host_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the parameters of the (thread-safe) allocator.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        assert_eq!(parse("cpu").unwrap(), Device::Cpu);
        assert_eq!(parse("cuda:1").unwrap(), Device::Cuda(1));
        assert!(parse("cuda:x").is_err());
        assert!(parse("gpu").is_err());
    }
}
