//! TensorBoard event files: a run's records as scalars and its sample grids as images, so that
//! `tensorboard --logdir runs` shows every run side by side.
//!
//! A file is a sequence of TFRecords (length, CRC of the length, an `Event` protocol buffer, CRC
//! of the event; CRC-32C, masked), the first saying the file's version. A resumed or rolled-back
//! run starts a new file with a "session start" at its step, which tells TensorBoard to drop what
//! earlier files recorded after that step, as the run directory drops those records and grids.
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use prost::Message;

/// An event file being written.
pub struct EventFile {
    path: PathBuf,
    file: BufWriter<fs::File>,
}

impl EventFile {
    /// Starts a new event file in `dir`: for a run taken up at `start`, which drops what other
    /// files recorded after it; for a reader beside the run (`ddpm watch`), None.
    pub fn create(dir: &Path, start: Option<u64>) -> Result<Self> {
        let now = wall_time();
        // TensorBoard reads files whose names hold "tfevents", in the order of their names.
        let name = format!(
            "events.out.tfevents.{:010}.ddpm.{}.{}",
            now as u64,
            std::process::id(),
            if start.is_some() { "train" } else { "watch" }
        );
        let path = dir.join(name);
        let file =
            fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut events = EventFile {
            path,
            file: BufWriter::new(file),
        };
        events.write(Event {
            wall_time: now,
            file_version: Some("brain.Event:2".into()),
            ..Event::default()
        })?;
        match start {
            Some(step) => events.start_at(step)?,
            None => events.flush()?,
        }
        Ok(events)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Marks the run as (re)started at `step`: TensorBoard forgets the events of later steps
    /// (a session start at step s drops those at s and after; `step`'s own were kept).
    pub fn start_at(&mut self, step: u64) -> Result<()> {
        self.write(Event {
            wall_time: wall_time(),
            step: step as i64 + 1,
            session_log: Some(SessionLog {
                status: SESSION_START,
            }),
            ..Event::default()
        })?;
        self.flush()
    }

    /// One scalar per (tag, value) at `step`.
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> Result<()> {
        let value = values
            .iter()
            .map(|(tag, v)| Value {
                tag: tag.clone(),
                simple_value: Some(*v as f32),
                image: None,
            })
            .collect();
        self.write_summary(step, value)
    }

    /// A PNG image (`width` × `height`, `channels` of 1, 3 or 4) under `tag` at `step`.
    pub fn image(
        &mut self,
        tag: &str,
        step: u64,
        png: Vec<u8>,
        (width, height, channels): (u32, u32, u32),
    ) -> Result<()> {
        let image = Image {
            height: height as i32,
            width: width as i32,
            colorspace: channels as i32,
            encoded_image_string: png,
        };
        let value = Value {
            tag: tag.into(),
            simple_value: None,
            image: Some(image),
        };
        self.write_summary(step, vec![value])
    }

    fn write_summary(&mut self, step: u64, value: Vec<Value>) -> Result<()> {
        self.write(Event {
            wall_time: wall_time(),
            step: step as i64,
            summary: Some(Summary { value }),
            ..Event::default()
        })?;
        // Flushed at once: TensorBoard follows a run as it trains.
        self.flush()
    }

    fn write(&mut self, event: Event) -> Result<()> {
        self.file
            .write_all(&record(&event.encode_to_vec()))
            .with_context(|| format!("cannot write {}", self.path.display()))
    }

    fn flush(&mut self) -> Result<()> {
        self.file
            .flush()
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// The numeric fields of a metrics record as (tag, value): arrays by index (`loss_by_quarter/0`),
/// without the step, the epoch, the clock and what is unknown (null).
pub fn scalars_of(record: &serde_json::Value) -> Vec<(String, f64)> {
    let Some(fields) = record.as_object() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (name, value) in fields {
        if matches!(name.as_str(), "step" | "epoch" | "wall_seconds") {
            continue;
        }
        match value {
            serde_json::Value::Array(items) => out.extend(
                items
                    .iter()
                    .enumerate()
                    .filter_map(|(i, v)| Some((format!("{name}/{i}"), v.as_f64()?))),
            ),
            _ => out.extend(value.as_f64().map(|v| (name.clone(), v))),
        }
    }
    out
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One TFRecord: the length (u64, little-endian), its masked CRC, the data, the data's.
fn record(data: &[u8]) -> Vec<u8> {
    let length = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&length);
    out.extend_from_slice(&masked_crc(&length).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// CRC-32C, rotated and offset as TFRecord stores it (a CRC of data holding CRCs stays useful).
fn masked_crc(data: &[u8]) -> u32 {
    const CASTAGNOLI: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
    let crc = CASTAGNOLI.checksum(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

// The parts of TensorFlow's event.proto and summary.proto that a run writes, field numbers as
// there. A `oneof` is encoded as the one optional field that is set.

const SESSION_START: i32 = 1;

#[derive(Clone, PartialEq, Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
    #[prost(message, optional, tag = "7")]
    session_log: Option<SessionLog>,
}

#[derive(Clone, PartialEq, Message)]
struct SessionLog {
    #[prost(int32, tag = "1")]
    status: i32,
}

#[derive(Clone, PartialEq, Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<Value>,
}

#[derive(Clone, PartialEq, Message)]
struct Value {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
    #[prost(message, optional, tag = "4")]
    image: Option<Image>,
}

#[derive(Clone, PartialEq, Message)]
struct Image {
    #[prost(int32, tag = "1")]
    height: i32,
    #[prost(int32, tag = "2")]
    width: i32,
    #[prost(int32, tag = "3")]
    colorspace: i32,
    #[prost(bytes = "vec", tag = "4")]
    encoded_image_string: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_carry_the_published_crc32c() {
        // CRC-32C's check value (RFC 3720, B.4): "123456789" -> 0xE3069283.
        let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI).checksum(b"123456789");
        assert_eq!(crc, 0xe306_9283);
        // The mask: rotate right by 15, add 0xa282ead8 (mod 2^32).
        assert_eq!(
            masked_crc(b"123456789"),
            0xe306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8)
        );
        let framed = record(b"abc");
        assert_eq!(framed.len(), 8 + 4 + 3 + 4);
        assert_eq!(&framed[..8], &3u64.to_le_bytes());
        assert_eq!(&framed[12..15], b"abc");
    }

    #[test]
    fn a_metrics_record_becomes_its_numeric_scalars() {
        let record = serde_json::json!({
            "step": 10, "epoch": 1, "wall_seconds": 3.0, "loss": 0.5,
            "loss_by_quarter": [0.1, null, 0.3, 0.4], "loss_scale": null, "fid": 12.5
        });
        let mut got = scalars_of(&record);
        got.sort_by(|a, b| a.0.cmp(&b.0));
        let want: Vec<(String, f64)> = [
            ("fid", 12.5),
            ("loss", 0.5),
            ("loss_by_quarter/0", 0.1),
            ("loss_by_quarter/2", 0.3),
            ("loss_by_quarter/3", 0.4),
        ]
        .into_iter()
        .map(|(t, v)| (t.to_string(), v))
        .collect();
        assert_eq!(got, want);
    }
}
