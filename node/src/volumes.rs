//! Local volumes' data, removed once their PersistentVolume is gone.
//!
//! The local provisioner's volumes are directories in the node's local volume directory
//! (`DATA/node/local-volumes/pvc-<uid>`). A volume is deleted (reclaim policy `Delete`)
//! only after its claim, and a claim only once no pod uses it; the node then removes the
//! directory on its next sweep, so a volume's data does not outlive it.

use std::collections::HashSet;
use std::path::Path;

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};

use baton_kube::storage::LOCAL_VOLUME_PREFIX;

/// Why a sweep did not run.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("listing PersistentVolumes")]
    List(#[source] kube::Error),
    #[error("reading {0}")]
    Read(String, #[source] std::io::Error),
}

/// Removes the directories of local volumes that no PersistentVolume names any more;
/// returns how many went.
pub async fn sweep(client: &Client, dir: &Path) -> Result<usize, SweepError> {
    // Read before the volumes are listed: a directory made after this read (for a volume
    // the list might miss) is left for the next sweep.
    let entries: Vec<std::fs::DirEntry> = match std::fs::read_dir(dir) {
        Ok(e) => e.flatten().collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(SweepError::Read(dir.display().to_string(), e)),
    };
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let live: HashSet<String> = pvs
        .list(&ListParams::default())
        .await
        .map_err(SweepError::List)?
        .items
        .iter()
        .filter(|pv| {
            pv.spec
                .as_ref()
                .and_then(|s| s.local.as_ref())
                .is_some_and(|l| l.path.starts_with(LOCAL_VOLUME_PREFIX))
        })
        .map(|pv| pv.name_any())
        .collect();
    let mut removed = 0;
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        if live.contains(&name) {
            continue;
        }
        let path = entry.path();
        // Never followed: a symlink here is removed itself, not what it points at.
        let gone = match entry.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            Ok(_) => std::fs::remove_file(&path),
            Err(e) => Err(e),
        };
        match gone {
            Ok(()) => {
                tracing::info!(volume = %name, "removed the data of a deleted local volume");
                removed += 1;
            }
            Err(e) => tracing::warn!(volume = %name, error = %e, "cannot remove local volume data"),
        }
    }
    Ok(removed)
}
