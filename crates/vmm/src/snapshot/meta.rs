//! `snapshot.json` as the VMM reads and writes it: proto's schema plus
//! what only the VMM can check (tap names, the vmstate agreeing with it).

use std::path::Path;

use crate::devices::virtio::manager::{AttachedState, DeviceState};
use crate::devices::virtio::net::{self, format_mac, parse_mac};

use super::*;

/// Writes `snapshot.json` in `dir` atomically (temp file, fsync, rename)
/// and leaves it read-only ([`SEALED_MODE`]): it is replaced, never
/// changed in place.
pub fn write_meta(dir: &Path, meta: &SnapshotMeta) -> Result<(), Error> {
    proto::snapshot::write_meta(dir, meta).map_err(|e| meta_err(dir, e))?;
    seal(&dir.join(META_FILE))
}

/// Reads `snapshot.json` from `dir` ([`proto::snapshot::read_meta`]) and
/// checks what only the VMM knows: every tap name one it can open.
pub fn read_meta(dir: &Path) -> Result<SnapshotMeta, Error> {
    let meta = proto::snapshot::read_meta(dir).map_err(|e| meta_err(dir, e))?;
    check_nets(&meta.nets).map_err(|reason| Error::Meta {
        path: dir.to_owned(),
        reason,
    })?;
    Ok(meta)
}

pub(super) fn meta_err(dir: &Path, e: proto::snapshot::MetaError) -> Error {
    match e {
        proto::snapshot::MetaError::Io { path, source } => Error::Io { path, source },
        proto::snapshot::MetaError::Invalid { reason, .. } => Error::Meta {
            path: dir.to_owned(),
            reason,
        },
    }
}

/// `nets` of an untrusted `snapshot.json`: every tap name one that
/// [`net::Tap`] opens, every MAC six hex pairs.
pub(super) fn check_nets(nets: &[SnapshotNet]) -> Result<(), String> {
    for (i, n) in nets.iter().enumerate() {
        net::tap::check_name(&n.tap).map_err(|e| format!("network interface {i}: {e}"))?;
        if parse_mac(&n.mac).is_none() {
            return Err(format!(
                "network interface {i}: MAC {:?} is not six hex pairs (aa:bb:cc:dd:ee:ff)",
                n.mac
            ));
        }
    }
    Ok(())
}

/// Whether `nets` (from `snapshot.json`) describes the vmstate's network
/// devices `saved`: one each, in order, with the same MAC.
pub(super) fn nets_match(nets: &[SnapshotNet], saved: &[AttachedState]) -> Result<(), String> {
    let macs: Vec<[u8; 6]> = saved
        .iter()
        .filter_map(|d| match &d.device {
            DeviceState::Net(n) => Some(n.mac),
            _ => None,
        })
        .collect();
    if macs.len() != nets.len() {
        return Err(format!(
            "the vmstate has {} network interfaces but snapshot.json names a tap for {}{}",
            macs.len(),
            nets.len(),
            if nets.is_empty() {
                " (a snapshot taken before taps were recorded: take it again)"
            } else {
                ""
            }
        ));
    }
    for (i, (n, mac)) in nets.iter().zip(&macs).enumerate() {
        if parse_mac(&n.mac) != Some(*mac) {
            return Err(format!(
                "network interface {i}: snapshot.json says MAC {} but the vmstate has {}",
                n.mac,
                format_mac(mac)
            ));
        }
    }
    Ok(())
}
