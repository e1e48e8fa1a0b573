//! What a user watches: the progress display, `metrics.jsonl`, and sample images (grids and
//! folders of individual PNGs).
use std::fs;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

/// Images [N, C, H, W] in [−1, 1] → u8 [N, H, W, C] on the CPU.
fn to_u8_nhwc(images: &Tensor) -> Tensor {
    ((images.to_device(Device::Cpu).to_kind(Kind::Float) + 1.0) * 127.5).round().clamp(0.0, 255.0).to_kind(Kind::Uint8).permute([0, 2, 3, 1]).contiguous()
}

/// Grid geometry: `cols` images per row, `pad` pixels of border between and around them.
pub fn grid_layout(n: usize) -> (usize, usize) {
    let cols = (n as f64).sqrt().ceil().max(1.0) as usize;
    (cols, n.div_ceil(cols))
}

/// Lays images [N, C, H, W] in [−1, 1] out in a near-square grid with a 2-pixel dark border,
/// returned as an RGB image.
pub fn grid_image(images: &Tensor) -> image::RgbImage {
    const PAD: usize = 2;
    let (n, c, h, w) = images.size4().expect("NCHW images");
    let (n, h, w) = (n as usize, h as usize, w as usize);
    let (cols, rows) = grid_layout(n);
    let pixels = Vec::<u8>::try_from(to_u8_nhwc(images).flatten(0, -1)).expect("u8 pixels");
    let (gw, gh) = (cols * (w + PAD) + PAD, rows * (h + PAD) + PAD);
    let mut grid = image::RgbImage::from_pixel(gw as u32, gh as u32, image::Rgb([32, 32, 32]));
    for i in 0..n {
        let (ox, oy) = (PAD + (i % cols) * (w + PAD), PAD + (i / cols) * (h + PAD));
        for y in 0..h {
            for x in 0..w {
                let base = ((i * h + y) * w + x) * c as usize;
                let rgb = if c == 1 { [pixels[base]; 3] } else { [pixels[base], pixels[base + 1], pixels[base + 2]] };
                grid.put_pixel((ox + x) as u32, (oy + y) as u32, image::Rgb(rgb));
            }
        }
    }
    grid
}

/// Writes a grid PNG atomically (a viewer never sees half a file).
pub fn save_grid(images: &Tensor, path: &Path) -> Result<()> {
    let grid = grid_image(images);
    let mut bytes = Vec::new();
    grid.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    crate::checkpoint::write_atomic(path, &bytes)
}

/// Writes each image as `{prefix}{index:06}.png` into `dir` (what FID tools read).
pub fn save_individual(images: &Tensor, dir: &Path, first_index: usize) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (n, c, h, w) = images.size4().expect("NCHW images");
    let pixels = Vec::<u8>::try_from(to_u8_nhwc(images).flatten(0, -1)).expect("u8 pixels");
    let per = (c * h * w) as usize;
    for i in 0..n as usize {
        let data = pixels[i * per..(i + 1) * per].to_vec();
        let path = dir.join(format!("{:06}.png", first_index + i));
        let result = if c == 1 { image::GrayImage::from_raw(w as u32, h as u32, data).unwrap().save(&path) } else { image::RgbImage::from_raw(w as u32, h as u32, data).unwrap().save(&path) };
        result.with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize)]
pub struct MetricsRecord {
    pub step: u64,
    pub epoch: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub loss_scale: Option<f64>,
    pub skipped_steps: u64,
    pub images_per_second: f64,
    pub wall_seconds: f64,
}

/// Appends metrics lines and drives the progress display (a bar on a terminal, plain lines
/// otherwise).
pub struct Monitor {
    metrics: fs::File,
    bar: Option<ProgressBar>,
    started: Instant,
    smoothed_loss: Option<f64>,
}

impl Monitor {
    pub fn new(run_dir: &Path, start_step: u64, total_steps: u64) -> Result<Self> {
        let path = run_dir.join("metrics.jsonl");
        let metrics = fs::OpenOptions::new().create(true).append(true).open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total_steps);
            bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}").expect("valid template"));
            bar.set_position(start_step);
            bar.reset_eta();
            bar
        });
        Ok(Monitor { metrics, bar, started: Instant::now(), smoothed_loss: None })
    }

    pub fn seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn record(&mut self, record: &MetricsRecord) -> Result<()> {
        writeln!(self.metrics, "{}", serde_json::to_string(record)?).context("cannot append to metrics.jsonl")?;
        let smoothed = match self.smoothed_loss {
            Some(s) if record.loss.is_finite() => 0.7 * s + 0.3 * record.loss,
            _ => record.loss,
        };
        self.smoothed_loss = Some(smoothed);
        let mut text = format!("loss {smoothed:.4}  lr {:.2e}  grad {:.3}  {:.0} img/s", record.lr, record.grad_norm, record.images_per_second);
        if let Some(scale) = record.loss_scale {
            text += &format!("  scale {scale:.0}");
        }
        if record.skipped_steps > 0 {
            text += &format!("  skipped {}", record.skipped_steps);
        }
        match &self.bar {
            Some(bar) => {
                bar.set_position(record.step);
                bar.set_message(text);
            }
            None => eprintln!("step {:>8}  {text}", record.step),
        }
        Ok(())
    }

    /// A message that does not disturb the bar.
    pub fn note(&self, message: &str) {
        match &self.bar {
            Some(bar) => bar.println(message),
            None => eprintln!("{message}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_has_the_documented_layout() {
        // 5 images of 3×4 → 3 columns, 2 rows, 2-pixel borders.
        let images = Tensor::ones([5, 3, 3, 4], (Kind::Float, Device::Cpu));
        let g = grid_image(&images);
        assert_eq!((g.width(), g.height()), (3 * (4 + 2) + 2, 2 * (3 + 2) + 2));
        assert_eq!(g.get_pixel(2, 2).0, [255, 255, 255]);
        assert_eq!(g.get_pixel(0, 0).0, [32, 32, 32]);
        // The sixth cell is empty.
        assert_eq!(g.get_pixel(2 + 2 * 6, 2 + 5).0, [32, 32, 32]);
    }

    #[test]
    fn individual_pngs_round_trip_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let images = Tensor::from_slice(&[-1.0f32, 0.0, 1.0, 0.5]).view([1, 1, 2, 2]);
        save_individual(&images, dir.path(), 7).unwrap();
        let back = image::open(dir.path().join("000007.png")).unwrap().to_luma8();
        assert_eq!(back.as_raw(), &vec![0u8, 128, 255, 191]);
    }
}
