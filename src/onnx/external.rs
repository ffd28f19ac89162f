//! External tensor data: files beside the model, named by `location` with an
//! optional `offset` and `length` (onnx IR.md "External tensor data").
//!
//! A location must stay inside the model's folder: absolute paths, `..` and
//! symlinks that lead out are refused, as are ranges past the end of the file.
//! Each file is memory-mapped once; tensors are slices of the map.

use bytes::Bytes;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Component, Path, PathBuf};

/// One tensor's external data entries, as written in the model.
#[derive(Debug, Default)]
pub struct ExternalRef {
    pub location: Option<String>,
    pub offset: Option<String>,
    pub length: Option<String>,
}

/// Maps the external files of one model, each once.
pub struct ExternalFiles {
    folder: Option<PathBuf>,
    populate: bool,
    canonical_folder: Option<PathBuf>,
    maps: HashMap<PathBuf, Bytes>,
}

impl ExternalFiles {
    /// `folder`: the model's folder; `None` for a model read from memory, which
    /// then cannot have external data.
    pub fn new(folder: Option<&Path>, populate: bool) -> ExternalFiles {
        ExternalFiles { folder: folder.map(Path::to_path_buf), populate, canonical_folder: None, maps: HashMap::new() }
    }

    /// The bytes an external reference names, or a sentence saying what is wrong.
    pub fn resolve(&mut self, reference: &ExternalRef) -> Result<Bytes, String> {
        let location = reference.location.as_deref().ok_or("no 'location' entry")?;
        let relative = Path::new(location);
        if location.is_empty() || relative.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(format!("location '{location}' must be a plain relative path inside the model's folder (no absolute path, no '..')"));
        }
        let folder = self.folder.clone().ok_or("the model was not read from a file, so it has no folder")?;
        let path = folder.join(relative);
        let canonical = path.canonicalize().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!("external file '{}' does not exist", path.display()),
            _ => format!("cannot open external file '{}': {e}", path.display()),
        })?;
        if self.canonical_folder.is_none() {
            let c = folder.canonicalize().map_err(|e| format!("cannot resolve the model's folder: {e}"))?;
            self.canonical_folder = Some(c);
        }
        if !self.canonical_folder.as_ref().is_some_and(|f| canonical.starts_with(f)) {
            return Err(format!("location '{location}' leads outside the model's folder (through a symlink)"));
        }
        let data = match self.maps.get(&canonical) {
            Some(d) => d.clone(),
            None => {
                let d = map_file(&canonical, self.populate).map_err(|e| format!("cannot map '{}': {e}", path.display()))?;
                self.maps.insert(canonical, d.clone());
                d
            }
        };
        let parse = |field: &str, v: &Option<String>| -> Result<Option<u64>, String> {
            v.as_deref().map(|s| s.parse::<u64>().map_err(|_| format!("'{field}' is '{s}', not a byte count"))).transpose()
        };
        let offset = parse("offset", &reference.offset)?.unwrap_or(0);
        let file_len = data.len() as u64;
        let length = match parse("length", &reference.length)? {
            Some(l) => l,
            None => file_len.saturating_sub(offset),
        };
        let end = offset
            .checked_add(length)
            .filter(|&e| e <= file_len)
            .ok_or_else(|| format!("bytes {offset}..{} run past the end of '{}' ({file_len} bytes)", offset as u128 + length as u128, location))?;
        Ok(data.slice(offset as usize..end as usize))
    }
}

/// The whole file as `Bytes`, memory-mapped (empty files cannot be mapped).
/// `populate` maps every page up front: one system call instead of a page fault
/// per 64 KiB, worth it when every weight will be read (convert, optimize), a
/// waste when few are (inspect).
pub fn map_file(path: &Path, populate: bool) -> std::io::Result<Bytes> {
    let file = File::open(path)?;
    if file.metadata()?.len() == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: the map is read only. Like every memory-mapped reader we assume the
    // file is not truncated or rewritten by another process while it is open;
    // onnxopt itself never writes over its inputs (outputs are renamed into place).
    let mut options = memmap2::MmapOptions::new();
    if populate {
        options.populate();
    }
    let map = unsafe { options.map(&file)? };
    Ok(Bytes::from_owner(map))
}
