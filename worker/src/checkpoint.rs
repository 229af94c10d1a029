//! Checkpoints: the parameters and the step count, written atomically (temporary file, fsync,
//! rename, fsync of the directory) and sealed with a CRC-32, so a crash at any moment leaves
//! either the old checkpoint or the new one, and a torn or corrupted file is detected, reported
//! and passed over for the one before it.
//!
//! Layout (little-endian): `WATTCKPT`, format version (u32), model tag (u32), features (u64),
//! hidden units (u64), step (u64), parameter count (u64), the parameters (f64 each), then the
//! CRC-32 of everything before it (u32). Files are named `step-<12 digits>.ckpt`; the newest
//! few are kept.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::model::{Model, ModelKind};

const MAGIC: &[u8; 8] = b"WATTCKPT";
const VERSION: u32 = 1;
/// Checkpoints kept: the newest, and older ones to fall back on if it is damaged.
pub const KEEP: usize = 3;

#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub model: Model,
    /// Steps completed.
    pub step: u64,
    pub params: Vec<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_owned(), source }
}

pub fn file_name(step: u64) -> String {
    format!("step-{step:012}.ckpt")
}

/// Write `ckpt` into `dir` atomically and prune all but the newest [`KEEP`].
pub fn save(dir: &Path, ckpt: &Checkpoint) -> Result<PathBuf, CheckpointError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let mut bytes = Vec::with_capacity(48 + 8 * ckpt.params.len() + 4);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&ckpt.model.kind.tag().to_le_bytes());
    bytes.extend_from_slice(&(ckpt.model.features as u64).to_le_bytes());
    bytes.extend_from_slice(&(ckpt.model.hidden as u64).to_le_bytes());
    bytes.extend_from_slice(&ckpt.step.to_le_bytes());
    bytes.extend_from_slice(&(ckpt.params.len() as u64).to_le_bytes());
    for p in &ckpt.params {
        bytes.extend_from_slice(&p.to_le_bytes());
    }
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());

    let path = dir.join(file_name(ckpt.step));
    let tmp = dir.join(format!(".{}.tmp", file_name(ckpt.step)));
    let mut file = File::create(&tmp).map_err(io(&tmp))?;
    file.write_all(&bytes).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(io(&path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    for old in list(dir)?.into_iter().skip(KEEP) {
        let _ = fs::remove_file(old);
    }
    Ok(path)
}

/// Checkpoint files in `dir`, newest first.
pub fn list(dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(CheckpointError::Io { path: dir.to_owned(), source: e }),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step-") && n.ends_with(".ckpt"))
        })
        .collect();
    files.sort_unstable_by(|a, b| b.cmp(a));
    Ok(files)
}

pub fn load(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let bytes = fs::read(path).map_err(io(path))?;
    let invalid = |message: String| CheckpointError::Invalid { path: path.to_owned(), message };
    if bytes.len() < 48 + 4 || &bytes[..8] != MAGIC {
        return Err(invalid(format!("not a checkpoint ({} bytes, no header)", bytes.len())));
    }
    let (body, tail) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
    if crc32fast::hash(body) != stored {
        return Err(invalid("checksum mismatch: the file is truncated or corrupt".into()));
    }
    let u32_at = |i: usize| u32::from_le_bytes([body[i], body[i + 1], body[i + 2], body[i + 3]]);
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&body[i..i + 8]);
        u64::from_le_bytes(b)
    };
    if u32_at(8) != VERSION {
        return Err(invalid(format!("format version {} (this worker reads {VERSION})", u32_at(8))));
    }
    let kind = match u32_at(12) {
        1 => ModelKind::Logreg,
        2 => ModelKind::Mlp,
        t => return Err(invalid(format!("unknown model tag {t}"))),
    };
    let model = Model { kind, features: u64_at(16) as usize, hidden: u64_at(24) as usize };
    let (step, n) = (u64_at(32), u64_at(40) as usize);
    if body.len() != 48 + 8 * n || n != model.param_count() {
        return Err(invalid(format!("{n} parameters in {} bytes for a {} model", body.len(), kind.name())));
    }
    let params = body[48..].chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
    Ok(Checkpoint { model, step, params })
}

/// The newest checkpoint in `dir` that loads, and a line for each newer one passed over.
pub fn latest(dir: &Path) -> Result<(Option<Checkpoint>, Vec<String>), CheckpointError> {
    let mut skipped = Vec::new();
    for path in list(dir)? {
        match load(&path) {
            Ok(c) => return Ok((Some(c), skipped)),
            Err(e) => skipped.push(e.to_string()),
        }
    }
    Ok((None, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ckpt(step: u64) -> Checkpoint {
        let model = Model { kind: ModelKind::Logreg, features: 3, hidden: 0 };
        Checkpoint { model, step, params: vec![step as f64, -1.5, 0.25, 1e-300] }
    }

    #[test]
    fn round_trip_keeps_the_newest_few() {
        let dir = tempfile::tempdir().unwrap();
        for s in 1..=5 {
            save(dir.path(), &ckpt(s * 10)).unwrap();
        }
        let files = list(dir.path()).unwrap();
        assert_eq!(files.len(), KEEP);
        let (newest, skipped) = latest(dir.path()).unwrap();
        assert_eq!(newest, Some(ckpt(50)));
        assert!(skipped.is_empty());
    }

    #[test]
    fn a_truncated_or_corrupt_newest_checkpoint_falls_back_to_the_one_before() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &ckpt(10)).unwrap();
        let newest = save(dir.path(), &ckpt(20)).unwrap();
        let bytes = fs::read(&newest).unwrap();
        fs::write(&newest, &bytes[..bytes.len() - 9]).unwrap();
        let (c, skipped) = latest(dir.path()).unwrap();
        assert_eq!(c.unwrap().step, 10);
        assert!(skipped[0].contains("checksum mismatch"), "{skipped:?}");

        let mut flipped = bytes.clone();
        flipped[50] ^= 0x40;
        fs::write(&newest, &flipped).unwrap();
        let (c, skipped) = latest(dir.path()).unwrap();
        assert_eq!(c.unwrap().step, 10);
        assert!(skipped[0].contains("corrupt"), "{skipped:?}");

        fs::write(&newest, b"garbage").unwrap();
        assert!(latest(dir.path()).unwrap().1[0].contains("not a checkpoint"));
    }
}
