//! A camera's own training data: its folder of frames, read with a memory budget.
//!
//! [`crate::data::load_dir`] decodes a whole train/test split into float tensors, which is
//! right for the coordinator and for simulating a fleet from one dataset, but a camera with
//! thousands of frames would then hold 4 bytes per pixel plus the decode buffers, and the
//! test split it never uses. [`LocalSet`] instead keeps frames as bytes (¼ of the floats)
//! while they fit in `max_memory_bytes`, and past that keeps only their paths (or IDX file
//! offsets) and decodes each mini-batch when training asks for it, so memory is bounded by
//! the batch size rather than by the number of frames.
//!
//! Layouts accepted (first match wins):
//! - **IDX directory**: `train-images-idx3-ubyte[.gz]` + `train-labels-idx1-ubyte[.gz]` (the
//!   test split is not read). An uncompressed images file is read lazily by offset; a `.gz`
//!   one cannot be, so it must fit the budget.
//! - **Flat folder with a labels file**: `labels.csv` with header `file,label`, `file` relative
//!   to the folder, `label` a class index or, with `classes` given, a class name.
//! - **Image folder**: `<class>/*.png|jpg|jpeg`, directly under the folder or under `train/`
//!   (the layout of README's "Data" section).
//!
//! Frames must share one size; grey or RGB is taken from the first frame's colour type.
//!
//! Frames without a label (issue #18; the convention is in [`crate::noise`]): an
//! `unlabelled/` folder beside the class folders, an empty label in `labels.csv`, label byte
//! 255 in IDX. They are held with label [`UNLABELLED`].

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tch::nn::{ModuleT, VarStore};
use tch::{Kind, Tensor};

use crate::data::{find_idx, is_image, parse_idx_labels, read_bounded, sorted_entries};
use crate::noise::UNLABELLED;
use crate::train::{train, train_batches, TrainConfig, TrainStats};
use crate::{DataShape, Dataset, ModelError};

/// Name of the labels file of a flat frame folder.
pub const LABELS_FILE: &str = "labels.csv";
/// Folder of frames without a label, beside the class folders.
pub const UNLABELLED_DIR: &str = "unlabelled";
/// IDX label byte of a frame without a label.
pub const IDX_UNLABELLED: i64 = 255;

/// How to read a camera's folder.
#[derive(Clone, Debug)]
pub struct LocalOptions {
    /// Above this many bytes of decoded frames (`N·C·H·W`), frames are decoded per batch.
    pub max_memory_bytes: u64,
    /// The fleet's class names in label order. Needed to name labels in `labels.csv` and to
    /// keep indices fleet-wide when a camera has not seen every class; without it, classes
    /// are the sorted class folders (or `max label + 1` for numeric labels).
    pub classes: Option<Vec<String>>,
}

impl Default for LocalOptions {
    fn default() -> Self {
        LocalOptions {
            max_memory_bytes: 64 << 20,
            classes: None,
        }
    }
}

/// Where one frame lives when it is not held in memory.
#[derive(Debug)]
enum Frame {
    File(PathBuf),
    /// Byte offset of the frame in an uncompressed IDX images file.
    Idx(u64),
}

#[derive(Debug)]
enum Store {
    /// All frames as bytes, `[N, C, H, W]` `Uint8`.
    Resident(Tensor),
    /// Decoded per batch. `idx_file` is set for IDX frames.
    Lazy {
        frames: Arc<Vec<Frame>>,
        idx_file: Option<Arc<PathBuf>>,
    },
}

/// A camera's frames and labels (see the module docs).
#[derive(Debug)]
pub struct LocalSet {
    /// Geometry and class count.
    pub shape: DataShape,
    labels: Arc<Vec<i64>>,
    store: Store,
}

impl LocalSet {
    /// Reads the folder at `path` (see the module docs for the layouts).
    pub fn open(path: &Path, opts: &LocalOptions) -> Result<LocalSet, ModelError> {
        std::fs::metadata(path).map_err(|e| {
            ModelError::Io(std::io::Error::new(
                e.kind(),
                format!("data {}: {e}", path.display()),
            ))
        })?;
        if find_idx(path, "train-images-idx3-ubyte").is_some() {
            return open_idx(path, opts);
        }
        let labels_csv = path.join(LABELS_FILE);
        let (frames, classes) = if labels_csv.is_file() {
            list_labels_file(path, &labels_csv, opts)?
        } else {
            let root = if path.join("train").is_dir() {
                path.join("train")
            } else {
                path.to_path_buf()
            };
            list_class_folders(&root, opts)?
        };
        open_frames(frames, classes, opts)
    }

    /// Number of frames.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no frames.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Whether frames are decoded per batch (the set exceeds the memory budget).
    pub fn is_lazy(&self) -> bool {
        matches!(self.store, Store::Lazy { .. })
    }

    /// Bytes of frame data held in memory (0 when lazy).
    pub fn resident_bytes(&self) -> u64 {
        match &self.store {
            Store::Resident(t) => t.numel() as u64,
            Store::Lazy { .. } => 0,
        }
    }

    /// Every frame's label ([`UNLABELLED`] for none), without decoding a frame.
    pub fn labels(&self) -> &[i64] {
        &self.labels
    }

    /// A second handle on the same frames (no copy), for a training thread.
    pub fn handle(&self) -> LocalSet {
        LocalSet {
            shape: self.shape,
            labels: self.labels.clone(),
            store: match &self.store {
                Store::Resident(t) => Store::Resident(t.shallow_clone()),
                Store::Lazy { frames, idx_file } => Store::Lazy {
                    frames: frames.clone(),
                    idx_file: idx_file.clone(),
                },
            },
        }
    }

    /// Frames `indices` as `(images [B, C, H, W] float in [-1, 1], labels [B] int64)`.
    pub fn batch(&self, indices: &[i64]) -> Result<(Tensor, Tensor), ModelError> {
        let n = self.len();
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            let l = usize::try_from(i)
                .ok()
                .and_then(|i| self.labels.get(i))
                .ok_or_else(|| ModelError::Shape(format!("frame {i} of {n}")))?;
            labels.push(*l);
        }
        let s = self.shape;
        let bytes = match &self.store {
            Store::Resident(t) => t.f_index_select(0, &Tensor::f_from_slice(indices)?)?,
            Store::Lazy { frames, idx_file } => {
                let frame = s.channels * s.height * s.width;
                let mut pixels = Vec::with_capacity(indices.len() * frame);
                let mut idx = match idx_file {
                    Some(p) => Some(File::open(p.as_path())?),
                    None => None,
                };
                for &i in indices {
                    // In range: checked with the labels above.
                    let f = &frames[i as usize];
                    match (f, idx.as_mut()) {
                        (Frame::File(p), _) => decode_into(p, s, &mut pixels)?,
                        (Frame::Idx(at), Some(file)) => {
                            use std::io::{Read, Seek, SeekFrom};
                            file.seek(SeekFrom::Start(*at))?;
                            let start = pixels.len();
                            pixels.resize(start + frame, 0);
                            file.read_exact(&mut pixels[start..])?;
                        }
                        (Frame::Idx(_), None) => {
                            return Err(ModelError::Format("IDX frame without its file".into()))
                        }
                    }
                }
                Tensor::f_from_slice(&pixels)?.f_reshape([
                    indices.len() as i64,
                    s.channels as i64,
                    s.height as i64,
                    s.width as i64,
                ])?
            }
        };
        let images = bytes
            .f_to_kind(Kind::Float)?
            .f_div_scalar(127.5)?
            .f_sub_scalar(1.0)?;
        Ok((images, Tensor::f_from_slice(&labels)?))
    }
}

/// Decodes one image file and appends its pixels (CHW) to `out`, checking it has `shape`.
fn decode_into(path: &Path, shape: DataShape, out: &mut Vec<u8>) -> Result<(), ModelError> {
    let img =
        image::open(path).map_err(|e| ModelError::Format(format!("{}: {e}", path.display())))?;
    if (img.width() as usize, img.height() as usize) != (shape.width, shape.height) {
        return Err(ModelError::Format(format!(
            "{} is {}x{} but the frames are {}x{}: all frames must share one size",
            path.display(),
            img.width(),
            img.height(),
            shape.width,
            shape.height
        )));
    }
    if shape.channels == 1 {
        out.extend_from_slice(img.to_luma8().as_raw());
    } else {
        // image gives HWC interleaved; the model wants CHW planes.
        let rgb = img.to_rgb8();
        let raw = rgb.as_raw();
        for c in 0..3 {
            out.extend(raw.iter().skip(c).step_by(3));
        }
    }
    Ok(())
}

fn class_count(labels: &[i64], opts: &LocalOptions) -> Result<usize, ModelError> {
    let hi = labels.iter().copied().max().unwrap_or(0).max(0);
    if labels.iter().any(|&l| l < 0 && l != UNLABELLED) {
        return Err(ModelError::Format("negative label".into()));
    }
    let n = match &opts.classes {
        Some(c) => c.len(),
        None => usize::try_from(hi).unwrap_or(0) + 1,
    };
    if usize::try_from(hi).unwrap_or(usize::MAX) >= n {
        return Err(ModelError::Format(format!(
            "label {hi} but [data] classes lists only {n} classes"
        )));
    }
    Ok(n)
}

fn open_idx(dir: &Path, opts: &LocalOptions) -> Result<LocalSet, ModelError> {
    let what = |p: &Path| p.display().to_string();
    let lbl = find_idx(dir, "train-labels-idx1-ubyte").ok_or_else(|| {
        ModelError::Format(format!(
            "{}: missing train-labels-idx1-ubyte[.gz]",
            dir.display()
        ))
    })?;
    let labels: Vec<i64> = parse_idx_labels(&read_bounded(&lbl)?, &what(&lbl))?
        .into_iter()
        .map(|l| if l == IDX_UNLABELLED { UNLABELLED } else { l })
        .collect();
    let img = find_idx(dir, "train-images-idx3-ubyte")
        .ok_or_else(|| ModelError::Format(format!("{}: missing images", dir.display())))?;
    let classes = class_count(&labels, opts)?;
    let gz = img.extension().is_some_and(|e| e == "gz");
    // The header alone tells the size, so an uncompressed file is checked without reading it.
    let mut header = [0u8; 16];
    if !gz {
        use std::io::Read;
        File::open(&img)?
            .read_exact(&mut header)
            .map_err(|e| ModelError::Format(format!("{}: {e}", img.display())))?;
    }
    let full = if gz { Some(read_bounded(&img)?) } else { None };
    let head = full.as_deref().unwrap_or(&header);
    let (n, rows, cols) = crate::data::parse_idx_header3(head, &what(&img))?;
    if n != labels.len() {
        return Err(ModelError::Format(format!(
            "{}: {n} images but {} labels",
            dir.display(),
            labels.len()
        )));
    }
    let shape = DataShape {
        channels: 1,
        height: rows,
        width: cols,
        classes,
    };
    let frame = rows * cols;
    let total = (n as u64).saturating_mul(frame as u64);
    let len = match &full {
        Some(b) => b.len() as u64,
        None => std::fs::metadata(&img)?.len(),
    };
    if len != 16 + total {
        return Err(ModelError::Format(format!(
            "{}: file has {len} bytes, header {n}x{rows}x{cols} needs {}",
            img.display(),
            16 + total
        )));
    }
    let labels = Arc::new(labels);
    if total <= opts.max_memory_bytes || full.is_some() {
        let bytes = match full {
            Some(b) => b,
            None => read_bounded(&img)?,
        };
        if total > opts.max_memory_bytes {
            tracing::warn!(file = %img.display(), bytes = total, budget = opts.max_memory_bytes,
                "a .gz IDX file cannot be read lazily: holding it whole; gunzip it to stay within [data] max_memory_mb");
        }
        let t = Tensor::f_from_slice(&bytes[16..])?.f_reshape([
            n as i64,
            1,
            rows as i64,
            cols as i64,
        ])?;
        return Ok(LocalSet {
            shape,
            labels,
            store: Store::Resident(t),
        });
    }
    let frames = (0..n)
        .map(|i| Frame::Idx(16 + (i * frame) as u64))
        .collect();
    Ok(LocalSet {
        shape,
        labels,
        store: Store::Lazy {
            frames: Arc::new(frames),
            idx_file: Some(Arc::new(img)),
        },
    })
}

/// `labels.csv` (`file,label`) of a flat folder.
fn list_labels_file(
    dir: &Path,
    csv: &Path,
    opts: &LocalOptions,
) -> Result<(Vec<(PathBuf, i64)>, usize), ModelError> {
    let text = String::from_utf8(read_bounded(csv)?)
        .map_err(|_| ModelError::Format(format!("{}: not UTF-8", csv.display())))?;
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, h)) if h.trim() == "file,label" => {}
        _ => {
            return Err(ModelError::Format(format!(
                "{}: expected header `file,label`",
                csv.display()
            )))
        }
    }
    let mut frames = Vec::new();
    for (no, line) in lines {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let at = || format!("{}:{}", csv.display(), no + 1);
        let (file, label) = line
            .rsplit_once(',')
            .map(|(f, l)| (f.trim(), l.trim()))
            .filter(|(f, _)| !f.is_empty())
            .ok_or_else(|| ModelError::Format(format!("{}: expected `file,label`", at())))?;
        let label = match (&opts.classes, label.parse::<i64>()) {
            // An empty label: a frame nobody labelled (the convention of crate::noise).
            _ if label.is_empty() => UNLABELLED,
            (Some(names), _) if names.iter().any(|c| c == label) => {
                names.iter().position(|c| c == label).unwrap_or(0) as i64
            }
            (_, Ok(i)) if i >= 0 => i,
            (Some(_), _) => {
                return Err(ModelError::Format(format!(
                    "{}: label {label:?} is neither a class index nor in [data] classes",
                    at()
                )))
            }
            (None, _) => {
                return Err(ModelError::Format(format!(
                    "{}: label {label:?} is not a class index; list the fleet's class names in [data] classes to use names",
                    at()
                )))
            }
        };
        let rel = Path::new(file);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(ModelError::Format(format!(
                "{}: {file:?} must be a path inside {}",
                at(),
                dir.display()
            )));
        }
        frames.push((dir.join(rel), label));
    }
    let labels: Vec<i64> = frames.iter().map(|(_, l)| *l).collect();
    let classes = class_count(&labels, opts)?;
    Ok((frames, classes))
}

/// `<class>/*.png|jpg|jpeg` under `root`.
fn list_class_folders(
    root: &Path,
    opts: &LocalOptions,
) -> Result<(Vec<(PathBuf, i64)>, usize), ModelError> {
    let dirs: Vec<(String, PathBuf)> = sorted_entries(root)?
        .into_iter()
        .filter(|(_, p)| p.is_dir())
        .collect();
    let classes: Vec<String> = match &opts.classes {
        Some(c) => c.clone(),
        None => dirs
            .iter()
            .map(|(n, _)| n.clone())
            .filter(|n| n != UNLABELLED_DIR)
            .collect(),
    };
    if classes.iter().any(|c| c == UNLABELLED_DIR) {
        return Err(ModelError::Format(format!(
            "{UNLABELLED_DIR:?} is reserved for frames without a label; it cannot be a class name"
        )));
    }
    let mut frames = Vec::new();
    for (name, dir) in &dirs {
        let label = if name == UNLABELLED_DIR {
            UNLABELLED
        } else {
            classes.iter().position(|c| c == name).ok_or_else(|| {
                ModelError::Format(format!(
                    "{}: class folder not in [data] classes",
                    dir.display()
                ))
            })? as i64
        };
        for (file, path) in sorted_entries(dir)? {
            if path.is_file() && is_image(&file) {
                frames.push((path, label));
            }
        }
    }
    if frames.is_empty() {
        return Err(ModelError::Format(format!(
            "{}: no frames (expected <class>/*.png|jpg, train/<class>/…, an IDX directory or {LABELS_FILE})",
            root.display()
        )));
    }
    Ok((frames, classes.len()))
}

fn open_frames(
    frames: Vec<(PathBuf, i64)>,
    classes: usize,
    opts: &LocalOptions,
) -> Result<LocalSet, ModelError> {
    let first = frames
        .first()
        .ok_or_else(|| ModelError::Format("no frames".into()))?;
    let img = image::open(&first.0)
        .map_err(|e| ModelError::Format(format!("{}: {e}", first.0.display())))?;
    let shape = DataShape {
        channels: if img.color().has_color() { 3 } else { 1 },
        height: img.height() as usize,
        width: img.width() as usize,
        classes,
    };
    drop(img);
    let n = frames.len();
    let frame = shape.channels * shape.height * shape.width;
    let total = (n as u64).saturating_mul(frame as u64);
    let labels = Arc::new(frames.iter().map(|(_, l)| *l).collect::<Vec<_>>());
    let store = if total <= opts.max_memory_bytes {
        let mut pixels = Vec::with_capacity(n * frame);
        for (p, _) in &frames {
            decode_into(p, shape, &mut pixels)?;
        }
        Store::Resident(Tensor::f_from_slice(&pixels)?.f_reshape([
            n as i64,
            shape.channels as i64,
            shape.height as i64,
            shape.width as i64,
        ])?)
    } else {
        Store::Lazy {
            frames: Arc::new(frames.into_iter().map(|(p, _)| Frame::File(p)).collect()),
            idx_file: None,
        }
    };
    Ok(LocalSet {
        shape,
        labels,
        store,
    })
}

/// What an edge trains on: a dataset already in memory (a part of a shared dataset, in
/// simulation) or its own frames.
#[derive(Debug)]
pub enum TrainData {
    Memory(Dataset),
    Frames(LocalSet),
}

impl From<Dataset> for TrainData {
    fn from(d: Dataset) -> Self {
        TrainData::Memory(d)
    }
}

impl From<LocalSet> for TrainData {
    fn from(d: LocalSet) -> Self {
        TrainData::Frames(d)
    }
}

impl TrainData {
    /// Number of samples.
    pub fn len(&self) -> usize {
        match self {
            TrainData::Memory(d) => d.len(),
            TrainData::Frames(f) => f.len(),
        }
    }

    /// True when there are no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Geometry and class count.
    pub fn shape(&self) -> DataShape {
        match self {
            TrainData::Memory(d) => d.shape,
            TrainData::Frames(f) => f.shape,
        }
    }

    /// Every sample's label ([`UNLABELLED`] for none).
    pub fn labels(&self) -> Vec<i64> {
        match self {
            TrainData::Memory(d) => d.labels_vec(),
            TrainData::Frames(f) => f.labels().to_vec(),
        }
    }

    /// Samples `idx` as `(images [B, C, H, W] float in [-1, 1], labels [B])` on the CPU.
    pub fn fetch(&self, idx: &[i64]) -> Result<(Tensor, Tensor), ModelError> {
        match self {
            TrainData::Memory(d) => {
                let i = Tensor::f_from_slice(idx)?;
                Ok((
                    d.images.f_index_select(0, &i)?,
                    d.labels.f_index_select(0, &i)?,
                ))
            }
            TrainData::Frames(f) => f.batch(idx),
        }
    }

    /// A second handle on the same data (no copy), for a training thread.
    pub fn handle(&self) -> TrainData {
        match self {
            TrainData::Memory(d) => TrainData::Memory(d.shallow_clone()),
            TrainData::Frames(f) => TrainData::Frames(f.handle()),
        }
    }

    /// [`train`] on this data; own frames are turned into floats one batch at a time.
    pub fn train(
        &self,
        model: &impl ModuleT,
        vs: &VarStore,
        cfg: &TrainConfig,
    ) -> Result<TrainStats, ModelError> {
        match self {
            TrainData::Memory(d) => train(model, vs, d, cfg),
            TrainData::Frames(f) => {
                let device = vs.device();
                train_batches(model, vs, f.len(), cfg, |idx| {
                    let (xs, ys) = f.batch(idx)?;
                    Ok((xs.f_to_device(device)?, ys.f_to_device(device)?))
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `n` frames of `w×h` (grey or RGB) into `dir/<class>/i.png`; frame i has value i.
    fn write_folder(dir: &Path, n: usize, w: u32, h: u32, rgb: bool) {
        for i in 0..n {
            let class = dir.join(format!("c{}", i % 3));
            std::fs::create_dir_all(&class).unwrap();
            let v = (i % 256) as u8;
            let path = class.join(format!("{i:04}.png"));
            if rgb {
                image::RgbImage::from_pixel(w, h, image::Rgb([v, 0, 255]))
                    .save(&path)
                    .unwrap();
            } else {
                image::GrayImage::from_pixel(w, h, image::Luma([v]))
                    .save(&path)
                    .unwrap();
            }
        }
    }

    #[test]
    fn resident_and_lazy_give_the_same_batches() {
        let tmp = tempfile::tempdir().unwrap();
        write_folder(tmp.path(), 30, 8, 6, true);
        let frame = 3 * 8 * 6;
        let resident = LocalSet::open(tmp.path(), &LocalOptions::default()).unwrap();
        // A budget of 10 frames: 30 do not fit, so they are decoded per batch.
        let lazy = LocalSet::open(
            tmp.path(),
            &LocalOptions {
                max_memory_bytes: 10 * frame as u64,
                classes: None,
            },
        )
        .unwrap();
        assert!(!resident.is_lazy() && lazy.is_lazy());
        assert_eq!(resident.resident_bytes(), 30 * frame as u64);
        assert_eq!(lazy.resident_bytes(), 0);
        assert_eq!(
            resident.shape,
            DataShape {
                channels: 3,
                height: 6,
                width: 8,
                classes: 3
            }
        );
        assert_eq!(lazy.shape, resident.shape);
        let idx = [5i64, 0, 29, 7];
        let (a, la) = resident.batch(&idx).unwrap();
        let (b, lb) = lazy.handle().batch(&idx).unwrap();
        assert_eq!(a.size(), vec![4, 3, 6, 8]);
        assert!(a.equal(&b) && la.equal(&lb));
        // Frames are listed by class then name: index 5 is c0/0015.png. CHW planes,
        // normalised: red = value, green = 0 → -1, blue = 255 → 1.
        let px = |t: &Tensor, i: i64, c: i64| t.double_value(&[i, c, 0, 0]);
        assert!((px(&a, 0, 0) - (15.0 / 127.5 - 1.0)).abs() < 1e-6);
        assert_eq!(px(&a, 0, 1), -1.0);
        assert_eq!(px(&a, 0, 2), 1.0);
        assert_eq!(Vec::<i64>::try_from(&la).unwrap(), vec![0, 0, 2, 0]);
        assert!(lazy.batch(&[30]).is_err(), "out-of-range frame is an error");
    }

    #[test]
    fn labels_file_and_bad_frames_are_typed_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        for i in 0..4u8 {
            image::GrayImage::from_pixel(5, 5, image::Luma([i]))
                .save(d.join(format!("f{i}.png")))
                .unwrap();
        }
        std::fs::write(
            d.join(LABELS_FILE),
            "file,label\nf0.png,cat\nf1.png,dog\nf2.png,1\nf3.png,cat\n",
        )
        .unwrap();
        // Names need the fleet's class list.
        let err = LocalSet::open(d, &LocalOptions::default()).unwrap_err();
        assert!(err.to_string().contains("[data] classes"), "{err}");
        let opts = LocalOptions {
            max_memory_bytes: 0,
            classes: Some(vec!["cat".into(), "dog".into(), "bird".into()]),
        };
        let set = LocalSet::open(d, &opts).unwrap();
        assert_eq!(set.shape.classes, 3);
        assert_eq!(set.shape.channels, 1);
        let (_, l) = set.batch(&[0, 1, 2, 3]).unwrap();
        assert_eq!(Vec::<i64>::try_from(&l).unwrap(), vec![0, 1, 1, 0]);
        // A frame of another size is reported by name when its batch is decoded.
        image::GrayImage::from_pixel(6, 5, image::Luma([0]))
            .save(d.join("f3.png"))
            .unwrap();
        let err = set.batch(&[3]).unwrap_err().to_string();
        assert!(err.contains("f3.png") && err.contains("6x5"), "{err}");
        // Escaping the folder is refused.
        std::fs::write(d.join(LABELS_FILE), "file,label\n../x.png,1\n").unwrap();
        assert!(LocalSet::open(d, &opts).is_err());
    }

    #[test]
    fn idx_directory_is_read_by_offset_past_the_budget() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let (n, side) = (12u32, 4u32);
        let mut img = Vec::new();
        for v in [0x0803u32, n, side, side] {
            img.extend_from_slice(&v.to_be_bytes());
        }
        for i in 0..n * side * side {
            img.push((i % 251) as u8);
        }
        std::fs::write(d.join("train-images-idx3-ubyte"), &img).unwrap();
        let mut lbl = Vec::new();
        for v in [0x0801u32, n] {
            lbl.extend_from_slice(&v.to_be_bytes());
        }
        lbl.extend((0..n).map(|i| (i % 4) as u8));
        std::fs::write(d.join("train-labels-idx1-ubyte"), &lbl).unwrap();
        let resident = LocalSet::open(d, &LocalOptions::default()).unwrap();
        let lazy = LocalSet::open(
            d,
            &LocalOptions {
                max_memory_bytes: 16,
                classes: None,
            },
        )
        .unwrap();
        assert!(!resident.is_lazy() && lazy.is_lazy());
        assert_eq!(lazy.shape.classes, 4);
        assert_eq!(lazy.len(), 12);
        let idx = [11i64, 3, 0];
        let (a, la) = resident.batch(&idx).unwrap();
        let (b, lb) = lazy.batch(&idx).unwrap();
        assert!(a.equal(&b) && la.equal(&lb));
        // Frame 11's first pixel is byte 11·16 = 176.
        assert!((b.double_value(&[0, 0, 0, 0]) - (176.0 / 127.5 - 1.0)).abs() < 1e-6);
        // A truncated images file is refused when opened, not mid-round.
        std::fs::write(d.join("train-images-idx3-ubyte"), &img[..img.len() - 1]).unwrap();
        let err = LocalSet::open(d, &LocalOptions::default()).unwrap_err();
        assert!(err.to_string().contains("needs"), "{err}");
    }
}

#[cfg(test)]
mod unlabelled_tests {
    use super::*;

    #[test]
    fn unlabelled_frames_by_folder_and_by_empty_label() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        for (dir, n) in [("a", 2), ("b", 1), (UNLABELLED_DIR, 3)] {
            std::fs::create_dir_all(d.join(dir)).unwrap();
            for i in 0..n {
                image::GrayImage::from_pixel(4, 4, image::Luma([i as u8]))
                    .save(d.join(dir).join(format!("{i}.png")))
                    .unwrap();
            }
        }
        let set = LocalSet::open(d, &LocalOptions::default()).unwrap();
        assert_eq!(set.shape.classes, 2, "`unlabelled` is not a class");
        assert_eq!(set.labels(), &[0, 0, 1, -1, -1, -1]);
        // `unlabelled` cannot be a class name.
        let opts = LocalOptions {
            classes: Some(vec!["a".into(), UNLABELLED_DIR.into()]),
            ..LocalOptions::default()
        };
        assert!(LocalSet::open(d, &opts).is_err());
        // labels.csv: an empty label.
        let flat = tempfile::tempdir().unwrap();
        for i in 0..3u8 {
            image::GrayImage::from_pixel(4, 4, image::Luma([i]))
                .save(flat.path().join(format!("f{i}.png")))
                .unwrap();
        }
        std::fs::write(
            flat.path().join(LABELS_FILE),
            "file,label\nf0.png,1\nf1.png,\nf2.png,0\n",
        )
        .unwrap();
        let set = LocalSet::open(flat.path(), &LocalOptions::default()).unwrap();
        assert_eq!(set.labels(), &[1, UNLABELLED, 0]);
        assert_eq!(set.shape.classes, 2);
    }
}
