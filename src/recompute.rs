//! Activation checkpointing (`train.activation_checkpointing`): a block's forward pass keeps
//! only its inputs, and backward runs the block again to differentiate it, trading a second
//! forward pass per block for the memory of its intermediate activations. The autograd node
//! is C++ (`csrc/recompute.cpp`); the block is a Rust closure it calls back.
//!
//! The gradients are bit-identical to those of the plain graph: the recomputation runs the same
//! kernels on the same inputs, replays the forward pass's random state (dropout) and autocast,
//! and a tensor the block reads twice (a residual block's input: the branch and the skip) is
//! passed as two arguments, so that autograd sums its gradients in the same order as without
//! checkpointing.
use std::ffi::{c_char, c_int, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::Tensor;

use crate::ops::{check, ptrs, CTensor};

/// A block: its output from its arguments. Shared ownership (`Arc`) of the layers lets the
/// autograd node outlive the forward call that made it.
pub type Block = Box<dyn Fn(&[Tensor]) -> Tensor>;

type BlockCall =
    unsafe extern "C" fn(*mut c_void, *const CTensor, usize, *mut CTensor) -> *mut c_char;
type BlockDrop = unsafe extern "C" fn(*mut c_void);

extern "C" {
    fn ddpm_recomputed(
        call: BlockCall,
        data: *mut c_void,
        drop: BlockDrop,
        args: *const CTensor,
        n_args: usize,
        params: *const CTensor,
        n_params: usize,
        random: c_int,
        out: *mut CTensor,
    ) -> *mut c_char;
    fn strdup(text: *const c_char) -> *mut c_char;
}

/// Called by the node, in the forward pass and again in backward; a panic becomes an error
/// that libtorch raises from backward.
unsafe extern "C" fn call_block(
    data: *mut c_void,
    args: *const CTensor,
    n: usize,
    out: *mut CTensor,
) -> *mut c_char {
    // SAFETY: `data` is the `Box<Block>` that `recomputed` leaked, alive until `drop_block`;
    // each argument is a heap at::Tensor handed over to us.
    let block = unsafe { &*(data as *const Block) };
    let args: Vec<Tensor> = (0..n)
        .map(|i| unsafe { Tensor::from_ptr(*args.add(i) as *mut _) })
        .collect();
    match catch_unwind(AssertUnwindSafe(|| block(&args))) {
        Ok(mut output) => {
            // SAFETY: the node takes over this heap at::Tensor.
            unsafe { *out = output.as_mut_ptr() as CTensor };
            std::mem::forget(output);
            std::ptr::null_mut()
        }
        Err(panic) => {
            let text = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            let text = CString::new(text.replace('\0', " ")).unwrap_or_default();
            // SAFETY: the binding frees the copy with free().
            unsafe { strdup(text.as_ptr()) }
        }
    }
}

unsafe extern "C" fn drop_block(data: *mut c_void) {
    // SAFETY: called once, by the node that owns the leaked box.
    drop(unsafe { Box::from_raw(data as *mut Block) });
}

/// `block(args)`, with its activations recomputed in backward instead of kept. `params` are
/// the parameters the block reads (their gradients flow through the node); with `random`, the
/// recomputation replays the forward pass's random state (dropout in training).
pub fn recomputed(args: &[Tensor], params: &[Tensor], random: bool, block: Block) -> Tensor {
    let data = Box::into_raw(Box::new(block)) as *mut c_void;
    let mut out: CTensor = std::ptr::null_mut();
    let (args, params) = (ptrs(args), ptrs(params));
    // SAFETY: the binding takes over `data` and drops it through `drop_block`, even on error.
    check(unsafe {
        ddpm_recomputed(
            call_block,
            data,
            drop_block,
            args.as_ptr(),
            args.len(),
            params.as_ptr(),
            params.len(),
            random as c_int,
            &mut out,
        )
    })
    .unwrap_or_else(|e| panic!("activation checkpointing: {e:#}"));
    // SAFETY: on success the binding hands over a heap-allocated at::Tensor.
    unsafe { Tensor::from_ptr(out as *mut _) }
}
