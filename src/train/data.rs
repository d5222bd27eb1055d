//! Face-expression data sets from disk.
//!
//! In: FER-2013 as the original `fer2013.csv` (`emotion,pixels,Usage`), the Kaggle folder layout
//! (`train/<class>/*.jpg`, `test/<class>/*.jpg`) or a generic folder-per-class tree with a label mapping onto
//! our seven classes; optionally FER+ vote counts for soft labels. Out: [`Sample`]s holding grey pixels (the
//! images are face crops already) and a target distribution over [`FER_LABELS`].
//!
//! Malformed input (wrong pixel count, unknown class, bad row, undecodable image) is an error naming the file
//! and line, or — with `skip_bad` — skipped and counted in [`Dataset::skipped`].

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use crate::model::FER_LABELS;

use super::rng::Rng;

pub const K: usize = FER_LABELS.len();

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Bad {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("{path}: no images found ({hint})")]
    Empty { path: PathBuf, hint: String },
}

/// One face image.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Grey pixels, row-major, `width × height`.
    pub pixels: Vec<u8>,
    pub width: u32,
    pub height: u32,
    /// Hard label (index into [`FER_LABELS`]); the argmax of `target` for soft labels.
    pub label: usize,
    /// Target distribution (one-hot unless soft labels were loaded).
    pub target: [f32; K],
    /// Where it came from: `relative/path.jpg` or `file.csv:line`.
    pub source: String,
}

/// A list of samples plus how many inputs were skipped as malformed.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub samples: Vec<Sample>,
    pub skipped: usize,
}

impl Dataset {
    pub fn counts(&self) -> [usize; K] {
        counts(&self.samples)
    }
    pub fn len(&self) -> usize {
        self.samples.len()
    }
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

pub fn counts(samples: &[Sample]) -> [usize; K] {
    let mut c = [0; K];
    for s in samples {
        c[s.label] += 1;
    }
    c
}

/// How the data on disk is laid out.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum DataFormat {
    /// Decide from the path: `*.csv` → fer-csv; a folder with `train/` and `test/` → kaggle; else folder.
    Auto,
    /// The original `fer2013.csv` (`emotion,pixels,Usage`).
    FerCsv,
    /// Kaggle layout: `train/<class>/*.jpg` and `test/<class>/*.jpg`.
    Kaggle,
    /// One folder per class (`<root>/<class>/*`), mapped onto our labels with `--label-map`.
    Folder,
}

/// A data set split into the part we train on and the held-out test part.
#[derive(Debug, Clone, Default)]
pub struct Splits {
    pub train: Dataset,
    /// Held out for the final evaluation (`test/`, `PublicTest`, or a stratified slice of a plain folder).
    pub test: Dataset,
    /// What the parts are called, for reports ("train/", "PublicTest", ...).
    pub train_name: String,
    pub test_name: String,
}

/// Options shared by `train` and `eval`.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub format: Option<DataFormat>,
    pub skip_bad: bool,
    /// `folder_name=label` pairs (`label` one of ours, or `skip`).
    pub label_map: BTreeMap<String, String>,
    /// FER+ vote CSV: soft labels replace the folder labels (Kaggle layout only).
    pub ferplus: Option<PathBuf>,
    /// Test fraction carved out of a plain folder layout (stratified, seeded).
    pub test_fraction: f32,
    pub seed: u64,
}

/// Parses `a=b,c=d` into a label map.
pub fn parse_label_map(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut m = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}`: expected folder=label"))?;
        let v = v.trim().to_ascii_lowercase();
        if v != "skip" && !FER_LABELS.contains(&v.as_str()) {
            return Err(format!(
                "`{part}`: `{v}` is not one of {} or `skip`",
                FER_LABELS.join(", ")
            ));
        }
        m.insert(k.trim().to_ascii_lowercase(), v);
    }
    Ok(m)
}

/// Our label index for a class folder name: the explicit map first, then our names and common synonyms.
/// `Ok(None)` means "skip this class".
fn class_index(name: &str, map: &BTreeMap<String, String>) -> Result<Option<usize>, String> {
    let lower = name.to_ascii_lowercase();
    let target = match map.get(&lower) {
        Some(v) if v == "skip" => return Ok(None),
        Some(v) => v.clone(),
        None => match lower.as_str() {
            "anger" | "angry" => "angry",
            "disgust" | "disgusted" => "disgust",
            "fear" | "fearful" | "afraid" => "fear",
            "happy" | "happiness" | "joy" => "happy",
            "sad" | "sadness" => "sad",
            "surprise" | "surprised" => "surprise",
            "neutral" | "calm" => "neutral",
            _ => {
                return Err(format!(
                    "unknown class folder `{name}`; map it with --label-map {name}=<{}|skip>",
                    FER_LABELS.join("|")
                ));
            }
        }
        .to_owned(),
    };
    Ok(FER_LABELS.iter().position(|l| *l == target))
}

fn one_hot(label: usize) -> [f32; K] {
    let mut t = [0.0; K];
    t[label] = 1.0;
    t
}

/// Detects the format of `path`.
pub fn detect(path: &Path) -> DataFormat {
    if path.is_file() {
        DataFormat::FerCsv
    } else if path.join("train").is_dir() && path.join("test").is_dir() {
        DataFormat::Kaggle
    } else {
        DataFormat::Folder
    }
}

/// Loads train + held-out test parts of a data set.
pub fn load_splits(path: &Path, opts: &LoadOptions) -> Result<Splits, DataError> {
    let format = match opts.format.unwrap_or(DataFormat::Auto) {
        DataFormat::Auto => detect(path),
        f => f,
    };
    let mut splits = match format {
        DataFormat::FerCsv => {
            let mut parts = load_fer_csv(path, opts.skip_bad)?;
            let train = parts.remove("Training").unwrap_or_default();
            let test = parts.remove("PublicTest").unwrap_or_default();
            let skipped = parts.get("_skipped").map(|d| d.skipped).unwrap_or(0);
            let mut train = train;
            train.skipped += skipped;
            Splits {
                train,
                test,
                train_name: "Training".into(),
                test_name: "PublicTest".into(),
            }
        }
        DataFormat::Kaggle => Splits {
            train: load_folder(&path.join("train"), path, opts)?,
            test: load_folder(&path.join("test"), path, opts)?,
            train_name: "train/".into(),
            test_name: "test/".into(),
        },
        DataFormat::Folder | DataFormat::Auto => {
            let all = load_folder(path, path, opts)?;
            let skipped = all.skipped;
            let (train, test) =
                stratified_split(all.samples, opts.test_fraction.max(0.0), opts.seed ^ 0x7E57);
            Splits {
                train: Dataset {
                    samples: train,
                    skipped,
                },
                test: Dataset {
                    samples: test,
                    skipped: 0,
                },
                train_name: "folder (train part)".into(),
                test_name: format!(
                    "folder (stratified {:.0}% held out)",
                    opts.test_fraction * 100.0
                ),
            }
        }
    };
    if let Some(votes) = &opts.ferplus {
        if format != DataFormat::Kaggle {
            return Err(DataError::BadFile {
                path: votes.clone(),
                reason: "FER+ votes are matched by JPEG path and need the Kaggle folder layout"
                    .into(),
            });
        }
        let votes = load_ferplus(votes)?;
        apply_ferplus(&mut splits.train, &votes);
        apply_ferplus(&mut splits.test, &votes);
    }
    if splits.train.is_empty() {
        return Err(DataError::Empty {
            path: path.to_owned(),
            hint: format!("{:?} layout, training part", format),
        });
    }
    Ok(splits)
}

/// Loads the part of a data set `eval` measures: Kaggle `test/`, CSV `PublicTest` (or `usage`), or every
/// image of a plain folder.
pub fn load_eval(
    path: &Path,
    opts: &LoadOptions,
    part: Option<&str>,
) -> Result<(Dataset, String), DataError> {
    let format = match opts.format.unwrap_or(DataFormat::Auto) {
        DataFormat::Auto => detect(path),
        f => f,
    };
    let (mut ds, name) = match format {
        DataFormat::FerCsv => {
            let usage = part.unwrap_or("PublicTest");
            let mut parts = load_fer_csv(path, opts.skip_bad)?;
            let skipped = parts.get("_skipped").map(|d| d.skipped).unwrap_or(0);
            let mut d = parts.remove(usage).unwrap_or_default();
            d.skipped += skipped;
            (d, usage.to_owned())
        }
        DataFormat::Kaggle => {
            let sub = part.unwrap_or("test");
            (load_folder(&path.join(sub), path, opts)?, format!("{sub}/"))
        }
        _ => (load_folder(path, path, opts)?, "folder".to_owned()),
    };
    if let Some(votes) = &opts.ferplus {
        let votes = load_ferplus(votes)?;
        apply_ferplus(&mut ds, &votes);
    }
    if ds.is_empty() {
        return Err(DataError::Empty {
            path: path.to_owned(),
            hint: format!("{name} is empty"),
        });
    }
    Ok((ds, name))
}

/// Loads the validation part `emotiond train --val-fraction F --test-fraction T --seed S` holds out: its
/// training part (for a plain folder, what remains after the test part `T` of it), then the same stratified,
/// seeded split.
pub fn load_validation(
    path: &Path,
    opts: &LoadOptions,
    val_fraction: f32,
    test_fraction: f32,
    seed: u64,
) -> Result<(Dataset, String), DataError> {
    let opts = LoadOptions {
        test_fraction,
        seed,
        ..opts.clone()
    };
    let splits = load_splits(path, &opts)?;
    let (_, samples) = stratified_split(splits.train.samples, val_fraction, seed);
    let name = format!(
        "val: {:.0} % of {} with seed {seed}",
        100.0 * val_fraction,
        splits.train_name
    );
    if samples.is_empty() {
        return Err(DataError::Empty {
            path: path.to_owned(),
            hint: format!("{name}: --val-fraction must be above 0"),
        });
    }
    let skipped = splits.train.skipped;
    Ok((Dataset { samples, skipped }, name))
}

/// Reads `fer2013.csv` into parts keyed by `Usage` (`Training`, `PublicTest`, `PrivateTest`). Rows with a bad
/// field are errors (`file:line: ...`) or, with `skip_bad`, counted in the `_skipped` entry.
pub fn load_fer_csv(path: &Path, skip_bad: bool) -> Result<BTreeMap<String, Dataset>, DataError> {
    let io = |source| DataError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut parts: BTreeMap<String, Dataset> = BTreeMap::new();
    let mut skipped = 0;
    let mut header: Option<(usize, usize, usize)> = None;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let lineno = i + 1;
        let line = line.map_err(io)?;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let Some((ie, ip, iu)) = header else {
            let pos = |name: &str| fields.iter().position(|f| f.eq_ignore_ascii_case(name));
            match (pos("emotion"), pos("pixels")) {
                (Some(e), Some(p)) => header = Some((e, p, pos("usage").unwrap_or(usize::MAX))),
                _ => {
                    return Err(DataError::Bad {
                        path: path.to_owned(),
                        line: lineno,
                        reason: "expected the header `emotion,pixels,Usage`".into(),
                    });
                }
            }
            continue;
        };
        let row = (|| -> Result<(String, Sample), String> {
            let get = |i: usize, name: &str| {
                fields
                    .get(i)
                    .copied()
                    .ok_or_else(|| format!("missing `{name}` field"))
            };
            let e = get(ie, "emotion")?;
            let label: usize = e
                .parse()
                .ok()
                .filter(|l| *l < K)
                .ok_or_else(|| format!("emotion `{e}` is not a class 0..=6"))?;
            let px = get(ip, "pixels")?;
            let pixels: Result<Vec<u8>, _> =
                px.split_ascii_whitespace().map(str::parse::<u8>).collect();
            let pixels = pixels
                .map_err(|_| "pixels: expected space-separated integers 0..=255".to_string())?;
            if pixels.len() != 48 * 48 {
                return Err(format!(
                    "pixels: {} values, expected 2304 (48×48)",
                    pixels.len()
                ));
            }
            let usage = if iu == usize::MAX {
                "Training".to_owned()
            } else {
                get(iu, "Usage")?.to_owned()
            };
            Ok((
                usage,
                Sample {
                    pixels,
                    width: 48,
                    height: 48,
                    label,
                    target: one_hot(label),
                    source: format!("{}:{lineno}", path.display()),
                },
            ))
        })();
        match row {
            Ok((usage, s)) => parts.entry(usage).or_default().samples.push(s),
            Err(_) if skip_bad => skipped += 1,
            Err(reason) => {
                return Err(DataError::Bad {
                    path: path.to_owned(),
                    line: lineno,
                    reason,
                });
            }
        }
    }
    if header.is_none() {
        return Err(DataError::Bad {
            path: path.to_owned(),
            line: 1,
            reason: "empty file".into(),
        });
    }
    parts.insert(
        "_skipped".into(),
        Dataset {
            samples: Vec::new(),
            skipped,
        },
    );
    Ok(parts)
}

const IMAGE_EXT: &[&str] = &["jpg", "jpeg", "png", "bmp", "pgm", "webp", "tif", "tiff"];

/// Reads `root/<class>/*` images as grey. `base` is what `Sample::source` is relative to.
pub fn load_folder(root: &Path, base: &Path, opts: &LoadOptions) -> Result<Dataset, DataError> {
    let io = |p: &Path| {
        let p = p.to_owned();
        move |source| DataError::Io { path: p, source }
    };
    let mut classes: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(io(root))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    classes.sort();
    let mut ds = Dataset::default();
    for dir in classes {
        let name = dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let label = match class_index(&name, &opts.label_map) {
            Ok(Some(l)) => l,
            Ok(None) => continue,
            Err(reason) => {
                if opts.skip_bad {
                    let n = std::fs::read_dir(&dir).map(|r| r.count()).unwrap_or(0);
                    ds.skipped += n;
                    continue;
                }
                return Err(DataError::BadFile { path: dir, reason });
            }
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(io(&dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for f in files {
            let ext = f
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default();
            let result = if IMAGE_EXT.contains(&ext.as_str()) {
                read_grey(&f)
            } else {
                Err(format!("not an image (extension `{ext}`)"))
            };
            match result {
                Ok((pixels, width, height)) => {
                    let rel = f
                        .strip_prefix(base)
                        .unwrap_or(&f)
                        .to_string_lossy()
                        .replace('\\', "/");
                    ds.samples.push(Sample {
                        pixels,
                        width,
                        height,
                        label,
                        target: one_hot(label),
                        source: rel,
                    });
                }
                Err(_) if opts.skip_bad => ds.skipped += 1,
                Err(reason) => return Err(DataError::BadFile { path: f, reason }),
            }
        }
    }
    Ok(ds)
}

/// Decodes an image file to grey pixels with OpenCV (the daemon's decoder).
pub fn read_grey(path: &Path) -> Result<(Vec<u8>, u32, u32), String> {
    use opencv::prelude::*;
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let buf = opencv::core::Vector::<u8>::from_slice(&bytes);
    let m = opencv::imgcodecs::imdecode(&buf, opencv::imgcodecs::IMREAD_GRAYSCALE)
        .map_err(|e| format!("cannot decode image: {e}"))?;
    if m.empty() || m.rows() < 8 || m.cols() < 8 {
        return Err("cannot decode image (corrupt, empty or smaller than 8×8)".into());
    }
    let m = if m.is_continuous() {
        m
    } else {
        m.try_clone().map_err(|e| e.to_string())?
    };
    let px = m.data_bytes().map_err(|e| e.to_string())?.to_vec();
    Ok((px, m.cols() as u32, m.rows() as u32))
}

/// FER+ vote distributions over our labels, keyed by JPEG path (`train/angry/Training_1.jpg`) and by file name.
pub fn load_ferplus(path: &Path) -> Result<HashMap<String, [f32; K]>, DataError> {
    let io = |source| DataError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut lines = BufReader::new(file).lines().enumerate();
    let header = match lines.next() {
        Some((_, l)) => l.map_err(io)?,
        None => {
            return Err(DataError::Bad {
                path: path.to_owned(),
                line: 1,
                reason: "empty file".into(),
            });
        }
    };
    let cols: Vec<String> = header
        .trim_end_matches('\r')
        .split(',')
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    let col = |name: &str| cols.iter().position(|c| c == name);
    let bad = |line: usize, reason: String| DataError::Bad {
        path: path.to_owned(),
        line,
        reason,
    };
    let ipath = col("jpeg_path").ok_or_else(|| bad(1, "no `jpeg_path` column".into()))?;
    // FER+ vote columns → our label order (contempt, unknown and NF are dropped).
    let ours = [
        "anger",
        "disgust",
        "fear",
        "happiness",
        "sadness",
        "surprise",
        "neutral",
    ];
    let idx: Vec<usize> = ours
        .iter()
        .map(|n| col(n).ok_or_else(|| bad(1, format!("no `{n}` vote column"))))
        .collect::<Result<_, _>>()?;
    let mut map = HashMap::new();
    for (i, line) in lines {
        let line = line.map_err(io)?;
        let f: Vec<&str> = line
            .trim_end_matches('\r')
            .split(',')
            .map(str::trim)
            .collect();
        if f.len() < cols.len() {
            if line.trim().is_empty() {
                continue;
            }
            return Err(bad(
                i + 1,
                format!("{} fields, expected {}", f.len(), cols.len()),
            ));
        }
        if idx.iter().all(|&c| f[c].is_empty()) {
            continue; // a JPEG the FER+ release has no image for: no votes, no label
        }
        let mut v = [0.0f32; K];
        for (k, &c) in idx.iter().enumerate() {
            v[k] = f[c]
                .parse()
                .map_err(|_| bad(i + 1, format!("vote `{}` is not a number", f[c])))?;
        }
        let sum: f32 = v.iter().sum();
        if sum <= 0.0 {
            continue; // only contempt/unknown/not-a-face votes: no usable label
        }
        v.iter_mut().for_each(|x| *x /= sum);
        let key = f[ipath].to_owned();
        if let Some(name) = Path::new(&key).file_name() {
            map.insert(name.to_string_lossy().to_string(), v);
        }
        map.insert(key, v);
    }
    Ok(map)
}

/// A sample's votes, looked up by its source path, then by its file name.
fn votes_for<'a>(s: &Sample, votes: &'a HashMap<String, [f32; K]>) -> Option<&'a [f32; K]> {
    votes.get(&s.source).or_else(|| {
        let name = Path::new(&s.source).file_name()?.to_string_lossy();
        votes.get(name.as_ref())
    })
}

/// Replaces targets by vote distributions; images without usable votes are dropped (counted as skipped).
pub fn apply_ferplus(ds: &mut Dataset, votes: &HashMap<String, [f32; K]>) {
    let before = ds.samples.len();
    ds.samples.retain_mut(|s| match votes_for(s, votes) {
        Some(v) => {
            s.target = *v;
            s.label = argmax(v);
            true
        }
        None => false,
    });
    ds.skipped += before - ds.samples.len();
}

/// Blends vote distributions into the targets, `target = (1 − weight)·target + weight·votes`, keeping each
/// sample's label (what accuracy scores) and every sample (those without usable votes keep their target).
/// Returns how many samples had votes.
pub fn blend_ferplus(
    samples: &mut [Sample],
    votes: &HashMap<String, [f32; K]>,
    weight: f32,
) -> usize {
    let mut matched = 0;
    for s in samples {
        if let Some(v) = votes_for(s, votes) {
            for (t, &p) in s.target.iter_mut().zip(v) {
                *t = (1.0 - weight) * *t + weight * p;
            }
            matched += 1;
        }
    }
    matched
}

pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv { (i, x) } else { (bi, bv) }
        })
        .0
}

/// Splits off `fraction` of each class (at least one sample of every class with ≥ 2), seeded.
pub fn stratified_split(
    samples: Vec<Sample>,
    fraction: f32,
    seed: u64,
) -> (Vec<Sample>, Vec<Sample>) {
    let mut by_class: Vec<Vec<Sample>> = vec![Vec::new(); K];
    for s in samples {
        by_class[s.label].push(s);
    }
    let mut rng = Rng::new(seed);
    let (mut keep, mut held) = (Vec::new(), Vec::new());
    for mut class in by_class {
        rng.shuffle(&mut class);
        let n = class.len();
        let mut h = (n as f32 * fraction).round() as usize;
        if fraction > 0.0 && h == 0 && n >= 2 {
            h = 1;
        }
        let rest = class.split_off(h.min(n));
        held.extend(class);
        keep.extend(rest);
    }
    (keep, held)
}

/// Undersampling: at most `cap` samples per class, chosen at random (seeded).
pub fn undersample(samples: Vec<Sample>, cap: usize, seed: u64) -> Vec<Sample> {
    let mut by_class: Vec<Vec<Sample>> = vec![Vec::new(); K];
    for s in samples {
        by_class[s.label].push(s);
    }
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    for mut class in by_class {
        rng.shuffle(&mut class);
        class.truncate(cap);
        out.extend(class);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn px_row(v: u8) -> String {
        vec![v.to_string(); 2304].join(" ")
    }

    #[test]
    fn fer_csv_loads_and_names_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fer2013.csv");
        let mut f = std::fs::File::create(&p).unwrap();
        writeln!(f, "emotion,pixels,Usage").unwrap();
        writeln!(f, "3,{},Training", px_row(10)).unwrap();
        writeln!(f, "0,{},PublicTest", px_row(200)).unwrap();
        writeln!(f, "6,{},Training", px_row(0)).unwrap();
        drop(f);
        let parts = load_fer_csv(&p, false).unwrap();
        assert_eq!(parts["Training"].len(), 2);
        assert_eq!(parts["Training"].samples[0].label, 3);
        assert_eq!(parts["PublicTest"].samples[0].pixels[5], 200);

        // Wrong pixel count on line 3, unknown class on line 4, bad pixel value on line 5.
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        writeln!(f, "2,1 2 3,Training").unwrap();
        writeln!(f, "9,{},Training", px_row(1)).unwrap();
        writeln!(f, "1,{} 300,Training", vec!["1"; 2303].join(" ")).unwrap();
        drop(f);
        let e = load_fer_csv(&p, false).unwrap_err().to_string();
        assert!(
            e.contains("fer2013.csv:5:") && e.contains("3 values"),
            "{e}"
        );
        let parts = load_fer_csv(&p, true).unwrap();
        assert_eq!(parts["_skipped"].skipped, 3);
        assert_eq!(parts["Training"].len(), 2);

        let q = dir.path().join("nohead.csv");
        std::fs::write(&q, "a,b\n1,2\n").unwrap();
        let e = load_fer_csv(&q, false).unwrap_err().to_string();
        assert!(e.contains("nohead.csv:1:") && e.contains("header"), "{e}");
    }

    fn write_png(path: &Path, v: u8) {
        let m = opencv::core::Mat::new_rows_cols_with_default(
            48,
            48,
            opencv::core::CV_8UC1,
            opencv::core::Scalar::all(v as f64),
        )
        .unwrap();
        opencv::imgcodecs::imwrite(path.to_str().unwrap(), &m, &opencv::core::Vector::new())
            .unwrap();
    }

    #[test]
    fn kaggle_and_generic_folders() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (split, class, n) in [
            ("train", "happy", 3),
            ("train", "sad", 2),
            ("test", "happy", 1),
        ] {
            std::fs::create_dir_all(root.join(split).join(class)).unwrap();
            for i in 0..n {
                write_png(
                    &root.join(split).join(class).join(format!("{i}.png")),
                    100 + i as u8,
                );
            }
        }
        let opts = LoadOptions::default();
        let s = load_splits(root, &opts).unwrap();
        assert_eq!(s.train.len(), 5);
        assert_eq!(s.test.len(), 1);
        assert_eq!(s.train.counts()[3], 3);
        assert_eq!(s.train.samples[0].source, "train/happy/0.png");
        assert_eq!(s.train.samples[1].pixels[0], 101);

        // A corrupt image and an unknown class.
        std::fs::write(root.join("train/happy/bad.jpg"), b"not a jpeg").unwrap();
        let e = load_splits(root, &opts).unwrap_err().to_string();
        assert!(e.contains("bad.jpg") && e.contains("decode"), "{e}");
        std::fs::create_dir_all(root.join("train/contempt")).unwrap();
        write_png(&root.join("train/contempt/0.png"), 1);
        let skip = LoadOptions {
            skip_bad: true,
            ..Default::default()
        };
        let s = load_splits(root, &skip).unwrap();
        assert_eq!((s.train.len(), s.train.skipped), (5, 2));
        std::fs::remove_file(root.join("train/happy/bad.jpg")).unwrap();
        let e = load_splits(root, &opts).unwrap_err().to_string();
        assert!(e.contains("contempt") && e.contains("--label-map"), "{e}");

        // Generic folder with a label map.
        let g = root.join("train");
        let map = parse_label_map("contempt=disgust").unwrap();
        let opts = LoadOptions {
            label_map: map,
            test_fraction: 0.0,
            format: Some(DataFormat::Folder),
            ..Default::default()
        };
        let s = load_splits(&g, &opts).unwrap();
        assert_eq!(s.train.counts()[1], 1);
        assert!(parse_label_map("x=bogus").is_err());
    }

    #[test]
    fn ferplus_soft_labels() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("votes.csv");
        std::fs::write(
            &p,
            "jpeg_path,ferplus_image,rmse,ambiguous_duplicate,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF\n\
             train/angry/a.jpg,x.png,1,0,2,0,0,0,8,0,0,0,0,0\n\
             train/angry/b.jpg,y.png,1,0,0,0,0,0,0,0,0,0,0,10\n\
             train/angry/c.jpg,,12.5,,,,,,,,,,,\n",
        )
        .unwrap();
        let votes = load_ferplus(&p).unwrap();
        assert!(!votes.contains_key("train/angry/c.jpg"));
        let v = votes["train/angry/a.jpg"];
        assert!((v[0] - 0.8).abs() < 1e-6 && (v[6] - 0.2).abs() < 1e-6);
        assert!(!votes.contains_key("train/angry/b.jpg"));
        let s = |src: &str| Sample {
            pixels: vec![],
            width: 0,
            height: 0,
            label: 3,
            target: one_hot(3),
            source: src.into(),
        };
        let mut ds = Dataset {
            samples: vec![s("train/angry/a.jpg"), s("train/angry/b.jpg")],
            skipped: 0,
        };
        apply_ferplus(&mut ds, &votes);
        assert_eq!((ds.len(), ds.skipped, ds.samples[0].label), (1, 1, 0));

        // Blending keeps every sample and its label; only the matched target moves towards the votes.
        let mut samples = vec![
            s("train/angry/a.jpg"),
            s("train/angry/b.jpg"),
            s("other.jpg"),
        ];
        assert_eq!(blend_ferplus(&mut samples, &votes, 0.5), 1);
        let t = samples[0].target;
        assert!(
            (t[3] - 0.5).abs() < 1e-6 && (t[0] - 0.4).abs() < 1e-6 && (t[6] - 0.1).abs() < 1e-6
        );
        assert!((t.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(
            samples.iter().map(|s| s.label).collect::<Vec<_>>(),
            [3, 3, 3]
        );
        assert_eq!(
            (samples[1].target, samples[2].target),
            (one_hot(3), one_hot(3))
        );
    }

    #[test]
    fn split_and_undersample_are_stratified_and_seeded() {
        let mk = |label| Sample {
            pixels: vec![],
            width: 0,
            height: 0,
            label,
            target: one_hot(label),
            source: String::new(),
        };
        let samples: Vec<Sample> = (0..100).map(|i| mk(if i < 80 { 0 } else { 1 })).collect();
        let (train, val) = stratified_split(samples.clone(), 0.1, 1);
        assert_eq!(counts(&val)[..2], [8, 2]);
        assert_eq!(train.len(), 90);
        let capped = undersample(samples, 30, 1);
        assert_eq!(counts(&capped)[..2], [30, 20]);
    }
}
