//! Does the model copy its training images? For each generated image, its nearest training
//! image, in Inception feature space and in pixels, set against how near real images the model
//! never saw (held out) come to the training set. A generated image nearer a training image than
//! any held-out image comes is flagged: a likely copy. Users who train on a few hundred images of
//! their own need this before they publish samples.
use anyhow::{ensure, Result};
use serde::Serialize;
use tch::{Kind, Tensor};

/// The nearest training image of one image.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Nearest {
    pub index: usize,
    /// Euclidean distance.
    pub distance: f64,
}

/// Nearest training images of generated and held-out images, in both spaces.
#[derive(Debug, Serialize)]
pub struct Memorisation {
    /// Per generated image: in feature space, in pixels.
    pub generated: Vec<(Nearest, Nearest)>,
    /// Per held-out image: in feature space, in pixels.
    pub held_out: Vec<(Nearest, Nearest)>,
}

/// The vectors of one set of images: Inception features [N, D] and pixels [N, C·H·W] (in any
/// one scale for all sets).
pub struct Vectors<'a> {
    pub features: &'a Tensor,
    pub pixels: &'a Tensor,
}

impl Memorisation {
    pub fn measure(train: &Vectors, generated: &Vectors, held_out: &Vectors) -> Result<Self> {
        ensure!(
            train.features.size()[0] > 0 && held_out.features.size()[0] > 0,
            "a memorisation check needs training and held-out images"
        );
        let pairs = |query: &Vectors| -> Vec<(Nearest, Nearest)> {
            let in_features = nearest(query.features, train.features);
            let in_pixels = nearest(query.pixels, train.pixels);
            in_features.into_iter().zip(in_pixels).collect()
        };
        Ok(Memorisation {
            generated: pairs(generated),
            held_out: pairs(held_out),
        })
    }

    /// How near the training set any held-out image comes: (features, pixels).
    pub fn thresholds(&self) -> (f64, f64) {
        let least = |pick: fn(&(Nearest, Nearest)) -> f64| {
            self.held_out.iter().map(pick).fold(f64::INFINITY, f64::min)
        };
        (least(|p| p.0.distance), least(|p| p.1.distance))
    }

    /// The generated images nearer a training image than any held-out image comes, in feature
    /// space or in pixels, nearest first (by their feature distance relative to the threshold).
    pub fn flagged(&self) -> Vec<usize> {
        let (in_features, in_pixels) = self.thresholds();
        let mut flagged: Vec<usize> = (0..self.generated.len())
            .filter(|&i| {
                let (f, p) = self.generated[i];
                f.distance < in_features || p.distance < in_pixels
            })
            .collect();
        flagged.sort_by(|&a, &b| {
            let ratio = |i: usize| self.generated[i].0.distance / in_features;
            ratio(a).total_cmp(&ratio(b))
        });
        flagged
    }

    /// How many generated images are flagged in feature space, and in pixels.
    pub fn flagged_in_each_space(&self) -> (usize, usize) {
        let (in_features, in_pixels) = self.thresholds();
        let count = |near: fn(&(Nearest, Nearest), f64) -> bool, threshold: f64| {
            self.generated.iter().filter(|p| near(p, threshold)).count()
        };
        (
            count(|p, t| p.0.distance < t, in_features),
            count(|p, t| p.1.distance < t, in_pixels),
        )
    }

    /// What `nearest.json` holds: the counts, the thresholds, the quantiles of the distances
    /// of generated and held-out images in each space, and every flagged image.
    pub fn summary(&self, training: usize) -> serde_json::Value {
        let (in_features, in_pixels) = self.thresholds();
        let distances = |set: &[(Nearest, Nearest)], pixel: bool| {
            quantiles(
                set.iter()
                    .map(|p| if pixel { p.1.distance } else { p.0.distance }),
            )
        };
        let flagged: Vec<serde_json::Value> = self
            .flagged()
            .into_iter()
            .map(|i| {
                let (f, p) = self.generated[i];
                serde_json::json!({"generated": i, "nearest_in_features": f, "nearest_in_pixels": p})
            })
            .collect();
        serde_json::json!({
            "generated": self.generated.len(),
            "training": training,
            "held_out": self.held_out.len(),
            "thresholds": {"features": in_features, "pixels": in_pixels},
            "quantiles_at": QUANTILES,
            "generated_features": distances(&self.generated, false),
            "held_out_features": distances(&self.held_out, false),
            "generated_pixels": distances(&self.generated, true),
            "held_out_pixels": distances(&self.held_out, true),
            "flagged": flagged,
        })
    }

    /// A grid with a row for each of the `n` generated images nearest the training set: the
    /// generated image, its nearest training image in features, and in pixels (u8 images).
    pub fn nearest_pairs(&self, generated: &Tensor, train: &Tensor, n: usize) -> image::RgbImage {
        let mut rows = Vec::new();
        for i in self.nearest_first().into_iter().take(n) {
            let (f, p) = self.generated[i];
            rows.push(generated.get(i as i64));
            rows.push(train.get(f.index as i64));
            rows.push(train.get(p.index as i64));
        }
        let images = crate::data::to_model_space(&Tensor::stack(&rows, 0), tch::Device::Cpu);
        crate::monitor::grid_with_columns(&images, 3)
    }

    /// The generated images in order of their feature distance to the training set, nearest
    /// first.
    pub fn nearest_first(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.generated.len()).collect();
        order.sort_by(|&a, &b| {
            self.generated[a]
                .0
                .distance
                .total_cmp(&self.generated[b].0.distance)
        });
        order
    }
}

/// The quantiles of the summary's distances.
const QUANTILES: [f64; 7] = [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0];

/// The `QUANTILES` of distances (nearest rank).
pub fn quantiles(distances: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut sorted: Vec<f64> = distances.collect();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return Vec::new();
    }
    QUANTILES
        .iter()
        .map(|q| sorted[((sorted.len() - 1) as f64 * q).round() as usize])
        .collect()
}

/// For each row of `query` [N, D], its nearest row of `train` [M, D].
fn nearest(query: &Tensor, train: &Tensor) -> Vec<Nearest> {
    let (query, train) = (query.to_kind(Kind::Double), train.to_kind(Kind::Double));
    let n = query.size()[0];
    let mut out = Vec::with_capacity(n as usize);
    for start in (0..n).step_by(crate::eval::DISTANCE_ROWS as usize) {
        let rows = query.narrow(0, start, crate::eval::DISTANCE_ROWS.min(n - start));
        let (distances, indices) = crate::eval::squared_distances(&rows, &train).min_dim(1, false);
        let distances = Vec::<f64>::try_from(distances.sqrt()).unwrap_or_default();
        let indices = Vec::<i64>::try_from(indices).unwrap_or_default();
        out.extend(
            indices
                .into_iter()
                .zip(distances)
                .map(|(index, distance)| Nearest {
                    index: index as usize,
                    distance,
                }),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_of_a_training_image_is_flagged_and_new_images_are_not() {
        // Points on a line: training at 0, 10, 20; held out at 4 and 14 (4 from the nearest);
        // generated at 10 (a copy), 3 (nearer than any held-out image comes) and 5.
        let column = |v: &[f64]| Tensor::from_slice(v).view([v.len() as i64, 1]);
        let train = column(&[0., 10., 20.]);
        let held = column(&[4., 14.]);
        let generated = column(&[10., 3., 5.]);
        // The pixels tell the same here but for the last image, which copies training image 2.
        let generated_pixels = column(&[10., 3., 20.]);
        let m = Memorisation::measure(
            &Vectors {
                features: &train,
                pixels: &train,
            },
            &Vectors {
                features: &generated,
                pixels: &generated_pixels,
            },
            &Vectors {
                features: &held,
                pixels: &held,
            },
        )
        .unwrap();
        assert_eq!(m.thresholds(), (4.0, 4.0));
        assert_eq!(
            m.generated[0].0,
            Nearest {
                index: 1,
                distance: 0.0
            }
        );
        assert_eq!(
            m.generated[1].0,
            Nearest {
                index: 0,
                distance: 3.0
            }
        );
        assert_eq!(
            m.generated[2].1,
            Nearest {
                index: 2,
                distance: 0.0
            }
        );
        assert_eq!(m.flagged(), [0, 1, 2]);
        assert_eq!(m.nearest_first(), [0, 1, 2]);
        // Nothing flagged when every generated image keeps its distance.
        let far = column(&[5., 15., 25.]);
        let m = Memorisation::measure(
            &Vectors {
                features: &train,
                pixels: &train,
            },
            &Vectors {
                features: &far,
                pixels: &far,
            },
            &Vectors {
                features: &held,
                pixels: &held,
            },
        )
        .unwrap();
        assert!(m.flagged().is_empty());
        // Nearest rank: the value at index round((n − 1)·q).
        assert_eq!(
            quantiles([3.0, 1.0, 2.0].into_iter()),
            [1., 1., 2., 2., 3., 3., 3.]
        );
    }
}
