//! `ddpm bench`: images per second of the real training step (forward, loss, backward, clip,
//! AdamW, EMA, LR schedule) and of DDIM sampling, on synthetic data, warm-up excluded and the
//! device synchronised before the clock is read. Prints one machine-readable `RESULT` line.
use std::time::Instant;

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::config::{RunConfig, SampleConfig, SamplerKind};
use crate::model::parameter_count;
use crate::sampler;
use crate::train::Trainer;

/// One benchmark's figures.
#[derive(Debug)]
pub struct BenchResult {
    pub images_per_second: f64,
    pub ms_per_step: f64,
    pub final_loss: Option<f64>,
    /// Peak (allocated, reserved) GiB on CUDA.
    pub peak_memory_gib: Option<(f64, f64)>,
    /// On a CPU: the process's peak resident GiB from the network's creation on.
    pub host_peak_gib: Option<f64>,
    pub parameters: i64,
    /// The levers as they ran (`auto` resolved).
    pub cuda_graph: bool,
    pub fused_norm_silu: bool,
}

/// Times `steps` training steps on one fixed synthetic batch after `warmup` untimed ones. The
/// peak memory covers the whole run, warm-up and CUDA graph capture included, as the PyTorch
/// baseline's does.
pub fn train_step(
    config: &RunConfig,
    device: Device,
    warmup: usize,
    steps: usize,
) -> Result<BenchResult> {
    crate::device::reset_host_peak_memory();
    let mut trainer = Trainer::new(config, device)?;
    // Not sooner: libtorch refuses to reset the statistics of a device it has not used yet.
    crate::device::reset_peak_memory(device)?;
    let m = &config.model;
    tch::manual_seed(0);
    let x0 = Tensor::rand(m.batch_shape(config.train.batch), (Kind::Float, device)) * 2.0 - 1.0;
    for _ in 0..warmup {
        trainer.step(&x0, None)?.loss.double_value(&[]);
    }
    crate::device::synchronize(device);
    let started = Instant::now();
    let mut last = None;
    for _ in 0..steps {
        last = Some(trainer.step(&x0, None)?.loss);
    }
    let final_loss = last.map(|l| l.double_value(&[])); // waits for the queued work
    crate::device::synchronize(device);
    let seconds = started.elapsed().as_secs_f64();
    Ok(BenchResult {
        images_per_second: (config.train.batch * steps) as f64 / seconds,
        ms_per_step: seconds * 1000.0 / steps as f64,
        final_loss,
        peak_memory_gib: crate::device::peak_memory_gib(device)?,
        host_peak_gib: host_peak_gib(device),
        parameters: parameter_count(&trainer.vs),
        cuda_graph: trainer.uses_cuda_graph(),
        fused_norm_silu: trainer.uses_fused_norm_silu(),
    })
}

const GIB: f64 = (1u64 << 30) as f64;

fn host_peak_gib(device: Device) -> Option<f64> {
    (device == Device::Cpu)
        .then(crate::device::host_peak_memory)
        .flatten()
        .map(|bytes| bytes as f64 / GIB)
}

/// What `find_batch` tried, and what it found.
#[derive(Debug)]
pub struct BatchSearch {
    /// The largest batch that fit; None when even the first did not.
    pub largest: Option<usize>,
    /// The smallest batch that did not fit (tried, or on a CPU predicted); None when the
    /// search reached its ceiling.
    pub refused: Option<usize>,
    /// Each batch tried and its peak memory in GiB (None: it ran out of memory).
    pub tries: Vec<(usize, Option<f64>)>,
    /// The memory the batches had to fit in, GiB (infinite: a GPU's own).
    pub limit_gib: f64,
}

/// Finds the largest training batch that fits in `limit_gib` (default: the device's memory),
/// by trying: batches double from `start` until one does not fit, then the gap is halved
/// until it is within an eighth of the largest that fit, or `ceiling` is reached. On CUDA a
/// batch fits when two steps run without running out of memory and peak under the limit; on a
/// CPU, when a step's peak resident memory stays under it. A CPU batch whose peak, extrapolated
/// from the batches before, would pass the limit is not tried (the system would kill the
/// process) and counts as not fitting.
pub fn find_batch(
    config: &RunConfig,
    device: Device,
    start: usize,
    ceiling: usize,
    limit_gib: Option<f64>,
) -> Result<BatchSearch> {
    let limit_gib = match limit_gib {
        Some(limit) => limit,
        None => device_memory_gib(device)?,
    };
    let mut search = BatchSearch {
        largest: None,
        refused: None,
        tries: Vec::new(),
        limit_gib,
    };
    let mut batch = start.clamp(1, ceiling);
    loop {
        let fits = match predicted_gib(&search.tries, batch) {
            Some(predicted) if device == Device::Cpu && predicted > limit_gib => false,
            _ => {
                let peak = try_batch(config, device, batch)?;
                search.tries.push((batch, peak));
                peak.is_some_and(|p| p <= limit_gib)
            }
        };
        if fits {
            search.largest = Some(batch);
        } else {
            search.refused = Some(batch);
        }
        batch = match (search.largest, search.refused) {
            (Some(fit), None) if fit < ceiling => (fit * 2).min(ceiling),
            (Some(fit), Some(refused)) if refused - fit > (fit / 8).max(1) => (fit + refused) / 2,
            (None, Some(refused)) if refused > 1 => refused / 2,
            _ => return Ok(search),
        };
    }
}

/// The memory a batch has to fit in when no limit is given: on a GPU, all of it (running out
/// decides), on a CPU the memory resident now plus what the system has available.
fn device_memory_gib(device: Device) -> Result<f64> {
    match device {
        Device::Cuda(_) => Ok(f64::INFINITY),
        _ => {
            crate::device::reset_host_peak_memory();
            let resident = crate::device::host_peak_memory().unwrap_or(0);
            let available = crate::device::available_host_memory().ok_or_else(|| {
                anyhow::anyhow!("the available memory is unknown here: give --memory-limit")
            })?;
            Ok((resident + available) as f64 / GIB)
        }
    }
}

/// A batch's peak memory, extrapolated linearly from the two largest batches tried that ran
/// (from the one, through zero, when only one ran).
fn predicted_gib(tries: &[(usize, Option<f64>)], batch: usize) -> Option<f64> {
    let mut ran: Vec<(f64, f64)> = tries
        .iter()
        .filter_map(|&(b, peak)| Some((b as f64, peak?)))
        .collect();
    ran.sort_by(|a, b| a.0.total_cmp(&b.0));
    let batch = batch as f64;
    match ran.as_slice() {
        [] => None,
        [(b, peak)] => Some(peak * batch / b),
        [.., (b1, p1), (b2, p2)] => Some(p2 + (p2 - p1) / (b2 - b1) * (batch - b2)),
    }
}

/// The peak memory (GiB) of two training steps at `batch`, or None when they ran out of it.
fn try_batch(config: &RunConfig, device: Device, batch: usize) -> Result<Option<f64>> {
    let mut config = config.clone();
    config.train.batch = batch;
    config.train.grad_accum = 1;
    let run = || -> Result<()> {
        let mut trainer = Trainer::new(&config, device)?;
        let x0 = Tensor::zeros(config.model.batch_shape(batch), (Kind::Float, device));
        for _ in 0..2 {
            trainer.step(&x0, None)?.loss.double_value(&[]);
        }
        Ok(())
    };
    crate::device::reset_host_peak_memory();
    if device.is_cuda() {
        crate::device::reset_peak_memory(device)?;
    }
    // libtorch's ops panic on failure; an out-of-memory panic is an answer, not a crash.
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run));
    std::panic::set_hook(quiet);
    if device.is_cuda() {
        crate::ops::cuda_empty_cache()?;
    }
    let failure = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(format!("{error:#}")),
        Err(panic) => Some(
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default(),
        ),
    };
    match failure {
        Some(text) if text.contains("out of memory") => Ok(None),
        Some(text) => Err(anyhow::anyhow!("batch {batch}: {text}")),
        None => Ok(Some(match device {
            Device::Cuda(_) => {
                crate::device::peak_memory_gib(device)?.map_or(0.0, |(_, reserved)| reserved)
            }
            _ => crate::device::host_peak_memory().unwrap_or(0) as f64 / GIB,
        })),
    }
}

/// Times DDIM sampling of `num` images in batches of `batch` with `ddim_steps` steps.
pub fn sampling(
    config: &RunConfig,
    device: Device,
    num: usize,
    batch: usize,
    ddim_steps: usize,
) -> Result<BenchResult> {
    let trainer = Trainer::new(config, device)?;
    let denoiser = trainer.denoiser(true);
    let settings = SampleConfig {
        sampler: SamplerKind::Ddim,
        steps: ddim_steps,
        eta: 0.0,
        ..config.sample.clone()
    };
    let m = &config.model;
    let _ = sampler::sample(
        &denoiser,
        &SampleConfig {
            steps: 2,
            ..settings.clone()
        },
        m.batch_shape(batch.min(num)),
        None,
        0,
        device,
        batch,
        None,
        |_, _, _| {},
    )?;
    crate::device::synchronize(device);
    crate::device::reset_peak_memory(device)?;
    let started = Instant::now();
    let images = sampler::sample(
        &denoiser,
        &settings,
        m.batch_shape(num),
        None,
        0,
        device,
        batch,
        None,
        |_, _, _| {},
    )?;
    let _ = images.sum(Kind::Float).double_value(&[]);
    crate::device::synchronize(device);
    let seconds = started.elapsed().as_secs_f64();
    let batches = num.div_ceil(batch);
    Ok(BenchResult {
        images_per_second: num as f64 / seconds,
        ms_per_step: seconds * 1000.0 / (batches * ddim_steps) as f64,
        final_loss: None,
        peak_memory_gib: crate::device::peak_memory_gib(device)?,
        host_peak_gib: None,
        parameters: parameter_count(&trainer.vs),
        // Sampling runs eagerly.
        cuda_graph: false,
        fused_norm_silu: trainer.uses_fused_norm_silu(),
    })
}

/// What `bench data` measured over one epoch.
pub struct DataResult {
    pub description: String,
    pub images: usize,
    /// Listing, parsing and (when cached) decoding before the first batch.
    pub load_seconds: f64,
    /// Images/s from the start of loading to the end of the epoch, augmentation included.
    pub images_per_second: f64,
    /// The time the consumer spent waiting for batches, in all and after the first batch.
    pub wait_seconds: f64,
    pub wait_after_first_seconds: f64,
}

/// Times one epoch of what training does with its data: load the set, read batches through
/// the loader's workers, and (with `hflip` or `jitter`) convert them to [−1, 1] and augment
/// them on the CPU; then, when `step_seconds` is
/// positive, holds each batch that long as a device step would, which shows whether such a step
/// ever waits for data.
pub fn data(
    path: Option<&std::path::Path>,
    options: &crate::data::LoadOptions,
    loader: crate::data::LoaderOptions,
    hflip: bool,
    jitter: f64,
    step_seconds: f64,
) -> Result<DataResult> {
    let started = Instant::now();
    let dataset = std::sync::Arc::new(crate::data::load(path, options)?);
    let load_seconds = started.elapsed().as_secs_f64();
    let batches = dataset.len().div_ceil(loader.batch);
    let mut batches_of = crate::data::Loader::new(dataset.clone(), Default::default(), loader)?;
    let mut waits = Vec::with_capacity(batches);
    for _ in 0..batches {
        let waiting = Instant::now();
        let images = batches_of.next_batch()?.images;
        waits.push(waiting.elapsed().as_secs_f64());
        // Without augmentation the loader alone is timed: on a GPU the conversion runs there.
        if hflip || jitter > 0.0 {
            let _ = crate::data::augment(
                &crate::data::to_model_space(&images, Device::Cpu),
                hflip,
                jitter,
            );
        }
        std::thread::sleep(std::time::Duration::from_secs_f64(step_seconds));
    }
    let images = batches * loader.batch;
    Ok(DataResult {
        description: dataset.description.clone(),
        images,
        load_seconds,
        images_per_second: images as f64 / started.elapsed().as_secs_f64(),
        wait_seconds: waits.iter().sum(),
        wait_after_first_seconds: waits.iter().skip(1).sum(),
    })
}

/// The `RESULT …` line, in the same key=value form as the PyTorch baseline script.
pub fn result_line(what: &str, config: &RunConfig, device: Device, result: &BenchResult) -> String {
    let m = &config.model;
    let mut line = format!(
        "RESULT framework=ddpm bench={what} device={} precision={} batch={} size={} ch={} params={:.1}M img_per_s={:.1} ms_per_step={:.2}",
        device_name(device),
        config.train.precision.name(),
        config.train.batch,
        m.image_size,
        m.channels,
        result.parameters as f64 / 1e6,
        result.images_per_second,
        result.ms_per_step
    );
    if let Some(loss) = result.final_loss {
        line += &format!(" final_loss={loss:.5}");
    }
    if let Some((allocated, reserved)) = result.peak_memory_gib {
        line += &format!(" mem_peak_alloc_gib={allocated:.2} mem_peak_reserved_gib={reserved:.2}");
    }
    if let Some(peak) = result.host_peak_gib {
        line += &format!(" host_peak_gib={peak:.3}");
    }
    line += &format!(
        " channels_last={} cuda_graph={} fused_norm_silu={} activation_checkpointing={} threads={}",
        config.train.channels_last as u8,
        result.cuda_graph as u8,
        result.fused_norm_silu as u8,
        config.train.activation_checkpointing as u8,
        tch::get_num_threads()
    );
    line
}

/// The `RESULT` line of a batch search.
pub fn batch_search_line(config: &RunConfig, device: Device, search: &BatchSearch) -> String {
    let m = &config.model;
    let show = |b: Option<usize>| b.map_or("none".into(), |b| b.to_string());
    let tries: Vec<String> = search
        .tries
        .iter()
        .map(|(b, peak)| match peak {
            Some(gib) => format!("{b}:{gib:.3}"),
            None => format!("{b}:oom"),
        })
        .collect();
    let limit = match search.limit_gib.is_finite() {
        true => format!("{:.3}", search.limit_gib),
        false => "device".into(),
    };
    format!(
        "RESULT framework=ddpm bench=find-batch device={} precision={} size={} ch={} activation_checkpointing={} limit_gib={limit} largest_batch={} refused_batch={} tries={}",
        device_name(device),
        config.train.precision.name(),
        m.image_size,
        m.channels,
        config.train.activation_checkpointing as u8,
        show(search.largest),
        show(search.refused),
        tries.join(","),
    )
}

fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ImageSize;

    #[test]
    fn the_benchmark_times_the_real_training_step_and_its_figures_agree() {
        let _rng = crate::rng::exclusive();
        let mut c = RunConfig::preset("tiny").unwrap();
        c.model.channels = 8;
        c.model.image_size = ImageSize::Square(8);
        c.model.channel_mult = vec![1, 2];
        c.train.batch = 4;
        let r = train_step(&c, Device::Cpu, 1, 2).unwrap();
        // The loss after 1 + 2 steps on the fixed batch is a trainer's after the same steps.
        let mut trainer = Trainer::new(&c, Device::Cpu).unwrap();
        tch::manual_seed(0);
        let x0 = Tensor::rand(c.model.batch_shape(4), (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        let losses: Vec<f64> = (0..3)
            .map(|_| trainer.step(&x0, None).unwrap().loss.double_value(&[]))
            .collect();
        assert_eq!(r.final_loss, Some(losses[2]));
        assert_eq!(r.parameters, parameter_count(&trainer.vs));
        // Images per second and milliseconds per step describe the same timing.
        let implied = 4.0 * 1000.0 / r.ms_per_step;
        assert!(
            (r.images_per_second - implied).abs() < 1e-6 * implied,
            "{r:?}"
        );
        let line = result_line("train", &c, Device::Cpu, &r);
        assert!(
            line.starts_with(
                "RESULT framework=ddpm bench=train device=cpu precision=f32 batch=4 size=8"
            ),
            "{line}"
        );
        assert!(
            line.contains(&format!(" img_per_s={:.1} ", r.images_per_second))
                && line.contains(&format!(" final_loss={:.5} ", losses[2])),
            "{line}"
        );
        // 3 images in batches of 2 (2 batches) of 2 DDIM steps: 4 timed steps.
        let s = sampling(&c, Device::Cpu, 3, 2, 2).unwrap();
        let implied = 3.0 * 1000.0 / (4.0 * s.ms_per_step);
        assert!(
            (s.images_per_second - implied).abs() < 1e-6 * implied,
            "{s:?}"
        );
    }
}
