//! What a user watches: the progress display, `metrics.jsonl`, and sample images (grids and
//! folders of individual PNGs).
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use serde::Serialize;
use tch::Tensor;

/// Images [N, C, H, W] in [−1, 1] → u8 [N, H, W, C] on the CPU.
fn to_u8_nhwc(images: &Tensor) -> Tensor {
    crate::data::from_model_space(images)
        .permute([0, 2, 3, 1])
        .contiguous()
}

/// Grid geometry: `cols` images per row, `pad` pixels of border between and around them.
pub fn grid_layout(n: usize) -> (usize, usize) {
    let cols = (n as f64).sqrt().ceil().max(1.0) as usize;
    (cols, n.div_ceil(cols))
}

/// Lays images [N, C, H, W] in [−1, 1] out in a near-square grid with a 2-pixel dark border,
/// returned as an RGB image.
pub fn grid_image(images: &Tensor) -> image::RgbImage {
    let (cols, _) = grid_layout(images.size()[0] as usize);
    grid_with_columns(images, cols)
}

/// A grid of images [N, C, H, W] in [−1, 1]: one row per class where they have classes [N].
pub fn sample_grid(
    images: &Tensor,
    classes: Option<&Tensor>,
    names: &[String],
) -> Result<image::RgbImage> {
    match classes {
        Some(classes) => class_grid(images, classes, names),
        None => Ok(grid_image(images)),
    }
}

/// `labels.csv` beside images written by `save_individual`: file, class id, class name.
pub fn save_class_list(classes: &Tensor, names: &[String], path: &Path) -> Result<()> {
    let quoted = |name: &str| match name.contains([',', '"', '\n']) {
        true => format!("\"{}\"", name.replace('"', "\"\"")),
        false => name.to_string(),
    };
    let mut csv = String::from("file,class_id,class_name\n");
    for (i, id) in Vec::<i64>::try_from(classes)?.into_iter().enumerate() {
        let name = names.get(id as usize).map_or(String::new(), |n| quoted(n));
        csv.push_str(&format!("{i:06}.png,{id},{name}\n"));
    }
    crate::checkpoint::write_atomic(path, csv.as_bytes())
}

/// Images [N, C, H, W] in [−1, 1] of the classes `classes` [N] (each class's images together)
/// in a grid of one row per class, the class's name at the left of its row.
pub fn class_grid(images: &Tensor, classes: &Tensor, names: &[String]) -> Result<image::RgbImage> {
    const GAP: u32 = 6;
    let ids = Vec::<i64>::try_from(classes.to_device(tch::Device::Cpu))?;
    let mut rows: Vec<(i64, Vec<i64>)> = Vec::new();
    for (i, &id) in ids.iter().enumerate() {
        match rows.last_mut() {
            Some((last, members)) if *last == id => members.push(i as i64),
            _ => rows.push((id, vec![i as i64])),
        }
    }
    let cols = rows.iter().map(|(_, m)| m.len()).max().unwrap_or(1);
    let row_images: Vec<image::RgbImage> = rows
        .iter()
        .map(|(_, members)| {
            grid_with_columns(&images.index_select(0, &Tensor::from_slice(members)), cols)
        })
        .collect();
    let name_of = |id: i64| {
        names
            .get(id as usize)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    };
    ensure_font();
    let row_height = row_images[0].height();
    let size = (row_height as f64 * 0.45).clamp(9.0, 15.0);
    let font = ("sans-serif", size).into_font();
    let mut label_width = 0;
    for (id, _) in &rows {
        let (w, _) = font
            .box_size(&name_of(*id))
            .map_err(|e| anyhow!("measuring a label: {e}"))?;
        label_width = label_width.max(w + GAP);
    }
    let width = label_width + row_images.iter().map(|r| r.width()).max().unwrap_or(0);
    let height: u32 = row_images.iter().map(|r| r.height()).sum();
    let mut buffer = vec![32u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (width, height)).into_drawing_area();
        let style = font.color(&WHITE);
        for (i, (id, _)) in rows.iter().enumerate() {
            let y = i as u32 * row_height + row_height / 2;
            let text = Text::new(
                name_of(*id),
                (GAP as i32 / 2, y as i32 - size as i32 / 2),
                style.clone(),
            );
            root.draw(&text)
                .map_err(|e| anyhow!("drawing a label: {e}"))?;
        }
        root.present()
            .map_err(|e| anyhow!("drawing a label: {e}"))?;
    }
    let mut out =
        image::RgbImage::from_raw(width, height, buffer).expect("buffer of the right size");
    for (i, row) in row_images.iter().enumerate() {
        image::imageops::replace(
            &mut out,
            row,
            label_width as i64,
            (i as u32 * row_height) as i64,
        );
    }
    Ok(out)
}

/// `grid_image` with `cols` images per row.
pub fn grid_with_columns(images: &Tensor, cols: usize) -> image::RgbImage {
    const PAD: usize = 2;
    let (n, c, h, w) = images.size4().expect("NCHW images");
    let (n, h, w) = (n as usize, h as usize, w as usize);
    let rows = n.div_ceil(cols);
    let pixels = Vec::<u8>::try_from(to_u8_nhwc(images).flatten(0, -1)).expect("u8 pixels");
    let (gw, gh) = (cols * (w + PAD) + PAD, rows * (h + PAD) + PAD);
    let mut grid = image::RgbImage::from_pixel(gw as u32, gh as u32, image::Rgb([32, 32, 32]));
    for i in 0..n {
        let (ox, oy) = (PAD + (i % cols) * (w + PAD), PAD + (i / cols) * (h + PAD));
        for y in 0..h {
            for x in 0..w {
                let base = ((i * h + y) * w + x) * c as usize;
                let rgb = if c == 1 {
                    [pixels[base]; 3]
                } else {
                    [pixels[base], pixels[base + 1], pixels[base + 2]]
                };
                grid.put_pixel((ox + x) as u32, (oy + y) as u32, image::Rgb(rgb));
            }
        }
    }
    grid
}

/// Writes a PNG atomically (a viewer never sees half a file).
pub fn save_png(image: &image::RgbImage, path: &Path) -> Result<()> {
    let png = encode_png(
        image.as_raw(),
        image.width(),
        image.height(),
        image::ExtendedColorType::Rgb8,
    )?;
    crate::checkpoint::write_atomic(path, &png)
}

/// Writes each image as `{prefix}{index:06}.png` into `dir` (what FID tools read).
pub fn save_individual(images: &Tensor, dir: &Path, first_index: usize) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (n, c, h, w) = images.size4().expect("NCHW images");
    let pixels = Vec::<u8>::try_from(to_u8_nhwc(images).flatten(0, -1)).expect("u8 pixels");
    let per = (c * h * w) as usize;
    let colour = match c {
        1 => image::ExtendedColorType::L8,
        _ => image::ExtendedColorType::Rgb8,
    };
    for i in 0..n as usize {
        let path = dir.join(format!("{:06}.png", first_index + i));
        let png = encode_png(&pixels[i * per..(i + 1) * per], w as u32, h as u32, colour)?;
        // Encoded in memory and written in one call, so that a full disk is an error here (an
        // encoder writing through a buffered file loses the last write's error when it drops).
        if let Err(e) = fs::write(&path, png) {
            let _ = fs::remove_file(&path);
            bail!("cannot write {}: {e}", path.display());
        }
    }
    Ok(())
}

static FONT: &[u8] = include_bytes!("../data/fonts/DejaVuSans.ttf");

/// Registers the bundled font (DejaVu Sans) for labels, once.
fn ensure_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .unwrap_or_else(|_| panic!("the bundled font is valid"));
    });
}

fn encode_png(
    pixels: &[u8],
    width: u32,
    height: u32,
    colour: image::ExtendedColorType,
) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    image::write_buffer_with_format(
        &mut std::io::Cursor::new(&mut bytes),
        pixels,
        width,
        height,
        colour,
        image::ImageFormat::Png,
    )?;
    Ok(bytes)
}

/// The EMA and raw grids side by side under a label naming the step; a grid narrower than its
/// label gets a column as wide as the label.
pub fn labelled_pair(
    ema: &image::RgbImage,
    raw: &image::RgbImage,
    step: u64,
) -> Result<image::RgbImage> {
    const LABEL: u32 = 22;
    const GAP: u32 = 8;
    ensure_font();
    let font = ("sans-serif", 15).into_font();
    let labels = [format!("step {step} · EMA"), "raw".to_string()];
    let mut columns = [ema.width(), raw.width()];
    for (column, label) in columns.iter_mut().zip(&labels) {
        let (text_width, _) = font
            .box_size(label)
            .map_err(|e| anyhow!("measuring a label: {e}"))?;
        *column = (*column).max(text_width + GAP);
    }
    let raw_x = columns[0] + GAP;
    let (w, h) = (raw_x + columns[1], LABEL + ema.height().max(raw.height()));
    let mut buffer = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (w, h)).into_drawing_area();
        let style = font.color(&BLACK);
        for (label, x) in labels.into_iter().zip([4, raw_x as i32 + 4]) {
            root.draw(&Text::new(label, (x, 3), style.clone()))
                .map_err(|e| anyhow!("drawing a label: {e}"))?;
        }
        root.present()
            .map_err(|e| anyhow!("drawing a label: {e}"))?;
    }
    let mut out = image::RgbImage::from_raw(w, h, buffer).expect("buffer of the right size");
    image::imageops::replace(&mut out, ema, 0, LABEL as i64);
    image::imageops::replace(&mut out, raw, raw_x as i64, LABEL as i64);
    Ok(out)
}

/// Writes the loss curve (log scale) of (step, loss) points as a PNG.
pub fn save_loss_plot(points: &[(u64, f64)], path: &Path) -> Result<()> {
    let points: Vec<(u64, f64)> = points
        .iter()
        .copied()
        .filter(|(_, l)| l.is_finite() && *l > 0.0)
        .collect();
    if points.is_empty() {
        return Ok(());
    }
    let (w, h) = (720u32, 400u32);
    let mut buffer = vec![255u8; (w * h * 3) as usize];
    {
        ensure_font();
        let root = BitMapBackend::with_buffer(&mut buffer, (w, h)).into_drawing_area();
        let last = points.last().unwrap().0.max(1);
        let (lo, hi) = points
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), (_, l)| {
                (lo.min(*l), hi.max(*l))
            });
        let draw = || -> std::result::Result<(), Box<dyn std::error::Error + '_>> {
            let mut chart = ChartBuilder::on(&root)
                .caption("training loss", ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(60)
                .build_cartesian_2d(0u64..last, (lo * 0.9..hi * 1.1).log_scale())?;
            chart
                .configure_mesh()
                .x_desc("step")
                .y_desc("loss")
                .y_labels(8)
                .y_label_formatter(&|v| axis_number(*v))
                .draw()?;
            chart.draw_series(LineSeries::new(points.iter().copied(), &BLUE))?;
            root.present()?;
            Ok(())
        };
        draw().map_err(|e| anyhow!("drawing the loss plot: {e}"))?;
    }
    save_png(
        &image::RgbImage::from_raw(w, h, buffer).expect("buffer of the right size"),
        path,
    )
}

/// A loss-axis label: three significant digits at most, without float noise.
fn axis_number(v: f64) -> String {
    if v == 0.0 || !(1e-3..1e4).contains(&v.abs()) {
        return format!("{v:.1e}");
    }
    let decimals = (2 - v.abs().log10().floor() as i32).max(0) as usize;
    let text = format!("{v:.decimals$}");
    match text.contains('.') {
        true => text.trim_end_matches('0').trim_end_matches('.').to_string(),
        false => text,
    }
}

/// Reads (step, loss) from a `metrics.jsonl` (NaN where the loss was not finite); a step logged
/// twice (a resumed run replaying it) keeps its last value. Lines cut short by a crash are
/// ignored.
pub fn read_loss_history(metrics: &Path) -> Vec<(u64, f64)> {
    let text = fs::read_to_string(metrics).unwrap_or_default();
    let mut by_step = std::collections::BTreeMap::new();
    for line in text.lines() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            // A non-finite loss is written as null.
            let loss = match &v["loss"] {
                serde_json::Value::Null if v.get("loss").is_some() => Some(f64::NAN),
                loss => loss.as_f64(),
            };
            if let (Some(step), Some(loss)) = (v["step"].as_u64(), loss) {
                by_step.insert(step, loss);
            }
        }
    }
    by_step.into_iter().collect()
}

/// Writes frames (all the same size) as a looping animated GIF.
pub fn save_animation(frames: &[image::RgbImage], path: &Path, frame_ms: u32) -> Result<()> {
    use image::codecs::gif::{GifEncoder, Repeat};
    let mut bytes = Vec::new();
    {
        let mut encoder = GifEncoder::new_with_speed(&mut bytes, 10);
        encoder.set_repeat(Repeat::Infinite)?;
        for frame in frames {
            let rgba = image::DynamicImage::ImageRgb8(frame.clone()).to_rgba8();
            encoder.encode_frame(image::Frame::from_parts(
                rgba,
                0,
                0,
                image::Delay::from_numer_denom_ms(frame_ms, 1),
            ))?;
        }
    }
    crate::checkpoint::write_atomic(path, &bytes)
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A static page that opens from disk: configuration, loss curve, latest samples, the training
/// animation and FID over time (from `metrics.jsonl` records that carry `fid`).
pub fn write_report(
    run_dir: &Path,
    config: &crate::config::RunConfig,
    latest: Option<&PathBuf>,
) -> Result<()> {
    let text = fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap_or_default();
    let records: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    // The newest training record (an FID record has no loss).
    let last = records.iter().rev().find(|r| r.get("loss").is_some());
    let fid_rows: String = records
        .iter()
        .filter(|r| r["fid"].is_number())
        .map(|r| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{:.3}</td></tr>",
                r["step"],
                r["fid_images"],
                r["fid"].as_f64().unwrap_or(f64::NAN)
            )
        })
        .collect();
    let summary = last.map_or("no metrics yet".to_string(), |r| {
        format!(
            "step {} of {} · loss {:.4} · lr {:.2e} · {:.0} img/s · {:.0} s of training by then",
            r["step"],
            config.train.steps,
            r["loss"].as_f64().unwrap_or(f64::NAN),
            r["lr"].as_f64().unwrap_or(f64::NAN),
            r["images_per_second"].as_f64().unwrap_or(0.0),
            r["wall_seconds"].as_f64().unwrap_or(0.0)
        )
    });
    let latest = latest
        .and_then(|p| p.file_name())
        .map(|n| format!("samples/{}", n.to_string_lossy()))
        .unwrap_or_default();
    let fid = if fid_rows.is_empty() {
        "<p>No FID measured yet.</p>".to_string()
    } else {
        format!("<table><tr><th>step</th><th>images</th><th>FID</th></tr>{fid_rows}</table>")
    };
    let watched = watch_table(run_dir) + &nearest_section(run_dir) + &sweep_section(run_dir);
    // Written at step 0: a run resumed into a new directory has none.
    let data = match run_dir.join("samples").join("data.png").is_file() {
        true => "\n<h2>What the model learns from (after augmentation)</h2><img src=\"samples/data.png\" alt=\"training images\">",
        false => "",
    };
    let page = format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>ddpm run: {preset}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}img{{max-width:100%;image-rendering:pixelated}}pre{{background:#f4f4f4;padding:1em;overflow:auto}}td,th{{padding:0 1em;text-align:right}}</style></head>
<body><h1>ddpm run: {preset}</h1>
<p>{summary}</p>
<h2>Loss</h2><img src="loss.png" alt="loss curve">
<h2>Latest samples (EMA | raw)</h2><img src="{latest}" alt="latest samples">
<h2>Training so far</h2><img src="samples/training.gif" alt="sample grids over training">{data}
<h2>FID</h2>{fid}{watched}
<h2>Configuration</h2><pre>{config}</pre>
</body></html>
"#,
        preset = html_escape(&config.preset),
        config = html_escape(&config.to_toml()),
    );
    crate::checkpoint::write_atomic(&run_dir.join("report.html"), page.as_bytes())
}

/// The measurements of `ddpm watch` (`eval.jsonl`) as a table, oldest first; empty without any.
fn watch_table(run_dir: &Path) -> String {
    let text = fs::read_to_string(run_dir.join("eval.jsonl")).unwrap_or_default();
    let mut records: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    if records.is_empty() {
        return String::new();
    }
    records.sort_by_key(|r| r["step"].as_u64());
    let number = |r: &serde_json::Value, key: &str| r[key].as_f64().unwrap_or(f64::NAN);
    let rows: String = records
        .iter()
        .map(|r| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td></tr>",
                r["step"],
                r["images"],
                number(r, "fid"),
                number(r, "precision"),
                number(r, "recall")
            )
        })
        .collect();
    format!("\n<h2>Measured beside training (ddpm watch)</h2><table><tr><th>step</th><th>images</th><th>FID</th><th>precision</th><th>recall</th></tr>{rows}</table>")
}

/// The memorisation check of `ddpm nearest` (`nearest/`), when there is one.
fn nearest_section(run_dir: &Path) -> String {
    let text = fs::read_to_string(run_dir.join("nearest").join("nearest.json")).unwrap_or_default();
    let Ok(summary) = serde_json::from_str::<serde_json::Value>(&text) else {
        return String::new();
    };
    let flagged = summary["flagged"].as_array().map_or(0, Vec::len);
    format!(
        "\n<h2>Memorisation check (ddpm nearest)</h2><p>{flagged} of {} generated images are nearer a training image than any of {} held-out images comes. Each row: a generated image, its nearest training image in Inception features, and in pixels (nearest first).</p><img src=\"nearest/nearest.png\" alt=\"generated images beside their nearest training images\">",
        summary["generated"], summary["held_out"]
    )
}

/// The post-hoc EMA sweep of `ddpm ema --sweep` (`posthoc-ema/sweep.json`), when there is one.
fn sweep_section(run_dir: &Path) -> String {
    let text =
        fs::read_to_string(run_dir.join("posthoc-ema").join("sweep.json")).unwrap_or_default();
    let Ok(sweep) = serde_json::from_str::<crate::posthoc_ema::Sweep>(&text) else {
        return String::new();
    };
    let rows: String = sweep
        .points
        .iter()
        .map(|p| format!("<tr><td>{:.3}</td><td>{:.2}</td></tr>", p.sigma_rel, p.fid))
        .collect();
    let classic = sweep.classic.as_ref().map_or(String::new(), |c| {
        format!(
            "<tr><td>classic EMA, decay {}</td><td>{:.2}</td></tr>",
            c.decay, c.fid
        )
    });
    format!(
        "\n<h2>Post-hoc EMA (ddpm ema --sweep)</h2><p>FID@{} of the EMA of each width σ_rel at step {}, made after training from the snapshots.</p><table><tr><th>σ_rel</th><th>FID</th></tr>{rows}{classic}</table><img src=\"posthoc-ema/sweep.png\" alt=\"FID against the EMA width\">",
        count_label(sweep.images),
        sweep.step
    )
}

/// FID against σ_rel (log scale) of a post-hoc EMA sweep, the classic EMA's FID as a dashed
/// line, as a PNG.
pub fn save_sweep_plot(sweep: &crate::posthoc_ema::Sweep, path: &Path) -> Result<()> {
    let points: Vec<(f64, f64)> = sweep.points.iter().map(|p| (p.sigma_rel, p.fid)).collect();
    if points.is_empty() {
        return Ok(());
    }
    let (w, h) = (720u32, 400u32);
    let mut buffer = vec![255u8; (w * h * 3) as usize];
    {
        ensure_font();
        let root = BitMapBackend::with_buffer(&mut buffer, (w, h)).into_drawing_area();
        let fids = points
            .iter()
            .map(|p| p.1)
            .chain(sweep.classic.as_ref().map(|c| c.fid));
        let (lo, hi) = fids.fold((f64::MAX, f64::MIN), |(lo, hi), f| (lo.min(f), hi.max(f)));
        let (left, right) = (points[0].0, points[points.len() - 1].0);
        let margin = (hi - lo).max(0.1) * 0.1;
        let draw = || -> std::result::Result<(), Box<dyn std::error::Error + '_>> {
            let mut chart = ChartBuilder::on(&root)
                .caption(
                    format!(
                        "post-hoc EMA at step {}: FID@{}",
                        sweep.step,
                        count_label(sweep.images)
                    ),
                    ("sans-serif", 18),
                )
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(60)
                .build_cartesian_2d(
                    (left * 0.9..right * 1.1).log_scale(),
                    lo - margin..hi + margin,
                )?;
            chart
                .configure_mesh()
                .x_desc("σ_rel")
                .y_desc("FID")
                .x_label_formatter(&|v| axis_number(*v))
                .draw()?;
            chart
                .draw_series(LineSeries::new(points.iter().copied(), &BLUE))?
                .label("post-hoc EMA")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, BLUE.filled())))?;
            if let Some(classic) = &sweep.classic {
                let dashes = DashedLineSeries::new(
                    [(left * 0.9, classic.fid), (right * 1.1, classic.fid)],
                    6,
                    4,
                    RED.into(),
                );
                chart
                    .draw_series(dashes)?
                    .label(format!("classic EMA, decay {}", classic.decay))
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE)
                .border_style(BLACK)
                .draw()?;
            root.present()?;
            Ok(())
        };
        draw().map_err(|e| anyhow!("drawing the sweep plot: {e}"))?;
    }
    save_png(
        &image::RgbImage::from_raw(w, h, buffer).expect("buffer of the right size"),
        path,
    )
}

/// "1 image", "64 images".
pub fn images(n: usize) -> String {
    match n {
        1 => "1 image".into(),
        n => format!("{n} images"),
    }
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize)]
pub struct MetricsRecord {
    pub step: u64,
    pub epoch: u64,
    /// The training loss (weighted as configured) of the last step.
    pub loss: f64,
    /// Mean unweighted squared error over the interval, per quarter of the t range (low t first).
    pub loss_by_quarter: [Option<f64>; 4],
    pub lr: f64,
    /// Global gradient norm before clipping, last step.
    pub grad_norm: f64,
    pub loss_scale: Option<f64>,
    pub skipped_steps: u64,
    pub images_per_second: f64,
    /// Seconds of the interval spent waiting for data.
    pub data_wait_seconds: f64,
    /// Peak memory reserved on the device since the last record, GiB (CUDA only).
    pub device_memory_gib: Option<f64>,
    pub wall_seconds: f64,
}

/// "1", "1k", "10k", "50k": the N of FID@N.
pub fn count_label(n: usize) -> String {
    if n > 0 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

/// The `tracing` target of progress events, which a front end shows as bars (or as lines in a
/// log) and may ignore; the library prints nothing itself.
pub const PROGRESS: &str = "ddpm::progress";

/// How far long work over images is (sampling, Inception features), as progress events: `kind`
/// "images" with `what`, `done` and `total`, then "images_done" however the work ends (done,
/// interrupted or failed).
pub struct ImageProgress {
    what: String,
    total: usize,
}

impl ImageProgress {
    /// `what` names the work, e.g. "sampling" or "real: Inception features".
    pub fn new(what: &str, total: usize) -> Self {
        let progress = ImageProgress {
            what: what.to_string(),
            total,
        };
        progress.set(0);
        progress
    }

    /// `done` of the images are finished.
    pub fn set(&self, done: usize) {
        let (what, total) = (self.what.as_str(), self.total);
        tracing::info!(target: PROGRESS, kind = "images", what, done = done.min(total), total);
    }
}

impl Drop for ImageProgress {
    fn drop(&mut self) {
        tracing::info!(target: PROGRESS, kind = "images_done", what = self.what.as_str());
    }
}

/// The training run as a front end shows it: progress events (`kind` "steps_start", "step",
/// "record" with the console's line, "steps_done"), the console's smoothed loss (which goes on
/// across a resume) and the run's wall clock.
pub struct Monitor {
    /// Ranks other than 0 show nothing.
    silent: bool,
    started: Instant,
    /// Wall time of the run before this process took it up.
    earlier_seconds: f64,
    smoothed_loss: Option<f64>,
}

/// The console's loss: an exponential average of the logged losses (a non-finite one shows
/// as it is, and the average starts again after it).
fn smooth(previous: Option<f64>, loss: f64) -> f64 {
    match previous {
        Some(s) if s.is_finite() && loss.is_finite() => 0.7 * s + 0.3 * loss,
        _ => loss,
    }
}

fn smoothed(losses: &[(u64, f64)]) -> Option<f64> {
    losses
        .iter()
        .fold(None, |smoothed, &(_, loss)| Some(smooth(smoothed, loss)))
}

impl Monitor {
    /// Starts at `step` of `total` steps; `earlier_seconds` and `losses` are the run's history
    /// before it.
    pub fn new(
        step: u64,
        total: u64,
        earlier_seconds: f64,
        losses: &[(u64, f64)],
        silent: bool,
    ) -> Self {
        if !silent {
            tracing::info!(target: PROGRESS, kind = "steps_start", step, total);
        }
        Monitor {
            silent,
            started: Instant::now(),
            earlier_seconds,
            smoothed_loss: smoothed(losses),
        }
    }

    /// Goes back to `step` after a rollback, with the history kept up to it; the clock goes on.
    pub fn rewind(&mut self, step: u64, losses: &[(u64, f64)]) {
        self.smoothed_loss = smoothed(losses);
        self.step_done(step);
    }

    /// The console's smoothed loss.
    pub fn smoothed_loss(&self) -> Option<f64> {
        self.smoothed_loss
    }

    /// Wall time of the run, including the time before a resume.
    pub fn seconds(&self) -> f64 {
        self.earlier_seconds + self.session_seconds()
    }

    /// Wall time since this monitor started.
    pub fn session_seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Shows a metrics record: smoothed loss, LR, grad norm, img/s (and loss scale, skips).
    pub fn show(&mut self, record: &MetricsRecord) {
        let smoothed = smooth(self.smoothed_loss, record.loss);
        self.smoothed_loss = Some(smoothed);
        if self.silent {
            return;
        }
        let mut text = format!(
            "smoothed loss {smoothed:.4}  lr {:.2e}  grad {:.3}  {:.0} img/s",
            record.lr, record.grad_norm, record.images_per_second
        );
        if let Some(scale) = record.loss_scale {
            text += &format!("  scale {scale:.0}");
        }
        if record.skipped_steps > 0 {
            text += &format!("  skipped {}", record.skipped_steps);
        }
        tracing::info!(target: PROGRESS, kind = "record", step = record.step, "{text}");
    }

    /// The step just finished.
    pub fn step_done(&self, step: u64) {
        if !self.silent {
            tracing::info!(target: PROGRESS, kind = "step", step);
        }
    }

    pub fn finish(&self) {
        if !self.silent {
            tracing::info!(target: PROGRESS, kind = "steps_done");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn a_class_grid_has_a_labelled_row_per_class() {
        // Classes 4, 4, 9, 9, 9 of images 6×6, each a shade of its own.
        let shades = Tensor::from_slice(&[-1.0f32, -0.5, 0.0, 0.5, 1.0]).view([5, 1, 1, 1]);
        let images = shades.expand([5, 1, 6, 6], false).contiguous();
        let classes = Tensor::from_slice(&[4i64, 4, 9, 9, 9]);
        let names: Vec<String> = (0..10).map(|i| format!("class {i}")).collect();
        let grid = class_grid(&images, &classes, &names).unwrap();
        // Two rows of three columns (the widest class): 3·(6+2)+2 wide, 6+2+2 high each.
        let (row_height, row_width) = (10, 26);
        assert_eq!(grid.height(), 2 * row_height);
        let label_width = grid.width() - row_width;
        assert!(label_width > 20, "room for the names: {label_width}");
        // Each image at its place: row r, column c starts 2 pixels into its cell.
        let pixel = |r: u32, c: u32| grid.get_pixel(label_width + 2 + c * 8, r * row_height + 2)[0];
        assert_eq!([pixel(0, 0), pixel(0, 1)], [0, 64]);
        assert_eq!([pixel(1, 0), pixel(1, 1), pixel(1, 2)], [128, 191, 255]);
        // The third cell of the first row is empty (background), and each row has its name.
        assert_eq!(pixel(0, 2), 32);
        for r in 0..2 {
            let written = (0..label_width)
                .flat_map(|x| (r * row_height..(r + 1) * row_height).map(move |y| (x, y)))
                .filter(|&(x, y)| grid.get_pixel(x, y)[0] > 128)
                .count();
            assert!(written > 10, "row {r} has no label");
        }
    }

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
        let back = image::open(dir.path().join("000007.png"))
            .unwrap()
            .to_luma8();
        assert_eq!(back.as_raw(), &vec![0u8, 128, 255, 191]);
    }

    #[test]
    fn loss_axis_labels_have_three_significant_digits_at_most() {
        for (v, label) in [
            (0.7000000000000001, "0.7"),
            (0.30000000000000004, "0.3"),
            (0.0123456, "0.0123"),
            (1.0, "1"),
            (12.5, "12.5"),
            (250.0, "250"),
            (0.0005, "5.0e-4"),
        ] {
            assert_eq!(axis_number(v), label, "{v}");
        }
    }

    #[test]
    fn individual_images_are_written_whole_or_the_failure_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let images = Tensor::rand([3, 1, 5, 4], (Kind::Float, Device::Cpu)) * 2 - 1;
        save_individual(&images, dir.path(), 7).unwrap();
        let third = image::open(dir.path().join("000009.png")).unwrap();
        assert_eq!((third.width(), third.height()), (4, 5));
        assert_eq!(third.color(), image::ColorType::L8);
        let expected = to_u8_nhwc(&images.narrow(0, 2, 1)).flatten(0, -1);
        assert_eq!(third.into_bytes(), Vec::<u8>::try_from(expected).unwrap());
        // A device that is always full (as a disk can be): the write fails, naming the file.
        #[cfg(target_os = "linux")]
        {
            std::os::unix::fs::symlink("/dev/full", dir.path().join("000000.png")).unwrap();
            let e = save_individual(&images, dir.path(), 0)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("000000.png") && e.contains("No space left"),
                "{e}"
            );
        }
    }

    #[test]
    fn the_report_headline_takes_the_newest_training_record_not_an_fid_one() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("metrics.jsonl"),
            "{\"step\":20,\"loss\":0.5,\"lr\":0.0001,\"images_per_second\":228.0,\"wall_seconds\":14.0}\n\
             {\"step\":20,\"fid\":372.4,\"fid_images\":4,\"wall_seconds\":15.0}\n",
        )
        .unwrap();
        let config = crate::config::RunConfig::preset("tiny").unwrap();
        write_report(dir.path(), &config, None).unwrap();
        let page = fs::read_to_string(dir.path().join("report.html")).unwrap();
        assert!(
            page.contains("loss 0.5000 · lr 1.00e-4 · 228 img/s") && page.contains("372.400"),
            "{page}"
        );
    }

    #[test]
    fn loss_plot_pair_labels_and_animation_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = dir.path().join("metrics.jsonl");
        fs::write(&metrics, "{\"step\":1,\"loss\":1.0}\n{\"step\":2,\"loss\":0.5}\n{\"step\":2,\"loss\":0.4}\n{\"step\":3,\"lo").unwrap();
        let history = read_loss_history(&metrics);
        assert_eq!(history, vec![(1, 1.0), (2, 0.4)]);
        save_loss_plot(&history, &dir.path().join("loss.png")).unwrap();
        let plot = image::open(dir.path().join("loss.png")).unwrap().to_rgb8();
        assert_eq!((plot.width(), plot.height()), (720, 400));
        assert!(
            plot.pixels().any(|p| p.0 == [0, 0, 255]),
            "the curve is drawn in blue"
        );

        let grids = |size: i64| {
            let ones = Tensor::ones([4, 1, size, size], (Kind::Float, Device::Cpu));
            (grid_image(&ones), grid_image(&(ones * -1)))
        };
        // Grids wider than their labels sit side by side, 8 pixels apart.
        let (ema, raw) = grids(64);
        let pair = labelled_pair(&ema, &raw, 400).unwrap();
        assert_eq!(
            (pair.width(), pair.height()),
            (ema.width() * 2 + 8, ema.height() + 22)
        );
        let inked = |pair: &image::RgbImage, xs: std::ops::Range<u32>| {
            xs.flat_map(|x| (0..22).map(move |y| (x, y)))
                .any(|(x, y)| pair.get_pixel(x, y).0[0] < 128)
        };
        assert!(inked(&pair, 0..60), "the EMA label is drawn");
        let raw_x = ema.width() + 8;
        assert!(inked(&pair, raw_x..raw_x + 20), "the raw label is drawn");
        assert_eq!(pair.get_pixel(2, 22 + 2).0, [255, 255, 255]);
        assert_eq!(pair.get_pixel(raw_x + 2, 22 + 2).0, [0, 0, 0]);
        // Tiny grids get columns as wide as their labels: the EMA label ends before the raw
        // column starts.
        let (ema, raw) = grids(5);
        let pair = labelled_pair(&ema, &raw, 400).unwrap();
        let raw_x = pair
            .enumerate_pixels()
            .find(|(x, y, p)| *y == 22 + 2 && *x > ema.width() && p.0 == [0, 0, 0])
            .unwrap()
            .0
            - 2;
        assert!(raw_x > ema.width() + 8);
        assert!(!inked(&pair, raw_x - 8..raw_x), "the labels leave a gap");
        assert!(inked(&pair, raw_x..raw_x + 20), "the raw label is drawn");

        save_animation(&[ema.clone(), raw.clone()], &dir.path().join("a.gif"), 500).unwrap();
        let decoder = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(
            fs::File::open(dir.path().join("a.gif")).unwrap(),
        ))
        .unwrap();
        use image::AnimationDecoder;
        assert_eq!(decoder.into_frames().count(), 2);
    }
}
