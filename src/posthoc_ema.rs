//! Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
//! Models", section 3 and appendix C). During training a few power-function EMA profiles are
//! tracked and stored now and then (`ema.snapshot_every`); afterwards the EMA of any width is
//! approximated by the combination of the stored snapshots whose averaging profile comes closest
//! to it in L2.
//!
//! A profile of exponent γ at step t averages the weights θ(τ), τ ≤ t, with the density
//! p(τ) = (γ + 1) τ^γ / t^(γ+1). Its width relative to the run's age is
//! σ_rel = √((γ + 1) / ((γ + 2)² (γ + 3))). Time is counted in optimizer steps: the solution is the
//! same in any unit.
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use tch::{Kind, Tensor};

use crate::checkpoint::{self, Checkpoint};

/// The widest profile, γ = 0: the plain average of every weight since the start (1/√12).
pub const MAX_SIGMA_REL: f64 = 0.288_675_134_594_812_9;

/// A reconstruction whose profile is farther than this (relative L2) from the one asked for is
/// refused: the stored profiles do not reach it.
pub const MAX_PROFILE_ERROR: f64 = 0.05;

/// The folder of a run's snapshots.
pub const SNAPSHOT_DIR: &str = "ema-snapshots";

/// σ_rel of the profile of exponent γ.
pub fn sigma_rel(gamma: f64) -> f64 {
    ((gamma + 1.0) / ((gamma + 2.0).powi(2) * (gamma + 3.0))).sqrt()
}

/// The exponent γ ≥ 0 of the profile of width σ_rel: the largest root of
/// γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²), which is σ_rel's definition multiplied out.
pub fn exponent(sigma_rel: f64) -> Result<f64> {
    ensure!(
        sigma_rel > 0.0 && sigma_rel <= MAX_SIGMA_REL,
        "σ_rel = {sigma_rel}: a power-function EMA's σ_rel lies in (0, {MAX_SIGMA_REL:.4}] (the widest is the average of the whole run)"
    );
    let s = sigma_rel.powi(-2);
    let cubic = |g: f64| ((g + 7.0) * g + 16.0 - s) * g + 12.0 - s;
    // Right of the cubic's larger critical point it rises through its largest root, once.
    let mut below = ((4.0 + 12.0 * s).sqrt() - 14.0) / 6.0;
    let mut above = below.max(0.0) + 1.0;
    while cubic(above) < 0.0 {
        above *= 2.0;
    }
    // Halving 200 times takes any bracket here below f64's resolution.
    for _ in 0..200 {
        let middle = 0.5 * (below + above);
        match cubic(middle) < 0.0 {
            true => below = middle,
            false => above = middle,
        }
    }
    Ok(0.5 * (below + above))
}

/// The decay of the update that makes a profile of exponent γ the average up to `updates`
/// updates: (1 − 1/t)^(γ+1). The first update (t = 1) copies the weights.
pub fn decay(gamma: f64, updates: u64) -> f64 {
    (1.0 - 1.0 / updates as f64).powf(gamma + 1.0)
}

/// A power-function profile: the average up to `step` of exponent `gamma`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Profile {
    pub step: u64,
    pub gamma: f64,
}

impl Profile {
    pub fn new(step: u64, sigma_rel: f64) -> Result<Self> {
        ensure!(step > 0, "a profile averages at least one step");
        Ok(Profile {
            step,
            gamma: exponent(sigma_rel)?,
        })
    }

    /// ∫ p_a(τ) p_b(τ) dτ, integrated in closed form over [0, min(t_a, t_b)].
    fn overlap(self, other: Profile) -> f64 {
        let (short, long) = match self.step <= other.step {
            true => (self, other),
            false => (other, self),
        };
        let ratio = short.step as f64 / long.step as f64;
        (short.gamma + 1.0) * (long.gamma + 1.0) / (short.gamma + long.gamma + 1.0)
            * ratio.powf(long.gamma)
            / long.step as f64
    }
}

/// How to combine stored profiles into another.
#[derive(Clone, Debug)]
pub struct Reconstruction {
    /// One per input profile; they sum to 1.
    pub coefficients: Vec<f64>,
    /// ‖Σ cᵢ pᵢ − p‖ / ‖p‖: how far the combined profile is from the one asked for.
    pub profile_error: f64,
}

/// The coefficients whose combination of the `inputs`' profiles is closest in L2 to `target`'s:
/// the normal equations solved in f64, then scaled to sum to 1 (an average of weights).
pub fn solve(inputs: &[Profile], target: Profile) -> Result<Reconstruction> {
    ensure!(!inputs.is_empty(), "no snapshots to combine");
    let n = inputs.len();
    let gram: Vec<f64> = inputs
        .iter()
        .flat_map(|a| inputs.iter().map(|b| a.overlap(*b)))
        .collect();
    let toward: Vec<f64> = inputs.iter().map(|a| a.overlap(target)).collect();
    let a = Tensor::from_slice(&gram).view([n as i64, n as i64]);
    let b = Tensor::from_slice(&toward).view([n as i64, 1]);
    let x = Tensor::f_linalg_solve(&a, &b, true)
        .context("the snapshots' profiles are linearly dependent")?;
    let mut coefficients = Vec::<f64>::try_from(x.view([-1]))?;
    let sum: f64 = coefficients.iter().sum();
    coefficients.iter_mut().for_each(|c| *c /= sum);
    let combined: f64 = (0..n)
        .flat_map(|i| (0..n).map(move |j| (i, j)))
        .map(|(i, j)| coefficients[i] * coefficients[j] * gram[i * n + j])
        .sum();
    let cross: f64 = coefficients.iter().zip(&toward).map(|(c, t)| c * t).sum();
    let own = target.overlap(target);
    let profile_error = ((combined - 2.0 * cross + own).max(0.0) / own).sqrt();
    Ok(Reconstruction {
        coefficients,
        profile_error,
    })
}

/// The profiles tracked during training, one copy of the weights each (f32, on the device).
pub struct PowerEmas {
    sigma_rels: Vec<f64>,
    gammas: Vec<f64>,
    weights: Vec<Vec<Tensor>>,
}

impl PowerEmas {
    /// Profiles of widths `sigma_rels`, starting from `params`.
    pub fn new(sigma_rels: &[f64], params: &[Tensor]) -> Result<Self> {
        Ok(PowerEmas {
            sigma_rels: sigma_rels.to_vec(),
            gammas: sigma_rels
                .iter()
                .map(|&s| exponent(s))
                .collect::<Result<_>>()?,
            weights: sigma_rels
                .iter()
                .map(|_| params.iter().map(|p| p.detach().copy()).collect())
                .collect(),
        })
    }

    /// Takes in `params` as the weights after `updates` optimizer steps.
    pub fn update(&self, params: &[Tensor], updates: u64) -> Result<()> {
        for (gamma, weights) in self.gammas.iter().zip(&self.weights) {
            let decay = decay(*gamma, updates);
            tch::no_grad(|| crate::ops::foreach_lerp_(weights, params, 1.0 - decay))?;
        }
        Ok(())
    }

    fn key(profile: usize, name: &str) -> String {
        format!("power_ema.{profile}.{name}")
    }

    /// The profiles for the checkpoint, under the parameter `names`.
    pub fn state_tensors(&self, names: &[String]) -> Vec<(String, Tensor)> {
        self.weights
            .iter()
            .enumerate()
            .flat_map(|(i, weights)| {
                names
                    .iter()
                    .zip(weights)
                    .map(move |(name, w)| (Self::key(i, name), w.shallow_clone()))
            })
            .collect()
    }

    /// Restores the profiles from `checkpoint`. One written without them (by an import, or
    /// before they were tracked) starts them from the checkpoint's raw weights: exact at step 0,
    /// and later the missing early steps weigh (t₀/t)^(γ+1), little once the run has doubled.
    pub fn load(&mut self, checkpoint: &Checkpoint, names: &[String]) -> Result<()> {
        tch::no_grad(|| {
            for (i, weights) in self.weights.iter_mut().enumerate() {
                for (name, w) in names.iter().zip(weights.iter_mut()) {
                    let key = match checkpoint.tensors.contains_key(&Self::key(i, name)) {
                        true => Self::key(i, name),
                        false => format!("model.{name}"),
                    };
                    crate::train::copy_from(checkpoint, &key, w)?;
                }
            }
            Ok(())
        })
    }

    /// Every tensor, for the ranks' agreement.
    pub fn shared_tensors(&self) -> impl Iterator<Item = &Tensor> {
        self.weights.iter().flatten()
    }

    /// The snapshot of `step`: each profile as float16, with its σ_rel and the step.
    pub fn snapshot(&self, names: &[String], step: u64) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self
            .state_tensors(names)
            .into_iter()
            .map(|(key, w)| (key, w.to_kind(Kind::Half)))
            .collect();
        out.push(("sigma_rels".into(), Tensor::from_slice(&self.sigma_rels)));
        out.push(("step".into(), Tensor::from(step as i64)));
        out
    }
}

/// The snapshot file of `step` in a run's snapshot folder `dir`.
pub fn snapshot_path(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("step-{step:08}.safetensors"))
}

/// Writes a snapshot (from `PowerEmas::snapshot`) atomically.
pub fn write_snapshot(dir: &Path, step: u64, tensors: &[(String, Tensor)]) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    checkpoint::write_atomic(
        &snapshot_path(dir, step),
        &checkpoint::to_safetensors(tensors)?,
    )
}

/// Removes the snapshots of steps after `step` (a resume or rollback to it abandons them).
pub fn remove_after(dir: &Path, step: u64) -> Result<()> {
    for (at, path) in snapshot_files(dir)? {
        if at > step {
            fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}

/// The snapshot files in `dir` by step (none when there is no folder).
fn snapshot_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let step = name
            .strip_prefix("step-")
            .and_then(|n| n.strip_suffix(".safetensors"))
            .and_then(|n| n.parse().ok());
        if let Some(step) = step {
            files.push((step, path));
        }
    }
    files.sort();
    Ok(files)
}

/// One stored profile: where it is, which it is.
#[derive(Clone, Debug)]
pub struct StoredProfile {
    pub path: PathBuf,
    pub index: usize,
    pub sigma_rel: f64,
    pub profile: Profile,
}

/// The snapshots of a run up to `step`, and the files passed over as damaged (with why).
pub struct Snapshots {
    pub profiles: Vec<StoredProfile>,
    pub damaged: Vec<String>,
}

impl Snapshots {
    /// Reads the headers of the snapshots in `dir` up to `step`.
    pub fn read(dir: &Path, step: u64) -> Result<Self> {
        let mut profiles = Vec::new();
        let mut damaged = Vec::new();
        for (at, path) in snapshot_files(dir)?.into_iter().filter(|(s, _)| *s <= step) {
            match read_header(&path, at) {
                Ok(sigma_rels) => {
                    for (index, sigma_rel) in sigma_rels.into_iter().enumerate() {
                        let profile = Profile::new(at, sigma_rel)?;
                        profiles.push(StoredProfile {
                            path: path.clone(),
                            index,
                            sigma_rel,
                            profile,
                        });
                    }
                }
                Err(e) => damaged.push(format!("{e:#}")),
            }
        }
        Ok(Snapshots { profiles, damaged })
    }

    /// The steps that have snapshots.
    pub fn steps(&self) -> Vec<u64> {
        let mut steps: Vec<u64> = self.profiles.iter().map(|p| p.profile.step).collect();
        steps.dedup();
        steps
    }

    /// How to make the profile of width `sigma_rel` at `step` from these snapshots; refused
    /// when it lies beyond what they reach (with the range they do reach).
    pub fn plan(&self, sigma_rel: f64, step: u64) -> Result<Reconstruction> {
        let inputs: Vec<Profile> = self.profiles.iter().map(|p| p.profile).collect();
        let reconstruction = solve(&inputs, Profile::new(step, sigma_rel)?)?;
        if reconstruction.profile_error > MAX_PROFILE_ERROR {
            let reach = self
                .reach(step)
                .map_or("none".into(), |(lo, hi)| format!("{lo:.3} to {hi:.3}"));
            bail!(
                "σ_rel = {sigma_rel} at step {step} is beyond what the stored profiles reach: the closest combination differs from it by {:.0}% (at most {:.0}% is accepted); these snapshots reach σ_rel {reach}",
                100.0 * reconstruction.profile_error,
                100.0 * MAX_PROFILE_ERROR
            );
        }
        Ok(reconstruction)
    }

    /// The range of σ_rel (on a fine grid) that these snapshots reconstruct at `step` within
    /// MAX_PROFILE_ERROR.
    pub fn reach(&self, step: u64) -> Option<(f64, f64)> {
        let inputs: Vec<Profile> = self.profiles.iter().map(|p| p.profile).collect();
        let reached: Vec<f64> = (1..=288)
            .map(|k| k as f64 / 1000.0)
            .filter(|&s| {
                Profile::new(step, s)
                    .and_then(|target| solve(&inputs, target))
                    .is_ok_and(|r| r.profile_error <= MAX_PROFILE_ERROR)
            })
            .collect();
        Some((*reached.first()?, *reached.last()?))
    }

    /// The weights of the reconstruction (f32, on the CPU, by parameter name).
    pub fn combine(&self, plan: &Reconstruction) -> Result<BTreeMap<String, Tensor>> {
        let mut sum: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut by_file: BTreeMap<&Path, Vec<(usize, f64)>> = BTreeMap::new();
        for (stored, c) in self.profiles.iter().zip(&plan.coefficients) {
            by_file
                .entry(&stored.path)
                .or_default()
                .push((stored.index, *c));
        }
        for (path, parts) in by_file {
            let bytes =
                fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            let tensors = checkpoint::from_safetensors(&bytes, path)?;
            for (index, c) in parts {
                let prefix = format!("power_ema.{index}.");
                for (key, w) in &tensors {
                    let Some(name) = key.strip_prefix(&prefix) else {
                        continue;
                    };
                    // In f64: hundreds of terms of alternating sign.
                    let term = w.to_kind(Kind::Double) * c;
                    match sum.get_mut(name) {
                        Some(total) => *total += term,
                        None => {
                            sum.insert(name.to_string(), term);
                        }
                    }
                }
            }
        }
        Ok(sum
            .into_iter()
            .map(|(name, w)| (name, w.to_kind(Kind::Float)))
            .collect())
    }
}

/// The σ_rels a snapshot holds, checking that it is whole and of step `step`.
fn read_header(path: &Path, step: u64) -> Result<Vec<f64>> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let tensors = checkpoint::from_safetensors(&bytes, path)?;
    let stored_step = tensors
        .get("step")
        .with_context(|| {
            format!(
                "{} is not a ddpm EMA snapshot: it has no step",
                path.display()
            )
        })?
        .int64_value(&[]);
    ensure!(
        stored_step == step as i64,
        "{} is damaged: it records step {stored_step}",
        path.display()
    );
    let sigma_rels = tensors.get("sigma_rels").with_context(|| {
        format!(
            "{} is not a ddpm EMA snapshot: it has no sigma_rels",
            path.display()
        )
    })?;
    Ok(Vec::<f64>::try_from(sigma_rels)?)
}

/// `base` (a checkpoint of the run, for its configuration) with the reconstructed `weights`
/// as both its EMA and its raw weights, at `step`: what samples and `ddpm sample` read.
pub fn as_checkpoint(
    base: &Checkpoint,
    weights: &BTreeMap<String, Tensor>,
    step: u64,
) -> Checkpoint {
    let mut tensors = BTreeMap::new();
    for (name, w) in weights {
        tensors.insert(format!("model.{name}"), w.shallow_clone());
        tensors.insert(format!("ema.{name}"), w.shallow_clone());
    }
    let mut sidecar = base.sidecar.clone();
    sidecar.step = step;
    Checkpoint {
        path: base.path.clone(),
        sidecar,
        tensors,
    }
}

/// One point of a sweep: the FID of the EMA of width `sigma_rel`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SweepPoint {
    pub sigma_rel: f64,
    pub fid: f64,
    pub profile_error: f64,
}

/// What `ddpm ema --sweep` measured (`posthoc-ema/sweep.json`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Sweep {
    pub step: u64,
    pub images: usize,
    pub points: Vec<SweepPoint>,
    /// The run's classic EMA (train.ema_decay) at the same step, scored the same way, when its
    /// checkpoint is there.
    pub classic: Option<ClassicEma>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ClassicEma {
    pub decay: f64,
    pub fid: f64,
}

impl Sweep {
    /// The point of the lowest FID.
    pub fn best(&self) -> Option<&SweepPoint> {
        self.points.iter().min_by(|a, b| a.fid.total_cmp(&b.fid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponents_are_the_papers_and_invert_sigma_rel() {
        // The paper's pair: σ_rel 0.05 and 0.10 are γ = 16.97 and 6.94.
        assert!((exponent(0.05).unwrap() - 16.97).abs() < 0.005);
        assert!((exponent(0.10).unwrap() - 6.94).abs() < 0.005);
        assert!(exponent(MAX_SIGMA_REL).unwrap().abs() < 1e-9);
        for k in 1..=280 {
            let s = k as f64 / 1000.0;
            let g = exponent(s).unwrap();
            assert!(
                g >= 0.0 && (sigma_rel(g) - s).abs() < 1e-12 * s.max(1e-3),
                "σ_rel {s}"
            );
        }
        assert!(exponent(0.0).is_err() && exponent(0.3).is_err());
    }

    /// The decays make each step's weights count exactly the profile's mass over that step:
    /// after T updates, step τ's weights weigh (τ^(γ+1) − (τ−1)^(γ+1)) / T^(γ+1).
    #[test]
    fn tracked_profiles_weigh_each_step_by_the_power_function() {
        let (steps, sigma_rels) = (50u64, [0.05, 0.2]);
        // One "weight" per step, whose value is a one-hot of the step.
        let mut params = [Tensor::zeros(
            [steps as i64],
            (Kind::Double, tch::Device::Cpu),
        )];
        let emas = PowerEmas::new(&sigma_rels, &params).unwrap();
        for t in 1..=steps {
            let _ = params[0].zero_().get(t as i64 - 1).fill_(1.0);
            emas.update(&params, t).unwrap();
        }
        for (weights, s) in emas.weights.iter().zip(sigma_rels) {
            let g = exponent(s).unwrap();
            let weighs = Vec::<f64>::try_from(&weights[0]).unwrap();
            for (i, w) in weighs.iter().enumerate() {
                let tau = (i + 1) as f64;
                let exact =
                    (tau.powf(g + 1.0) - (tau - 1.0).powf(g + 1.0)) / (steps as f64).powf(g + 1.0);
                assert!(
                    (w - exact).abs() < 1e-12,
                    "σ_rel {s}, step {tau}: {w} against {exact}"
                );
            }
        }
    }

    #[test]
    fn overlaps_match_numerical_integration() {
        let pairs = [
            ((100, 0.05), (100, 0.1)),
            ((40, 0.03), (100, 0.2)),
            ((100, 0.12), (70, 0.07)),
        ];
        for ((ta, sa), (tb, sb)) in pairs {
            let (a, b) = (Profile::new(ta, sa).unwrap(), Profile::new(tb, sb).unwrap());
            let density = |p: Profile, x: f64| {
                let t = p.step as f64;
                if x > t {
                    0.0
                } else {
                    (p.gamma + 1.0) * x.powf(p.gamma) / t.powf(p.gamma + 1.0)
                }
            };
            let n = 200_000;
            let end = ta.min(tb) as f64;
            let h = end / n as f64;
            let numeric: f64 = (0..n)
                .map(|i| (i as f64 + 0.5) * h)
                .map(|x| density(a, x) * density(b, x) * h)
                .sum();
            let closed = a.overlap(b);
            assert!(
                (closed - numeric).abs() < 1e-6 * closed,
                "{closed} against {numeric}"
            );
        }
    }

    #[test]
    fn coefficients_match_the_published_solver() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/phema/edm2-coefficients.json");
        let fixture: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
        let numbers = |v: &serde_json::Value| -> Vec<f64> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        for case in fixture["cases"].as_array().unwrap() {
            let in_sigma_rels = numbers(&case["in_sigma_rels"]);
            let inputs: Vec<Profile> = numbers(&case["in_steps"])
                .iter()
                .flat_map(|&t| {
                    in_sigma_rels
                        .iter()
                        .map(move |&s| Profile::new(t as u64, s).unwrap())
                })
                .collect();
            let theirs = case["coefficients"].as_array().unwrap();
            for (j, s) in numbers(&case["out_sigma_rels"]).into_iter().enumerate() {
                let target = Profile::new(case["out_step"].as_u64().unwrap(), s).unwrap();
                let ours = solve(&inputs, target).unwrap();
                let theirs: Vec<f64> = theirs.iter().map(|row| row[j].as_f64().unwrap()).collect();
                let scale = theirs.iter().fold(0f64, |m, c| m.max(c.abs()));
                let worst = ours
                    .coefficients
                    .iter()
                    .zip(&theirs)
                    .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
                assert!(worst < 1e-6 * scale, "σ_rel {s}: {worst:e} of {scale}");
            }
        }
    }

    /// Training tracks σ_rel 0.05, 0.075 and 0.10; the 0.075 profile made afterwards from the
    /// snapshots of the other two alone is compared with the one tracked directly.
    #[test]
    fn a_reconstructed_profile_agrees_with_the_same_profile_tracked_directly() {
        use crate::config::{ImageSize, RunConfig};
        let _rng = crate::rng::exclusive();
        let mut c = RunConfig::preset("tiny").unwrap();
        (c.model.channels, c.model.image_size, c.model.channel_mult) =
            (16, ImageSize::Square(8), vec![1, 2]);
        (c.train.device, c.train.batch, c.train.steps) = ("cpu".into(), 8, 200);
        (c.ema.sigma_rels, c.ema.snapshot_every) = (vec![0.05, 0.075, 0.10], 20);
        let mut trainer = crate::train::Trainer::new(&c, tch::Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let images = Tensor::rand([64, 1, 8, 8], (Kind::Float, tch::Device::Cpu)) * 2.0 - 1.0;
        while trainer.step < 200 {
            let x0 = images.narrow(0, (trainer.step as i64 * 8) % 64, 8);
            trainer.step(&x0, None).unwrap();
            if trainer.step % 20 == 0 {
                write_snapshot(dir.path(), trainer.step, &trainer.ema_snapshot().unwrap()).unwrap();
            }
        }
        let all = Snapshots::read(dir.path(), 200).unwrap();
        let others = Snapshots {
            profiles: all.profiles.into_iter().filter(|p| p.index != 1).collect(),
            damaged: Vec::new(),
        };
        let plan = others.plan(0.075, 200).unwrap();
        let made = others.combine(&plan).unwrap();
        let state: BTreeMap<String, Tensor> = trainer.state_tensors().into_iter().collect();
        let tracked = |i: usize| {
            let prefix = format!("power_ema.{i}.");
            let parts: Vec<Tensor> = made
                .keys()
                .map(|name| state[&format!("{prefix}{name}")].flatten(0, -1))
                .collect();
            Tensor::cat(&parts, 0).to_kind(Kind::Double)
        };
        let made = Tensor::cat(
            &made.values().map(|w| w.flatten(0, -1)).collect::<Vec<_>>(),
            0,
        )
        .to_kind(Kind::Double);
        let norm = |t: &Tensor| t.norm().double_value(&[]);
        let error = norm(&(&made - tracked(1)));
        let width_apart = norm(&(tracked(0) - tracked(2)));
        let float16 = norm(&(tracked(1).to_kind(Kind::Half).to_kind(Kind::Double) - tracked(1)));
        eprintln!(
            "profile error {:.2}%: |made − tracked| = {error:.3e}; |σ 0.05 − σ 0.10| = {width_apart:.3e}; float16 rounding alone {float16:.3e}",
            100.0 * plan.profile_error
        );
        // The snapshots are float16: storing the tracked profile alone moves it by `float16`,
        // and a reconstruction worth having is far nearer than the next stored width.
        assert!(
            error < 2.0 * float16,
            "{error:e} against float16 rounding {float16:e}"
        );
        assert!(
            error < 0.05 * width_apart,
            "{error:e} against {width_apart:e}"
        );
    }
}
