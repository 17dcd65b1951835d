//! Datasets: IDX directories, image folders and a synthetic toy set.
//!
//! All loaders produce the same in-memory form ([`Dataset`]): a float tensor normalised to
//! `[-1, 1]` plus int64 labels, so that models are built from the data's [`DataShape`] and never
//! from a hard-coded dataset name. Parsing is bounded (size caps, checked arithmetic, magic
//! numbers) because dataset directories may be user supplied.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use tch::{Kind, Tensor};

use crate::ModelError;

/// Biggest (decompressed) IDX or clients file we accept: far above Fashion-MNIST's 47 MB and
/// small enough that a hostile or corrupt `.gz` cannot exhaust memory.
const MAX_FILE_BYTES: u64 = 1 << 30;
/// IDX magic for unsigned-byte, 3-dimensional data (images).
const IDX_IMAGES_MAGIC: u32 = 0x0000_0803;
/// IDX magic for unsigned-byte, 1-dimensional data (labels).
const IDX_LABELS_MAGIC: u32 = 0x0000_0801;

/// Geometry and class count of a dataset: everything a model needs to size its layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataShape {
    /// Colour channels (1 = grey, 3 = RGB).
    pub channels: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// Number of classes; labels are in `0..classes`.
    pub classes: usize,
}

/// One split (train or test) held in memory.
#[derive(Debug)]
pub struct Dataset {
    /// `[N, C, H, W]`, `Kind::Float`, `pixel / 255` then normalised with `(x - 0.5) / 0.5`.
    pub images: Tensor,
    /// `[N]`, `Kind::Int64`.
    pub labels: Tensor,
    /// Per-sample client/writer id, when the dataset ships a clients file (natural partition).
    pub clients: Option<Vec<String>>,
    /// Geometry and class count shared by train and test.
    pub shape: DataShape,
}

impl Dataset {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels
            .size()
            .first()
            .map_or(0, |&n| usize::try_from(n).unwrap_or(0))
    }

    /// True when there are no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A second handle on the same tensor storage (no copy), e.g. to hand the data to a
    /// blocking training thread while the owner keeps its own.
    pub fn shallow_clone(&self) -> Dataset {
        Dataset {
            images: self.images.shallow_clone(),
            labels: self.labels.shallow_clone(),
            clients: self.clients.clone(),
            shape: self.shape,
        }
    }

    /// Copies the given rows into a new dataset, keeping `clients` aligned.
    ///
    /// Out-of-range indices are skipped (and logged) rather than panicking, because the indices
    /// usually come from a partition computed elsewhere.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let n = self.len();
        let kept: Vec<usize> = indices.iter().copied().filter(|&i| i < n).collect();
        if kept.len() != indices.len() {
            tracing::warn!(
                dropped = indices.len() - kept.len(),
                len = n,
                "Dataset::subset: ignoring out-of-range indices"
            );
        }
        let idx: Vec<i64> = kept.iter().map(|&i| i as i64).collect();
        let idx = Tensor::from_slice(&idx).to_device(self.images.device());
        let clients = self
            .clients
            .as_ref()
            .map(|c| kept.iter().filter_map(|&i| c.get(i).cloned()).collect());
        Dataset {
            images: self.images.index_select(0, &idx),
            labels: self.labels.index_select(0, &idx),
            clients,
            shape: self.shape,
        }
    }

    /// Labels as a plain vector (for partitioners and statistics).
    pub fn labels_vec(&self) -> Vec<i64> {
        self.labels
            .f_to_kind(Kind::Int64)
            .and_then(|t| t.f_reshape([-1]))
            .and_then(|t| Vec::<i64>::try_from(&t))
            .unwrap_or_default()
    }
}

/// A train/test pair sharing one [`DataShape`].
#[derive(Debug)]
pub struct DataSplit {
    /// Training samples (partitioned across clients).
    pub train: Dataset,
    /// Held-out samples (evaluation).
    pub test: Dataset,
}

/// Loads a dataset directory, auto-detecting its format.
///
/// - **IDX directory**: `train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`,
///   `t10k-images-idx3-ubyte[.gz]`, `t10k-labels-idx1-ubyte[.gz]`, optional `train-clients.txt` /
///   `t10k-clients.txt` (one client id per line, aligned with the samples). Class count is the
///   max label + 1 over train and test.
/// - **Image folder**: `root/train/<class>/*.png|jpg|jpeg` and `root/test/<class>/…`; classes are
///   the sorted directory names under `root/train`. Optional `root/train-clients.csv` and
///   `root/test-clients.csv` with header `path,client`, where `path` is relative to the split
///   directory (`root/train` or `root/test`) with `/` separators, e.g. `shirt/0001.png`; every
///   image must then be listed. Images may be grey or RGB (if any image has colour, all are
///   loaded as RGB) and must all share one size.
pub fn load_dir(path: &Path) -> Result<DataSplit, ModelError> {
    // A path that does not exist is said so, not reported as an unrecognised layout.
    std::fs::metadata(path).map_err(|e| {
        ModelError::Io(std::io::Error::new(
            e.kind(),
            format!("dataset {}: {e}", path.display()),
        ))
    })?;
    if find_idx(path, "train-images-idx3-ubyte").is_some() {
        load_idx_dir(path)
    } else if path.join("train").is_dir() {
        load_folder(path)
    } else {
        Err(ModelError::Format(format!(
            "{}: neither an IDX directory (train-images-idx3-ubyte[.gz]) nor an image folder (train/<class>/…)",
            path.display()
        )))
    }
}

/// Small learnable synthetic dataset for unit tests only: each class is a distinct fixed ±1
/// pattern, each sample that pattern plus Gaussian noise. Labels cycle through the classes so
/// every class is equally represented. A `classes` of 0 is treated as 1.
pub fn synthetic(train: usize, test: usize, shape: DataShape, seed: u64) -> DataSplit {
    let shape = DataShape {
        classes: shape.classes.max(1),
        ..shape
    };
    let dim = shape.channels * shape.height * shape.width;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Patterns are ±1 on 2×2 pixel blocks: spatially coherent, so a small CNN separates them
    // quickly (per-pixel noise patterns are much harder for conv + pooling).
    let (bh, bw) = (shape.height.div_ceil(2), shape.width.div_ceil(2));
    let patterns: Vec<Vec<f32>> = (0..shape.classes)
        .map(|_| {
            let cells: Vec<f32> = (0..shape.channels * bh * bw)
                .map(|_| if rng.gen_bool(0.5) { 1.0 } else { -1.0 })
                .collect();
            (0..dim)
                .map(|i| {
                    let (c, rest) = (
                        i / (shape.height * shape.width),
                        i % (shape.height * shape.width),
                    );
                    let (y, x) = (rest / shape.width, rest % shape.width);
                    cells[(c * bh + y / 2) * bw + x / 2]
                })
                .collect()
        })
        .collect();
    let mut make = |n: usize| -> Dataset {
        let mut pixels = Vec::with_capacity(n * dim);
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            let class = i % shape.classes;
            labels.push(class as i64);
            for &p in &patterns[class] {
                let noise: f32 = StandardNormal.sample(&mut rng);
                pixels.push(p + 0.7 * noise);
            }
        }
        Dataset {
            images: Tensor::from_slice(&pixels).reshape([
                n as i64,
                shape.channels as i64,
                shape.height as i64,
                shape.width as i64,
            ]),
            labels: Tensor::from_slice(&labels),
            clients: None,
            shape,
        }
    };
    let train = make(train);
    let test = make(test);
    DataSplit { train, test }
}

/// A decoded split before tensors are built: `pixels` is `N·C·H·W` bytes in CHW order.
struct RawSplit {
    pixels: Vec<u8>,
    labels: Vec<i64>,
    clients: Option<Vec<String>>,
    n: usize,
    channels: usize,
    height: usize,
    width: usize,
}

impl RawSplit {
    fn into_dataset(self, shape: DataShape) -> Result<Dataset, ModelError> {
        let dims = [
            self.n as i64,
            self.channels as i64,
            self.height as i64,
            self.width as i64,
        ];
        // bytes → tensor → float, then normalised in place: out-of-place ops would each
        // allocate another float copy of the split (188 MB apiece for a 60k-image set).
        let mut images = Tensor::f_from_slice(&self.pixels)?
            .f_reshape(dims)?
            .f_to_kind(Kind::Float)?;
        let _ = images.f_div_scalar_(127.5)?;
        let _ = images.f_sub_scalar_(1.0)?;
        Ok(Dataset {
            images,
            labels: Tensor::f_from_slice(&self.labels)?,
            clients: self.clients,
            shape,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// IDX

pub(crate) fn find_idx(dir: &Path, stem: &str) -> Option<PathBuf> {
    let raw = dir.join(stem);
    if raw.is_file() {
        return Some(raw);
    }
    let gz = dir.join(format!("{stem}.gz"));
    gz.is_file().then_some(gz)
}

fn require_idx(dir: &Path, stem: &str) -> Result<PathBuf, ModelError> {
    find_idx(dir, stem)
        .ok_or_else(|| ModelError::Format(format!("{}: missing {stem}[.gz]", dir.display())))
}

/// Reads a whole file (gunzipping `*.gz`), refusing anything over [`MAX_FILE_BYTES`].
pub(crate) fn read_bounded(path: &Path) -> Result<Vec<u8>, ModelError> {
    let file = std::fs::File::open(path)?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut out = Vec::new();
    reader
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData
            | std::io::ErrorKind::InvalidInput
            | std::io::ErrorKind::UnexpectedEof => {
                ModelError::Format(format!("{}: {e}", path.display()))
            }
            _ => ModelError::Io(e),
        })?;
    if out.len() as u64 > MAX_FILE_BYTES {
        return Err(ModelError::Limit(format!(
            "{}: larger than {MAX_FILE_BYTES} bytes",
            path.display()
        )));
    }
    Ok(out)
}

fn be_u32(bytes: &[u8], at: usize) -> Option<usize> {
    let b: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    usize::try_from(u32::from_be_bytes(b)).ok()
}

fn idx_header(bytes: &[u8], magic: u32, dims: usize, what: &str) -> Result<Vec<usize>, ModelError> {
    let found = be_u32(bytes, 0)
        .ok_or_else(|| ModelError::Format(format!("{what}: truncated IDX header")))?;
    if found != magic as usize {
        return Err(ModelError::Format(format!(
            "{what}: bad IDX magic {found:#010x}, expected {magic:#010x}"
        )));
    }
    (0..dims)
        .map(|d| {
            be_u32(bytes, 4 + 4 * d)
                .ok_or_else(|| ModelError::Format(format!("{what}: truncated IDX header")))
        })
        .collect()
}

/// The `(n, rows, cols)` of an IDX3 ubyte image header (the first 16 bytes suffice), so a
/// lazy reader can size a file without loading it.
pub(crate) fn parse_idx_header3(
    bytes: &[u8],
    what: &str,
) -> Result<(usize, usize, usize), ModelError> {
    let dims = idx_header(bytes, IDX_IMAGES_MAGIC, 3, what)?;
    if dims[1] == 0 || dims[2] == 0 {
        return Err(ModelError::Format(format!(
            "{what}: zero image dimension {}x{}",
            dims[1], dims[2]
        )));
    }
    Ok((dims[0], dims[1], dims[2]))
}

/// Parses an IDX3 ubyte image file; returns `(n, rows, cols, pixels)`.
pub(crate) fn parse_idx_images(
    bytes: &[u8],
    what: &str,
) -> Result<(usize, usize, usize, Vec<u8>), ModelError> {
    let dims = idx_header(bytes, IDX_IMAGES_MAGIC, 3, what)?;
    let (n, rows, cols) = (dims[0], dims[1], dims[2]);
    if rows == 0 || cols == 0 {
        return Err(ModelError::Format(format!(
            "{what}: zero image dimension {rows}x{cols}"
        )));
    }
    let expected = n
        .checked_mul(rows)
        .and_then(|v| v.checked_mul(cols))
        .and_then(|v| v.checked_add(16))
        .ok_or_else(|| ModelError::Format(format!("{what}: IDX dimensions overflow")))?;
    if bytes.len() != expected {
        return Err(ModelError::Format(format!(
            "{what}: file has {} bytes, header {n}x{rows}x{cols} needs {expected}",
            bytes.len()
        )));
    }
    Ok((n, rows, cols, bytes[16..].to_vec()))
}

/// Parses an IDX1 ubyte label file.
pub(crate) fn parse_idx_labels(bytes: &[u8], what: &str) -> Result<Vec<i64>, ModelError> {
    let dims = idx_header(bytes, IDX_LABELS_MAGIC, 1, what)?;
    let n = dims[0];
    let expected = n
        .checked_add(8)
        .ok_or_else(|| ModelError::Format(format!("{what}: IDX dimensions overflow")))?;
    if bytes.len() != expected {
        return Err(ModelError::Format(format!(
            "{what}: file has {} bytes, header count {n} needs {expected}",
            bytes.len()
        )));
    }
    Ok(bytes[8..].iter().map(|&b| i64::from(b)).collect())
}

/// Reads a clients file: one non-empty id per line, exactly `n` lines.
fn read_clients_txt(path: &Path, n: usize) -> Result<Vec<String>, ModelError> {
    let text = String::from_utf8(read_bounded(path)?)
        .map_err(|_| ModelError::Format(format!("{}: not UTF-8", path.display())))?;
    let mut ids = Vec::with_capacity(n);
    for (line_no, line) in text.lines().enumerate() {
        let id = line.trim();
        if id.is_empty() {
            return Err(ModelError::Format(format!(
                "{}:{}: empty client id",
                path.display(),
                line_no + 1
            )));
        }
        ids.push(id.to_string());
    }
    if ids.len() != n {
        return Err(ModelError::Format(format!(
            "{}: {} client ids for {n} samples",
            path.display(),
            ids.len()
        )));
    }
    Ok(ids)
}

fn load_idx_split(dir: &Path, prefix: &str) -> Result<RawSplit, ModelError> {
    let img_path = require_idx(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let lbl_path = require_idx(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    let (n, height, width, pixels) =
        parse_idx_images(&read_bounded(&img_path)?, &img_path.display().to_string())?;
    let labels = parse_idx_labels(&read_bounded(&lbl_path)?, &lbl_path.display().to_string())?;
    if labels.len() != n {
        return Err(ModelError::Format(format!(
            "{prefix}: {n} images but {} labels",
            labels.len()
        )));
    }
    let clients_path = dir.join(format!("{prefix}-clients.txt"));
    let clients = if clients_path.is_file() {
        Some(read_clients_txt(&clients_path, n)?)
    } else {
        None
    };
    Ok(RawSplit {
        pixels,
        labels,
        clients,
        n,
        channels: 1,
        height,
        width,
    })
}

fn load_idx_dir(dir: &Path) -> Result<DataSplit, ModelError> {
    let train = load_idx_split(dir, "train")?;
    let test = load_idx_split(dir, "t10k")?;
    if (train.height, train.width) != (test.height, test.width) {
        return Err(ModelError::Format(format!(
            "{}: train images are {}x{} but test images are {}x{}",
            dir.display(),
            train.height,
            train.width,
            test.height,
            test.width
        )));
    }
    let max_label = train
        .labels
        .iter()
        .chain(&test.labels)
        .copied()
        .max()
        .unwrap_or(0);
    let shape = DataShape {
        channels: 1,
        height: train.height,
        width: train.width,
        classes: usize::try_from(max_label).unwrap_or(0) + 1,
    };
    Ok(DataSplit {
        train: train.into_dataset(shape)?,
        test: test.into_dataset(shape)?,
    })
}

// ---------------------------------------------------------------------------------------------
// Image folders

pub(crate) fn sorted_entries(dir: &Path) -> Result<Vec<(String, PathBuf)>, ModelError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            return Err(ModelError::Format(format!(
                "{}: non UTF-8 file name",
                entry.path().display()
            )));
        };
        if !name.starts_with('.') {
            out.push((name, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

pub(crate) fn is_image(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.ends_with(".png") || lower.ends_with(".jpg") || lower.ends_with(".jpeg")
}

/// Lists `(relative path "class/file", label, full path)` for one split.
fn list_folder_split(
    split_dir: &Path,
    classes: &[String],
) -> Result<Vec<(String, i64, PathBuf)>, ModelError> {
    let mut out = Vec::new();
    for (class_name, class_dir) in sorted_entries(split_dir)? {
        if !class_dir.is_dir() {
            continue;
        }
        let label = classes
            .iter()
            .position(|c| *c == class_name)
            .ok_or_else(|| {
                ModelError::Format(format!(
                    "{}: class directory not present under train/",
                    class_dir.display()
                ))
            })?;
        for (file_name, file_path) in sorted_entries(&class_dir)? {
            if file_path.is_file() && is_image(&file_name) {
                out.push((format!("{class_name}/{file_name}"), label as i64, file_path));
            }
        }
    }
    Ok(out)
}

fn read_clients_csv(path: &Path) -> Result<BTreeMap<String, String>, ModelError> {
    let text = String::from_utf8(read_bounded(path)?)
        .map_err(|_| ModelError::Format(format!("{}: not UTF-8", path.display())))?;
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, header)) if header.trim() == "path,client" => {}
        _ => {
            return Err(ModelError::Format(format!(
                "{}: expected header `path,client`",
                path.display()
            )))
        }
    }
    let mut map = BTreeMap::new();
    for (line_no, line) in lines {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        // Split at the last comma: client ids have no commas, file names might.
        let (file, client) = line
            .rsplit_once(',')
            .filter(|(f, c)| !f.trim().is_empty() && !c.trim().is_empty())
            .ok_or_else(|| {
                ModelError::Format(format!(
                    "{}:{}: expected `path,client`",
                    path.display(),
                    line_no + 1
                ))
            })?;
        map.insert(file.trim().replace('\\', "/"), client.trim().to_string());
    }
    Ok(map)
}

fn load_folder(root: &Path) -> Result<DataSplit, ModelError> {
    let train_dir = root.join("train");
    let test_dir = root.join("test");
    if !test_dir.is_dir() {
        return Err(ModelError::Format(format!(
            "{}: missing test/ directory",
            root.display()
        )));
    }
    let classes: Vec<String> = sorted_entries(&train_dir)?
        .into_iter()
        .filter(|(_, p)| p.is_dir())
        .map(|(n, _)| n)
        .collect();
    if classes.is_empty() {
        return Err(ModelError::Format(format!(
            "{}: no class directories",
            train_dir.display()
        )));
    }
    let splits = [("train", &train_dir), ("test", &test_dir)];
    let mut decoded = Vec::with_capacity(2);
    let mut any_colour = false;
    let mut size: Option<(u32, u32, PathBuf)> = None;
    for (name, dir) in splits {
        let files = list_folder_split(dir, &classes)?;
        if name == "train" && files.is_empty() {
            return Err(ModelError::Format(format!("{}: no images", dir.display())));
        }
        let mut images = Vec::with_capacity(files.len());
        for (rel, label, full) in files {
            let img = image::open(&full)
                .map_err(|e| ModelError::Format(format!("{}: {e}", full.display())))?;
            let dims = (img.width(), img.height());
            match &size {
                None => size = Some((dims.0, dims.1, full.clone())),
                Some((w, h, first)) if (*w, *h) != dims => {
                    return Err(ModelError::Format(format!(
                        "{} is {}x{} but {} is {w}x{h}: all images must share one size",
                        full.display(),
                        dims.0,
                        dims.1,
                        first.display()
                    )))
                }
                Some(_) => {}
            }
            any_colour |= img.color().has_color();
            images.push((rel, label, img));
        }
        let csv = root.join(format!("{name}-clients.csv"));
        let clients = if csv.is_file() {
            let map = read_clients_csv(&csv)?;
            let ids = images
                .iter()
                .map(|(rel, _, _)| {
                    map.get(rel).cloned().ok_or_else(|| {
                        ModelError::Format(format!("{}: no client for {rel}", csv.display()))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Some(ids)
        } else {
            None
        };
        decoded.push((images, clients));
    }
    let (width, height) = size.map_or((0, 0), |(w, h, _)| (w as usize, h as usize));
    let channels = if any_colour { 3 } else { 1 };
    let shape = DataShape {
        channels,
        height,
        width,
        classes: classes.len(),
    };
    let mut out = Vec::with_capacity(2);
    for (images, clients) in decoded {
        let n = images.len();
        let mut pixels = Vec::with_capacity(n * channels * height * width);
        let mut labels = Vec::with_capacity(n);
        for (_, label, img) in images {
            labels.push(label);
            if channels == 1 {
                pixels.extend_from_slice(img.to_luma8().as_raw());
            } else {
                // image gives HWC interleaved; the model wants CHW planes.
                let rgb = img.to_rgb8();
                let raw = rgb.as_raw();
                for c in 0..3 {
                    pixels.extend(raw.iter().skip(c).step_by(3));
                }
            }
        }
        out.push(
            RawSplit {
                pixels,
                labels,
                clients,
                n,
                channels,
                height,
                width,
            }
            .into_dataset(shape)?,
        );
    }
    let test = out.pop();
    let train = out.pop();
    match (train, test) {
        (Some(train), Some(test)) => Ok(DataSplit { train, test }),
        _ => Err(ModelError::Format("internal: missing split".into())),
    }
}

/// Distinct client ids in first-seen order (used by tests and callers that report clients).
pub fn distinct_clients(clients: &[String]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    clients
        .iter()
        .filter(|c| seen.insert(c.as_str()))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn idx_images(n: usize, h: usize, w: usize) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&IDX_IMAGES_MAGIC.to_be_bytes());
        for d in [n, h, w] {
            b.extend_from_slice(&(d as u32).to_be_bytes());
        }
        b.extend((0..n * h * w).map(|i| (i % 256) as u8));
        b
    }

    fn idx_labels(labels: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&IDX_LABELS_MAGIC.to_be_bytes());
        b.extend_from_slice(&(labels.len() as u32).to_be_bytes());
        b.extend_from_slice(labels);
        b
    }

    fn write(path: &Path, bytes: &[u8], gz: bool) {
        if gz {
            let f = std::fs::File::create(path.with_extension("gz")).unwrap();
            let mut enc = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
            enc.write_all(bytes).unwrap();
            enc.finish().unwrap();
        } else {
            std::fs::write(path, bytes).unwrap();
        }
    }

    fn write_idx_dir(dir: &Path, gz: bool) {
        // `with_extension("gz")` replaces nothing here: the stems have no dot.
        write(
            &dir.join("train-images-idx3-ubyte"),
            &idx_images(6, 4, 5),
            gz,
        );
        write(
            &dir.join("train-labels-idx1-ubyte"),
            &idx_labels(&[0, 1, 2, 0, 1, 2]),
            gz,
        );
        write(
            &dir.join("t10k-images-idx3-ubyte"),
            &idx_images(3, 4, 5),
            gz,
        );
        write(
            &dir.join("t10k-labels-idx1-ubyte"),
            &idx_labels(&[3, 0, 1]),
            gz,
        );
    }

    #[test]
    fn idx_round_trip_raw_and_gz() {
        for gz in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            write_idx_dir(dir.path(), gz);
            std::fs::write(dir.path().join("train-clients.txt"), "a\na\nb\nb\nc\nc\n").unwrap();
            let split = load_dir(dir.path()).unwrap();
            assert_eq!(
                split.train.shape,
                DataShape {
                    channels: 1,
                    height: 4,
                    width: 5,
                    classes: 4
                }
            );
            assert_eq!(split.train.len(), 6);
            assert_eq!(split.test.len(), 3);
            assert_eq!(split.train.images.size(), vec![6, 1, 4, 5]);
            assert_eq!(split.train.images.kind(), Kind::Float);
            assert_eq!(split.train.labels_vec(), vec![0, 1, 2, 0, 1, 2]);
            assert_eq!(split.test.labels_vec(), vec![3, 0, 1]);
            // pixel 0 → -1, pixel 1 → 1/127.5 - 1
            let first = split.train.images.flatten(0, -1);
            let v = Vec::<f32>::try_from(&first).unwrap();
            assert!((v[0] + 1.0).abs() < 1e-6);
            assert!((v[1] - (1.0 / 127.5 - 1.0)).abs() < 1e-6);
            assert_eq!(split.train.clients.as_ref().unwrap()[2], "b");
            assert!(split.test.clients.is_none());
            let sub = split.train.subset(&[5, 2, 99]);
            assert_eq!(sub.len(), 2);
            assert_eq!(sub.labels_vec(), vec![2, 2]);
            assert_eq!(sub.clients.unwrap(), vec!["c".to_string(), "b".to_string()]);
        }
    }

    #[test]
    fn malformed_idx_is_typed_error() {
        // Bad magic.
        let mut bad = idx_images(2, 3, 3);
        bad[3] = 0x01;
        assert!(matches!(
            parse_idx_images(&bad, "x"),
            Err(ModelError::Format(_))
        ));
        // Truncated body.
        let good = idx_images(2, 3, 3);
        assert!(matches!(
            parse_idx_images(&good[..good.len() - 1], "x"),
            Err(ModelError::Format(_))
        ));
        // Truncated header and empty input.
        assert!(matches!(
            parse_idx_images(&good[..10], "x"),
            Err(ModelError::Format(_))
        ));
        assert!(matches!(
            parse_idx_labels(&[], "x"),
            Err(ModelError::Format(_))
        ));
        // Huge claimed dims must not overflow or allocate.
        let mut huge = Vec::new();
        huge.extend_from_slice(&IDX_IMAGES_MAGIC.to_be_bytes());
        huge.extend_from_slice(&[0xff; 12]);
        assert!(matches!(
            parse_idx_images(&huge, "x"),
            Err(ModelError::Format(_))
        ));
        // Label count disagreeing with images, through load_dir.
        let dir = tempfile::tempdir().unwrap();
        write_idx_dir(dir.path(), false);
        write(
            &dir.path().join("train-labels-idx1-ubyte"),
            &idx_labels(&[0, 1]),
            false,
        );
        assert!(matches!(load_dir(dir.path()), Err(ModelError::Format(_))));
        // Clients file with the wrong number of lines.
        let dir = tempfile::tempdir().unwrap();
        write_idx_dir(dir.path(), false);
        std::fs::write(dir.path().join("train-clients.txt"), "a\nb\n").unwrap();
        assert!(matches!(load_dir(dir.path()), Err(ModelError::Format(_))));
        // Corrupt gzip.
        let dir = tempfile::tempdir().unwrap();
        write_idx_dir(dir.path(), true);
        std::fs::write(
            dir.path().join("t10k-images-idx3-ubyte.gz"),
            b"\x1f\x8bnot gzip",
        )
        .unwrap();
        assert!(load_dir(dir.path()).is_err());
        // Not a dataset at all.
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(load_dir(dir.path()), Err(ModelError::Format(_))));
    }

    fn save_png(path: &Path, rgb: bool, w: u32, h: u32, seed: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        if rgb {
            image::RgbImage::from_fn(w, h, |x, y| {
                image::Rgb([seed, (x * 10) as u8, (y * 10) as u8])
            })
            .save(path)
            .unwrap();
        } else {
            image::GrayImage::from_fn(w, h, |x, _| image::Luma([seed.wrapping_add(x as u8)]))
                .save(path)
                .unwrap();
        }
    }

    #[test]
    fn image_folder_grey_and_rgb() {
        for rgb in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path();
            for (i, class) in ["cat", "ant", "bee"].iter().enumerate() {
                for j in 0..2 {
                    save_png(
                        &root.join(format!("train/{class}/{j}.png")),
                        rgb,
                        6,
                        4,
                        (i * 50 + j) as u8,
                    );
                }
                save_png(&root.join(format!("test/{class}/0.png")), rgb, 6, 4, 7);
            }
            std::fs::write(
                root.join("train-clients.csv"),
                "path,client\nant/0.png,u1\nant/1.png,u2\nbee/0.png,u1\nbee/1.png,u2\ncat/0.png,u1\ncat/1.png,u3\n",
            )
            .unwrap();
            let split = load_dir(root).unwrap();
            let c = if rgb { 3 } else { 1 };
            assert_eq!(
                split.train.shape,
                DataShape {
                    channels: c,
                    height: 4,
                    width: 6,
                    classes: 3
                }
            );
            assert_eq!(split.train.images.size(), vec![6, c as i64, 4, 6]);
            // Sorted classes: ant=0, bee=1, cat=2.
            assert_eq!(split.train.labels_vec(), vec![0, 0, 1, 1, 2, 2]);
            assert_eq!(split.test.labels_vec(), vec![0, 1, 2]);
            assert_eq!(
                split.train.clients.unwrap(),
                ["u1", "u2", "u1", "u2", "u1", "u3"]
                    .map(String::from)
                    .to_vec()
            );
            assert!(split.test.clients.is_none());
            if rgb {
                // First image is class ant (i=1), j=0 → red channel = 50 everywhere.
                let red = split.train.images.get(0).get(0);
                let expect = 50.0 / 127.5 - 1.0;
                let v = Vec::<f32>::try_from(&red.flatten(0, -1)).unwrap();
                assert!(v.iter().all(|&p| (p - expect as f32).abs() < 1e-5));
            }
        }
    }

    #[test]
    fn image_folder_size_mismatch_and_unknown_test_class() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        save_png(&root.join("train/a/0.png"), false, 4, 4, 0);
        save_png(&root.join("train/a/1.png"), false, 5, 4, 0);
        save_png(&root.join("test/a/0.png"), false, 4, 4, 0);
        assert!(matches!(load_dir(root), Err(ModelError::Format(_))));

        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        save_png(&root.join("train/a/0.png"), false, 4, 4, 0);
        save_png(&root.join("test/z/0.png"), false, 4, 4, 0);
        assert!(matches!(load_dir(root), Err(ModelError::Format(_))));
    }

    #[test]
    fn synthetic_is_deterministic_and_shaped() {
        let shape = DataShape {
            channels: 1,
            height: 8,
            width: 8,
            classes: 4,
        };
        let a = synthetic(20, 8, shape, 3);
        let b = synthetic(20, 8, shape, 3);
        assert_eq!(a.train.images.size(), vec![20, 1, 8, 8]);
        assert_eq!(a.test.len(), 8);
        assert!(a.train.images.equal(&b.train.images));
        assert_eq!(a.train.labels_vec()[..5], [0, 1, 2, 3, 0]);
        assert_eq!(
            distinct_clients(&["x".into(), "y".into(), "x".into()]),
            vec!["x", "y"]
        );
    }
}
