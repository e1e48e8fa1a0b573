//! ddpm: train, sample and evaluate DDPM image diffusion models on libtorch.
//!
//! One module per concept; `train` sits on top and nothing below it knows about it.
pub mod bench;
pub mod checkpoint;
pub mod commands;
pub mod config;
pub mod cuda_graph;
pub mod data;
pub mod device;
pub mod distributed;
pub mod eval;
pub mod interop;
pub mod model;
pub mod monitor;
pub mod objective;
pub mod ops;
pub mod rng;
pub mod sampler;
pub mod schedule;
pub mod train;
