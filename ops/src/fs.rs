//! Durable file writes: a reader sees the old or the new file, never a torn one.

use crate::OpsError;
use std::io::Write;
use std::path::Path;

/// Writes `data` to `path` via a temp file, fsync and rename: readers see the old or the new
/// file, never a torn one.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), OpsError> {
    write_synced(path, data)?;
    if let Some(dir) = path.parent() {
        // Make the rename itself durable.
        let _ = sync_dir(dir);
    }
    Ok(())
}

/// [`write_atomic`] without syncing the directory: the file's bytes are durable, its name is
/// not until [`sync_dir`] runs on its directory. Lets a batch of files share one directory
/// sync (group commit).
pub fn write_synced(path: &Path, data: &[u8]) -> Result<(), OpsError> {
    let io = |e: std::io::Error| OpsError::Io(format!("{}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(data).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}

/// fsyncs a directory, making the renames and creations in it durable.
pub fn sync_dir(dir: &Path) -> Result<(), OpsError> {
    let io = |e: std::io::Error| OpsError::Io(format!("{}: {e}", dir.display()));
    std::fs::File::open(dir).map_err(io)?.sync_all().map_err(io)
}
