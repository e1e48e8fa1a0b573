//! What ddpm computes once per machine and user and keeps between runs, outside any clone or
//! run directory: the Inception network, FID statistics of real sets, image folder indexes.
use std::path::PathBuf;

use anyhow::{Context, Result};

/// The cache folder, found as tools/setup.sh finds it: $DDPM_CACHE, else
/// $XDG_CACHE_HOME/ddpm, else ~/.cache/ddpm.
pub fn dir() -> Result<PathBuf> {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var("DDPM_CACHE") {
        return Ok(dir);
    }
    if let Some(xdg) = var("XDG_CACHE_HOME") {
        return Ok(xdg.join("ddpm"));
    }
    let home = var("HOME").context(
        "cannot place the cache folder: none of DDPM_CACHE, XDG_CACHE_HOME and HOME is set",
    )?;
    Ok(home.join(".cache").join("ddpm"))
}
