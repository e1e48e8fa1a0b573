//! The command line, end to end, through the built binary.
use std::path::Path;
use std::process::Command;

mod common;
use common::{ddpm, stderr};

#[test]
fn model_prints_the_exact_cifar10_parameter_count() {
    let dir = tempfile::tempdir().unwrap();
    let out = ddpm(&["model", "--preset", "cifar10"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("parameters: 35746307"));
}

#[test]
fn config_errors_name_the_key_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.toml"),
        "[train]\nlearning_rate = 0.1\n",
    )
    .unwrap();
    let out = ddpm(
        &["train", "--config", "bad.toml", "--out", "run"],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("train.learning_rate"),
        "{}",
        stderr(&out)
    );
    assert!(
        !dir.path().join("run").exists(),
        "no run directory before the config is valid"
    );

    let out = ddpm(&["train", "--ema-decay", "1.5", "--out", "run"], dir.path());
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("train.ema_decay") && stderr(&out).contains("1.5"),
        "{}",
        stderr(&out)
    );
    // A value out of range names the file it comes from, and only then.
    std::fs::write(dir.path().join("zero.toml"), "[train]\nbatch = 0\n").unwrap();
    let zero_batch = |extra: &[&str]| {
        let args = [
            &["train", "--config", "zero.toml", "--out", "run"][..],
            extra,
        ]
        .concat();
        stderr(&ddpm(&args, dir.path()))
    };
    let from_file = zero_batch(&[]);
    assert!(
        from_file.contains("in config file zero.toml") && from_file.contains("train.batch"),
        "{from_file}"
    );
    std::fs::write(dir.path().join("big.toml"), "[sample]\nnum = 5000\n").unwrap();
    let out = ddpm(
        &["train", "--config", "big.toml", "--out", "run"],
        dir.path(),
    );
    assert!(
        stderr(&out).contains("in config file big.toml") && stderr(&out).contains("sample.num"),
        "{}",
        stderr(&out)
    );
    // A speed lever this machine cannot run, from a file, names the file too.
    std::fs::write(
        dir.path().join("graph.toml"),
        "[train]\ndevice = \"cpu\"\ncuda_graph = true\n",
    )
    .unwrap();
    let out = ddpm(
        &["train", "--config", "graph.toml", "--out", "run"],
        dir.path(),
    );
    assert!(
        stderr(&out).contains("in config file graph.toml")
            && stderr(&out).contains("train.cuda_graph (--cuda-graph) needs a CUDA device"),
        "{}",
        stderr(&out)
    );
    // A data format with no data to read in it is refused, not trained on the bundled digits.
    let out = ddpm(
        &["train", "--data-format", "cifar10", "--out", "run"],
        dir.path(),
    );
    assert!(
        !out.status.success() && stderr(&out).contains("data.format = \"cifar10\" needs data.path"),
        "{}",
        stderr(&out)
    );
    let from_flag = zero_batch(&["--batch", "4", "--ema-decay", "1.5"]);
    assert!(
        from_flag.contains("train.ema_decay") && !from_flag.contains("zero.toml"),
        "{from_flag}"
    );

    let out = ddpm(
        &["train", "--data", "no/such/folder", "--out", "run"],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no/such/folder"), "{}", stderr(&out));
}

#[test]
fn train_resume_and_sample_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let config = "[model]\nchannels = 16\n[train]\nbatch = 8\nlog_every = 1\ndevice = \"cpu\"\n[sample]\nnum = 4\nsteps = 3\n[checkpoint]\nevery = 2\n";
    std::fs::write(dir.path().join("small.toml"), config).unwrap();
    let train = [
        "train",
        "--config",
        "small.toml",
        "--steps",
        "3",
        "--out",
        "run",
    ];
    let out = ddpm(&train, dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let run = dir.path().join("run");
    for file in [
        "config.toml",
        "metrics.jsonl",
        "samples/latest.png",
        "samples/data.png",
        "samples/training.gif",
        "loss.png",
        "report.html",
        "checkpoints/step-00000002.json",
        "checkpoints/step-00000003.safetensors",
    ] {
        assert!(run.join(file).exists(), "{file} missing");
    }
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3);
    let record: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    for field in [
        "step",
        "epoch",
        "loss",
        "loss_by_quarter",
        "lr",
        "grad_norm",
        "loss_scale",
        "skipped_steps",
        "images_per_second",
        "data_wait_seconds",
        "device_memory_gib",
        "wall_seconds",
    ] {
        assert!(
            record.get(field).is_some(),
            "metrics lack {field}: {record}"
        );
    }
    assert_eq!(record["loss_by_quarter"].as_array().unwrap().len(), 4);
    // The report shows the loss, the grids, their animation and the data, all from the run.
    let report = std::fs::read_to_string(run.join("report.html")).unwrap();
    let shown: Vec<&str> = report
        .split("src=\"")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap())
        .collect();
    assert_eq!(shown.len(), 4, "{shown:?}");
    for image in shown {
        assert!(run.join(image).is_file(), "{image}");
    }

    // `model` describes the trained network: the one of its configuration.
    let model = |args: &[&str]| {
        let out = ddpm(args, dir.path());
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    let of_checkpoint = model(&["model", "--checkpoint", "run"]);
    assert!(
        of_checkpoint.contains("checkpoint: run/checkpoints/step-00000003.json (step 3)"),
        "{of_checkpoint}"
    );
    assert!(of_checkpoint.ends_with(&model(&["model", "--config", "small.toml"])));

    // A second start into the same directory refuses instead of overwriting.
    let out = ddpm(&train, dir.path());
    assert!(
        !out.status.success() && stderr(&out).contains("--resume"),
        "{}",
        stderr(&out)
    );

    // Resume extends the run to 5 steps. An edit of the run's config.toml is not read (the
    // checkpoint's settings are), and the note says so.
    let recorded = std::fs::read_to_string(run.join("config.toml")).unwrap();
    let edited = recorded.replace("ema_decay = 0.999\n", "ema_decay = 0.99\n");
    assert_ne!(edited, recorded);
    std::fs::write(run.join("config.toml"), edited).unwrap();
    let out = ddpm(&["train", "--resume", "run", "--steps", "5"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("at step 3"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "config.toml differs from the checkpoint's settings (train.ema_decay = 0.99 there, 0.999 in the checkpoint)"
        ),
        "{}",
        stderr(&out)
    );
    assert!(run.join("checkpoints/step-00000005.json").exists());

    let out = ddpm(
        &[
            "sample",
            "--checkpoint",
            "run",
            "--num",
            "3",
            "--steps",
            "2",
            "--out",
            "grid.png",
            "--out-dir",
            "imgs",
            "--animate",
            "t.gif",
            "--device",
            "cpu",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let grid = image::open(dir.path().join("grid.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (2 * 18 + 2, 2 * 18 + 2)); // 3 images of 16×16: 2×2 cells
    assert!(dir.path().join("t.gif").exists());
    for i in 0..3 {
        let img = image::open(dir.path().join(format!("imgs/{i:06}.png"))).unwrap();
        assert_eq!((img.width(), img.height()), (16, 16));
    }
}

#[test]
fn sigint_finishes_the_step_writes_a_checkpoint_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("long.toml"), "[model]\nchannels = 16\n[train]\nsteps = 100000\nbatch = 4\nlog_every = 1\ndevice = \"cpu\"\n[sample]\nevery = 0\n").unwrap();
    // --stop-at bounds the run should the signal be lost: it then ends with 0, not 130.
    let (mut child, lines) = start_training(
        &[
            "train",
            "--config",
            "long.toml",
            "--out",
            "run",
            "--stop-at",
            "3000",
        ],
        dir.path(),
    );
    // Training is under way: interrupt.
    unsafe { libc_kill(child.id() as i32, 2) };
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(
        rest.iter()
            .any(|l| l.starts_with("interrupt: stopping after this step")),
        "{rest:?}"
    );
    let message = rest
        .iter()
        .find(|l| l.starts_with("interrupted after step"))
        .expect("an interruption message");
    assert!(message.contains("--resume"), "{message}");
    // The step it stopped after is logged (log_every = 1), so a resume keeps its line.
    let step: u64 = message["interrupted after step ".len()..]
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let metrics = std::fs::read_to_string(dir.path().join("run/metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert_eq!(last["step"], step, "{metrics}");
    let checkpoints: Vec<_> = std::fs::read_dir(dir.path().join("run/checkpoints"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .collect();
    assert_eq!(checkpoints.len(), 1);
}

#[test]
fn sigint_during_a_grid_abandons_it_and_stops_without_another_step() {
    let dir = tempfile::tempdir().unwrap();
    // A grid of 64 images over 1000 DDPM steps takes most of a minute; the steps take
    // milliseconds.
    std::fs::write(dir.path().join("grid.toml"), "[model]\nchannels = 16\nimage_size = 8\n[train]\nsteps = 1000\nbatch = 4\nlog_every = 1\ndevice = \"cpu\"\n[sample]\nevery = 2\nnum = 64\nsampler = \"ddpm\"\n[checkpoint]\nevery = 0\n").unwrap();
    let (mut child, mut lines) = start_training(
        &["train", "--config", "grid.toml", "--out", "run"],
        dir.path(),
    );
    let sampling = lines
        .by_ref()
        .map(|l| l.unwrap())
        .find(|l| l.starts_with("sampling"));
    assert!(sampling.is_some_and(|l| l.contains("at step 2")));
    unsafe { libc_kill(child.id() as i32, 2) };
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert_eq!(child.wait().unwrap().code(), Some(130), "{rest:?}");
    assert!(
        rest.iter()
            .any(|l| l.starts_with("interrupted after step 2")),
        "{rest:?}"
    );
    assert!(!rest.iter().any(|l| l.starts_with("step ")), "{rest:?}");
    assert!(!rest.iter().any(|l| l.starts_with("wrote")), "{rest:?}");
    assert!(!dir.path().join("run/samples/step-00000002.png").exists());
    assert!(dir
        .path()
        .join("run/checkpoints/step-00000002.json")
        .exists());
}

#[test]
fn a_second_sigint_quits_at_once_without_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    // Steps of about half a second on two cores: the second signal comes well within the step.
    std::fs::write(dir.path().join("slow.toml"), "[model]\nchannels = 64\n[train]\nsteps = 100000\nbatch = 64\nlog_every = 1\ndevice = \"cpu\"\n[sample]\nevery = 0\n[checkpoint]\nevery = 0\n").unwrap();
    let (mut child, mut lines) = start_training(
        &[
            "train",
            "--config",
            "slow.toml",
            "--out",
            "run",
            "--stop-at",
            "200",
        ],
        dir.path(),
    );
    unsafe { libc_kill(child.id() as i32, 2) };
    // Signals do not queue: the second goes once the first has been taken.
    let announced = lines
        .by_ref()
        .map(|l| l.unwrap())
        .find(|l| l.starts_with("interrupt: stopping after this step"));
    assert!(announced.is_some());
    unsafe { libc_kill(child.id() as i32, 2) };
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert_eq!(child.wait().unwrap().code(), Some(130));
    // checkpoint.every = 0: none was written, and the message does not claim one.
    assert!(
        rest.iter().any(|l| l.contains(
            "second interrupt: quitting now, without a checkpoint of the step under way; no checkpoint was written yet"
        )),
        "{rest:?}"
    );
    assert!(!rest.iter().any(|l| l.contains("stay valid")), "{rest:?}");
    assert!(
        !rest.iter().any(|l| l.starts_with("interrupted after step")),
        "{rest:?}"
    );
    // No checkpoint (on a busy machine the step may have ended and a save begun, which the
    // second signal cuts short before its sidecar is written).
    let sidecars = std::fs::read_dir(dir.path().join("run/checkpoints"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(sidecars, 0);
    // Nothing to resume: the error says how to start the run again.
    let out = ddpm(&["train", "--resume", "run"], dir.path());
    let log = stderr(&out);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("`ddpm train --config run/config.toml --out run`"),
        "{log}"
    );
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, signal: i32) -> i32;
}

#[test]
fn streamed_folder_trains_past_a_corrupt_file_or_stops_on_it_when_strict() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    for i in 0..10u32 {
        image::RgbImage::from_fn(12, 10, |x, y| {
            image::Rgb([(x * 20 + i) as u8, (y * 25) as u8, 90])
        })
        .save(images.join(format!("{i}.png")))
        .unwrap();
    }
    std::fs::write(images.join("5-corrupt.png"), b"\x89PNG\r\n\x1a\n").unwrap();
    // A grayscale image first in name order, among colour ones.
    image::GrayImage::new(12, 10)
        .save(images.join("00-gray.png"))
        .unwrap();
    let config = "[model]\nchannels = 16\nimage_size = 8\n[train]\nbatch = 8\ndevice = \"cpu\"\n[sample]\nnum = 4\nsteps = 2\n";
    std::fs::write(dir.path().join("small.toml"), config).unwrap();
    let train = |extra: &[&str], out: &str| {
        let mut args = vec![
            "train",
            "--config",
            "small.toml",
            "--data",
            "images",
            "--data-cache",
            "off",
            "--workers",
            "2",
            "--steps",
            "3",
            "--out",
            out,
        ];
        args.extend_from_slice(extra);
        ddpm(&args, dir.path())
    };
    let out = train(&[], "run");
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("decoded as read"), "{log}");
    assert!(
        log.contains("is in colour and is read in grayscale, at the model's 1 channel"),
        "{log}"
    );
    assert!(
        log.contains("skipping") && log.contains("5-corrupt.png"),
        "{log}"
    );
    assert!(
        log.contains("1 unreadable image file(s) were skipped"),
        "{log}"
    );
    // A resume on a folder that has grown says that the data order changes.
    for i in 10..12u32 {
        image::RgbImage::new(12, 10)
            .save(images.join(format!("{i}.png")))
            .unwrap();
    }
    let out = ddpm(&["train", "--resume", "run", "--steps", "4"], dir.path());
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("note: the data has 14 images now and had 12 at step 3"),
        "{log}"
    );
    // Where the corrupt file comes in depends on the seed: after a step, that step's state is
    // checkpointed; before any, nothing is written and the same --out can be used again.
    let (mut before_any_step, mut after_a_step) = (false, false);
    for seed in 0..12 {
        let out_dir = format!("strict-{seed}");
        let out = train(&["--strict-data", "--seed", &seed.to_string()], &out_dir);
        let log = stderr(&out);
        assert!(!out.status.success());
        assert!(
            log.contains("5-corrupt.png") && log.contains("reading strictly"),
            "{log}"
        );
        let checkpoints = dir.path().join(&out_dir).join("checkpoints");
        let saved: Vec<_> = std::fs::read_dir(&checkpoints)
            .map(|d| d.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default();
        if saved.is_empty() {
            assert!(!log.contains("checkpoint"), "{log}");
            if !before_any_step {
                let out = train(&["--seed", &seed.to_string()], &out_dir);
                assert!(out.status.success(), "{}", stderr(&out));
            }
            before_any_step = true;
        } else {
            assert!(
                log.contains("training stopped at step") && log.contains("checkpoint"),
                "{log}"
            );
            after_a_step = true;
        }
        if before_any_step && after_a_step {
            return;
        }
    }
    panic!("seeds 0..12 did not meet the corrupt file both before and after a step");
}

/// Starts `ddpm args…` in `cwd` and returns once it has logged its first step, with the rest
/// of its stderr to read.
fn start_training(
    args: &[&str],
    cwd: &Path,
) -> (
    std::process::Child,
    std::io::Lines<std::io::BufReader<std::process::ChildStderr>>,
) {
    start_command(args, cwd, "step ")
}

/// Starts `ddpm args…` in `cwd` and returns once it has logged a line starting with `cue`, with
/// the rest of its stderr to read.
fn start_command(
    args: &[&str],
    cwd: &Path,
    cue: &str,
) -> (
    std::process::Child,
    std::io::Lines<std::io::BufReader<std::process::ChildStderr>>,
) {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_ddpm"))
        .args(args)
        .current_dir(cwd)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap().starts_with(cue) {
            break;
        }
    }
    (child, lines)
}

/// Every file of a run directory's checkpoints folder with its bytes.
fn checkpoint_files(run: &Path) -> Vec<(std::ffi::OsString, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name(), std::fs::read(e.path()).unwrap())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn resume_never_overwrites_checkpoints_nor_changes_the_network() {
    let dir = tempfile::tempdir().unwrap();
    let config = "[model]\nchannels = 16\nimage_size = 8\n[train]\nbatch = 8\nlog_every = 1\ndevice = \"cpu\"\n[sample]\nnum = 4\nsteps = 2\nevery = 0\n[checkpoint]\nevery = 2\n";
    std::fs::write(dir.path().join("small.toml"), config).unwrap();
    for (run, steps) in [("a", "4"), ("k", "6")] {
        let args = [
            "train",
            "--config",
            "small.toml",
            "--steps",
            steps,
            "--out",
            run,
        ];
        let out = ddpm(&args, dir.path());
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let (a, k) = (dir.path().join("a"), dir.path().join("k"));
    let (a_files, k_files) = (checkpoint_files(&a), checkpoint_files(&k));
    let a_config = std::fs::read(a.join("config.toml")).unwrap();
    let refusals: [(&[&str], &str); 4] = [
        // Into another run's directory.
        (
            &["--resume", "a", "--out", "k", "--steps", "8"],
            "another run",
        ),
        // From a checkpoint with newer ones after it.
        (
            &[
                "--resume",
                "k/checkpoints/step-00000002.json",
                "--steps",
                "8",
            ],
            "after step 2",
        ),
        // With another network.
        (
            &["--resume", "a", "--image-size", "16", "--steps", "8"],
            "model.image_size",
        ),
        // With a configuration file, which only new runs take.
        (&["--resume", "a", "--config", "small.toml"], "--config"),
    ];
    for (args, expected) in refusals {
        let out = ddpm(&[&["train"], args].concat(), dir.path());
        let log = stderr(&out);
        assert!(!out.status.success(), "{args:?} was accepted: {log}");
        assert!(log.contains(expected), "{args:?}: {log}");
    }
    assert_eq!(checkpoint_files(&a), a_files);
    assert_eq!(checkpoint_files(&k), k_files);
    assert_eq!(std::fs::read(a.join("config.toml")).unwrap(), a_config);

    // A damaged newest checkpoint is passed over, and the run goes on from the one before.
    let newest = k.join("checkpoints/step-00000006.safetensors");
    std::fs::write(&newest, &std::fs::read(&newest).unwrap()[..1000]).unwrap();
    let out = ddpm(&["train", "--resume", "k", "--steps", "7"], dir.path());
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("skipping damaged checkpoint") && log.contains("at step 4"),
        "{log}"
    );
    assert!(k.join("checkpoints/step-00000007.json").exists());

    // A finished run resumed as it is: nothing to do, nothing written.
    let metrics = std::fs::read(a.join("metrics.jsonl")).unwrap();
    let out = ddpm(&["train", "--resume", "a"], dir.path());
    assert!(out.status.success() && stderr(&out).contains("nothing to train"));
    assert_eq!(checkpoint_files(&a), a_files);
    assert_eq!(std::fs::read(a.join("metrics.jsonl")).unwrap(), metrics);

    // Settings a resume may change are named; the metrics go on from the resumed step.
    let out = ddpm(
        &["train", "--resume", "a", "--steps", "6", "--lr", "0.002"],
        dir.path(),
    );
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("changed on resume: train.lr: 0.001 → 0.002"),
        "{log}"
    );
    assert!(
        log.contains("changed on resume: train.steps: 4 → 6"),
        "{log}"
    );
    let steps: Vec<u64> = std::fs::read_to_string(a.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6]);

    // `--resume auto` with a configuration file, as a job script restarts: the file describes
    // the run, so its settings hold, and a network it changes is refused.
    let auto = |file: &str| {
        let args = [
            "train", "--resume", "auto", "--out", "a", "--config", file, "--steps", "8",
        ];
        ddpm(&args, dir.path())
    };
    std::fs::write(dir.path().join("wider.toml"), config.replace("16", "32")).unwrap();
    let out = auto("wider.toml");
    assert!(
        !out.status.success() && stderr(&out).contains("model.channels"),
        "{}",
        stderr(&out)
    );
    let out = auto("small.toml");
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("changed on resume: train.lr: 0.002 → 0.001"),
        "{log}"
    );
    assert!(a.join("checkpoints/step-00000008.json").exists());

    // A square size written as HxW is the same network; --epochs reports the steps it sets, once.
    let args = [
        "train",
        "--resume",
        "a",
        "--image-size",
        "8x8",
        "--epochs",
        "1",
        "--stop-at",
        "9",
    ];
    let out = ddpm(&args, dir.path());
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert_eq!(log.matches("train.steps").count(), 1, "{log}");
    assert!(
        log.contains("changed on resume: train.steps: 8 → 625 (1 epoch of 5000 images)"),
        "{log}"
    );
    assert!(
        log.contains("stopped at step 9 of 625 (--stop-at): `ddpm train --resume a` continues"),
        "{log}"
    );
    // `--resume auto` where there is nothing to resume says that a new run starts.
    let out = ddpm(
        &[
            "train",
            "--resume",
            "auto",
            "--out",
            "fresh",
            "--config",
            "small.toml",
            "--steps",
            "1",
        ],
        dir.path(),
    );
    assert!(
        stderr(&out).contains("--resume auto: no checkpoint in fresh, so a new run starts"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn sample_checks_its_flags_and_destinations_before_sampling() {
    let dir = tempfile::tempdir().unwrap();
    let config = "[model]\nchannels = 16\nimage_size = 8\n[train]\nbatch = 8\ndevice = \"cpu\"\n[sample]\nnum = 4\nsteps = 2\nevery = 0\n";
    common::one_step_run(config, "r", dir.path());
    let sample = |extra: &[&str]| {
        let args = [&["sample", "--checkpoint", "r", "--device", "cpu"], extra].concat();
        ddpm(&args, dir.path())
    };
    assert!(sample(&["--num", "2", "--out-dir", "s"]).status.success());
    // Images of any format, in subfolders too, would mix into a FID over the folder.
    std::fs::create_dir_all(dir.path().join("t/older")).unwrap();
    std::fs::copy(
        dir.path().join("s/000000.png"),
        dir.path().join("t/older/a.png"),
    )
    .unwrap();
    for (args, expected) in [
        (
            &["--out-dir", "t"][..],
            "already holds 1 image(s) (in it or its subfolders)",
        ),
        (&["--num", "0", "--out", "g.png"], "--num"),
        (&["--batch", "0", "--out", "g.png"], "--batch"),
        (&["--eta", "2", "--out", "g.png"], "--eta"),
        (&["--steps", "5000", "--out", "g.png"], "sample.steps"),
        (&["--out", "g.jpg"], ".png"),
        (&["--out-dir", "s"], "already holds 2 image(s)"),
        (&["--out-dir", "small.toml"], "small.toml"),
    ] {
        let out = sample(args);
        let log = stderr(&out);
        assert!(!out.status.success(), "{args:?} was accepted: {log}");
        assert!(log.contains(expected), "{args:?}: {log}");
        assert!(
            !log.contains("sampled"),
            "{args:?} sampled before failing: {log}"
        );
    }
    // SIGTERM during sampling stops it at the next step, writing nothing.
    let (mut child, _) = start_command(
        &[
            "sample",
            "--checkpoint",
            "r",
            "--device",
            "cpu",
            "--num",
            "100000",
            "--out",
            "big.png",
        ],
        dir.path(),
        "sampling ",
    );
    unsafe { libc_kill(child.id() as i32, 15) };
    assert_eq!(child.wait().unwrap().code(), Some(130));
    assert!(!dir.path().join("big.png").exists());
}

#[test]
fn a_grid_that_cannot_be_written_stops_the_run_with_a_checkpoint_of_its_step() {
    // Without periodic checkpoints the failure writes one; with one at the same step, the
    // error points at it.
    for checkpoint_every in [0, 2] {
        let dir = tempfile::tempdir().unwrap();
        let config = format!("[model]\nchannels = 16\nimage_size = 8\n[train]\nbatch = 8\ndevice = \"cpu\"\n[sample]\nnum = 4\nsteps = 2\nevery = 2\n[checkpoint]\nevery = {checkpoint_every}\n");
        std::fs::write(dir.path().join("small.toml"), config).unwrap();
        // A folder where the step-2 grid goes, left in the run directory of an earlier start
        // (its lock file marks it as one): the grid cannot be written there.
        std::fs::create_dir_all(dir.path().join("r/samples/step-00000002.png")).unwrap();
        std::fs::write(dir.path().join("r/.lock"), "").unwrap();
        let args = [
            "train",
            "--config",
            "small.toml",
            "--steps",
            "4",
            "--out",
            "r",
        ];
        let out = ddpm(&args, dir.path());
        let log = stderr(&out);
        assert!(!out.status.success(), "{log}");
        assert!(
            log.contains("step-00000002.png")
                && log.contains("training stopped at step 2")
                && log.contains("step-00000002.json"),
            "{log}"
        );
        assert!(dir.path().join("r/checkpoints/step-00000002.json").exists());
    }
}

#[test]
fn a_run_directory_takes_one_trainer_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let config = "[model]\nchannels = 16\nimage_size = 8\n[train]\nsteps = 100000\nbatch = 4\nlog_every = 1\ndevice = \"cpu\"\n[sample]\nevery = 0\n";
    std::fs::write(dir.path().join("long.toml"), config).unwrap();
    let args = [
        "train",
        "--resume",
        "auto",
        "--config",
        "long.toml",
        "--out",
        "run",
    ];
    let (mut first, lines) = start_training(&args, dir.path());
    // The same job started again while the first runs (bounded, should the lock fail).
    let second = ddpm(&[&args[..], &["--stop-at", "1"]].concat(), dir.path());
    unsafe { libc_kill(first.id() as i32, 2) };
    let _: Vec<_> = lines.collect();
    assert_eq!(first.wait().unwrap().code(), Some(130));
    let log = stderr(&second);
    assert!(!second.status.success(), "{log}");
    assert!(log.contains("in use by another ddpm process"), "{log}");
    // Once it has stopped, the directory is free again: one more step.
    let sidecar = std::fs::read_dir(dir.path().join("run/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .find(|n| n.ends_with(".json"))
        .unwrap();
    let step: u64 = sidecar["step-".len()..sidecar.len() - ".json".len()]
        .parse()
        .unwrap();
    let steps = (step + 1).to_string();
    let out = ddpm(&["train", "--resume", "run", "--steps", &steps], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));

    let out = ddpm(
        &[
            "launch",
            "--nproc",
            "2",
            "--",
            "sample",
            "--checkpoint",
            "run",
        ],
        dir.path(),
    );
    assert!(
        !out.status.success() && stderr(&out).contains("runs `train`"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn messages_of_ranks_other_than_0_name_their_rank() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ddpm"))
        .args(["train", "--resume", "missing-run"])
        .env("RANK", "1")
        .env("WORLD_SIZE", "2")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let log = stderr(&out);
    assert!(log.starts_with("[rank 1] error: missing-run"), "{log}");
    let out = ddpm(&["train", "--resume", "missing-run"], dir.path());
    assert!(
        stderr(&out).starts_with("error: missing-run"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bench_prints_one_machine_readable_line_per_run() {
    let dir = tempfile::tempdir().unwrap();
    let field = |line: &str, key: &str| -> String {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key} in {line}"))
            .to_string()
    };
    let result = |args: &[&str]| -> String {
        let out = ddpm(args, dir.path());
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let stdout = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = stdout
            .lines()
            .filter(|l| l.starts_with("RESULT "))
            .collect();
        assert_eq!(lines.len(), 1, "{stdout}");
        lines[0].to_string()
    };
    let train = result(&[
        "bench", "train", "--preset", "tiny", "--ch", "16", "--size", "8", "--batch", "4",
        "--warmup", "1", "--steps", "2", "--device", "cpu",
    ]);
    assert_eq!(field(&train, "bench"), "train");
    assert_eq!(field(&train, "batch"), "4");
    assert!(
        field(&train, "img_per_s").parse::<f64>().unwrap() > 0.0,
        "{train}"
    );
    assert!(
        field(&train, "final_loss")
            .parse::<f64>()
            .unwrap()
            .is_finite(),
        "{train}"
    );
    // The levers default to auto (off on a CPU) and the line says what ran; a lever given
    // alone means true, which a CPU refuses.
    assert_eq!(field(&train, "cuda_graph"), "0");
    assert_eq!(field(&train, "fused_norm_silu"), "0");
    let tiny_step = [
        "bench", "train", "--preset", "tiny", "--ch", "16", "--size", "8", "--batch", "4",
        "--warmup", "0", "--steps", "1", "--device", "cpu",
    ];
    let off = result(&[&tiny_step[..], &["--cuda-graph", "false"]].concat());
    assert_eq!(field(&off, "cuda_graph"), "0");
    let on = ddpm(&[&tiny_step[..], &["--cuda-graph"]].concat(), dir.path());
    assert!(
        !on.status.success()
            && stderr(&on).contains("train.cuda_graph (--cuda-graph) needs a CUDA device"),
        "{}",
        stderr(&on)
    );
    // The host's peak memory is measured on a CPU.
    assert!(field(&train, "host_peak_gib").parse::<f64>().unwrap() > 0.0);
    // Two updates later the loss is the same: the gradients were.
    let tiny_bench = [
        "bench", "train", "--preset", "tiny", "--ch", "16", "--size", "8", "--device", "cpu",
    ];
    let three_steps = [
        &tiny_bench[..],
        &[
            "--batch",
            "4",
            "--warmup",
            "1",
            "--steps",
            "2",
            "--dropout",
            "0.2",
        ],
    ]
    .concat();
    let recomputed = result(&[&three_steps[..], &["--activation-checkpointing"]].concat());
    let plain = result(&three_steps);
    assert_eq!(field(&recomputed, "activation_checkpointing"), "1");
    assert_eq!(
        field(&recomputed, "final_loss"),
        field(&plain, "final_loss")
    );
    // The largest batch under a memory limit, found by trying: every batch tried up to it
    // peaked under the limit, the one refused above it (tried or extrapolated) would not.
    let found = result(
        &[
            &tiny_bench[..],
            &["--find-batch", "--batch", "16", "--memory-limit", "0.7"],
        ]
        .concat(),
    );
    let largest: usize = field(&found, "largest_batch").parse().unwrap();
    let refused: usize = field(&found, "refused_batch").parse().unwrap();
    assert!(largest >= 16 && refused > largest, "{found}");
    let tries = field(&found, "tries");
    let peaks: Vec<(usize, f64)> = tries
        .split(',')
        .map(|t| {
            let (batch, peak) = t.split_once(':').unwrap();
            (batch.parse().unwrap(), peak.parse().unwrap())
        })
        .collect();
    assert!(
        peaks.iter().any(|&(b, p)| b == largest && p <= 0.7),
        "{found}"
    );
    assert!(
        peaks.iter().all(|&(b, p)| b > largest || p <= 0.7),
        "{found}"
    );
    // The data benchmark builds no network, so any image size goes, even one the preset's
    // network could not take (cifar10 attends at 16×16).
    let data = result(&["bench", "data", "--size", "8", "--batch", "64"]);
    assert_eq!(field(&data, "bench"), "data");
    // One epoch of the 5,000 bundled digits in whole batches of 64.
    assert_eq!(
        field(&data, "images"),
        (5000usize.div_ceil(64) * 64).to_string()
    );
    assert!(
        field(&data, "img_per_s").parse::<f64>().unwrap() > 0.0,
        "{data}"
    );
}
