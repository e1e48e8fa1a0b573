//! CUDA graphs (`csrc/cuda_graph.cpp`): a computation on fixed-shape tensors recorded once and
//! replayed with one launch, so that the host no longer issues its thousands of small kernels
//! one by one.
use std::ffi::{c_int, c_void};

use anyhow::{anyhow, bail, Result};
use tch::{Device, Tensor};

use crate::ops::check;

extern "C" {
    fn ddpm_cuda_graph_new(device: c_int, out: *mut *mut c_void) -> *mut std::ffi::c_char;
    fn ddpm_cuda_graph_free(graph: *mut c_void);
    fn ddpm_cuda_graph_enter(graph: *mut c_void) -> *mut std::ffi::c_char;
    fn ddpm_cuda_graph_exit(graph: *mut c_void) -> *mut std::ffi::c_char;
    fn ddpm_cuda_graph_capture_begin(graph: *mut c_void) -> *mut std::ffi::c_char;
    fn ddpm_cuda_graph_capture_end(graph: *mut c_void) -> *mut std::ffi::c_char;
    fn ddpm_cuda_graph_replay(graph: *mut c_void) -> *mut std::ffi::c_char;
}

/// One recorded graph and the side stream it is recorded on.
struct CudaGraph(*mut c_void);

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: made by ddpm_cuda_graph_new, freed once.
        unsafe { ddpm_cuda_graph_free(self.0) }
    }
}

impl CudaGraph {
    fn new(device: Device) -> Result<Self> {
        let Device::Cuda(index) = device else {
            bail!(
                "CUDA graphs need a CUDA device, not {}",
                crate::device::name(device)
            );
        };
        let mut raw = std::ptr::null_mut();
        check(unsafe { ddpm_cuda_graph_new(index as c_int, &mut raw) })?;
        Ok(CudaGraph(raw))
    }

    /// Runs `f` with its kernels going to the graph's stream, ordered after the work queued
    /// before and before the work queued after.
    fn on_stream<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        check(unsafe { ddpm_cuda_graph_enter(self.0) })?;
        let result = crate::catch_panics(f);
        let exited = check(unsafe { ddpm_cuda_graph_exit(self.0) });
        let value = result?;
        exited.map(|()| value)
    }

    /// Records the kernels `f` launches without running them; `replay` runs them.
    fn capture<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.on_stream(|| {
            check(unsafe { ddpm_cuda_graph_capture_begin(self.0) })?;
            let result = crate::catch_panics(f);
            // Ended whatever happened, so that the stream leaves capture mode.
            let ended = check(unsafe { ddpm_cuda_graph_capture_end(self.0) });
            let value = result?;
            ended.map(|()| value)
        })
        .map_err(|e| {
            anyhow!("recording a CUDA graph failed (set train.cuda_graph = false, or --cuda-graph false, to train without): {e:#}")
        })
    }

    fn replay(&self) -> Result<()> {
        check(unsafe { ddpm_cuda_graph_replay(self.0) })
    }
}

/// A computation from input tensors to output tensors, run as a CUDA graph: eagerly (on the
/// graph's stream) for the first `warmup` calls, so that lazy initialisation and cuDNN's
/// algorithm search happen outside the graph; recorded on the next call; replayed from then
/// on. The computation must launch the same kernels on the same tensors every call and never
/// wait for the device; everything it reads besides its inputs (weights, optimizer state) must
/// keep its storage. Inputs of another shape than the recorded ones run eagerly.
pub struct GraphedComputation {
    graph: CudaGraph,
    warmup_left: usize,
    /// The recorded inputs and outputs: each call copies its inputs into the former and
    /// returns copies of the latter.
    recorded: Option<(Vec<Tensor>, Vec<Tensor>)>,
    capture_failed: bool,
}

impl GraphedComputation {
    pub fn new(device: Device, warmup: usize) -> Result<Self> {
        Ok(GraphedComputation {
            graph: CudaGraph::new(device)?,
            warmup_left: warmup,
            recorded: None,
            capture_failed: false,
        })
    }

    /// f(inputs), through the graph.
    pub fn run(
        &mut self,
        inputs: &[Tensor],
        f: impl FnOnce(&[Tensor]) -> Result<Vec<Tensor>>,
    ) -> Result<Vec<Tensor>> {
        if self.warmup_left > 0 {
            self.warmup_left -= 1;
            return self.graph.on_stream(|| f(inputs));
        }
        match &self.recorded {
            Some((recorded, _)) if !same_shapes(recorded, inputs) => f(inputs),
            Some((recorded, outputs)) => {
                for (dst, src) in recorded.iter().zip(inputs) {
                    let mut dst = dst.shallow_clone();
                    dst.copy_(src);
                }
                self.replay(outputs)
            }
            None if self.capture_failed => {
                bail!("an earlier CUDA graph recording failed; set train.cuda_graph = false (--cuda-graph false)")
            }
            None => {
                let recorded: Vec<Tensor> = inputs.iter().map(Tensor::copy).collect();
                // A failed capture can leave libtorch's CUDA state unusable: never retried.
                self.capture_failed = true;
                let outputs = self.graph.capture(|| f(&recorded))?;
                self.capture_failed = false;
                self.recorded = Some((recorded, outputs));
                let (_, outputs) = self.recorded.as_ref().expect("just recorded");
                self.replay(outputs)
            }
        }
    }

    fn replay(&self, outputs: &[Tensor]) -> Result<Vec<Tensor>> {
        self.graph.replay()?;
        // Copies, as the next replay overwrites the outputs.
        Ok(outputs.iter().map(Tensor::copy).collect())
    }
}

fn same_shapes(a: &[Tensor], b: &[Tensor]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(a, b)| a.size() == b.size() && a.kind() == b.kind())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_graph_needs_a_cuda_device() {
        let error = GraphedComputation::new(Device::Cpu, 1).err().unwrap();
        assert!(error.to_string().contains("need a CUDA device"), "{error}");
    }

    /// Needs a CUDA device. Dropout inside a recorded step must draw a new mask at each replay
    /// (libtorch's graph-safe random state), or a graphed model would train with one mask.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn random_draws_in_a_graph_change_from_replay_to_replay() {
        assert!(tch::Cuda::is_available(), "no CUDA device");
        let device = Device::Cuda(0);
        let ones = Tensor::ones([1 << 16], (tch::Kind::Float, device));
        let mut graphed = GraphedComputation::new(device, 1).unwrap();
        let masks: Vec<Tensor> = (0..4)
            .map(|_| {
                let out = graphed
                    .run(&[ones.shallow_clone()], |x| {
                        Ok(vec![x[0].dropout(0.5, true)])
                    })
                    .unwrap();
                out[0].ne(0.0).to_kind(tch::Kind::Float)
            })
            .collect();
        assert!(
            graphed.recorded.is_some(),
            "the computation was not recorded"
        );
        for (i, mask) in masks.iter().enumerate() {
            let kept = mask.mean(tch::Kind::Float).double_value(&[]);
            assert!((kept - 0.5).abs() < 0.02, "call {i} kept {kept}");
        }
        // Warm-up, recording (replayed once), then two replays: no two masks alike.
        for i in 0..masks.len() {
            for j in i + 1..masks.len() {
                let same = masks[i].eq_tensor(&masks[j]).to_kind(tch::Kind::Float);
                let agreement = same.mean(tch::Kind::Float).double_value(&[]);
                assert!(agreement < 0.6, "calls {i} and {j} agree on {agreement}");
            }
        }
    }
}
