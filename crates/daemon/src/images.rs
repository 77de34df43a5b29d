//! The images directory (`--images-dir`): where the kernels and root
//! filesystems a snapshot request names must be. A request names a file
//! by its path relative to the directory, or by an absolute path inside
//! it; nothing outside is ever opened for a client, however the path is
//! spelled (`..`, symbolic links out). What a refusal says is the same for
//! every way a path is unusable (missing, outside, a directory, a device,
//! unreadable), so a client learns nothing of the host's files from it.

use std::path::{Component, Path, PathBuf};

use crate::error::{ApiError, ApiResult};

/// The images directory, resolved.
#[derive(Clone, Debug)]
pub struct Images {
    dir: PathBuf,
}

impl Images {
    /// `dir` (created if missing), resolved to its canonical path.
    pub fn open(dir: &Path) -> std::io::Result<Images> {
        std::fs::create_dir_all(dir)?;
        Ok(Images {
            dir: std::fs::canonicalize(dir)?,
        })
    }

    /// Where images go.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file `name` (the request's `what` field) names, as the VMM is
    /// to open it: a regular, readable file inside the images directory,
    /// by its canonical path (no symbolic link left to swap).
    pub fn resolve(&self, what: &str, name: &str) -> ApiResult<PathBuf> {
        let refuse = || {
            ApiError::bad_request(format!(
                "{what} {name:?} cannot be used: images go in the daemon's images directory {} \
                 (--images-dir); give a readable regular file there, by its name in it or its \
                 full path",
                self.dir.display()
            ))
        };
        let given = Path::new(name);
        if name.is_empty()
            || name.len() > 4096
            || name.contains('\0')
            || given.components().any(|c| c == Component::ParentDir)
        {
            return Err(refuse());
        }
        let joined = if given.is_absolute() {
            given.to_owned()
        } else {
            self.dir.join(given)
        };
        let real = std::fs::canonicalize(&joined).map_err(|_| refuse())?;
        if !real.starts_with(&self.dir) || real == self.dir {
            return Err(refuse());
        }
        // Opened only once it is known to be a regular file: a FIFO would
        // block the open.
        let usable = std::fs::metadata(&real).is_ok_and(|m| m.is_file())
            && std::fs::File::open(&real).is_ok();
        if !usable {
            return Err(refuse());
        }
        Ok(real)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_inside_the_directory_resolve() {
        let root = std::env::temp_dir().join(format!("forkd-images-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let images = Images::open(&root.join("images")).unwrap();
        let dir = images.dir().to_owned();
        std::fs::create_dir_all(dir.join("k")).unwrap();
        std::fs::write(dir.join("k/vmlinux"), b"kernel").unwrap();
        std::fs::write(dir.join("root,fs.ext4"), b"fs").unwrap();
        std::fs::write(root.join("outside"), b"secret").unwrap();
        std::os::unix::fs::symlink(root.join("outside"), dir.join("out-link")).unwrap();
        std::os::unix::fs::symlink(dir.join("k/vmlinux"), dir.join("in-link")).unwrap();

        // By name, by full path, through a link that stays inside; a comma
        // is a character like any other.
        assert_eq!(
            images.resolve("kernel", "k/vmlinux").unwrap(),
            dir.join("k/vmlinux")
        );
        let full = dir.join("k/vmlinux").to_string_lossy().into_owned();
        assert_eq!(
            images.resolve("kernel", &full).unwrap(),
            dir.join("k/vmlinux")
        );
        assert_eq!(
            images.resolve("kernel", "in-link").unwrap(),
            dir.join("k/vmlinux")
        );
        assert_eq!(
            images.resolve("rootfs", "root,fs.ext4").unwrap(),
            dir.join("root,fs.ext4")
        );

        let outside = root.join("outside").to_string_lossy().into_owned();
        for bad in [
            "/etc/shadow",
            outside.as_str(),
            "../outside",
            "k/../k/vmlinux",
            "out-link",
            "k",
            "",
            "missing",
            "/",
            ".",
        ] {
            let err = images.resolve("kernel", bad).unwrap_err();
            assert_eq!(err.status(), axum::http::StatusCode::BAD_REQUEST, "{bad}");
            assert!(
                err.message
                    .contains("images go in the daemon's images directory"),
                "{bad}: {}",
                err.message
            );
        }
        std::fs::remove_dir_all(&root).unwrap();
    }
}
