//! Data-parallel training over several processes, on one machine or many: the launch
//! environment torchrun sets, and the process group (libtorch's c10d with Gloo, through
//! `csrc/distributed.cpp`) that averages gradients and hands rank 0's state to the others.
use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void, CString};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tch::Tensor;

use crate::ops::{check, ptrs, CTensor};

extern "C" {
    fn ddpm_group_new(
        host: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        agent_store: c_int,
        prefix: *const c_char,
        timeout_ms: i64,
        nccl: c_int,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn ddpm_nccl_available() -> c_int;
    fn ddpm_reducer_new(
        group: *mut c_void,
        params: *const CTensor,
        n: usize,
        bucket_bytes: i64,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn ddpm_reducer_arm(reducer: *mut c_void) -> *mut c_char;
    fn ddpm_reducer_free(reducer: *mut c_void);
    fn ddpm_group_free(group: *mut c_void);
    fn ddpm_group_all_reduce_mean(
        group: *mut c_void,
        tensors: *const CTensor,
        n: usize,
        bucket_bytes: i64,
    ) -> *mut c_char;
    fn ddpm_group_broadcast(
        group: *mut c_void,
        tensors: *const CTensor,
        n: usize,
        root: c_int,
        bucket_bytes: i64,
    ) -> *mut c_char;
}

/// Gradients travel in buffers of about this size, all in flight at once.
const BUCKET_BYTES: i64 = 25 << 20;

/// Where this process stands in a multi-process launch, from the environment torchrun (and
/// `ddpm launch`) set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    /// The process's index on its machine: which GPU it uses.
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's agent already serves the store at MASTER_ADDR:MASTER_PORT.
    pub agent_store: bool,
    /// torchrun's restart count, so that a restarted group does not read stale keys.
    pub attempt: u32,
    /// How long any rank waits for the others (joining, and each collective) before giving up:
    /// DDPM_DIST_TIMEOUT seconds.
    pub timeout: Duration,
}

/// The default DDPM_DIST_TIMEOUT: long enough for rank 0 to write samples, checkpoints or FID
/// while the others wait.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 1800;

impl Launch {
    /// The launch described by `var` (the environment), or None for a single process.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let number = |name: &str, default: Option<u64>| -> Result<u64> {
            match (var(name), default) {
                (Some(v), _) => v.trim().parse().with_context(|| {
                    format!("environment variable {name}={v:?} is not a whole number")
                }),
                (None, Some(d)) => Ok(d),
                (None, None) => bail!(
                    "WORLD_SIZE is set, so {name} must be too (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)"
                ),
            }
        };
        let world = number("WORLD_SIZE", Some(1))? as usize;
        if world <= 1 {
            return Ok(None);
        }
        let rank = number("RANK", None)? as usize;
        if rank >= world {
            bail!("RANK={rank} is not below WORLD_SIZE={world}");
        }
        let port = number("MASTER_PORT", None)?;
        if port == 0 || port > u16::MAX as u64 {
            bail!("MASTER_PORT={port} is not a TCP port");
        }
        Ok(Some(Launch {
            rank,
            world,
            local_rank: number("LOCAL_RANK", Some(rank as u64))? as usize,
            master_addr: var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port: port as u16,
            agent_store: var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v == "True"),
            attempt: number("TORCHELASTIC_RESTART_COUNT", Some(0))? as u32,
            timeout: Duration::from_secs(
                number("DDPM_DIST_TIMEOUT", Some(DEFAULT_TIMEOUT_SECONDS))?.max(1),
            ),
        }))
    }

    pub fn from_env() -> Result<Option<Launch>> {
        Launch::from_vars(|name| std::env::var(name).ok())
    }
}

/// `[rank N] ` in a process of a multi-process run other than rank 0 (from torchrun's
/// variables, as `ddpm launch` sets them), so that the ranks' messages can be told apart.
pub fn message_prefix() -> &'static str {
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PREFIX.get_or_init(|| {
        let var = |name| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
        };
        match (var("RANK"), var("WORLD_SIZE")) {
            (Some(rank), Some(world)) if rank > 0 && world > 1 => format!("[rank {rank}] "),
            _ => String::new(),
        }
    })
}

/// Which c10d backend carries the collectives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// CPU tensors (and CUDA tensors, staged through the host).
    Gloo,
    /// CUDA tensors, GPU to GPU.
    Nccl,
}

impl Backend {
    /// DDPM_DIST_BACKEND (gloo or nccl) if set; else NCCL for CUDA devices where this build has
    /// it, Gloo otherwise.
    pub fn choose(device: tch::Device) -> Result<Backend> {
        match std::env::var("DDPM_DIST_BACKEND").ok().as_deref() {
            Some("gloo") => Ok(Backend::Gloo),
            Some("nccl") if device.is_cuda() => Ok(Backend::Nccl),
            Some("nccl") => bail!(
                "DDPM_DIST_BACKEND=nccl needs a CUDA device (train.device is {}); use gloo",
                crate::device::name(device)
            ),
            Some(other) => bail!("DDPM_DIST_BACKEND={other:?}: expected gloo or nccl"),
            None if device.is_cuda() && nccl_available() => Ok(Backend::Nccl),
            None => Ok(Backend::Gloo),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "Gloo",
            Backend::Nccl => "NCCL",
        }
    }

    /// Where this backend's small control tensors live.
    fn device(self, device: tch::Device) -> tch::Device {
        match self {
            Backend::Gloo => tch::Device::Cpu,
            Backend::Nccl => device,
        }
    }
}

/// Whether this build includes the NCCL process group.
pub fn nccl_available() -> bool {
    unsafe { ddpm_nccl_available() != 0 }
}

/// A c10d process group. Every collective gives up after the group's timeout, so a
/// rank that died or hangs stops the others with an error instead of a hang.
pub struct ProcessGroup {
    raw: *mut c_void,
    pub rank: usize,
    pub world: usize,
    pub backend: Backend,
    /// Where control values (flags) go: the CPU for Gloo, the GPU for NCCL.
    control_device: tch::Device,
    timeout: Duration,
    /// False after a failed collective: its threads may still be waiting, so the group (and its
    /// reducer) are left to the process's exit instead of being freed (which would wait for them).
    healthy: Rc<Cell<bool>>,
}

impl ProcessGroup {
    /// Meets the other ranks at MASTER_ADDR:MASTER_PORT (rank 0 serves the rendezvous unless
    /// torchrun's agent does), to train on `device`.
    pub fn join(launch: &Launch, device: tch::Device) -> Result<ProcessGroup> {
        let timeout = launch.timeout;
        let backend = Backend::choose(device)?;
        let host = CString::new(launch.master_addr.clone()).context("MASTER_ADDR")?;
        let prefix = CString::new(format!("ddpm/attempt_{}", launch.attempt)).unwrap();
        let mut raw = std::ptr::null_mut();
        check(unsafe {
            ddpm_group_new(
                host.as_ptr(),
                launch.master_port as c_int,
                launch.rank as c_int,
                launch.world as c_int,
                launch.agent_store as c_int,
                prefix.as_ptr(),
                timeout.as_millis() as i64,
                (backend == Backend::Nccl) as c_int,
                &mut raw,
            )
        })
        .with_context(|| {
            format!(
                "rank {} of {} could not join the {} process group at {}:{} (timeout {} s)",
                launch.rank,
                launch.world,
                backend.name(),
                launch.master_addr,
                launch.master_port,
                timeout.as_secs()
            )
        })?;
        Ok(ProcessGroup {
            raw,
            rank: launch.rank,
            world: launch.world,
            backend,
            control_device: backend.device(device),
            timeout,
            healthy: Rc::new(Cell::new(true)),
        })
    }

    /// Rank 0 writes checkpoints, samples and metrics.
    pub fn is_leader(&self) -> bool {
        self.rank == 0
    }

    /// tᵢ ← the mean of tᵢ over all ranks.
    pub fn all_reduce_mean(&self, tensors: &[Tensor]) -> Result<()> {
        let p = ptrs(tensors);
        self.collective("averaging values across ranks", || unsafe {
            ddpm_group_all_reduce_mean(self.raw, p.as_ptr(), p.len(), BUCKET_BYTES)
        })
    }

    /// tᵢ ← rank 0's tᵢ.
    pub fn broadcast_from_leader(&self, tensors: &[Tensor]) -> Result<()> {
        let p = ptrs(tensors);
        self.collective("sharing rank 0's state", || unsafe {
            ddpm_group_broadcast(self.raw, p.as_ptr(), p.len(), 0, BUCKET_BYTES)
        })
    }

    /// Averages the gradients of `params` over the ranks during each armed backward pass.
    /// Every rank creates it with the same parameters in the same order.
    pub fn gradient_reducer(&self, params: &[Tensor]) -> Result<GradientReducer> {
        let p = ptrs(params);
        let mut raw = std::ptr::null_mut();
        check(unsafe { ddpm_reducer_new(self.raw, p.as_ptr(), p.len(), BUCKET_BYTES, &mut raw) })
            .context("cannot set up the gradient reducer")?;
        Ok(GradientReducer {
            raw,
            healthy: self.healthy.clone(),
        })
    }

    /// The error of `what`, a step that involved this group's collectives, which may still be
    /// in flight: the group is not freed afterwards.
    pub fn failed(&self, what: &str, e: impl Into<anyhow::Error>) -> anyhow::Error {
        self.healthy.set(false);
        e.into().context(self.failure(what))
    }

    fn failure(&self, what: &str) -> String {
        format!(
            "rank {} of {}: {what} failed (did another rank stop, or not answer within {} s?)",
            self.rank,
            self.world,
            self.timeout.as_secs()
        )
    }

    /// Whether `flag` is set on any rank.
    pub fn any(&self, flag: bool) -> Result<bool> {
        let t = Tensor::from_slice(&[flag as u8 as f32]).to_device(self.control_device);
        self.all_reduce_mean(std::slice::from_ref(&t))?;
        Ok(t.double_value(&[0]) > 0.0)
    }

    fn collective(&self, what: &str, call: impl FnOnce() -> *mut c_char) -> Result<()> {
        let result = check(call());
        if result.is_err() {
            self.healthy.set(false);
        }
        result.with_context(|| self.failure(what))
    }
}

/// c10d's Reducer over a model's parameters: gradients are averaged in buckets while the
/// backward pass still runs, each bucket as soon as its gradients are ready. Drop it before its
/// process group.
pub struct GradientReducer {
    raw: *mut c_void,
    healthy: Rc<Cell<bool>>,
}

impl GradientReducer {
    /// Makes the next backward pass average the gradients (every rank, at the same point).
    pub fn arm(&self) -> Result<()> {
        check(unsafe { ddpm_reducer_arm(self.raw) })
    }
}

impl Drop for GradientReducer {
    fn drop(&mut self) {
        if self.healthy.get() {
            unsafe { ddpm_reducer_free(self.raw) };
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if self.healthy.get() {
            unsafe { ddpm_group_free(self.raw) };
        }
    }
}

/// Starts `nproc` processes of `exe args`, each told its rank as torchrun tells it.
fn spawn_ranks(
    exe: &Path,
    args: &[String],
    nproc: usize,
    port: u16,
    threads: &str,
    timeout: Option<u64>,
) -> Result<Ranks> {
    use std::os::unix::process::CommandExt;
    use std::process::Command;
    let mut children = Ranks(Vec::with_capacity(nproc));
    for rank in 0..nproc {
        let mut command = Command::new(exe);
        command
            .args(args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("OMP_NUM_THREADS", threads)
            .process_group(0);
        if let Some(seconds) = timeout {
            command.env("DDPM_DIST_TIMEOUT", seconds.to_string());
        }
        stop_with_the_launcher(&mut command);
        children.0.push(
            command
                .spawn()
                .with_context(|| format!("cannot start rank {rank}"))?,
        );
    }
    Ok(children)
}

/// `ddpm launch`: runs `args` (a ddpm command line) as `nproc` ranks on this machine, with the
/// torchrun environment; returns the exit code. When a rank fails, the others are given
/// `grace` to stop on their own (they see the lost peer within their collective timeout) and
/// are then killed. The ranks run in their own process group, so a terminal's Ctrl-C reaches
/// only the launcher, which passes each SIGINT/SIGTERM on once: the ranks stop together with a
/// checkpoint, and a second Ctrl-C stops them at once.
pub fn launch_local(
    nproc: usize,
    port: Option<u16>,
    timeout: Option<u64>,
    args: &[String],
    grace: Duration,
) -> Result<i32> {
    use std::sync::atomic::{AtomicBool, Ordering};
    if nproc == 0 {
        bail!("--nproc must be at least 1");
    }
    if args.first().map(String::as_str) != Some("train") {
        bail!("ddpm launch runs `train` in data-parallel processes (e.g. `ddpm launch --nproc 2 -- train …`), not {:?}", args.join(" "));
    }
    let exe = std::env::current_exe().context("cannot locate the ddpm executable")?;
    let port = match port {
        Some(port) => port,
        None => std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("cannot find a free TCP port for the rendezvous; pass --master-port")?
            .port(),
    };
    // As torchrun does: the ranks share the cores instead of each spinning up one thread per core.
    let threads = std::env::var("OMP_NUM_THREADS").unwrap_or_else(|_| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / nproc).max(1).to_string()
    });
    let signals = [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM]
        .map(|signal| (signal, Arc::new(AtomicBool::new(false))));
    for (signal, flag) in &signals {
        signal_hook::flag::register(*signal, flag.clone())?;
    }
    let mut children = spawn_ranks(&exe, args, nproc, port, &threads, timeout)?;
    let mut codes: Vec<Option<i32>> = vec![None; nproc];
    let mut failed_at: Option<std::time::Instant> = None;
    let mut interrupted = false;
    while codes.iter().any(Option::is_none) {
        for (signal, flag) in &signals {
            if flag.swap(false, Ordering::SeqCst) {
                interrupted = true;
                for child in &children.0 {
                    unsafe { libc::kill(child.id() as i32, *signal) };
                }
            }
        }
        for (rank, child) in children.0.iter_mut().enumerate() {
            if codes[rank].is_some() {
                continue;
            }
            if let Some(status) = child.try_wait()? {
                let code = exit_code(status);
                // 130: the rank stopped on a signal, with a checkpoint.
                let failed = code != 0 && !(interrupted && code == 130);
                if failed && failed_at.is_none() {
                    tracing::info!("ddpm launch: rank {rank} exited with status {code}");
                    failed_at = Some(std::time::Instant::now());
                }
                codes[rank] = Some(code);
            }
        }
        if failed_at.is_some_and(|t| t.elapsed() > grace) {
            for (rank, child) in children.0.iter_mut().enumerate() {
                if codes[rank].is_none() {
                    tracing::info!(
                        "ddpm launch: stopping rank {rank}, which did not exit after rank failure"
                    );
                    let _ = child.kill();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(codes
        .iter()
        .flatten()
        .copied()
        .find(|&c| c != 0)
        .unwrap_or(0))
}

/// A launcher killed outright (kill -9, a job scheduler) takes its ranks along: they receive
/// SIGTERM, on which they stop after a common step with a checkpoint.
#[cfg(target_os = "linux")]
fn stop_with_the_launcher(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let launcher = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The launcher may have died before the line above.
            if libc::getppid() != launcher {
                libc::_exit(143);
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn stop_with_the_launcher(_command: &mut std::process::Command) {}

/// The launched ranks; any still running when the launcher returns early are killed.
struct Ranks(Vec<std::process::Child>);

impl Drop for Ranks {
    fn drop(&mut self) {
        for child in &mut self.0 {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A child's exit status as a shell reports it (128 + signal when killed).
fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(vars: &[(&str, &str)]) -> Result<Option<Launch>> {
        Launch::from_vars(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn launch_reads_torchrun_variables() {
        assert_eq!(launch(&[]).unwrap(), None);
        assert_eq!(launch(&[("WORLD_SIZE", "1")]).unwrap(), None);
        let l = launch(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            l,
            Launch {
                rank: 3,
                world: 4,
                local_rank: 1,
                master_addr: "node0".into(),
                master_port: 29500,
                agent_store: true,
                attempt: 2,
                timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECONDS),
            }
        );
        for (vars, expected) in [
            (vec![("WORLD_SIZE", "2"), ("MASTER_PORT", "1")], "RANK"),
            (
                vec![("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_PORT", "1")],
                "RANK=2",
            ),
            (vec![("WORLD_SIZE", "2"), ("RANK", "0")], "MASTER_PORT"),
            (vec![("WORLD_SIZE", "two")], "WORLD_SIZE"),
        ] {
            let e = format!("{:#}", launch(&vars).err().unwrap());
            assert!(e.contains(expected), "{e}");
        }
    }
}
